// merge_checkpoints on small files: values, thread-count independence, checks before writing.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "engine/recipe_at.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

using test::read_values;
using test::TempDir;
using test::write_model;

using test::recipe_at;

EditOptions opts(unsigned threads = 1) {
  EditOptions o;
  o.threads = threads;
  return o;
}

ErrorCode merge_error(const Recipe& r, const std::filesystem::path& out, const EditOptions& o) {
  try {
    merge_checkpoints(r, out, o);
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;
}

void expect_values(const std::vector<double>& got, const std::vector<double>& want, double tol = 1e-6) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << i;
}

// The METHODS-SPEC.md TIES example as files, with an integer tensor that is copied from the base.
void write_worked_example(const TempDir& dir) {
  write_model(dir / "base.safetensors", {{"layers.0.w", DType::kF32, {5}, {0, 0, 0, 0, 0}},
                                         {"pos", DType::kI64, {3}, {0, 1, 2}}});
  write_model(dir / "a.safetensors", {{"layers.0.w", DType::kF32, {5}, {0.5, -0.1, 0.3, 0.0, -0.8}},
                                      {"pos", DType::kI64, {3}, {0, 1, 2}}});
  write_model(dir / "b.safetensors", {{"layers.0.w", DType::kF32, {5}, {-0.4, 0.2, 0.6, -0.1, -0.3}},
                                      {"pos", DType::kI64, {3}, {0, 1, 2}}});
  write_model(dir / "c.safetensors", {{"layers.0.w", DType::kF32, {5}, {0.1, -0.7, -0.2, 0.4, 0.9}},
                                      {"pos", DType::kI64, {3}, {0, 1, 2}}});
}

TEST(MergeDriver, TiesWorkedExampleThroughFiles) {
  TempDir dir;
  write_worked_example(dir);
  const Recipe r = recipe_at(dir, R"(
merge_method: ties
base_model: base.safetensors
models: [a.safetensors, b.safetensors, c.safetensors]
parameters: {density: 0.4}
)");
  const auto report = merge_checkpoints(r, dir / "out.safetensors", opts());
  EXPECT_EQ(report.tensors_edited, 1u);
  EXPECT_EQ(report.tensors_copied, 1u);
  expect_values(read_values(dir / "out.safetensors", "layers.0.w"), {0.5, -0.7, 0.6, 0.0, 0.9});
  expect_values(read_values(dir / "out.safetensors", "pos"), {0, 1, 2});
}

TEST(MergeDriver, WholeModelTrimMatchesTheOfficialCodeExample) {
  // The worked example split over two tensors: the 60 % threshold is taken over the whole model.
  TempDir dir;
  const std::vector<std::vector<double>> taus = {
      {0.5, -0.1, 0.3, 0.0, -0.8}, {-0.4, 0.2, 0.6, -0.1, -0.3}, {0.1, -0.7, -0.2, 0.4, 0.9}};
  write_model(dir / "base.safetensors", {{"x", DType::kF32, {2}, {0, 0}}, {"y", DType::kF32, {3}, {0, 0, 0}}});
  const char* names[] = {"a.safetensors", "b.safetensors", "c.safetensors"};
  for (int m = 0; m < 3; ++m)
    write_model(dir / names[m], {{"x", DType::kF32, {2}, {taus[m][0], taus[m][1]}},
                                 {"y", DType::kF32, {3}, {taus[m][2], taus[m][3], taus[m][4]}}});
  const Recipe r = recipe_at(dir, R"(
merge_method: ties
base_model: base.safetensors
models: [a.safetensors, b.safetensors, c.safetensors]
parameters: {density: 0.6, trim: model}
)");
  merge_checkpoints(r, dir / "out.safetensors", opts());
  expect_values(read_values(dir / "out.safetensors", "x"), {0.5, -0.7});
  expect_values(read_values(dir / "out.safetensors", "y"), {0.45, 0.4, -0.55});
}

std::vector<test::TensorValues> random_model(unsigned seed, double scale, const std::vector<double>* base) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<test::TensorValues> t = {{"model.layers.0.w", DType::kBF16, {16, 24}, {}},
                                       {"model.layers.1.w", DType::kF32, {16, 24}, {}},
                                       {"model.embed.weight", DType::kF16, {40, 8}, {}},
                                       {"model.norm.bias", DType::kF32, {24}, {}}};
  std::size_t k = 0;
  for (auto& tensor : t) {
    std::size_t n = 1;
    for (auto d : tensor.shape) n *= d;
    for (std::size_t i = 0; i < n; ++i, ++k) tensor.values.push_back((base ? (*base)[k] : 0.0) + dist(gen));
  }
  return t;
}

std::vector<double> flatten(const std::vector<test::TensorValues>& t) {
  std::vector<double> v;
  for (const auto& x : t) v.insert(v.end(), x.values.begin(), x.values.end());
  return v;
}

void write_random_models(const TempDir& dir) {
  const auto base = random_model(1, 1.0, nullptr);
  const auto flat = flatten(base);
  write_model(dir / "base.safetensors", base);
  write_model(dir / "a.safetensors", random_model(2, 0.05, &flat));
  write_model(dir / "b.safetensors", random_model(3, 0.05, &flat));
  write_model(dir / "c.safetensors", random_model(4, 0.05, &flat));
}

TEST(MergeDriver, OutputBytesDoNotDependOnThreadCount) {
  TempDir dir;
  write_random_models(dir);
  for (const char* method : {"dare_ties", "della", "ties", "tsv_merge", "iso_c", "breadcrumbs", "consensus"}) {
    const Recipe r = recipe_at(dir, std::string("merge_method: ") + method + R"(
base_model: base.safetensors
models:
  - model: a.safetensors
    parameters: {weight: [0.5, 1.0]}
  - model: b.safetensors
  - model: c.safetensors
seed: 5
)");
    merge_checkpoints(r, dir / "one.safetensors", opts(1));
    merge_checkpoints(r, dir / "two.safetensors", opts(2));
    merge_checkpoints(r, dir / "three.safetensors", opts(3));
    const auto one = test::file_bytes(dir / "one.safetensors");
    EXPECT_EQ(one, test::file_bytes(dir / "two.safetensors")) << method;
    EXPECT_EQ(one, test::file_bytes(dir / "three.safetensors")) << method;
    EXPECT_EQ(test::read_dtype(dir / "one.safetensors", "model.layers.0.w"), DType::kBF16);
    EXPECT_EQ(test::read_dtype(dir / "one.safetensors", "model.embed.weight"), DType::kF16);
    for (const char* f : {"one.safetensors", "two.safetensors", "three.safetensors"}) std::filesystem::remove(dir / f);
  }
}

TEST(MergeDriver, ElementwiseMethodsRunInChunksWithTheSameBytes) {
  TempDir dir;
  std::vector<double> base(20'000), a(20'000), b(20'000);
  for (std::size_t i = 0; i < base.size(); ++i) {
    base[i] = std::sin(0.1 * i);
    a[i] = base[i] + 0.01 * std::cos(0.37 * i);
    b[i] = base[i] - 0.02 * std::sin(0.11 * i);
  }
  write_model(dir / "base.safetensors", {{"layers.0.w", DType::kBF16, {100, 200}, base}});
  write_model(dir / "a.safetensors", {{"layers.0.w", DType::kBF16, {100, 200}, a}});
  write_model(dir / "b.safetensors", {{"layers.0.w", DType::kBF16, {100, 200}, b}});
  for (const char* method : {"dare_linear", "task_arithmetic", "consensus"}) {
    const Recipe r = recipe_at(dir, std::string("merge_method: ") + method +
                                        "\nbase_model: base.safetensors\nmodels: [a.safetensors, b.safetensors]\nseed: 9\n");
    merge_checkpoints(r, dir / "whole.safetensors", opts(1));
    EditOptions tiny = opts(2);
    tiny.memory_budget = 1000;  // chunks of 4096 elements, run by two workers
    const auto report = merge_checkpoints(r, dir / "chunks.safetensors", tiny);
    EXPECT_LE(report.peak_chunk_bytes, 2u * 4096u * 40u) << method;
    EXPECT_EQ(test::file_bytes(dir / "whole.safetensors"), test::file_bytes(dir / "chunks.safetensors")) << method;
    std::filesystem::remove(dir / "whole.safetensors");
    std::filesystem::remove(dir / "chunks.safetensors");
  }
}

TEST(MergeDriver, SeedChangesDareButNotTies) {
  TempDir dir;
  write_random_models(dir);
  const std::string body =
      "\nbase_model: base.safetensors\nmodels: [a.safetensors, b.safetensors]\nparameters: {density: 0.5}\n";
  merge_checkpoints(recipe_at(dir, "merge_method: dare_linear" + body + "seed: 1\n"), dir / "s1.safetensors", opts());
  merge_checkpoints(recipe_at(dir, "merge_method: dare_linear" + body + "seed: 2\n"), dir / "s2.safetensors", opts());
  EXPECT_NE(test::file_bytes(dir / "s1.safetensors"), test::file_bytes(dir / "s2.safetensors"));
}

TEST(MergeDriver, OneModelAtWeightOneGivesThatModel) {
  TempDir dir;
  write_random_models(dir);
  const Recipe r = recipe_at(dir, "merge_method: linear\nmodels: [a.safetensors]\n");
  merge_checkpoints(r, dir / "out.safetensors", opts());
  for (const char* t : {"model.layers.0.w", "model.layers.1.w", "model.embed.weight", "model.norm.bias"})
    EXPECT_EQ(test::read_tensor_bytes(dir / "out.safetensors", t), test::read_tensor_bytes(dir / "a.safetensors", t)) << t;
}

// Tensors of several 256 KiB read pieces: decoded whole (TIES) or copied (integers) piece by piece.
TEST(MergeDriver, LargeTensorsAreReadPieceByPiece) {
  TempDir dir;
  const std::size_t n = 300000;  // 600 KB of BF16, 2.4 MB of I64
  std::vector<double> w(n), ids(n);
  for (std::size_t i = 0; i < n; ++i) {
    w[i] = std::ldexp(static_cast<double>(i % 211) - 105, -7);
    ids[i] = static_cast<double>(i * 31 % 65537);
  }
  write_model(dir / "base.safetensors", {{"w", DType::kBF16, {n}, std::vector<double>(n, 0.0)}, {"ids", DType::kI64, {n}, ids}});
  write_model(dir / "a.safetensors", {{"w", DType::kBF16, {n}, w}, {"ids", DType::kI64, {n}, ids}});
  const Recipe r = recipe_at(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels: [a.safetensors]\n"
                                  "parameters: {density: 1.0}\n");
  merge_checkpoints(r, dir / "out.safetensors", opts(2));
  // A zero base: TIES keeps every element (density 1) of the one task vector at weight 1, i.e. the model.
  EXPECT_EQ(test::read_tensor_bytes(dir / "out.safetensors", "w"), test::read_tensor_bytes(dir / "a.safetensors", "w"));
  EXPECT_EQ(test::read_tensor_bytes(dir / "out.safetensors", "ids"), test::read_tensor_bytes(dir / "a.safetensors", "ids"));
}

TEST(MergeDriver, SlerpFromBaseAndOutDtype) {
  TempDir dir;
  write_model(dir / "base.safetensors", {{"w", DType::kF32, {2}, {1, 0}}});
  write_model(dir / "b.safetensors", {{"w", DType::kF32, {2}, {0, 1}}});
  const Recipe r = recipe_at(dir, "merge_method: slerp\nbase_model: base.safetensors\nmodels: [b.safetensors]\n"
                                  "parameters: {t: 0.5}\nout_dtype: float64\n");
  merge_checkpoints(r, dir / "out.safetensors", opts());
  EXPECT_EQ(test::read_dtype(dir / "out.safetensors", "w"), DType::kF64);
  expect_values(read_values(dir / "out.safetensors", "w"), {std::sqrt(0.5), std::sqrt(0.5)});
}

TEST(MergeDriver, MismatchedInputsFailBeforeWriting) {
  TempDir dir;
  write_model(dir / "base.safetensors", {{"w", DType::kF32, {2, 2}, {1, 2, 3, 4}}, {"v", DType::kF32, {1}, {0}}});
  write_model(dir / "shape.safetensors", {{"w", DType::kF32, {4}, {1, 2, 3, 4}}, {"v", DType::kF32, {1}, {0}}});
  write_model(dir / "missing.safetensors", {{"w", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
  const auto out = dir / "out.safetensors";
  EXPECT_EQ(merge_error(recipe_at(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels: [shape.safetensors]\n"),
                        out, opts()),
            ErrorCode::kShapeMismatch);
  EXPECT_EQ(merge_error(recipe_at(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels: [missing.safetensors]\n"),
                        out, opts()),
            ErrorCode::kTensorMissing);
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(MergeDriver, MemoryBudgetAndPerTensorRecipeErrorsFailBeforeWriting) {
  TempDir dir;
  write_random_models(dir);
  const auto out = dir / "out.safetensors";
  EditOptions small = opts();
  small.memory_budget = 1000;
  EXPECT_EQ(merge_error(recipe_at(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels: [a.safetensors]\n"), out,
                        small),
            ErrorCode::kTensorTooLarge);
  EXPECT_EQ(merge_error(recipe_at(dir, R"(
merge_method: linear
models:
  - model: a.safetensors
    parameters: {weight: [{filter: embed, value: 0}, {value: 1}]}
parameters: {normalize: true}
)"),
                        out, opts()),
            ErrorCode::kRecipe);
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(MergeDriver, DryRunWritesNothing) {
  TempDir dir;
  write_worked_example(dir);
  EditOptions o = opts();
  o.dry_run = true;
  const auto report =
      merge_checkpoints(recipe_at(dir, "merge_method: ties\nbase_model: base.safetensors\nmodels: [a.safetensors]\n"),
                        dir / "out.safetensors", o);
  EXPECT_EQ(report.plan.location.size(), 2u);
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
}

TEST(MergeDriver, NonFiniteInputIsAnError) {
  TempDir dir;
  write_model(dir / "base.safetensors", {{"w", DType::kF32, {2}, {1, 0}}});
  write_model(dir / "b.safetensors", {{"w", DType::kF32, {2}, {NAN, 1}}});
  const Recipe r = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels: [b.safetensors]\n");
  EXPECT_EQ(merge_error(r, dir / "out.safetensors", opts()), ErrorCode::kNonFinite);
}

TEST(MergeDriver, WholeModelTrimNeedsOneDensityPerModel) {
  TempDir dir;
  write_random_models(dir);
  const Recipe r = recipe_at(dir, R"(
merge_method: ties
base_model: base.safetensors
models: [a.safetensors]
parameters:
  trim: model
  density: [{filter: embed, value: 0.5}, {value: 0.2}]
)");
  EditOptions o = opts();
  o.dry_run = true;
  EXPECT_EQ(merge_error(r, dir / "out.safetensors", o), ErrorCode::kRecipe);
}

TEST(MergeDriver, UnselectedTensorsAreConvertedToTheOutputDtype) {
  TempDir dir;
  write_model(dir / "base.safetensors", {{"a", DType::kBF16, {3}, {1, 2, 3}}, {"b", DType::kBF16, {2}, {0.5, -1}}});
  write_model(dir / "m.safetensors", {{"a", DType::kBF16, {3}, {2, 2, 2}}, {"b", DType::kBF16, {2}, {4, 4}}});
  const Recipe r = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels: [m.safetensors]\n"
                                  "parameters: {lambda: 0.5}\nout_dtype: float32\n");
  EditOptions o = opts(2);
  o.include = "^a$";
  const auto report = merge_checkpoints(r, dir / "out.safetensors", o);
  EXPECT_EQ(report.tensors_edited, 1u);
  EXPECT_EQ(report.tensors_copied, 1u);
  EXPECT_EQ(test::read_dtype(dir / "out.safetensors", "a"), DType::kF32);
  EXPECT_EQ(test::read_dtype(dir / "out.safetensors", "b"), DType::kF32);
  expect_values(read_values(dir / "out.safetensors", "a"), {1.5, 2, 2.5});
  expect_values(read_values(dir / "out.safetensors", "b"), {0.5, -1});
}

TEST(MergeDriver, ExcludedTensorsAreCopiedFromTheBase) {
  TempDir dir;
  write_worked_example(dir);
  EditOptions o = opts();
  o.exclude = "layers";
  merge_checkpoints(recipe_at(dir, "merge_method: task_arithmetic\nbase_model: base.safetensors\nmodels: [a.safetensors]\n"),
                    dir / "out.safetensors", o);
  expect_values(read_values(dir / "out.safetensors", "layers.0.w"), {0, 0, 0, 0, 0});
}

}  // namespace
}  // namespace taskvec
