// The bulk conversions equal the scalar ones element by element, on random bit patterns (NaNs
// included), odd lengths and unaligned byte pointers; non-editable dtypes throw kUnsupported.
#include <gtest/gtest.h>

#include <bit>
#include <cstring>
#include <random>
#include <vector>

#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

constexpr DType kEditable[] = {DType::kF16, DType::kBF16, DType::kF32, DType::kF64, DType::kF8E4M3, DType::kF8E5M2};
constexpr std::size_t kLengths[] = {1, 3, 7, 15, 17, 31, 33, 255, 1001, 4097};

std::uint64_t load_le(const std::byte* p, std::size_t width) {
  std::uint64_t v = 0;
  for (std::size_t b = 0; b < width; ++b) v |= std::to_integer<std::uint64_t>(p[b]) << (8 * b);
  return v;
}

// The scalar reference for one element of each dtype.
float scalar_decode(DType dtype, std::uint64_t bits) {
  switch (dtype) {
    case DType::kF16: return f16_to_f32(static_cast<std::uint16_t>(bits));
    case DType::kBF16: return bf16_to_f32(static_cast<std::uint16_t>(bits));
    case DType::kF32: return std::bit_cast<float>(static_cast<std::uint32_t>(bits));
    case DType::kF64: return static_cast<float>(std::bit_cast<double>(bits));
    case DType::kF8E4M3: return f8e4m3_to_f32(static_cast<std::uint8_t>(bits));
    default: return f8e5m2_to_f32(static_cast<std::uint8_t>(bits));
  }
}
std::uint64_t scalar_encode(DType dtype, float v) {
  switch (dtype) {
    case DType::kF16: return f32_to_f16(v);
    case DType::kBF16: return f32_to_bf16(v);
    case DType::kF32: return std::bit_cast<std::uint32_t>(v);
    case DType::kF64: return std::bit_cast<std::uint64_t>(static_cast<double>(v));
    case DType::kF8E4M3: return f32_to_f8e4m3(v);
    default: return f32_to_f8e5m2(v);
  }
}
std::uint64_t scalar_encode64(DType dtype, double v) {
  switch (dtype) {
    case DType::kF16: return f64_to_f16(v);
    case DType::kBF16: return f64_to_bf16(v);
    case DType::kF32: return std::bit_cast<std::uint32_t>(static_cast<float>(v));
    case DType::kF64: return std::bit_cast<std::uint64_t>(v);
    case DType::kF8E4M3: return f64_to_f8e4m3(v);
    default: return f64_to_f8e5m2(v);
  }
}

class Bulk : public ::testing::TestWithParam<DType> {};

TEST_P(Bulk, DecodeEqualsScalar) {
  const DType dtype = GetParam();
  const std::size_t width = dtype_bits(dtype) / 8;
  std::mt19937_64 rng(17);
  for (std::size_t n : kLengths) {
    for (std::size_t offset = 0; offset < 8; ++offset) {
      std::vector<std::byte> buf(offset + n * width + 8);
      for (auto& b : buf) b = static_cast<std::byte>(rng());
      const std::byte* src = buf.data() + offset;
      std::vector<float> f32(n + 1, -1.0f);
      std::vector<double> f64(n + 1, -1.0);
      decode_to_f32(dtype, src, f32.data(), n);
      decode_to_f64(dtype, src, f64.data(), n);
      for (std::size_t i = 0; i < n; ++i) {
        const std::uint64_t bits = load_le(src + i * width, width);
        const float want = scalar_decode(dtype, bits);
        ASSERT_EQ(std::bit_cast<std::uint32_t>(f32[i]), std::bit_cast<std::uint32_t>(want))
            << dtype_name(dtype) << " n=" << n << " offset=" << offset << " i=" << i;
        const double want64 = dtype == DType::kF64 ? std::bit_cast<double>(bits) : static_cast<double>(want);
        ASSERT_EQ(std::bit_cast<std::uint64_t>(f64[i]), std::bit_cast<std::uint64_t>(want64))
            << dtype_name(dtype) << " n=" << n << " offset=" << offset << " i=" << i;
      }
      EXPECT_EQ(f32[n], -1.0f) << "wrote past the end";
      EXPECT_EQ(f64[n], -1.0) << "wrote past the end";
    }
  }
}

TEST_P(Bulk, EncodeEqualsScalar) {
  const DType dtype = GetParam();
  const std::size_t width = dtype_bits(dtype) / 8;
  std::mt19937_64 rng(23);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (std::size_t n : kLengths) {
    // Half random bit patterns (NaN, Inf, huge, tiny), half realistic weights.
    std::vector<float> src(n);
    std::vector<double> src64(n);
    for (std::size_t i = 0; i < n; ++i) {
      src[i] = (i % 2) ? normal(rng) : std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
      src64[i] = (i % 2) ? static_cast<double>(normal(rng)) * (1.0 + 0x1p-30) : std::bit_cast<double>(rng());
    }
    for (std::size_t offset = 0; offset < 8; ++offset) {
      std::vector<std::byte> out(offset + n * width + 8, std::byte{0xA5});
      std::vector<std::byte> out64(offset + n * width + 8, std::byte{0xA5});
      encode_from_f32(dtype, src.data(), out.data() + offset, n);
      encode_from_f64(dtype, src64.data(), out64.data() + offset, n);
      for (std::size_t i = 0; i < n; ++i) {
        ASSERT_EQ(load_le(out.data() + offset + i * width, width), scalar_encode(dtype, src[i]))
            << dtype_name(dtype) << " n=" << n << " offset=" << offset << " i=" << i;
        ASSERT_EQ(load_le(out64.data() + offset + i * width, width), scalar_encode64(dtype, src64[i]))
            << dtype_name(dtype) << " n=" << n << " offset=" << offset << " i=" << i;
      }
      for (std::size_t b = 0; b < offset; ++b) EXPECT_EQ(out[b], std::byte{0xA5}) << "wrote before the start";
      for (std::size_t b = offset + n * width; b < out.size(); ++b) EXPECT_EQ(out[b], std::byte{0xA5}) << "wrote past the end";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Editable, Bulk, ::testing::ValuesIn(kEditable),
                         [](const auto& info) {
                           std::string name(dtype_name(info.param));
                           std::erase(name, '_');
                           return name;
                         });

TEST(Bulk, ZeroLengthIsANoOp) {
  for (DType dtype : kEditable) {
    EXPECT_NO_THROW(decode_to_f32(dtype, nullptr, nullptr, 0));
    EXPECT_NO_THROW(encode_from_f32(dtype, nullptr, nullptr, 0));
    EXPECT_NO_THROW(decode_to_f64(dtype, nullptr, nullptr, 0));
    EXPECT_NO_THROW(encode_from_f64(dtype, nullptr, nullptr, 0));
  }
}

template <class Fn>
void expect_unsupported(Fn fn, DType dtype) {
  try {
    fn();
    ADD_FAILURE() << "no exception for " << dtype_name(dtype);
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kUnsupported);
    EXPECT_NE(std::string(e.what()).find(std::string(dtype_name(dtype))), std::string::npos) << e.what();
  }
}

TEST(Bulk, NonEditableDTypesThrowUnsupported) {
  std::byte bytes[64]{};
  float f32[8]{};
  double f64[8]{};
  for (std::size_t i = 0; i < kDTypeCount; ++i) {
    const auto dtype = static_cast<DType>(i);
    if (dtype_is_editable(dtype)) continue;
    for (std::size_t n : {std::size_t{0}, std::size_t{4}}) {
      expect_unsupported([&] { decode_to_f32(dtype, bytes, f32, n); }, dtype);
      expect_unsupported([&] { encode_from_f32(dtype, f32, bytes, n); }, dtype);
      expect_unsupported([&] { decode_to_f64(dtype, bytes, f64, n); }, dtype);
      expect_unsupported([&] { encode_from_f64(dtype, f64, bytes, n); }, dtype);
    }
  }
}

}  // namespace
}  // namespace taskvec
