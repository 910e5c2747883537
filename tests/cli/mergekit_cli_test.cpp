// mergekit-yaml's habits on `taskvec merge` and the folder it writes (issue 12): the output as a
// positional argument, --out-shard-size in mergekit's units, --max-shard-size refusing "5B", mergekit's
// no-op flags, flag errors in taskvec's form; and an output folder ready to publish: config.json's
// torch_dtype, mergekit_config.yml, a README.md model card (unless --no-model-card), --no-copy-tokenizer.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::Result;
using test::run;
using test::TempDir;
using test::write_model;

using test::read_text;

class MergekitCli : public ::testing::Test {
 protected:
  TempDir dir;
  std::string p(const std::string& name) const { return (dir / name).string(); }
  void SetUp() override {
    for (const char* m : {"pre", "ft"}) fs::create_directories(dir / m);
    // bf16 inputs, as a Llama folder holds them; config.json says so.
    write_model(dir / "pre" / "model.safetensors", {{"model.layers.0.w", DType::kBF16, {4}, {1, 2, 3, 4}},
                                                    {"model.norm.weight", DType::kBF16, {2}, {1, 1}}});
    write_model(dir / "ft" / "model.safetensors", {{"model.layers.0.w", DType::kBF16, {4}, {2, 2, 3, 4}},
                                                   {"model.norm.weight", DType::kBF16, {2}, {1, 2}}});
    for (const char* m : {"pre", "ft"}) {
      std::ofstream(dir / m / "config.json") << R"({"model_type": "llama", "hidden_size": 4, "torch_dtype": "bfloat16"})";
      std::ofstream(dir / m / "tokenizer.json") << R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}}})";
    }
    std::ofstream(dir / "ta.yaml") << "merge_method: task_arithmetic\nbase_model: pre\nmodels:\n"
                                      "  - model: ft\n    parameters: {weight: 0.5}\nout_dtype: float16\n";
  }
};

TEST_F(MergekitCli, PositionalOutputAndAFolderReadyToPublish) {
  Result r = run("merge -q ta.yaml out", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  // pre + 0.5 (ft - pre): [1.5, 2, 3, 4], [1, 1.5], written as float16.
  EXPECT_EQ(read_values(dir / "out", "model.layers.0.w"), (std::vector<double>{1.5, 2, 3, 4}));
  EXPECT_EQ(read_values(dir / "out", "model.norm.weight"), (std::vector<double>{1, 1.5}));
  const Checkpoint out = Checkpoint::open(dir / "out");
  EXPECT_EQ(out.find("model.norm.weight")->info->dtype, DType::kF16);
  // config.json agrees with the tensors: torch_dtype is the output dtype; the other keys are kept.
  const auto config = nlohmann::json::parse(read_text(dir / "out" / "config.json"));
  EXPECT_EQ(config["torch_dtype"], "float16");
  EXPECT_EQ(config["model_type"], "llama");
  EXPECT_EQ(config["hidden_size"], 4);
  // The recipe as read, under mergekit's file name, and a model card naming method, inputs and recipe.
  EXPECT_EQ(read_text(dir / "out" / "mergekit_config.yml"), read_text(dir / "ta.yaml"));
  const std::string card = read_text(dir / "out" / "README.md");
  EXPECT_EQ(card.rfind("---\nbase_model:\n- pre\n- ft\n", 0), 0u) << card;
  EXPECT_NE(card.find("merged using the task_arithmetic merge method with pre as the base"), std::string::npos) << card;
  EXPECT_NE(card.find("```yaml\n" + read_text(dir / "ta.yaml") + "```\n"), std::string::npos) << card;
  EXPECT_NE(card.find("created with taskvec "), std::string::npos) << card;
  EXPECT_EQ(read_text(dir / "out" / "tokenizer.json"), read_text(dir / "pre" / "tokenizer.json"));

  // -o and the positional output must agree; one of them is needed.
  Result two = run("merge -q ta.yaml a -o b", dir);
  EXPECT_EQ(two.status, 2);
  EXPECT_NE(two.err.find("two outputs: 'a' and -o 'b'"), std::string::npos) << two.err;
  Result none = run("merge -q ta.yaml", dir);
  EXPECT_EQ(none.status, 2);
  EXPECT_NE(none.err.find("no output: give it after the recipe"), std::string::npos) << none.err;

  Result plain = run("merge -q --no-model-card --no-copy-tokenizer ta.yaml -o plain", dir);
  ASSERT_EQ(plain.status, 0) << plain.err;
  EXPECT_FALSE(fs::exists(dir / "plain" / "README.md"));
  EXPECT_FALSE(fs::exists(dir / "plain" / "tokenizer.json"));
  EXPECT_TRUE(fs::exists(dir / "plain" / "mergekit_config.yml"));
  EXPECT_TRUE(fs::exists(dir / "plain" / "config.json"));
}

TEST_F(MergekitCli, ShardSizesInMergekitsUnitsAndTheFiveBytesTrap) {
  // mergekit's --out-shard-size counts like its parse_kmb: 5B = 5e9 (bytes, as its writer compares).
  Result r = run("merge -q ta.yaml out --out-shard-size 5B", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_TRUE(fs::exists(dir / "out" / "model.safetensors"));  // one shard: 5e9 bytes is plenty
  Result tiny = run("merge -q ta.yaml tiny --out-shard-size 8", dir);  // 8 bytes: one tensor per shard
  ASSERT_EQ(tiny.status, 0) << tiny.err;
  EXPECT_TRUE(fs::exists(dir / "tiny" / "model.safetensors.index.json"));
  // --max-shard-size 5B would be 5 bytes: refused with the way out.
  Result trap = run("merge -q ta.yaml x --max-shard-size 5B", dir);
  EXPECT_EQ(trap.status, 2);
  EXPECT_NE(trap.err.find("--max-shard-size '5B' would be 5 bytes per shard: write the unit (e.g. 5GB; mergekit's "
                          "--out-shard-size 5B means 5e9 bytes"),
            std::string::npos)
      << trap.err;
  EXPECT_EQ(run("merge -q ta.yaml x --max-shard-size 100", dir).status, 2);
  EXPECT_EQ(run("merge -q ta.yaml x --out-shard-size 5G", dir).status, 2);
  EXPECT_EQ(run("merge -q ta.yaml x --out-shard-size 5B --max-shard-size 5GB", dir).status, 2);
  EXPECT_FALSE(fs::exists(dir / "x"));
}

TEST_F(MergekitCli, MergekitFlagsWithoutEffectAreNotedAndBadFlagsUseTaskvecsForm) {
  Result r = run("merge ta.yaml out --cuda --lazy-unpickle --low-cpu-memory --trust-remote-code --random-seed 3", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  for (const char* flag : {"--cuda", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code"})
    EXPECT_NE(r.err.find(std::string("taskvec: note: ") + flag + " (a mergekit flag) has no effect"), std::string::npos)
        << flag << "\n" << r.err;
  Result bad = run("merge ta.yaml out2 --desnity 0.5", dir);
  EXPECT_EQ(bad.status, 2);
  EXPECT_EQ(bad.err.rfind("taskvec: error (invalid_argument): ", 0), 0u) << bad.err;
  EXPECT_NE(bad.err.find("(see 'taskvec merge --help')"), std::string::npos) << bad.err;
  EXPECT_FALSE(fs::exists(dir / "out2"));
}

// --explain: the resolved parameters of every tensor, grouped, non-defaults marked; nothing written.
TEST_F(MergekitCli, ExplainPrintsResolvedParametersPerTensorGroup) {
  std::ofstream(dir / "ties.yaml") << "merge_method: ties\nbase_model: pre\nmodels:\n  - model: ft\n    parameters:\n"
                                      "      density: [{filter: norm, value: 0.5}, {value: 1}]\n      weight: 0.25\n"
                                      "parameters: {lambda: 2}\n";
  Result r = run("merge ties.yaml out --explain", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));
  EXPECT_NE(r.out.find("ties.yaml (ties): resolved parameters per tensor; * = not ties's default\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("1 tensor: model.layers.0.w\n  global: count_rounding=floor trim=tensor lambda=2* normalize=true "
                       "rescale=false int8_mask=false sign_tie=positive\n  models[0] ft: weight=0.25* density=1\n"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("1 tensor: model.norm.weight\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("models[0] ft: weight=0.25* density=0.5*"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace taskvec
