// Conversions between the editable float dtypes and f32 / f64 (policy: include/taskvec/dtype.hpp and
// docs/NUMERICS.md).
//
// Two kinds of code live here:
//  - Fast paths for f32 <-> BF16 / F16: branch-free integer bit manipulation (selects, no branches,
//    no tables) so that the bulk loops below auto-vectorize. Checked with `-fopt-info-vec` (GCC 12,
//    -O2 and -O3, x86-64 baseline SSE2: 16-byte vectors; -march=native: 32-byte vectors): the BF16
//    and F16 loops of decode_to_f32 / encode_from_f32 (decode16 / encode16) report "loop vectorized".
//  - One generic rounding routine from f64 to any narrow format (round_from_f64), written for
//    clarity over speed. It serves every f64 source (rounding once, straight to the target) and the
//    fp8 targets from f32 (f32 -> f64 is exact, so rounding from the widened value is rounding once).
// Both assume the default floating-point environment (round to nearest, no flush-to-zero of results).
#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <cstring>
#include <string>

#include "base/simd_clones.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

// ---- little-endian loads and stores at any alignment ----

constexpr bool kBigEndian = std::endian::native == std::endian::big;

inline std::uint16_t swap16(std::uint16_t v) noexcept { return static_cast<std::uint16_t>((v >> 8) | (v << 8)); }
inline std::uint32_t swap32(std::uint32_t v) noexcept {
  return (v >> 24) | ((v >> 8) & 0xFF00u) | ((v << 8) & 0xFF0000u) | (v << 24);
}
inline std::uint64_t swap64(std::uint64_t v) noexcept {
  return (static_cast<std::uint64_t>(swap32(static_cast<std::uint32_t>(v))) << 32) | swap32(static_cast<std::uint32_t>(v >> 32));
}

inline std::uint16_t load_u16(const std::byte* p) noexcept {
  std::uint16_t v;
  std::memcpy(&v, p, sizeof v);
  v = kBigEndian ? swap16(v) : v;
  return v;
}
inline void store_u16(std::byte* p, std::uint16_t v) noexcept {
  v = kBigEndian ? swap16(v) : v;
  std::memcpy(p, &v, sizeof v);
}
inline float load_f32(const std::byte* p) noexcept {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  v = kBigEndian ? swap32(v) : v;
  return std::bit_cast<float>(v);
}
inline void store_f32(std::byte* p, float f) noexcept {
  auto v = std::bit_cast<std::uint32_t>(f);
  v = kBigEndian ? swap32(v) : v;
  std::memcpy(p, &v, sizeof v);
}
inline double load_f64(const std::byte* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  v = kBigEndian ? swap64(v) : v;
  return std::bit_cast<double>(v);
}
inline void store_f64(std::byte* p, double d) noexcept {
  auto v = std::bit_cast<std::uint64_t>(d);
  v = kBigEndian ? swap64(v) : v;
  std::memcpy(p, &v, sizeof v);
}

// ---- fast, branch-free f32 <-> BF16 / F16 ----

// All-ones when `condition` holds, else zero: selects written as masks stay branch-free at -O2, where
// GCC would otherwise turn some ?: chains into branches and give up vectorizing.
constexpr std::uint32_t mask_if(bool condition) noexcept { return 0u - static_cast<std::uint32_t>(condition); }
constexpr std::uint32_t select(std::uint32_t mask, std::uint32_t if_set, std::uint32_t if_clear) noexcept {
  return (if_set & mask) | (if_clear & ~mask);
}

constexpr float bf16_decode(std::uint16_t bits) noexcept {
  // A signalling NaN is quieted (bit 6 = the top mantissa bit); everything else is the top half of
  // an f32, so the decode is exact.
  const std::uint32_t quiet = mask_if((bits & 0x7FFFu) > 0x7F80u) & 0x0040u;
  return std::bit_cast<float>((bits | quiet) << 16);
}

constexpr std::uint16_t bf16_encode(float value) noexcept {
  const auto u = std::bit_cast<std::uint32_t>(value);
  // Round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate. Carries walk into the
  // exponent, so the largest values round to Inf exactly when they are >= max + half an ulp.
  const std::uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const std::uint32_t nan = (u >> 16) | 0x0040u;  // quiet, sign and top payload bits kept
  return static_cast<std::uint16_t>(select(mask_if((u & 0x7FFF'FFFFu) > 0x7F80'0000u), nan, rounded));
}

constexpr float f16_decode(std::uint16_t bits) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t em = bits & 0x7FFFu;
  const std::uint32_t shifted = em << 13;            // exponent and mantissa moved to f32 positions
  const std::uint32_t exp = shifted & 0x0F80'0000u;  // the 5 exponent bits
  std::uint32_t o = shifted + ((127u - 15u) << 23);  // rebias 15 -> 127
  o += mask_if(exp == 0x0F80'0000u) & ((128u - 16u) << 23);  // Inf/NaN: exponent to 255
  o |= mask_if(em > 0x7C00u) & 0x0040'0000u;                  // NaN: quiet
  // Zero and subnormals: 2^-14 * (1 + m/1024) - 2^-14 = m * 2^-24, exact, no f32 subnormal involved.
  const float sub = std::bit_cast<float>(o + (1u << 23)) - std::bit_cast<float>(113u << 23);
  o = select(mask_if(exp == 0), std::bit_cast<std::uint32_t>(sub), o);
  return std::bit_cast<float>(o | sign);
}

constexpr std::uint16_t f16_encode(float value) noexcept {
  const auto u = std::bit_cast<std::uint32_t>(value);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7FFF'FFFFu;
  // Normal results: rebias 127 -> 15 and round to nearest even at bit 13 (carries reach Inf).
  std::uint32_t normal = a - (112u << 23);
  normal = (normal + 0x0FFFu + ((normal >> 13) & 1u)) >> 13;
  // Subnormal results (|x| < 2^-14): adding 0.5f puts one f16 subnormal ulp (2^-24) at the last bit of
  // the f32 sum, so the hardware's round-to-nearest-even addition does the rounding.
  const std::uint32_t sub = std::bit_cast<std::uint32_t>(std::bit_cast<float>(a) + 0.5f) - 0x3F00'0000u;
  std::uint32_t r = select(mask_if(a < 0x3880'0000u), sub, normal);
  r = select(mask_if(a >= 0x4780'0000u), 0x7C00u, r);                           // >= 2^16 (and Inf): Inf
  r = select(mask_if(a > 0x7F80'0000u), 0x7E00u | ((a >> 13) & 0x03FFu), r);  // NaN: quiet, payload top kept
  return static_cast<std::uint16_t>(sign | r);
}

// ---- generic, clear rounding from f64 to a narrow float format ----

// E exponent bits, M mantissa bits. kFiniteOnly: the OCP "FN" flavour (E4M3): no Inf, the all-ones
// pattern is the only NaN and the rest of the top binade holds finite values; overflow saturates.
template <int E, int M, bool kFiniteOnly>
constexpr std::uint32_t round_from_f64(double value) noexcept {
  constexpr int kBias = (1 << (E - 1)) - 1;
  constexpr std::uint32_t kExpOnes = (1u << E) - 1u;
  constexpr std::uint32_t kInf = kExpOnes << M;
  constexpr std::uint32_t kMantMask = (1u << M) - 1u;
  constexpr std::uint32_t kMaxFinite = kFiniteOnly ? (kInf | (kMantMask - 1u)) : kInf - 1u;
  constexpr std::uint32_t kOverflow = kFiniteOnly ? kMaxFinite : kInf;
  constexpr int kEmin = 1 - kBias;  // exponent of the smallest normal
  constexpr int kEmax = static_cast<int>(kFiniteOnly ? kExpOnes : kExpOnes - 1u) - kBias;
  constexpr std::uint64_t kFrac = (std::uint64_t{1} << 52) - 1u;

  const auto u = std::bit_cast<std::uint64_t>(value);
  const std::uint32_t sign = static_cast<std::uint32_t>(u >> 63) << (E + M);
  const std::uint64_t a = u & 0x7FFF'FFFF'FFFF'FFFFull;
  if (a > 0x7FF0'0000'0000'0000ull) {  // NaN
    if constexpr (kFiniteOnly) {
      return sign | kInf | kMantMask;
    } else {
      return sign | kInf | (1u << (M - 1)) | static_cast<std::uint32_t>((a & kFrac) >> (52 - M));
    }
  }
  if (a == 0x7FF0'0000'0000'0000ull) return sign | kOverflow;
  const int biased = static_cast<int>(a >> 52);
  if (biased == 0) return sign;  // zero or an f64 subnormal: far below half the smallest target value
  const int x = biased - 1023;
  if (x > kEmax) return sign | kOverflow;

  // The value is mant * 2^(x - 52); express it in units of the target ulp at exponent max(x, kEmin).
  const std::uint64_t mant = (a & kFrac) | (std::uint64_t{1} << 52);
  const int shift = 52 - M + (x < kEmin ? kEmin - x : 0);
  if (shift > 54) return sign;  // below a quarter of the smallest subnormal: rounds to zero
  const std::uint64_t rem = mant & ((std::uint64_t{1} << shift) - 1u);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  std::uint64_t q = mant >> shift;
  q += (rem > half || (rem == half && (q & 1u))) ? 1u : 0u;
  // Normal: exponent field (x + bias) plus the mantissa; a rounding carry (q == 2^(M+1)) moves to the
  // next binade by itself. Subnormal: q is the pattern (q == 2^M is the smallest normal).
  std::uint64_t bits = x < kEmin ? q : (static_cast<std::uint64_t>(x + kBias) << M) + q - (std::uint64_t{1} << M);
  if (bits > kMaxFinite) bits = kOverflow;
  return sign | static_cast<std::uint32_t>(bits);
}

// ---- fp8 decoding tables ----

constexpr float e4m3_decode_slow(std::uint8_t b) noexcept {
  const std::uint32_t sign = (b & 0x80u) ? 0x8000'0000u : 0u;
  const std::uint32_t e = (b >> 3) & 0xFu;
  std::uint32_t m = b & 0x7u;
  if (e == 15 && m == 7) return std::bit_cast<float>(sign | 0x7FC0'0000u);
  if (e == 0) {
    if (m == 0) return std::bit_cast<float>(sign);
    // m * 2^-9: normalise the 3-bit mantissa.
    int shift = 0;
    while ((m & 0x8u) == 0) {
      m <<= 1;
      ++shift;
    }
    const auto exp32 = static_cast<std::uint32_t>(-6 - shift + 127);
    return std::bit_cast<float>(sign | (exp32 << 23) | ((m & 0x7u) << 20));
  }
  return std::bit_cast<float>(sign | ((e - 7u + 127u) << 23) | (m << 20));
}

constexpr std::array<float, 256> make_e4m3_table() {
  std::array<float, 256> t{};
  for (unsigned i = 0; i < 256; ++i) t[i] = e4m3_decode_slow(static_cast<std::uint8_t>(i));
  return t;
}
// E5M2 is the top byte of an F16.
constexpr std::array<float, 256> make_e5m2_table() {
  std::array<float, 256> t{};
  for (unsigned i = 0; i < 256; ++i) t[i] = f16_decode(static_cast<std::uint16_t>(i << 8));
  return t;
}
constexpr std::array<float, 256> kE4M3Table = make_e4m3_table();
constexpr std::array<float, 256> kE5M2Table = make_e5m2_table();

[[noreturn]] void throw_unsupported(const char* function, DType dtype) {
  throw Error(ErrorCode::kUnsupported, std::string(function) + ": dtype " + std::string(dtype_name(dtype)) +
                                           " cannot be converted (editable dtypes: F16, BF16, F32, F64, "
                                           "F8_E4M3, F8_E5M2)");
}

void require_editable(const char* function, DType dtype) {
  if (static_cast<std::size_t>(dtype) >= kDTypeCount) {
    throw Error(ErrorCode::kUnsupported,
                std::string(function) + ": invalid dtype value " + std::to_string(static_cast<int>(dtype)));
  }
  if (!dtype_is_editable(dtype)) throw_unsupported(function, dtype);
}

// ---- bulk kernels ----
// The BF16 / F16 kernels run in fixed blocks of kBlock elements plus a scalar tail: GCC's -O2 cost
// model ("very cheap") only vectorizes loops whose trip count needs no epilogue, and the fixed inner
// loop qualifies. __restrict on the parameters spares the runtime overlap checks (callers never pass
// overlapping buffers). Verified with -fopt-info-vec at -O2 and -O3: the inner loops of decode16 and
// encode16 are "loop vectorized using 16 byte vectors" for both BF16 and F16.
constexpr std::size_t kBlock = 16;

template <float (*Decode)(std::uint16_t) noexcept>
void decode16(const std::byte* __restrict s, float* __restrict d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (std::size_t j = 0; j < kBlock; ++j) d[i + j] = Decode(load_u16(s + 2 * (i + j)));
  }
  for (; i < n; ++i) d[i] = Decode(load_u16(s + 2 * i));
}

template <std::uint16_t (*Encode)(float) noexcept>
void encode16(const float* __restrict s, std::byte* __restrict d, std::size_t n) noexcept {
  std::size_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    for (std::size_t j = 0; j < kBlock; ++j) store_u16(d + 2 * (i + j), Encode(s[i + j]));
  }
  for (; i < n; ++i) store_u16(d + 2 * i, Encode(s[i]));
}

// The BF16 / F16 kernels once more, each as one function compiled for the baseline and for AVX2
// (8 lanes instead of 4). Integer operations and one f32 addition (F16 subnormals), no FMA: every
// clone gives the same bytes (base/simd_clones.hpp). `flatten` inlines the element codecs into each clone.
TASKVEC_SIMD_CLONES __attribute__((flatten)) void decode_bf16(const std::byte* __restrict s, float* __restrict d,
                                                             std::size_t n) noexcept {
  decode16<bf16_decode>(s, d, n);
}
TASKVEC_SIMD_CLONES __attribute__((flatten)) void encode_bf16(const float* __restrict s, std::byte* __restrict d,
                                                             std::size_t n) noexcept {
  encode16<bf16_encode>(s, d, n);
}
TASKVEC_SIMD_CLONES __attribute__((flatten)) void decode_f16(const std::byte* __restrict s, float* __restrict d,
                                                            std::size_t n) noexcept {
  decode16<f16_decode>(s, d, n);
}
TASKVEC_SIMD_CLONES __attribute__((flatten)) void encode_f16(const float* __restrict s, std::byte* __restrict d,
                                                            std::size_t n) noexcept {
  encode16<f16_encode>(s, d, n);
}

}  // namespace

// ---- scalar ----

float f16_to_f32(std::uint16_t bits) noexcept { return f16_decode(bits); }
std::uint16_t f32_to_f16(float value) noexcept { return f16_encode(value); }
float bf16_to_f32(std::uint16_t bits) noexcept { return bf16_decode(bits); }
std::uint16_t f32_to_bf16(float value) noexcept { return bf16_encode(value); }
float f8e4m3_to_f32(std::uint8_t bits) noexcept { return kE4M3Table[bits]; }
std::uint8_t f32_to_f8e4m3(float value) noexcept {
  return static_cast<std::uint8_t>(round_from_f64<4, 3, true>(static_cast<double>(value)));
}
float f8e5m2_to_f32(std::uint8_t bits) noexcept { return kE5M2Table[bits]; }
std::uint8_t f32_to_f8e5m2(float value) noexcept {
  return static_cast<std::uint8_t>(round_from_f64<5, 2, false>(static_cast<double>(value)));
}

std::uint16_t f64_to_f16(double value) noexcept { return static_cast<std::uint16_t>(round_from_f64<5, 10, false>(value)); }
std::uint16_t f64_to_bf16(double value) noexcept { return static_cast<std::uint16_t>(round_from_f64<8, 7, false>(value)); }
std::uint8_t f64_to_f8e4m3(double value) noexcept { return static_cast<std::uint8_t>(round_from_f64<4, 3, true>(value)); }
std::uint8_t f64_to_f8e5m2(double value) noexcept { return static_cast<std::uint8_t>(round_from_f64<5, 2, false>(value)); }


// __restrict: the byte pointers may alias anything as far as the compiler knows; promising they do
// not lets -O2 vectorize without runtime overlap checks. Callers never pass overlapping buffers.

void decode_to_f32(DType dtype, const std::byte* src, float* dst, std::size_t n) {
  require_editable("decode_to_f32", dtype);
  if (n == 0) return;
  const std::byte* __restrict s = src;
  float* __restrict d = dst;
  switch (dtype) {
    case DType::kBF16:
      decode_bf16(s, d, n);
      return;
    case DType::kF16:
      decode_f16(s, d, n);
      return;
    case DType::kF32:
      if constexpr (kBigEndian) {
        for (std::size_t i = 0; i < n; ++i) d[i] = load_f32(s + 4 * i);
      } else {
        std::memcpy(d, s, n * sizeof(float));
      }
      return;
    case DType::kF64:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<float>(load_f64(s + 8 * i));
      return;
    case DType::kF8E4M3:
      for (std::size_t i = 0; i < n; ++i) d[i] = kE4M3Table[static_cast<std::uint8_t>(s[i])];
      return;
    case DType::kF8E5M2:
      for (std::size_t i = 0; i < n; ++i) d[i] = kE5M2Table[static_cast<std::uint8_t>(s[i])];
      return;
    default:
      throw_unsupported("decode_to_f32", dtype);
  }
}

void encode_from_f32(DType dtype, const float* src, std::byte* dst, std::size_t n) {
  require_editable("encode_from_f32", dtype);
  if (n == 0) return;
  const float* __restrict s = src;
  std::byte* __restrict d = dst;
  switch (dtype) {
    case DType::kBF16:
      encode_bf16(s, d, n);
      return;
    case DType::kF16:
      encode_f16(s, d, n);
      return;
    case DType::kF32:
      if constexpr (kBigEndian) {
        for (std::size_t i = 0; i < n; ++i) store_f32(d + 4 * i, s[i]);
      } else {
        std::memcpy(d, s, n * sizeof(float));
      }
      return;
    case DType::kF64:
      for (std::size_t i = 0; i < n; ++i) store_f64(d + 8 * i, static_cast<double>(s[i]));
      return;
    case DType::kF8E4M3:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<std::byte>(f32_to_f8e4m3(s[i]));
      return;
    case DType::kF8E5M2:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<std::byte>(f32_to_f8e5m2(s[i]));
      return;
    default:
      throw_unsupported("encode_from_f32", dtype);
  }
}

void decode_to_f64(DType dtype, const std::byte* src, double* dst, std::size_t n) {
  require_editable("decode_to_f64", dtype);
  if (n == 0) return;
  const std::byte* __restrict s = src;
  double* __restrict d = dst;
  switch (dtype) {
    case DType::kBF16:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<double>(bf16_decode(load_u16(s + 2 * i)));
      return;
    case DType::kF16:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<double>(f16_decode(load_u16(s + 2 * i)));
      return;
    case DType::kF32:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<double>(load_f32(s + 4 * i));
      return;
    case DType::kF64:
      if constexpr (kBigEndian) {
        for (std::size_t i = 0; i < n; ++i) d[i] = load_f64(s + 8 * i);
      } else {
        std::memcpy(d, s, n * sizeof(double));
      }
      return;
    case DType::kF8E4M3:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<double>(kE4M3Table[static_cast<std::uint8_t>(s[i])]);
      return;
    case DType::kF8E5M2:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<double>(kE5M2Table[static_cast<std::uint8_t>(s[i])]);
      return;
    default:
      throw_unsupported("decode_to_f64", dtype);
  }
}

void encode_from_f64(DType dtype, const double* src, std::byte* dst, std::size_t n) {
  require_editable("encode_from_f64", dtype);
  if (n == 0) return;
  const double* __restrict s = src;
  std::byte* __restrict d = dst;
  switch (dtype) {
    case DType::kBF16:
      for (std::size_t i = 0; i < n; ++i) store_u16(d + 2 * i, f64_to_bf16(s[i]));
      return;
    case DType::kF16:
      for (std::size_t i = 0; i < n; ++i) store_u16(d + 2 * i, f64_to_f16(s[i]));
      return;
    case DType::kF32:
      // The hardware conversion rounds to nearest even (subnormals and overflow to Inf included) and
      // keeps NaN a quiet NaN of the same sign.
      for (std::size_t i = 0; i < n; ++i) store_f32(d + 4 * i, static_cast<float>(s[i]));
      return;
    case DType::kF64:
      if constexpr (kBigEndian) {
        for (std::size_t i = 0; i < n; ++i) store_f64(d + 8 * i, s[i]);
      } else {
        std::memcpy(d, s, n * sizeof(double));
      }
      return;
    case DType::kF8E4M3:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<std::byte>(f64_to_f8e4m3(s[i]));
      return;
    case DType::kF8E5M2:
      for (std::size_t i = 0; i < n; ++i) d[i] = static_cast<std::byte>(f64_to_f8e5m2(s[i]));
      return;
    default:
      throw_unsupported("encode_from_f64", dtype);
  }
}

// ---- overflow ----
// Rounding to nearest even overflows exactly from max + half an ulp on for the IEEE-like formats (the
// largest mantissa is odd, so the tie goes up to Inf); F8_E4M3's largest mantissa (1.110) is even, so
// 464 itself still rounds to 448 and only values beyond it overflow. Every threshold below is exact in f32.
namespace {

struct OverflowRule {
  bool applies = false;  // false: the dtype holds every finite value of the source type (F64, or none)
  double threshold = 0;  // |x| >= threshold (inclusive) or > threshold
  bool inclusive = true;
};

OverflowRule overflow_rule(DType dtype) noexcept {
  switch (dtype) {
    case DType::kF16: return {true, 65520.0, true};
    case DType::kBF16: return {true, std::ldexp(2.0 - std::ldexp(1.0, -8), 127), true};
    case DType::kF32: return {true, std::ldexp(2.0 - std::ldexp(1.0, -24), 127), true};
    case DType::kF8E5M2: return {true, 61440.0, true};
    case DType::kF8E4M3: return {true, 464.0, false};
    default: return {};
  }
}

// Integer compare of |x|'s bits: for non-negative floats the bit order is the value order; Inf/NaN
// (exponent all ones) are excluded. An OR over fixed blocks, so the inner loop vectorizes.
constexpr std::size_t kScanBlock = 64;

TASKVEC_SIMD_CLONES std::size_t find_at_least_f32(const float* __restrict v, std::size_t n, std::uint32_t low) noexcept {
  std::size_t i = 0;
  for (; i + kScanBlock <= n; i += kScanBlock) {
    std::uint32_t hit = 0;
    for (std::size_t j = 0; j < kScanBlock; ++j) {
      const std::uint32_t a = std::bit_cast<std::uint32_t>(v[i + j]) & 0x7FFF'FFFFu;
      hit |= static_cast<std::uint32_t>(a >= low) & static_cast<std::uint32_t>(a < 0x7F80'0000u);
    }
    if (hit != 0) break;
  }
  for (; i < n; ++i) {
    const std::uint32_t a = std::bit_cast<std::uint32_t>(v[i]) & 0x7FFF'FFFFu;
    if (a >= low && a < 0x7F80'0000u) return i;
  }
  return n;
}

std::size_t find_at_least_f64(const double* __restrict v, std::size_t n, std::uint64_t low) noexcept {
  std::size_t i = 0;
  for (; i + kScanBlock <= n; i += kScanBlock) {
    std::uint64_t hit = 0;
    for (std::size_t j = 0; j < kScanBlock; ++j) {
      const std::uint64_t a = std::bit_cast<std::uint64_t>(v[i + j]) & 0x7FFF'FFFF'FFFF'FFFFull;
      hit |= static_cast<std::uint64_t>(a >= low) & static_cast<std::uint64_t>(a < 0x7FF0'0000'0000'0000ull);
    }
    if (hit != 0) break;
  }
  for (; i < n; ++i) {
    const std::uint64_t a = std::bit_cast<std::uint64_t>(v[i]) & 0x7FFF'FFFF'FFFF'FFFFull;
    if (a >= low && a < 0x7FF0'0000'0000'0000ull) return i;
  }
  return n;
}

template <typename T>
std::size_t clamp_impl(DType dtype, T* v, std::size_t n) noexcept {
  const OverflowRule rule = overflow_rule(dtype);
  if (!rule.applies) return 0;
  const T max = static_cast<T>(dtype_max_finite(dtype));
  std::size_t clamped = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (overflows_dtype(dtype, static_cast<double>(v[i]))) {
      v[i] = std::signbit(v[i]) ? -max : max;
      ++clamped;
    }
  }
  return clamped;
}

}  // namespace

double dtype_max_finite(DType dtype) {
  switch (dtype) {
    case DType::kF16: return 65504.0;
    case DType::kBF16: return std::ldexp(2.0 - std::ldexp(1.0, -7), 127);
    case DType::kF32: return static_cast<double>(std::numeric_limits<float>::max());
    case DType::kF64: return std::numeric_limits<double>::max();
    case DType::kF8E4M3: return 448.0;
    case DType::kF8E5M2: return 57344.0;
    default: throw_unsupported("dtype_max_finite", dtype);
  }
}

bool overflows_dtype(DType dtype, double value) noexcept {
  const OverflowRule rule = overflow_rule(dtype);
  if (!rule.applies || !std::isfinite(value)) return false;
  const double a = std::fabs(value);
  return rule.inclusive ? a >= rule.threshold : a > rule.threshold;
}

std::size_t find_overflow(DType dtype, const float* src, std::size_t n) noexcept {
  const OverflowRule rule = overflow_rule(dtype);
  if (!rule.applies || dtype == DType::kF32 || n == 0) return n;  // an f32 is always an f32
  auto low = std::bit_cast<std::uint32_t>(static_cast<float>(rule.threshold));
  if (!rule.inclusive) ++low;  // the next f32 above the threshold
  return find_at_least_f32(src, n, low);
}

std::size_t find_overflow(DType dtype, const double* src, std::size_t n) noexcept {
  const OverflowRule rule = overflow_rule(dtype);
  if (!rule.applies || n == 0) return n;
  auto low = std::bit_cast<std::uint64_t>(rule.threshold);
  if (!rule.inclusive) ++low;
  return find_at_least_f64(src, n, low);
}

std::size_t clamp_overflow(DType dtype, float* src, std::size_t n) noexcept { return clamp_impl(dtype, src, n); }
std::size_t clamp_overflow(DType dtype, double* src, std::size_t n) noexcept { return clamp_impl(dtype, src, n); }

}  // namespace taskvec
