// Internal: the overflow rule for every encode that narrows (docs/NUMERICS.md, "Overflow"): a finite
// value beyond the output dtype's range is Error{kOverflow}, or saturated under --clamp-overflow.
#pragma once

#include <cstdint>
#include <string>

#include <fmt/format.h>

#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"

namespace taskvec::detail {

/// Checks values[0, n) (elements first .. first + n - 1 of tensor `name`, read from `file`) before
/// they are encoded as `out`. Clean: returns 0. Some overflow: with `clamp`, saturates them in place
/// and returns how many; else throws Error{kOverflow} naming the tensor, the element, the value and
/// the dtype's largest finite value.
template <typename T>
std::uint64_t check_overflow(DType out, T* values, std::size_t n, std::uint64_t first, const std::string& name,
                             const std::string& file, bool clamp) {
  const std::size_t at = find_overflow(out, values, n);
  if (at == n) return 0;
  if (clamp) return clamp_overflow(out, values, n);
  const double max = dtype_max_finite(out);
  throw Error(ErrorCode::kOverflow,
              fmt::format("tensor '{}' (from {}): element {} is {} in the result, beyond the largest finite {} value "
                          "{}; it would be written as {}. Use --clamp-overflow to saturate such elements to +-{} "
                          "(with a warning), or a wider --dtype (e.g. f32)",
                          name, file, first + at, static_cast<double>(values[at]), dtype_name(out), max,
                          out == DType::kF8E4M3 ? "a saturated 448 without notice" : "Inf", max));
}

}  // namespace taskvec::detail
