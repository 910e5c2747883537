// End to end through the taskvec binary: exit statuses, JSON output, files written.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "support/model_files.hpp"
#include "cli/cli_run.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"

namespace taskvec {
namespace {

using test::read_tensor_bytes;
using test::read_values;
using test::TempDir;
using test::write_model;

using test::Result;
using test::run;

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    write_model(dir / "pre.safetensors",
                {{"enc.w", DType::kBF16, {2, 2}, {1, 2, 3, 4}}, {"head.w", DType::kBF16, {2}, {1, 1}},
                 {"pos", DType::kI64, {2}, {0, 1}}},
                {{"format", "pt"}});
    write_model(dir / "a.safetensors",
                {{"enc.w", DType::kBF16, {2, 2}, {2, 2, 3, 4}}, {"head.w", DType::kBF16, {2}, {3, 1}},
                 {"pos", DType::kI64, {2}, {0, 1}}});
    write_model(dir / "b.safetensors",
                {{"enc.w", DType::kBF16, {2, 2}, {1, 4, 3, 4}}, {"head.w", DType::kBF16, {2}, {1, 1}},
                 {"pos", DType::kI64, {2}, {0, 1}}});
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  TempDir dir;
};

TEST_F(Cli, InspectJson) {
  Result r = run("inspect --json " + p("pre.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tensor_count"], 3);
  EXPECT_EQ(j["parameters"], 4 + 2 + 2);
  EXPECT_EQ(j["bytes"], 8 + 4 + 16);
  EXPECT_EQ(j["metadata"]["format"], "pt");
  EXPECT_EQ(j["tensors"][0]["name"], "enc.w");
  EXPECT_EQ(j["tensors"][0]["dtype"], "BF16");
  EXPECT_EQ(j["tensors"][0]["shape"], nlohmann::json::array({2, 2}));
  EXPECT_EQ(j["dtypes"]["I64"]["bytes"], 16);
  Result text = run("inspect " + p("pre.safetensors"), dir);
  EXPECT_EQ(text.status, 0);
  EXPECT_NE(text.out.find("8 parameters"), std::string::npos) << text.out;
}

TEST_F(Cli, ValidateExitStatus) {
  EXPECT_EQ(run("validate " + p("pre.safetensors"), dir).status, 0);
  // Cut the file short: an interrupted download.
  auto bytes = test::file_bytes(dir / "pre.safetensors");
  std::ofstream(dir / "cut.safetensors", std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), bytes.size() - 3);
  Result r = run("validate " + p("cut.safetensors"), dir);
  EXPECT_EQ(r.status, 4);
  EXPECT_NE(r.err.find("cut.safetensors"), std::string::npos) << r.err;
  Result j = run("validate --json " + p("cut.safetensors"), dir);
  EXPECT_EQ(j.status, 4);
  EXPECT_EQ(nlohmann::json::parse(j.out)["valid"], false);
  EXPECT_EQ(run("validate " + p("nonexistent.safetensors"), dir).status, 3);
}

TEST_F(Cli, DiffApplyRoundTripAndNegation) {
  ASSERT_EQ(run("diff -q " + p("pre.safetensors") + " " + p("a.safetensors") + " -o " + p("tau_a.safetensors"), dir).status, 0);
  EXPECT_EQ(test::read_dtype(dir / "tau_a.safetensors", "enc.w"), DType::kF32);
  EXPECT_EQ(read_values(dir / "tau_a.safetensors", "enc.w"), (std::vector<double>{1, 0, 0, 0}));
  Result r = run("apply " + p("pre.safetensors") + " -t " + p("tau_a.safetensors") + ":1 -o " + p("back.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* name : {"enc.w", "head.w", "pos"}) {
    EXPECT_EQ(read_tensor_bytes(dir / "back.safetensors", name), read_tensor_bytes(dir / "a.safetensors", name)) << name;
  }
  ASSERT_EQ(run("apply -q " + p("pre.safetensors") + " -t " + p("tau_a.safetensors") + ":-0.5 -o " + p("neg.safetensors"), dir).status, 0);
  // pre - 0.5 tau: enc [0.5, 2, 3, 4], head [0, 1]
  EXPECT_EQ(read_values(dir / "neg.safetensors", "enc.w"), (std::vector<double>{0.5, 2, 3, 4}));
  EXPECT_EQ(read_values(dir / "neg.safetensors", "head.w"), (std::vector<double>{0, 1}));
  EXPECT_EQ(test::read_dtype(dir / "neg.safetensors", "enc.w"), DType::kBF16);
  Result bad = run("apply " + p("pre.safetensors") + " -t " + p("tau_a.safetensors") + ":x -o " + p("x.safetensors"), dir);
  EXPECT_EQ(bad.status, 2);
}

TEST_F(Cli, EditExpressionsAndErrors) {
  std::string models = " -m pre=" + p("pre.safetensors") + " -m a=" + p("a.safetensors") + " -m b=" + p("b.safetensors");
  Result r = run("edit -q" + models + " 'pre + tau(a) + tau(b)' --exclude '^head' -o " + p("sum.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_values(dir / "sum.safetensors", "enc.w"), (std::vector<double>{2, 4, 3, 4}));
  EXPECT_EQ(read_values(dir / "sum.safetensors", "head.w"), (std::vector<double>{1, 1}));
  Result nonlinear = run("edit" + models + " 'pre + a*b' -o " + p("x.safetensors"), dir);
  EXPECT_EQ(nonlinear.status, 2);
  EXPECT_NE(nonlinear.err.find("not linear"), std::string::npos) << nonlinear.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "x.safetensors"));
  // existing output without --force: 6; with --force: 0
  EXPECT_EQ(run("edit -q" + models + " 'pre' -o " + p("sum.safetensors"), dir).status, 6);
  EXPECT_EQ(run("edit -q --force" + models + " 'pre' -o " + p("sum.safetensors"), dir).status, 0);
  // a model with a tensor missing: 5, naming the tensor
  write_model(dir / "short.safetensors", {{"enc.w", DType::kBF16, {2, 2}, {1, 2, 3, 4}}});
  Result missing = run("edit" + models + " -m s=" + p("short.safetensors") + " 'pre + tau(s)' -o " + p("y.safetensors"), dir);
  EXPECT_EQ(missing.status, 5);
  EXPECT_NE(missing.err.find("head.w"), std::string::npos) << missing.err;
}

TEST_F(Cli, DryRunJsonPlanWritesNothing) {
  Result r = run("--json diff --dry-run " + p("pre.safetensors") + " " + p("a.safetensors") + " -o " + p("tau"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["dry_run"], true);
  EXPECT_EQ(j["tensors_edited"], 2);
  EXPECT_EQ(j["tensors_copied"], 1);
  EXPECT_EQ(j["total_bytes"], 16 + 8 + 16);  // two F32 task-vector tensors and the I64 copy
  EXPECT_FALSE(std::filesystem::exists(dir / "tau"));
}

TEST_F(Cli, ShardedFolderOutputReadsBack) {
  Result r = run("edit -q -m pre=" + p("pre.safetensors") + " -m a=" + p("a.safetensors") +
                  " 'pre + 2*tau(a)' --max-shard-size 10bytes -o " + p("out"),
              dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(dir / "out" / kIndexFileName));
  EXPECT_EQ(run("validate -q " + p("out"), dir).status, 0);
  EXPECT_EQ(read_values(dir / "out", "enc.w"), (std::vector<double>{3, 2, 3, 4}));
}

TEST_F(Cli, SimilarityJson) {
  Result r = run("similarity --json --base " + p("pre.safetensors") + " a=" + p("a.safetensors") + " b=" + p("b.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  // tau_a = [1,0,0,0 | 2,0], tau_b = [0,2,0,0 | 0,0]: orthogonal; norms sqrt(5) and 2
  EXPECT_DOUBLE_EQ(j["cosine"][0][1].get<double>(), 0.0);
  EXPECT_DOUBLE_EQ(j["norms"][0].get<double>(), std::sqrt(5.0));
  EXPECT_DOUBLE_EQ(j["norms"][1].get<double>(), 2.0);
}

TEST_F(Cli, MergeRecipe) {
  // task arithmetic over a and b with lambda 0.5: enc = pre + 0.5*([1,0,0,0] + [0,2,0,0]) = [1.5, 3, 3, 4];
  // head = pre + 0.5*([2,0] + [0,0]) = [2, 1]
  std::ofstream(dir / "ta.yaml") << "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
                                    "  - model: a.safetensors\n  - model: b.safetensors\nparameters:\n  lambda: 0.5\n";
  Result r = run("merge -q " + p("ta.yaml") + " -o " + p("ta.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_values(dir / "ta.safetensors", "enc.w"), (std::vector<double>{1.5, 3, 3, 4}));
  EXPECT_EQ(read_values(dir / "ta.safetensors", "head.w"), (std::vector<double>{2, 1}));
  EXPECT_EQ(read_values(dir / "ta.safetensors", "pos"), (std::vector<double>{0, 1}));
  // TIES at density 1 with one model is task arithmetic: same bytes as `apply` with the same lambda.
  std::ofstream(dir / "ties.yaml") << "merge_method: ties\nbase_model: pre.safetensors\nmodels:\n"
                                      "  - model: a.safetensors\nparameters:\n  density: 1.0\n  lambda: 0.5\n";
  ASSERT_EQ(run("merge -q " + p("ties.yaml") + " -o " + p("ties.safetensors"), dir).status, 0);
  ASSERT_EQ(run("diff -q " + p("pre.safetensors") + " " + p("a.safetensors") + " -o " + p("tau.safetensors"), dir).status, 0);
  ASSERT_EQ(run("apply -q " + p("pre.safetensors") + " -t " + p("tau.safetensors") + ":0.5 -o " + p("half.safetensors"), dir).status, 0);
  for (const char* name : {"enc.w", "head.w"}) {
    EXPECT_EQ(read_tensor_bytes(dir / "ties.safetensors", name), read_tensor_bytes(dir / "half.safetensors", name)) << name;
  }
  // An unknown key and a density that is not > 0 are recipe errors (exit 2), nothing written.
  std::ofstream(dir / "bad.yaml") << "merge_method: ties\nbase_model: pre.safetensors\nmodels:\n"
                                     "  - model: a.safetensors\nparameters:\n  density: -0.5\n";
  EXPECT_EQ(run("merge " + p("bad.yaml") + " -o " + p("bad.safetensors"), dir).status, 2);
  std::ofstream(dir / "bad2.yaml") << "merge_method: ties\nbase_modle: pre.safetensors\nmodels:\n  - model: a.safetensors\n";
  EXPECT_EQ(run("merge " + p("bad2.yaml") + " -o " + p("bad.safetensors"), dir).status, 2);
  EXPECT_FALSE(std::filesystem::exists(dir / "bad.safetensors"));
}

// mergekit's README pattern, run as a mergekit user would: paths relative to the working directory (not
// to the recipe's folder), the base listed among the models, a parameter of another method, int8_mask.
TEST_F(Cli, MergekitRecipeRunsFromTheWorkingDirectory) {
  std::filesystem::create_directories(dir / "recipes");
  std::ofstream(dir / "recipes" / "ta.yaml")
      << "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n"
         "  - model: pre.safetensors\n    parameters: {weight: 1.0}\n"
         "  - model: a.safetensors\n    parameters: {weight: 1.0, density: 0.5}\n"
         "  - model: b.safetensors\n    parameters: {weight: 1.0}\n"
         "parameters: {normalize: true, int8_mask: true}\ndtype: float32\n";
  Result r = run("merge recipes/ta.yaml -o ta.safetensors", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  // normalize divides by the two models' weights (the base is only the base): pre + (tau_a + tau_b) / 2,
  // enc = [1,2,3,4] + ([1,0,0,0] + [0,2,0,0]) / 2, head = [1,1] + ([2,0] + [0,0]) / 2.
  EXPECT_EQ(read_values(dir / "ta.safetensors", "enc.w"), (std::vector<double>{1.5, 3, 3, 4}));
  EXPECT_EQ(read_values(dir / "ta.safetensors", "head.w"), (std::vector<double>{2, 1}));
  EXPECT_NE(r.err.find("taskvec: warning: recipes/ta.yaml:4: 'models[0]': is the base_model: used only as the base"),
            std::string::npos)
      << r.err;
  EXPECT_NE(r.err.find("'models[1].parameters.density': has no effect on task_arithmetic"), std::string::npos) << r.err;

  // From another folder the same relative paths name nothing: the error says where they resolve.
  std::filesystem::create_directories(dir / "elsewhere");
  std::ofstream(dir / "beside.yaml") << "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels: [a.safetensors]\n";
  Result far = run("merge ../beside.yaml -o out.safetensors", dir, "cd elsewhere && ");
  EXPECT_EQ(far.status, 2) << far.err;
  EXPECT_NE(far.err.find("model path 'pre.safetensors' does not exist in the working directory; paths in a recipe are "
                         "relative to the working directory, as in mergekit"),
            std::string::npos)
      << far.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "elsewhere" / "out.safetensors"));
}

TEST_F(Cli, UsageErrors) {
  EXPECT_EQ(run("", dir).status, 2);
  EXPECT_EQ(run("frobnicate", dir).status, 2);
  EXPECT_EQ(run("diff " + p("pre.safetensors"), dir).status, 2);
  EXPECT_EQ(run("diff " + p("pre.safetensors") + " " + p("a.safetensors") + " -o " + p("t.safetensors") + " --dtype int7", dir).status, 2);
  EXPECT_EQ(run("--help", dir).status, 0);
}

}  // namespace
}  // namespace taskvec
