// Rounding f32 -> BF16 / F16 / fp8 and f64 -> the same, against the slow reference (nearest value from
// the full sorted list of a format's values, ties to even). Inputs: every midpoint between consecutive
// values and its neighbours, random bit patterns, random in-range values and the specials.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "dtype_test_util.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

using testref::Format;
using testref::Grid;

std::vector<float> f32_inputs(const Grid& g) {
  std::vector<float> in;
  const float inf = std::numeric_limits<float>::infinity();
  auto add_with_neighbours = [&](float x) {
    for (float s : {x, -x}) {
      in.push_back(s);
      in.push_back(std::nextafter(s, inf));
      in.push_back(std::nextafter(s, -inf));
    }
  };
  for (std::size_t i = 0; i + 1 < g.values.size(); ++i) {
    const double mid = (g.values[i] + g.values[i + 1]) / 2;  // exact in double
    const auto mid32 = static_cast<float>(mid);
    EXPECT_EQ(static_cast<double>(mid32), mid) << "midpoint not an f32";
    add_with_neighbours(mid32);
    add_with_neighbours(static_cast<float>(g.values[i]));
  }
  add_with_neighbours(static_cast<float>(g.values.back()));
  // Specials.
  for (float x : {0.0f, inf, std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                  std::numeric_limits<float>::denorm_min(), 1.0f, 3.0f}) {
    add_with_neighbours(x);
  }
  for (std::uint32_t nan : {0x7FC0'0000u, 0x7F80'0001u, 0x7FFF'FFFFu, 0x7FA0'0000u, 0x7F80'FFFFu}) {
    in.push_back(std::bit_cast<float>(nan));
    in.push_back(std::bit_cast<float>(nan | 0x8000'0000u));
  }
  // Random bit patterns (most are far out of range) and random values around the format's range.
  std::mt19937_64 rng(0x5EED'0001u + static_cast<unsigned>(g.format->dtype));
  for (int i = 0; i < 1'000'000; ++i) in.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  const int lo_exp = 1 - g.format->bias() - g.format->man_bits - 3;
  const int hi_exp = static_cast<int>(g.format->exp_ones()) - g.format->bias() + 2;
  std::uniform_int_distribution<int> exp_dist(std::max(lo_exp, -149), std::min(hi_exp, 127));
  for (int i = 0; i < 250'000; ++i) {
    const auto r = static_cast<std::uint32_t>(rng());
    const float v = std::ldexp(1.0f + static_cast<float>(r & 0x7F'FFFFu) * 0x1p-23f, exp_dist(rng));
    in.push_back((r & 0x8000'0000u) ? -v : v);
  }
  return in;
}

class Rounding : public ::testing::TestWithParam<const Format*> {};

TEST_P(Rounding, F32MatchesReference) {
  const Format& f = *GetParam();
  const Grid g = testref::make_grid(f);
  const std::vector<float> in = f32_inputs(g);
  std::vector<std::byte> bulk(in.size() * 2);
  encode_from_f32(f.dtype, in.data(), bulk.data(), in.size());
  const std::size_t width = (f.exp_bits + f.man_bits == 15) ? 2 : 1;
  int failures = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const testref::Rounded want = testref::round_nearest_even(g, static_cast<double>(in[i]));
    const std::uint32_t got = testref::impl_encode(f, in[i]);
    std::uint32_t got_bulk = std::to_integer<std::uint32_t>(bulk[i * width]);
    if (width == 2) got_bulk |= std::to_integer<std::uint32_t>(bulk[i * width + 1]) << 8;
    if ((!testref::matches(f, got, want) || got_bulk != got) && ++failures <= 10) {
      ADD_FAILURE() << f.name << ": f32 0x" << std::hex << std::bit_cast<std::uint32_t>(in[i]) << " ("
                    << in[i] << ") -> 0x" << got << " (bulk 0x" << got_bulk << "), want 0x" << want.bits
                    << (want.nan ? " NaN" : "");
    }
  }
  EXPECT_EQ(failures, 0) << "of " << in.size() << " inputs";
}

std::vector<double> f64_inputs(const Grid& g) {
  std::vector<double> in;
  const double inf = std::numeric_limits<double>::infinity();
  auto add_with_neighbours = [&](double x) {
    for (double s : {x, -x}) {
      in.push_back(s);
      in.push_back(std::nextafter(s, inf));
      in.push_back(std::nextafter(s, -inf));
      // Just above / below at f32 distance: the double-rounding trap sits here.
      in.push_back(s + std::ldexp(std::fabs(s), -30));
      in.push_back(s - std::ldexp(std::fabs(s), -30));
    }
  };
  for (std::size_t i = 0; i + 1 < g.values.size(); ++i) {
    add_with_neighbours((g.values[i] + g.values[i + 1]) / 2);
    add_with_neighbours(g.values[i]);
  }
  add_with_neighbours(g.values.back());
  for (double x : {0.0, inf, std::numeric_limits<double>::max(), std::numeric_limits<double>::min(),
                   std::numeric_limits<double>::denorm_min(), static_cast<double>(std::numeric_limits<float>::max()),
                   static_cast<double>(std::numeric_limits<float>::denorm_min())}) {
    add_with_neighbours(x);
  }
  for (std::uint64_t nan : {0x7FF8'0000'0000'0000ull, 0x7FF0'0000'0000'0001ull, 0x7FFF'FFFF'FFFF'FFFFull}) {
    in.push_back(std::bit_cast<double>(nan));
    in.push_back(std::bit_cast<double>(nan | 0x8000'0000'0000'0000ull));
  }
  std::mt19937_64 rng(0x5EED'0002u + static_cast<unsigned>(g.format->dtype));
  for (int i = 0; i < 500'000; ++i) in.push_back(std::bit_cast<double>(rng()));
  const int lo_exp = 1 - g.format->bias() - g.format->man_bits - 3;
  const int hi_exp = static_cast<int>(g.format->exp_ones()) - g.format->bias() + 2;
  std::uniform_int_distribution<int> exp_dist(lo_exp, hi_exp);
  for (int i = 0; i < 500'000; ++i) {
    const std::uint64_t r = rng();
    const double frac = static_cast<double>(r >> 12) * 0x1p-52;  // 52 random mantissa bits
    const double v = std::ldexp(1.0 + frac, exp_dist(rng));
    in.push_back((r & 1u) ? -v : v);
  }
  return in;
}

TEST_P(Rounding, F64MatchesReference) {
  const Format& f = *GetParam();
  const Grid g = testref::make_grid(f);
  const std::vector<double> in = f64_inputs(g);
  std::vector<std::byte> bulk(in.size() * 2);
  encode_from_f64(f.dtype, in.data(), bulk.data(), in.size());
  const std::size_t width = (f.exp_bits + f.man_bits == 15) ? 2 : 1;
  int failures = 0;
  for (std::size_t i = 0; i < in.size(); ++i) {
    const testref::Rounded want = testref::round_nearest_even(g, in[i]);
    const std::uint32_t got = testref::impl_encode64(f, in[i]);
    std::uint32_t got_bulk = std::to_integer<std::uint32_t>(bulk[i * width]);
    if (width == 2) got_bulk |= std::to_integer<std::uint32_t>(bulk[i * width + 1]) << 8;
    if ((!testref::matches(f, got, want) || got_bulk != got) && ++failures <= 10) {
      ADD_FAILURE() << f.name << ": f64 " << std::hexfloat << in[i] << " -> 0x" << std::hex << got
                    << " (bulk 0x" << got_bulk << "), want 0x" << want.bits << (want.nan ? " NaN" : "");
    }
  }
  EXPECT_EQ(failures, 0) << "of " << in.size() << " inputs";
}

INSTANTIATE_TEST_SUITE_P(Formats, Rounding, ::testing::ValuesIn(testref::kFormats), [](const auto& info) {
  std::string name = info.param->name;
  std::erase(name, '_');
  return name;
});

// An f64 just above a BF16 midpoint rounds to the midpoint in f32, and the midpoint then ties to even
// (down). Rounding once, straight from f64, must go up.
TEST(Rounding, F64DoesNotDoubleRound) {
  const double above_mid = 1.0 + 0x1p-8 + 0x1p-40;  // bf16 neighbours 1.0 (0x3F80) and 1 + 2^-7 (0x3F81)
  ASSERT_EQ(static_cast<float>(above_mid), 1.0f + 0x1p-8f);
  EXPECT_EQ(f32_to_bf16(static_cast<float>(above_mid)), 0x3F80);  // the trap, via f32
  EXPECT_EQ(f64_to_bf16(above_mid), 0x3F81);
  EXPECT_EQ(testref::bulk_encode64(testref::kBF16, above_mid), 0x3F81u);
  EXPECT_EQ(f64_to_bf16(-above_mid), 0xBF81);
  const double below_odd_mid = 1.0 + 3 * 0x1p-8 - 0x1p-40;  // just below the 0x3F81/0x3F82 midpoint
  EXPECT_EQ(f32_to_bf16(static_cast<float>(below_odd_mid)), 0x3F82);  // via f32: tie, to even (up)
  EXPECT_EQ(f64_to_bf16(below_odd_mid), 0x3F81);

  const double f16_above = 1.0 + 0x1p-11 + 0x1p-40;  // f16 neighbours 1.0 and 1 + 2^-10
  EXPECT_EQ(f32_to_f16(static_cast<float>(f16_above)), 0x3C00);
  EXPECT_EQ(f64_to_f16(f16_above), 0x3C01);
  EXPECT_EQ(testref::bulk_encode64(testref::kF16, f16_above), 0x3C01u);
  const double e4m3_above = 1.0 + 0x1p-4 + 0x1p-40;  // e4m3 neighbours 1.0 and 1.125
  EXPECT_EQ(f32_to_f8e4m3(static_cast<float>(e4m3_above)), 0x38);
  EXPECT_EQ(f64_to_f8e4m3(e4m3_above), 0x39);
  const double e5m2_above = 1.0 + 0x1p-3 + 0x1p-40;  // e5m2 neighbours 1.0 and 1.25
  EXPECT_EQ(f32_to_f8e5m2(static_cast<float>(e5m2_above)), 0x3C);
  EXPECT_EQ(f64_to_f8e5m2(e5m2_above), 0x3D);
  // F32 target: the hardware conversion, also once.
  const double f32_above = 1.0 + 0x1p-24 + 0x1p-40;  // just above an f32 midpoint
  float out;
  encode_from_f64(DType::kF32, &f32_above, reinterpret_cast<std::byte*>(&out), 1);
  EXPECT_EQ(out, 1.0f + 0x1p-23f);
}

}  // namespace
}  // namespace taskvec
