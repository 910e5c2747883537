// PEFT LoRA adapters as task vectors, end to end: `apply BASE -t ADAPTER:LAMBDA`, `tau(NAME)` and the
// adapter as a model in `edit`, inspect of an adapter folder. Expected values are computed here in f64
// from the factors by explicit loops: theta = base + lambda * (alpha / r) * B @ A, and for a
// modules_to_save tensor theta = base + lambda * (saved - base).
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <string>
#include <vector>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"

namespace taskvec {
namespace {

using test::read_values;
using test::Result;
using test::run;
using test::TempDir;
using test::TensorValues;
using test::write_model;

constexpr std::size_t kOut = 3, kIn = 4, kRank = 2;
constexpr double kAlpha = 8;  // scale s = alpha / r = 4

class AdapterCli : public ::testing::Test {
 protected:
  void SetUp() override {
    for (std::size_t i = 0; i < kOut * kIn; ++i) w.push_back(0.25 * static_cast<double>(i) - 1);
    a = {0.5, -1, 0.25, 2, 1, 0.5, -0.5, 0.125};  // [r, in]
    b = {1, -2, 0.5, 0.25, -1, 3};                // [out, r]
    head = {1, 2, 3, 4, 5, 6};
    saved_head = {1.5, 2, 2, 4, 5, 7};
    write_model(dir / "base.safetensors", {{"layer.lin.weight", DType::kBF16, {kOut, kIn}, w},
                                           {"layer.lin.bias", DType::kF32, {kOut}, {1, 2, 3}},
                                           {"score.weight", DType::kF32, {2, 3}, head},
                                           {"ids", DType::kI64, {2}, {7, 9}}});
    std::filesystem::create_directory(dir / "adapter");
    write_model(dir / "adapter" / "adapter_model.safetensors",
                {{"base_model.model.layer.lin.lora_A.weight", DType::kF32, {kRank, kIn}, a},
                 {"base_model.model.layer.lin.lora_B.weight", DType::kF32, {kOut, kRank}, b},
                 {"base_model.model.score.weight", DType::kF32, {2, 3}, saved_head}});
    std::ofstream(dir / "adapter" / "adapter_config.json")
        << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["lin"], "modules_to_save": ["score"],
              "base_model_name_or_path": "base.safetensors", "bias": "none", "fan_in_fan_out": false})";
  }

  // base + lambda * s * B @ A, element (o, i), in f64.
  double expected_weight(double lambda, std::size_t o, std::size_t i) const {
    double delta = 0;
    for (std::size_t k = 0; k < kRank; ++k) delta += b[o * kRank + k] * a[k * kIn + i];
    return w[o * kIn + i] + lambda * (kAlpha / kRank) * delta;
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }

  // Checks `out` against lambda: weights rounded to BF16 (the base's dtype) are compared within half a
  // BF16 ulp of the f64 value.
  void expect_applied(const std::string& out, double lambda) const {
    const auto got = read_values(dir / out, "layer.lin.weight");
    ASSERT_EQ(got.size(), kOut * kIn);
    for (std::size_t o = 0; o < kOut; ++o) {
      for (std::size_t i = 0; i < kIn; ++i) {
        const double want = expected_weight(lambda, o, i);
        EXPECT_NEAR(got[o * kIn + i], want, std::ldexp(std::abs(want), -8) + 1e-30) << o << "," << i;
      }
    }
    const auto h = read_values(dir / out, "score.weight");
    for (std::size_t k = 0; k < head.size(); ++k) EXPECT_DOUBLE_EQ(h[k], head[k] + lambda * (saved_head[k] - head[k])) << k;
    EXPECT_EQ(read_values(dir / out, "layer.lin.bias"), (std::vector<double>{1, 2, 3}));
    EXPECT_EQ(read_values(dir / out, "ids"), (std::vector<double>{7, 9}));
  }

  TempDir dir;
  std::vector<double> w, a, b, head, saved_head;
};

TEST_F(AdapterCli, ApplyAddsTheScaledLoraProduct) {
  Result r = run("apply " + p("base.safetensors") + " -t " + p("adapter") + ":0.5 -o " + p("half.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("half.safetensors", 0.5);
  r = run("apply " + p("base.safetensors") + " -t " + p("adapter") + " -o " + p("one.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("one.safetensors", 1.0);  // PEFT's merge_and_unload
}

TEST_F(AdapterCli, TauOfAnAdapterAndTheAdapterAsAModelInEdit) {
  Result r = run("edit -m pre=" + p("base.safetensors") + " -m a=" + p("adapter") + " 'pre - tau(a)' -o " +
                     p("neg.safetensors"),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("neg.safetensors", -1.0);  // negation
  r = run("edit -m pre=" + p("base.safetensors") + " -m a=" + p("adapter") + " '0.75*a + 0.25*pre' -o " +
              p("mix.safetensors"),
          dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("mix.safetensors", 0.75);  // 0.75 (pre + tau) + 0.25 pre
}

// With --base, an adapter's task vector is its delta: the cosine with the task vector of the model
// `apply` makes from it is 1; without --base it is refused.
TEST_F(AdapterCli, SimilarityComparesTheAdaptersDelta) {
  ASSERT_EQ(run("apply " + p("base.safetensors") + " -t " + p("adapter") + " --dtype float32 -o " + p("ft.safetensors"), dir).status, 0);
  Result r = run("--json similarity --base " + p("base.safetensors") + " " + p("adapter") + " " + p("ft.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["compared"], "task_vectors");
  EXPECT_NEAR(j["cosine"][0][1].get<double>(), 1.0, 1e-6) << r.out;
  r = run("similarity " + p("adapter") + " " + p("ft.safetensors"), dir);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("--base"), std::string::npos) << r.err;
}

TEST_F(AdapterCli, InspectListsTheDeltasUnderBaseNames) {
  Result r = run("--json inspect " + p("adapter"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("\"format\": \"lora\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"name\": \"layer.lin.weight\""), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("\"name\": \"score.weight\""), std::string::npos) << r.out;
}

TEST_F(AdapterCli, AnAdapterForAnotherModelIsRefusedNamingTheTensor) {
  write_model(dir / "other.safetensors", {{"layer.lin.weight", DType::kF32, {kIn, kIn}, std::vector<double>(16, 0)},
                                          {"score.weight", DType::kF32, {2, 3}, head}});
  Result r = run("apply " + p("other.safetensors") + " -t " + p("adapter") + " -o " + p("x.safetensors"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_NE(r.err.find("layer.lin.weight"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(dir / "x.safetensors"));
  r = run("apply " + p("base.safetensors") + " -t " + p("adapter") + " -o " + p("adapter/out.safetensors"), dir);
  EXPECT_EQ(r.status, 6) << r.err;  // never inside an input folder
}


// mergekit's `model: BASE+ADAPTER` (and taskvec's `adapter:` key) merge the model the adapter defines,
// base + dW: a linear merge of the base and base+adapter at 1:1 (normalized) is base + dW / 2.
TEST_F(AdapterCli, RecipeModelPlusAdapterIsTheMergedModel) {
  std::ofstream(dir / "plus.yaml") << "merge_method: linear\nmodels:\n  - model: base.safetensors\n    parameters: {weight: 1}\n"
                                      "  - model: base.safetensors+adapter\n    parameters: {weight: 1}\n";
  Result r = run("merge " + p("plus.yaml") + " -o " + p("plus.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("plus.safetensors", 0.5);
  std::ofstream(dir / "key.yaml") << "merge_method: linear\nmodels:\n  - model: base.safetensors\n    adapter: adapter\n"
                                     "    parameters: {weight: 1}\n";
  r = run("merge " + p("key.yaml") + " -o " + p("key.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("key.safetensors", 1.0);
  std::ofstream(dir / "bad.yaml") << "merge_method: linear\nmodels:\n  - model: base.safetensors+base.safetensors\n";
  r = run("merge " + p("bad.yaml") + " -o " + p("bad.safetensors"), dir);
  EXPECT_EQ(r.status, 4) << r.err;
  EXPECT_NE(r.err.find("not a PEFT adapter folder"), std::string::npos) << r.err;
}

// An adapter where a model is expected: `diff BASE ADAPTER` writes its dense task vector,
// `extract-lora BASE ADAPTER` re-factorizes it; as the pretrained model it is refused.
TEST_F(AdapterCli, DiffAndExtractLoraTakeAnAdapterAsTheFineTune) {
  Result r = run("diff " + p("base.safetensors") + " " + p("adapter") + " -o " + p("tau.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  r = run("apply " + p("base.safetensors") + " -t " + p("tau.safetensors") + ":0.5 -o " + p("dense.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("dense.safetensors", 0.5);
  r = run("extract-lora " + p("base.safetensors") + " " + p("adapter") + " --rank 2 -o " + p("again"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  r = run("apply " + p("base.safetensors") + " -t " + p("again") + ":0.5 -o " + p("again.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  expect_applied("again.safetensors", 0.5);
  r = run("apply " + p("adapter") + " -t " + p("tau.safetensors") + " -o " + p("x.safetensors"), dir);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_NE(r.err.find("is a PEFT adapter (deltas only), not a model"), std::string::npos) << r.err;
}

// extract-lora at full rank, then apply: the fine-tuned model comes back within f32 rounding. The LoRA
// module (rank min(out, in)), its bias (lora_bias), a norm and the embeddings (modules_to_save) all take
// part; the f64 reference is the fine-tuned values themselves.
TEST(AdapterRoundTrip, ExtractLoraThenApplyAtFullRankGivesTheFineTuneBack) {
  TempDir dir;
  std::vector<TensorValues> base, ft;
  const auto values = [](std::size_t n, double seed) {
    std::vector<double> v;
    for (std::size_t i = 0; i < n; ++i) v.push_back(std::sin(seed * static_cast<double>(i + 1)));
    return v;
  };
  const std::vector<std::pair<std::string, std::vector<std::uint64_t>>> layout = {
      {"model.embed_tokens.weight", {5, 4}}, {"model.layers.0.mlp.up_proj.weight", {3, 4}},
      {"model.layers.0.mlp.up_proj.bias", {3}}, {"model.norm.weight", {4}}, {"lm_head.weight", {5, 4}}};
  double seed = 1.3;
  for (const auto& [name, shape] : layout) {
    std::size_t n = 1;
    for (auto d : shape) n *= d;
    auto pre = values(n, seed);
    auto post = values(n, seed + 0.7);
    for (std::size_t i = 0; i < n; ++i) post[i] = pre[i] + 0.1 * post[i];
    base.push_back({name, DType::kF32, shape, pre});
    ft.push_back({name, DType::kF32, shape, post});
    seed += 0.9;
  }
  write_model(dir / "base.safetensors", base);
  write_model(dir / "ft.safetensors", ft);
  Result r = run("extract-lora " + (dir / "base.safetensors").string() + " " + (dir / "ft.safetensors").string() +
                     " --rank 8 -o " + (dir / "lora").string(),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  r = run("apply " + (dir / "base.safetensors").string() + " -t " + (dir / "lora").string() + " -o " +
              (dir / "back.safetensors").string(),
          dir);
  ASSERT_EQ(r.status, 0) << r.err;
  for (const auto& t : ft) {
    // F32 inputs rounded to f32 once each (f32 values read as double): the result differs from the
    // fine-tune by the SVD's and f32's rounding only, a few ulps of the largest value.
    const auto got = read_values(dir / "back.safetensors", t.name);
    ASSERT_EQ(got.size(), t.values.size()) << t.name;
    for (std::size_t i = 0; i < got.size(); ++i) {
      EXPECT_NEAR(got[i], static_cast<float>(t.values[i]), 1e-6) << t.name << " " << i;
    }
  }
}

}  // namespace
}  // namespace taskvec
