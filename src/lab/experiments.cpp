// The paper's experiments at small scale (Ilharco et al. 2023, sections 3-5 and appendix). Every
// lambda is chosen on validation splits; test splits are only evaluated at the chosen lambda.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "lab/lab.hpp"
#include "taskvec/error.hpp"

namespace taskvec::lab {
namespace {

using Terms = std::vector<std::pair<std::filesystem::path, double>>;


// Index of the best value; ties go to the earlier (smaller) lambda.
std::size_t argmax(const std::vector<double>& v) {
  return static_cast<std::size_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

// theta = pre + lambda * sum_j tau_j, scored on validation by the mean normalized accuracy.
struct AdditionResult {
  double lambda = 0;
  std::vector<double> curve;           // mean normalized val accuracy per grid point
  std::vector<double> test_abs, test_norm;
};

AdditionResult add_task_vectors(SeedState& s, const std::vector<std::string>& names, const std::vector<double>& grid,
                                std::optional<double> lr, const std::vector<std::filesystem::path>& taus) {
  AdditionResult r;
  std::vector<double> ft_val, ft_test;
  for (const auto& n : names) {
    ft_val.push_back(s.finetuned_accuracy(n, "val", lr));
    ft_test.push_back(s.finetuned_accuracy(n, "test", lr));
  }
  for (double lambda : grid) {
    std::vector<double> acc;
    if (lambda == 0) {
      for (const auto& n : names) acc.push_back(s.pretrained_accuracy(n, "val"));
    } else {
      Terms terms;
      for (const auto& t : taus) terms.emplace_back(t, lambda);
      acc = s.accuracies_of(s.edit(terms), names, "val");
    }
    std::vector<double> norm;
    for (std::size_t i = 0; i < acc.size(); ++i) norm.push_back(acc[i] / std::max(ft_val[i], 1e-9));
    r.curve.push_back(mean(norm));
  }
  r.lambda = grid[argmax(r.curve)];
  Terms terms;
  for (const auto& t : taus) terms.emplace_back(t, r.lambda);
  r.test_abs = r.lambda == 0 ? [&] {
    std::vector<double> a;
    for (const auto& n : names) a.push_back(s.pretrained_accuracy(n, "test"));
    return a;
  }() : s.accuracies_of(s.edit(terms), names, "test");
  for (std::size_t i = 0; i < names.size(); ++i) r.test_norm.push_back(r.test_abs[i] / std::max(ft_test[i], 1e-9));
  return r;
}

std::vector<std::filesystem::path> taus_of(SeedState& s, const std::vector<std::string>& names, std::optional<double> lr) {
  std::vector<std::filesystem::path> t;
  for (const auto& n : names) t.push_back(s.task_vector(n, lr));
  return t;
}

std::vector<std::vector<std::string>> all_pairs(const std::vector<std::string>& tasks) {
  std::vector<std::vector<std::string>> p;
  for (std::size_t i = 0; i < tasks.size(); ++i)
    for (std::size_t j = i + 1; j < tasks.size(); ++j) p.push_back({tasks[i], tasks[j]});
  return p;
}

std::string join(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& x : v) out += (out.empty() ? "" : sep) + x;
  return out;
}

}  // namespace

// Section 3 / Table 1: forgetting by negation. lambda: largest target drop on val with control >= 95% of
// the pretrained model's control val accuracy.
Json run_negation(SeedState& s, const LabConfig& c) {
  const auto& pre = s.pretrained();
  const double control_pre_val = s.pretrained_accuracy("control", "val");
  Json detail = Json::object();
  std::vector<double> pre_t, pre_c, ft_t, ft_c, neg_t, neg_c, rnd_t, rnd_c, lambdas;
  std::vector<double> curve_target(c.grid.size(), 0.0), curve_control(c.grid.size(), 0.0);
  for (const auto& task : c.tasks) {
    const auto tau = s.task_vector(task);
    std::vector<double> val_target, val_control;
    for (double lambda : c.grid) {
      std::vector<double> acc = lambda == 0
          ? std::vector<double>{s.pretrained_accuracy(task, "val"), control_pre_val}
          : s.accuracies_of(s.edit({{tau, -lambda}}), {task, "control"}, "val");
      val_target.push_back(acc[0]);
      val_control.push_back(acc[1]);
    }
    std::size_t best = 0;
    for (std::size_t i = 0; i < c.grid.size(); ++i)
      if (val_control[i] >= 0.95 * control_pre_val && val_target[i] < val_target[best]) best = i;
    const double lambda = c.grid[best];
    const auto neg = lambda == 0 ? std::vector<double>{s.pretrained_accuracy(task, "test"), s.pretrained_accuracy("control", "test")}
                                 : s.accuracies_of(s.edit({{tau, -lambda}}), {task, "control"}, "test");
    const auto ft = s.accuracies_of(s.finetuned(task), {task, "control"}, "test");
    const auto rnd_path = s.dir() / ("random_" + task + ".safetensors");
    s.editor().random_like(pre, tau, 0xA11CE + static_cast<std::uint64_t>(s.seed()) * 1000 + detail.size(), rnd_path);
    const auto rnd = lambda == 0 ? neg : s.accuracies_of(s.edit({{rnd_path, -lambda}}), {task, "control"}, "test");
    detail[task] = {{"lambda", lambda},
                    {"pretrained", {{"target", s.pretrained_accuracy(task, "test")}, {"control", s.pretrained_accuracy("control", "test")}}},
                    {"finetuned", {{"target", ft[0]}, {"control", ft[1]}}},
                    {"negated", {{"target", neg[0]}, {"control", neg[1]}}},
                    {"random", {{"target", rnd[0]}, {"control", rnd[1]}}},
                    {"val_curve", {{"lambda", c.grid}, {"target", val_target}, {"control", val_control}}}};
    pre_t.push_back(s.pretrained_accuracy(task, "test"));
    pre_c.push_back(s.pretrained_accuracy("control", "test"));
    ft_t.push_back(ft[0]);
    ft_c.push_back(ft[1]);
    neg_t.push_back(neg[0]);
    neg_c.push_back(neg[1]);
    rnd_t.push_back(rnd[0]);
    rnd_c.push_back(rnd[1]);
    lambdas.push_back(lambda);
    for (std::size_t i = 0; i < c.grid.size(); ++i) {
      curve_target[i] += val_target[i] / static_cast<double>(c.tasks.size());
      curve_control[i] += val_control[i] / static_cast<double>(c.tasks.size());
    }
    progress("seed " + std::to_string(s.seed()) + ": negation " + task + ": lambda " + fixed3(lambda) + ", target " +
             fixed3(pre_t.back()) + " -> " + fixed3(neg[0]) + ", control " + fixed3(pre_c.back()) + " -> " + fixed3(neg[1]) +
             ", random vector target " + fixed3(rnd[0]));
  }
  Json summary = {{"pretrained_target", mean(pre_t)}, {"pretrained_control", mean(pre_c)},
                  {"finetuned_target", mean(ft_t)},   {"finetuned_control", mean(ft_c)},
                  {"negated_target", mean(neg_t)},     {"negated_control", mean(neg_c)},
                  {"random_target", mean(rnd_t)},      {"random_control", mean(rnd_c)},
                  {"mean_lambda", mean(lambdas)},
                  {"per_task_negated_target", neg_t}, {"per_task_pretrained_target", pre_t}, {"per_task_lambda", lambdas},
                  {"val_curve_target", curve_target}, {"val_curve_control", curve_control}};
  return {{"summary", summary}, {"detail", detail}, {"tasks", c.tasks}, {"grid", c.grid}};
}

// Section 4: addition. One lambda per subset, chosen on validation by mean normalized accuracy.
Json run_addition(SeedState& s, const LabConfig& c) {
  auto subsets = c.addition_pairs ? all_pairs(c.tasks) : std::vector<std::vector<std::string>>{};
  subsets.push_back(c.tasks);
  Json detail = Json::array();
  std::vector<double> pair_norm, pair_abs, pair_pre_norm;
  std::vector<double> pair_curve(c.grid.size(), 0.0);
  Json all_summary;
  for (std::size_t k = 0; k < subsets.size(); ++k) {
    const auto& subset = subsets[k];
    const bool is_pair = k + 1 < subsets.size();  // the last subset is all tasks
    const auto r = add_task_vectors(s, subset, c.grid, {}, taus_of(s, subset, {}));
    std::vector<double> pre_abs, pre_norm, ft_abs;
    for (const auto& n : subset) {
      pre_abs.push_back(s.pretrained_accuracy(n, "test"));
      ft_abs.push_back(s.finetuned_accuracy(n, "test"));
      pre_norm.push_back(pre_abs.back() / std::max(ft_abs.back(), 1e-9));
    }
    detail.push_back({{"tasks", subset}, {"lambda", r.lambda}, {"test_accuracy", r.test_abs},
                      {"test_normalized", r.test_norm}, {"pretrained_accuracy", pre_abs},
                      {"finetuned_accuracy", ft_abs}, {"val_curve_normalized", r.curve}});
    if (is_pair) {
      pair_norm.push_back(mean(r.test_norm));
      pair_abs.push_back(mean(r.test_abs));
      pair_pre_norm.push_back(mean(pre_norm));
      for (std::size_t i = 0; i < c.grid.size(); ++i) pair_curve[i] += r.curve[i] / static_cast<double>(subsets.size() - 1);
    } else {
      all_summary = {{"all_normalized", mean(r.test_norm)}, {"all_absolute", mean(r.test_abs)},
                     {"all_lambda", r.lambda}, {"all_pretrained_absolute", mean(pre_abs)},
                     {"all_pretrained_normalized", mean(pre_norm)}, {"all_finetuned_absolute", mean(ft_abs)},
                     {"all_per_task_absolute", r.test_abs}, {"all_per_task_normalized", r.test_norm},
                     {"all_per_task_pretrained", pre_abs}, {"all_per_task_finetuned", ft_abs},
                     {"all_val_curve_normalized", r.curve}};
    }
    progress("seed " + std::to_string(s.seed()) + ": addition " + join(subset, "+") + ": lambda " + fixed3(r.lambda) +
             ", normalized test accuracy " + fixed3(mean(r.test_norm)) + " (pretrained " + fixed3(mean(pre_norm)) + ")");
  }
  Json summary = all_summary;
  summary["pairs_normalized"] = mean(pair_norm);
  summary["pairs_absolute"] = mean(pair_abs);
  summary["pairs_pretrained_normalized"] = mean(pair_pre_norm);
  summary["pairs_val_curve_normalized"] = pair_curve;
  summary["num_tasks"] = c.tasks.size();
  return {{"summary", summary}, {"detail", detail}, {"tasks", c.tasks}, {"grid", c.grid}};
}

// Section 5, sub-population analogies: tau_hat(style s, classes k) = tau(s, k') + tau(s', k) - tau(s', k'),
// with s' the other style of the axis and k' the other class half. Styles: plain MNIST vs each axis.
Json run_analogy(SeedState& s, const LabConfig& c) {
  Json detail = Json::array();
  std::vector<double> pre_v, ft_v, a1_v, aval_v, two_v, noa_v;
  std::vector<double> axis_pre, axis_a1, axis_noa;  // per style axis, mean over its 4 targets
  for (const auto& axis : c.analogy_axes) {
    const std::size_t first = pre_v.size();
    for (const std::string& style : {std::string("mnist"), axis}) {
      const std::string other = style == "mnist" ? axis : "mnist";
      for (const std::string half : {"lo", "hi"}) {
        const std::string other_half = half == "lo" ? "hi" : "lo";
        const std::string target = style + "_" + half;
        const auto tau_same_style = s.task_vector(style + "_" + other_half);   // tau_C: target's style
        const auto tau_same_class = s.task_vector(other + "_" + half);         // tau_B: target's classes
        const auto tau_neither = s.task_vector(other + "_" + other_half);      // tau_A
        auto analogy = [&](double l1, double l2) -> Terms {
          return {{tau_same_style, l1}, {tau_same_class, l2}, {tau_neither, -l2}};
        };
        const double pre = s.pretrained_accuracy(target, "test");
        const double ft = s.finetuned_accuracy(target, "test");
        const double a1 = s.accuracy_of(s.edit(analogy(1, 1)), target, "test");
        const double no_a = s.accuracy_of(s.edit({{tau_same_style, 1}, {tau_same_class, 1}}), target, "test");
        // lambda on the target's validation split (uses target data: the paper's tuned variant)
        std::vector<double> curve;
        for (double l : c.grid)
          curve.push_back(l == 0 ? s.pretrained_accuracy(target, "val") : s.accuracy_of(s.edit(analogy(l, l)), target, "val"));
        const double lambda = c.grid[argmax(curve)];
        const double aval = lambda == 0 ? pre : s.accuracy_of(s.edit(analogy(lambda, lambda)), target, "test");
        // two coefficients: lambda_C for tau_C, lambda_BA for (tau_B - tau_A)
        double best = -1, l1b = 0, l2b = 0;
        for (double l1 : c.grid2)
          for (double l2 : c.grid2) {
            const double v = (l1 == 0 && l2 == 0) ? s.pretrained_accuracy(target, "val")
                                                  : s.accuracy_of(s.edit(analogy(l1, l2)), target, "val");
            if (v > best) best = v, l1b = l1, l2b = l2;
          }
        const double two = (l1b == 0 && l2b == 0) ? pre : s.accuracy_of(s.edit(analogy(l1b, l2b)), target, "test");
        detail.push_back({{"axis", axis}, {"target", target},
                          {"tau_C", style + "_" + other_half}, {"tau_B", other + "_" + half}, {"tau_A", other + "_" + other_half},
                          {"pretrained", pre}, {"finetuned", ft}, {"analogy_lambda1", a1}, {"without_tau_A", no_a},
                          {"analogy_val_lambda", lambda}, {"analogy_val", aval},
                          {"two_coef_lambdas", {l1b, l2b}}, {"analogy_two_coef", two}, {"val_curve", curve}});
        pre_v.push_back(pre);
        ft_v.push_back(ft);
        a1_v.push_back(a1);
        aval_v.push_back(aval);
        two_v.push_back(two);
        noa_v.push_back(no_a);
        progress("seed " + std::to_string(s.seed()) + ": analogy " + target + " (axis " + axis + "): pretrained " +
                 fixed3(pre) + ", analogy(lambda=1) " + fixed3(a1) + ", lambda on val " + fixed3(aval) + ", fine-tuned " + fixed3(ft));
      }
    }
    auto tail_mean = [&](const std::vector<double>& v) { return mean(std::vector<double>(v.begin() + static_cast<std::ptrdiff_t>(first), v.end())); };
    axis_pre.push_back(tail_mean(pre_v));
    axis_a1.push_back(tail_mean(a1_v));
    axis_noa.push_back(tail_mean(noa_v));
  }
  Json summary = {{"pretrained", mean(pre_v)}, {"finetuned", mean(ft_v)}, {"analogy_lambda1", mean(a1_v)},
                  {"analogy_val", mean(aval_v)}, {"analogy_two_coef", mean(two_v)}, {"without_tau_A", mean(noa_v)},
                  {"gain_lambda1", mean(a1_v) - mean(pre_v)}, {"gain_val", mean(aval_v) - mean(pre_v)},
                  {"gain_two_coef", mean(two_v) - mean(pre_v)}, {"num_targets", pre_v.size()},
                  {"per_target_pretrained", pre_v}, {"per_target_lambda1", a1_v},
                  {"per_axis_pretrained", axis_pre}, {"per_axis_lambda1", axis_a1}, {"per_axis_without_tau_A", axis_noa}};
  return {{"summary", summary}, {"detail", detail}, {"axes", c.analogy_axes}};
}

// Cosine similarity of the task vectors (engine's task_vector_similarity): the paper's Fig. 5 analog.
Json run_cosine(SeedState& s, const LabConfig& c) {
  std::vector<std::pair<std::string, std::filesystem::path>> taus;
  for (const auto& t : c.tasks) taus.emplace_back(t, s.task_vector(t));
  const auto rep = s.editor().similarity(taus);
  std::vector<double> related, unrelated, all;
  for (std::size_t i = 0; i < c.tasks.size(); ++i)
    for (std::size_t j = i + 1; j < c.tasks.size(); ++j) {
      const double v = rep.cosine[i][j];
      (s.task(c.tasks[i]).source == s.task(c.tasks[j]).source ? related : unrelated).push_back(v);
      all.push_back(v);
    }
  Json summary = {{"matrix", rep.cosine}, {"norms", rep.norms}, {"related_mean", mean(related)},
                  {"unrelated_mean", mean(unrelated)}, {"offdiagonal_mean", mean(all)}};
  progress("seed " + std::to_string(s.seed()) + ": cosine: related " + fixed3(mean(related)) + ", unrelated " +
           fixed3(mean(unrelated)));
  return {{"summary", summary}, {"tasks", c.tasks}};
}

// Appendix: fine-tuning learning rate vs single-task accuracy and addition (pairs and all tasks).
Json run_lr(SeedState& s, const LabConfig& c) {
  Json detail = Json::array();
  std::vector<double> single, pairs, all, all_abs, norms;
  for (double lr : c.lrs) {
    std::vector<double> acc, tau_norm;
    for (const auto& t : c.tasks) acc.push_back(s.finetuned_accuracy(t, "test", lr));
    std::vector<double> pn;
    for (const auto& p : all_pairs(c.tasks)) pn.push_back(mean(add_task_vectors(s, p, c.coarse_grid, lr, taus_of(s, p, lr)).test_norm));
    const auto r = add_task_vectors(s, c.tasks, c.coarse_grid, lr, taus_of(s, c.tasks, lr));
    std::vector<std::pair<std::string, std::filesystem::path>> taus;
    for (const auto& t : c.tasks) taus.emplace_back(t, s.task_vector(t, lr));
    const auto rep = s.editor().similarity(taus);
    single.push_back(mean(acc));
    pairs.push_back(mean(pn));
    all.push_back(mean(r.test_norm));
    all_abs.push_back(mean(r.test_abs));
    norms.push_back(mean(rep.norms));
    detail.push_back({{"lr", lr}, {"single_task_test", acc}, {"pairs_normalized", pn}, {"all_lambda", r.lambda},
                      {"all_normalized", r.test_norm}, {"tau_norms", rep.norms}});
    progress("seed " + std::to_string(s.seed()) + ": lr " + fixed3(lr * 1e4) + "e-4: single-task " + fixed3(single.back()) +
             ", pairs normalized " + fixed3(pairs.back()) + ", all normalized " + fixed3(all.back()));
  }
  Json summary = {{"lrs", c.lrs}, {"single_task", single}, {"pairs_normalized", pairs}, {"all_normalized", all},
                  {"all_absolute", all_abs}, {"mean_tau_norm", norms}};
  return {{"summary", summary}, {"detail", detail}};
}

// Fig. 7 analog: intermediate task vectors (every checkpoint_every steps) vs the final one.
Json run_steps(SeedState& s, const LabConfig& c) {
  std::map<std::string, std::map<int, std::filesystem::path>> taus;
  for (const auto& t : c.tasks) taus[t] = s.step_task_vectors(t);
  std::vector<int> steps;
  for (const auto& [step, path] : taus.begin()->second) steps.push_back(step);
  std::vector<double> cos_mean, single_mean, add_norm, add_abs;
  Json detail = Json::array();
  for (int step : steps) {
    std::vector<double> cos, single;
    std::vector<std::filesystem::path> step_taus;
    for (const auto& t : c.tasks) {
      const auto rep = s.editor().similarity({{"step", taus[t].at(step)}, {"final", taus[t].at(c.finetune_steps)}});
      cos.push_back(rep.cosine[0][1]);
      single.push_back(s.accuracy_of(s.step_checkpoint(t, step), t, "test"));
      step_taus.push_back(taus[t].at(step));
    }
    // normalized by the final fine-tuned model's accuracy, as in the paper's Fig. 7
    const auto r = add_task_vectors(s, c.tasks, c.coarse_grid, {}, step_taus);
    cos_mean.push_back(mean(cos));
    single_mean.push_back(mean(single));
    add_norm.push_back(mean(r.test_norm));
    add_abs.push_back(mean(r.test_abs));
    detail.push_back({{"step", step}, {"cosine_to_final", cos}, {"single_task_test", single}, {"addition_lambda", r.lambda},
                      {"addition_normalized", r.test_norm}});
    progress("seed " + std::to_string(s.seed()) + ": step " + std::to_string(step) + ": cosine to final " +
             fixed3(cos_mean.back()) + ", single-task " + fixed3(single_mean.back()) + ", addition normalized " + fixed3(add_norm.back()));
  }
  Json summary = {{"steps", steps}, {"cosine_to_final", cos_mean}, {"single_task", single_mean},
                  {"addition_normalized", add_norm}, {"addition_absolute", add_abs}};
  return {{"summary", summary}, {"detail", detail}};
}

const std::vector<std::string>& experiment_names() {
  static const std::vector<std::string> names = {"negation", "addition", "analogy", "cosine", "lr", "steps", "leaderboard"};
  return names;
}

}  // namespace taskvec::lab
