// Issue 10, item 1, end to end: an F16 edit whose result does not fit F16 exits 5 naming the tensor,
// the element and --clamp-overflow; with --clamp-overflow it exits 0, writes 65504 and warns.
#include <gtest/gtest.h>

#include <fstream>

#include "support/model_files.hpp"
#include "cli/cli_run.hpp"
#include "support/temp_dir.hpp"

namespace taskvec {
namespace {

using test::read_tensor_bytes;
using test::read_values;
using test::TempDir;
using test::write_model;

using test::Result;
using test::run;

class TrustNumericsCli : public ::testing::Test {
 protected:
  void SetUp() override {
    // 40000 -> 50016 (exact in F16); at lambda 3: 40000 + 3 * 10016 = 70048 > 65504.
    write_model(dir / "pre.safetensors", {{"w", DType::kF16, {3}, {1, 40000, 2}}});
    write_model(dir / "ft.safetensors", {{"w", DType::kF16, {3}, {1, 50016, 2}}});
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  TempDir dir;
};

TEST_F(TrustNumericsCli, F16EditOverflowExitsFiveNamingTheFlag) {
  Result r = run("edit -q -m pre=" + p("pre.safetensors") + " -m ft=" + p("ft.safetensors") +
                     " 'pre + 3*tau(ft)' -o " + p("out.safetensors"),
                 dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_NE(r.err.find("tensor 'w'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("element 1 is 70048"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("65504"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--clamp-overflow"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "out.safetensors"));
}

TEST_F(TrustNumericsCli, ClampOverflowSaturatesAndWarns) {
  Result r = run("edit -m pre=" + p("pre.safetensors") + " -m ft=" + p("ft.safetensors") +
                     " 'pre + 3*tau(ft)' --clamp-overflow -o " + p("out.safetensors"),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{1, 65504, 2}));
  EXPECT_NE(r.err.find("taskvec: warning: tensor 'w': 1 element(s)"), std::string::npos) << r.err;
  // taskvec accepts its own output (no Inf in it).
  EXPECT_EQ(run("validate " + p("out.safetensors"), dir).status, 0);
}

TEST_F(TrustNumericsCli, ApplyAndMergeOverflowExitFive) {
  ASSERT_EQ(run("diff -q " + p("pre.safetensors") + " " + p("ft.safetensors") + " -o " + p("tau.safetensors"), dir).status, 0);
  Result a = run("apply -q " + p("pre.safetensors") + " -t " + p("tau.safetensors") + ":3 -o " +
                     p("applied.safetensors"),
                 dir);
  EXPECT_EQ(a.status, 5) << a.err;
  std::ofstream(dir / "ta.yaml") << "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                    "  - model: ft.safetensors\nparameters:\n  lambda: 3\n";
  Result m = run("merge -q " + p("ta.yaml") + " -o " + p("merged.safetensors"), dir);
  EXPECT_EQ(m.status, 5) << m.err;
  Result c = run("merge -q " + p("ta.yaml") + " --clamp-overflow -o " + p("merged.safetensors"), dir);
  ASSERT_EQ(c.status, 0) << c.err;
  EXPECT_EQ(read_values(dir / "merged.safetensors", "w"), (std::vector<double>{1, 65504, 2}));
  // A diff stored as F16 whose difference does not fit: 40000 - (-40000) = 80000.
  write_model(dir / "neg.safetensors", {{"w", DType::kF16, {3}, {1, -40000, 2}}});
  Result d = run("diff -q " + p("neg.safetensors") + " " + p("pre.safetensors") + " --dtype f16 -o " +
                     p("tau16.safetensors"),
                 dir);
  EXPECT_EQ(d.status, 5) << d.err;
}

}  // namespace
}  // namespace taskvec
