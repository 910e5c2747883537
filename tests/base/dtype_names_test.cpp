#include <gtest/gtest.h>

#include <set>
#include <string>

#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

TEST(DTypeNames, RoundTripEveryDType) {
  std::set<std::string_view> names;
  for (std::size_t i = 0; i < kDTypeCount; ++i) {
    const auto dtype = static_cast<DType>(i);
    const std::string_view name = dtype_name(dtype);
    EXPECT_FALSE(name.empty());
    EXPECT_TRUE(names.insert(name).second) << "duplicate name " << name;
    EXPECT_EQ(parse_dtype(name), dtype) << name;
    EXPECT_EQ(parse_dtype_user(name), dtype) << name;
    std::string lower(name);
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    EXPECT_EQ(parse_dtype_user(lower), dtype) << lower;
  }
}

TEST(DTypeNames, ParseIsExactAndCaseSensitive) {
  EXPECT_EQ(parse_dtype("BF16"), DType::kBF16);
  EXPECT_EQ(parse_dtype("F8_E4M3"), DType::kF8E4M3);
  EXPECT_EQ(parse_dtype("bf16"), std::nullopt);
  EXPECT_EQ(parse_dtype(""), std::nullopt);
  EXPECT_EQ(parse_dtype("F32 "), std::nullopt);
  EXPECT_EQ(parse_dtype("FLOAT32"), std::nullopt);
}

TEST(DTypeNames, UserAliases) {
  for (const char* s : {"f32", "float32", "fp32", "F32", "Float32"}) EXPECT_EQ(parse_dtype_user(s), DType::kF32) << s;
  for (const char* s : {"f16", "float16", "fp16", "half", "HALF"}) EXPECT_EQ(parse_dtype_user(s), DType::kF16) << s;
  for (const char* s : {"bf16", "bfloat16", "BFloat16"}) EXPECT_EQ(parse_dtype_user(s), DType::kBF16) << s;
  for (const char* s : {"f64", "float64", "fp64", "double"}) EXPECT_EQ(parse_dtype_user(s), DType::kF64) << s;
  for (const char* s : {"f8_e4m3", "fp8_e4m3", "F8_E4M3", "f8_e4m3fn"}) EXPECT_EQ(parse_dtype_user(s), DType::kF8E4M3) << s;
  for (const char* s : {"f8_e5m2", "fp8_e5m2"}) EXPECT_EQ(parse_dtype_user(s), DType::kF8E5M2) << s;
  for (const char* s : {"", "f31", "bfloat", "fp8", "int8x"}) EXPECT_EQ(parse_dtype_user(s), std::nullopt) << s;
}

TEST(DTypeNames, BitsAndEditable) {
  const std::pair<DType, unsigned> bits[] = {
      {DType::kBool, 8},  {DType::kU8, 8},       {DType::kI8, 8},         {DType::kU16, 16},
      {DType::kI16, 16},  {DType::kU32, 32},     {DType::kI32, 32},       {DType::kU64, 64},
      {DType::kI64, 64},  {DType::kF16, 16},     {DType::kBF16, 16},      {DType::kF32, 32},
      {DType::kF64, 64},  {DType::kF8E4M3, 8},   {DType::kF8E5M2, 8},     {DType::kF8E8M0, 8},
      {DType::kF8E4M3FNUZ, 8}, {DType::kF8E5M2FNUZ, 8}, {DType::kF4, 4}, {DType::kF6E2M3, 6},
      {DType::kF6E3M2, 6}, {DType::kC64, 64},
  };
  static_assert(std::size(bits) == kDTypeCount, "list every dtype");
  for (const auto& [dtype, b] : bits) EXPECT_EQ(dtype_bits(dtype), b) << dtype_name(dtype);
  std::set<DType> editable;
  for (std::size_t i = 0; i < kDTypeCount; ++i) {
    if (dtype_is_editable(static_cast<DType>(i))) editable.insert(static_cast<DType>(i));
  }
  EXPECT_EQ(editable, (std::set<DType>{DType::kF16, DType::kBF16, DType::kF32, DType::kF64, DType::kF8E4M3, DType::kF8E5M2}));
}

}  // namespace
}  // namespace taskvec
