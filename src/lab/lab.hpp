// taskvec-lab: configuration, tasks and the per-seed state (pretrained backbone, frozen heads,
// fine-tuned checkpoints and task vectors) shared by the experiments.
//
// Per seed, files under <work>/seed<k>/:  pre.safetensors (pretrained backbone), ft_<key>.safetensors,
// tau_<key>.safetensors (made by taskvec's engine), <key> = task name, with "@lr" for the lr sweep and
// "#step" for intermediate checkpoints; edit.safetensors is the scratch output of every edit.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "lab/data.hpp"
#include "lab/model.hpp"
#include "lab/store.hpp"

namespace taskvec::lab {

struct LabConfig {
  bool quick = false;
  int seeds = 2;
  std::filesystem::path out = "results";
  std::filesystem::path work;   ///< empty: a fresh folder under /dev/shm (or the system temp folder)
  bool keep_work = false;
  DataPaths data;
  int pretrain_steps = 1000;
  double pretrain_lr = 1e-3;
  double pretrain_weight_decay = 0.01;  ///< PyTorch's AdamW default (0.1 cost ~2 points of addition)
  double head_l2 = 0;                ///< L2 penalty (x sum of squared weights) of the 20-shot heads
  int head_iterations = 300;         ///< full-batch Adam iterations of the 20-shot heads
  bool addition_pairs = true;        ///< addition over all pairs (else only all tasks together)
  int finetune_steps = 300;
  double lr = 3e-4;
  int checkpoint_every = 50;
  int shots = 20;                    ///< examples per class for the frozen heads
  std::int64_t train_cap = 20000;    ///< fine-tuning pool per task
  std::int64_t val_cap = 500;        ///< validation images per task for every lambda search
  std::int64_t test_cap = 2000;      ///< test images per task
  std::vector<std::string> tasks;    ///< the 8 tasks (4 with --quick)
  std::vector<std::string> analogy_axes;  ///< styles paired with plain MNIST: thick, lowres, sklearn
  std::vector<double> lrs;           ///< the learning-rate sweep
  std::vector<double> grid;          ///< {0, 0.05, ..., 1}
  std::vector<double> coarse_grid;   ///< {0, 0.1, ..., 1}: lr / step sweeps
  std::vector<double> grid2;         ///< {0, 0.2, ..., 1}: the two-coefficient analogy
  /// The full configuration, or the --quick one (fewer steps, tasks and seeds; same code path).
  static LabConfig make(bool quick);
};

/// One classification task: a data source with a transform, or an analogy sub-population.
struct Task {
  std::string name;
  std::string source;  ///< "mnist", "digits" or "fashion": tasks of one source are "related"
  std::string head;    ///< key of its frozen head: its own name, or "digits10" for sub-populations
  Splits data;         ///< val and test already capped
};

/// Every task the lab knows: the 8 tasks, the analogy sub-populations <style>_lo / <style>_hi
/// (classes 0-4 / 5-9; styles mnist, thick, lowres, sklearn) and "control" (upright Fashion-MNIST).
std::map<std::string, Task> build_tasks(const Sources& sources, const LabConfig& config);

/// Seconds since the process started, for progress lines.
double elapsed_seconds();
/// A progress line on stderr: "[taskvec-lab 12.3s] message".
void progress(const std::string& message);
/// Mean of `v` (0 for an empty vector).
double mean(const std::vector<double>& v);
/// `v` with 3 decimals, for progress lines.
std::string fixed3(double v);

/// Lazily built per-seed state; every file goes through taskvec's writer, reader and engine.
class SeedState {
 public:
  /// `pretraining_data`: upright Fashion-MNIST train (55k); must outlive this object.
  SeedState(const LabConfig& config, const std::map<std::string, Task>& tasks, const Dataset& pretraining_data, int seed,
            std::filesystem::path dir);

  int seed() const { return seed_; }
  const std::filesystem::path& dir() const { return dir_; }
  const Editor& editor() const { return editor_; }
  const Task& task(const std::string& name) const;

  /// pre.safetensors (pretraining on the first use) and the frozen control head (saved beside it as
  /// control_head.safetensors).
  const std::filesystem::path& pretrained();
  /// Takes pre.safetensors and control_head.safetensors from the folder, written by an earlier run of this
  /// seed with the same pretraining settings (recorded in pre.safetensors' metadata), instead of
  /// pretraining; false when they are absent or were made otherwise. For `taskvec-lab eval`.
  bool reuse_pretrained();
  const Head& control_head();
  /// The frozen 20-shot head of `head_key` (a task name or "digits10").
  const Head& head(const std::string& head_key);
  /// Fine-tunes `task` at `lr` (default config.lr, which also writes intermediate checkpoints) on
  /// first use; returns ft / tau file paths.
  std::filesystem::path finetuned(const std::string& task, std::optional<double> lr = {});
  std::filesystem::path task_vector(const std::string& task, std::optional<double> lr = {});
  /// Intermediate checkpoints of the default-lr fine-tune: step -> tau file (the final step included).
  std::map<int, std::filesystem::path> step_task_vectors(const std::string& task);
  std::filesystem::path step_checkpoint(const std::string& task, int step);

  /// Accuracy of checkpoint `ckpt` on task `name`'s split ("val" or "test") with the task's head.
  double accuracy_of(const std::filesystem::path& ckpt, const std::string& name, const std::string& split);
  /// Same for several tasks with one load of the checkpoint.
  std::vector<double> accuracies_of(const std::filesystem::path& ckpt, const std::vector<std::string>& names,
                                    const std::string& split);
  /// pretrained / fine-tuned accuracy (cached).
  double pretrained_accuracy(const std::string& name, const std::string& split);
  double finetuned_accuracy(const std::string& name, const std::string& split, std::optional<double> lr = {});

  /// theta = pre + sum lambda_j tau_j through the engine, into the scratch file; returns its path.
  std::filesystem::path edit(const std::vector<std::pair<std::filesystem::path, double>>& terms);

 private:
  std::string key(const std::string& task, std::optional<double> lr) const;
  std::map<std::string, std::string> pretraining_metadata() const;
  const Head& head_for(const std::string& task_name);

  const LabConfig& config_;
  const std::map<std::string, Task>& tasks_;
  const Dataset& pretraining_data_;
  int seed_;
  std::filesystem::path dir_;
  Editor editor_;
  Backbone probe_;
  std::optional<Head> control_;
  std::map<std::string, Head> heads_;
  std::map<std::string, std::filesystem::path> ft_, tau_;
  std::map<std::string, std::map<int, std::filesystem::path>> step_ft_, step_tau_;
  std::map<std::string, double> acc_cache_;
  std::filesystem::path pre_path_;
  bool have_pre_ = false;
};

/// One experiment's result for one seed: "summary" (numbers / arrays averaged over seeds) and "detail".
using Json = nlohmann::json;

// The experiments (experiments.cpp). Each returns {"summary": ..., "detail": ...} for one seed.
Json run_negation(SeedState& s, const LabConfig& c);
Json run_addition(SeedState& s, const LabConfig& c);
Json run_analogy(SeedState& s, const LabConfig& c);
Json run_cosine(SeedState& s, const LabConfig& c);
Json run_lr(SeedState& s, const LabConfig& c);
Json run_steps(SeedState& s, const LabConfig& c);
/// Every merge method on all tasks, hyperparameters chosen on validation (leaderboard.cpp).
Json run_leaderboard(SeedState& s, const LabConfig& c);
/// The leaderboard as a Markdown table (seed means and half ranges).
std::string leaderboard_markdown(const Json& mean, const Json& spread);

/// All experiment names, in the order `reproduce` runs them.
const std::vector<std::string>& experiment_names();

/// Runs `experiments` for config.seeds seeds, writes <out>/<experiment>.json and plots, returns the
/// combined summary (report.cpp). Throws taskvec::Error.
Json run_experiments(const LabConfig& config, const std::vector<std::string>& experiments);

/// Mean over seeds of the "summary" objects (numbers and arrays elementwise) and the half range.
Json aggregate_mean(const std::vector<Json>& per_seed);
Json aggregate_spread(const std::vector<Json>& per_seed);

/// The phenomena --quick checks, or (full run) the targets, on the seed-mean summaries
/// {experiment: summary}: an array of {"check", "ok", "value", "threshold"}.
Json check_phenomena(const Json& means, bool quick);

}  // namespace taskvec::lab
