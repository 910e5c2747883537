// taskvec-lab: reproduces "Editing Models with Task Arithmetic" (Ilharco et al., ICLR 2023) at small
// scale on real data; docs/REPRODUCTION.md describes the experiments and the results.
#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <cstdlib>
#include <iostream>
#include <optional>
#include <sstream>

#include <torch/torch.h>

#include "lab/lab.hpp"
#include "taskvec/error.hpp"

namespace lab = taskvec::lab;

namespace {

void print_summary(const lab::Json& s) {
  const auto& m = s.at("mean");
  const auto& sp = s.at("spread_half_range");
  auto pct = [](double v) { char b[32]; std::snprintf(b, sizeof b, "%.1f", 100 * v); return std::string(b); };
  auto pm = [&](const char* e, const char* k) { return pct(m.at(e).at(k).get<double>()) + " ± " + pct(sp.at(e).at(k).get<double>()); };
  std::cout << "taskvec-lab results (test accuracy %, mean ± half-range over " << s.at("seeds") << " seed(s))\n";
  if (m.contains("negation"))
    std::cout << "  negation:  target " << pm("negation", "pretrained_target") << " -> " << pm("negation", "negated_target")
              << " (fine-tuned " << pm("negation", "finetuned_target") << ", random vector " << pm("negation", "random_target")
              << "); control " << pm("negation", "pretrained_control") << " -> " << pm("negation", "negated_control") << "\n";
  if (m.contains("addition"))
    std::cout << "  addition:  normalized pairs " << pm("addition", "pairs_normalized") << ", all "
              << m.at("addition").at("num_tasks").get<double>() << " tasks " << pm("addition", "all_normalized")
              << " (absolute " << pm("addition", "all_absolute") << " vs pretrained " << pm("addition", "all_pretrained_absolute")
              << ", fine-tuned " << pm("addition", "all_finetuned_absolute") << ")\n";
  if (m.contains("analogy"))
    std::cout << "  analogy:   pretrained " << pm("analogy", "pretrained") << ", lambda=1 " << pm("analogy", "analogy_lambda1")
              << " (tau_C + tau_B only " << pm("analogy", "without_tau_A") << ")"
              << ", lambda on val " << pm("analogy", "analogy_val") << ", two coefficients " << pm("analogy", "analogy_two_coef")
              << ", fine-tuned " << pm("analogy", "finetuned") << "\n";
  if (m.contains("cosine"))
    std::cout << "  cosine:    related " << m.at("cosine").at("related_mean").get<double>() << ", unrelated "
              << m.at("cosine").at("unrelated_mean").get<double>() << "\n";
  if (m.contains("lr")) {
    std::cout << "  lr:       ";
    const auto& l = m.at("lr");
    for (std::size_t i = 0; i < l.at("lrs").size(); ++i)
      std::cout << " " << l.at("lrs")[i].get<double>() << ": single " << pct(l.at("single_task")[i].get<double>()) << " pairs "
                << pct(l.at("pairs_normalized")[i].get<double>()) << " all " << pct(l.at("all_normalized")[i].get<double>()) << ";";
    std::cout << "\n";
  }
  if (m.contains("steps")) {
    std::cout << "  steps:    ";
    const auto& l = m.at("steps");
    for (std::size_t i = 0; i < l.at("steps").size(); ++i)
      std::cout << " " << l.at("steps")[i].get<double>() << ": cos " << l.at("cosine_to_final")[i].get<double>() << " add "
                << pct(l.at("addition_normalized")[i].get<double>()) << ";";
    std::cout << "\n";
  }
  if (m.contains("leaderboard")) std::cout << lab::leaderboard_markdown(m.at("leaderboard"), sp.at("leaderboard"));
  for (const auto& c : s.at("checks"))
    std::cout << "  [" << (c.at("ok").get<bool>() ? "ok" : "FAIL") << "] " << c.at("check").get<std::string>() << " (value "
              << c.at("value").get<double>() << ", threshold " << c.at("threshold").get<double>() << ")\n";
  std::printf("  total time %.0f s\n", s.at("seconds_total").get<double>());
}

}  // namespace

int main(int argc, char** argv) {
  // libgomp spins in its barriers by default; on 2 shared cores (other processes compiling) that made a
  // 2-thread fine-tuning step 10x slower than 1 thread. The policy is read when libgomp loads, so set
  // it and re-execute once.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    ::setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
    ::execv("/proc/self/exe", argv);  // returns only on failure: carry on with the default policy
  }
  CLI::App app{"taskvec-lab: task arithmetic (Ilharco et al. 2023) reproduced on MNIST / Fashion-MNIST / digits"};
  app.require_subcommand(1);
  bool quick = false;
  int seeds = 0;
  std::string out = "results", work, mnist_dir, fashion_dir, digits_csv;
  bool keep_work = false;
  int threads = 2;
  std::optional<int> pretrain_steps, finetune_steps, head_iterations;
  std::optional<double> pretrain_wd, head_l2, lr;
  std::string tasks_csv;
  bool skip_pairs = false;
  auto add_common = [&](CLI::App* sub) {
    sub->add_flag("--quick", quick, "small and fast (CI): fewer steps, tasks and seeds; checks the phenomena");
    sub->add_option("--seeds", seeds, "number of seeds (default 2, 1 with --quick)")->check(CLI::Range(1, 16));
    sub->add_option("--out", out, "results folder")->capture_default_str();
    sub->add_option("--work", work, "folder for checkpoints and task vectors (default: a temp folder under /dev/shm)");
    sub->add_flag("--keep-work", keep_work, "keep the checkpoints and task vectors");
    sub->add_option("--mnist", mnist_dir, "folder with MNIST 0.json..9.json (default .cache/mnist)");
    sub->add_option("--fashion", fashion_dir, "folder with the Fashion-MNIST IDX .gz files");
    sub->add_option("--digits", digits_csv, "sklearn digits.csv.gz");
    sub->add_option("--threads", threads, "libtorch threads")->capture_default_str();
    // recipe knobs (defaults: docs/REPRODUCTION.md)
    sub->add_option("--pretrain-steps", pretrain_steps, "pretraining steps");
    sub->add_option("--finetune-steps", finetune_steps, "fine-tuning steps");
    sub->add_option("--pretrain-wd", pretrain_wd, "pretraining AdamW weight decay");
    sub->add_option("--head-l2", head_l2, "L2 penalty of the 20-shot heads");
    sub->add_option("--head-iterations", head_iterations, "Adam iterations of the 20-shot heads");
    sub->add_option("--lr", lr, "fine-tuning learning rate");
    sub->add_option("--tasks", tasks_csv, "comma-separated task names (default: the 8 tasks)");
    sub->add_flag("--skip-pairs", skip_pairs, "addition: only all tasks together, no pairs");
  };
  std::vector<std::pair<CLI::App*, std::vector<std::string>>> subs;
  auto* reproduce = app.add_subcommand("reproduce", "every experiment: negation, addition, analogy, cosine, lr, steps, leaderboard");
  add_common(reproduce);
  subs.emplace_back(reproduce, lab::experiment_names());
  const std::map<std::string, std::string> help = {
      {"negation", "forgetting by negating task vectors (Table 1)"},
      {"addition", "adding task vectors: all pairs and all tasks (Fig. 2-3)"},
      {"analogy", "sub-population task analogies (Table 4)"},
      {"cosine", "cosine similarity matrix of task vectors (Fig. 5)"},
      {"lr", "fine-tuning learning rate sweep (Fig. 6)"},
      {"steps", "intermediate task vectors during fine-tuning (Fig. 7)"},
      {"leaderboard", "every merge method on all tasks, hyperparameters chosen on validation (issue 4)"}};
  for (const auto& name : lab::experiment_names()) {
    auto* sub = app.add_subcommand(name, help.at(name));
    add_common(sub);
    subs.emplace_back(sub, std::vector<std::string>{name});
  }
  // eval: one checkpoint's accuracy on a task and on the control task, as the experiments measure it, with
  // the pretrained checkpoint and heads of a kept work folder: the evaluator of `taskvec sweep`
  // (examples/sweep/eval_lab_negation.sh).
  auto* eval = app.add_subcommand("eval", "print {\"target\": accuracy on --task, \"control\": accuracy on the control task} "
                                          "of CHECKPOINT, with the heads of --work DIR (an earlier run with --keep-work)");
  add_common(eval);
  int eval_seed = 0;
  std::string eval_task, eval_split = "val", eval_checkpoint;
  eval->add_option("checkpoint", eval_checkpoint, "the checkpoint to evaluate (.safetensors)")->required();
  eval->add_option("--task", eval_task, "the target task, e.g. mnist")->required();
  eval->add_option("--split", eval_split, "val or test")->check(CLI::IsMember({"val", "test"}))->capture_default_str();
  eval->add_option("--seed", eval_seed, "the seed whose work folder (DIR/seedN) holds the pretrained checkpoint")
      ->capture_default_str();
  auto* bench = app.add_subcommand("bench", "times one fine-tuning step and evaluation on this machine");
  bench->add_option("--threads", threads, "libtorch threads")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (bench->parsed()) {
    torch::set_num_threads(threads);
    lab::Backbone net;
    lab::Head head{torch::randn({10, 128}), torch::zeros({10})};
    lab::Dataset data{torch::rand({2048, 28, 28}), torch::randint(0, 10, {2048}, torch::kInt64)};
    lab::TrainOptions o;
    o.steps = 5;
    lab::finetune(net, head, data, o);  // warm-up
    o.steps = 40;
    const double t0 = lab::elapsed_seconds();
    lab::finetune(net, head, data, o);
    const double t1 = lab::elapsed_seconds();
    lab::accuracy(net, head, data);
    const double t2 = lab::elapsed_seconds();
    std::printf("threads %d: fine-tuning step (batch 128) %.1f ms, evaluation %.3f ms/image\n", threads,
                (t1 - t0) / o.steps * 1e3, (t2 - t1) / 2048 * 1e3);
    return 0;
  }

  torch::set_num_threads(threads);
  try {
    auto config = lab::LabConfig::make(quick);
    if (seeds > 0) config.seeds = seeds;
    config.out = out;
    config.work = work;
    config.keep_work = keep_work;
    if (pretrain_steps) config.pretrain_steps = *pretrain_steps;
    if (finetune_steps) config.finetune_steps = *finetune_steps;
    if (pretrain_wd) config.pretrain_weight_decay = *pretrain_wd;
    if (head_l2) config.head_l2 = *head_l2;
    if (head_iterations) config.head_iterations = *head_iterations;
    if (lr) config.lr = *lr;
    if (skip_pairs) config.addition_pairs = false;
    if (!tasks_csv.empty()) {
      config.tasks.clear();
      std::stringstream ss(tasks_csv);
      for (std::string t; std::getline(ss, t, ',');) config.tasks.push_back(t);
    }
    if (!mnist_dir.empty()) {
      config.data.mnist_dir = mnist_dir;
    } else if (!std::filesystem::exists(config.data.mnist_dir)) {
      // run from elsewhere: the cache of the checkout this binary was built in (build*/bin/taskvec-lab)
      std::error_code ec;
      const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
      if (!ec && std::filesystem::exists(exe.parent_path().parent_path().parent_path() / ".cache/mnist"))
        config.data.mnist_dir = exe.parent_path().parent_path().parent_path() / ".cache/mnist";
    }
    if (!fashion_dir.empty()) config.data.fashion_dir = fashion_dir;
    if (!digits_csv.empty()) config.data.digits_csv = digits_csv;
    if (eval->parsed()) {
      const std::filesystem::path dir = std::filesystem::path(work) / ("seed" + std::to_string(eval_seed));
      if (work.empty() || !std::filesystem::exists(dir / "pre.safetensors"))
        throw taskvec::Error(taskvec::ErrorCode::kInvalidArgument,
                             "eval needs --work DIR holding seed" + std::to_string(eval_seed) + "/pre.safetensors of an "
                             "earlier run (e.g. taskvec-lab negation --work DIR --keep-work, with the same --quick)");
      const lab::Sources sources = lab::load_sources(config.data);
      const auto tasks = lab::build_tasks(sources, config);
      lab::SeedState state(config, tasks, sources.fashion.train, eval_seed, dir);
      if (!state.reuse_pretrained())
        throw taskvec::Error(taskvec::ErrorCode::kInvalidArgument,
                             dir.string() + " holds no pretrained checkpoint and control head made with these settings "
                             "(give the --quick and pretraining flags of the run that wrote it)");
      const auto acc = state.accuracies_of(eval_checkpoint, {eval_task, "control"}, eval_split);
      std::printf("{\"target\": %.6f, \"control\": %.6f}\n", acc[0], acc[1]);
      return 0;
    }
    for (const auto& [sub, experiments] : subs) {
      if (!sub->parsed()) continue;
      const auto summary = lab::run_experiments(config, experiments);
      print_summary(summary);
      bool ok = true;
      for (const auto& c : summary.at("checks")) ok = ok && c.at("ok").get<bool>();
      if (quick && !ok) {
        std::cerr << "taskvec-lab: a phenomenon check failed (see above)\n";
        return 1;
      }
    }
  } catch (const taskvec::Error& e) {
    std::cerr << "taskvec-lab: " << e.what() << "\n";
    return taskvec::exit_status(e.code());
  } catch (const std::exception& e) {
    std::cerr << "taskvec-lab: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
