// The registry of merge methods: name -> kernel + parameter schema (names, types, defaults, ranges).
// Recipes are validated against it; docs/METHODS.md documents the same table.
#include <limits>

#include "merge_internal.hpp"

namespace taskvec {

namespace {

using T = MergeParamType;
using S = MergeParamScope;
constexpr double kInf = std::numeric_limits<double>::infinity();

MergeParamSpec weight() {
  return {"weight", T::kFloat, S::kModel, 1.0, -kInf, kInf, false, false, {}, "scale of this model's task vector"};
}
MergeParamSpec density(double def) {
  return {"density", T::kFloat, S::kModel, def, 0.0, 1.0, true, false, {}, "fraction of entries kept, (0, 1]"};
}
MergeParamSpec gamma() {
  return {"gamma", T::kFloat, S::kModel, 0.01, 0.0, 1.0, false, true, {}, "fraction of largest magnitudes removed, [0, 1)"};
}
MergeParamSpec epsilon() {
  return {"epsilon", T::kFloat, S::kModel, 0.1, 0.0, 1.0, false, true, {}, "half-width of the keep-probability range"};
}
MergeParamSpec tall_lambda() {
  return {"tall_lambda", T::kFloat, S::kModel, 0.4, 0.0, kInf, false, false, {}, "TALL mask threshold lambda_t"};
}
MergeParamSpec lambda() {
  return {"lambda", T::kFloat, S::kGlobal, 1.0, -kInf, kInf, false, false, {}, "scale of the merged task vector"};
}
MergeParamSpec normalize(bool def) {
  return {"normalize", T::kBool, S::kGlobal, def ? 1.0 : 0.0, 0, 1, false, false, {}, "divide by the sum of weights"};
}
MergeParamSpec rescale(bool def) {
  return {"rescale", T::kBool, S::kGlobal, def ? 1.0 : 0.0, 0, 1, false, false, {}, "divide survivors by their keep probability"};
}
MergeParamSpec disjoint() {
  return {"disjoint", T::kChoice, S::kGlobal, 0, 0, 1, false, false, {"mean", "sum"}, "disjoint merge of agreeing entries"};
}
// mergekit spelling of the disjoint merge for the TIES family: normalize true = mean, false = sum.
MergeParamSpec ties_normalize() {
  return {"normalize", T::kBool, S::kGlobal, 1.0, 0, 1, false, false, {}, "mergekit alias of disjoint: true = mean, false = sum"};
}
MergeParamSpec trim() {
  return {"trim", T::kChoice, S::kGlobal, 0, 0, 1, false, false, {"tensor", "model"}, "top-k per tensor or over the whole model"};
}
MergeParamSpec interp_t() {
  return {"t", T::kFloat, S::kGlobal, 0.5, 0.0, 1.0, false, false, {}, "interpolation factor, 0 = first model"};
}
MergeParamSpec consensus_k() {
  return {"k", T::kInt, S::kGlobal, 2, 0, 1e9, false, false, {}, "minimum number of agreeing task masks"};
}

std::vector<MergeMethod> build() {
  std::vector<MergeMethod> v;
  // Field order: name, kernel, params, needs_base, min_models, max_models, summary; elementwise set below.
  v.push_back({"linear", merge_linear, {weight(), normalize(true)}, false, 1, 1u << 20,
               "weighted average of the models (model soup)"});
  v.push_back({"task_arithmetic", merge_task_arithmetic, {weight(), lambda(), normalize(false)}, true, 1, 1u << 20,
               "base + lambda * sum w_i tau_i"});
  v.push_back({"ties", merge_ties, {weight(), density(0.2), lambda(), disjoint(), ties_normalize(), trim()}, true, 1, 1u << 20,
               "trim, elect sign, disjoint merge (Yadav et al. 2023)"});
  v.push_back({"dare_linear", merge_dare_linear, {weight(), density(0.5), lambda(), rescale(true), normalize(false)}, true, 1,
               1u << 20, "random drop and rescale, then task arithmetic (Yu et al. 2024)"});
  v.push_back({"dare_ties", merge_dare_ties, {weight(), density(0.5), lambda(), rescale(true), disjoint(), ties_normalize()}, true, 1, 1u << 20,
               "random drop and rescale, then TIES sign election"});
  v.push_back({"breadcrumbs", merge_breadcrumbs, {weight(), density(0.1), gamma(), lambda(), normalize(false)}, true, 1,
               1u << 20, "drop outliers and small entries, then task arithmetic (Davari & Belilovsky 2024)"});
  v.push_back({"breadcrumbs_ties", merge_breadcrumbs_ties, {weight(), density(0.1), gamma(), lambda(), disjoint(), ties_normalize()}, true, 1,
               1u << 20, "breadcrumbs masks, then TIES sign election"});
  v.push_back({"della", merge_della, {weight(), density(0.7), epsilon(), lambda(), rescale(true), disjoint(), ties_normalize()}, true, 1,
               1u << 20, "magnitude-ranked random drop, rescale, TIES election (Deep et al. 2024)"});
  v.push_back({"model_stock", merge_model_stock, {}, true, 1, 1u << 20,
               "interpolate average and base by the angle between task vectors (Jang et al. 2024)"});
  v.push_back({"slerp", merge_slerp, {interp_t()}, false, 2, 2, "spherical interpolation of two models"});
  v.push_back({"magnitude_prune", merge_magnitude_prune, {weight(), density(0.2), lambda(), rescale(false), normalize(false)},
               true, 1, 1u << 20, "keep the largest magnitudes of each task vector, then task arithmetic"});
  v.push_back({"consensus", merge_consensus, {weight(), tall_lambda(), consensus_k(), lambda()}, true, 1, 1u << 20,
               "keep entries at least k TALL masks agree on (Wang et al. 2024)"});
  v.push_back({"tsv_merge", merge_tsv, {weight(), lambda()}, true, 1, 1u << 20,
               "task singular vectors, decorrelated (Gargiulo et al. 2025)"});
  v.push_back({"iso_c", merge_iso_c, {weight(), lambda()}, true, 1, 1u << 20,
               "isotropic spectrum of the summed task vector (Marczak et al. 2025)"});
  for (auto& m : v)
    m.elementwise = m.name == "linear" || m.name == "task_arithmetic" || m.name == "dare_linear" || m.name == "consensus";
  return v;
}

}  // namespace

const MergeParamSpec* MergeMethod::find_param(std::string_view param) const noexcept {
  for (const auto& p : params)
    if (p.name == param) return &p;
  return nullptr;
}

const std::vector<MergeMethod>& merge_methods() {
  static const std::vector<MergeMethod> methods = build();
  return methods;
}

const MergeMethod* find_merge_method(std::string_view name) noexcept {
  for (const auto& m : merge_methods())
    if (m.name == name) return &m;
  return nullptr;
}

namespace merge_detail {

void apply_param(std::string_view name, double value, MergeModelParams* model, MergeGlobalParams* global) {
  if (model) {
    if (name == "weight") model->weight = static_cast<float>(value);
    else if (name == "density") model->density = static_cast<float>(value);
    else if (name == "gamma") model->gamma = static_cast<float>(value);
    else if (name == "epsilon") model->epsilon = static_cast<float>(value);
    else if (name == "tall_lambda") model->tall_lambda = static_cast<float>(value);
  }
  if (global) {
    if (name == "lambda") global->lambda = static_cast<float>(value);
    else if (name == "normalize") global->normalize = value != 0;
    else if (name == "rescale") global->rescale = value != 0;
    else if (name == "disjoint") global->disjoint_sum = value != 0;
    else if (name == "trim") global->trim_model = value != 0;
    else if (name == "t") global->t = static_cast<float>(value);
    else if (name == "k") global->k = static_cast<int>(value);
  }
}

}  // namespace merge_detail

}  // namespace taskvec
