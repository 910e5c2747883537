// Checks the claims of docs/NUMERICS.md, "Round trips of task vectors": diff stores
// tau = fl32(ft - pre) in F32, apply computes fl32(pre + tau) and rounds to the output dtype.
//  - BF16: apply(pre, diff(pre, ft)) == ft bit for bit whenever u(pre) - u(ft) <= 16, u = exponent
//    of the ulp (so whenever |ft| >= 2^-16 |pre|), ft != -0 and ft - pre does not overflow f32.
//  - F16: the same with 13 in place of 16.
//  - F32: exact when ft - pre is representable (Sterbenz: pre/2 <= ft <= 2 pre, or either is zero);
//    within one ulp of ft when |pre| <= |ft|; otherwise within 2 ulp(pre) (an error relative to pre).
#include <gtest/gtest.h>

#include <bit>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

#include "dtype_reference.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

// The engine's path for one element, modelled with the conversions under test.
struct RoundTrip16 {
  std::uint16_t (*encode)(float) noexcept;
  float (*decode)(std::uint16_t) noexcept;
  std::uint16_t run(std::uint16_t pre_bits, std::uint16_t ft_bits, bool* tau_exact = nullptr) const {
    const float pre = decode(pre_bits);
    const float ft = decode(ft_bits);
    const float tau = ft - pre;  // diff: fl32(ft - pre), stored as F32
    if (tau_exact) *tau_exact = static_cast<double>(tau) == static_cast<double>(ft) - static_cast<double>(pre);
    const float sum = pre + 1.0f * tau;  // apply with lambda = 1
    return encode(sum);
  }
};

constexpr RoundTrip16 kBF16Trip{f32_to_bf16, bf16_to_f32};
constexpr RoundTrip16 kF16Trip{f32_to_f16, f16_to_f32};

// Realistic weights: magnitudes log-uniform in [1e-4, 1], random sign.
float weight(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> log_mag(std::log(1e-4), 0.0);
  const double mag = std::exp(log_mag(rng));
  return static_cast<float>((rng() & 1u) ? -mag : mag);
}

TEST(RoundTrip, BF16RealisticPairsAreExact) {
  std::mt19937_64 rng(101);
  std::uniform_real_distribution<double> rel(-0.05, 0.05);
  const auto& f = testref::kBF16;
  long exact = 0;
  long checked = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    const std::uint16_t pre = f32_to_bf16(weight(rng));
    std::uint16_t ft;
    switch (i % 4) {
      case 0:
      case 1: ft = f32_to_bf16(bf16_to_f32(pre) * static_cast<float>(1.0 + rel(rng))); break;  // small delta
      case 2: ft = f32_to_bf16(-bf16_to_f32(pre) * static_cast<float>(std::fabs(rel(rng)) * 4)); break;  // crosses zero
      default: ft = f32_to_bf16(weight(rng)); break;  // unrelated weight
    }
    if (ft == 0x8000u) continue;  // -0 comes back as +0 (equal, not bit-identical); see NUMERICS.md
    if (f.ulp_exponent(pre) - f.ulp_exponent(ft) > 16) continue;
    ++checked;
    const std::uint16_t back = kBF16Trip.run(pre, ft);
    if (back == ft) {
      ++exact;
    } else if (checked - exact <= 5) {
      ADD_FAILURE() << std::hex << "pre 0x" << pre << " ft 0x" << ft << " -> 0x" << back;
    }
  }
  EXPECT_EQ(exact, checked);
  EXPECT_GT(checked, 990'000);  // the bound excludes almost nothing at these magnitudes
}

// Every finite pair of BF16 / F16 patterns, sampled uniformly: inside the bound always exact, outside
// it failures exist (the bound is tight) and happen only when |pre| > |ft|.
void check_all_patterns(const testref::Format& f, const RoundTrip16& trip, int bound, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  long inside = 0, inside_exact = 0, outside = 0, outside_exact = 0, tau_inexact_but_exact = 0;
  const std::uint32_t inf_bits = f.inf_bits();
  for (int i = 0; i < 2'000'000; ++i) {
    const auto pre = static_cast<std::uint16_t>(rng());
    const auto ft = static_cast<std::uint16_t>(rng());
    if ((pre & 0x7FFFu) >= inf_bits || (ft & 0x7FFFu) >= inf_bits) continue;  // finite only
    if (ft == 0x8000u) continue;
    const float diff = trip.decode(ft) - trip.decode(pre);
    if (!std::isfinite(diff)) continue;  // f32 overflow (BF16 only, |values| near 2^128)
    bool tau_exact = false;
    const bool ok = trip.run(pre, ft, &tau_exact) == ft;
    const bool in_bound = f.ulp_exponent(pre) - f.ulp_exponent(ft) <= bound;
    if (in_bound) {
      ++inside;
      inside_exact += ok;
      if (!ok && inside - inside_exact <= 5) ADD_FAILURE() << f.name << std::hex << " pre 0x" << pre << " ft 0x" << ft;
      if (ok && !tau_exact) ++tau_inexact_but_exact;
    } else {
      ++outside;
      outside_exact += ok;
      EXPECT_GT(std::fabs(trip.decode(pre)), std::fabs(trip.decode(ft)));
    }
  }
  EXPECT_EQ(inside_exact, inside) << f.name;
  EXPECT_LT(outside_exact, outside) << f.name << ": no failure outside the bound; is it tight?";
  EXPECT_GT(tau_inexact_but_exact, 0) << f.name << ": expected |ft| >> |pre| cases with an inexact tau";
  std::printf("[          ] %s: %ld pairs inside the bound (all exact, %ld with inexact tau), "
              "%ld outside (%ld exact, %ld not)\n",
              f.name, inside, tau_inexact_but_exact, outside, outside_exact, outside - outside_exact);
}

TEST(RoundTrip, BF16AllPatterns) { check_all_patterns(testref::kBF16, kBF16Trip, 16, 202); }
TEST(RoundTrip, F16AllPatterns) { check_all_patterns(testref::kF16, kF16Trip, 13, 303); }

TEST(RoundTrip, BoundIsTight) {
  // BF16: pre = 1 + 2^-7, ft = 2^-17 + 2^-24 (ulp exponents -7 and -24: 17 apart). ft - pre needs 25
  // significant bits; f32 rounds it and the error (2^-24) is a whole ulp of ft.
  const std::uint16_t pre = f32_to_bf16(1.0f + 0x1p-7f);
  const std::uint16_t ft = f32_to_bf16(0x1p-17f + 0x1p-24f);
  ASSERT_EQ(bf16_to_f32(ft), 0x1p-17f + 0x1p-24f);
  EXPECT_EQ(testref::kBF16.ulp_exponent(pre) - testref::kBF16.ulp_exponent(ft), 17);
  EXPECT_NE(kBF16Trip.run(pre, ft), ft);
  // -0 is not bit-identical: ft - pre and pre + tau give +0.
  EXPECT_EQ(kBF16Trip.run(0x3F80, 0x8000), 0x0000);
  EXPECT_EQ(kBF16Trip.run(0x8000, 0x8000), 0x0000);
}

TEST(RoundTrip, F32) {
  std::mt19937_64 rng(404);
  long sterbenz = 0, small_pre = 0, small_pre_inexact = 0, large_pre = 0, large_pre_inexact = 0;
  double max_err_large = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    const float pre = weight(rng);
    float ft;
    switch (i % 3) {
      case 0: ft = pre * static_cast<float>(1.0 + std::uniform_real_distribution<double>(-0.5, 1.0)(rng)); break;
      default: ft = weight(rng); break;
    }
    if (ft == 0.0f) continue;
    const float tau = ft - pre;
    const float back = pre + tau;
    const bool representable = static_cast<double>(tau) == static_cast<double>(ft) - static_cast<double>(pre);
    if (representable) {
      ASSERT_EQ(std::bit_cast<std::uint32_t>(back), std::bit_cast<std::uint32_t>(ft)) << pre << " " << ft;
    }
    const double p = pre, t = ft;
    if ((p / 2 <= t && t <= 2 * p) || (2 * p <= t && t <= p / 2)) {  // Sterbenz, either sign
      ++sterbenz;
      ASSERT_TRUE(representable);
      ASSERT_EQ(back, ft);
    } else if (std::fabs(pre) <= std::fabs(ft)) {
      ++small_pre;
      const float ulp = std::nextafter(std::fabs(ft), INFINITY) - std::fabs(ft);
      ASSERT_LE(std::fabs(static_cast<double>(back) - t), static_cast<double>(ulp)) << pre << " " << ft;
      small_pre_inexact += back != ft;
    } else {
      ++large_pre;
      const float ulp_pre = std::nextafter(std::fabs(pre), INFINITY) - std::fabs(pre);
      const double err = std::fabs(static_cast<double>(back) - t) / static_cast<double>(ulp_pre);
      ASSERT_LE(err, 2.0) << pre << " " << ft;  // proven bound: 2 ulp(pre)
      max_err_large = std::max(max_err_large, err);
      large_pre_inexact += back != ft;
    }
  }
  EXPECT_GT(sterbenz, 300'000);
  EXPECT_GT(small_pre_inexact, 0);  // the one-ulp misses exist
  std::printf("[          ] F32: %ld Sterbenz pairs (all exact); |pre| <= |ft|: %ld, %ld off by one ulp; "
              "|pre| > |ft|: %ld, %ld inexact (max error %.2f ulp(pre))\n",
              sterbenz, small_pre, small_pre_inexact, large_pre, large_pre_inexact, max_err_large);
  // The example of NUMERICS.md: ft = 1 + 2^-23, pre = -2^-24. tau = 1 + 2^-23 + 2^-24 is a tie and
  // rounds to 1 + 2^-22; pre + tau = 1 + 3 * 2^-24 ties again, to 1 + 2^-22: one ulp above ft.
  const float ft = 1.0f + 0x1p-23f;
  const float pre = -0x1p-24f;
  const float tau = ft - pre;
  EXPECT_EQ(pre + tau, 1.0f + 0x1p-22f);
}

}  // namespace
}  // namespace taskvec
