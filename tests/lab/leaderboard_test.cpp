// The merge-method leaderboard on a tiny lab (few steps, two tasks, one-point grids): JSON shape,
// accuracies in [0, 1], and task arithmetic through merge_checkpoints agreeing with the lab's own edit.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <iostream>

#include "lab/lab.hpp"
#include "lab/lab_test_util.hpp"

namespace taskvec::lab {

// Defined in src/lab/leaderboard.cpp (repeated here so the test does not depend on lab.hpp declaring them).
Json run_leaderboard(SeedState& s, const LabConfig& c);
Json run_leaderboard(SeedState& s, const LabConfig& c,
                     const std::vector<std::pair<std::string, std::map<std::string, std::vector<double>>>>& grids);
std::string leaderboard_markdown(const Json& mean, const Json& spread);

namespace {

void check_unit(const Json& v, const std::string& what) {
  const double x = v.get<double>();
  EXPECT_GE(x, 0.0) << what;
  EXPECT_LE(x, 1.0) << what;
}

TEST(Leaderboard, TinyTwoMethods) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  auto c = testing::tiny_config(paths);
  const auto base = std::filesystem::temp_directory_path() / ("taskvec_lab_board_" + std::to_string(::getpid()));
  const Sources sources = load_sources(c.data);
  const auto tasks = build_tasks(sources, c);
  Json r;
  double edit_val_norm = 0;
  {
    SeedState s(c, tasks, sources.fashion.train, 0, base / "seed0");
    r = run_leaderboard(s, c, {{"task_arithmetic", {{"lambda", {0.5}}}},
                               {"ties", {{"density", {0.2}}, {"lambda", {1.0}}}}});
    // the same task arithmetic through the lab's engine edit
    const auto acc = s.accuracies_of(s.edit({{s.task_vector("mnist"), 0.5}, {s.task_vector("fashion_rot90"), 0.5}}),
                                     c.tasks, "val");
    for (std::size_t i = 0; i < acc.size(); ++i)
      edit_val_norm += acc[i] / s.finetuned_accuracy(c.tasks[i], "val") / static_cast<double>(acc.size());
  }
  std::filesystem::remove_all(base);

  ASSERT_TRUE(r.contains("summary"));
  ASSERT_TRUE(r.contains("detail"));
  const auto& sum = r.at("summary");
  EXPECT_EQ(sum.at("rows"), Json({"pretrained", "finetuned", "task_arithmetic", "ties"}));
  for (const auto& k : sum.at("rows")) {
    const auto key = k.get<std::string>();
    const auto& row = sum.at("methods").at(key);
    check_unit(row.at("test_absolute"), key);
    EXPECT_GE(row.at("test_normalized").get<double>(), 0.0);
    ASSERT_EQ(row.at("per_task_absolute").size(), 2u);
    ASSERT_EQ(row.at("per_task_normalized").size(), 2u);
    for (const auto& a : row.at("per_task_absolute")) check_unit(a, key);
    EXPECT_TRUE(sum.at("labels").contains(key));
  }
  EXPECT_DOUBLE_EQ(sum.at("methods").at("finetuned").at("test_normalized").get<double>(), 1.0);
  EXPECT_DOUBLE_EQ(sum.at("methods").at("ties").at("hyperparameters").at("density").get<double>(), 0.2);
  EXPECT_DOUBLE_EQ(sum.at("methods").at("ties").at("hyperparameters").at("lambda").get<double>(), 1.0);
  EXPECT_EQ(sum.at("methods").at("ties").at("merges").get<int>(), 2);  // one val point + the test merge
  EXPECT_EQ(r.at("detail").at("ties").at("val_curve").size(), 1u);
  EXPECT_NEAR(sum.at("methods").at("task_arithmetic").at("val_normalized").get<double>(), edit_val_norm, 0.02);
  EXPECT_DOUBLE_EQ(sum.at("published").at("finetuned").at("low").get<double>(), 90.5);
  EXPECT_TRUE(sum.at("not_applicable").contains("model_stock"));
  // the summary averages over seeds like the other experiments'
  const auto m = aggregate_mean({sum, sum});
  EXPECT_EQ(m.at("methods").at("ties").at("test_absolute"), sum.at("methods").at("ties").at("test_absolute"));
  const auto table = leaderboard_markdown(m, aggregate_spread({sum, sum}));
  EXPECT_NE(table.find("| TIES | "), std::string::npos) << table;
  EXPECT_NE(table.find("Not applicable: model_stock"), std::string::npos) << table;
  EXPECT_NE(table.find(" 90.5 |"), std::string::npos) << table;
}

// The real --quick leaderboard (minutes): ./taskvec_lab_tests --gtest_also_run_disabled_tests
// --gtest_filter='*QuickConfig*'. Prints the summary JSON.
TEST(Leaderboard, DISABLED_QuickConfig) {
  TASKVEC_LAB_REQUIRE_DATA(paths);
  const bool full = std::getenv("TASKVEC_LEADERBOARD_FULL") != nullptr;
  auto c = LabConfig::make(!full);
  c.data = paths;
  const auto base = std::filesystem::temp_directory_path() / ("taskvec_lab_board_quick_" + std::to_string(::getpid()));
  const Sources sources = load_sources(c.data);
  const auto tasks = build_tasks(sources, c);
  Json r;
  {
    SeedState s(c, tasks, sources.fashion.train, 0, base / "seed0");
    const double t0 = elapsed_seconds();
    s.pretrained();
    for (const auto& t : c.tasks) s.finetuned(t);
    const double t1 = elapsed_seconds();
    r = run_leaderboard(s, c);
    std::cout << "leaderboard seconds (without training): " << elapsed_seconds() - t1 << " (training " << t1 - t0 << ")\n";
  }
  std::filesystem::remove_all(base);
  std::cout << r.at("summary").dump(1) << "\n" << leaderboard_markdown(r.at("summary"), Json()) << "\n";
  for (const auto& k : r.at("summary").at("rows"))
    check_unit(r.at("summary").at("methods").at(k.get<std::string>()).at("test_absolute"), k.get<std::string>());
}

}  // namespace
}  // namespace taskvec::lab
