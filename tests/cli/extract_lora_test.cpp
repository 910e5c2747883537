// taskvec extract-lora end to end: exit statuses, --json per tensor, the adapter folder.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/cli_run.hpp"
#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::Result;
using test::run;
using test::TempDir;
using test::write_model;

class ExtractLoraCli : public ::testing::Test {
 protected:
  void SetUp() override {
    // tau of q_proj = diag(4, 2, 1) (3 x 3 + a zero row): at --rank 2 the error is 1 / sqrt(21) and the
    // energy kept 20 / 21. The bias of k_proj changes while its weight does not: k_proj saved whole.
    write_model(dir / "base.safetensors", {{"model.q_proj.weight", DType::kBF16, {4, 3}, std::vector<double>(12, 1.0)},
                                           {"model.k_proj.weight", DType::kBF16, {2, 2}, {1, 2, 3, 4}},
                                           {"model.k_proj.bias", DType::kBF16, {2}, {0, 0}}});
    std::vector<double> q(12, 1.0);
    q[0] += 4;
    q[4] += 2;
    q[8] += 1;
    write_model(dir / "ft.safetensors", {{"model.q_proj.weight", DType::kBF16, {4, 3}, q},
                                         {"model.k_proj.weight", DType::kBF16, {2, 2}, {1, 2, 3, 4}},
                                         {"model.k_proj.bias", DType::kBF16, {2}, {0.5, 0}}});
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  TempDir dir;
};

TEST_F(ExtractLoraCli, JsonReportAndAdapter) {
  Result r = run("--json extract-lora " + p("base.safetensors") + " " + p("ft.safetensors") +
                     " --rank 2 --dtype float32 --task-type CAUSAL_LM -o " + p("adapter"),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  const auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["r"], 2);
  EXPECT_EQ(j["lora_alpha"], 2);
  EXPECT_EQ(j["target_modules"], nlohmann::json({"model.q_proj"}));
  EXPECT_EQ(j["modules_to_save"], nlohmann::json({"model.k_proj"}));
  EXPECT_EQ(j["skipped_identical"], nlohmann::json({"model.k_proj.weight"}));
  ASSERT_EQ(j["tensors"].size(), 2u);
  const auto& k = j["tensors"][0];  // sorted by name: model.k_proj.bias first
  EXPECT_EQ(k["tensor"], "model.k_proj.bias");
  EXPECT_EQ(k["kind"], "modules_to_save");
  const auto& t = j["tensors"][1];
  EXPECT_EQ(t["tensor"], "model.q_proj.weight");
  EXPECT_EQ(t["kind"], "lora");
  EXPECT_EQ(t["rank"], 2);
  EXPECT_EQ(t["svd"], "exact");
  EXPECT_NEAR(t["relative_error"].get<double>(), 1 / std::sqrt(21.0), 1e-12);
  EXPECT_NEAR(t["energy_kept"].get<double>(), 20.0 / 21.0, 1e-12);
  EXPECT_NEAR(t["tau_norm"].get<double>(), std::sqrt(21.0), 1e-12);
  EXPECT_EQ(read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.model.k_proj.bias"), (std::vector<double>{0.5, 0}));
  EXPECT_EQ(test::read_dtype(dir / "adapter" / "adapter_model.safetensors", "base_model.model.model.q_proj.lora_A.weight"), DType::kF32);
  const auto config = nlohmann::json::parse(test::read_file(dir / "adapter" / "adapter_config.json"));
  EXPECT_EQ(config["task_type"], "CAUSAL_LM");
  EXPECT_EQ(config["lora_bias"], false);
  EXPECT_EQ(config["peft_type"], "LORA");

  // Text summary names the tensor, its rank and error.
  r = run("extract-lora " + p("base.safetensors") + " " + p("ft.safetensors") + " --rank 2 --force -o " + p("adapter"),
          dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("model.q_proj.weight"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("0.218218"), std::string::npos) << r.out;  // 1 / sqrt(21)
  EXPECT_EQ(test::read_dtype(dir / "adapter" / "adapter_model.safetensors", "base_model.model.model.q_proj.lora_A.weight"), DType::kBF16);
}

TEST_F(ExtractLoraCli, RefusalsExitStatuses) {
  write_model(dir / "bad.safetensors", {{"model.q_proj.weight", DType::kBF16, {3, 4}, std::vector<double>(12, 1.0)},
                                        {"model.k_proj.weight", DType::kBF16, {2, 2}, {1, 2, 3, 4}},
                                        {"model.k_proj.bias", DType::kBF16, {2}, {0, 0}}});
  Result r = run("extract-lora " + p("base.safetensors") + " " + p("bad.safetensors") + " --rank 2 -o " + p("out"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_NE(r.err.find("shape_mismatch"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("model.q_proj.weight"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));

  fs::create_directories(dir / "basedir");
  fs::copy_file(dir / "base.safetensors", dir / "basedir" / "model.safetensors");
  r = run("extract-lora " + p("basedir") + " " + p("ft.safetensors") + " --rank 2 -o " + p("basedir/lora"), dir);
  EXPECT_EQ(r.status, 6) << r.err;
  EXPECT_FALSE(fs::exists(dir / "basedir" / "lora"));

  r = run("extract-lora " + p("base.safetensors") + " " + p("ft.safetensors") + " --rank 2 --dtype f64 -o " + p("out"),
          dir);
  EXPECT_EQ(r.status, 2) << r.err;
  r = run("extract-lora " + p("base.safetensors") + " " + p("ft.safetensors") + " --rank 2 -o " + p("x.safetensors"),
          dir);
  EXPECT_EQ(r.status, 2) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

}  // namespace
}  // namespace taskvec
