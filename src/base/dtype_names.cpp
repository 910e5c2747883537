#include <algorithm>
#include <array>
#include <cctype>
#include <string>

#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

struct DTypeRow {
  DType dtype;
  std::string_view name;
  unsigned bits;
  bool editable;
};

// One row per DType, in enum order; the static_assert keeps a new dtype from being half added.
constexpr std::array<DTypeRow, kDTypeCount> kTable{{
    {DType::kBool, "BOOL", 8, false},
    {DType::kU8, "U8", 8, false},
    {DType::kI8, "I8", 8, false},
    {DType::kU16, "U16", 16, false},
    {DType::kI16, "I16", 16, false},
    {DType::kU32, "U32", 32, false},
    {DType::kI32, "I32", 32, false},
    {DType::kU64, "U64", 64, false},
    {DType::kI64, "I64", 64, false},
    {DType::kF16, "F16", 16, true},
    {DType::kBF16, "BF16", 16, true},
    {DType::kF32, "F32", 32, true},
    {DType::kF64, "F64", 64, true},
    {DType::kF8E4M3, "F8_E4M3", 8, true},
    {DType::kF8E5M2, "F8_E5M2", 8, true},
    {DType::kF8E8M0, "F8_E8M0", 8, false},
    {DType::kF8E4M3FNUZ, "F8_E4M3FNUZ", 8, false},
    {DType::kF8E5M2FNUZ, "F8_E5M2FNUZ", 8, false},
    {DType::kF4, "F4", 4, false},
    {DType::kF6E2M3, "F6_E2M3", 6, false},
    {DType::kF6E3M2, "F6_E3M2", 6, false},
    {DType::kC64, "C64", 64, false},
}};

constexpr bool table_in_enum_order() {
  for (std::size_t i = 0; i < kTable.size(); ++i) {
    if (static_cast<std::size_t>(kTable[i].dtype) != i) return false;
  }
  return true;
}
static_assert(kTable.size() == kDTypeCount && table_in_enum_order(), "kTable must list every DType in enum order");

const DTypeRow& row(DType dtype) noexcept { return kTable[static_cast<std::size_t>(dtype)]; }

}  // namespace

std::string_view dtype_name(DType dtype) noexcept { return row(dtype).name; }
unsigned dtype_bits(DType dtype) noexcept { return row(dtype).bits; }
bool dtype_is_editable(DType dtype) noexcept { return row(dtype).editable; }

std::optional<DType> parse_dtype(std::string_view name) noexcept {
  for (const auto& r : kTable) {
    if (r.name == name) return r.dtype;
  }
  return std::nullopt;
}

std::optional<DType> parse_dtype_user(std::string_view name) noexcept {
  std::string upper(name);
  std::transform(upper.begin(), upper.end(), upper.begin(), [](unsigned char c) { return std::toupper(c); });
  static constexpr std::array<std::pair<std::string_view, DType>, 13> kAliases{{
      {"FLOAT32", DType::kF32}, {"FP32", DType::kF32}, {"FLOAT", DType::kF32},
      {"FLOAT16", DType::kF16}, {"FP16", DType::kF16}, {"HALF", DType::kF16},
      {"BFLOAT16", DType::kBF16},
      {"FLOAT64", DType::kF64}, {"FP64", DType::kF64}, {"DOUBLE", DType::kF64},
      {"FP8_E4M3", DType::kF8E4M3}, {"FP8_E5M2", DType::kF8E5M2}, {"F8_E4M3FN", DType::kF8E4M3},
  }};
  for (const auto& [alias, dtype] : kAliases) {
    if (alias == upper) return dtype;
  }
  return parse_dtype(upper);
}

}  // namespace taskvec
