// mergekit's own example recipes (its examples/ folder, written out here with only the model paths
// replaced) run unmodified through `taskvec merge` on generated Llama-shaped Hugging Face folders (bf16,
// sharded, config.json and tokenizer files), and the results are checked against values computed in the
// test: layer stacking (passthrough slices) copies the layers it names and renumbers them, a one-slice
// recipe gives the same bytes as its models: form, linear is the weighted average.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_tensor_bytes;
using test::read_values;
using test::Result;
using test::run;
using test::TempDir;
using test::TensorValues;

constexpr int kLayers = 4, kHidden = 8, kVocab = 16, kInter = 12;

using test::read_text;

// A Llama-shaped checkpoint: bf16 values on a grid bf16 holds exactly, different per seed.
std::vector<TensorValues> llama_tensors(unsigned seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> q(-64, 64);
  auto tensor = [&](const std::string& name, std::vector<std::uint64_t> shape) {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<double> v(n);
    for (auto& x : v) x = q(gen) / 64.0;
    return TensorValues{name, DType::kBF16, std::move(shape), std::move(v)};
  };
  const std::uint64_t h = kHidden, v = kVocab, m = kInter;
  std::vector<TensorValues> t = {tensor("model.embed_tokens.weight", {v, h})};
  for (int l = 0; l < kLayers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) t.push_back(tensor(p + "self_attn." + proj + ".weight", {h, h}));
    t.push_back(tensor(p + "mlp.gate_proj.weight", {m, h}));
    t.push_back(tensor(p + "mlp.up_proj.weight", {m, h}));
    t.push_back(tensor(p + "mlp.down_proj.weight", {h, m}));
    t.push_back(tensor(p + "input_layernorm.weight", {h}));
    t.push_back(tensor(p + "post_attention_layernorm.weight", {h}));
  }
  t.push_back(tensor("model.norm.weight", {h}));
  t.push_back(tensor("lm_head.weight", {v, h}));
  return t;
}

class MergekitRecipes : public ::testing::Test {
 protected:
  TempDir dir;
  std::string p(const std::string& name) const { return (dir / name).string(); }

  // A sharded Hugging Face folder: shards and index written by `taskvec edit` (1 KiB shards), then
  // config.json and tokenizer files as a Llama repository has them.
  void make_model(const std::string& name, unsigned seed) {
    const fs::path single = dir / (name + ".single.safetensors");
    test::write_model(single, llama_tensors(seed));
    const Result r = run("edit -q -m pre=" + single.string() + " pre --max-shard-size 1KiB -o " + p(name), dir);
    ASSERT_EQ(r.status, 0) << r.err;
    fs::remove(single);
    nlohmann::ordered_json config = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"},
                                     {"hidden_size", kHidden},                {"intermediate_size", kInter},
                                     {"num_hidden_layers", kLayers},          {"num_attention_heads", 2},
                                     {"num_key_value_heads", 2},              {"vocab_size", kVocab},
                                     {"torch_dtype", "bfloat16"},             {"tie_word_embeddings", false}};
    std::ofstream(dir / name / "config.json") << config.dump(2);
    std::ofstream(dir / name / "tokenizer.json") << R"({"model": {"type": "BPE", "vocab": {"<s>": 0, "a": 1}}})";
    std::ofstream(dir / name / "tokenizer_config.json") << R"({"bos_token": "<s>"})";
  }

  void SetUp() override {
    // Stand-ins for the Hugging Face ids of mergekit's examples (same architecture, as there).
    const char* names[] = {"orca_mini_v3_13b", "Platypus2-13B", "WizardLM-13B-V1.2", "WizardMath-13B-V1.0",
                           "Llama-2-13B-fp16", "Mistral-7B-Instruct-v0.2", "BioMistral-7B", "Mistral-7B-v0.1",
                           "model_a", "model_b"};
    unsigned seed = 1;
    for (const char* n : names) make_model(n, seed++);
  }

  Result merge(const std::string& recipe_name, const std::string& yaml, const std::string& out) {
    std::ofstream(dir / recipe_name) << yaml;
    return run("merge -q " + recipe_name + " " + out, dir);
  }

  static std::string layer(int l, const std::string& rest) { return "model.layers." + std::to_string(l) + "." + rest; }
};

// examples/orcamini-platy-44layer.yml: a frankenmerge stacking layers of two models.
TEST_F(MergekitRecipes, PassthroughSlicesStackAndRenumberLayers) {
  const Result r = merge("stack.yml", R"(slices:
  - sources:
    - model: orca_mini_v3_13b
      layer_range: [0, 3]
  - sources:
    - model: Platypus2-13B
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
)", "stacked");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "stacked", a = dir / "orca_mini_v3_13b", b = dir / "Platypus2-13B";
  // Output layers 0-2 are orca's 0-2, 3-5 are Platypus's 1-3 (bf16 -> f16 is exact for these values).
  for (int l = 0; l < 6; ++l) {
    const fs::path& from = l < 3 ? a : b;
    const int in = l < 3 ? l : l - 2;
    for (const std::string t : {"self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"})
      EXPECT_EQ(read_values(out, layer(l, t)), read_values(from, layer(in, t))) << l << " " << t;
  }
  EXPECT_EQ(Checkpoint::open(out).find(layer(5, "mlp.up_proj.weight"))->info->dtype, DType::kF16);
  EXPECT_EQ(Checkpoint::open(out).find(layer(6, "mlp.up_proj.weight")), nullptr);
  // Embeddings from the first slice's model, the final norm and head from the last slice's.
  EXPECT_EQ(read_values(out, "model.embed_tokens.weight"), read_values(a, "model.embed_tokens.weight"));
  EXPECT_EQ(read_values(out, "model.norm.weight"), read_values(b, "model.norm.weight"));
  EXPECT_EQ(read_values(out, "lm_head.weight"), read_values(b, "lm_head.weight"));
  const auto config = nlohmann::json::parse(read_text(out / "config.json"));
  EXPECT_EQ(config["num_hidden_layers"], 6);
  EXPECT_EQ(config["torch_dtype"], "float16");
  EXPECT_EQ(Checkpoint::open(out).tensor_names().size(), 6u * 9u + 3u);
}

// Frankenmerges stack models of different depths: their config.json's num_hidden_layers may differ
// without --allow-crimes (mergekit's check compares the architecture, not the depth); other keys may not.
TEST_F(MergekitRecipes, SlicesAcceptSourcesOfDifferentDepths) {
  auto config = nlohmann::json::parse(read_text(dir / "Platypus2-13B" / "config.json"));
  config["num_hidden_layers"] = 6;
  std::ofstream(dir / "Platypus2-13B" / "config.json") << config.dump(2);
  const std::string slices = "slices:\n  - sources:\n    - model: orca_mini_v3_13b\n      layer_range: [0, 2]\n"
                             "  - sources:\n    - model: Platypus2-13B\n      layer_range: [2, 4]\n"
                             "merge_method: passthrough\n";
  Result r = merge("deep.yml", slices, "deep");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(read_text(dir / "deep" / "config.json"))["num_hidden_layers"], 4);
  config["hidden_size"] = 16;
  std::ofstream(dir / "Platypus2-13B" / "config.json") << config.dump(2);
  Result refused = merge("deep2.yml", slices, "deep2");
  EXPECT_EQ(refused.status, 5) << refused.err;
  EXPECT_NE(refused.err.find("hidden_size"), std::string::npos) << refused.err;
  EXPECT_EQ(refused.err.find("  num_hidden_layers "), std::string::npos) << refused.err;
}

// examples/gradient-slerp.yml, in both of its forms: one full slice and models: give the same bytes.
TEST_F(MergekitRecipes, GradientSlerpSliceAndModelsFormsAgree) {
  const std::string params = R"(merge_method: slerp
base_model: orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
)";
  Result s = merge("slices.yml", R"(slices:
  - sources:
      - model: orca_mini_v3_13b
        layer_range: [0, 4]
      - model: Platypus2-13B
        layer_range: [0, 4]
)" + params, "from_slices");
  ASSERT_EQ(s.status, 0) << s.err;
  Result m = merge("models.yml", "models:\n  - model: orca_mini_v3_13b\n  - model: Platypus2-13B\n" + params, "from_models");
  ASSERT_EQ(m.status, 0) << m.err;
  const Checkpoint a = Checkpoint::open(dir / "from_slices");
  ASSERT_EQ(a.tensor_names(), Checkpoint::open(dir / "from_models").tensor_names());
  for (const auto& name : a.tensor_names())
    EXPECT_EQ(read_tensor_bytes(dir / "from_slices", name), read_tensor_bytes(dir / "from_models", name)) << name;
  // t = 0 at layer 0 of self_attn: the base (orca); t = 1 at the last layer: Platypus.
  EXPECT_EQ(read_values(dir / "from_models", layer(0, "self_attn.k_proj.weight")),
            read_values(dir / "orca_mini_v3_13b", layer(0, "self_attn.k_proj.weight")));
  EXPECT_EQ(read_values(dir / "from_models", layer(3, "self_attn.k_proj.weight")),
            read_values(dir / "Platypus2-13B", layer(3, "self_attn.k_proj.weight")));
  EXPECT_EQ(read_values(dir / "from_models", layer(0, "mlp.up_proj.weight")),
            read_values(dir / "Platypus2-13B", layer(0, "mlp.up_proj.weight")));
}

// examples/linear.yml: the weighted average with normalize (mergekit's default), in float16.
TEST_F(MergekitRecipes, LinearIsTheWeightedAverage) {
  Result r = merge("linear.yml", R"(models:
  - model: orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
)", "linear");
  ASSERT_EQ(r.status, 0) << r.err;
  const std::string t = layer(2, "mlp.gate_proj.weight");
  const auto a = read_values(dir / "orca_mini_v3_13b", t), b = read_values(dir / "WizardLM-13B-V1.2", t),
             c = read_values(dir / "Platypus2-13B", t), got = read_values(dir / "linear", t);
  ASSERT_EQ(got.size(), a.size());
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double want = (1.0 * a[i] + 0.3 * b[i] + 0.5 * c[i]) / 1.8;
    EXPECT_NEAR(got[i], want, 1e-3 * std::max(1.0, std::fabs(want))) << i;  // f16 rounding
  }
}

// examples/ties.yml, examples/bio-merge.yml and examples/arcee_fusion.yml run as written.
TEST_F(MergekitRecipes, TiesBioMergeAndArceeFusionRunAsWritten) {
  Result ties = merge("ties.yml", R"(models:
  - model: orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
)", "ties");
  EXPECT_EQ(ties.status, 0) << ties.err;
  EXPECT_EQ(ties.err.find("taskvec: error"), std::string::npos) << ties.err;  // warnings for the tiny norms only
  Result bio = merge("bio.yml", R"(models:
  - model: Mistral-7B-Instruct-v0.2
    parameters:
      density: 0.5
      weight: 0.5
  - model: BioMistral-7B
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: Mistral-7B-v0.1
parameters:
  normalize: false
  int8_mask: true
dtype: float16
)", "bio");
  EXPECT_EQ(bio.status, 0) << bio.err;
  Result fusion = merge("fusion.yml", R"(models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
)", "fusion");
  EXPECT_EQ(fusion.status, 0) << fusion.err;
  for (const char* out : {"ties", "bio", "fusion"}) {
    EXPECT_TRUE(fs::exists(dir / out / "mergekit_config.yml")) << out;
    EXPECT_EQ(Checkpoint::open(dir / out).tensor_names().size(), 4u * 9u + 3u) << out;
  }
  // bio-merge, computed here: per model keep the int(0.5 * 8) = 4 largest |delta| (ties: lower index),
  // weight 0.5, elect the sign of the sum (+ on 0), sum the agreeing ones (normalize: false), then f16.
  const std::string t = "model.norm.weight";
  const auto base = read_values(dir / "Mistral-7B-v0.1", t), got = read_values(dir / "bio", t);
  std::vector<std::vector<double>> c;
  for (const char* m : {"Mistral-7B-Instruct-v0.2", "BioMistral-7B"}) {
    const auto x = read_values(dir / m, t);
    std::vector<double> d(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) d[i] = x[i] - base[i];
    std::vector<std::size_t> order(d.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t i, std::size_t j) { return std::fabs(d[i]) > std::fabs(d[j]); });
    std::vector<double> kept(d.size(), 0.0);
    for (std::size_t r = 0; r < d.size() / 2; ++r) kept[order[r]] = 0.5 * d[order[r]];
    c.push_back(kept);
  }
  ASSERT_EQ(got.size(), base.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double sum = c[0][i] + c[1][i];
    const double sign = sum >= 0 ? 1 : -1;
    double merged = 0;
    for (const auto& ci : c) merged += (ci[i] != 0 && (ci[i] > 0) == (sign > 0)) ? ci[i] : 0.0;
    const double want = base[i] + merged;
    EXPECT_NEAR(got[i], want, 1e-3 * std::max(1.0, std::fabs(want))) << i;
  }
}

// docs/multimerge.md's example (mergekit-multi): named stages, a stage's name as a model, the unnamed
// final stage written to the output; the same bytes as running the three recipes one after the other.
TEST_F(MergekitRecipes, MultiStageRecipeRunsItsStagesInDependencyOrder) {
  const std::string first = "merge_method: linear\nmodels:\n  - model: Mistral-7B-v0.1\n  - model: BioMistral-7B\n"
                            "parameters:\n  weight: 0.5\n";
  const std::string second = "merge_method: slerp\nbase_model: first-merge\nmodels:\n  - model: model_a\nparameters:\n  t: 0.5\n";
  const std::string final_stage = "merge_method: dare_ties\nbase_model: Mistral-7B-v0.1\nmodels:\n"
                                  "  - model: second-merge\n    parameters:\n      density: 0.6\n      weight: 0.5\n"
                                  "  - model: model_b\n    parameters:\n      density: 0.8\n      weight: 0.5\nseed: 3\n";
  // The final stage first in the file: the order comes from the references, not from the file.
  std::ofstream(dir / "multi.yml") << final_stage << "---\nname: second-merge\n" << second << "---\nname: first-merge\n" << first;
  Result r = run("merge -q multi.yml final", dir);
  ASSERT_EQ(r.status, 0) << r.err;
  // By hand: each stage as its own recipe, the outputs named as the stages.
  ASSERT_EQ(merge("1.yml", first, "first-merge").status, 0);
  ASSERT_EQ(merge("2.yml", second, "second-merge").status, 0);
  ASSERT_EQ(merge("3.yml", final_stage, "by_hand").status, 0);
  const Checkpoint out = Checkpoint::open(dir / "final");
  ASSERT_EQ(out.tensor_names(), Checkpoint::open(dir / "by_hand").tensor_names());
  for (const auto& name : out.tensor_names())
    EXPECT_EQ(read_tensor_bytes(dir / "final", name), read_tensor_bytes(dir / "by_hand", name)) << name;
  // The model card names the stages the final merge read, not their temporary folders.
  const std::string card = read_text(dir / "final" / "README.md");
  EXPECT_NE(card.find("* stage second-merge\n"), std::string::npos) << card;
  EXPECT_EQ(card.find(".taskvec-stages-"), std::string::npos) << card;
  // The temporary folder of intermediates is gone.
  for (const auto& e : fs::directory_iterator(dir.path()))
    EXPECT_EQ(e.path().filename().string().rfind(".taskvec-stages-", 0), std::string::npos) << e.path();
  // One left by a run that was killed (its process is gone) is removed by the next run; one of a live
  // process (this test's) is not.
  const pid_t child = fork();
  if (child == 0) _exit(0);
  ASSERT_GT(child, 0);
  waitpid(child, nullptr, 0);
  const fs::path stale = dir / (".taskvec-stages-" + std::to_string(child) + "-0badf00d");
  const fs::path live = dir / (".taskvec-stages-" + std::to_string(getpid()) + "-00000001");
  fs::create_directories(stale / "first-merge");
  fs::create_directories(live);
  std::ofstream(stale / "first-merge" / "model.safetensors") << "left behind";
  ASSERT_EQ(run("merge -q --force multi.yml final", dir).status, 0);
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_TRUE(fs::exists(live));
  fs::remove_all(live);

  // --intermediate-dir keeps the stages and reuses them on the next run (mergekit-multi's lazy default).
  Result kept = run("merge multi.yml kept --intermediate-dir stages", dir);
  ASSERT_EQ(kept.status, 0) << kept.err;
  EXPECT_TRUE(fs::exists(dir / "stages" / "first-merge" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(dir / "stages" / "second-merge"));
  Result again = run("merge --force multi.yml kept --intermediate-dir stages", dir);
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_NE(again.err.find("stage 'first-merge': stages/first-merge exists already and is used as it is (--no-lazy "
                           "recomputes it)"),
            std::string::npos)
      << again.err;
  for (const auto& name : out.tensor_names())
    EXPECT_EQ(read_tensor_bytes(dir / "kept", name), read_tensor_bytes(dir / "final", name)) << name;

  // A cycle, and two final stages, are refused before anything is merged.
  std::ofstream(dir / "cycle.yml") << "name: a\nmerge_method: linear\nmodels: [b, model_a]\n---\nname: b\n"
                                      "merge_method: linear\nmodels: [a, model_b]\n---\nmerge_method: linear\nmodels: [a]\n";
  Result cycle = run("merge cycle.yml c", dir);
  EXPECT_EQ(cycle.status, 2) << cycle.err;
  EXPECT_NE(cycle.err.find("the stages a, b use each other's outputs in a cycle"), std::string::npos) << cycle.err;
  std::ofstream(dir / "two.yml") << "name: a\nmerge_method: linear\nmodels: [model_a]\n---\nname: b\n"
                                    "merge_method: linear\nmodels: [model_b]\n";
  Result two = run("merge two.yml t", dir);
  EXPECT_EQ(two.status, 2) << two.err;
  EXPECT_NE(two.err.find("2 stages are used by no other (a, b)"), std::string::npos) << two.err;
  EXPECT_FALSE(fs::exists(dir / "c"));
  EXPECT_FALSE(fs::exists(dir / "t"));
}

}  // namespace
}  // namespace taskvec
