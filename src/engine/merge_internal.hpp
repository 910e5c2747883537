// Private helpers shared by the merge kernels (src/engine/merge_*.cpp).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "taskvec/merge.hpp"

namespace taskvec::merge_detail {

/// Checks span sizes, model count and base presence; returns the element count.
std::size_t check_inputs(const MergeTensor& in, std::span<float> out, const char* method, bool needs_base,
                         std::size_t min_models, std::size_t max_models = static_cast<std::size_t>(-1));

/// 1 or, for normalize, 1 / sum w_i. A zero sum throws kInvalidArgument, or with zero_sum_is_one (mergekit's
/// generalized task arithmetic: |sum| < 1e-8 -> 1) gives 1 and a note.
float weight_scale(const MergeTensor& in, const char* method, bool zero_sum_is_one = false);

/// Ordering key of element i with value v: larger |v| first, then lower index. Distinct for distinct i.
inline std::uint64_t rank_key(float v, std::uint64_t i) noexcept {
  std::uint32_t bits;
  float a = v < 0 ? -v : v;
  __builtin_memcpy(&bits, &a, 4);
  return (static_cast<std::uint64_t>(bits) << 32) | (0xFFFFFFFFull - i);
}

/// Magnitude bit pattern of v: order-preserving for |v| (sign cleared), at most 0x7FFFFFFF.
inline std::int32_t magnitude_bits(float v) noexcept {
  std::uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  return static_cast<std::int32_t>(bits & 0x7FFFFFFFu);
}

/// Elements whose rank (0 = largest magnitude, ties by lower index) lies in [lo, hi), stored as
/// magnitude thresholds and tie positions so the test is two 32-bit compares per element:
///   rank < hi  <=>  bits > hi_bits || (bits == hi_bits && i < hi_cut)     (hi == N: always)
///   rank >= lo <=>  bits < lo_bits || (bits == lo_bits && i >= lo_cut)    (lo == 0: always)
struct RankBand {
  bool empty = false;
  bool hi_all = true, lo_all = true;
  std::int32_t hi_bits = 0, lo_bits = 0;
  std::uint64_t hi_cut = 0, lo_cut = 0;
  bool contains(float v, std::uint64_t i) const noexcept {
    if (empty) return false;
    const std::int32_t b = magnitude_bits(v);
    const bool below_hi = hi_all || b > hi_bits || (b == hi_bits && i < hi_cut);
    const bool above_lo = lo_all || b < lo_bits || (b == lo_bits && i >= lo_cut);
    return below_hi && above_lo;
  }
};

/// d[i] = (model[i] - base[i]) / divisor inside the band, 0 outside; vectorizable segments.
void band_fill(const RankBand& band, std::span<const float> model, std::span<const float> base, float divisor,
               std::span<float> d);

RankBand rank_band(std::span<const float> model, std::span<const float> base, std::uint64_t lo, std::uint64_t hi);

}  // namespace taskvec::merge_detail

namespace taskvec::merge_detail {
/// Stores a resolved parameter value into the matching field. Unknown names are ignored.
void apply_param(std::string_view name, double value, MergeModelParams* model, MergeGlobalParams* global);
}  // namespace taskvec::merge_detail
