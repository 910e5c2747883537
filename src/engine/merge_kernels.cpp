// Element-wise and sparsifying merge kernels: linear, task arithmetic, TIES, DARE, Breadcrumbs, DELLA,
// magnitude pruning, consensus. METHODS-SPEC.md sections 3.1-3.5 and 3.10; docs/METHODS.md.
#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>

#include "base/simd_clones.hpp"
#include "merge_internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

std::size_t MergeTensor::element_count() const noexcept {
  std::size_t n = 1;
  for (auto d : shape) n *= static_cast<std::size_t>(d);
  return n;
}

namespace merge_detail {

std::size_t check_inputs(const MergeTensor& in, std::span<float> out, const char* method, bool needs_base,
                         std::size_t min_models, std::size_t max_models) {
  const std::size_t n = in.element_count();
  auto fail = [&](const std::string& what) {
    throw Error(ErrorCode::kInvalidArgument, std::string(method) + ": tensor '" + std::string(in.name) + "': " + what);
  };
  if (out.size() != n) fail("output has " + std::to_string(out.size()) + " elements, shape has " + std::to_string(n));
  if (needs_base && in.base.size() != n) fail("the method needs a base tensor of " + std::to_string(n) + " elements");
  if (!in.base.empty() && in.base.size() != n) fail("base has the wrong number of elements");
  if (in.models.size() < min_models || in.models.size() > max_models)
    fail("got " + std::to_string(in.models.size()) + " models, needs " + std::to_string(min_models) +
         (max_models == min_models ? "" : " or more"));
  if (in.model_params.size() != in.models.size()) fail("one parameter set per model is needed");
  for (const auto& m : in.models)
    if (m.size() != n) fail("a model has " + std::to_string(m.size()) + " elements, shape has " + std::to_string(n));
  if (!in.trim_thresholds.empty() && in.trim_thresholds.size() != in.models.size())
    fail("one trim threshold per model is needed");
  return n;
}

float weight_scale(const MergeTensor& in, const char* method, bool zero_sum_is_one) {
  if (!in.global.normalize) return 1.0f;
  double sum = 0;
  for (const auto& p : in.model_params) sum += p.weight;
  if (zero_sum_is_one && std::fabs(sum) < 1e-8) {
    // mergekit's generalized task arithmetic: divisor[|divisor| < 1e-8] = 1.
    if (in.notes)
      in.notes->push_back("'normalize': the weights sum to 0, so the weighted sum is not divided (as mergekit)");
    return 1.0f;
  }
  if (sum == 0)
    throw Error(ErrorCode::kInvalidArgument,
                std::string(method) + ": tensor '" + std::string(in.name) + "': normalize with weights summing to 0");
  return static_cast<float>(1.0 / sum);
}

namespace {

// (bits, index) of the element of rank r (0 = largest |model - base|, ties by lower index): a two-pass
// radix select on the magnitude bits plus one scan for the tie position. O(N), no sort.
std::pair<std::int32_t, std::uint64_t> element_at_rank(const std::vector<std::int32_t>& bits, std::uint64_t r) {
  const std::size_t n = bits.size();
  std::vector<std::uint32_t> hist(1u << 16, 0);
  for (std::size_t i = 0; i < n; ++i) ++hist[static_cast<std::uint32_t>(bits[i]) >> 16];
  std::uint64_t above = 0;
  std::uint32_t high = 0;
  for (std::size_t b = hist.size(); b-- > 0;) {
    if (above + hist[b] > r) {
      high = static_cast<std::uint32_t>(b);
      break;
    }
    above += hist[b];
  }
  std::fill(hist.begin(), hist.end(), 0);
  for (std::size_t i = 0; i < n; ++i) {
    const auto b = static_cast<std::uint32_t>(bits[i]);
    if ((b >> 16) == high) ++hist[b & 0xFFFFu];
  }
  std::int32_t target = 0;
  for (std::size_t b = hist.size(); b-- > 0;) {
    if (above + hist[b] > r) {
      target = static_cast<std::int32_t>((high << 16) | static_cast<std::uint32_t>(b));
      break;
    }
    above += hist[b];
  }
  std::uint64_t skip = r - above;  // entries equal to target that rank before it (lower indices)
  for (std::size_t i = 0; i < n; ++i) {
    if (bits[i] != target) continue;
    if (skip == 0) return {target, i};
    --skip;
  }
  throw Error(ErrorCode::kInternal, "element_at_rank: rank not found");
}

}  // namespace

RankBand rank_band(std::span<const float> model, std::span<const float> base, std::uint64_t lo, std::uint64_t hi) {
  const std::uint64_t n = model.size();
  RankBand band;
  hi = std::min(hi, n);
  if (lo >= hi) {
    band.empty = true;
    return band;
  }
  if (lo == 0 && hi == n) return band;
  std::vector<std::int32_t> bits(n);
  for (std::size_t i = 0; i < n; ++i) bits[i] = magnitude_bits(base.empty() ? model[i] : model[i] - base[i]);
  if (lo > 0) {
    band.lo_all = false;
    std::tie(band.lo_bits, band.lo_cut) = element_at_rank(bits, lo);
  }
  if (hi < n) {
    band.hi_all = false;
    std::tie(band.hi_bits, band.hi_cut) = element_at_rank(bits, hi);
  }
  return band;
}

namespace {
// d = (model - base) / divisor where gt < magnitude bits <= le, else 0 (branch-free, see keep_if).
TASKVEC_SIMD_CLONES void band_segment(const float* __restrict model, const float* __restrict base, float* __restrict d,
                                      std::int32_t gt, std::int32_t le, float divisor, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float x = model[i] - base[i];
    const std::int32_t b = magnitude_bits(x);
    const float q = x / divisor;
    d[i] = std::bit_cast<float>(std::bit_cast<std::uint32_t>(q) & (0u - static_cast<std::uint32_t>((b > gt) & (b <= le))));
  }
}
}  // namespace

void band_fill(const RankBand& band, std::span<const float> model, std::span<const float> base, float divisor,
               std::span<float> d) {
  const std::size_t n = d.size();
  if (band.empty) {
    std::fill(d.begin(), d.end(), 0.0f);
    return;
  }
  // Within a segment where (i < hi_cut) and (i < lo_cut) are fixed, the band is gt < bits <= le.
  auto segment = [&](std::size_t from, std::size_t to) {
    if (from >= to) return;
    std::int32_t gt = -1, le = 0x7FFFFFFF;
    if (!band.hi_all) gt = from < band.hi_cut ? band.hi_bits - 1 : band.hi_bits;
    if (!band.lo_all) le = from < band.lo_cut ? band.lo_bits - 1 : band.lo_bits;
    band_segment(model.data() + from, base.data() + from, d.data() + from, gt, le, divisor, to - from);
  };
  std::size_t p1 = band.hi_all ? n : std::min<std::uint64_t>(band.hi_cut, n);
  std::size_t p2 = band.lo_all ? n : std::min<std::uint64_t>(band.lo_cut, n);
  if (p1 > p2) std::swap(p1, p2);
  segment(0, p1);
  segment(p1, p2);
  segment(p2, n);
}

}  // namespace merge_detail

using namespace merge_detail;

std::uint64_t merge_keep_count(double fraction, std::uint64_t n, bool round) noexcept {
  if (!(fraction > 0)) return 0;
  if (fraction >= 1) return n;
  const double x = fraction * static_cast<double>(n);
  const double k = round ? std::floor(x + 0.5) : std::floor(x);
  return std::min<std::uint64_t>(n, static_cast<std::uint64_t>(k));
}

BreadcrumbsBand merge_breadcrumbs_band(const MergeModelParams& model, bool round, std::uint64_t n) noexcept {
  BreadcrumbsBand band;
  if (model.density >= 1) {  // mergekit: density >= 1 returns the task vector untouched, outliers included
    band.keep = n;
    return band;
  }
  band.keep = merge_keep_count(model.density, n, round);
  band.top = merge_keep_count(model.gamma, n, round);
  if (band.top + band.keep > n) band.top = n - band.keep;  // mergekit: fewer outliers, so that keep fits
  // mergekit keeps sorted[n_bot:-n_top]: with n_top = 0 that slice is empty and the task vector is gone.
  band.mergekit_drops_all = band.top == 0 && band.keep > 0;
  return band;
}

std::int64_t merge_topk_kept(std::string_view method, const MergeModelParams& model, const MergeGlobalParams& global,
                             std::uint64_t n) noexcept {
  // Same counts as bands_for: the band [top, top + keep) of the ranked magnitudes.
  const bool breadcrumbs = method == "breadcrumbs" || method == "breadcrumbs_ties";
  if (!breadcrumbs && method != "magnitude_prune" && !(method == "ties" && !global.trim_model)) return -1;
  if (breadcrumbs) return static_cast<std::int64_t>(merge_breadcrumbs_band(model, global.round_count, n).keep);
  return static_cast<std::int64_t>(merge_keep_count(model.density, n, global.round_count));
}

namespace {

inline std::uint64_t mix64(std::uint64_t z) noexcept {  // splitmix64 finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ull;

std::string fmt_della_dim(const char* method, std::string_view name, int dim, int nd) {
  return std::string(method) + ": tensor '" + std::string(name) + "': rank_dim " + std::to_string(dim) +
         " is not a dimension of a " + std::to_string(nd) + "-D tensor";
}

inline float sign_of(float x) noexcept { return x > 0 ? 1.0f : (x < 0 ? -1.0f : 0.0f); }

// Adapts a per-element delta f(m, i) to the fill(m, d) form of the combiners.
template <class F>
auto elementwise(F f) {
  return [f](std::size_t m, std::span<float> d) {
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = f(m, i);
  };
}

// out = base + lambda * scale * sum_m w_m delta_m; the plain task-arithmetic form every *_linear
// method shares, so that density 1 reproduces task arithmetic bit for bit. fill(m, d) writes model m's
// (sparsified, unweighted) delta into d; one buffer is reused, so memory stays at one extra tensor.
template <class Fill>
void combine_linear(const MergeTensor& in, std::span<float> out, float scale, Fill fill) {
  const std::size_t n = out.size();
  std::vector<float> d(n);
  std::fill(out.begin(), out.end(), 0.0f);
  for (std::size_t m = 0; m < in.models.size(); ++m) {
    fill(m, std::span<float>(d));
    const float w = in.model_params[m].weight;
    for (std::size_t i = 0; i < n; ++i) out[i] += w * d[i];
  }
  const float lambda = in.global.lambda;
  for (std::size_t i = 0; i < n; ++i) out[i] = in.base[i] + lambda * (scale * out[i]);
}

// The elementwise loops of TIES, each on restrict pointers and compiled for AVX2 too
// (base/simd_clones.hpp: no FMA, and each element's operations are those of a plain loop, so the bytes
// do not depend on the CPU). Selects are bit masks (`keep_if`): GCC does not if-convert a float
// `cond ? x : 0.0f` into a vector loop ("control flow in loop"), and the mask gives the same bits.
inline float keep_if(bool keep, float x) noexcept {
  return std::bit_cast<float>(std::bit_cast<std::uint32_t>(x) & (0u - static_cast<std::uint32_t>(keep)));
}
TASKVEC_SIMD_CLONES void add_weighted(float* __restrict out, const float* __restrict d, float w, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out[i] += w * d[i];
}
// out += w d and den += dw (w or |w|) where w d is non-zero and of the elected sign.
TASKVEC_SIMD_CLONES void add_agreeing(float* __restrict out, float* __restrict den, const float* __restrict d,
                                      const float* __restrict sign, float w, float aw, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const float c = w * d[i];
    const bool agree = c * sign[i] > 0;
    out[i] += keep_if(agree, c);
    den[i] += keep_if(agree, aw);
  }
}
// out = base + lambda * out / den (kNone: no division; kSignedWeights: den 0 -> 1, as mergekit;
// kAbsWeights: den 0 -> nothing agreed, 0).
TASKVEC_SIMD_CLONES void finish_ties(float* __restrict out, const float* __restrict den, const float* __restrict base,
                                     float lambda, MergeDivisor divisor, std::size_t n) {
  if (divisor == MergeDivisor::kNone) {
    for (std::size_t i = 0; i < n; ++i) out[i] = base[i] + lambda * out[i];
    return;
  }
  if (divisor == MergeDivisor::kSignedWeights) {
    for (std::size_t i = 0; i < n; ++i) {
      const float safe = den[i] == 0 ? 1.0f : den[i];
      out[i] = base[i] + lambda * (out[i] / safe);
    }
    return;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const bool any = den[i] > 0;
    const float safe = any ? den[i] : 1.0f;  // no division by zero in the lanes that are dropped
    out[i] = base[i] + lambda * keep_if(any, out[i] / safe);
  }
}

// TIES steps 2-3 on sparsified deltas: elect the sign of sum_m w_m delta_m (zero -> + as mergekit, or the
// majority sign of the tensor), then merge the agreeing ones with in.global.divisor. The deltas are
// produced twice by fill() rather than stored (T tensors of memory saved).
template <class Fill>
void combine_ties(const MergeTensor& in, std::span<float> out, Fill fill) {
  const std::size_t n = out.size();
  const std::size_t t = in.models.size();
  std::vector<float> d(n);
  std::fill(out.begin(), out.end(), 0.0f);
  for (std::size_t m = 0; m < t; ++m) {  // pass 1: out holds the elected mass
    fill(m, std::span<float>(d));
    add_weighted(out.data(), d.data(), in.model_params[m].weight, n);
  }
  std::int64_t positive = 0, negative = 0;
  std::vector<float> sign(n);
  for (std::size_t i = 0; i < n; ++i) {
    sign[i] = sign_of(out[i]);
    positive += out[i] > 0;
    negative += out[i] < 0;
  }
  const std::int64_t majority = positive - negative;
  const float fill_sign =
      !in.global.sign_tie_majority ? 1.0f : (majority > 0 ? 1.0f : (majority < 0 ? -1.0f : 0.0f));
  for (std::size_t i = 0; i < n; ++i) sign[i] = sign[i] == 0 ? fill_sign : sign[i];
  std::vector<float> den(n, 0.0f);
  std::fill(out.begin(), out.end(), 0.0f);
  for (std::size_t m = 0; m < t; ++m) {  // pass 2: out holds the agreeing sum
    fill(m, std::span<float>(d));
    const float w = in.model_params[m].weight;
    add_agreeing(out.data(), den.data(), d.data(), sign.data(), w,
                 in.global.divisor == MergeDivisor::kAbsWeights ? std::fabs(w) : w, n);
  }
  finish_ties(out.data(), den.data(), in.base.data(), in.global.lambda, in.global.divisor, n);
}

std::vector<RankBand> bands_for(const MergeTensor& in, bool breadcrumbs) {
  const std::uint64_t n = in.element_count();
  std::vector<RankBand> bands;
  bool dropped_by_mergekit = false;
  for (std::size_t m = 0; m < in.models.size(); ++m) {
    const auto& p = in.model_params[m];
    std::uint64_t top = 0, keep = merge_keep_count(p.density, n, in.global.round_count);
    if (breadcrumbs) {
      const BreadcrumbsBand b = merge_breadcrumbs_band(p, in.global.round_count, n);
      top = b.top;
      keep = b.keep;
      dropped_by_mergekit = dropped_by_mergekit || (b.mergekit_drops_all && p.gamma > 0);
    }
    bands.push_back(rank_band(in.models[m], in.base, top, std::min(n, top + keep)));
  }
  if (dropped_by_mergekit && in.notes)
    in.notes->push_back("floor(gamma x elements) = 0 outliers: mergekit keeps nothing of the task vector here "
                        "(its slice sorted[n_bot:-0] is empty); taskvec keeps the floor(density x elements) largest");
  return bands;
}

// mergekit's rescaled_masked_tensor with the L1 norm: kept * (|tau|_1 / |kept|_1), unchanged when
// either norm is < 1e-7.
float l1_factor(double before, double after) noexcept {
  if (before < 1e-7 || after < 1e-7) return 1.0f;
  return static_cast<float>(before / after);
}

// fill(m, d) followed by the L1 factor of model m when in.global.rescale is kL1Norm: the factors are
// computed once (one extra fill per model), or taken from in.rescale_factors (chunked DARE).
template <class Fill>
auto with_l1_rescale(const MergeTensor& in, Fill fill) {
  std::vector<float> factors;
  if (in.global.rescale == MergeRescale::kL1Norm) {
    if (!in.rescale_factors.empty()) {
      factors.assign(in.rescale_factors.begin(), in.rescale_factors.end());
    } else {
      std::vector<float> d(in.element_count());
      for (std::size_t m = 0; m < in.models.size(); ++m) {
        fill(m, std::span<float>(d));
        double before = 0, after = 0;
        for (std::size_t i = 0; i < d.size(); ++i) {
          before += std::fabs(static_cast<double>(in.models[m][i] - in.base[i]));  // the f32 delta, as mergekit's
          after += std::fabs(static_cast<double>(d[i]));
        }
        factors.push_back(l1_factor(before, after));
      }
    }
  }
  return [&in, fill, factors = std::move(factors)](std::size_t m, std::span<float> d) {
    fill(m, d);
    if (m < factors.size() && factors[m] != 1.0f)
      for (float& x : d) x *= factors[m];
  };
}

std::vector<std::uint64_t> rng_keys(const MergeTensor& in) {
  std::vector<std::uint64_t> keys;
  for (std::size_t m = 0; m < in.models.size(); ++m) keys.push_back(merge_rng_key(in.global.seed, in.name, m));
  return keys;
}

void check_density(const MergeTensor& in, const char* method) {
  for (const auto& p : in.model_params)
    if (!(p.density > 0) || !std::isfinite(p.density))
      throw Error(ErrorCode::kInvalidArgument, std::string(method) + ": tensor '" + std::string(in.name) +
                                                   "': density " + std::to_string(p.density) +
                                                   " is not > 0 (1 or more keeps everything)");
}

}  // namespace

void merge_linear(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "linear", false, 1);
  const float scale = weight_scale(in, "linear");
  for (std::size_t i = 0; i < n; ++i) {
    float s = 0;
    for (std::size_t m = 0; m < in.models.size(); ++m) s += in.model_params[m].weight * in.models[m][i];
    out[i] = scale * s;
  }
}

void merge_passthrough(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "passthrough", false, 1, 1);
  const float scale = in.model_params[0].scale;
  for (std::size_t i = 0; i < n; ++i) out[i] = scale == 1.0f ? in.models[0][i] : in.models[0][i] * scale;
}

void merge_task_arithmetic(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "task_arithmetic", true, 1);
  combine_linear(in, out, weight_scale(in, "task_arithmetic", true),
                 elementwise([&](std::size_t m, std::size_t i) { return in.models[m][i] - in.base[i]; }));
}

void merge_ties(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "ties", true, 1);
  check_density(in, "ties");
  if (in.global.trim_model) {
    if (in.trim_thresholds.size() != in.models.size())
      throw Error(ErrorCode::kInvalidArgument, "ties: trim: model needs one whole-model threshold per model");
    combine_ties(in, out, elementwise([&](std::size_t m, std::size_t i) {
      const float d = in.models[m][i] - in.base[i];
      return std::fabs(d) >= in.trim_thresholds[m] ? d : 0.0f;
    }));
    return;
  }
  const auto bands = bands_for(in, false);
  combine_ties(in, out, with_l1_rescale(in, [&](std::size_t m, std::span<float> d) {
                 band_fill(bands[m], in.models[m], in.base, 1.0f, d);
               }));
}

namespace {
// Keep masks are drawn once per model (one byte per element) so the two passes of TIES see the same
// draws without generating them twice. u < p is tested in integers: u = X * 2^-53 with X the top 53
// bits, so u < p  <=>  X < ceil(p * 2^53) (p * 2^53 is exact in double). Same draws as merge_rng_uniform.
std::uint64_t rng_threshold(float p) noexcept { return static_cast<std::uint64_t>(std::ceil(static_cast<double>(p) * 0x1.0p53)); }

// keep[i] = draw i of `key` < threshold (vectorized with AVX2's 32-bit multiplies; same integers).
TASKVEC_SIMD_CLONES void draw_keep_mask(std::uint8_t* __restrict keep, std::uint64_t key, std::uint64_t first_index,
                                        std::uint64_t threshold, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) keep[i] = (mix64(key + (first_index + i + 1) * kGolden) >> 11) < threshold;
}
// d = keep ? (model - base) / divisor : 0 (branch-free, see keep_if).
TASKVEC_SIMD_CLONES void masked_delta(const std::uint8_t* __restrict keep, const float* __restrict model,
                                      const float* __restrict base, float divisor, float* __restrict d, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) d[i] = keep_if(keep[i] != 0, (model[i] - base[i]) / divisor);
}

template <class Combine>
void run_dare(const MergeTensor& in, std::span<float> out, const char* method, Combine combine) {
  const std::size_t n = check_inputs(in, out, method, true, 1);
  check_density(in, method);
  const auto keys = rng_keys(in);
  const MergeRescale rescale = in.global.rescale;
  std::vector<std::vector<std::uint8_t>> keep(in.models.size(), std::vector<std::uint8_t>(n));
  for (std::size_t m = 0; m < in.models.size(); ++m)
    draw_keep_mask(keep[m].data(), keys[m], in.first_index, rng_threshold(in.model_params[m].density), n);
  combine(with_l1_rescale(in, [&](std::size_t m, std::span<float> d) {
    const float divisor = rescale == MergeRescale::kInverseDensity ? std::min(1.0f, in.model_params[m].density) : 1.0f;
    masked_delta(keep[m].data(), in.models[m].data(), in.base.data(), divisor, d.data(), d.size());
  }));
}
}  // namespace

void dare_l1_sums(const MergeTensor& in, std::span<double> before, std::span<double> after) {
  const std::size_t n = in.element_count();
  if (before.size() != in.models.size() || after.size() != in.models.size())
    throw Error(ErrorCode::kInvalidArgument, "dare_l1_sums: one sum per model is needed");
  std::vector<std::uint8_t> keep(n);
  for (std::size_t m = 0; m < in.models.size(); ++m) {
    draw_keep_mask(keep.data(), merge_rng_key(in.global.seed, in.name, m), in.first_index,
                   rng_threshold(in.model_params[m].density), n);
    double b = 0, a = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const double d = std::fabs(static_cast<double>(in.models[m][i] - in.base[i]));
      b += d;
      a += keep[i] ? d : 0.0;
    }
    before[m] += b;
    after[m] += a;
  }
}

void merge_dare_linear(const MergeTensor& in, std::span<float> out) {
  const float scale = weight_scale(in, "dare_linear", true);
  run_dare(in, out, "dare_linear", [&](auto delta) { combine_linear(in, out, scale, delta); });
}

void merge_dare_ties(const MergeTensor& in, std::span<float> out) {
  run_dare(in, out, "dare_ties", [&](auto delta) { combine_ties(in, out, delta); });
}

void merge_breadcrumbs(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "breadcrumbs", true, 1);
  check_density(in, "breadcrumbs");
  const float scale = weight_scale(in, "breadcrumbs", true);
  const auto bands = bands_for(in, true);
  combine_linear(in, out, scale, with_l1_rescale(in, [&](std::size_t m, std::span<float> d) {
                   band_fill(bands[m], in.models[m], in.base, 1.0f, d);
                 }));
}

void merge_breadcrumbs_ties(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "breadcrumbs_ties", true, 1);
  check_density(in, "breadcrumbs_ties");
  const auto bands = bands_for(in, true);
  combine_ties(in, out, with_l1_rescale(in, [&](std::size_t m, std::span<float> d) {
                 band_fill(bands[m], in.models[m], in.base, 1.0f, d);
               }));
}

void merge_magnitude_prune(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "magnitude_prune", true, 1);
  check_density(in, "magnitude_prune");
  const float scale = weight_scale(in, "magnitude_prune", true);
  const auto bands = bands_for(in, false);
  const bool inverse = in.global.rescale == MergeRescale::kInverseDensity;
  combine_linear(in, out, scale, with_l1_rescale(in, [&](std::size_t m, std::span<float> d) {
                   band_fill(bands[m], in.models[m], in.base, inverse ? std::min(1.0f, in.model_params[m].density) : 1.0f, d);
                 }));
}

namespace {
// DELLA's MAGPRUNE as mergekit's della_magprune, one pruned (and rescaled) task vector per model.
std::vector<std::vector<float>> della_prune(const MergeTensor& in, const char* method) {
  const std::size_t n = in.element_count();
  check_density(in, method);
  // Ranked along dimension rank_dim (mergekit: 1, after a 1-D tensor is made one row); -1 = the last.
  std::size_t outer = 1, len = n, inner = 1;
  if (in.shape.size() >= 2) {
    const int nd = static_cast<int>(in.shape.size());
    const int dim = in.global.rank_dim < 0 ? nd + in.global.rank_dim : in.global.rank_dim;
    if (dim < 0 || dim >= nd)
      throw Error(ErrorCode::kInvalidArgument, fmt_della_dim(method, in.name, in.global.rank_dim, nd));
    outer = 1;
    inner = 1;
    for (int k = 0; k < dim; ++k) outer *= static_cast<std::size_t>(in.shape[k]);
    for (int k = dim + 1; k < nd; ++k) inner *= static_cast<std::size_t>(in.shape[k]);
    len = static_cast<std::size_t>(in.shape[dim]);
  }
  const auto keys = rng_keys(in);
  std::vector<std::vector<float>> pruned(in.models.size(), std::vector<float>(n));
  std::vector<std::uint64_t> order;
  bool single = false;
  for (std::size_t m = 0; m < in.models.size(); ++m) {
    const auto& p = in.model_params[m];
    auto& dst = pruned[m];
    if (p.density >= 1) {  // mergekit: returned untouched, no epsilon check, no rescale
      for (std::size_t i = 0; i < n; ++i) dst[i] = in.models[m][i] - in.base[i];
      continue;
    }
    const double lo = static_cast<double>(p.density) - p.epsilon;
    const double hi = static_cast<double>(p.density) + p.epsilon;
    if (lo <= 0 || hi >= 1)
      throw Error(ErrorCode::kInvalidArgument,
                  std::string(method) + ": tensor '" + std::string(in.name) + "': density " + std::to_string(p.density) +
                      " +- epsilon " + std::to_string(p.epsilon) + " must lie inside (0, 1), as mergekit requires");
    double before = 0, after = 0;
    for (std::size_t o = 0; o < outer; ++o) {
      for (std::size_t c = 0; c < inner; ++c) {
        const std::size_t first = o * len * inner + c;
        order.resize(len);
        // ascending rank: smallest magnitude first (ties: the higher index ranks lower)
        for (std::size_t j = 0; j < len; ++j) {
          const std::size_t i = first + j * inner;
          order[j] = rank_key(in.models[m][i] - in.base[i], i);
        }
        std::sort(order.begin(), order.end());
        single = single || len == 1;
        for (std::size_t r = 0; r < len; ++r) {
          const std::size_t i = 0xFFFFFFFFull - (order[r] & 0xFFFFFFFFull);
          // mergekit's (rank - min) / (max - min) is 0/0 for a row of one; taskvec uses the middle.
          const double frac = len > 1 ? static_cast<double>(r) / static_cast<double>(len - 1) : 0.5;
          const float keep_p = static_cast<float>(lo + (hi - lo) * frac);
          const float d = in.models[m][i] - in.base[i];
          before += std::fabs(static_cast<double>(d));
          float v = 0;
          if (merge_rng_uniform(keys[m], i) < keep_p) {
            v = in.global.rescale == MergeRescale::kInverseDensity ? d / keep_p : d;
            after += std::fabs(static_cast<double>(d));
          }
          dst[i] = v;
        }
      }
    }
    if (in.global.rescale == MergeRescale::kL1Norm) {
      const float f = l1_factor(before, after);
      if (f != 1.0f)
        for (float& x : dst) x *= f;
    }
  }
  if (single && in.notes)
    in.notes->push_back("a row of one element along the DELLA ranking dimension: mergekit's rank normalization is 0/0 "
                        "there (NaN probabilities, the merge fails); taskvec keeps it with probability density");
  return pruned;
}
}  // namespace

void merge_della(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "della", true, 1);
  const auto pruned = della_prune(in, "della");
  combine_ties(in, out, [&](std::size_t m, std::span<float> d) { std::copy(pruned[m].begin(), pruned[m].end(), d.begin()); });
}

void merge_della_linear(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "della_linear", true, 1);
  const float scale = weight_scale(in, "della_linear", true);
  const auto pruned = della_prune(in, "della_linear");
  combine_linear(in, out, scale, [&](std::size_t m, std::span<float> d) { std::copy(pruned[m].begin(), pruned[m].end(), d.begin()); });
}

void merge_consensus(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "consensus", true, 1);
  const std::size_t t = in.models.size();
  const int k = in.global.k;
  for (std::size_t i = 0; i < n; ++i) {
    float mtl = 0;
    for (std::size_t m = 0; m < t; ++m) mtl += in.model_params[m].weight * (in.models[m][i] - in.base[i]);
    int votes = 0;
    for (std::size_t m = 0; m < t; ++m) {
      const float tm = in.model_params[m].weight * (in.models[m][i] - in.base[i]);
      if (std::fabs(tm) > in.model_params[m].tall_lambda * std::fabs(mtl - tm)) ++votes;
    }
    out[i] = in.base[i] + in.global.lambda * (votes >= k ? mtl : 0.0f);
  }
}

// ---- counter-based randomness ----


std::uint64_t merge_rng_key(std::uint64_t seed, std::string_view tensor_name, std::size_t model_index) noexcept {
  std::uint64_t h = 0xCBF29CE484222325ull;  // FNV-1a
  for (unsigned char c : tensor_name) {
    h ^= c;
    h *= 0x100000001B3ull;
  }
  return mix64(mix64(seed + kGolden) ^ h ^ mix64(static_cast<std::uint64_t>(model_index) * kGolden + 1));
}

double merge_rng_uniform(std::uint64_t key, std::uint64_t index) noexcept {
  return static_cast<double>(mix64(key + (index + 1) * kGolden) >> 11) * 0x1.0p-53;
}

void dare_drop(std::span<float> tau, std::uint64_t key, std::uint64_t first_index, float density, bool rescale) noexcept {
  for (std::size_t j = 0; j < tau.size(); ++j) {
    if (merge_rng_uniform(key, first_index + j) < density)
      tau[j] = rescale ? tau[j] / density : tau[j];
    else
      tau[j] = 0.0f;
  }
}

// ---- whole-model magnitude threshold (two-pass radix select on |x| bit patterns) ----

MagnitudeThreshold::MagnitudeThreshold(double density) : density_(density), hist_(1u << 16, 0) {}

void MagnitudeThreshold::add(std::span<const float> values) {
  for (float v : values) {
    std::uint32_t bits;
    const float a = std::fabs(v);
    __builtin_memcpy(&bits, &a, 4);
    if (pass_ == 0) {
      ++total_;
      ++hist_[bits >> 16];
    } else if ((bits >> 16) == high_) {
      ++hist_[bits & 0xFFFFu];
    }
  }
}

bool MagnitudeThreshold::next_pass() {
  if (pass_ == 0) {
    k_ = merge_keep_count(density_, total_);
    if (k_ == 0) {
      threshold_ = INFINITY;
      done_ = true;
      return false;
    }
    std::uint64_t seen = 0;
    for (std::size_t b = hist_.size(); b-- > 0;) {
      if (seen + hist_[b] >= k_) {
        high_ = static_cast<std::uint32_t>(b);
        above_ = seen;
        break;
      }
      seen += hist_[b];
    }
    std::fill(hist_.begin(), hist_.end(), 0);
    pass_ = 1;
    return true;
  }
  if (!done_) {
    std::uint64_t seen = above_;
    for (std::size_t b = hist_.size(); b-- > 0;) {
      if (seen + hist_[b] >= k_) {
        const std::uint32_t bits = (high_ << 16) | static_cast<std::uint32_t>(b);
        __builtin_memcpy(&threshold_, &bits, 4);
        break;
      }
      seen += hist_[b];
    }
    done_ = true;
  }
  return false;
}

float MagnitudeThreshold::threshold() const {
  if (!done_) throw Error(ErrorCode::kInternal, "MagnitudeThreshold::threshold() before both passes ended");
  return threshold_;
}

}  // namespace taskvec
