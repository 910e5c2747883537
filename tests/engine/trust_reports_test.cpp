// Issue 10, "numbers that are silently wrong": recipes that would silently keep one of two values,
// merges that drop a delta or write an all-zero tensor without a word.
#include <gtest/gtest.h>

#include <string>

#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

struct Outcome {
  ErrorCode code = ErrorCode::kInternal;  // kInternal: parsed, no error
  std::string message;
};

Outcome parse(const std::string& yaml) {
  try {
    parse_recipe(yaml, "r.yaml");
  } catch (const Error& e) {
    return {e.code(), e.what()};
  }
  return {};
}

TEST(TrustRecipe, DuplicateTopLevelKeyIsRefusedWithBothLines) {
  const Outcome o = parse("merge_method: ties\nbase_model: a\nmodels: [b]\nbase_model: c\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("r.yaml:4: 'base_model': given twice (lines 2 and 4)"), std::string::npos) << o.message;
}

TEST(TrustRecipe, DuplicateKeyInModelsEntryIsRefused) {
  const Outcome o = parse("merge_method: linear\nmodels:\n  - model: a\n    model: b\n  - model: c\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'models[0].model': given twice (lines 3 and 4)"), std::string::npos) << o.message;
}

TEST(TrustRecipe, DuplicateModelParameterIsRefused) {
  const Outcome o = parse(
      "merge_method: ties\nbase_model: x\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n      weight: 2\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'models[0].parameters.weight': given twice (lines 6 and 7)"), std::string::npos)
      << o.message;
}

TEST(TrustRecipe, DuplicateGlobalParameterIsRefused) {
  const Outcome o = parse("merge_method: ties\nbase_model: x\nmodels: [a]\nparameters:\n  density: 0.5\n  density: 0.2\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'parameters.density': given twice (lines 5 and 6)"), std::string::npos) << o.message;
}

TEST(TrustRecipe, DuplicateKeyInFilterEntryIsRefused) {
  const Outcome o = parse(
      "merge_method: ties\nbase_model: x\nmodels: [a]\nparameters:\n  density:\n    - filter: attn\n"
      "      value: 0.5\n      value: 0.2\n    - value: 1\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("'parameters.density[0].value': given twice (lines 7 and 8)"), std::string::npos)
      << o.message;
}

TEST(TrustRecipe, SameKeyInDifferentMappingsIsFine) {
  EXPECT_EQ(parse("merge_method: ties\nbase_model: x\nmodels:\n  - model: a\n    parameters: {weight: 1}\n"
                  "  - model: b\n    parameters: {weight: 2}\nparameters: {weight: 3}\n")
                .code,
            ErrorCode::kInternal);
}

TEST(TrustRecipe, MultiDocumentRecipeIsRefused) {
  const Outcome o = parse("merge_method: linear\nmodels: [a, b]\n---\nmerge_method: ties\nbase_model: x\nmodels: [a]\n");
  EXPECT_EQ(o.code, ErrorCode::kRecipe);
  EXPECT_NE(o.message.find("multi-document recipes are not supported yet"), std::string::npos) << o.message;
  EXPECT_NE(o.message.find("holds 2 YAML documents"), std::string::npos) << o.message;
}

TEST(TrustRecipe, SingleDocumentWithStartMarkerIsFine) {
  EXPECT_EQ(parse("---\nmerge_method: linear\nmodels: [a, b]\n").code, ErrorCode::kInternal);
}

}  // namespace
}  // namespace taskvec
