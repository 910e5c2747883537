#include <gtest/gtest.h>

#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

const std::vector<std::string> kNames{"pre", "a", "b", "c"};

ErrorCode code_of(const std::string& text) {
  try {
    parse_expression(text, kNames, "pre");
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;  // no error: the tests below expect one
}

TEST(Expression, PaperAnalogyExpandsToCoefficients) {
  // pre + 0.5*(tau(c) + tau(b) - tau(a)) = pre + 0.5c - 0.5pre + 0.5b - 0.5pre - 0.5a + 0.5pre
  auto e = parse_expression("pre + 0.5*(tau(c) + tau(b) - tau(a))", kNames, "pre");
  EXPECT_DOUBLE_EQ(e.coefficients.at("pre"), 0.5);
  EXPECT_DOUBLE_EQ(e.coefficients.at("a"), -0.5);
  EXPECT_DOUBLE_EQ(e.coefficients.at("b"), 0.5);
  EXPECT_DOUBLE_EQ(e.coefficients.at("c"), 0.5);
  EXPECT_DOUBLE_EQ(e.total(), 1.0);
}

TEST(Expression, NegationAndAddition) {
  auto neg = parse_expression("pre - 0.7*tau(a)", kNames, "pre");
  EXPECT_DOUBLE_EQ(neg.coefficients.at("pre"), 1.7);
  EXPECT_DOUBLE_EQ(neg.coefficients.at("a"), -0.7);
  auto add = parse_expression("pre + 0.4*(tau(a)+tau(b)) - 0.7*tau(c)", kNames, "pre");
  EXPECT_DOUBLE_EQ(add.coefficients.at("pre"), 1.0 - 0.8 + 0.7);
  EXPECT_DOUBLE_EQ(add.coefficients.at("a"), 0.4);
  EXPECT_DOUBLE_EQ(add.coefficients.at("b"), 0.4);
  EXPECT_DOUBLE_EQ(add.coefficients.at("c"), -0.7);
}

TEST(Expression, PrecedenceDivisionUnaryAndScientificNumbers) {
  auto e = parse_expression("-(a - b)/4 + 2*3*c + 1e-1*pre", kNames, "pre");
  EXPECT_DOUBLE_EQ(e.coefficients.at("a"), -0.25);
  EXPECT_DOUBLE_EQ(e.coefficients.at("b"), 0.25);
  EXPECT_DOUBLE_EQ(e.coefficients.at("c"), 6.0);
  EXPECT_DOUBLE_EQ(e.coefficients.at("pre"), 0.1);
  auto task_vector = parse_expression("tau(a)", kNames, "pre");
  EXPECT_DOUBLE_EQ(task_vector.total(), 0.0);
  auto scaled_after = parse_expression("a*0.5 + pre*0.5", kNames, "pre");
  EXPECT_DOUBLE_EQ(scaled_after.coefficients.at("a"), 0.5);
}

TEST(Expression, CancelledModelsAreDropped) {
  auto e = parse_expression("pre + tau(a) - tau(a)", kNames, "pre");
  EXPECT_EQ(e.coefficients.size(), 1u);
  EXPECT_DOUBLE_EQ(e.coefficients.at("pre"), 1.0);
}

TEST(Expression, NonLinearAndMalformedInputsAreErrors) {
  EXPECT_EQ(code_of("a*b"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("tau(a)*tau(b)"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre/a"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre/0"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre + 1"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre + d"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre +"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("(pre"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre)"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("tau(zz)"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("tau()"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("pre $ a"), ErrorCode::kExpression);
  EXPECT_EQ(code_of("tau(a) - tau(a)"), ErrorCode::kExpression);
  EXPECT_EQ(code_of(""), ErrorCode::kExpression);
}

TEST(Expression, ErrorNamesTheColumn) {
  try {
    parse_expression("pre + a*b", kNames, "pre");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("column 9"), std::string::npos) << e.what();
  }
}

TEST(Expression, PretrainedMustBeAModel) {
  try {
    parse_expression("a", kNames, "base");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace taskvec
