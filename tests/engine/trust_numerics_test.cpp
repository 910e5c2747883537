// Issue 10, item 1: a finite result beyond the output dtype's range is never written as Inf, NaN or a
// silent saturation: Error{kOverflow} naming the tensor and element, or --clamp-overflow (clamped to
// +-max with a warning counting them). The dtype helpers, linear_edit (f32 and f64 paths,
// --merge-extra-rows) and merge_checkpoints (merges and dtype-only conversions).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>

#include "engine/recipe_at.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

using test::read_tensor_bytes;
using test::read_values;
using test::TempDir;
using test::write_model;

TEST(TrustNumerics, OverflowThresholdsAreTheRoundingBoundaries) {
  // F16: max 65504, ulp 32 at the top: 65519 rounds to 65504, 65520 (the tie) rounds to Inf.
  EXPECT_FALSE(overflows_dtype(DType::kF16, 65519.0));
  EXPECT_TRUE(overflows_dtype(DType::kF16, 65520.0));
  EXPECT_TRUE(overflows_dtype(DType::kF16, -70000.0));
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7BFFu);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7C00u);
  // E5M2: max 57344, ulp 8192: 61440 is the tie, rounds to Inf.
  EXPECT_FALSE(overflows_dtype(DType::kF8E5M2, 61439.0));
  EXPECT_TRUE(overflows_dtype(DType::kF8E5M2, 61440.0));
  // E4M3: max 448 (mantissa 110, even): 464 still rounds to 448; anything beyond overflows.
  EXPECT_FALSE(overflows_dtype(DType::kF8E4M3, 464.0));
  EXPECT_TRUE(overflows_dtype(DType::kF8E4M3, std::nextafter(464.0f, 1000.0f)));
  // BF16: max (2 - 2^-7) * 2^127; the tie (2 - 2^-8) * 2^127 goes to Inf.
  EXPECT_FALSE(overflows_dtype(DType::kBF16, std::ldexp(2.0 - std::ldexp(1.0, -7), 127)));
  EXPECT_TRUE(overflows_dtype(DType::kBF16, std::ldexp(2.0 - std::ldexp(1.0, -8), 127)));
  // F32 from f64; F64 never; NaN and Inf are not overflow.
  EXPECT_FALSE(overflows_dtype(DType::kF32, static_cast<double>(std::numeric_limits<float>::max())));
  EXPECT_TRUE(overflows_dtype(DType::kF32, 1e39));
  EXPECT_FALSE(overflows_dtype(DType::kF64, 1e308));
  EXPECT_FALSE(overflows_dtype(DType::kF16, std::numeric_limits<double>::infinity()));
  EXPECT_FALSE(overflows_dtype(DType::kF16, std::nan("")));
  EXPECT_EQ(dtype_max_finite(DType::kF16), 65504.0);
  EXPECT_EQ(dtype_max_finite(DType::kF8E4M3), 448.0);
  EXPECT_EQ(dtype_max_finite(DType::kF8E5M2), 57344.0);
}

TEST(TrustNumerics, FindAndClampOverflowInBulk) {
  // 200 elements (past the 64-element scan blocks), one overflow at 150 and one at 199, NaN/Inf ignored.
  std::vector<float> v(200, 1.0f);
  v[3] = std::numeric_limits<float>::infinity();
  v[7] = std::nanf("");
  v[150] = -70000.0f;
  v[199] = 65520.0f;
  EXPECT_EQ(find_overflow(DType::kF16, v.data(), v.size()), 150u);
  EXPECT_EQ(find_overflow(DType::kF16, v.data(), 150), 150u);  // none: n
  EXPECT_EQ(find_overflow(DType::kBF16, v.data(), v.size()), 200u);
  EXPECT_EQ(find_overflow(DType::kF32, v.data(), v.size()), 200u);
  EXPECT_EQ(clamp_overflow(DType::kF16, v.data(), v.size()), 2u);
  EXPECT_EQ(v[150], -65504.0f);
  EXPECT_EQ(v[199], 65504.0f);
  EXPECT_TRUE(std::isinf(v[3]));
  EXPECT_EQ(find_overflow(DType::kF16, v.data(), v.size()), 200u);
  std::vector<double> d{1.0, 3e38, 4e38, -1e300};
  EXPECT_EQ(find_overflow(DType::kF32, d.data(), d.size()), 2u);
  EXPECT_EQ(find_overflow(DType::kF64, d.data(), d.size()), 4u);
  EXPECT_EQ(clamp_overflow(DType::kF32, d.data(), d.size()), 2u);
  EXPECT_EQ(d[3], -static_cast<double>(std::numeric_limits<float>::max()));
}

ErrorCode edit_error(const Checkpoint& pre, const std::vector<LinearTerm>& terms, const std::filesystem::path& out,
                     const EditOptions& o, std::string* message = nullptr) {
  try {
    linear_edit(pre, 1.0, terms, out, o);
  } catch (const Error& e) {
    if (message) *message = e.what();
    return e.code();
  }
  return ErrorCode::kInternal;
}

TEST(TrustNumerics, F16EditOverflowIsAnErrorNamingTensorAndElement) {
  // 40000 -> 50016 (50000 is a tie in F16) at lambda 3: 40000 + 3 * 10016 = 70048 > 65504.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"w", DType::kF16, {3}, {1, 40000, 2}}});
  write_model(dir / "ft.safetensors", {{"w", DType::kF16, {3}, {1, 50016, 2}}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  std::string message;
  EXPECT_EQ(edit_error(pre, {{&ft, 3.0, true}}, dir / "out.safetensors", o, &message), ErrorCode::kOverflow);
  EXPECT_NE(message.find("tensor 'w'"), std::string::npos) << message;
  EXPECT_NE(message.find("element 1 is 70048"), std::string::npos) << message;
  EXPECT_NE(message.find("F16 value 65504"), std::string::npos) << message;
  EXPECT_NE(message.find("--clamp-overflow"), std::string::npos) << message;
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));

  o.clamp_overflow = true;
  const EditReport r = linear_edit(pre, 1.0, {{&ft, 3.0, true}}, dir / "out.safetensors", o);
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{1, 65504, 2}));
  EXPECT_EQ(read_tensor_bytes(dir / "out.safetensors", "w")[2], 0xFFu);  // 0x7BFF little-endian
  EXPECT_EQ(read_tensor_bytes(dir / "out.safetensors", "w")[3], 0x7Bu);
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("tensor 'w': 1 element(s)"), std::string::npos) << r.warnings[0];
}

TEST(TrustNumerics, OverflowInALaterBlockNamesItsElement) {
  // 5000 elements (more than one 2048-element block): the overflow at element 4321, F16.
  TempDir dir;
  std::vector<double> pre(5000, 1.0), ft(5000, 1.0);
  ft[4321] = 40000;  // 1 + 2 * 39999 = 79999
  write_model(dir / "pre.safetensors", {{"w", DType::kF16, {5000}, pre}});
  write_model(dir / "ft.safetensors", {{"w", DType::kF16, {5000}, ft}});
  auto p = Checkpoint::open(dir / "pre.safetensors");
  auto f = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  o.threads = 2;
  std::string message;
  EXPECT_EQ(edit_error(p, {{&f, 2.0, true}}, dir / "out.safetensors", o, &message), ErrorCode::kOverflow);
  EXPECT_NE(message.find("element 4321 is 79999"), std::string::npos) << message;
}

TEST(TrustNumerics, F32ArithmeticOverflowOfFiniteInputsIsOverflow) {
  // BF16 inputs, f32 arithmetic: 1 + 2 * (3e38 - 1) = 6e38 is Inf in f32 itself. Every input is finite,
  // so it is kOverflow naming the element (it used to be kNonFinite without an element).
  TempDir dir;
  std::vector<double> pre(5000, 1.0), ft(5000, 1.0);
  ft[4321] = 3e38;
  write_model(dir / "pre.safetensors", {{"w", DType::kBF16, {5000}, pre}});
  write_model(dir / "ft.safetensors", {{"w", DType::kBF16, {5000}, ft}});
  auto p = Checkpoint::open(dir / "pre.safetensors");
  auto f = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  std::string message;
  EXPECT_EQ(edit_error(p, {{&f, 2.0, true}}, dir / "out.safetensors", o, &message), ErrorCode::kOverflow);
  EXPECT_NE(message.find("element 4321 overflows the f32 arithmetic"), std::string::npos) << message;
  EXPECT_NE(message.find("--dtype f64"), std::string::npos) << message;
}

TEST(TrustNumerics, F8E4M3OverflowIsNotSilentlySaturated) {
  // 400 + 2 * (450 - 400) = 500 > 464: F8_E4M3 (no Inf) would have saturated it to 448 without a word.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"w", DType::kF32, {2}, {400, 1}}});
  write_model(dir / "ft.safetensors", {{"w", DType::kF32, {2}, {450, 1}}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  o.out_dtype = DType::kF8E4M3;
  EXPECT_EQ(edit_error(pre, {{&ft, 2.0, true}}, dir / "out.safetensors", o), ErrorCode::kOverflow);
  // 400 + 0.5 * 50 = 425 fits (rounds to 416 or 448): no error.
  linear_edit(pre, 1.0, {{&ft, 0.5, true}}, dir / "ok.safetensors", o);
  o.clamp_overflow = true;
  const EditReport r = linear_edit(pre, 1.0, {{&ft, 2.0, true}}, dir / "out.safetensors", o);
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{448, 1}));
  EXPECT_EQ(r.warnings.size(), 1u);
}

TEST(TrustNumerics, F64MathIntoF32OutputOverflowIsAnError) {
  // An F64 base takes the f64 path; --dtype f32 narrows: 3e38 + 1 * 3e38 = 6e38 > FLT_MAX.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"w", DType::kF64, {2}, {3e38, 0}}});
  write_model(dir / "ft.safetensors", {{"w", DType::kF64, {2}, {6e38, 0}}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  o.out_dtype = DType::kF32;
  std::string message;
  EXPECT_EQ(edit_error(pre, {{&ft, 1.0, true}}, dir / "out.safetensors", o, &message), ErrorCode::kOverflow);
  EXPECT_NE(message.find("element 0"), std::string::npos) << message;
  o.clamp_overflow = true;
  linear_edit(pre, 1.0, {{&ft, 1.0, true}}, dir / "out.safetensors", o);
  EXPECT_EQ(read_values(dir / "out.safetensors", "w")[0], static_cast<double>(std::numeric_limits<float>::max()));
}

TEST(TrustNumerics, ResizedRowsOverflowIsAnError) {
  // --merge-extra-rows (run_resized_chunk): the shared row 0 overflows F16.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"emb", DType::kF16, {1, 2}, {40000, 1}}});
  write_model(dir / "ft.safetensors", {{"emb", DType::kF16, {2, 2}, {50016, 1, 5, 6}}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  o.merge_extra_rows = true;
  EXPECT_EQ(edit_error(pre, {{&ft, 3.0, true}}, dir / "out.safetensors", o), ErrorCode::kOverflow);
  o.clamp_overflow = true;
  linear_edit(pre, 1.0, {{&ft, 3.0, true}}, dir / "out.safetensors", o);
  EXPECT_EQ(read_values(dir / "out.safetensors", "emb"), (std::vector<double>{65504, 1, 5, 6}));
}

using test::recipe_at;

ErrorCode merge_error(const Recipe& r, const std::filesystem::path& out, const EditOptions& o) {
  try {
    merge_checkpoints(r, out, o);
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;
}

TEST(TrustNumerics, MergeOverflowIsAnErrorOrClamped) {
  // task arithmetic, lambda 3: 40000 + 3 * 10016 = 70048 in F16.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"w", DType::kF16, {2}, {40000, 1}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF16, {2}, {50016, 1}}});
  const Recipe r = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                  "  - model: a.safetensors\nparameters:\n  lambda: 3\n");
  EditOptions o;
  EXPECT_EQ(merge_error(r, dir / "out.safetensors", o), ErrorCode::kOverflow);
  o.clamp_overflow = true;
  const EditReport report = merge_checkpoints(r, dir / "out.safetensors", o);
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{65504, 1}));
  ASSERT_EQ(report.warnings.size(), 1u);
  EXPECT_NE(report.warnings[0].find("tensor 'w': 1 element(s)"), std::string::npos) << report.warnings[0];
}

TEST(TrustNumerics, MergeDtypeOnlyConversionOverflowIsAnError) {
  // A tensor excluded from the merge is only converted (--dtype f16): its F32 70000 does not fit F16.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"w", DType::kF32, {1}, {1}}, {"big", DType::kF32, {2}, {2, 70000}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {1}, {2}}, {"big", DType::kF32, {2}, {2, 70000}}});
  const Recipe r = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                  "  - model: a.safetensors\nparameters:\n  lambda: 1\n");
  EditOptions o;
  o.out_dtype = DType::kF16;
  o.exclude = "big";
  EXPECT_EQ(merge_error(r, dir / "out.safetensors", o), ErrorCode::kOverflow);
  o.clamp_overflow = true;
  merge_checkpoints(r, dir / "out.safetensors", o);
  EXPECT_EQ(read_values(dir / "out.safetensors", "big"), (std::vector<double>{2, 65504}));
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{2}));
}

TEST(TrustNumerics, EditDtypeOnlyConversionOverflowIsAnError) {
  // linear_edit: an excluded tensor converted to --dtype f16 goes through the same check.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"big", DType::kF32, {2}, {2, -70000}}});
  write_model(dir / "ft.safetensors", {{"big", DType::kF32, {2}, {2, -70000}}});
  auto pre = Checkpoint::open(dir / "pre.safetensors");
  auto ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions o;
  o.out_dtype = DType::kF16;
  o.exclude = "big";
  EXPECT_EQ(edit_error(pre, {{&ft, 1.0, true}}, dir / "out.safetensors", o), ErrorCode::kOverflow);
}

TEST(TrustNumerics, MergeF32ArithmeticOverflowIsOverflow) {
  // F32 inputs, lambda 3: 3e38 + 3 * 3e38 is Inf in f32 although every input is finite.
  TempDir dir;
  write_model(dir / "pre.safetensors", {{"w", DType::kF32, {2}, {0, 1}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {2}, {3e38, 1}}});
  const Recipe r = recipe_at(dir, "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                  "  - model: a.safetensors\nparameters:\n  lambda: 3\n");
  EXPECT_EQ(merge_error(r, dir / "out.safetensors", EditOptions{}), ErrorCode::kOverflow);
}

}  // namespace
}  // namespace taskvec
