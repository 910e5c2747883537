// Slow, obviously-correct references for the narrow float formats, written from the format
// definitions (sign / exponent / mantissa with std::ldexp) and from "nearest value, ties to even" over
// an explicit sorted list of every finite value. Used only by tests, against the fast code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "taskvec/dtype.hpp"

namespace taskvec::testref {

struct Format {
  const char* name;
  DType dtype;
  int exp_bits;
  int man_bits;
  bool finite_only;  // OCP E4M3 "FN": no Inf, S.1111.111 is NaN, overflow saturates

  int bias() const { return (1 << (exp_bits - 1)) - 1; }
  std::uint32_t exp_ones() const { return (1u << exp_bits) - 1u; }
  std::uint32_t man_ones() const { return (1u << man_bits) - 1u; }
  std::uint32_t sign_bit() const { return 1u << (exp_bits + man_bits); }
  std::uint32_t count() const { return 1u << (1 + exp_bits + man_bits); }
  std::uint32_t max_finite() const {
    return finite_only ? ((exp_ones() << man_bits) | (man_ones() - 1u)) : ((exp_ones() << man_bits) - 1u);
  }
  std::uint32_t inf_bits() const { return exp_ones() << man_bits; }  // IEEE flavour only

  bool is_nan(std::uint32_t bits) const {
    const std::uint32_t mag = bits & (sign_bit() - 1u);
    if (finite_only) return mag == ((exp_ones() << man_bits) | man_ones());
    return (mag >> man_bits) == exp_ones() && (mag & man_ones()) != 0;
  }

  // The value a pattern stands for, from the definition.
  double decode(std::uint32_t bits) const {
    const bool negative = (bits & sign_bit()) != 0;
    const std::uint32_t e = (bits >> man_bits) & exp_ones();
    const std::uint32_t m = bits & man_ones();
    double mag;
    if (is_nan(bits)) {
      mag = std::numeric_limits<double>::quiet_NaN();
    } else if (!finite_only && e == exp_ones()) {
      mag = std::numeric_limits<double>::infinity();
    } else if (e == 0) {
      mag = std::ldexp(static_cast<double>(m), 1 - bias() - man_bits);
    } else {
      mag = std::ldexp(static_cast<double>(m + (1u << man_bits)), static_cast<int>(e) - bias() - man_bits);
    }
    return negative ? -mag : mag;
  }

  // Exponent of one unit in the last place of a finite pattern (the smallest normal's for subnormals).
  int ulp_exponent(std::uint32_t bits) const {
    const int e = static_cast<int>((bits >> man_bits) & exp_ones());
    return std::max(e, 1) - bias() - man_bits;
  }
};

inline const Format kBF16{"BF16", DType::kBF16, 8, 7, false};
inline const Format kF16{"F16", DType::kF16, 5, 10, false};
inline const Format kE4M3{"F8_E4M3", DType::kF8E4M3, 4, 3, true};
inline const Format kE5M2{"F8_E5M2", DType::kF8E5M2, 5, 2, false};

// Every finite non-negative value, ascending, with its pattern. For IEEE formats one more, virtual
// entry 2^(emax+1) stands for Inf: it is where the next value would be, so "nearest, ties to even"
// sends values >= max + half an ulp to Inf (its pattern, mantissa 0, is even; max's is odd).
struct Grid {
  const Format* format;
  std::vector<double> values;
  std::vector<std::uint32_t> bits;
};

inline Grid make_grid(const Format& f) {
  Grid g{&f, {}, {}};
  for (std::uint32_t b = 0; b <= f.max_finite(); ++b) {
    g.values.push_back(f.decode(b));
    g.bits.push_back(b);
  }
  if (!f.finite_only) {
    g.values.push_back(std::ldexp(1.0, static_cast<int>(f.exp_ones()) - f.bias()));  // 2^(emax+1)
    g.bits.push_back(f.inf_bits());
  }
  return g;
}

struct Rounded {
  bool nan;
  bool negative;
  std::uint32_t bits;  // full pattern, sign included (meaningless when nan)
};

// Nearest grid value to v, ties to the even pattern; overflow per the format's rules. Every
// difference below is exact in double (Sterbenz: lo <= |v| <= hi <= 2 lo, or lo == 0).
inline Rounded round_nearest_even(const Grid& g, double v) {
  const Format& f = *g.format;
  const bool negative = std::signbit(v);
  const std::uint32_t sign = negative ? f.sign_bit() : 0u;
  if (std::isnan(v)) return {true, negative, 0};
  const double a = std::fabs(v);
  if (a >= g.values.back()) return {false, negative, sign | g.bits.back()};  // Inf, or 448 saturated
  const auto it = std::upper_bound(g.values.begin(), g.values.end(), a);
  const std::size_t hi = static_cast<std::size_t>(it - g.values.begin());
  const std::size_t lo = hi - 1;
  if (a == g.values[lo]) return {false, negative, sign | g.bits[lo]};
  const double below = a - g.values[lo];
  const double above = g.values[hi] - a;
  std::size_t pick;
  if (below < above) {
    pick = lo;
  } else if (above < below) {
    pick = hi;
  } else {
    pick = (g.bits[lo] & 1u) == 0 ? lo : hi;
  }
  return {false, negative, sign | g.bits[pick]};
}

}  // namespace taskvec::testref
