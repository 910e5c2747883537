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
// mergekit's default density is 1 (nothing dropped) for every sparsifying method.
MergeParamSpec density(double def = 1.0) {
  return {"density", T::kFloat, S::kModel, def, 0.0, kInf, true, false, {}, "fraction of entries kept, > 0 (>= 1 keeps all)"};
}
MergeParamSpec gamma() {
  return {"gamma", T::kFloat, S::kModel, 0.01, 0.0, 1.0, false, true, {}, "fraction of largest magnitudes removed, [0, 1)"};
}
MergeParamSpec epsilon() {
  return {"epsilon", T::kFloat, S::kModel, 0.15, 0.0, 1.0, false, true, {}, "half-width of the keep-probability range"};
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
// TIES family: mergekit's normalize divides the agreeing sum by the sum of the agreeing weights.
MergeParamSpec ties_normalize(bool def) {
  return {"normalize", T::kBool, S::kGlobal, def ? 1.0 : 0.0, 0, 1, false, false, {},
          "divide the agreeing sum by the sum of the agreeing weights (mergekit)"};
}
// false / true (mergekit: one L1-norm-matching factor per tensor) / inverse_density (each survivor / p).
MergeParamSpec rescale(bool def) {
  return {"rescale", T::kChoice, S::kGlobal, def ? 1.0 : 0.0, 0, 2, false, false, {"false", "true", "inverse_density"},
          "scale survivors back: true = match the L1 norm (mergekit), inverse_density = / keep probability"};
}
MergeParamSpec disjoint() {
  return {"disjoint", T::kChoice, S::kGlobal, 0, 0, 1, false, false, {"mean", "sum"},
          "taskvec: mean = / sum |w| of agreeing entries (TIES paper), sum = no division; replaces normalize"};
}
MergeParamSpec sign_tie() {
  return {"sign_tie", T::kChoice, S::kGlobal, 0, 0, 1, false, false, {"positive", "majority"},
          "sign elected where the weighted sum is 0: positive (mergekit) or the tensor's majority sign"};
}
MergeParamSpec count_rounding() {
  return {"count_rounding", T::kChoice, S::kGlobal, 0, 0, 1, false, false, {"floor", "round"},
          "top-k counts: floor(density x n) as mergekit, or round"};
}
MergeParamSpec int8_mask() {
  return {"int8_mask", T::kBool, S::kGlobal, 0, 0, 1, false, false, {}, "mergekit memory hint; no effect (taskvec masks are bits)"};
}
MergeParamSpec trim() {
  return {"trim", T::kChoice, S::kGlobal, 0, 0, 1, false, false, {"tensor", "model"}, "top-k per tensor or over the whole model"};
}
MergeParamSpec rank_dim() {
  return {"rank_dim", T::kInt, S::kGlobal, 1, -1, 64, false, false, {},
          "dimension DELLA ranks magnitudes along: 1 (mergekit), -1 = the last"};
}
MergeParamSpec filter_wise() {
  return {"filter_wise", T::kBool, S::kGlobal, 0, 0, 1, false, false, {}, "one ratio per row instead of per tensor"};
}
MergeParamSpec interp_t() {
  return {"t", T::kFloat, S::kGlobal, 0.5, -kInf, kInf, false, false, {},
          "interpolation factor, 0 = the base (first model); outside [0, 1] extrapolates"};
}
MergeParamSpec consensus_k() {
  return {"k", T::kInt, S::kGlobal, 2, 0, 1e9, false, false, {}, "minimum number of agreeing task masks"};
}

// mergekit's newer methods (merge_mergekit_methods.cpp): names and defaults as in mergekit's .py files.
MergeParamSpec gflag(std::string_view name, bool def, std::string_view help) {
  return {name, T::kBool, S::kGlobal, def ? 1.0 : 0.0, 0, 1, false, false, {}, help};
}
MergeParamSpec gfloat(std::string_view name, double def, double lo, std::string_view help) {
  return {name, T::kFloat, S::kGlobal, def, lo, kInf, false, false, {}, help};
}

std::vector<MergeParamSpec> gta(bool sparsifies, bool consensus, bool normalize_default, bool rescale_default,
                                std::vector<MergeParamSpec> extra) {
  std::vector<MergeParamSpec> p = {weight()};
  if (sparsifies) p.push_back(density());
  p.insert(p.end(), extra.begin(), extra.end());
  p.push_back(lambda());
  p.push_back(consensus ? ties_normalize(normalize_default) : normalize(normalize_default));
  p.push_back(rescale(rescale_default));
  p.push_back(int8_mask());
  if (consensus) {
    p.push_back(disjoint());
    p.push_back(sign_tie());
  }
  return p;
}

std::vector<MergeMethod> build() {
  std::vector<MergeMethod> v;
  // Field order: name, kernel, params, needs_base, min_models, max_models, summary; elementwise set below.
  // The mergekit methods take mergekit's parameters and defaults (registry.py, generalized_task_arithmetic.py).
  v.push_back({"linear", merge_linear, {weight(), normalize(true)}, false, 1, 1u << 20,
               "weighted average of the models (model soup)"});
  v.push_back({"task_arithmetic", merge_task_arithmetic, gta(false, false, false, false, {}), true, 1, 1u << 20,
               "base + lambda * sum w_i tau_i"});
  v.push_back({"ties", merge_ties, gta(true, true, true, false, {count_rounding(), trim()}), true, 1, 1u << 20,
               "trim, elect sign, disjoint merge (Yadav et al. 2023)"});
  v.push_back({"dare_linear", merge_dare_linear, gta(true, false, false, true, {}), true, 1, 1u << 20,
               "random drop and rescale, then task arithmetic (Yu et al. 2024)"});
  v.push_back({"dare_ties", merge_dare_ties, gta(true, true, false, true, {}), true, 1, 1u << 20,
               "random drop and rescale, then TIES sign election"});
  v.push_back({"breadcrumbs", merge_breadcrumbs, gta(true, false, false, false, {gamma(), count_rounding()}), true, 1,
               1u << 20, "drop outliers and small entries, then task arithmetic (Davari & Belilovsky 2024)"});
  v.push_back({"breadcrumbs_ties", merge_breadcrumbs_ties, gta(true, true, false, false, {gamma(), count_rounding()}), true,
               1, 1u << 20, "breadcrumbs masks, then TIES sign election"});
  v.push_back({"della", merge_della, gta(true, true, true, true, {epsilon(), rank_dim()}), true, 1, 1u << 20,
               "magnitude-ranked random drop, rescale, TIES election (Deep et al. 2024)"});
  v.push_back({"della_linear", merge_della_linear, gta(true, false, false, true, {epsilon(), rank_dim()}), true, 1,
               1u << 20, "magnitude-ranked random drop and rescale, then task arithmetic"});
  v.push_back({"model_stock", merge_model_stock, {filter_wise()}, true, 1, 1u << 20,
               "interpolate average and base by the angle between task vectors (Jang et al. 2024)"});
  v.push_back({"slerp", merge_slerp, {interp_t()}, false, 2, 2, "spherical interpolation of two models"});
  v.push_back({"passthrough", merge_passthrough,
               {{"scale", T::kFloat, S::kModel, 1.0, -kInf, kInf, false, false, {}, "multiplies the tensor (mergekit)"}},
               false, 1, 1, "one model's tensors unchanged (or scaled); with slices, layer stacking"});
  v.push_back({"magnitude_prune", merge_magnitude_prune,
               {weight(), density(0.2), lambda(), rescale(false), normalize(false), count_rounding()}, true, 1, 1u << 20,
               "keep the largest magnitudes of each task vector, then task arithmetic"});
  v.push_back({"consensus", merge_consensus, {weight(), tall_lambda(), consensus_k(), lambda()}, true, 1, 1u << 20,
               "keep entries at least k TALL masks agree on (Wang et al. 2024)"});
  v.push_back({"tsv_merge", merge_tsv, {weight(), lambda()}, true, 1, 1u << 20,
               "task singular vectors, decorrelated (Gargiulo et al. 2025)"});
  v.push_back({"iso_c", merge_iso_c, {weight(), lambda()}, true, 1, 1u << 20,
               "isotropic spectrum of the summed task vector (Marczak et al. 2025)"});
  // mergekit's newer methods (mergekit/merge_methods/*.py). mergekit requires nuslerp's and multislerp's
  // weight and nearswap's t; taskvec's registry has defaults for them (1, 1, 0.5).
  v.push_back({"nuslerp", merge_nuslerp,
               {weight(), gflag("nuslerp_row_wise", false, "vectors along dimension 0 instead of the last (nuslerp_flatten: false)"),
                gflag("nuslerp_flatten", true, "one vector per tensor")},
               false, 2, 2, "slerp of two models (or task vectors, with a base) at t = w1 / (w0 + w1)"});
  v.push_back({"multislerp", merge_multislerp,
               {weight(), gflag("normalize_weights", true, "divide the weights by their sum"),
                gfloat("eps", 1e-8, 0, "stability constant of the projections")},
               false, 1, 1u << 20, "spherical barycentre of several models (or task vectors, with a base)"});
  v.push_back({"karcher", merge_karcher,
               {{"max_iter", T::kInt, S::kGlobal, 10, 0, 1e9, false, false, {}, "iterations of the Karcher mean"},
                gfloat("tol", 1e-5, 0, "convergence tolerance")},
               false, 1, 1u << 20, "Riemannian (Karcher) mean of the models on the hypersphere"});
  v.push_back({"nearswap", merge_nearswap,
               {{"t", T::kFloat, S::kGlobal, 0.5, -kInf, kInf, false, false, {},
                 "strength: weight = clamp(t / |base - model|, 0, 1) (mergekit requires it)"}},
               true, 1, 1, "take the model where it is near the base"});
  v.push_back({"sce", merge_sce,
               {gfloat("select_topk", 1.0, 0, "fraction of highest-variance positions kept (>= 1 keeps all)"), int8_mask()},
               true, 1, 1u << 20, "select by variance, weight by mean square, erase by sign (FuseChat, Wan et al. 2024)"});
  v.push_back({"arcee_fusion", merge_arcee_fusion, {}, true, 1, 1, "keep the task vector where its KL-weighted importance is an outlier"});
  v.push_back({"ram", merge_ram, {gfloat("epsilon", 1e-5, 0, "|tau| <= epsilon counts as unchanged")}, true, 1, 1u << 20,
               "unique entries kept, shared ones averaged (Reinforced Agent Merging)"});
  v.push_back({"ramplus_tl", merge_ramplus_tl,
               {{"r", T::kFloat, S::kGlobal, 0.1, -kInf, kInf, false, false, {}, "rescaling strength of unique entries"},
                {"alpha", T::kFloat, S::kGlobal, 0.2, -kInf, kInf, false, false, {}, "bound of the shared / unique ratio"},
                gfloat("epsilon", 1e-5, 0, "|tau| <= epsilon counts as unchanged")},
               true, 1, 1u << 20, "RAM with unique entries rescaled by the per-tensor overlap ratio"});
  for (auto& m : v)
    m.elementwise = m.name == "linear" || m.name == "task_arithmetic" || m.name == "dare_linear" || m.name == "consensus" ||
                    m.name == "nearswap" || m.name == "ram" || m.name == "passthrough";
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
    else if (name == "scale") model->scale = static_cast<float>(value);
  }
  if (global) {
    if (name == "lambda") global->lambda = static_cast<float>(value);
    else if (name == "normalize") global->normalize = value != 0;
    else if (name == "rescale") global->rescale = value == 0 ? MergeRescale::kNone : value == 1 ? MergeRescale::kL1Norm : MergeRescale::kInverseDensity;
    else if (name == "disjoint") global->divisor = value == 0 ? MergeDivisor::kAbsWeights : MergeDivisor::kNone;
    else if (name == "sign_tie") global->sign_tie_majority = value != 0;
    else if (name == "count_rounding") global->round_count = value != 0;
    else if (name == "trim") global->trim_model = value != 0;
    else if (name == "rank_dim") global->rank_dim = static_cast<int>(value);
    else if (name == "filter_wise") global->filter_wise = value != 0;
    else if (name == "t") global->t = static_cast<float>(value);
    else if (name == "k") global->k = static_cast<int>(value);
    else if (name == "nuslerp_row_wise") global->nuslerp_row_wise = value != 0;
    else if (name == "nuslerp_flatten") global->nuslerp_flatten = value != 0;
    else if (name == "normalize_weights") global->normalize_weights = value != 0;
    else if (name == "eps") global->eps = static_cast<float>(value);
    else if (name == "max_iter") global->max_iter = static_cast<int>(value);
    else if (name == "tol") global->tol = static_cast<float>(value);
    else if (name == "select_topk") global->select_topk = static_cast<float>(value);
    else if (name == "epsilon") global->epsilon = static_cast<float>(value);  // ram (della's is per model)
    else if (name == "r") global->r = static_cast<float>(value);
    else if (name == "alpha") global->alpha = static_cast<float>(value);
  }
}

}  // namespace merge_detail

}  // namespace taskvec
