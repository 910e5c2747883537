// Issue 10 end to end through the taskvec binary: recipes that would silently keep one of two values
// are refused (exit 2), and merges / applies that drop a delta or erase a tensor say so on stderr.
#include <gtest/gtest.h>

#include <fstream>

#include "support/model_files.hpp"
#include "cli/cli_run.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"

namespace taskvec {
namespace {

using test::read_values;
using test::TempDir;
using test::write_model;

using test::Result;
using test::run;

class TrustReportsCli : public ::testing::Test {
 protected:
  void SetUp() override {
    write_model(dir / "pre.safetensors", {{"w", DType::kF32, {5}, {0, 0, 0, 0, 0}}, {"scale", DType::kF32, {1}, {1}}});
    write_model(dir / "a.safetensors", {{"w", DType::kF32, {5}, {0.5, -0.1, 0.3, 0, -0.8}}, {"scale", DType::kF32, {1}, {2}}});
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  TempDir dir;
};

TEST_F(TrustReportsCli, DuplicateRecipeKeyIsExit2AndNothingWritten) {
  std::ofstream(dir / "dup.yaml") << "merge_method: ties\nbase_model: pre.safetensors\nmodels:\n"
                                     "  - model: a.safetensors\nbase_model: a.safetensors\n";
  const Result r = run("merge " + p("dup.yaml") + " -o " + p("out.safetensors"), dir);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("dup.yaml:5: 'base_model': given twice (lines 2 and 5)"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
}

TEST_F(TrustReportsCli, MultiDocumentRecipeIsExit2) {
  std::ofstream(dir / "two.yaml") << "merge_method: ties\nbase_model: pre.safetensors\nmodels: [a.safetensors]\n---\n"
                                     "merge_method: linear\nmodels: [a.safetensors, pre.safetensors]\n";
  const Result r = run("merge " + p("two.yaml") + " -o " + p("out.safetensors"), dir);
  EXPECT_EQ(r.status, 2) << r.err;
  // Several documents are the stages of a multi-stage recipe; two without a name cannot both be the final one.
  EXPECT_NE(r.err.find("2 stages have no 'name'; at most one may (the final merge, written to the output)"),
            std::string::npos)
      << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
}

TEST_F(TrustReportsCli, TiesScalarDeltaDroppedIsWarned) {
  std::ofstream(dir / "ties.yaml") << "merge_method: ties\nbase_model: pre.safetensors\nmodels:\n"
                                      "  - model: a.safetensors\nparameters: {density: 0.2}\n";
  const Result r = run("merge -q " + p("ties.yaml") + " -o " + p("out.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_values(dir / "out.safetensors", "scale"), (std::vector<double>{1}));  // the base: delta dropped
  EXPECT_NE(r.err.find("taskvec: warning: tensor 'scale' (1 element): ties keeps floor(density x 1) = 0 of its "
                       "elements, so the non-zero task vector of models[0] (density 0.2) is dropped"),
            std::string::npos)
      << r.err;
  EXPECT_EQ(r.err.find("'w'"), std::string::npos) << r.err;  // int(0.2 x 5) = 1 kept
}

TEST_F(TrustReportsCli, ApplyThatErasesATensorIsWarnedDiffIsNot) {
  write_model(dir / "base.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "zero.safetensors", {{"w", DType::kF32, {2}, {0, 0}}});
  const Result d = run("diff -q " + p("base.safetensors") + " " + p("base.safetensors") + " -o " + p("tau0.safetensors"), dir);
  ASSERT_EQ(d.status, 0) << d.err;
  EXPECT_EQ(d.err.find("every element"), std::string::npos) << d.err;  // a zero task vector is not reported
  ASSERT_EQ(run("diff -q " + p("base.safetensors") + " " + p("zero.safetensors") + " -o " + p("tau.safetensors"), dir).status, 0);
  const Result a = run("apply -q " + p("base.safetensors") + " -t " + p("tau.safetensors") + ":1 -o " + p("out.safetensors"), dir);
  ASSERT_EQ(a.status, 0) << a.err;
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{0, 0}));
  EXPECT_NE(a.err.find("taskvec: warning: tensor 'w': every element of the output is zero"), std::string::npos) << a.err;
}

}  // namespace
}  // namespace taskvec
