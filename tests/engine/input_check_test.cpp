// The shared input checks (src/engine/input_check.cpp) through the engine's entry points: quantized
// storage refused, kinds of input (task vector or model) refused or reported, one wording for missing
// and mismatched tensors in edit and merge, extra tensors in merge, integer tensors a fine-tune changed.
#include <gtest/gtest.h>

#include <fstream>

#include <fmt/format.h>

#include "engine/recipe_at.hpp"
#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::TempDir;
using test::TensorValues;
using test::write_model;

struct Caught {
  ErrorCode code = ErrorCode::kInternal;
  std::string message;
};

template <typename F>
Caught caught(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return {e.code(), e.what()};
  }
  return {ErrorCode::kInternal, "no error"};
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

bool any_has(const std::vector<std::string>& lines, const std::string& part) {
  for (const auto& l : lines)
    if (has(l, part)) return true;
  return false;
}

EditOptions opts() {
  EditOptions o;
  o.threads = 1;
  return o;
}

// A folder model: model.safetensors plus an optional config.json.
fs::path write_folder(const TempDir& dir, const std::string& name, const std::vector<TensorValues>& tensors,
                      const std::string& config = "") {
  const fs::path folder = dir.subdir(name);
  write_model(folder / "model.safetensors", tensors);
  if (!config.empty()) std::ofstream(folder / "config.json") << config;
  return folder;
}

using test::recipe_at;

std::string fmt_recipe(const fs::path& quantized, const fs::path& plain) {
  return "merge_method: task_arithmetic\nbase_model: " + plain.string() + "\nmodels:\n  - model: " + quantized.string() +
         "\n";
}

const std::vector<TensorValues> kPlain{{"l.bias", DType::kF32, {2}, {1, 2}}, {"l.weight", DType::kF32, {2}, {3, 4}}};

// diff, merge and similarity all refuse `quantized` (a folder) against a plain model, before any output.
void expect_refused(const TempDir& dir, const fs::path& quantized, const std::string& method_part,
                    const std::string& tensor_part) {
  const fs::path plain = dir.subdir("plain");
  write_model(plain / "model.safetensors", kPlain);
  Checkpoint q = Checkpoint::open(quantized);
  Checkpoint p = Checkpoint::open(plain);
  const fs::path out = dir / "out.safetensors";
  Caught e = caught([&] { make_task_vector(p, q, out, opts()); });
  EXPECT_EQ(e.code, ErrorCode::kQuantized) << e.message;
  EXPECT_TRUE(has(e.message, method_part)) << e.message;
  EXPECT_TRUE(has(e.message, "'" + tensor_part + "'")) << e.message;
  EXPECT_TRUE(has(e.message, "full-precision")) << e.message;
  EXPECT_TRUE(has(e.message, quantized.string())) << e.message;
  EXPECT_FALSE(fs::exists(out));
  Recipe r = recipe_at(dir, fmt_recipe(quantized, plain));
  EXPECT_EQ(caught([&] { merge_checkpoints(r, out, opts()); }).code, ErrorCode::kQuantized);
  EXPECT_FALSE(fs::exists(out));
  EXPECT_EQ(caught([&] { task_vector_similarity(nullptr, {{"q", &q}, {"p", &p}}, opts()); }).code, ErrorCode::kQuantized);
}

TEST(InputCheck, BlockScaledFp8IsRefused) {
  TempDir dir;
  const fs::path q = write_folder(dir, "fp8", {{"l.bias", DType::kF32, {2}, {1, 2}},
                                               {"l.weight", DType::kF8E4M3, {2}, {1, 2}},
                                               {"l.weight_scale_inv", DType::kF32, {1}, {0.5}}});
  expect_refused(dir, q, "block-scaled FP8", "l.weight");
}

TEST(InputCheck, Fp8QuantizationConfigIsRefused) {
  TempDir dir;
  const fs::path q = write_folder(dir, "fp8cfg", {{"l.bias", DType::kF32, {2}, {1, 2}}, {"l.weight", DType::kF8E4M3, {2}, {3, 4}}},
                                  R"({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})");
  expect_refused(dir, q, "'fp8'", "l.bias");
}

TEST(InputCheck, PlainFp8WithoutScalesIsEdited) {
  TempDir dir;
  write_model(dir / "p.safetensors", {{"w", DType::kF8E4M3, {2}, {1, 2}}});
  write_model(dir / "f.safetensors", {{"w", DType::kF8E4M3, {2}, {1.5, 4}}});
  Checkpoint p = Checkpoint::open(dir / "p.safetensors");
  Checkpoint f = Checkpoint::open(dir / "f.safetensors");
  make_task_vector(p, f, dir / "tau.safetensors", opts());
  EXPECT_EQ(read_values(dir / "tau.safetensors", "w"), (std::vector<double>{0.5, 2}));
}

TEST(InputCheck, Bitsandbytes4bitIsRefused) {
  TempDir dir;
  const fs::path q = write_folder(dir, "nf4", {{"l.bias", DType::kF32, {2}, {1, 2}},
                                               {"l.weight", DType::kU8, {1}, {0x12}},
                                               {"l.weight.absmax", DType::kF32, {1}, {0.5}},
                                               {"l.weight.quant_map", DType::kF32, {2}, {-1, 1}},
                                               {"l.weight.quant_state.bitsandbytes__nf4", DType::kU8, {2}, {1, 2}}});
  expect_refused(dir, q, "bitsandbytes 4-bit", "l.weight");
}

TEST(InputCheck, Bitsandbytes8bitIsRefused) {
  TempDir dir;
  // I8 weights (the test builders write no I8): a raw file.
  const fs::path q = dir.subdir("int8");
  test::write_file(q / "model.safetensors",
                   test::make_safetensors_bytes(R"({"l.SCB":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                                                R"("l.bias":{"dtype":"F32","shape":[2],"data_offsets":[4,12]},)"
                                                R"("l.weight":{"dtype":"I8","shape":[2],"data_offsets":[12,14]}})",
                                                test::bytes_of<float>({0.5f, 1, 2}) + std::string("\x03\x04", 2)));
  expect_refused(dir, q, "bitsandbytes 8-bit", "l.weight");
}

TEST(InputCheck, GptqAndAwqAreRefused) {
  TempDir dir;
  const fs::path gptq = write_folder(dir, "gptq", {{"l.bias", DType::kF32, {2}, {1, 2}},
                                                   {"l.g_idx", DType::kI32, {2}, {0, 0}},
                                                   {"l.qweight", DType::kI32, {1}, {7}},
                                                   {"l.qzeros", DType::kI32, {1}, {8}},
                                                   {"l.scales", DType::kF16, {1}, {0.5}}});
  expect_refused(dir, gptq, "GPTQ", "l.qweight");
  TempDir dir2;
  const fs::path awq = write_folder(dir2, "awq", {{"l.bias", DType::kF32, {2}, {1, 2}},
                                                  {"l.qweight", DType::kI32, {1}, {7}},
                                                  {"l.qzeros", DType::kI32, {1}, {8}},
                                                  {"l.scales", DType::kF16, {1}, {0.5}}},
                                   R"({"quantization_config": {"quant_method": "awq", "bits": 4}})");
  expect_refused(dir2, awq, "awq", "l.qweight");
}

TEST(InputCheck, OtherQuantMethodsInConfigAreRefused) {
  TempDir dir;
  const fs::path q = write_folder(dir, "hqq", kPlain, R"({"quantization_config": {"quant_method": "hqq"}})");
  expect_refused(dir, q, "'hqq'", "l.bias");
}

TEST(InputCheck, ConfigWithoutQuantizationIsNotRefused) {
  TempDir dir;
  const fs::path p = write_folder(dir, "p", kPlain, R"({"model_type": "x", "torch_dtype": "float32"})");
  const fs::path f = write_folder(dir, "f", {{"l.bias", DType::kF32, {2}, {2, 2}}, {"l.weight", DType::kF32, {2}, {3, 5}}},
                                  R"({"model_type": "x"})");
  Checkpoint pc = Checkpoint::open(p), fc = Checkpoint::open(f);
  make_task_vector(pc, fc, dir / "tau.safetensors", opts());
  EXPECT_EQ(read_values(dir / "tau.safetensors", "l.weight"), (std::vector<double>{0, 1}));
}

// ---- kinds of input ----

struct Kinds : ::testing::Test {
  void SetUp() override {
    write_model(dir / "pre.safetensors", {{"w", DType::kF32, {4}, {1, 2, 3, 4}}});
    write_model(dir / "ft.safetensors", {{"w", DType::kF32, {4}, {1.25, 2, 3, 4}}});
    pre.emplace(Checkpoint::open(dir / "pre.safetensors"));
    ft.emplace(Checkpoint::open(dir / "ft.safetensors"));
    make_task_vector(*pre, *ft, dir / "tau.safetensors", opts());
    tau.emplace(Checkpoint::open(dir / "tau.safetensors"));
  }
  TempDir dir;
  std::optional<Checkpoint> pre, ft, tau;
};

TEST_F(Kinds, FullModelAsTaskVectorIsRefused) {
  // ||ft|| / ||pre|| = sqrt(30.5625 / 30) = 1.0093: a model, not a difference.
  Caught e = caught([&] { apply_task_vectors(*pre, {{&*ft, 1.0}}, dir / "out.safetensors", opts()); });
  EXPECT_EQ(e.code, ErrorCode::kBaseMismatch) << e.message;
  EXPECT_TRUE(has(e.message, "looks like a full model")) << e.message;
  EXPECT_TRUE(has(e.message, "= 1.01")) << e.message;
  EXPECT_TRUE(has(e.message, "--force")) << e.message;
  EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
  EditOptions forced = opts();
  forced.force_base = true;
  EditReport r = apply_task_vectors(*pre, {{&*ft, 1.0}}, dir / "out.safetensors", forced);
  EXPECT_TRUE(any_has(r.warnings, "looks like a full model"));
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{2.25, 4, 6, 8}));
}

TEST_F(Kinds, SmallUnlabeledTaskVectorIsAppliedWithAWarning) {
  write_model(dir / "raw_tau.safetensors", {{"w", DType::kF32, {4}, {0.5, 0, 0, -1}}});  // ratio 1.118/5.48 = 0.20
  Checkpoint raw = Checkpoint::open(dir / "raw_tau.safetensors");
  EditReport r = apply_task_vectors(*pre, {{&raw, 2.0}}, dir / "out.safetensors", opts());
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_TRUE(has(r.warnings[0], "no taskvec task-vector metadata"));
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{2, 2, 3, 2}));
}

TEST_F(Kinds, LabeledTaskVectorIsNotMeasured) {
  // A labeled task vector as large as the weights is still a task vector: no refusal, no warning.
  write_model(dir / "big_ft.safetensors", {{"w", DType::kF32, {4}, {3, 4, 5, 6}}});
  Checkpoint big = Checkpoint::open(dir / "big_ft.safetensors");
  make_task_vector(*pre, big, dir / "big_tau.safetensors", opts());
  Checkpoint big_tau = Checkpoint::open(dir / "big_tau.safetensors");
  EditReport r = apply_task_vectors(*pre, {{&big_tau, 1.0}}, dir / "out.safetensors", opts());
  EXPECT_TRUE(r.warnings.empty());
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{3, 4, 5, 6}));
}

TEST_F(Kinds, DiffOfATaskVectorIsRefusedUnlessForced) {
  Caught e = caught([&] { make_task_vector(*pre, *tau, dir / "x.safetensors", opts()); });
  EXPECT_EQ(e.code, ErrorCode::kBaseMismatch) << e.message;
  EXPECT_TRUE(has(e.message, "is a task vector (taskvec.kind=task_vector), not a model")) << e.message;
  EXPECT_EQ(caught([&] { make_task_vector(*tau, *ft, dir / "x.safetensors", opts()); }).code, ErrorCode::kBaseMismatch);
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
  EditOptions forced = opts();
  forced.force_base = true;
  EditReport r = make_task_vector(*pre, *tau, dir / "x.safetensors", forced);
  EXPECT_TRUE(any_has(r.warnings, "FINETUNED of diff"));
}

TEST_F(Kinds, EditAndMergeWarnAboutATaskVectorModel) {
  std::map<std::string, const Checkpoint*> models{{"pre", &*pre}, {"t", &*tau}};
  EditReport r = edit_expression(models, "pre", "pre + tau(t)", dir / "e.safetensors", opts());
  EXPECT_TRUE(any_has(r.warnings, "tau.safetensors is a task vector (taskvec.kind=task_vector), not a model"));
  EXPECT_TRUE(any_has(r.warnings, "the model 't'"));
  Recipe recipe = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                 "  - model: tau.safetensors\n  - model: ft.safetensors\n");
  EditReport m = merge_checkpoints(recipe, dir / "m.safetensors", opts());
  EXPECT_TRUE(any_has(m.warnings, "models[0] of the recipe"));
  EditReport plain = merge_checkpoints(
      recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n  - model: ft.safetensors\n"),
      dir / "m2.safetensors", opts());
  EXPECT_TRUE(plain.warnings.empty());
}

TEST_F(Kinds, TaskVectorAsApplysPretrainedIsNamed) {
  write_model(dir / "small.safetensors", {{"w", DType::kF32, {4}, {0, 0, 0, 0.0625}}});  // ratio 0.0625/0.25 = 0.25
  Checkpoint small = Checkpoint::open(dir / "small.safetensors");
  EditReport r = apply_task_vectors(*tau, {{&small, 1.0}}, dir / "out.safetensors", opts());
  EXPECT_TRUE(any_has(r.warnings, "tau.safetensors is a task vector (taskvec.kind=task_vector), not a model, but is "
                                  "used as the pretrained checkpoint"));
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{0.25, 0, 0, 0.0625}));
}

TEST_F(Kinds, SimilarityNamesTensorsLeftOut) {
  std::vector<TensorValues> many{{"w", DType::kF32, {4}, {0.25, 0, 0, 0}}};
  for (int i = 0; i < 10; ++i) many.push_back({fmt::format("x{}", i), DType::kF32, {1}, {1}});
  write_model(dir / "many.safetensors", many, {{"taskvec.kind", "task_vector"}});
  Checkpoint m = Checkpoint::open(dir / "many.safetensors");
  SimilarityReport r = task_vector_similarity(nullptr, {{"t", &*tau}, {"m", &m}}, opts());
  ASSERT_EQ(r.warnings.size(), 9u);
  EXPECT_TRUE(has(r.warnings[0], "tensor 'x0' of"));
  EXPECT_TRUE(has(r.warnings[8], "2 more tensors of"));
  EXPECT_DOUBLE_EQ(r.cosine[0][1], 1.0);  // over 'w' only
}

TEST_F(Kinds, SimilarityOfModelsSaysWeightsAreCompared) {
  SimilarityReport w = task_vector_similarity(nullptr, {{"pre", &*pre}, {"ft", &*ft}}, opts());
  EXPECT_EQ(w.compared, "weights");
  ASSERT_EQ(w.warnings.size(), 1u);
  EXPECT_TRUE(has(w.warnings[0], "pass --base PRE"));
  SimilarityReport t = task_vector_similarity(nullptr, {{"a", &*tau}, {"b", &*tau}}, opts());
  EXPECT_EQ(t.compared, "task_vectors");
  EXPECT_TRUE(t.warnings.empty());
  EXPECT_DOUBLE_EQ(t.cosine[0][1], 1.0);
  SimilarityReport mixed = task_vector_similarity(nullptr, {{"a", &*tau}, {"ft", &*ft}}, opts());
  EXPECT_EQ(mixed.compared, "task_vectors");
  EXPECT_TRUE(any_has(mixed.warnings, "ft.safetensors has no taskvec.kind=task_vector metadata"));
  SimilarityReport based = task_vector_similarity(&*pre, {{"ft", &*ft}, {"ft2", &*ft}}, opts());
  EXPECT_EQ(based.compared, "task_vectors");
  EXPECT_TRUE(based.warnings.empty());
  EXPECT_DOUBLE_EQ(based.norms[0], 0.25);
}

// ---- one checker for edit and merge ----

TEST(InputCheck, EditAndMergeWordMismatchesAlike) {
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"a", DType::kF32, {2}, {1, 2}}, {"b", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "short.safetensors", {{"a", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "wide.safetensors", {{"a", DType::kF32, {3}, {1, 2, 3}}, {"b", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "int.safetensors", {{"a", DType::kI32, {2}, {1, 2}}, {"b", DType::kF32, {2}, {1, 2}}});
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  for (const char* other : {"short", "wide", "int"}) {
    Checkpoint o = Checkpoint::open(dir / (std::string(other) + ".safetensors"));
    Caught edit = caught([&] { make_task_vector(pre, o, dir / "x.safetensors", opts()); });
    Caught merge = caught([&] {
      merge_checkpoints(recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n  - model: " +
                                           std::string(other) + ".safetensors\n"),
                        dir / "x.safetensors", opts());
    });
    EXPECT_EQ(edit.code, merge.code) << other;
    EXPECT_EQ(edit.message.substr(0, 20), merge.message.substr(0, 20)) << edit.message << " | " << merge.message;
  }
  // The codes themselves.
  Checkpoint s = Checkpoint::open(dir / "short.safetensors");
  Checkpoint w = Checkpoint::open(dir / "wide.safetensors");
  Checkpoint i = Checkpoint::open(dir / "int.safetensors");
  EXPECT_EQ(caught([&] { make_task_vector(pre, s, dir / "x.safetensors", opts()); }).code, ErrorCode::kTensorMissing);
  EXPECT_EQ(caught([&] { make_task_vector(pre, i, dir / "x.safetensors", opts()); }).code, ErrorCode::kDtypeMismatch);
  // The first dimension differs: edit names --merge-extra-rows (a flag it has), merge does not (it has none).
  Caught edit_rows = caught([&] { make_task_vector(pre, w, dir / "x.safetensors", opts()); });
  EXPECT_EQ(edit_rows.code, ErrorCode::kShapeMismatch);
  EXPECT_TRUE(has(edit_rows.message, "--merge-extra-rows"));
  Caught merge_rows = caught([&] {
    merge_checkpoints(recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                     "  - model: wide.safetensors\n"),
                      dir / "x.safetensors", opts());
  });
  EXPECT_EQ(merge_rows.code, ErrorCode::kShapeMismatch);
  EXPECT_FALSE(has(merge_rows.message, "--merge-extra-rows")) << merge_rows.message;
}

TEST(InputCheck, MergeWarnsWhenAFineTuneChangedAnIntegerTensor) {
  TempDir dir;
  write_model(dir / "base.safetensors", {{"pos", DType::kI64, {3}, {0, 1, 2}}, {"w", DType::kF32, {2}, {0, 0}}});
  write_model(dir / "a.safetensors", {{"pos", DType::kI64, {3}, {0, 1, 2}}, {"w", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "b.safetensors", {{"pos", DType::kI64, {3}, {0, 1, 7}}, {"w", DType::kF32, {2}, {3, 4}}});
  Recipe recipe = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n"
                                 "  - model: a.safetensors\n  - model: b.safetensors\nparameters: {lambda: 0.5}\n");
  EditReport r = merge_checkpoints(recipe, dir / "m.safetensors", opts());
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_TRUE(has(r.warnings[0], "tensor 'pos' (I64) differs in"));
  EXPECT_TRUE(has(r.warnings[0], "b.safetensors"));
  EXPECT_EQ(read_values(dir / "m.safetensors", "pos"), (std::vector<double>{0, 1, 2}));
  EXPECT_EQ(read_values(dir / "m.safetensors", "w"), (std::vector<double>{2, 3}));
}

// ---- tensors the models have and the base lacks ----

struct ExtraTensors : ::testing::Test {
  void SetUp() override {
    write_model(dir / "base.safetensors", {{"w", DType::kF32, {2}, {0, 0}}});
    write_model(dir / "a.safetensors", {{"score.weight", DType::kF32, {2}, {5, 6}}, {"w", DType::kF32, {2}, {1, 2}}});
    write_model(dir / "b.safetensors", {{"score.weight", DType::kF32, {2}, {7, 8}}, {"w", DType::kF32, {2}, {3, 4}}});
    write_model(dir / "c.safetensors", {{"w", DType::kF32, {2}, {3, 4}}});
  }
  Recipe recipe(const std::string& models = "  - model: a.safetensors\n  - model: b.safetensors\n") {
    return recipe_at(dir, "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n" + models +
                              "parameters: {lambda: 0.5}\n");
  }
  TempDir dir;
  fs::path out() const { return dir / "m.safetensors"; }
};

TEST_F(ExtraTensors, RefusedByDefault) {
  Caught e = caught([&] { merge_checkpoints(recipe(), out(), opts()); });
  EXPECT_EQ(e.code, ErrorCode::kTensorMissing);
  EXPECT_TRUE(has(e.message, "'score.weight'"));
  EXPECT_TRUE(has(e.message, "--keep-extra-tensors FROM"));
  EXPECT_TRUE(has(e.message, "--drop-extra-tensors"));
  EXPECT_FALSE(fs::exists(out()));
}

TEST_F(ExtraTensors, KeptUnchangedFromTheNamedModel) {
  EditOptions o = opts();
  o.keep_extra_tensors_from = "1";
  EditReport r = merge_checkpoints(recipe(), out(), o);
  EXPECT_EQ(read_values(out(), "score.weight"), (std::vector<double>{7, 8}));
  EXPECT_EQ(read_values(out(), "w"), (std::vector<double>{2, 3}));
  EXPECT_EQ(r.tensors_copied, 1u);
  EXPECT_TRUE(any_has(r.warnings, "copied unchanged from"));
  o.keep_extra_tensors_from = (dir / "a.safetensors").string();  // by path
  o.write.force = true;
  merge_checkpoints(recipe(), out(), o);
  EXPECT_EQ(read_values(out(), "score.weight"), (std::vector<double>{5, 6}));
  o.keep_extra_tensors_from = (dir / "b.safetensors").string();  // a path to the same file
  merge_checkpoints(recipe(), out(), o);
  EXPECT_EQ(read_values(out(), "score.weight"), (std::vector<double>{7, 8}));
}

TEST_F(ExtraTensors, DroppedWhenAsked) {
  EditOptions o = opts();
  o.drop_extra_tensors = true;
  EditReport r = merge_checkpoints(recipe(), out(), o);
  EXPECT_TRUE(any_has(r.warnings, "left out (--drop-extra-tensors)"));
  EXPECT_EQ(Checkpoint::open(out()).find("score.weight"), nullptr);
}

TEST_F(ExtraTensors, BadFromIsRefused) {
  EditOptions o = opts();
  o.keep_extra_tensors_from = "2";  // two models: 0 and 1
  EXPECT_EQ(caught([&] { merge_checkpoints(recipe(), out(), o); }).code, ErrorCode::kInvalidArgument);
  o.keep_extra_tensors_from = "1";
  // models[1] (c) lacks the head that a has.
  EXPECT_EQ(caught([&] { merge_checkpoints(recipe("  - model: a.safetensors\n  - model: c.safetensors\n"), out(), o); }).code,
            ErrorCode::kTensorMissing);
  o.drop_extra_tensors = true;
  EXPECT_EQ(caught([&] { merge_checkpoints(recipe(), out(), o); }).code, ErrorCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(out()));
}

}  // namespace
}  // namespace taskvec
