// The conversions under test, looked up by format, so one test body covers BF16, F16 and both fp8s.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "dtype_reference.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec::testref {

inline float impl_decode(const Format& f, std::uint32_t bits) {
  switch (f.dtype) {
    case DType::kBF16: return bf16_to_f32(static_cast<std::uint16_t>(bits));
    case DType::kF16: return f16_to_f32(static_cast<std::uint16_t>(bits));
    case DType::kF8E4M3: return f8e4m3_to_f32(static_cast<std::uint8_t>(bits));
    default: return f8e5m2_to_f32(static_cast<std::uint8_t>(bits));
  }
}

inline std::uint32_t impl_encode(const Format& f, float v) {
  switch (f.dtype) {
    case DType::kBF16: return f32_to_bf16(v);
    case DType::kF16: return f32_to_f16(v);
    case DType::kF8E4M3: return f32_to_f8e4m3(v);
    default: return f32_to_f8e5m2(v);
  }
}

inline std::uint32_t impl_encode64(const Format& f, double v) {
  switch (f.dtype) {
    case DType::kBF16: return f64_to_bf16(v);
    case DType::kF16: return f64_to_f16(v);
    case DType::kF8E4M3: return f64_to_f8e4m3(v);
    default: return f64_to_f8e5m2(v);
  }
}

// Bulk versions, one element, to check they agree with the scalar ones.
inline std::uint32_t bulk_encode(const Format& f, float v) {
  std::byte out[2]{};
  encode_from_f32(f.dtype, &v, out, 1);
  std::uint32_t bits = std::to_integer<std::uint32_t>(out[0]);
  if (f.exp_bits + f.man_bits == 15) bits |= std::to_integer<std::uint32_t>(out[1]) << 8;
  return bits;
}
inline std::uint32_t bulk_encode64(const Format& f, double v) {
  std::byte out[2]{};
  encode_from_f64(f.dtype, &v, out, 1);
  std::uint32_t bits = std::to_integer<std::uint32_t>(out[0]);
  if (f.exp_bits + f.man_bits == 15) bits |= std::to_integer<std::uint32_t>(out[1]) << 8;
  return bits;
}

// A result matches a reference rounding: same pattern, or for NaN any NaN of the same sign.
inline bool matches(const Format& f, std::uint32_t got, const Rounded& want) {
  if (want.nan) return f.is_nan(got) && ((got & f.sign_bit()) != 0) == want.negative;
  return got == want.bits;
}

inline const Format* const kFormats[] = {&kBF16, &kF16, &kE4M3, &kE5M2};

}  // namespace taskvec::testref
