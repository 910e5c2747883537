// taskvec combine-adapters, end to end. Two hand-written adapters (a Linear LoRA with a lora_B.bias, an
// embedding LoRA, a module only the first has) are combined with lambda = 0.5 and -1. Expected values are
// computed here in f64 by explicit loops from the input factors: dW = sum_i lambda_i s_i B_i A_i; the
// output's dW is rebuilt from its own factors and its adapter_config.json (scale alpha / r per module).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"

namespace taskvec {
namespace {

using test::read_values;
using test::Result;
using test::run;
using test::TempDir;
using test::TensorValues;
using test::write_model;

const std::string kP = "base_model.model.";

// Row-major [rows, cols] = B [rows, k] A [k, cols], times c, added to `acc`.
void add_product(std::vector<double>& acc, double c, const std::vector<double>& b, const std::vector<double>& a,
                 std::size_t rows, std::size_t k, std::size_t cols) {
  acc.resize(rows * cols, 0.0);
  for (std::size_t o = 0; o < rows; ++o)
    for (std::size_t i = 0; i < cols; ++i) {
      double s = 0;
      for (std::size_t j = 0; j < k; ++j) s += b[o * k + j] * a[j * cols + i];
      acc[o * cols + i] += c * s;
    }
}

void write_adapter(const std::filesystem::path& folder, const std::vector<TensorValues>& tensors, const std::string& config) {
  std::filesystem::create_directories(folder);
  write_model(folder / "adapter_model.safetensors", tensors);
  std::ofstream(folder / "adapter_config.json") << config;
}

nlohmann::json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

// The output adapter's dW of `module` in factor orientation (B A, [b_rows, a_cols]) times its PEFT scale,
// rebuilt from the written factors and config. `embed`: lora_embedding_A/B keys.
std::vector<double> output_delta(const std::filesystem::path& folder, const std::string& module, bool embed,
                                 std::size_t* rank_out = nullptr) {
  const auto file = folder / "adapter_model.safetensors";
  const std::string an = kP + module + (embed ? ".lora_embedding_A" : ".lora_A.weight");
  const std::string bn = kP + module + (embed ? ".lora_embedding_B" : ".lora_B.weight");
  const Checkpoint ck = Checkpoint::open(file);
  const auto& as = ck.at(an).info->shape;
  const auto& bs = ck.at(bn).info->shape;
  EXPECT_EQ(as[0], bs[1]) << module;
  const nlohmann::json config = read_json(folder / "adapter_config.json");
  double r = config["r"].get<double>(), alpha = config["lora_alpha"].get<double>();
  if (config["rank_pattern"].contains(module)) r = config["rank_pattern"][module].get<double>();
  if (config["alpha_pattern"].contains(module)) alpha = config["alpha_pattern"][module].get<double>();
  EXPECT_EQ(r, static_cast<double>(as[0])) << module;
  EXPECT_EQ(alpha, r) << module;  // scale 1
  if (rank_out) *rank_out = as[0];
  std::vector<double> dw;
  add_product(dw, alpha / r, read_values(file, bn), read_values(file, an), bs[0], as[0], as[1]);
  return dw;
}

void expect_near_all(const std::vector<double>& got, const std::vector<double>& want, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i)
    EXPECT_NEAR(got[i], want[i], tol * (1 + std::abs(want[i]))) << what << " " << i;
}

class CombineAdapters : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto seq = [](std::size_t n, double seed) {
      std::vector<double> v;
      for (std::size_t i = 0; i < n; ++i) v.push_back(std::round(64 * std::sin(seed * static_cast<double>(i + 1))) / 64);
      return v;
    };
    write_model(dir / "base.safetensors", {{"layer.lin.weight", DType::kF32, {3, 4}, seq(12, 0.3)},
                                           {"layer.lin.bias", DType::kF32, {3}, {1, 2, 3}},
                                           {"layer.other.weight", DType::kF32, {2, 4}, seq(8, 0.7)},
                                           {"emb.weight", DType::kF32, {5, 3}, seq(15, 1.1)}});
    a1 = seq(8, 1.3), b1 = seq(6, 1.7), e_a1 = seq(10, 2.1), e_b1 = seq(6, 2.3), o_a1 = seq(8, 2.9), o_b1 = seq(4, 3.1);
    bias1 = {0.5, -0.25, 1};
    a2 = seq(4, 3.7), b2 = seq(3, 4.1), e_a2 = seq(5, 4.3), e_b2 = seq(3, 4.7);
    // s1 = 8 / 2 = 4; s2 = 3 / 1 = 3.
    write_adapter(dir / "a1",
                  {{kP + "layer.lin.lora_A.weight", DType::kF32, {2, 4}, a1},
                   {kP + "layer.lin.lora_B.weight", DType::kF32, {3, 2}, b1},
                   {kP + "layer.lin.lora_B.bias", DType::kF32, {3}, bias1},
                   {kP + "emb.lora_embedding_A", DType::kF32, {2, 5}, e_a1},
                   {kP + "emb.lora_embedding_B", DType::kF32, {3, 2}, e_b1},
                   {kP + "layer.other.lora_A.weight", DType::kF32, {2, 4}, o_a1},
                   {kP + "layer.other.lora_B.weight", DType::kF32, {2, 2}, o_b1}},
                  R"({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "lora_bias": true, "base_model_name_or_path": "base"})");
    write_adapter(dir / "a2",
                  {{kP + "layer.lin.lora_A.weight", DType::kBF16, {1, 4}, a2},
                   {kP + "layer.lin.lora_B.weight", DType::kBF16, {3, 1}, b2},
                   {kP + "emb.lora_embedding_A", DType::kF32, {1, 5}, e_a2},
                   {kP + "emb.lora_embedding_B", DType::kF32, {3, 1}, e_b2}},
                  R"({"peft_type": "LORA", "r": 1, "lora_alpha": 3})");
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }

  TempDir dir;
  std::vector<double> a1, b1, e_a1, e_b1, o_a1, o_b1, bias1, a2, b2, e_a2, e_b2;
};

TEST_F(CombineAdapters, ExactConcatenationHasTheCombinedDelta) {
  Result r = run("--json combine-adapters -t " + p("a1") + ":0.5 -t " + p("a2") + ":-1 -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  EXPECT_EQ(report["r"], 3);
  // Linear: 0.5 * 4 * B1 A1 - 3 * B2 A2, rank 2 + 1.
  std::vector<double> want;
  add_product(want, 0.5 * 4, b1, a1, 3, 2, 4);
  add_product(want, -1.0 * 3, b2, a2, 3, 1, 4);
  std::size_t rank = 0;
  expect_near_all(output_delta(dir / "out", "layer.lin", false, &rank), want, 1e-6, "lin");
  EXPECT_EQ(rank, 3u);
  // Embedding, in factor orientation (B A = dW^T): the same sum.
  want.clear();
  add_product(want, 0.5 * 4, e_b1, e_a1, 3, 2, 5);
  add_product(want, -1.0 * 3, e_b2, e_a2, 3, 1, 5);
  expect_near_all(output_delta(dir / "out", "emb", true, &rank), want, 1e-6, "emb");
  EXPECT_EQ(rank, 3u);
  // A module only a1 has: its blocks alone, rank 2 (in rank_pattern / alpha_pattern).
  want.clear();
  add_product(want, 0.5 * 4, o_b1, o_a1, 2, 2, 4);
  expect_near_all(output_delta(dir / "out", "layer.other", false, &rank), want, 1e-6, "other");
  EXPECT_EQ(rank, 2u);
  const auto config = read_json(dir / "out" / "adapter_config.json");
  EXPECT_EQ(config["rank_pattern"]["layer.other"], 2);
  EXPECT_EQ(config["lora_bias"], true);
  EXPECT_EQ(config["base_model_name_or_path"], "base");
  // The bias: 0.5 * 4 * bias1 (a2 has none), written with scale 1.
  const auto bias = read_values(dir / "out" / "adapter_model.safetensors", kP + "layer.lin.lora_B.bias");
  expect_near_all(bias, {0.5 * 4 * bias1[0], 0.5 * 4 * bias1[1], 0.5 * 4 * bias1[2]}, 1e-7, "bias");
}

TEST_F(CombineAdapters, ApplyingTheCombinationEqualsApplyingBoth) {
  Result r = run("combine-adapters -t " + p("a1") + ":0.5 -t " + p("a2") + ":-1 -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  r = run("apply " + p("base.safetensors") + " -t " + p("out") + " -o " + p("one.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  r = run("apply " + p("base.safetensors") + " -t " + p("a1") + ":0.5 -t " + p("a2") + ":-1 -o " + p("two.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* name : {"layer.lin.weight", "layer.lin.bias", "layer.other.weight", "emb.weight"}) {
    expect_near_all(read_values(dir / "one.safetensors", name), read_values(dir / "two.safetensors", name), 1e-6, name);
  }
}

// Two rank-1 adapters along the same A: the combination has exact rank 1, and --rank 1 recovers it.
TEST(CombineAdaptersRank, RankOneOfAnExactRankOneCombinationRecoversIt) {
  TempDir dir;
  const std::vector<double> a = {0.5, -1, 0.25, 2}, b1 = {1, -2, 0.5}, b2 = {0.25, 1, 3};
  write_adapter(dir / "p", {{kP + "m.lora_A.weight", DType::kF32, {1, 4}, a}, {kP + "m.lora_B.weight", DType::kF32, {3, 1}, b1}},
                R"({"peft_type": "LORA", "r": 1, "lora_alpha": 2})");
  write_adapter(dir / "q", {{kP + "m.lora_A.weight", DType::kF32, {1, 4}, a}, {kP + "m.lora_B.weight", DType::kF32, {3, 1}, b2}},
                R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1})");
  Result r = run("--json combine-adapters -t " + (dir / "p").string() + ":0.5 -t " + (dir / "q").string() +
                     ":-1 --rank 1 -o " + (dir / "out").string(),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  ASSERT_EQ(report["modules"].size(), 1u);
  EXPECT_EQ(report["modules"][0]["input_rank"], 2);
  EXPECT_EQ(report["modules"][0]["rank"], 1);
  EXPECT_LT(report["modules"][0]["relative_error"].get<double>(), 1e-12);
  std::vector<double> want;
  add_product(want, 0.5 * 2, b1, a, 3, 1, 4);
  add_product(want, -1.0, b2, a, 3, 1, 4);
  std::size_t rank = 0;
  expect_near_all(output_delta(dir / "out", "m", false, &rank), want, 1e-6, "m");
  EXPECT_EQ(rank, 1u);
}

// dW = 3 e1 e1^T + e2 e2^T (singular values 3 and 1): at rank 1 the error is 1 / sqrt(10) and the
// factors give 3 e1 e1^T.
TEST(CombineAdaptersRank, TruncationErrorMatchesTheClosedForm) {
  TempDir dir;
  write_adapter(dir / "p", {{kP + "m.lora_A.weight", DType::kF32, {1, 4}, {1, 0, 0, 0}},
                            {kP + "m.lora_B.weight", DType::kF32, {3, 1}, {3, 0, 0}}},
                R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1})");
  write_adapter(dir / "q", {{kP + "m.lora_A.weight", DType::kF32, {1, 4}, {0, 1, 0, 0}},
                            {kP + "m.lora_B.weight", DType::kF32, {3, 1}, {0, 0.5, 0}}},
                R"({"peft_type": "LORA", "r": 1, "lora_alpha": 2})");
  Result r = run("--json combine-adapters -t " + (dir / "p").string() + " -t " + (dir / "q").string() +
                     " --rank 1 --svd exact -o " + (dir / "out").string(),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto report = nlohmann::json::parse(r.out);
  EXPECT_NEAR(report["modules"][0]["relative_error"].get<double>(), 1 / std::sqrt(10.0), 1e-12);
  EXPECT_NEAR(report["modules"][0]["delta_norm"].get<double>(), std::sqrt(10.0), 1e-12);
  std::vector<double> want(12, 0.0);
  want[0] = 3;
  expect_near_all(output_delta(dir / "out", "m", false), want, 1e-6, "m");
}

TEST_F(CombineAdapters, ShapeMismatchIsRefusedBeforeAnyOutput) {
  write_adapter(dir / "bad", {{kP + "layer.lin.lora_A.weight", DType::kF32, {1, 5}, std::vector<double>(5, 1)},
                              {kP + "layer.lin.lora_B.weight", DType::kF32, {3, 1}, {1, 2, 3}}},
                R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1})");
  Result r = run("combine-adapters -t " + p("a1") + " -t " + p("bad") + " -o " + p("out"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_NE(r.err.find("layer.lin"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find((dir / "a1").string()), std::string::npos) << r.err;
  EXPECT_NE(r.err.find((dir / "bad").string()), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
}

TEST_F(CombineAdapters, OutputInsideAnInputFolderIsRefused) {
  Result r = run("combine-adapters -t " + p("a1") + " -t " + p("a2") + " -o " + p("a2/sub"), dir);
  EXPECT_EQ(r.status, 6) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "a2" / "sub"));
  r = run("combine-adapters -t " + p("a1") + " -t " + p("a2") + " -o " + p("a1") + " --force", dir);
  EXPECT_EQ(r.status, 6) << r.err;
}

TEST_F(CombineAdapters, ScaledModulesToSaveAreRefusedNamingTheModule) {
  write_adapter(dir / "s", {{kP + "layer.lin.lora_A.weight", DType::kF32, {1, 4}, a2},
                            {kP + "layer.lin.lora_B.weight", DType::kF32, {3, 1}, b2},
                            {kP + "head.weight", DType::kF32, {2}, {1, 2}}},
                R"({"peft_type": "LORA", "r": 1, "lora_alpha": 1, "modules_to_save": ["head"]})");
  Result r = run("combine-adapters -t " + p("a1") + " -t " + p("s") + ":0.5 -o " + p("out"), dir);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("head"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
  // lambda 1, one adapter: copied as is.
  r = run("combine-adapters -t " + p("a1") + " -t " + p("s") + " -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_values(dir / "out" / "adapter_model.safetensors", kP + "head.weight"), (std::vector<double>{1, 2}));
  EXPECT_EQ(read_json(dir / "out" / "adapter_config.json")["modules_to_save"], nlohmann::json::array({"head"}));
}

}  // namespace
}  // namespace taskvec
