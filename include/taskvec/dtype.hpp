// taskvec: tensor element types (the safetensors dtype set) and conversions to and from f32 / f64.
//
// Conversions follow IEEE 754 binary16 (F16), bfloat16 (BF16, the top 16 bits of binary32) and the
// OCP 8-bit floating point spec v1.0 (F8_E4M3 = "E4M3FN": no infinities, S.1111.111 is NaN, max 448;
// F8_E5M2: IEEE-like with infinities, max 57344). Narrowing rounds to nearest, ties to even; NaN stays
// NaN (quiet, sign kept); out-of-range values become Inf for F16/BF16/F8_E5M2 and saturate to +-448
// for F8_E4M3 (which has no Inf). docs/NUMERICS.md has the whole policy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace taskvec {

/// Every dtype a safetensors header may name (FORMAT-RULES.md B9). Only the "editable" ones
/// (dtype_is_editable) take part in arithmetic; the others are copied through unchanged.
enum class DType : std::uint8_t {
  kBool, kU8, kI8, kU16, kI16, kU32, kI32, kU64, kI64,
  kF16, kBF16, kF32, kF64,
  kF8E4M3, kF8E5M2,
  kF8E8M0, kF8E4M3FNUZ, kF8E5M2FNUZ, kF4, kF6E2M3, kF6E3M2, kC64,
  kCount  // keep last: tables keyed by DType static_assert on it
};
inline constexpr std::size_t kDTypeCount = static_cast<std::size_t>(DType::kCount);

/// The safetensors spelling, e.g. "BF16", "F8_E4M3".
std::string_view dtype_name(DType dtype) noexcept;
/// Parses the exact safetensors spelling (case-sensitive); nullopt for an unknown string.
std::optional<DType> parse_dtype(std::string_view name) noexcept;
/// Parses a user-facing spelling, case-insensitive, with aliases: f32/float32/fp32, f16/float16/
/// fp16/half, bf16/bfloat16, f64/float64/double, f8_e4m3/fp8_e4m3, f8_e5m2/fp8_e5m2.
std::optional<DType> parse_dtype_user(std::string_view name) noexcept;
/// Size of one element in bits (BOOL 8, F4 4, F6_* 6, C64 64, ...).
unsigned dtype_bits(DType dtype) noexcept;
/// True for F16, BF16, F32, F64, F8_E4M3, F8_E5M2: the dtypes taskvec decodes, combines and encodes.
bool dtype_is_editable(DType dtype) noexcept;
/// True for the float dtypes a merge may write: F16, BF16, F32, F64, F8_E4M3, F8_E5M2.
inline bool dtype_is_writable_float(DType dtype) noexcept { return dtype_is_editable(dtype); }

// ---- scalar conversions (bit patterns in, bit patterns out) ----
float f16_to_f32(std::uint16_t bits) noexcept;
std::uint16_t f32_to_f16(float value) noexcept;
float bf16_to_f32(std::uint16_t bits) noexcept;
std::uint16_t f32_to_bf16(float value) noexcept;
float f8e4m3_to_f32(std::uint8_t bits) noexcept;
std::uint8_t f32_to_f8e4m3(float value) noexcept;
float f8e5m2_to_f32(std::uint8_t bits) noexcept;
std::uint8_t f32_to_f8e5m2(float value) noexcept;
// Straight from f64, rounding once (no double rounding through f32). Same NaN/Inf/saturation policy.
std::uint16_t f64_to_f16(double value) noexcept;
std::uint16_t f64_to_bf16(double value) noexcept;
std::uint8_t f64_to_f8e4m3(double value) noexcept;
std::uint8_t f64_to_f8e5m2(double value) noexcept;

// ---- bulk conversions of little-endian tensor bytes (the hot path; vectorizable loops) ----
/// Decodes n elements of an editable dtype from `src` (n * dtype_bits/8 bytes, any alignment) into
/// f32. F64 is narrowed with round-to-nearest-even. Throws Error{kUnsupported} for other dtypes.
void decode_to_f32(DType dtype, const std::byte* src, float* dst, std::size_t n);
/// Encodes n f32 values into an editable dtype at `dst` (any alignment), rounding as above.
void encode_from_f32(DType dtype, const float* src, std::byte* dst, std::size_t n);
/// Decodes n elements of an editable dtype into f64 (exact for every editable dtype).
void decode_to_f64(DType dtype, const std::byte* src, double* dst, std::size_t n);
/// Encodes n f64 values into an editable dtype, rounding once, straight from f64 to the target
/// (round to nearest even; no double rounding through f32).
void encode_from_f64(DType dtype, const double* src, std::byte* dst, std::size_t n);

// ---- overflow of a narrowing encode (docs/NUMERICS.md, "Overflow") ----
/// The largest finite value of an editable dtype: F16 65504, BF16 3.3895314e38, F32 3.4028235e38,
/// F64 1.797...e308, F8_E4M3 448, F8_E5M2 57344. Throws Error{kUnsupported} for other dtypes.
double dtype_max_finite(DType dtype);
/// True when the finite `value` is beyond what `dtype` holds: encoding it would give Inf (F16, BF16,
/// F32, F8_E5M2: |value| >= max + half an ulp) or, for F8_E4M3 (no Inf), a value the encoder saturates
/// to 448 although it rounds past it (|value| > 464). NaN and +-Inf: false (they are not overflow).
/// F64: always false. Non-editable dtypes: false.
bool overflows_dtype(DType dtype, double value) noexcept;
/// Index of the first element of src[0, n) that overflows_dtype(dtype, .), or n when there is none.
/// Vectorized (an integer OR-reduction per block; no work per element beyond it on the clean path).
std::size_t find_overflow(DType dtype, const float* src, std::size_t n) noexcept;
std::size_t find_overflow(DType dtype, const double* src, std::size_t n) noexcept;
/// Saturates every element of src[0, n) that overflows_dtype(dtype, .) to +-dtype_max_finite(dtype)
/// (sign kept) in place; NaN/Inf are left alone. Returns how many elements were clamped.
std::size_t clamp_overflow(DType dtype, float* src, std::size_t n) noexcept;
std::size_t clamp_overflow(DType dtype, double* src, std::size_t n) noexcept;

}  // namespace taskvec
