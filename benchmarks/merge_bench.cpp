// Micro-benchmarks of the merge kernels (include/taskvec/merge.hpp, docs/METHODS.md): bytes per second
// of one f32 tensor of N elements through each per-tensor kernel, called through the registry
// (find_merge_method). Inputs, from fixed seeds: a weight-like base (normal, std 0.02) and T = 3
// fine-tuned models (2 for slerp) = base + a task vector of std 0.002. The task vectors have pairwise
// correlation 0.5 (a shared direction plus each model's own), as fine-tunes of one base do, so that
// Model Stock's angle and TIES's sign election see realistic inputs. Parameters: weight 0.3 per model,
// lambda 1, seed 42, everything else at the method's registry default (merge_methods()).
// Bytes counted: the f32 inputs read plus the output written, (T + 2) x N x 4 (base + models + output);
// (T + 1) x N x 4 for linear and slerp, which read no base. Before timing, each kernel runs once on an
// output filled with NaN and the benchmark aborts unless the result is finite and differs from the base,
// so a mis-filled MergeTensor cannot benchmark a no-op.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <map>
#include <random>
#include <span>
#include <string_view>
#include <vector>

#include "taskvec/merge.hpp"

namespace {

using taskvec::MergeMethod;
using taskvec::MergeModelParams;
using taskvec::MergeTensor;

constexpr std::size_t kModels = 3;
constexpr float kBaseStd = 0.02f;
constexpr float kTaskVectorStd = 0.002f;
constexpr std::string_view kTensorName = "model.layers.0.mlp.down_proj.weight";  // seeds DARE / DELLA masks

// One benchmarked method and the parameters that differ from the MergeModelParams / MergeGlobalParams
// defaults (set to the method's registry defaults).
struct MergeCase {
  std::string_view method;  ///< registry name
  std::size_t models = kModels;
  float density = 1.0f;
  float epsilon = 0.0f;
  bool normalize = false;
};

[[noreturn]] void fail(std::string_view method, std::string_view why) {
  std::fprintf(stderr, "merge_bench: %.*s: %.*s\n", static_cast<int>(method.size()), method.data(),
               static_cast<int>(why.size()), why.data());
  std::abort();
}

std::vector<float> normal_values(std::size_t n, float stddev, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  std::vector<float> values(n);
  for (auto& v : values) v = normal(rng);
  return values;
}

// The base and kModels fine-tuned models of an N-element tensor; generated once per N (Google Benchmark
// calls a benchmark function several times) and shared by every method.
struct MergeInputs {
  std::vector<float> base;
  std::vector<std::vector<float>> models;
};

const MergeInputs& merge_inputs(std::size_t n) {
  static std::map<std::size_t, MergeInputs> cache;
  auto [it, inserted] = cache.try_emplace(n);
  MergeInputs& inputs = it->second;
  if (!inserted) return inputs;
  inputs.base = normal_values(n, kBaseStd, 1);
  const auto shared = normal_values(n, kTaskVectorStd, 2);
  const float half = std::sqrt(0.5f);  // shared and own parts of equal variance: correlation 0.5
  for (std::size_t m = 0; m < kModels; ++m) {
    const auto own = normal_values(n, kTaskVectorStd, 3 + m);
    auto& model = inputs.models.emplace_back(n);
    for (std::size_t i = 0; i < n; ++i) model[i] = inputs.base[i] + half * (shared[i] + own[i]);
  }
  return inputs;
}

// Runs the kernel once and aborts unless every output element was written with a finite value and the
// merged tensor differs from the base somewhere.
void check_merge(const MergeMethod& method, const MergeTensor& in, std::span<const float> base, std::span<float> out) {
  std::fill(out.begin(), out.end(), std::numeric_limits<float>::quiet_NaN());
  try {
    method.kernel(in, out);
  } catch (const std::exception& e) {
    fail(method.name, e.what());
  }
  if (!std::all_of(out.begin(), out.end(), [](float v) { return std::isfinite(v); }))
    fail(method.name, "the output has non-finite or unwritten elements");
  if (std::equal(out.begin(), out.end(), base.begin())) fail(method.name, "the output equals the base");
}

// state.range(0) x state.range(1) tensor (rows x cols).
void BM_merge(benchmark::State& state, const MergeCase& c) {
  const MergeMethod* method = taskvec::find_merge_method(c.method);
  if (method == nullptr) fail(c.method, "not in the registry");
  const std::array<std::uint64_t, 2> shape{static_cast<std::uint64_t>(state.range(0)),
                                           static_cast<std::uint64_t>(state.range(1))};
  const std::size_t n = shape[0] * shape[1];
  const MergeInputs& inputs = merge_inputs(n);
  const std::vector<std::span<const float>> models(inputs.models.begin(), inputs.models.begin() + c.models);
  MergeModelParams params;
  params.weight = 0.3f;
  params.density = c.density;
  params.epsilon = c.epsilon;
  const std::vector<MergeModelParams> model_params(c.models, params);

  MergeTensor in;
  in.name = kTensorName;
  in.shape = shape;
  if (method->needs_base) in.base = inputs.base;
  in.models = models;
  in.model_params = model_params;
  in.global.lambda = 1.0f;
  in.global.normalize = c.normalize;
  in.global.seed = 42;

  std::vector<float> out(n);
  check_merge(*method, in, inputs.base, out);
  for (auto _ : state) {
    method->kernel(in, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const std::size_t tensors = (method->needs_base ? 1 : 0) + c.models + 1;  // base + models + output
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(tensors * n * sizeof(float)));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(n));
}

// Element-wise and top-k methods: 64 x 1024 (64 Ki elements, stays in cache: kernel speed) and
// 4096 x 1024 (4 Mi elements, streams from memory).
void tensor_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "cols"})->Args({64, 1024})->Args({4096, 1024})->Unit(benchmark::kMicrosecond);
}

// SVD methods (one SVD per model and more, f64): a 256 x 256 matrix.
void svd_sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "cols"})->Args({256, 256})->Unit(benchmark::kMicrosecond);
}

BENCHMARK_CAPTURE(BM_merge, linear, MergeCase{.method = "linear", .normalize = true})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, task_arithmetic, MergeCase{.method = "task_arithmetic"})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, ties, MergeCase{.method = "ties", .density = 0.2f})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, dare_linear, MergeCase{.method = "dare_linear", .density = 0.5f})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, dare_ties, MergeCase{.method = "dare_ties", .density = 0.5f})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, breadcrumbs, MergeCase{.method = "breadcrumbs", .density = 0.1f})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, della, MergeCase{.method = "della", .density = 0.7f, .epsilon = 0.1f})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, consensus, MergeCase{.method = "consensus"})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, model_stock, MergeCase{.method = "model_stock"})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, slerp, MergeCase{.method = "slerp", .models = 2})->Apply(tensor_sizes);
BENCHMARK_CAPTURE(BM_merge, tsv_merge, MergeCase{.method = "tsv_merge"})->Apply(svd_sizes);
BENCHMARK_CAPTURE(BM_merge, iso_c, MergeCase{.method = "iso_c"})->Apply(svd_sizes);

}  // namespace
