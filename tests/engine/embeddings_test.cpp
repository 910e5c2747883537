// Tied word embeddings mixed with an untied head: refused by default, explicit with untie.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

using test::read_values;
using test::TempDir;
using test::write_model;

class TiedEmbeddings : public ::testing::Test {
 protected:
  void SetUp() override {
    // pre: tied (no lm_head.weight, config says so); ft: its own head.
    std::filesystem::create_directories(dir / "pre");
    std::filesystem::create_directories(dir / "ft");
    write_model(dir / "pre" / "model.safetensors",
                {{"model.embed_tokens.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}}, {"model.norm.weight", DType::kF32, {2}, {1, 1}}});
    std::ofstream(dir / "pre" / "config.json") << R"({"model_type": "llama", "tie_word_embeddings": true})";
    write_model(dir / "ft" / "model.safetensors",
                {{"model.embed_tokens.weight", DType::kF32, {2, 2}, {2, 2, 3, 4}},
                 {"model.norm.weight", DType::kF32, {2}, {1, 3}},
                 {"lm_head.weight", DType::kF32, {2, 2}, {5, 2, 3, 0}}});
  }
  TempDir dir;
};

TEST_F(TiedEmbeddings, RefusedByDefaultWithAnExplanation) {
  Checkpoint pre = Checkpoint::open(dir / "pre");
  Checkpoint ft = Checkpoint::open(dir / "ft");
  std::map<std::string, const Checkpoint*> models{{"pre", &pre}, {"ft", &ft}};
  try {
    edit_expression(models, "pre", "pre + tau(ft)", dir / "out", EditOptions{});
    FAIL() << "expected kTensorMissing";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kTensorMissing);
    EXPECT_NE(std::string(e.what()).find("--untie-embeddings"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "out"));
}

TEST_F(TiedEmbeddings, UntieReadsTheHeadFromTheEmbedding) {
  Checkpoint pre = Checkpoint::open(dir / "pre");
  Checkpoint ft = Checkpoint::open(dir / "ft");
  std::map<std::string, const Checkpoint*> models{{"pre", &pre}, {"ft", &ft}};
  EditOptions options;
  options.untie_embeddings = true;
  EditReport r = edit_expression(models, "pre", "pre + 0.5*tau(ft)", dir / "out", options);
  EXPECT_FALSE(r.warnings.empty());
  // head: pre's head is its embedding [1,2,3,4]; ft head [5,2,3,0]: 1 + 0.5*4, 2, 3, 4 - 0.5*4
  EXPECT_EQ(read_values(dir / "out", "lm_head.weight"), (std::vector<double>{3, 2, 3, 2}));
  EXPECT_EQ(read_values(dir / "out", "model.embed_tokens.weight"), (std::vector<double>{1.5, 2, 3, 4}));
  std::ifstream in(dir / "out" / "config.json");
  auto config = nlohmann::json::parse(in);
  EXPECT_EQ(config["tie_word_embeddings"], false);
  EXPECT_EQ(config["model_type"], "llama");
  // The input folder's config is untouched.
  std::ifstream original(dir / "pre" / "config.json");
  EXPECT_EQ(nlohmann::json::parse(original)["tie_word_embeddings"], true);
}

TEST_F(TiedEmbeddings, AllTiedNeedsNothing) {
  write_model(dir / "ft" / "model.safetensors",
              {{"model.embed_tokens.weight", DType::kF32, {2, 2}, {2, 2, 3, 4}}, {"model.norm.weight", DType::kF32, {2}, {1, 3}}});
  Checkpoint pre = Checkpoint::open(dir / "pre");
  Checkpoint ft = Checkpoint::open(dir / "ft");
  std::map<std::string, const Checkpoint*> models{{"pre", &pre}, {"ft", &ft}};
  EditReport r = edit_expression(models, "pre", "pre + tau(ft)", dir / "out", EditOptions{});
  EXPECT_TRUE(r.warnings.empty());
  Checkpoint out = Checkpoint::open(dir / "out");
  EXPECT_EQ(out.find("lm_head.weight"), nullptr);
}

}  // namespace
}  // namespace taskvec

namespace taskvec {
namespace {

// Vocabulary rows: the base has 2 rows of 2, the fine-tuned model 3 (one added token).
class ExtraRows : public ::testing::Test {
 protected:
  void SetUp() override {
    test::write_model(dir / "pre.safetensors", {{"embed", DType::kF32, {2, 2}, {1, 2, 3, 4}}, {"w", DType::kF32, {1}, {1}}});
    test::write_model(dir / "ft.safetensors", {{"embed", DType::kF32, {3, 2}, {2, 2, 3, 6, 7, 8}}, {"w", DType::kF32, {1}, {3}}});
  }
  test::TempDir dir;
};

TEST_F(ExtraRows, RefusedByDefaultNamingBothShapes) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  Checkpoint ft = Checkpoint::open(dir / "ft.safetensors");
  try {
    make_task_vector(pre, ft, dir / "tau.safetensors", EditOptions{});
    FAIL() << "expected kShapeMismatch";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kShapeMismatch);
    EXPECT_NE(std::string(e.what()).find("[2, 2]"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[3, 2]"), std::string::npos) << e.what();
  }
}

TEST_F(ExtraRows, CommonRowsCombinedExtraRowsCopied) {
  Checkpoint pre = Checkpoint::open(dir / "pre.safetensors");
  Checkpoint ft = Checkpoint::open(dir / "ft.safetensors");
  EditOptions options;
  options.merge_extra_rows = true;
  std::map<std::string, const Checkpoint*> models{{"pre", &pre}, {"ft", &ft}};
  EditReport r = edit_expression(models, "pre", "pre + 0.5*tau(ft)", dir / "out.safetensors", options);
  ASSERT_EQ(r.warnings.size(), 1u);
  // rows 0-1: [1,2,3,4] + 0.5*([2,2,3,6] - [1,2,3,4]) = [1.5, 2, 3, 5]; row 2 copied: [7, 8]
  EXPECT_EQ(test::read_values(dir / "out.safetensors", "embed"), (std::vector<double>{1.5, 2, 3, 5, 7, 8}));
  EXPECT_EQ(test::read_values(dir / "out.safetensors", "w"), std::vector<double>{2});
  // diff + apply with the same option gives the fine-tuned model back.
  make_task_vector(pre, ft, dir / "tau.safetensors", options);
  EXPECT_EQ(test::read_values(dir / "tau.safetensors", "embed"), (std::vector<double>{1, 0, 0, 2, 7, 8}));
  Checkpoint tau = Checkpoint::open(dir / "tau.safetensors");
  apply_task_vectors(pre, {{&tau, 1.0}}, dir / "back.safetensors", options);
  EXPECT_EQ(test::read_values(dir / "back.safetensors", "embed"), (std::vector<double>{2, 2, 3, 6, 7, 8}));
}

}  // namespace
}  // namespace taskvec
