// Micro-benchmarks of the conversion kernels (docs/BENCHMARKS.md): bytes per second of tensor data
// through decode_to_f32 / encode_from_f32, and a task-arithmetic-shaped loop: four BF16 inputs decoded
// to f32 chunks, combined linearly, encoded back to BF16 (the engine's stream: view -> f32 chunk ->
// kernel -> out dtype). Bytes counted: the input bytes read plus the output bytes written.
#include <benchmark/benchmark.h>

#include <array>
#include <bit>
#include <cstring>
#include <random>
#include <vector>

#include "taskvec/dtype.hpp"

namespace {

using taskvec::DType;

std::vector<std::byte> random_tensor(DType dtype, std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);  // weight-like values
  std::vector<float> values(n);
  for (auto& v : values) v = normal(rng);
  std::vector<std::byte> bytes(n * taskvec::dtype_bits(dtype) / 8);
  taskvec::encode_from_f32(dtype, values.data(), bytes.data(), n);
  return bytes;
}

void BM_decode(benchmark::State& state, DType dtype) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const auto src = random_tensor(dtype, n, 1);
  std::vector<float> dst(n);
  for (auto _ : state) {
    taskvec::decode_to_f32(dtype, src.data(), dst.data(), n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(src.size() + n * sizeof(float)));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * state.range(0));
}

void BM_encode(benchmark::State& state, DType dtype) {
  const auto n = static_cast<std::size_t>(state.range(0));
  const auto bytes = random_tensor(DType::kF32, n, 2);
  std::vector<float> src(n);
  std::memcpy(src.data(), bytes.data(), bytes.size());
  std::vector<std::byte> dst(n * taskvec::dtype_bits(dtype) / 8);
  for (auto _ : state) {
    taskvec::encode_from_f32(dtype, src.data(), dst.data(), n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(n * sizeof(float) + dst.size()));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * state.range(0));
}

// out = pre + sum_i lambda_i (ft_i - pre) written as the fused linear combination
// c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3 over four BF16 inputs, in f32 chunks that stay in L1.
void BM_fused_bf16x4(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  constexpr std::size_t kChunk = 2048;
  std::array<std::vector<std::byte>, 4> in;
  for (std::size_t k = 0; k < 4; ++k) in[k] = random_tensor(DType::kBF16, n, 10 + k);
  constexpr std::array<float, 4> c{0.1f, 0.4f, 0.4f, 0.1f};  // 1 - 3*0.3 for pre, 0.3 per task vector
  std::vector<std::byte> out(n * 2);
  std::array<std::vector<float>, 4> chunk;
  for (auto& v : chunk) v.resize(kChunk);
  std::vector<float> acc(kChunk);
  for (auto _ : state) {
    for (std::size_t begin = 0; begin < n; begin += kChunk) {
      const std::size_t len = std::min(kChunk, n - begin);
      for (std::size_t k = 0; k < 4; ++k) taskvec::decode_to_f32(DType::kBF16, in[k].data() + begin * 2, chunk[k].data(), len);
      for (std::size_t i = 0; i < len; ++i) {
        acc[i] = c[0] * chunk[0][i] + c[1] * chunk[1][i] + c[2] * chunk[2][i] + c[3] * chunk[3][i];
      }
      taskvec::encode_from_f32(DType::kBF16, acc.data(), out.data() + begin * 2, len);
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(n * 2 * 5));
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * state.range(0));
}

// 64 Ki elements stay in cache (kernel speed); 16 Mi elements stream from memory.
constexpr std::int64_t kSmall = 1 << 16;
constexpr std::int64_t kLarge = 1 << 24;

BENCHMARK_CAPTURE(BM_decode, bf16, DType::kBF16)->Arg(kSmall)->Arg(kLarge);
BENCHMARK_CAPTURE(BM_decode, f16, DType::kF16)->Arg(kSmall)->Arg(kLarge);
BENCHMARK_CAPTURE(BM_decode, f32, DType::kF32)->Arg(kSmall)->Arg(kLarge);
BENCHMARK_CAPTURE(BM_decode, f8_e4m3, DType::kF8E4M3)->Arg(kSmall);
BENCHMARK_CAPTURE(BM_encode, bf16, DType::kBF16)->Arg(kSmall)->Arg(kLarge);
BENCHMARK_CAPTURE(BM_encode, f16, DType::kF16)->Arg(kSmall)->Arg(kLarge);
BENCHMARK_CAPTURE(BM_encode, f32, DType::kF32)->Arg(kSmall)->Arg(kLarge);
BENCHMARK_CAPTURE(BM_encode, f8_e4m3, DType::kF8E4M3)->Arg(kSmall);
BENCHMARK(BM_fused_bf16x4)->Arg(kSmall)->Arg(kLarge);

}  // namespace
