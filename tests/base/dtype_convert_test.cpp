// Exhaustive checks of every BF16 / F16 / fp8 pattern: decode against the format definition, and
// encode(decode(x)) == x. Also the named special cases of the policy (NaN, Inf, saturation).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "dtype_test_util.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

using testref::Format;

class EveryPattern : public ::testing::TestWithParam<const Format*> {};

TEST_P(EveryPattern, DecodeMatchesDefinition) {
  const Format& f = *GetParam();
  int failures = 0;
  for (std::uint32_t b = 0; b < f.count(); ++b) {
    const double want = f.decode(b);
    const float got = testref::impl_decode(f, b);
    bool ok;
    if (std::isnan(want)) {
      ok = std::isnan(got) && std::signbit(got) == std::signbit(want);
      // Decoded NaNs are quiet.
      ok = ok && (std::bit_cast<std::uint32_t>(got) & 0x0040'0000u) != 0;
    } else {
      ok = static_cast<double>(got) == want && std::signbit(got) == std::signbit(want);
    }
    if (!ok && ++failures <= 10) ADD_FAILURE() << f.name << " pattern 0x" << std::hex << b << ": got " << got << " want " << want;
  }
  EXPECT_EQ(failures, 0);
}

TEST_P(EveryPattern, BulkDecodeMatchesDefinition) {
  const Format& f = *GetParam();
  const std::size_t bytes = (f.exp_bits + f.man_bits == 15) ? 2 : 1;
  std::vector<std::byte> src(f.count() * bytes);
  for (std::uint32_t b = 0; b < f.count(); ++b) {
    src[b * bytes] = static_cast<std::byte>(b & 0xFFu);
    if (bytes == 2) src[b * bytes + 1] = static_cast<std::byte>(b >> 8);
  }
  std::vector<float> as_f32(f.count());
  std::vector<double> as_f64(f.count());
  decode_to_f32(f.dtype, src.data(), as_f32.data(), f.count());
  decode_to_f64(f.dtype, src.data(), as_f64.data(), f.count());
  int failures = 0;
  for (std::uint32_t b = 0; b < f.count(); ++b) {
    const double want = f.decode(b);
    const bool ok = std::isnan(want)
                        ? (std::isnan(as_f32[b]) && std::isnan(as_f64[b]) && std::signbit(as_f64[b]) == std::signbit(want))
                        : (static_cast<double>(as_f32[b]) == want && as_f64[b] == want &&
                           std::signbit(as_f64[b]) == std::signbit(want) && std::signbit(as_f32[b]) == std::signbit(want));
    if (!ok && ++failures <= 10) ADD_FAILURE() << f.name << " pattern 0x" << std::hex << b;
  }
  EXPECT_EQ(failures, 0);
}

TEST_P(EveryPattern, EncodeOfDecodeIsIdentity) {
  const Format& f = *GetParam();
  int failures = 0;
  for (std::uint32_t b = 0; b < f.count(); ++b) {
    const float v = testref::impl_decode(f, b);
    const std::uint32_t via_f32 = testref::impl_encode(f, v);
    const std::uint32_t via_f64 = testref::impl_encode64(f, static_cast<double>(v));
    bool ok;
    if (f.is_nan(b)) {
      const testref::Rounded nan{true, (b & f.sign_bit()) != 0, 0};
      ok = testref::matches(f, via_f32, nan) && testref::matches(f, via_f64, nan);
    } else {
      ok = via_f32 == b && via_f64 == b;
    }
    if (!ok && ++failures <= 10) {
      ADD_FAILURE() << f.name << " pattern 0x" << std::hex << b << " -> 0x" << via_f32 << " / 0x" << via_f64;
    }
  }
  EXPECT_EQ(failures, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, EveryPattern, ::testing::ValuesIn(testref::kFormats),
                         [](const auto& info) {
                           std::string name = info.param->name;
                           std::erase(name, '_');
                           return name;
                         });

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

TEST(DTypeConvert, NamedPatterns) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3C00);
  EXPECT_EQ(f32_to_f8e4m3(1.0f), 0x38);
  EXPECT_EQ(f32_to_f8e5m2(1.0f), 0x3C);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7BFF);
  EXPECT_EQ(f32_to_f8e4m3(448.0f), 0x7E);
  EXPECT_EQ(f32_to_f8e5m2(57344.0f), 0x7B);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f8e4m3(-0.0f), 0x80);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest f16 subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);  // half of it: tie to even (zero)
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);  // 1.5 ulps: tie to even (2)
  EXPECT_EQ(f32_to_f8e4m3(std::ldexp(1.0f, -9)), 0x01);  // smallest e4m3 subnormal
  EXPECT_EQ(f32_to_f8e5m2(std::ldexp(1.0f, -16)), 0x01);  // smallest e5m2 subnormal
}

TEST(DTypeConvert, OverflowToInf) {
  EXPECT_EQ(f32_to_f16(65519.99f), 0x7BFF);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00);   // max + half ulp: Inf
  EXPECT_EQ(f32_to_f16(-65520.0f), 0xFC00);
  EXPECT_EQ(f32_to_f16(1e10f), 0x7C00);
  EXPECT_EQ(f32_to_f16(kInf), 0x7C00);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7F80);  // above bf16 max + half ulp
  EXPECT_EQ(f32_to_bf16(-kInf), 0xFF80);
  EXPECT_EQ(f32_to_f8e5m2(61439.0f), 0x7B);
  EXPECT_EQ(f32_to_f8e5m2(61440.0f), 0x7C);  // 57344 + 4096 (half ulp): Inf
  EXPECT_EQ(f32_to_f8e5m2(-1e30f), 0xFC);
}

TEST(DTypeConvert, E4M3Saturates) {
  EXPECT_EQ(f32_to_f8e4m3(464.0f), 0x7E);  // tie between 448 and the (NaN) slot 480: 448
  EXPECT_EQ(f32_to_f8e4m3(479.0f), 0x7E);
  EXPECT_EQ(f32_to_f8e4m3(1e30f), 0x7E);
  EXPECT_EQ(f32_to_f8e4m3(-1e30f), 0xFE);
  EXPECT_EQ(f32_to_f8e4m3(kInf), 0x7E);
  EXPECT_EQ(f32_to_f8e4m3(-kInf), 0xFE);
  EXPECT_EQ(f64_to_f8e4m3(std::numeric_limits<double>::max()), 0x7E);
  EXPECT_EQ(f32_to_f8e4m3(kNaN), 0x7F);
  EXPECT_EQ(f32_to_f8e4m3(-kNaN), 0xFF);
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0x7F)));
  EXPECT_TRUE(std::isnan(f8e4m3_to_f32(0xFF)));
  EXPECT_TRUE(std::signbit(f8e4m3_to_f32(0xFF)));
  EXPECT_EQ(f8e4m3_to_f32(0x7E), 448.0f);
}

TEST(DTypeConvert, NaNStaysNaNNeverInf) {
  // NaNs whose payload would round (or truncate) to the Inf pattern must stay NaN.
  const std::uint32_t payloads[] = {0x7F80'0001u, 0x7F80'7FFFu, 0x7F80'8000u, 0x7FBF'FFFFu, 0x7FC0'0000u, 0x7FFF'FFFFu};
  for (std::uint32_t p : payloads) {
    for (std::uint32_t sign : {0u, 0x8000'0000u}) {
      const float nan = std::bit_cast<float>(p | sign);
      const bool neg = sign != 0;
      for (const Format* f : testref::kFormats) {
        const testref::Rounded want{true, neg, 0};
        EXPECT_TRUE(testref::matches(*f, testref::impl_encode(*f, nan), want)) << f->name << std::hex << " 0x" << p;
        EXPECT_TRUE(testref::matches(*f, testref::impl_encode64(*f, static_cast<double>(nan)), want)) << f->name;
      }
      // Quiet: the top mantissa bit is set.
      EXPECT_NE(f32_to_bf16(nan) & 0x0040u, 0u);
      EXPECT_NE(f32_to_f16(nan) & 0x0200u, 0u);
      EXPECT_NE(f32_to_f8e5m2(nan) & 0x02u, 0u);
    }
  }
  // Signalling NaN patterns decode to quiet NaNs of the same sign.
  EXPECT_NE(std::bit_cast<std::uint32_t>(bf16_to_f32(0x7F81)) & 0x0040'0000u, 0u);
  EXPECT_NE(std::bit_cast<std::uint32_t>(f16_to_f32(0xFC01)) & 0x0040'0000u, 0u);
  EXPECT_TRUE(std::signbit(f16_to_f32(0xFC01)));
}

}  // namespace
}  // namespace taskvec
