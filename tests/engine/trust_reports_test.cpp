// Issue 10, "numbers that are silently wrong": recipes that would silently keep one of two values,
// merges that drop a delta or write an all-zero tensor without a word.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

#include "engine/recipe_at.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

struct Outcome {
  ErrorCode code = ErrorCode::kInternal;  // kInternal: parsed, no error
  std::string message;
};

Outcome parse(const std::string& yaml) {
  try {
    parse_recipe(yaml, "r.yaml");
  } catch (const Error& e) {
    return {e.code(), e.what()};
  }
  return {};
}

TEST(TrustRecipe, DuplicateTopLevelKeyIsRefusedWithBothLines) {
  const Outcome o = parse("merge_method: ties\nbase_model: a\nmodels: [b]\nbase_model: c\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("r.yaml:4: 'base_model': given twice (lines 2 and 4)"), std::string::npos) << o.message;
}

TEST(TrustRecipe, DuplicateKeyInModelsEntryIsRefused) {
  const Outcome o = parse("merge_method: linear\nmodels:\n  - model: a\n    model: b\n  - model: c\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'models[0].model': given twice (lines 3 and 4)"), std::string::npos) << o.message;
}

TEST(TrustRecipe, DuplicateModelParameterIsRefused) {
  const Outcome o = parse(
      "merge_method: ties\nbase_model: x\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 2\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'models[0].parameters.weight': given twice (lines 6 and 7)"), std::string::npos)
      << o.message;
}

TEST(TrustRecipe, DuplicateGlobalParameterIsRefused) {
  const Outcome o = parse("merge_method: ties\nbase_model: x\nmodels: [a]\nparameters:\n  density: 0.5\n  density: 0.2\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'parameters.density': given twice (lines 5 and 6)"), std::string::npos) << o.message;
}

TEST(TrustRecipe, DuplicateKeyInFilterEntryIsRefused) {
  const Outcome o = parse(
      "merge_method: ties\nbase_model: x\nmodels: [a]\nparameters:\n  density:\n    - filter: attn\n"
      "      value: 0.5\n      value: 0.2\n    - value: 1\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'parameters.density[0].value': given twice (lines 7 and 8)"), std::string::npos)
      << o.message;
}

TEST(TrustRecipe, SameKeyInDifferentMappingsIsFine) {
  EXPECT_EQ(parse("merge_method: ties\nbase_model: x\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                  "  - model: b\n    parameters: {weight: 2}\nparameters: {weight: 3}\n")
                .code,
            ErrorCode::kInternal);
}

// parse_recipe reads one recipe: a file of several documents is a multi-stage recipe (parse_recipe_stages),
// never its first document alone.
TEST(TrustRecipe, MultiDocumentRecipeIsRefusedAsOneRecipeAndReadAsStages) {
  const std::string text = "merge_method: linear\nmodels: [a, b]\n---\nname: s\nmerge_method: ties\nbase_model: x\nmodels: [a]\n";
  const Outcome o = parse(text);
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("holds 2 YAML documents (separated by '---'; the second starts near line 4): a multi-stage "
                           "recipe"),
            std::string::npos)
      << o.message;
  const std::vector<Recipe> stages = parse_recipe_stages(text, "r.yaml");
  ASSERT_EQ(stages.size(), 2u);
  EXPECT_FALSE(stages[0].name);
  EXPECT_EQ(stages[1].name, "s");
  EXPECT_EQ(stages[1].method->name, "ties");
  EXPECT_EQ(parse_recipe_stages("merge_method: linear\nmodels: [a]\n---\n").size(), 1u);  // a trailing '---'
}

TEST(TrustRecipe, SingleDocumentWithStartMarkerIsFine) {
  EXPECT_EQ(parse("---\nmerge_method: linear\nmodels: [a, b]\n").code, ErrorCode::kInternal);
}

using test::read_values;
using test::TempDir;
using test::write_model;

std::size_t count_containing(const std::vector<std::string>& lines, const std::string& part) {
  return static_cast<std::size_t>(
      std::count_if(lines.begin(), lines.end(), [&](const std::string& l) { return l.find(part) != std::string::npos; }));
}

EditReport merge_yaml(const TempDir& dir, const std::string& yaml, const std::string& out) {
  EditOptions o;
  o.threads = 2;
  return merge_checkpoints(test::recipe_at(dir, yaml), dir / out, o);
}

// ---- item 3: a density that keeps no element of a non-zero task vector ----

TEST(TrustMerge, TiesScalarWhoseDeltaIsDroppedIsReported) {
  TempDir dir;
  // "scale" has 1 element: int(0.2 x 1) = 0 kept (mergekit's count). "same" has 1 element too, but no delta: nothing lost.
  write_model(dir / "base.safetensors", {{"layers.0.w", DType::kF32, {5}, {0, 0, 0, 0, 0}},
                                         {"scale", DType::kF32, {1}, {1}},
                                         {"same", DType::kF32, {1}, {3}}});
  write_model(dir / "a.safetensors", {{"layers.0.w", DType::kF32, {5}, {0.5, -0.1, 0.3, 0.0, -0.8}},
                                      {"scale", DType::kF32, {1}, {2}},
                                      {"same", DType::kF32, {1}, {3}}});
  const EditReport r = merge_yaml(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels:\n"
                                       "  - model: a.safetensors\n    parameters: {density: 0.2}\n", "out.safetensors");
  // The delta 2 - 1 is dropped: the output is the base's 1 (the reason for the warning).
  EXPECT_EQ(read_values(dir / "out.safetensors", "scale"), (std::vector<double>{1}));
  EXPECT_EQ(count_containing(r.warnings, "tensor 'scale' (1 element): ties keeps floor(density x 1) = 0 of its "
                                         "elements, so the non-zero task vector of models[0] (density 0.2) is dropped"),
            1u);
  EXPECT_EQ(count_containing(r.warnings, "'same'"), 0u);
  EXPECT_EQ(count_containing(r.warnings, "'layers.0.w'"), 0u);  // int(0.2 x 5) = 1 kept
}

TEST(TrustMerge, ManyDroppedTensorsAreSummarized) {
  TempDir dir;
  std::vector<test::TensorValues> base, a;
  for (int i = 0; i < 7; ++i) {
    base.push_back({fmt::format("s{}", i), DType::kF32, {1}, {0}});
    a.push_back({fmt::format("s{}", i), DType::kF32, {1}, {1}});
  }
  write_model(dir / "base.safetensors", base);
  write_model(dir / "a.safetensors", a);
  const EditReport r = merge_yaml(dir, "merge_method: magnitude_prune\nbase_model: base.safetensors\nmodels:\n"
                                       "  - model: a.safetensors\nparameters: {density: 0.4}\n", "out.safetensors");
  EXPECT_EQ(count_containing(r.warnings, "magnitude_prune keeps floor(density x 1) = 0"), 5u);
  EXPECT_EQ(count_containing(r.warnings, "... and 2 more tensors whose density keeps no element"), 1u);
  EXPECT_EQ(count_containing(r.warnings, "tensor 's0'"), 1u);  // by name, in file order
  EXPECT_EQ(count_containing(r.warnings, "tensor 's6'"), 0u);
}

TEST(TrustMerge, WholeModelTrimThatKeepsNothingIsReported) {
  TempDir dir;
  // trim: model over 2 merged elements at density 0.2: int(0.4) = 0 kept in the whole model.
  write_model(dir / "base.safetensors", {{"a", DType::kF32, {1}, {0}}, {"b", DType::kF32, {1}, {0}}});
  write_model(dir / "m.safetensors", {{"a", DType::kF32, {1}, {1}}, {"b", DType::kF32, {1}, {0}}});
  const EditReport r = merge_yaml(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels:\n"
                                       "  - model: m.safetensors\nparameters: {density: 0.2, trim: model}\n",
                                  "out.safetensors");
  EXPECT_EQ(read_values(dir / "out.safetensors", "a"), (std::vector<double>{0}));  // the delta 1 is dropped
  EXPECT_EQ(count_containing(r.warnings, "tensor 'a' (1 element): ties with 'trim: model' keeps floor(density x "
                                         "the model's merged elements) = 0 elements, so the non-zero task vector of "
                                         "models[0] (density 0.2) is dropped"),
            1u);
  EXPECT_EQ(count_containing(r.warnings, "tensor 'b'"), 0u);  // no delta: nothing lost
}

TEST(TrustMerge, KeptCountMatchesTheKernelsBand) {
  MergeModelParams p;
  MergeGlobalParams g;
  p.density = 0.2f;
  EXPECT_EQ(merge_topk_kept("ties", p, g, 1), 0);
  EXPECT_EQ(merge_topk_kept("ties", p, g, 5), 1);
  EXPECT_EQ(merge_topk_kept("magnitude_prune", p, g, 2), 0);  // int(0.4) = 0
  EXPECT_EQ(merge_topk_kept("dare_ties", p, g, 1), -1);       // random drops: no fixed count
  g.trim_model = true;
  EXPECT_EQ(merge_topk_kept("ties", p, g, 1), -1);            // whole-model threshold
  p.density = 0.5f;
  p.gamma = 0.5f;  // breadcrumbs, n = 3: int(1.5) = 1 outlier removed, int(1.5) = 1 kept
  EXPECT_EQ(merge_topk_kept("breadcrumbs", p, g, 3), 1);
  p.gamma = 0.9f;  // n = 1: int(0.5) = 0 kept
  EXPECT_EQ(merge_topk_kept("breadcrumbs_ties", p, g, 1), 0);
}

// ---- item 4: all-zero output tensors ----

TEST(TrustMerge, MergeThatErasesATensorIsReported) {
  TempDir dir;
  write_model(dir / "base.safetensors", {{"w", DType::kF32, {2}, {1, 2}}, {"z", DType::kF32, {2}, {0, 0}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {2}, {0, 0}}, {"z", DType::kF32, {2}, {0, 0}}});
  // task_arithmetic: base + (a - base) = a = 0 for w; z is zero in the base already: nothing erased.
  const EditReport r = merge_yaml(dir, "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels:\n"
                                       "  - model: a.safetensors\n", "out.safetensors");
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{0, 0}));
  EXPECT_EQ(count_containing(r.warnings, "tensor 'w': every element of the output is zero, while the base model's "
                                         "tensor is not"),
            1u);
  EXPECT_EQ(count_containing(r.warnings, "'z'"), 0u);
}

TEST(TrustMerge, LinearMergeToZeroWithoutBaseIsReported) {
  TempDir dir;
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "b.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
  const EditReport r = merge_yaml(dir, "merge_method: linear\nmodels:\n  - model: a.safetensors\n"
                                       "  - model: b.safetensors\n    parameters: {weight: -1}\n"
                                       "parameters: {normalize: false}\n", "out.safetensors");
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{0, 0}));
  EXPECT_EQ(count_containing(r.warnings, "tensor 'w': every element of the output is zero, while the models' tensor"), 1u);
}

class TrustEdit : public ::testing::Test {
 protected:
  TempDir dir;
  EditOptions options;
};

TEST_F(TrustEdit, ApplyThatErasesATensorIsReportedButDiffIsNot) {
  write_model(dir / "pre.safetensors", {{"w", DType::kF32, {2, 2}, {1, 2, 3, 4}}, {"b", DType::kF32, {2}, {0, 0}}});
  write_model(dir / "ft.safetensors", {{"w", DType::kF32, {2, 2}, {0, 0, 0, 0}}, {"b", DType::kF32, {2}, {0, 0}}});
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  // diff of a model with itself: every task vector is zero (frozen tensors), and that is not reported.
  const EditReport same = make_task_vector(pre, pre, dir / "zero_tau.safetensors", options);
  EXPECT_EQ(count_containing(same.warnings, "every element"), 0u);
  make_task_vector(pre, Checkpoint::open(dir / "ft.safetensors"), dir / "tau.safetensors", options);
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  // pre + 1 * (ft - pre) = ft = 0 for w; b is zero in pre already: not erased by the edit.
  const EditReport full = apply_task_vectors(pre, {{&tau, 1.0}}, dir / "ft_again.safetensors", options);
  EXPECT_EQ(read_values(dir / "ft_again.safetensors", "w"), (std::vector<double>{0, 0, 0, 0}));
  EXPECT_EQ(count_containing(full.warnings, "tensor 'w': every element of the output is zero, while the base "
                                            "checkpoint's tensor is not"),
            1u);
  EXPECT_EQ(count_containing(full.warnings, "'b'"), 0u);
  const EditReport half = apply_task_vectors(pre, {{&tau, 0.5}}, dir / "half.safetensors", options);
  EXPECT_EQ(count_containing(half.warnings, "every element"), 0u);
}

TEST_F(TrustEdit, NonzeroOnlyInTheLastChunkIsNotReported) {
  // 5000 elements in chunks of 1024 (tiny memory budget, one thread): only the last chunk's last
  // element is nonzero, so the per-job flag must come from that chunk.
  std::vector<double> ones(5000, 1.0), ft(5000, 0.0);
  ft.back() = 5.0;
  write_model(dir / "pre.safetensors", {{"w", DType::kF32, {5000}, ones}});
  write_model(dir / "ft.safetensors", {{"w", DType::kF32, {5000}, ft}});
  options.threads = 1;
  options.memory_budget = 1;
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  make_task_vector(pre, Checkpoint::open(dir / "ft.safetensors"), dir / "tau.safetensors", options);
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  const EditReport last = apply_task_vectors(pre, {{&tau, 1.0}}, dir / "out.safetensors", options);
  EXPECT_EQ(read_values(dir / "out.safetensors", "w").back(), 5.0);
  EXPECT_EQ(count_containing(last.warnings, "every element"), 0u);
  // And with the last element zero too, the whole tensor is zero: reported once.
  ft.back() = 0.0;
  write_model(dir / "ft0.safetensors", {{"w", DType::kF32, {5000}, ft}});
  make_task_vector(pre, Checkpoint::open(dir / "ft0.safetensors"), dir / "tau0.safetensors", options);
  Checkpoint tau0 = Checkpoint::open(dir / "tau0.safetensors");
  const EditReport zero = apply_task_vectors(pre, {{&tau0, 1.0}}, dir / "out0.safetensors", options);
  EXPECT_EQ(count_containing(zero.warnings, "tensor 'w': every element of the output is zero"), 1u);
}

}  // namespace
}  // namespace taskvec
