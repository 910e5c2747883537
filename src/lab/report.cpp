// Running experiments over seeds, aggregating, writing results/*.json, plots (gnuplot) and checks.
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "lab/lab.hpp"
#include "taskvec/error.hpp"

namespace taskvec::lab {
namespace {

Json combine(const std::vector<Json>& xs, bool spread) {
  const Json& first = xs.front();
  if (first.is_number()) {
    double lo = first.get<double>(), hi = lo, sum = 0;
    for (const auto& x : xs) {
      const double v = x.get<double>();
      lo = std::min(lo, v);
      hi = std::max(hi, v);
      sum += v;
    }
    return spread ? (hi - lo) / 2.0 : sum / static_cast<double>(xs.size());
  }
  if (first.is_array()) {
    Json out = Json::array();
    for (std::size_t i = 0; i < first.size(); ++i) {
      std::vector<Json> col;
      for (const auto& x : xs) col.push_back(x.at(i));
      out.push_back(combine(col, spread));
    }
    return out;
  }
  if (first.is_object()) {
    Json out = Json::object();
    for (const auto& [k, v] : first.items()) {
      std::vector<Json> col;
      for (const auto& x : xs) col.push_back(x.at(k));
      out[k] = combine(col, spread);
    }
    return out;
  }
  return first;
}

void write_json(const std::filesystem::path& path, const Json& j) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp);
    if (!out) throw Error(ErrorCode::kIo, tmp + ": cannot write");
    out << std::setw(2) << j << "\n";
  }
  std::filesystem::rename(tmp, path);
}

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  if (!out) throw Error(ErrorCode::kIo, path.string() + ": cannot write");
  out << text;
}

const char* kTerminal =
    "if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,560 } "
    "else { set terminal png size 900,560 }\nset termoption noenhanced\n";

// Writes NAME.dat and NAME.gp under out/plots and runs gnuplot; a missing gnuplot is a warning.
void plot(const std::filesystem::path& out, const std::string& name, const std::string& data, const std::string& script) {
  const auto dir = out / "plots";
  std::filesystem::create_directories(dir);
  write_text(dir / (name + ".dat"), data);
  write_text(dir / (name + ".gp"), std::string(kTerminal) + "set output '" + (out / (name + ".png")).string() + "'\n" +
                                       "datafile = '" + (dir / (name + ".dat")).string() + "'\n" + script);
  const std::string cmd = "gnuplot '" + (dir / (name + ".gp")).string() + "' 2>/dev/null";
  if (std::system(cmd.c_str()) != 0) progress("warning: gnuplot failed for " + name + " (is gnuplot-nox installed?)");
}

std::string columns(const std::vector<std::pair<std::string, Json>>& cols) {
  std::ostringstream s;
  s << "#";
  for (const auto& c : cols) s << " " << c.first;
  s << "\n";
  const auto rows = cols.front().second.size();
  for (std::size_t i = 0; i < rows; ++i) {
    for (const auto& c : cols) s << c.second.at(i).get<double>() << " ";
    s << "\n";
  }
  return s.str();
}

void make_plots(const std::filesystem::path& out, const std::string& exp, const Json& mean, const Json& grid) {
  if (exp == "negation") {
    plot(out, "negation_lambda", columns({{"lambda", grid}, {"target", mean["val_curve_target"]}, {"control", mean["val_curve_control"]}}),
         "set title 'Negation: theta_pre - lambda*tau (validation, mean over tasks and seeds)'\nset xlabel 'lambda'\n"
         "set ylabel 'accuracy'\nset yrange [0:1]\nset key bottom left\nset grid\n"
         "plot datafile using 1:2 with linespoints title 'target task', '' using 1:3 with linespoints title 'control (Fashion-MNIST)'\n");
  } else if (exp == "addition") {
    plot(out, "addition_lambda", columns({{"lambda", grid}, {"pairs", mean["pairs_val_curve_normalized"]}, {"all", mean["all_val_curve_normalized"]}}),
         "set title 'Addition: theta_pre + lambda*sum(tau) (validation, normalized accuracy)'\nset xlabel 'lambda'\n"
         "set ylabel 'normalized accuracy'\nset key bottom right\nset grid\n"
         "plot datafile using 1:2 with linespoints title 'pairs (mean)', '' using 1:3 with linespoints title 'all tasks'\n");
  } else if (exp == "cosine") {
    std::ostringstream d;
    const auto& m = mean["matrix"];
    for (std::size_t i = 0; i < m.size(); ++i) {
      for (std::size_t j = 0; j < m.size(); ++j) d << m[i][j].get<double>() << (j + 1 < m.size() ? " " : "\n");
    }
    std::ostringstream tics;
    for (std::size_t i = 0; i < grid.size(); ++i) tics << (i ? ", " : "") << "'" << grid[i].get<std::string>() << "' " << i;
    double top = 0;  // colour scale up to the largest off-diagonal value (the diagonal saturates)
    for (std::size_t i = 0; i < m.size(); ++i)
      for (std::size_t j = 0; j < m.size(); ++j)
        if (i != j) top = std::max(top, m[i][j].get<double>());
    std::ostringstream labels;
    for (std::size_t i = 0; i < m.size(); ++i)
      for (std::size_t j = 0; j < m.size(); ++j)
        labels << "set label sprintf('%.2f', " << m[i][j].get<double>() << ") at " << j << "," << i
               << " center front font ',8'\n";
    plot(out, "cosine_heatmap", d.str(),
         "set title 'Cosine similarity of task vectors (mean over seeds)'\nset size ratio -1\n"
         "set xtics (" + tics.str() + ") rotate by 45 right\nset ytics (" + tics.str() + ")\n"
         "set palette defined (0 'white', 0.2 '#fdd49e', 1 '#b30000')\nset cbrange [0:" + std::to_string(std::max(top, 1e-3)) + "]\nunset key\n" + labels.str() +
         "set yrange [-0.5:" + std::to_string(m.size() - 0.5) + "] reverse\nset xrange [-0.5:" + std::to_string(m.size() - 0.5) + "]\n"
         "plot datafile matrix with image\n");
  } else if (exp == "lr") {
    plot(out, "lr", columns({{"lr", mean["lrs"]}, {"single", mean["single_task"]}, {"pairs", mean["pairs_normalized"]}, {"all", mean["all_normalized"]}}),
         "set title 'Fine-tuning learning rate (test)'\nset logscale x\nset xlabel 'learning rate'\nset ylabel 'accuracy'\n"
         "set key bottom left\nset grid\nplot datafile using 1:2 with linespoints title 'single task (absolute)', "
         "'' using 1:3 with linespoints title 'addition, pairs (normalized)', '' using 1:4 with linespoints title 'addition, all tasks (normalized)'\n");
  } else if (exp == "steps") {
    plot(out, "steps", columns({{"step", mean["steps"]}, {"cosine", mean["cosine_to_final"]}, {"single", mean["single_task"]}, {"all", mean["addition_normalized"]}}),
         "set title 'Intermediate task vectors (test)'\nset xlabel 'fine-tuning step'\nset ylabel 'value'\nset yrange [0:1.05]\n"
         "set key bottom right\nset grid\nplot datafile using 1:2 with linespoints title 'cosine(tau_step, tau_final)', "
         "'' using 1:3 with linespoints title 'single-task accuracy', '' using 1:4 with linespoints title 'addition of all tasks (normalized to final fine-tuned)'\n");
  } else if (exp == "analogy") {
    std::ostringstream d;
    d << "# variant accuracy\n";
    for (const char* k : {"pretrained", "analogy_lambda1", "without_tau_A", "analogy_val", "analogy_two_coef", "finetuned"})
      d << k << " " << mean[k].get<double>() << "\n";
    plot(out, "analogy", d.str(),
         "set title 'Sub-population analogies (test, mean over targets and seeds)'\nset style fill solid 0.6\nset boxwidth 0.6\n"
         "set yrange [0:1.08]\nset ylabel 'accuracy'\nunset key\nset xtics rotate by 20 right\nset grid y\n"
         "plot datafile using 0:2:xtic(1) with boxes, '' using 0:($2+0.03):(sprintf('%.3f',$2)) with labels\n");
  }
}

double num(const Json& j, const char* a, const char* b) { return j.at(a).at(b).get<double>(); }

}  // namespace

Json aggregate_mean(const std::vector<Json>& per_seed) { return combine(per_seed, false); }
Json aggregate_spread(const std::vector<Json>& per_seed) { return combine(per_seed, true); }

Json check_phenomena(const Json& m, bool quick) {
  Json checks = Json::array();
  auto add = [&](const std::string& name, bool ok, double value, double threshold) {
    checks.push_back({{"check", name}, {"ok", ok}, {"value", value}, {"threshold", threshold}});
  };
  if (m.contains("negation")) {
    const double drop = num(m, "negation", "pretrained_target") - num(m, "negation", "negated_target");
    const double need = quick ? 0.10 : 0.40;
    add("negation lowers target accuracy by at least " + std::to_string(static_cast<int>(need * 100)) + " points", drop >= need, drop, need);
    const double ratio = num(m, "negation", "negated_control") / num(m, "negation", "pretrained_control");
    add("negation keeps control >= 95% of pretrained", ratio >= 0.95 - 1e-9, ratio, 0.95);
    if (!quick) {
      const double moved = std::abs(num(m, "negation", "random_target") - num(m, "negation", "pretrained_target"));
      add("random vector moves target by < 3 points", moved < 0.03, moved, 0.03);
    }
  }
  if (m.contains("addition")) {
    add("addition of all tasks beats pretrained (absolute)",
        num(m, "addition", "all_absolute") > num(m, "addition", "all_pretrained_absolute"),
        num(m, "addition", "all_absolute"), num(m, "addition", "all_pretrained_absolute"));
    add("addition of pairs beats pretrained (normalized)",
        num(m, "addition", "pairs_normalized") > num(m, "addition", "pairs_pretrained_normalized"),
        num(m, "addition", "pairs_normalized"), num(m, "addition", "pairs_pretrained_normalized"));
    if (!quick) {
      add("pairs normalized >= 96%", num(m, "addition", "pairs_normalized") >= 0.96, num(m, "addition", "pairs_normalized"), 0.96);
      add("all tasks normalized >= 87%", num(m, "addition", "all_normalized") >= 0.87, num(m, "addition", "all_normalized"), 0.87);
    }
  }
  if (m.contains("analogy") && !quick) {
    add("analogy (lambda = 1) gains >= 2 points over pretrained", num(m, "analogy", "gain_lambda1") >= 0.02,
        num(m, "analogy", "gain_lambda1"), 0.02);
  }
  if (m.contains("cosine")) {
    // The paper's Fig. 5: task vectors are close to orthogonal, and related tasks a little less so.
    const double off = num(m, "cosine", "offdiagonal_mean");
    add("task vectors nearly orthogonal (|mean off-diagonal cosine| < 0.1)", std::fabs(off) < 0.1, std::fabs(off), 0.1);
    // --quick has 4 tasks and so one related pair (mnist, mnist_inv) against five unrelated ones: one
    // cosine of about 0.01 against a mean of five is noise, not the paper's claim. The full run has 7
    // related pairs.
    if (!quick)
      add("related task vectors more similar than unrelated", num(m, "cosine", "related_mean") > num(m, "cosine", "unrelated_mean"),
          num(m, "cosine", "related_mean"), num(m, "cosine", "unrelated_mean"));
  }
  return checks;
}

Json run_experiments(const LabConfig& config, const std::vector<std::string>& experiments) {
  for (const auto& e : experiments)
    if (std::find(experiment_names().begin(), experiment_names().end(), e) == experiment_names().end())
      throw Error(ErrorCode::kInvalidArgument, "unknown experiment '" + e + "'");
  progress("loading data (Fashion-MNIST, MNIST, sklearn digits)");
  const Sources sources = load_sources(config.data);
  const auto tasks = build_tasks(sources, config);
  progress("data: fashion " + std::to_string(sources.fashion.train.size()) + "/" + std::to_string(sources.fashion.val.size()) +
           "/" + std::to_string(sources.fashion.test.size()) + ", mnist " + std::to_string(sources.mnist.train.size()) + "/" +
           std::to_string(sources.mnist.val.size()) + "/" + std::to_string(sources.mnist.test.size()) + ", digits " +
           std::to_string(sources.digits.train.size()) + "/" + std::to_string(sources.digits.val.size()) + "/" +
           std::to_string(sources.digits.test.size()) + " (train/val/test)");

  std::filesystem::path work = config.work;
  if (work.empty()) {
    const std::filesystem::path base = std::filesystem::exists("/dev/shm") ? "/dev/shm" : std::filesystem::temp_directory_path();
    work = base / ("taskvec-lab." + std::to_string(::getpid()));
  }
  std::filesystem::create_directories(work);
  std::filesystem::create_directories(config.out);

  std::map<std::string, std::vector<Json>> per_seed;
  std::map<std::string, double> seconds;
  try {
    for (int seed = 0; seed < config.seeds; ++seed) {
      SeedState state(config, tasks, sources.fashion.train, seed, work / ("seed" + std::to_string(seed)));
      for (const auto& e : experiments) {
        const double t0 = elapsed_seconds();
        progress("seed " + std::to_string(seed) + ": experiment " + e);
        Json r = e == "negation" ? run_negation(state, config)
               : e == "addition" ? run_addition(state, config)
               : e == "analogy"  ? run_analogy(state, config)
               : e == "cosine"   ? run_cosine(state, config)
               : e == "lr"       ? run_lr(state, config)
               : e == "steps"    ? run_steps(state, config)
                                 : run_leaderboard(state, config);
        seconds[e] += elapsed_seconds() - t0;
        per_seed[e].push_back(std::move(r));
      }
    }
  } catch (...) {
    if (!config.keep_work) std::filesystem::remove_all(work);
    throw;
  }
  if (!config.keep_work) std::filesystem::remove_all(work);

  Json means = Json::object(), spreads = Json::object();
  for (const auto& e : experiments) {
    std::vector<Json> summaries;
    for (const auto& r : per_seed[e]) summaries.push_back(r.at("summary"));
    const Json mean = aggregate_mean(summaries), spread = aggregate_spread(summaries);
    means[e] = mean;
    spreads[e] = spread;
    const Json& first = per_seed[e].front();
    Json out = {{"experiment", e}, {"seeds", config.seeds}, {"quick", config.quick},
                {"mean", mean}, {"spread_half_range", spread}, {"per_seed", per_seed[e]},
                {"seconds", seconds[e]},
                {"config", {{"pretrain_steps", config.pretrain_steps}, {"finetune_steps", config.finetune_steps},
                            {"lr", config.lr}, {"shots", config.shots}, {"val_cap", config.val_cap},
                            {"test_cap", config.test_cap}, {"tasks", config.tasks}}}};
    write_json(config.out / (e + ".json"), out);
    const Json grid = e == "cosine" ? first.at("tasks") : first.contains("grid") ? first.at("grid") : Json::array();
    make_plots(config.out, e, mean, grid);
  }
  Json summary = {{"mean", means}, {"spread_half_range", spreads}, {"checks", check_phenomena(means, config.quick)},
                  {"seeds", config.seeds}, {"quick", config.quick}, {"seconds_total", elapsed_seconds()},
                  {"seconds", seconds}};
  // The per-experiment summaries hold long arrays; summary.json keeps them too, for one-file reading.
  write_json(config.out / "summary.json", summary);
  return summary;
}

}  // namespace taskvec::lab
