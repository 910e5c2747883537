// Issue 10, "an output folder that agrees with itself", end to end through the taskvec binary: the
// config.json taskvec rewrites goes through the checked atomic writer ($TMPDIR missing, a full disk),
// tie flags at every level, merge --untie-embeddings, every flag an error suggests exists on its
// command, a resized vocabulary gets the tokenizer and vocab_size of its rows, and differing configs warn.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "support/model_files.hpp"
#include "cli/cli_run.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using test::read_values;
using test::TempDir;
using test::write_model;

using test::Result;
using test::run;

using test::read_text;

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

Json read_json(const fs::path& path) { return Json::parse(read_text(path)); }

// The "taskvec: warning: " lines of stderr that contain `needle`.
std::vector<std::string> warnings_with(const std::string& err, const std::string& needle) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos < err.size()) {
    std::size_t end = err.find('\n', pos);
    if (end == std::string::npos) end = err.size();
    std::string line = err.substr(pos, end - pos);
    if (line.starts_with("taskvec: warning: ") && line.find(needle) != std::string::npos) out.push_back(line);
    pos = end + 1;
  }
  return out;
}

class TrustOutputs : public ::testing::Test {
 protected:
  // A tied base folder (no lm_head.weight) and a fine-tune folder with its own head, same config.
  void make_tied_pair(const Json& config) {
    fs::create_directories(dir / "pre");
    fs::create_directories(dir / "ft");
    write_model(dir / "pre" / "model.safetensors", {{"model.embed_tokens.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
    write_model(dir / "ft" / "model.safetensors", {{"model.embed_tokens.weight", DType::kF32, {2, 2}, {2, 2, 3, 4}},
                                                   {"lm_head.weight", DType::kF32, {2, 2}, {5, 6, 7, 8}}});
    write_text(dir / "pre" / "config.json", config.dump(2));
    write_text(dir / "ft" / "config.json", config.dump(2));
  }
  std::string untie_edit(const std::string& out) const {
    return "edit -q -m pre=" + p("pre") + " -m ft=" + p("ft") + " 'pre + tau(ft)' --untie-embeddings -o " + p(out);
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  TempDir dir;
};

Json llama_config() {
  return Json::parse(R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2,
                         "num_hidden_layers": 1, "rope_theta": 10000.0, "torch_dtype": "float32",
                         "tie_word_embeddings": true, "vocab_size": 2})");
}

// Regression ($TMPDIR bug, fixed in a77d8dc): the rewritten config.json was written through a scratch
// file under $TMPDIR, outside the checked writer; a missing $TMPDIR was exit 1. Now it is written into
// the output folder like the shards: the edit succeeds and config.json is the base's, untied.
TEST_F(TrustOutputs, UntieWithAMissingTmpdirWritesTheBaseConfigUntied) {
  make_tied_pair(llama_config());
  Result r = run(untie_edit("out"), dir, "TMPDIR=" + p("no-such-folder") + " ");
  ASSERT_EQ(r.status, 0) << r.err;
  Json expected = llama_config();
  expected["tie_word_embeddings"] = false;
  const Json got = read_json(dir / "out" / "config.json");
  EXPECT_EQ(got, expected) << got.dump(2);  // every key, in order, the same values
  // lm_head = pre's tied head + (ft's head - pre's tied head) = ft's head.
  EXPECT_EQ(read_values(dir / "out", "lm_head.weight"), (std::vector<double>{5, 6, 7, 8}));
  EXPECT_FALSE(fs::exists(dir / "no-such-folder"));
}

// A full disk while the rewritten config.json is written (RLIMIT_FSIZE: the shard fits, the 64 KiB
// config does not): exit 7, and neither config.json nor the model is published.
TEST_F(TrustOutputs, UntieOnAFullDiskPublishesNoConfig) {
  Json config = llama_config();
  config["padding_note"] = std::string(64 << 10, 'x');
  make_tied_pair(config);
  Result r = run(untie_edit("out"), dir, "ulimit -f 8 && trap '' XFSZ && ");
  EXPECT_EQ(r.status, 7) << r.err;
  EXPECT_NE(r.err.find("disk_full"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out" / "config.json"));
  EXPECT_FALSE(fs::exists(dir / "out" / "model.safetensors"));
}

// A multimodal config whose only tie flag is text_config.tie_word_embeddings: true. Untying must set it
// false too (transformers re-ties from it at load and drops the merged head), and add a top-level false.
TEST_F(TrustOutputs, UntieRewritesANestedTieFlag) {
  Json config = Json::parse(R"({"model_type": "llava", "text_config": {"model_type": "llama",
                                "tie_word_embeddings": true, "hidden_size": 2}, "vision_config": {"hidden_size": 4}})");
  make_tied_pair(config);
  Result r = run(untie_edit("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  Json expected = config;
  expected["text_config"]["tie_word_embeddings"] = false;
  expected["tie_word_embeddings"] = false;
  EXPECT_EQ(read_json(dir / "out" / "config.json"), expected);
  EXPECT_EQ(read_values(dir / "out", "lm_head.weight"), (std::vector<double>{5, 6, 7, 8}));
}

// A nested false (and no true anywhere) says the base is untied: its missing head is simply missing,
// not read from the embedding (exit 5, tensor_missing), as a top-level false already did.
TEST_F(TrustOutputs, NestedFalseTieFlagMeansNotTied) {
  make_tied_pair(Json::parse(R"({"model_type": "llava", "text_config": {"tie_word_embeddings": false}})"));
  Result r = run(untie_edit("out"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_NE(r.err.find("tensor_missing"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

// merge accepts --untie-embeddings (its error suggests it): the output has its own head (the tied base's
// embedding for a task-arithmetic merge of lambda 1 = pre + (ft - pre) = ft's head) and an untied config.
TEST_F(TrustOutputs, MergeUntiesEmbeddings) {
  make_tied_pair(llama_config());
  write_text(dir / "ta.yaml", "merge_method: task_arithmetic\nbase_model: " + p("pre") + "\nmodels:\n  - model: " +
                                  p("ft") + "\nparameters:\n  lambda: 1.0\n");
  Result refused = run("merge -q " + p("ta.yaml") + " -o " + p("refused"), dir);
  EXPECT_EQ(refused.status, 5) << refused.err;
  EXPECT_NE(refused.err.find("--untie-embeddings"), std::string::npos) << refused.err;
  Result r = run("merge -q " + p("ta.yaml") + " --untie-embeddings -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_values(dir / "out", "lm_head.weight"), (std::vector<double>{5, 6, 7, 8}));
  EXPECT_EQ(read_values(dir / "out", "model.embed_tokens.weight"), (std::vector<double>{2, 2, 3, 4}));
  EXPECT_EQ(read_json(dir / "out" / "config.json")["tie_word_embeddings"], false);
  EXPECT_EQ(warnings_with(r.err, "--untie-embeddings: lm_head.weight of").size(), 1u) << r.err;
}

// Every flag an error message suggests is accepted by each command whose errors can print it. The sites:
//   --untie-embeddings  src/engine/embeddings.cpp reconcile_tied_embeddings  (linear_edit: diff, apply, edit;
//                       merge_driver: merge)
//   --merge-extra-rows  src/engine/linear_edit.cpp plan_jobs shape mismatch   (diff, apply, edit; merge's
//                       shape error does not suggest it)
//   --force             src/format/checkpoint_writer.cpp (existing output), linear_edit.cpp (task vector of
//                       another base: apply)                                   (diff, apply, edit, merge)
//   --allow-nonfinite   src/engine/linear_edit.cpp, merge_driver.cpp          (diff, apply, edit, merge)
//   --memory-budget     src/engine/merge_driver.cpp (an SVD method's working set)  (merge; the linear
//                       commands have it too)
// similarity, inspect and validate print none of them.
struct SuggestedFlag {
  std::string flag;
  std::string site;  // a source file whose error messages suggest it
  std::vector<std::string> commands;
};

class FlagSuggested : public ::testing::TestWithParam<SuggestedFlag> {};

TEST_P(FlagSuggested, ExistsOnEveryCommandWhoseErrorsSuggestIt) {
  const SuggestedFlag& s = GetParam();
  TempDir dir;
  for (const auto& command : s.commands) {
    Result r = run(command + " --help", dir);
    EXPECT_EQ(r.status, 0) << command << ": " << r.err;
    EXPECT_NE(r.out.find(s.flag + " "), std::string::npos) << "taskvec " << command << " --help does not list " << s.flag;
  }
  // The error site quoted above still prints the flag (so this list stays the one to check).
  EXPECT_NE(read_text(fs::path(TASKVEC_SOURCE_DIR) / s.site).find(s.flag), std::string::npos) << s.site;
}

INSTANTIATE_TEST_SUITE_P(
    TrustOutputs, FlagSuggested,
    ::testing::Values(SuggestedFlag{"--untie-embeddings", "src/engine/embeddings.cpp", {"diff", "apply", "edit", "merge"}},
                      SuggestedFlag{"--merge-extra-rows", "src/engine/linear_edit.cpp", {"diff", "apply", "edit"}},
                      SuggestedFlag{"--force", "src/format/checkpoint_writer.cpp", {"diff", "apply", "edit", "merge"}},
                      SuggestedFlag{"--allow-nonfinite", "src/engine/merge_driver.cpp", {"diff", "apply", "edit", "merge"}},
                      SuggestedFlag{"--memory-budget", "src/engine/merge_driver.cpp", {"diff", "apply", "edit", "merge"}}),
    [](const ::testing::TestParamInfo<SuggestedFlag>& info) {
      std::string name;
      for (char c : info.param.flag) {
        if (c != '-') name += c;
      }
      return name;
    });

// --merge-extra-rows: a fine-tune with 2 added tokens (6 embedding rows against the base's 4). The output
// has 6 rows, so its tokenizer files are the fine-tune's (added_tokens.json included; the base-only
// special_tokens_map.json is not mixed in) and config.json is the base's with vocab_size 6.
class ResizedVocab : public TrustOutputs {
 protected:
  void SetUp() override {
    fs::create_directories(dir / "pre");
    fs::create_directories(dir / "ft");
    write_model(dir / "pre" / "model.safetensors", {{"model.embed_tokens.weight", DType::kF32, {4, 2}, {1, 2, 3, 4, 5, 6, 7, 8}},
                                                    {"model.norm.weight", DType::kF32, {2}, {1, 1}}});
    write_model(dir / "ft" / "model.safetensors",
                {{"model.embed_tokens.weight", DType::kF32, {6, 2}, {2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}},
                 {"model.norm.weight", DType::kF32, {2}, {1, 2}}});
    write_text(dir / "pre" / "config.json", base_config().dump(2));
    Json ft_config = base_config();
    ft_config["vocab_size"] = 6;
    write_text(dir / "ft" / "config.json", ft_config.dump(2));
    write_text(dir / "pre" / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "d": 3}},
                                                 "added_tokens": []})");
    write_text(dir / "pre" / "special_tokens_map.json", R"({"bos_token": "a"})");
    write_text(dir / "ft" / "tokenizer.json",
               R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "d": 3}},
                   "added_tokens": [{"id": 4, "content": "<x>"}, {"id": 5, "content": "<y>"}]})");
    write_text(dir / "ft" / "added_tokens.json", R"({"<x>": 4, "<y>": 5})");
    write_text(dir / "ft" / "tokenizer_config.json",
               R"({"added_tokens_decoder": {"4": {"content": "<x>"}, "5": {"content": "<y>"}}})");
  }
  static Json base_config() {
    return Json::parse(R"({"model_type": "llama", "hidden_size": 2, "vocab_size": 4, "text_config": {"vocab_size": 4}})");
  }
  std::string resized_edit(const std::string& out) const {
    return "edit -q -m pre=" + p("pre") + " -m ft=" + p("ft") + " 'pre + tau(ft)' --merge-extra-rows -o " + p(out);
  }
};

TEST_F(ResizedVocab, OutputTakesTheTokenizerAndVocabSizeOfItsRows) {
  Result r = run(resized_edit("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  // Rows 0..3: pre + (ft - pre) = ft; rows 4, 5 copied from ft.
  EXPECT_EQ(read_values(dir / "out", "model.embed_tokens.weight"),
            (std::vector<double>{2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}));
  Json expected = base_config();
  expected["vocab_size"] = 6;
  expected["text_config"]["vocab_size"] = 6;
  EXPECT_EQ(read_json(dir / "out" / "config.json"), expected);
  for (const char* f : {"tokenizer.json", "added_tokens.json", "tokenizer_config.json"}) {
    EXPECT_EQ(read_text(dir / "out" / f), read_text(dir / "ft" / f)) << f;
  }
  EXPECT_FALSE(fs::exists(dir / "out" / "special_tokens_map.json"));
  // The only warning names the copied rows: no tokenizer id past the rows, no config difference.
  EXPECT_EQ(warnings_with(r.err, "").size(), 1u) << r.err;
  EXPECT_EQ(warnings_with(r.err, "rows 4..5 are not in the pretrained checkpoint").size(), 1u) << r.err;
}

TEST_F(ResizedVocab, TokenizerIdPastTheRowsIsAWarning) {
  write_text(dir / "ft" / "added_tokens.json", R"({"<x>": 4, "<y>": 5, "<z>": 9})");
  Result r = run(resized_edit("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  // Once for the input (6 rows of ft), once for the output (which takes ft's tokenizer).
  const auto w = warnings_with(r.err, (dir / "ft" / "added_tokens.json").string() + ": names token id 9");
  ASSERT_EQ(w.size(), 2u) << r.err;
  EXPECT_NE(w[0].find("has 6 embedding rows"), std::string::npos) << w[0];
  EXPECT_NE(w[1].find("the output"), std::string::npos) << w[1];
}

// Inputs whose config.json differ on architecture keys merge silently when tensor shapes agree: one
// warning per differing key (top level and text_config), naming both values and both files, from edit
// and from merge alike.
TEST_F(TrustOutputs, DifferingConfigsWarnPerKey) {
  fs::create_directories(dir / "pre");
  fs::create_directories(dir / "ft");
  write_model(dir / "pre" / "model.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "ft" / "model.safetensors", {{"w", DType::kF32, {2}, {2, 2}}});
  write_text(dir / "pre" / "config.json", R"({"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2,
      "vocab_size": 4, "text_config": {"num_hidden_layers": 2}})");
  write_text(dir / "ft" / "config.json", R"({"model_type": "mistral", "hidden_size": 4096, "num_attention_heads": 2,
      "vocab_size": 5, "text_config": {"num_hidden_layers": 3}})");
  write_text(dir / "ta.yaml", "merge_method: task_arithmetic\nbase_model: " + p("pre") + "\nmodels:\n  - model: " +
                                  p("ft") + "\nparameters:\n  lambda: 1.0\n");
  const std::string a = (dir / "pre" / "config.json").string(), b = (dir / "ft" / "config.json").string();
  // edit warns per key; merge refuses (mergekit's rule) unless --allow-crimes, then warns per key.
  for (const std::string& args : {"edit -q -m pre=" + p("pre") + " -m ft=" + p("ft") + " 'pre + tau(ft)' -o " + p("e"),
                                 "merge -q --allow-crimes " + p("ta.yaml") + " -o " + p("m")}) {
    Result r = run(args, dir);
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(warnings_with(r.err, "config.json differs on").size(), 4u) << r.err;
    EXPECT_EQ(warnings_with(r.err, "differs on model_type: \"llama\" in " + a + " but \"mistral\" in " + b).size(), 1u)
        << r.err;
    EXPECT_EQ(warnings_with(r.err, "differs on hidden_size: 8 in " + a + " but 4096 in " + b).size(), 1u) << r.err;
    EXPECT_EQ(warnings_with(r.err, "differs on vocab_size: 4 in " + a + " but 5 in " + b).size(), 1u) << r.err;
    EXPECT_EQ(warnings_with(r.err, "differs on text_config.num_hidden_layers: 2 in " + a + " but 3 in " + b).size(), 1u)
        << r.err;
  }
  Result refused = run("merge -q " + p("ta.yaml") + " -o " + p("refused"), dir);
  EXPECT_EQ(refused.status, 5) << refused.err;
  EXPECT_NE(refused.err.find("taskvec: error (architecture_mismatch): the inputs' config.json disagree on their "
                             "architecture, so they are not merged (--allow-crimes merges them anyway, as mergekit's flag); 4 differences\n"),
            std::string::npos)
      << refused.err;
  for (const std::string key : {"model_type", "hidden_size", "vocab_size", "text_config.num_hidden_layers"})
    EXPECT_NE(refused.err.find("\n  " + key + " "), std::string::npos) << key << "\n" << refused.err;
  EXPECT_NE(refused.err.find("4096 in " + b), std::string::npos) << refused.err;
  EXPECT_FALSE(fs::exists(dir / "refused"));
}

}  // namespace
}  // namespace taskvec
