// End to end through the taskvec binary (issue 10, "inputs that must not be merged as they are"):
// quantized checkpoints refused before any output exists, full models passed as task vectors, task
// vectors passed as models, merges of models with a head the base lacks, similarity of raw weights.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "support/model_files.hpp"
#include "cli/cli_run.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::TempDir;
using test::write_model;

using test::Result;
using test::run;

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

class TrustInputs : public ::testing::Test {
 protected:
  void SetUp() override {
    write_model(dir / "pre.safetensors", {{"w", DType::kF32, {4}, {1, 2, 3, 4}}});
    write_model(dir / "a.safetensors", {{"w", DType::kF32, {4}, {1.5, 2, 3, 4}}});
    write_model(dir / "b.safetensors", {{"w", DType::kF32, {4}, {1, 2, 3, 5}}});
  }
  std::string p(const std::string& name) const { return (dir / name).string(); }
  void recipe(const std::string& models, const std::string& extra = "") const {
    std::ofstream(dir / "r.yaml") << "merge_method: task_arithmetic\nbase_model: pre.safetensors\nmodels:\n" << models
                                  << extra;
  }
  TempDir dir;
};

TEST_F(TrustInputs, Bitsandbytes4bitFolderIsRefusedBeforeAnyOutput) {
  const fs::path q = dir.subdir("nf4");
  write_model(q / "model.safetensors", {{"w", DType::kU8, {2}, {1, 2}},
                                        {"w.absmax", DType::kF32, {1}, {0.5}},
                                        {"w.quant_map", DType::kF32, {2}, {-1, 1}}});
  std::ofstream(q / "config.json") << R"({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}})";
  recipe("  - model: nf4\n  - model: a.safetensors\n");
  Result r = run("merge " + p("r.yaml") + " -o " + p("out"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_TRUE(has(r.err, "taskvec: error (quantized):")) << r.err;
  EXPECT_TRUE(has(r.err, "bitsandbytes")) << r.err;
  EXPECT_TRUE(has(r.err, "full-precision")) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));
  Result d = run("diff " + p("pre.safetensors") + " " + q.string() + " -o " + p("tau.safetensors"), dir);
  EXPECT_EQ(d.status, 5) << d.err;
  EXPECT_FALSE(fs::exists(dir / "tau.safetensors"));
}

TEST_F(TrustInputs, BlockScaledFp8IsRefusedAndPlainFp8IsNot) {
  const fs::path q = dir.subdir("fp8");
  write_model(dir / "plain8.safetensors", {{"w", DType::kF8E4M3, {4}, {1, 2, 3, 4}}});
  write_model(dir / "plain8b.safetensors", {{"w", DType::kF8E4M3, {4}, {1, 2, 3, 8}}});
  write_model(q / "model.safetensors", {{"l.weight", DType::kF8E4M3, {4}, {1, 2, 3, 4}},
                                        {"l.weight_scale_inv", DType::kF32, {1}, {2}}});
  write_model(dir / "l8.safetensors", {{"l.weight", DType::kF8E4M3, {4}, {1, 2, 3, 4}}});
  Result r = run("diff " + p("l8.safetensors") + " " + q.string() + " -o " + p("tau.safetensors"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_TRUE(has(r.err, "error (quantized)")) << r.err;
  EXPECT_TRUE(has(r.err, "'l.weight'")) << r.err;
  EXPECT_FALSE(fs::exists(dir / "tau.safetensors"));
  Result ok = run("diff -q " + p("plain8.safetensors") + " " + p("plain8b.safetensors") + " -o " + p("tau8.safetensors"), dir);
  EXPECT_EQ(ok.status, 0) << ok.err;
  EXPECT_EQ(read_values(dir / "tau8.safetensors", "w"), (std::vector<double>{0, 0, 0, 4}));
}

TEST_F(TrustInputs, FullModelGivenToApplyIsRefusedUnlessForced) {
  Result r = run("apply " + p("pre.safetensors") + " -t " + p("a.safetensors") + " -o " + p("out.safetensors"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_TRUE(has(r.err, "error (base_mismatch)")) << r.err;
  EXPECT_TRUE(has(r.err, "looks like a full model, not a task vector")) << r.err;
  EXPECT_TRUE(has(r.err, "taskvec diff")) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out.safetensors"));
  Result forced = run("apply --force " + p("pre.safetensors") + " -t " + p("a.safetensors") + " -o " + p("out.safetensors"), dir);
  EXPECT_EQ(forced.status, 0) << forced.err;
  EXPECT_TRUE(has(forced.err, "taskvec: warning: --force:")) << forced.err;
  EXPECT_EQ(read_values(dir / "out.safetensors", "w"), (std::vector<double>{2.5, 4, 6, 8}));
  // The real task vector applies without a word.
  ASSERT_EQ(run("diff -q " + p("pre.safetensors") + " " + p("a.safetensors") + " -o " + p("tau_a.safetensors"), dir).status, 0);
  Result good = run("apply " + p("pre.safetensors") + " -t " + p("tau_a.safetensors") + " -o " + p("back.safetensors"), dir);
  EXPECT_EQ(good.status, 0) << good.err;
  EXPECT_FALSE(has(good.err, "warning")) << good.err;
  EXPECT_EQ(read_values(dir / "back.safetensors", "w"), (std::vector<double>{1.5, 2, 3, 4}));
}

TEST_F(TrustInputs, TaskVectorGivenAsAModel) {
  ASSERT_EQ(run("diff -q " + p("pre.safetensors") + " " + p("a.safetensors") + " -o " + p("tau_a.safetensors"), dir).status, 0);
  Result d = run("diff " + p("pre.safetensors") + " " + p("tau_a.safetensors") + " -o " + p("x.safetensors"), dir);
  EXPECT_EQ(d.status, 5) << d.err;
  EXPECT_TRUE(has(d.err, "is a task vector (taskvec.kind=task_vector), not a model")) << d.err;
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
  Result e = run("edit -m pre=" + p("pre.safetensors") + " -m t=" + p("tau_a.safetensors") + " 'pre + tau(t)' -o " +
                     p("e.safetensors"),
                 dir);
  EXPECT_EQ(e.status, 0) << e.err;
  EXPECT_TRUE(has(e.err, "taskvec: warning: " + p("tau_a.safetensors") + " is a task vector")) << e.err;
  recipe("  - model: tau_a.safetensors\n");
  Result m = run("merge " + p("r.yaml") + " -o " + p("m.safetensors"), dir);
  EXPECT_EQ(m.status, 0) << m.err;
  EXPECT_TRUE(has(m.err, "taskvec: warning: ")) << m.err;
  EXPECT_TRUE(has(m.err, "models[0] of the recipe")) << m.err;
}

TEST_F(TrustInputs, MergeRefusesAHeadOnlyTheFineTunesHave) {
  write_model(dir / "ca.safetensors", {{"score.weight", DType::kF32, {2}, {5, 6}}, {"w", DType::kF32, {4}, {2, 2, 3, 4}}});
  write_model(dir / "cb.safetensors", {{"score.weight", DType::kF32, {2}, {7, 8}}, {"w", DType::kF32, {4}, {1, 2, 3, 6}}});
  recipe("  - model: ca.safetensors\n  - model: cb.safetensors\n");
  Result r = run("merge " + p("r.yaml") + " -o " + p("m.safetensors"), dir);
  EXPECT_EQ(r.status, 5) << r.err;
  EXPECT_TRUE(has(r.err, "error (tensor_missing)")) << r.err;
  EXPECT_TRUE(has(r.err, "'score.weight'")) << r.err;
  EXPECT_TRUE(has(r.err, "--keep-extra-tensors")) << r.err;
  EXPECT_FALSE(fs::exists(dir / "m.safetensors"));
  // The flags the message names exist on merge.
  Result help = run("merge --help", dir);
  EXPECT_TRUE(has(help.out, "--keep-extra-tensors")) << help.out;
  EXPECT_TRUE(has(help.out, "--drop-extra-tensors")) << help.out;

  Result kept = run("merge " + p("r.yaml") + " --keep-extra-tensors 0 -o " + p("m.safetensors"), dir);
  EXPECT_EQ(kept.status, 0) << kept.err;
  EXPECT_EQ(read_values(dir / "m.safetensors", "score.weight"), (std::vector<double>{5, 6}));
  EXPECT_EQ(read_values(dir / "m.safetensors", "w"), (std::vector<double>{2, 2, 3, 6}));  // pre + tau_a + tau_b
  Result by_path = run("merge " + p("r.yaml") + " --force --keep-extra-tensors " + p("cb.safetensors") + " -o " +
                           p("m.safetensors"),
                       dir);
  EXPECT_EQ(by_path.status, 0) << by_path.err;
  EXPECT_EQ(read_values(dir / "m.safetensors", "score.weight"), (std::vector<double>{7, 8}));
  Result dropped = run("merge " + p("r.yaml") + " --drop-extra-tensors -o " + p("d.safetensors"), dir);
  EXPECT_EQ(dropped.status, 0) << dropped.err;
  EXPECT_TRUE(has(dropped.err, "left out (--drop-extra-tensors)")) << dropped.err;
  EXPECT_EQ(Checkpoint::open(dir / "d.safetensors").find("score.weight"), nullptr);
  Result bad = run("merge " + p("r.yaml") + " --keep-extra-tensors 5 -o " + p("x.safetensors"), dir);
  EXPECT_EQ(bad.status, 2) << bad.err;
  EXPECT_FALSE(fs::exists(dir / "x.safetensors"));
}

TEST_F(TrustInputs, MergeWarnsAboutAChangedIntegerTensorAsEditDoes) {
  write_model(dir / "ipre.safetensors", {{"ids", DType::kI64, {2}, {0, 1}}, {"w", DType::kF32, {1}, {1}}});
  write_model(dir / "ift.safetensors", {{"ids", DType::kI64, {2}, {0, 9}}, {"w", DType::kF32, {1}, {2}}});
  std::ofstream(dir / "ir.yaml") << "merge_method: task_arithmetic\nbase_model: " + p("ipre.safetensors") +
                                        "\nmodels:\n  - model: " + p("ift.safetensors") + "\n";
  Result m = run("merge " + p("ir.yaml") + " -o " + p("m.safetensors"), dir);
  Result e = run("edit -m pre=" + p("ipre.safetensors") + " -m f=" + p("ift.safetensors") + " 'pre + tau(f)' -o " +
                     p("e.safetensors"),
                 dir);
  EXPECT_EQ(m.status, 0) << m.err;
  EXPECT_EQ(e.status, 0) << e.err;
  const std::string warning = "taskvec: warning: tensor 'ids' (I64) differs in " + p("ift.safetensors") +
                              ": integer/bool tensors are never combined, it is copied from ";
  EXPECT_TRUE(has(m.err, warning)) << m.err;
  EXPECT_TRUE(has(e.err, warning)) << e.err;
  EXPECT_EQ(read_values(dir / "m.safetensors", "ids"), (std::vector<double>{0, 1}));
}

TEST_F(TrustInputs, SimilarityOfRawModelsSaysWhatItCompares) {
  Result t = run("similarity " + p("a.safetensors") + " " + p("b.safetensors"), dir);
  EXPECT_EQ(t.status, 0) << t.err;
  EXPECT_TRUE(has(t.out, "cosine similarity of the checkpoints' weights (not task vectors: pass --base PRE to compare "
                         "task vectors)"))
      << t.out;
  EXPECT_TRUE(has(t.err, "taskvec: warning: no input is labeled a task vector")) << t.err;
  Result j = run("similarity --json " + p("a.safetensors") + " " + p("b.safetensors"), dir);
  ASSERT_EQ(j.status, 0) << j.err;
  auto parsed = nlohmann::json::parse(j.out);
  EXPECT_EQ(parsed["compared"], "weights");
  Result based = run("similarity --json --base " + p("pre.safetensors") + " " + p("a.safetensors") + " " + p("b.safetensors"), dir);
  ASSERT_EQ(based.status, 0) << based.err;
  auto pj = nlohmann::json::parse(based.out);
  EXPECT_EQ(pj["compared"], "task_vectors");
  EXPECT_EQ(pj["cosine"][0][1], 0.0);  // tau_a = [0.5,0,0,0], tau_b = [0,0,0,1]
  EXPECT_FALSE(has(based.err, "warning")) << based.err;
}

}  // namespace
}  // namespace taskvec
