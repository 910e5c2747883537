// A tiny end-to-end run of every experiment (few steps, two tasks): the code paths of `reproduce`,
// not the phenomena (the --quick run checks those).
#include <gtest/gtest.h>

#include <unistd.h>

#include <fstream>

#include "lab/lab.hpp"
#include "lab/lab_test_util.hpp"

namespace taskvec::lab {
namespace {

TEST(Experiments, TinyEndToEnd) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  auto c = testing::tiny_config(paths);
  c.analogy_axes = {"lowres"};
  c.lrs = {3e-4, 1e-3};
  c.grid = {0.0, 0.5, 1.0};
  c.coarse_grid = {0.0, 1.0};
  c.grid2 = {0.0, 1.0};
  const auto base = std::filesystem::temp_directory_path() / ("taskvec_lab_e2e_" + std::to_string(::getpid()));
  c.out = base / "results";
  c.work = base / "work";
  const auto summary = run_experiments(c, experiment_names());
  for (const auto& e : experiment_names()) {
    EXPECT_TRUE(std::filesystem::exists(c.out / (e + ".json"))) << e;
    std::ifstream in(c.out / (e + ".json"));
    const auto j = Json::parse(in);
    EXPECT_EQ(j.at("experiment"), e);
    EXPECT_EQ(j.at("per_seed").size(), 1u);
  }
  const auto& m = summary.at("mean");
  for (const char* k : {"pretrained_target", "negated_target", "negated_control", "random_target"}) {
    const double v = m.at("negation").at(k).get<double>();
    EXPECT_GE(v, 0.0);
    EXPECT_LE(v, 1.0);
  }
  EXPECT_EQ(m.at("negation").at("val_curve_target").size(), 3u);
  EXPECT_EQ(m.at("addition").at("num_tasks").get<double>(), 2.0);
  EXPECT_EQ(m.at("analogy").at("num_targets").get<double>(), 4.0);
  EXPECT_EQ(m.at("cosine").at("matrix").size(), 2u);
  EXPECT_NEAR(m.at("cosine").at("matrix")[0][0].get<double>(), 1.0, 1e-6);
  EXPECT_EQ(m.at("lr").at("single_task").size(), 2u);
  EXPECT_EQ(m.at("steps").at("steps"), Json({10, 20}));
  EXPECT_NEAR(m.at("steps").at("cosine_to_final").back().get<double>(), 1.0, 1e-6);
  EXPECT_TRUE(summary.at("checks").is_array());
  EXPECT_FALSE(std::filesystem::exists(c.work));  // the work folder is removed unless keep_work
  std::filesystem::remove_all(base);
}

// `taskvec-lab eval` (the sweep evaluator) measures a checkpoint with the pretrained checkpoint and control
// head an earlier run left in its work folder: the same accuracies, without pretraining again; a folder
// made with other pretraining settings is not taken.
TEST(Experiments, ReusedPretrainingGivesTheSameAccuracies) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  auto c = testing::tiny_config(paths);
  const auto base = std::filesystem::temp_directory_path() / ("taskvec_lab_reuse_" + std::to_string(::getpid()));
  const Sources sources = load_sources(c.data);
  const auto tasks = build_tasks(sources, c);
  std::vector<double> first, again;
  std::filesystem::path edited;
  {
    SeedState s(c, tasks, sources.fashion.train, 0, base / "seed0");
    edited = s.edit({{s.task_vector("mnist"), -0.5}});
    std::filesystem::copy_file(edited, base / "candidate.safetensors");
    first = s.accuracies_of(base / "candidate.safetensors", {"mnist", "control"}, "val");
    EXPECT_TRUE(s.reuse_pretrained());  // the folder now holds this run's pretraining
  }
  {
    SeedState s(c, tasks, sources.fashion.train, 0, base / "seed0");
    ASSERT_TRUE(s.reuse_pretrained());
    const auto stamp = std::filesystem::last_write_time(base / "seed0" / "pre.safetensors");
    again = s.accuracies_of(base / "candidate.safetensors", {"mnist", "control"}, "val");
    EXPECT_EQ(std::filesystem::last_write_time(base / "seed0" / "pre.safetensors"), stamp);  // not pretrained again
  }
  EXPECT_EQ(first, again);
  {
    auto other = c;
    other.pretrain_steps += 1;
    SeedState s(other, tasks, sources.fashion.train, 0, base / "seed0");
    EXPECT_FALSE(s.reuse_pretrained());
  }
  std::filesystem::remove_all(base);
}

TEST(Experiments, AggregateMeanAndSpread) {
  const std::vector<Json> seeds = {Json{{"a", 1.0}, {"b", {1.0, 3.0}}}, Json{{"a", 3.0}, {"b", {3.0, 3.0}}}};
  const auto m = aggregate_mean(seeds), s = aggregate_spread(seeds);
  EXPECT_DOUBLE_EQ(m["a"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(m["b"][0].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(s["a"].get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(s["b"][1].get<double>(), 0.0);
}

TEST(Experiments, LambdaGridAndSchedule) {
  const auto c = LabConfig::make(false);
  ASSERT_EQ(c.grid.size(), 21u);
  EXPECT_DOUBLE_EQ(c.grid[1], 0.05);
  EXPECT_DOUBLE_EQ(c.grid.back(), 1.0);
  EXPECT_EQ(c.tasks.size(), 8u);
  TrainOptions o;
  o.steps = 300;
  o.lr = 3e-4;
  EXPECT_NEAR(scheduled_lr(o, 0), 1e-5, 1e-12);     // warm-up over 30 steps
  EXPECT_NEAR(scheduled_lr(o, 29), 3e-4, 1e-12);
  EXPECT_NEAR(scheduled_lr(o, 299), 0.0, 1e-7);      // cosine to 0
}

}  // namespace
}  // namespace taskvec::lab
