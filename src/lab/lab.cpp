#include "lab/lab.hpp"

#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <numeric>
#include <sstream>

#include "taskvec/error.hpp"

namespace taskvec::lab {
namespace {

const auto kStart = std::chrono::steady_clock::now();

std::vector<double> make_grid(double step) {
  std::vector<double> g;
  const int n = static_cast<int>(std::lround(1.0 / step));
  for (int i = 0; i <= n; ++i) g.push_back(std::round(i * step * 1000.0) / 1000.0);
  return g;
}

Splits map_splits(const Splits& s, const std::function<torch::Tensor(const torch::Tensor&)>& f) {
  return {{f(s.train.x), s.train.y}, {f(s.val.x), s.val.y}, {f(s.test.x), s.test.y}};
}

Dataset class_subset(const Dataset& d, bool high) {
  auto mask = high ? d.y.ge(5) : d.y.lt(5);
  return d.select(mask.nonzero().squeeze(1));
}

Splits cap(const Splits& s, const LabConfig& c) {
  return {s.train.head(c.train_cap), s.val.head(c.val_cap), s.test.head(c.test_cap)};
}

// Distinct, reproducible seeds for each use of the run's seed.
std::uint64_t derive_seed(int seed, const std::string& what) {
  std::uint64_t h = 1469598103934665603ull ^ static_cast<std::uint64_t>(seed) * 0x9E3779B97F4A7C15ull;
  for (unsigned char ch : what) h = (h ^ ch) * 1099511628211ull;
  return h;
}

std::string lr_tag(double lr) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", lr);
  return buf;
}

}  // namespace

LabConfig LabConfig::make(bool quick) {
  LabConfig c;
  c.quick = quick;
  c.grid = make_grid(0.05);
  c.coarse_grid = make_grid(0.1);
  c.grid2 = make_grid(0.2);
  c.tasks = {"mnist", "mnist_rot90", "mnist_inv", "digits", "digits_inv", "fashion_rot90", "fashion_rot180", "fashion_inv"};
  c.analogy_axes = {"thick", "lowres", "sklearn"};
  c.lrs = {1e-4, 3e-4, 1e-3};
  if (quick) {
    c.seeds = 1;
    c.pretrain_steps = 400;
    c.finetune_steps = 150;
    c.checkpoint_every = 50;
    c.val_cap = 300;
    c.test_cap = 1000;
    c.tasks = {"mnist", "mnist_inv", "digits", "fashion_rot90"};
    c.analogy_axes = {"thick"};
    c.lrs = {3e-4, 1e-3};
    c.grid = make_grid(0.1);
  }
  return c;
}

double elapsed_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - kStart).count();
}

void progress(const std::string& message) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1fs", elapsed_seconds());
  std::cerr << "[taskvec-lab " << buf << "] " << message << std::endl;
}

double mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

std::string fixed3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

std::map<std::string, Task> build_tasks(const Sources& s, const LabConfig& c) {
  std::map<std::string, Task> t;
  auto add = [&](const std::string& name, const std::string& source, const std::string& head, const Splits& data) {
    t[name] = Task{name, source, head, cap(data, c)};
  };
  // Fashion train is capped before transforming: 55k x 784 floats per variant is memory for nothing.
  const Splits fashion{s.fashion.train.head(c.train_cap), s.fashion.val, s.fashion.test};
  add("control", "fashion", "control", fashion);
  add("mnist", "mnist", "mnist", s.mnist);
  add("mnist_rot90", "mnist", "mnist_rot90", map_splits(s.mnist, [](auto& x) { return rotate90(x, 1); }));
  add("mnist_inv", "mnist", "mnist_inv", map_splits(s.mnist, invert));
  add("digits", "digits", "digits", s.digits);
  add("digits_inv", "digits", "digits_inv", map_splits(s.digits, invert));
  add("fashion_rot90", "fashion", "fashion_rot90", map_splits(fashion, [](auto& x) { return rotate90(x, 1); }));
  add("fashion_rot180", "fashion", "fashion_rot180", map_splits(fashion, [](auto& x) { return rotate90(x, 2); }));
  add("fashion_inv", "fashion", "fashion_inv", map_splits(fashion, invert));
  // Analogy styles (digits 0-9 of each style; sub-populations split the classes 0-4 / 5-9).
  const std::map<std::string, Splits> styles = {
      {"mnist", s.mnist},
      {"thick", map_splits(s.mnist, thicken)},
      {"lowres", map_splits(s.mnist, low_resolution)},
      {"sklearn", s.digits}};
  for (const auto& [style, data] : styles) {
    add("style_" + style, style == "sklearn" ? "digits" : "mnist", "digits10", data);
    for (bool high : {false, true}) {
      Splits sub{class_subset(data.train, high), class_subset(data.val, high), class_subset(data.test, high)};
      add(style + (high ? "_hi" : "_lo"), style == "sklearn" ? "digits" : "mnist", "digits10", sub);
    }
  }
  return t;
}

SeedState::SeedState(const LabConfig& config, const std::map<std::string, Task>& tasks, const Dataset& pretraining_data,
                     int seed, std::filesystem::path dir)
    : config_(config), tasks_(tasks), pretraining_data_(pretraining_data), seed_(seed), dir_(std::move(dir)) {
  std::filesystem::create_directories(dir_);
  pre_path_ = dir_ / "pre.safetensors";
}

const Task& SeedState::task(const std::string& name) const {
  auto it = tasks_.find(name);
  if (it == tasks_.end()) throw Error(ErrorCode::kInvalidArgument, "unknown task '" + name + "'");
  return it->second;
}

const std::filesystem::path& SeedState::pretrained() {
  if (have_pre_) return pre_path_;
  torch::manual_seed(derive_seed(seed_, "init"));
  Backbone net;
  TrainOptions o;
  o.steps = config_.pretrain_steps;
  o.lr = config_.pretrain_lr;
  o.weight_decay = config_.pretrain_weight_decay;
  o.seed = derive_seed(seed_, "pretrain");
  o.on_log = [&](int step, double loss) {
    if (step % 500 == 0 || step == o.steps)
      progress("seed " + std::to_string(seed_) + ": pretraining step " + std::to_string(step) + "/" +
               std::to_string(o.steps) + ", loss " + std::to_string(loss));
  };
  control_ = pretrain(net, pretraining_data_, o);
  save_backbone(net, pre_path_, pretraining_metadata());
  write_tensors(dir_ / "control_head.safetensors", {{"weight", control_->weight}, {"bias", control_->bias}},
                {{"taskvec_lab.role", "control_head"}});
  have_pre_ = true;
  progress("seed " + std::to_string(seed_) + ": pretrained; control val accuracy " +
           std::to_string(pretrained_accuracy("control", "val")));
  return pre_path_;
}

std::map<std::string, std::string> SeedState::pretraining_metadata() const {
  return {{"taskvec_lab.role", "pretrained"},
          {"taskvec_lab.seed", std::to_string(seed_)},
          {"taskvec_lab.pretrain_steps", std::to_string(config_.pretrain_steps)},
          {"taskvec_lab.pretrain_lr", std::to_string(config_.pretrain_lr)},
          {"taskvec_lab.pretrain_weight_decay", std::to_string(config_.pretrain_weight_decay)}};
}

bool SeedState::reuse_pretrained() {
  if (have_pre_) return true;
  const auto head_path = dir_ / "control_head.safetensors";
  if (!std::filesystem::exists(pre_path_) || !std::filesystem::exists(head_path)) return false;
  const auto meta = Checkpoint::open(pre_path_).metadata();
  for (const auto& [k, v] : pretraining_metadata()) {
    const auto it = meta.find(k);
    if (it == meta.end() || it->second != v) return false;
  }
  auto head = read_tensors(head_path);
  if (!head.count("weight") || !head.count("bias")) return false;
  control_ = Head{head.at("weight"), head.at("bias")};
  have_pre_ = true;
  return true;
}

const Head& SeedState::control_head() {
  pretrained();
  return *control_;
}

const Head& SeedState::head(const std::string& head_key) {
  if (head_key == "control") return control_head();
  auto it = heads_.find(head_key);
  if (it != heads_.end()) return it->second;
  Backbone net;
  load_backbone(net, pretrained());
  Dataset shots;
  const auto shot_seed = derive_seed(seed_, "shots:" + head_key);
  if (head_key == "digits10") {
    // One 10-way digit head shared by every analogy sub-population: shots / 4 per class from each style.
    std::vector<torch::Tensor> xs, ys;
    for (const char* style : {"style_mnist", "style_thick", "style_lowres", "style_sklearn"}) {
      auto d = few_shot(task(style).data.train, std::max(1, config_.shots / 4), shot_seed ^ std::hash<std::string>{}(style));
      xs.push_back(d.x);
      ys.push_back(d.y);
    }
    shots = {torch::cat(xs), torch::cat(ys)};
  } else {
    shots = few_shot(task(head_key).data.train, config_.shots, shot_seed);
  }
  return heads_.emplace(head_key, fit_linear_probe(net, shots, 10, config_.head_l2, config_.head_iterations)).first->second;
}

const Head& SeedState::head_for(const std::string& task_name) { return head(task(task_name).head); }

std::string SeedState::key(const std::string& task_name, std::optional<double> lr) const {
  if (!lr || *lr == config_.lr) return task_name;
  return task_name + "@" + lr_tag(*lr);
}

std::filesystem::path SeedState::finetuned(const std::string& task_name, std::optional<double> lr) {
  const auto k = key(task_name, lr);
  auto it = ft_.find(k);
  if (it != ft_.end()) return it->second;
  const Task& t = task(task_name);
  const Head& h = head_for(task_name);
  Backbone net;
  load_backbone(net, pretrained());
  TrainOptions o;
  o.steps = config_.finetune_steps;
  o.lr = lr.value_or(config_.lr);
  o.seed = derive_seed(seed_, "finetune:" + k);
  const bool main_lr = k == task_name;
  if (main_lr) {
    o.checkpoint_every = config_.checkpoint_every;
    o.on_checkpoint = [&](int step) {
      if (step == o.steps) return;
      const auto path = dir_ / ("ft_" + task_name + "#" + std::to_string(step) + ".safetensors");
      save_backbone(net, path, {{"taskvec_lab.role", "finetuned"}, {"taskvec_lab.task", task_name},
                                {"taskvec_lab.step", std::to_string(step)}});
      step_ft_[task_name][step] = path;
    };
  }
  finetune(net, h, t.data.train, o);
  const auto path = dir_ / ("ft_" + k + ".safetensors");
  save_backbone(net, path, {{"taskvec_lab.role", "finetuned"}, {"taskvec_lab.task", task_name},
                            {"taskvec_lab.lr", lr_tag(o.lr)}, {"taskvec_lab.step", std::to_string(o.steps)}});
  if (main_lr) step_ft_[task_name][o.steps] = path;
  ft_[k] = path;
  const auto tau = dir_ / ("tau_" + k + ".safetensors");
  editor_.task_vector(pretrained(), path, tau);
  tau_[k] = tau;
  progress("seed " + std::to_string(seed_) + ": fine-tuned " + k + " (" + std::to_string(o.steps) +
           " steps): val accuracy " + std::to_string(pretrained_accuracy(task_name, "val")) + " -> " +
           std::to_string(finetuned_accuracy(task_name, "val", lr)));
  return path;
}

std::filesystem::path SeedState::task_vector(const std::string& task_name, std::optional<double> lr) {
  finetuned(task_name, lr);
  return tau_.at(key(task_name, lr));
}

std::map<int, std::filesystem::path> SeedState::step_task_vectors(const std::string& task_name) {
  finetuned(task_name);
  auto& taus = step_tau_[task_name];
  for (const auto& [step, ft] : step_ft_.at(task_name)) {
    if (taus.count(step)) continue;
    if (step == config_.finetune_steps) {
      taus[step] = tau_.at(task_name);
      continue;
    }
    const auto path = dir_ / ("tau_" + task_name + "#" + std::to_string(step) + ".safetensors");
    editor_.task_vector(pretrained(), ft, path);
    taus[step] = path;
  }
  return taus;
}

std::filesystem::path SeedState::step_checkpoint(const std::string& task_name, int step) {
  finetuned(task_name);
  return step_ft_.at(task_name).at(step);
}

std::vector<double> SeedState::accuracies_of(const std::filesystem::path& ckpt, const std::vector<std::string>& names,
                                             const std::string& split) {
  std::vector<const Head*> heads;
  for (const auto& n : names) heads.push_back(&head_for(n));  // may pretrain / fit first
  load_backbone(probe_, ckpt);
  std::vector<double> out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const Task& t = task(names[i]);
    const Dataset& d = split == "val" ? t.data.val : split == "test" ? t.data.test : t.data.train;
    out.push_back(accuracy(probe_, *heads[i], d));
  }
  return out;
}

double SeedState::accuracy_of(const std::filesystem::path& ckpt, const std::string& name, const std::string& split) {
  return accuracies_of(ckpt, {name}, split).front();
}

double SeedState::pretrained_accuracy(const std::string& name, const std::string& split) {
  const auto k = "pre|" + name + "|" + split;
  auto it = acc_cache_.find(k);
  if (it != acc_cache_.end()) return it->second;
  const double a = accuracy_of(pretrained(), name, split);
  acc_cache_[k] = a;
  return a;
}

double SeedState::finetuned_accuracy(const std::string& name, const std::string& split, std::optional<double> lr) {
  const auto k = "ft|" + key(name, lr) + "|" + split;
  auto it = acc_cache_.find(k);
  if (it != acc_cache_.end()) return it->second;
  const double a = accuracy_of(finetuned(name, lr), name, split);
  acc_cache_[k] = a;
  return a;
}

std::filesystem::path SeedState::edit(const std::vector<std::pair<std::filesystem::path, double>>& terms) {
  const auto out = dir_ / "edit.safetensors";
  editor_.apply(pretrained(), terms, out);
  return out;
}

}  // namespace taskvec::lab
