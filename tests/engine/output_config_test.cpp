// config.json and tokenizer helpers of src/engine/output_config.cpp (issue 10): tie flags at every
// level, the rewritten config, the ids tokenizer files name, and the config keys inputs must agree on.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "../src/engine/internal.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using test::TempDir;

void write_text(const fs::path& path, const std::string& text) { std::ofstream(path, std::ios::binary) << text; }

// A folder checkpoint with one embedding of `rows` x 1 and the given config.json ("" for none).
Checkpoint folder_model(const TempDir& dir, const std::string& name, std::uint64_t rows, const std::string& config) {
  const fs::path folder = dir.subdir(name);
  test::write_model(folder / "model.safetensors",
                    {{"model.embed_tokens.weight", DType::kF32, {rows, 1}, std::vector<double>(rows, 1.0)}});
  if (!config.empty()) write_text(folder / "config.json", config);
  return Checkpoint::open(folder);
}

TEST(OutputConfig, TieFlagsAreReadAtEveryLevel) {
  TempDir dir;
  EXPECT_EQ(detail::config_ties_embeddings(folder_model(dir, "none", 2, "")), std::nullopt);
  EXPECT_EQ(detail::config_ties_embeddings(folder_model(dir, "noflag", 2, R"({"model_type": "llama"})")), std::nullopt);
  EXPECT_EQ(detail::config_ties_embeddings(folder_model(dir, "top", 2, R"({"tie_word_embeddings": false})")), false);
  EXPECT_EQ(detail::config_ties_embeddings(
                folder_model(dir, "nested", 2, R"({"text_config": {"tie_word_embeddings": true}})")),
            true);
  EXPECT_EQ(detail::config_ties_embeddings(
                folder_model(dir, "nested_false", 2, R"({"text_config": {"tie_word_embeddings": false}})")),
            false);
  // Any true wins: transformers ties the language model from its own sub-config.
  EXPECT_EQ(detail::config_ties_embeddings(folder_model(
                dir, "mixed", 2, R"({"tie_word_embeddings": false, "text_config": {"tie_word_embeddings": true}})")),
            true);
  EXPECT_EQ(detail::config_ties_embeddings(folder_model(dir, "broken", 2, "{not json")), std::nullopt);
}

TEST(OutputConfig, RewriteUntiesEveryLevelAndSetsVocabSize) {
  TempDir dir;
  write_text(dir / "config.json", R"({"model_type": "llava", "vocab_size": 4,
      "text_config": {"tie_word_embeddings": true, "vocab_size": 4, "decoder_extra": {"tie_word_embeddings": true}},
      "vision_config": {"hidden_size": 3}})");
  const Json got = Json::parse(detail::rewrite_config(dir / "config.json", true, 7));
  const Json expected = Json::parse(R"({"model_type": "llava", "vocab_size": 7,
      "text_config": {"tie_word_embeddings": false, "vocab_size": 7, "decoder_extra": {"tie_word_embeddings": false}},
      "vision_config": {"hidden_size": 3}, "tie_word_embeddings": false})");
  EXPECT_EQ(got, expected) << got.dump(2);
  // Vocabulary only: no tie flag is added.
  const Json vocab_only = Json::parse(detail::rewrite_config(dir / "config.json", false, 5));
  EXPECT_FALSE(vocab_only.contains("tie_word_embeddings"));
  EXPECT_EQ(vocab_only["text_config"]["tie_word_embeddings"], true);
  EXPECT_EQ(vocab_only["vocab_size"], 5);
  EXPECT_EQ(vocab_only["text_config"]["vocab_size"], 5);
  write_text(dir / "bad.json", "[1, 2]");
  try {
    detail::rewrite_config(dir / "bad.json", true, std::nullopt);
    FAIL() << "a config that is not an object was rewritten";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
    EXPECT_NE(std::string(e.what()).find("bad.json"), std::string::npos) << e.what();
  }
}

TEST(OutputConfig, TokenizerIdsOfEachFile) {
  TempDir dir;
  write_text(dir / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 7, "c": 2}},
      "added_tokens": [{"id": 3, "content": "<s>"}]})");
  write_text(dir / "added_tokens.json", R"({"<x>": 11, "<y>": 10})");
  write_text(dir / "tokenizer_config.json", R"({"added_tokens_decoder": {"12": {}, "not-an-id": {}, "5": {}}})");
  const auto ids = detail::tokenizer_ids(dir.path());
  ASSERT_EQ(ids.size(), 3u);
  EXPECT_EQ(ids[0].file, dir / "tokenizer.json");
  EXPECT_EQ(ids[0].max_id, 7u);
  EXPECT_EQ(ids[1].file, dir / "added_tokens.json");
  EXPECT_EQ(ids[1].max_id, 11u);
  EXPECT_EQ(ids[2].file, dir / "tokenizer_config.json");
  EXPECT_EQ(ids[2].max_id, 12u);
  // Unigram: a list of [piece, score]; the ids are the indices.
  TempDir unigram;
  write_text(unigram / "tokenizer.json", R"({"model": {"type": "Unigram", "vocab": [["a", 0.0], ["b", -1.0], ["c", -2.0]]}})");
  const auto u = detail::tokenizer_ids(unigram.path());
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].max_id, 2u);
  EXPECT_TRUE(detail::tokenizer_ids(dir.subdir("empty")).empty());
}

TEST(OutputConfig, InputChecksWarnPerDifferingKeyAndPerTokenizerPastItsRows) {
  TempDir dir;
  Checkpoint a = folder_model(dir, "a", 4, R"({"model_type": "llama", "num_key_value_heads": 2, "vocab_size": 4,
      "architectures": ["LlamaForCausalLM"], "intermediate_size": 16, "rope_theta": 1.0})");
  Checkpoint b = folder_model(dir, "b", 4, R"({"model_type": "llama", "num_key_value_heads": 8, "vocab_size": 6,
      "architectures": ["MistralForCausalLM"], "intermediate_size": 16, "rope_theta": 2.0})");
  write_text(dir / "b" / "added_tokens.json", R"({"<x>": 4})");  // id 4 with 4 rows
  std::vector<std::string> warnings;
  detail::check_input_configs(std::vector<const Checkpoint*>{&a, &b}, false, warnings);
  std::string all;
  for (const auto& w : warnings) all += w + "\n";
  ASSERT_EQ(warnings.size(), 4u) << all;
  EXPECT_NE(warnings[0].find("added_tokens.json: names token id 4"), std::string::npos) << warnings[0];
  const std::string fa = (dir / "a" / "config.json").string(), fb = (dir / "b" / "config.json").string();
  EXPECT_NE(warnings[1].find("architectures: [\"LlamaForCausalLM\"] in " + fa + " but [\"MistralForCausalLM\"] in " + fb),
            std::string::npos)
      << warnings[1];
  EXPECT_NE(warnings[2].find("num_key_value_heads: 2 in " + fa + " but 8 in " + fb), std::string::npos) << warnings[2];
  EXPECT_NE(warnings[3].find("vocab_size: 4 in " + fa + " but 6 in " + fb), std::string::npos) << warnings[3];
  // --merge-extra-rows explains a vocab_size difference.
  warnings.clear();
  detail::check_input_configs(std::vector<const Checkpoint*>{&a, &b}, true, warnings);
  EXPECT_EQ(warnings.size(), 3u);
  // A tokenizer.json that does not parse is a warning naming it, not a refused edit; an input given
  // twice is checked once.
  write_text(dir / "a" / "tokenizer.json", "{broken");
  warnings.clear();
  detail::check_input_configs(std::vector<const Checkpoint*>{&a, &a}, false, warnings);
  ASSERT_EQ(warnings.size(), 1u);
  EXPECT_NE(warnings[0].find((dir / "a" / "tokenizer.json").string() + ": cannot parse it"), std::string::npos)
      << warnings[0];
}

TEST(OutputConfig, OutputVocabNamesTheInputWithAllRows) {
  TempDir dir;
  std::vector<Checkpoint> inputs;
  inputs.push_back(folder_model(dir, "base", 4, ""));
  inputs.push_back(folder_model(dir, "five", 5, ""));
  inputs.push_back(folder_model(dir, "six", 6, ""));
  const CheckpointPlan plan = CheckpointPlan::build(dir / "out", {{"model.embed_tokens.weight", DType::kF32, {6, 1}}}, {}, {});
  const detail::OutputVocab vocab = detail::output_vocab(plan, inputs);
  EXPECT_EQ(vocab.rows, 6u);
  EXPECT_EQ(vocab.donor, &inputs[2]);
  const CheckpointPlan same = CheckpointPlan::build(dir / "out", {{"model.embed_tokens.weight", DType::kF32, {4, 1}}}, {}, {});
  EXPECT_EQ(detail::output_vocab(same, inputs).rows, 0u);
}

}  // namespace
}  // namespace taskvec
