// taskvec: merge methods beyond task arithmetic (TIES, DARE, Breadcrumbs, DELLA, Model Stock, SLERP,
// magnitude pruning, TALL/Consensus, TSV-Merge, Iso-C), their registry, YAML recipes and the driver.
//
// Every method is a pure function on f32 spans for ONE tensor: base + N fine-tuned models -> one
// output span. No I/O, no global state, no dependence on thread count. Randomness (DARE, DELLA) comes
// from a counter-based generator keyed by (seed, tensor name, model index) and the element index.
// docs/METHODS.md has the formulas, the defaults and what taskvec does and why.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "taskvec/dtype.hpp"
#include "taskvec/engine.hpp"

namespace taskvec {

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

/// Per-model parameters of a merge, resolved for one tensor. Unused ones are ignored by a method.
/// Defaults are mergekit's (docs/MERGEKIT.md); the registry holds each method's own.
struct MergeModelParams {
  float weight = 1.0f;       ///< scale of this model's task vector (or of the model, for linear)
  float density = 1.0f;      ///< fraction kept, > 0; >= 1 keeps everything (as mergekit)
  float gamma = 0.01f;       ///< breadcrumbs: fraction of largest magnitudes removed, [0, 1)
  float epsilon = 0.15f;     ///< della: keep probabilities span [density - eps, density + eps]
  float tall_lambda = 0.4f;  ///< consensus: TALL mask threshold lambda_t, >= 0
  float scale = 1.0f;        ///< passthrough: the tensor is multiplied by it (mergekit's `scale`, none = 1)
};

/// How survivors of a random or magnitude drop are scaled back.
enum class MergeRescale {
  kNone,            ///< kept entries unchanged
  kL1Norm,          ///< mergekit's `rescale: true`: one factor per tensor, |tau|_1 / |kept tau|_1 (none when either < 1e-7)
  kInverseDensity,  ///< taskvec's `rescale: inverse_density`: each survivor / its keep probability (DARE, DELLA papers; PEFT)
};

/// The divisor of the TIES-family disjoint merge, per element, over the entries that agree with the elected sign.
enum class MergeDivisor {
  kNone,           ///< sum of the agreeing weighted deltas (mergekit `normalize: false`)
  kSignedWeights,  ///< / sum of their weights w_i, 1 when that is 0 (mergekit `normalize: true`)
  kAbsWeights,     ///< / sum of |w_i| (taskvec `disjoint: mean`; the TIES paper's mean for w_i = 1)
};

/// Global parameters of a merge, resolved for one tensor.
struct MergeGlobalParams {
  float lambda = 1.0f;         ///< scale of the merged task vector (alpha in TSV / Iso-C)
  bool normalize = false;      ///< divide the weighted sum by the sum of weights (linear, *_linear, ...)
  MergeRescale rescale = MergeRescale::kNone;       ///< DARE / DELLA / magnitude drops
  MergeDivisor divisor = MergeDivisor::kSignedWeights;  ///< TIES-family disjoint merge
  bool sign_tie_majority = false;  ///< TIES election of a zero sum: false = + (mergekit), true = the tensor's majority sign
  bool round_count = false;    ///< top-k counts: false = floor(density * n) (mergekit), true = round (taskvec's rule before mergekit's, count_rounding: round)
  bool trim_model = false;     ///< ties: trim against a whole-model threshold (MergeTensor::trim_thresholds)
  int rank_dim = 1;            ///< della: the dimension magnitudes are ranked along (mergekit: 1; -1 = the last)
  bool filter_wise = false;    ///< model_stock: one interpolation ratio per row (last dimension) instead of per tensor
  float t = 0.5f;              ///< slerp interpolation factor (0 = base / first model; outside [0, 1] extrapolates)
  int k = 2;                   ///< consensus: minimum number of agreeing TALL masks
  std::uint64_t seed = 0;      ///< DARE / DELLA random masks
  // mergekit's newer methods (src/engine/merge_mergekit_methods.cpp); names as in mergekit.
  bool nuslerp_row_wise = false;   ///< nuslerp: vectors along dimension 0 instead of the last (with nuslerp_flatten false)
  bool nuslerp_flatten = true;     ///< nuslerp: one vector per tensor
  bool normalize_weights = true;   ///< multislerp: weights / their sum
  float eps = 1e-8f;               ///< multislerp: stability constant of the projections
  int max_iter = 10;               ///< karcher: iterations of the Riemannian mean
  float tol = 1e-5f;               ///< karcher: convergence (and zero-norm) tolerance
  float select_topk = 1.0f;        ///< sce: fraction of highest-variance positions kept (>= 1 keeps all)
  float epsilon = 1e-5f;           ///< ram / ramplus_tl: |tau| <= epsilon counts as unchanged (global, unlike della's)
  float r = 0.1f;                  ///< ramplus_tl: rescaling strength of unique entries
  float alpha = 0.2f;              ///< ramplus_tl: bound of the shared / unique ratio rho
};

/// One tensor to merge. All spans have `element_count()` elements and outlive the call.
struct MergeTensor {
  std::string_view name;                             ///< tensor name (seeds the random masks)
  std::span<const std::uint64_t> shape;              ///< row-major; empty = scalar
  std::span<const float> base;                       ///< pretrained weights; empty for linear / slerp
  std::span<const std::span<const float>> models;    ///< fine-tuned weights, one span per model
  std::span<const MergeModelParams> model_params;    ///< one per model
  MergeGlobalParams global;
  /// ties with global.trim_model: per model, keep entries with |tau| >= threshold (see
  /// MagnitudeThreshold). Empty otherwise.
  std::span<const float> trim_thresholds;
  /// Element-wise methods (MergeMethod::elementwise) may be called on a chunk of a tensor: shape is then
  /// {chunk length} and first_index the chunk's first element in the whole tensor (seeds DARE's masks).
  std::uint64_t first_index = 0;
  /// Chunked DARE with MergeRescale::kL1Norm: one factor per model for the whole tensor
  /// (dare_l1_sums over every chunk). Empty: the kernel computes it from the span it is given.
  std::span<const float> rescale_factors;
  /// Where a kernel records what a user should know about this tensor (e.g. model_stock clamping an
  /// angle mergekit would extrapolate from). May be null.
  std::vector<std::string>* notes = nullptr;
  std::size_t element_count() const noexcept;
};

/// A kernel writes the merged tensor into `out` (element_count() floats). Throws Error{kInvalidArgument}
/// for inconsistent inputs (span sizes, model count outside the method's range, missing base).
using MergeKernel = void (*)(const MergeTensor& in, std::span<float> out);

/// sum_i w_i theta_i (/ sum_i w_i with normalize). Model soup / weighted average.
void merge_linear(const MergeTensor& in, std::span<float> out);
/// base + lambda * sum_i w_i tau_i (/ sum w with normalize). Ilharco et al. 2023.
void merge_task_arithmetic(const MergeTensor& in, std::span<float> out);
/// TIES (Yadav et al. 2023), as mergekit's `ties`: trim each tau_i to its top floor(density*N)
/// magnitudes (round with global.round_count; ties broken by lower index; density >= 1 keeps all), elect
/// the sign of sum_i w_i tau_i (a zero sum elects +, or the tensor's majority sign with sign_tie_majority),
/// merge the agreeing w_i tau_i with global.divisor; base + lambda * result.
void merge_ties(const MergeTensor& in, std::span<float> out);
/// DARE (Yu et al. 2024): keep each entry with probability density (counter-based RNG), rescale the
/// survivors (global.rescale: mergekit's L1 norm match, or 1/density per entry); then task arithmetic.
void merge_dare_linear(const MergeTensor& in, std::span<float> out);
/// DARE masks, then TIES sign election and disjoint merge (no trim).
void merge_dare_ties(const MergeTensor& in, std::span<float> out);
/// Model Breadcrumbs (Davari & Belilovsky 2024), as mergekit's magnitude_outliers: with n_keep =
/// floor(density*N) and n_top = floor(gamma*N) (reduced so that n_keep fit), drop the n_top largest
/// magnitudes and keep the next n_keep; density >= 1 keeps all. Where n_top is 0 mergekit keeps nothing;
/// taskvec keeps the n_keep largest and notes it. Then task arithmetic.
void merge_breadcrumbs(const MergeTensor& in, std::span<float> out);
/// Breadcrumbs masks, then TIES sign election and disjoint merge.
void merge_breadcrumbs_ties(const MergeTensor& in, std::span<float> out);
/// DELLA (Deep et al. 2024), as mergekit's della_magprune: along dimension global.rank_dim (1-D tensors as
/// one row) the keep probability rises linearly with magnitude rank over [density - eps, density + eps];
/// survivors rescaled (global.rescale); TIES election + disjoint merge. density >= 1 keeps all.
void merge_della(const MergeTensor& in, std::span<float> out);
/// DELLA masks, then task arithmetic (mergekit's della_linear).
void merge_della_linear(const MergeTensor& in, std::span<float> out);
/// Model Stock (Jang et al. 2024): t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the
/// task vectors (per tensor, or per row with filter_wise), clamped to [0, 1] (mergekit extrapolates: a
/// note says so); out = t * mean(theta_i) + (1 - t) * base.
void merge_model_stock(const MergeTensor& in, std::span<float> out);
/// SLERP between models[0] (t = 0) and models[1] (t = 1) on the flattened tensor; linear
/// interpolation when the directions are near-parallel (|cos| > 0.9995) or a norm is zero. The recipe
/// puts the base model first, as mergekit does.
void merge_slerp(const MergeTensor& in, std::span<float> out);
/// mergekit's passthrough: the one model's tensor times its `scale` (1: unchanged bytes after the f32
/// round trip). With `slices:` it stacks layers (frankenmerges).
void merge_passthrough(const MergeTensor& in, std::span<float> out);
/// Magnitude pruning: keep the top floor(density*N) magnitudes of each tau_i (rescaled as global.rescale says:
/// inverse_density divides by density), then task arithmetic.
void merge_magnitude_prune(const MergeTensor& in, std::span<float> out);
/// Consensus merging (Wang et al. 2024): tau_MTL = sum w_i tau_i; TALL masks
/// m_i = |w_i tau_i| > lambda_i |tau_MTL - w_i tau_i|; keep where sum_i m_i >= k; base + lambda m*tau_MTL.
void merge_consensus(const MergeTensor& in, std::span<float> out);
/// TSV-Merge (Gargiulo et al. 2025), 2-D tensors: rank floor(min(m,n)/N) (>= 1) SVD of each w_i tau_i,
/// concatenated singular vectors orthogonalised by their polar factor, reassembled; base + lambda*Delta.
/// Other tensors: base + lambda * mean_i(w_i tau_i).
void merge_tsv(const MergeTensor& in, std::span<float> out);
/// Iso-C (Marczak et al. 2025), 2-D tensors: Delta = sum w_i tau_i = U S V^T, out = base + lambda *
/// mean(S) U V^T. Other tensors: base + lambda * mean_i(w_i tau_i).
void merge_iso_c(const MergeTensor& in, std::span<float> out);

// ---- mergekit's newer methods, with mergekit's semantics (mergekit/merge_methods/*.py; docs/METHODS.md) ----

/// NuSLERP: t = w1 / (w0 + w1) (0.5 when |w0 + w1| < 1e-6) between models[0] and models[1], or between
/// their task vectors when in.base is given (out = base + slerp). One vector per tensor (nuslerp_flatten),
/// else per row (last dimension) or, with nuslerp_row_wise, along dimension 0. Linear where
/// |sin theta| < 1e-8, and (taskvec) where a vector is zero.
void merge_nuslerp(const MergeTensor& in, std::span<float> out);
/// Multi-SLERP: barycentre of the unit (task) vectors on the hypersphere at the weighted mean direction,
/// scaled by the weighted mean norm (weights / their sum with normalize_weights); base added back when given.
void merge_multislerp(const MergeTensor& in, std::span<float> out);
/// Karcher (Riemannian) mean of the unit models with equal weights (max_iter, tol), scaled by the mean norm.
void merge_karcher(const MergeTensor& in, std::span<float> out);
/// NearSwap: w = clamp(t / max(|base - m|, 1e-6), 0, 1), out = w m + (1 - w) base.
void merge_nearswap(const MergeTensor& in, std::span<float> out);
/// SCE (FuseChat): keep the floor(select_topk * nonzero) highest-variance positions, weight each task vector
/// by its mean square (normalised), TIES sign election, divide by the agreeing weights; base + result.
void merge_sce(const MergeTensor& in, std::span<float> out);
/// Arcee Fusion: importance |m - base| * KL(softmax(m) || softmax(base)) per row; keep the task vector where
/// importance >= median + 1.5 IQR (exact quantiles).
void merge_arcee_fusion(const MergeTensor& in, std::span<float> out);
/// RAM: entries with |tau| > epsilon count; unique ones are kept, shared ones averaged; base + result.
void merge_ram(const MergeTensor& in, std::span<float> out);
/// RAM+ (tensor-local): as RAM, unique entries of model m scaled by 1 + r clamp(shared_m / unique_m, 0, alpha).
void merge_ramplus_tl(const MergeTensor& in, std::span<float> out);

// ---- building blocks, public for tests and for chunked drivers ----

/// Key of the counter-based generator for one (seed, tensor, model): splitmix64 of the seed mixed with
/// FNV-1a of the name and the model index.
std::uint64_t merge_rng_key(std::uint64_t seed, std::string_view tensor_name, std::size_t model_index) noexcept;
/// A uniform double in [0, 1) for element `index` of the stream `key` (splitmix64 at position index).
double merge_rng_uniform(std::uint64_t key, std::uint64_t index) noexcept;
/// DARE on a chunk: tau[j] (element first_index + j of its tensor) is kept iff
/// merge_rng_uniform(key, first_index + j) < density, scaled by 1/density when rescale; else 0.
/// The result does not depend on how a tensor is split into chunks.
void dare_drop(std::span<float> tau, std::uint64_t key, std::uint64_t first_index, float density, bool rescale) noexcept;
/// Number of entries kept for a fraction of n: floor(fraction * n) as mergekit's int(), or
/// floor(fraction * n + 0.5) with `round`; clamped to [0, n] (fraction >= 1 keeps n).
std::uint64_t merge_keep_count(double fraction, std::uint64_t n, bool round = false) noexcept;

/// Breadcrumbs band for n elements (ranks from the largest magnitude): [top, top + keep). mergekit's
/// magnitude_outliers counts; `mergekit_drops_all` is set where mergekit would keep nothing (n_top = 0 with
/// density < 1), and taskvec keeps [0, keep) instead.
struct BreadcrumbsBand {
  std::uint64_t top = 0, keep = 0;
  bool mergekit_drops_all = false;
};
BreadcrumbsBand merge_breadcrumbs_band(const MergeModelParams& model, bool round, std::uint64_t n) noexcept;

/// L1 sums for MergeRescale::kL1Norm of the random-drop methods (dare_*): per model m, adds sum |tau_m| to
/// before[m] and sum over kept entries of |tau_m| to after[m], for the chunk `in` (first_index honoured).
/// The factor for the whole tensor is before / after (1 when either is < 1e-7), as mergekit's
/// rescaled_masked_tensor.
void dare_l1_sums(const MergeTensor& in, std::span<double> before, std::span<double> after);

/// For the magnitude top-k methods (ties without `trim: model`, breadcrumbs, breadcrumbs_ties,
/// magnitude_prune): how many of the n elements of one model's task vector survive the trim with
/// these parameters (floor(density * n), or round with count_rounding; breadcrumbs: its band). -1 for every other
/// method (random drops, no trim): the count is not fixed there. Pure; throws nothing.
std::int64_t merge_topk_kept(std::string_view method, const MergeModelParams& model, const MergeGlobalParams& global,
                             std::uint64_t n) noexcept;

/// Exact k-th largest magnitude across many tensors in bounded memory (the "whole model" trim of the
/// official TIES code): a two-pass radix select on the f32 bit patterns. Feed every span with add()
/// in pass 1, call next_pass(), feed the same values again, then threshold(). Order does not matter.
class MagnitudeThreshold {
 public:
  /// Keep fraction `density` of all values seen (k = merge_keep_count(density, total): floor, as the official code's int()).
  explicit MagnitudeThreshold(double density);
  void add(std::span<const float> values);
  /// Ends a pass. Returns true when another pass over the same values is needed.
  bool next_pass();
  /// The k-th largest |value|: keeping |v| >= threshold keeps at least k values (all ties at the
  /// threshold, as the official code). +Inf when k == 0 (nothing kept).
  float threshold() const;

 private:
  double density_;
  int pass_ = 0;
  std::uint64_t total_ = 0, k_ = 0, above_ = 0;
  std::uint32_t high_ = 0;
  std::vector<std::uint64_t> hist_;
  float threshold_ = 0;
  bool done_ = false;
};

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

enum class MergeParamType { kFloat, kInt, kBool, kChoice };
enum class MergeParamScope { kModel, kGlobal };

/// One parameter a method accepts. Values are carried as double (bool: 0/1; choice: index).
struct MergeParamSpec {
  std::string_view name;
  MergeParamType type = MergeParamType::kFloat;
  MergeParamScope scope = MergeParamScope::kGlobal;
  double default_value = 0;
  double min = -1e30, max = 1e30;  ///< valid range (float/int)
  bool min_open = false, max_open = false;
  std::vector<std::string_view> choices;  ///< kChoice spellings
  std::string_view help;
};

/// A method: its kernel and what it accepts.
struct MergeMethod {
  std::string_view name;
  MergeKernel kernel = nullptr;
  std::vector<MergeParamSpec> params;
  bool needs_base = true;          ///< else base_model is optional (linear, slerp)
  std::size_t min_models = 1, max_models = 1u << 20;
  std::string_view summary;
  bool elementwise = false;        ///< output element i depends only on input element i: may run chunked
  const MergeParamSpec* find_param(std::string_view name) const noexcept;
};

/// Every method, in documentation order.
const std::vector<MergeMethod>& merge_methods();
/// The method named `name`, or nullptr.
const MergeMethod* find_merge_method(std::string_view name) noexcept;

// ---------------------------------------------------------------------------------------------
// Recipes
// ---------------------------------------------------------------------------------------------

/// A recipe parameter value: a scalar, a list interpolated linearly over the layer index (mergekit's
/// gradient: layer i of L takes position i / (L - 1); a model of one layer takes the last value, a tensor
/// outside the layers the first), or a list of {filter: TEXT, value: V} entries. The first entry that
/// matches wins: `filter` matches when TEXT is a substring of the tensor name, as mergekit (`"*"` and a
/// missing filter match every tensor); taskvec's `filter_regex: REGEX` matches by std::regex_search.
struct RecipeValue {
  enum class Kind { kScalar, kLayers, kFilters };
  struct FilterEntry {
    std::optional<std::string> pattern;  ///< substring (or regex when is_regex); none = every tensor
    bool is_regex = false;
    std::regex regex;
    std::vector<double> values;  ///< one value = scalar; more = layer list
    bool matches(const std::string& tensor_name) const;
  };
  Kind kind = Kind::kScalar;
  std::vector<double> values;          ///< kScalar (1) / kLayers (>= 1)
  std::vector<FilterEntry> filters;    ///< kFilters
  /// The value for a tensor. `layer` < 0 = no layer index (first value of a list).
  double resolve(const std::string& tensor_name, int layer, int num_layers) const;
};

struct RecipeModel {
  std::filesystem::path path;                   ///< as written (mergekit resolves it against the working directory)
  /// A PEFT LoRA adapter applied to `path` (mergekit's `model: BASE+ADAPTER`, or an `adapter:` key): the
  /// model merged is PATH + dW (Checkpoint::adapter_over, AdapterUse::kModel).
  std::optional<std::filesystem::path> adapter;
  std::map<std::string, RecipeValue> params;    ///< model-scope parameters given for this model
};

/// One source of a mergekit slice: layers [begin, end) of models[model] (an index into Recipe::models).
struct RecipeSliceSource {
  std::size_t model = 0;
  int begin = 0, end = 0;
  std::map<std::string, RecipeValue> params;  ///< model-scope parameters of this source
};

/// One output slice (mergekit's `slices:`): its sources all span the same number of layers; output layer
/// i of the slice merges layer begin + i of every source. The output's layers are renumbered from 0
/// across the slices; tensors outside the layers (embeddings) come from the first slice's sources, the
/// others (final norm, head) from the last slice's.
struct RecipeSlice {
  std::vector<RecipeSliceSource> sources;
  std::map<std::string, RecipeValue> params;     ///< slice `parameters:` (before the global ones)
  std::optional<std::size_t> base;               ///< index into Recipe::models of the slice's base, if any
  int layers() const noexcept { return sources.empty() ? 0 : sources.front().end - sources.front().begin; }
};

/// A model a recipe names outside `models:` (a tokenizer source): PATH or PATH+ADAPTER, as written.
struct RecipeModelRef {
  std::filesystem::path path;
  std::optional<std::filesystem::path> adapter;
};

/// Where one token's embedding row comes from (mergekit's `tokenizer.tokens.TOKEN`). The row is used for
/// every model that lacks the token, and with `force` for every model.
struct RecipeTokenEmbedding {
  enum class Kind {
    kDefault,     ///< no `source`: mergekit's rule (the base's row, else the one model that has it, else the mean)
    kModel,       ///< `source: MODEL`: that model's row of this token (it must have the token)
    kZero,        ///< `source: {kind: zero}`: a row of zeros
    kModelToken,  ///< `source: {kind: model_token, model, token | token_id}`: a row of another token of MODEL
  };
  Kind kind = Kind::kDefault;
  RecipeModelRef model;                  ///< kModel, kModelToken
  std::optional<std::string> token;      ///< kModelToken: by token text in MODEL's own vocabulary
  std::optional<std::int64_t> token_id;  ///< kModelToken: by row index in MODEL's embedding
  bool force = false;
};

/// mergekit's tokenizer merge (`tokenizer_source: X` or `tokenizer: {source: X, tokens, pad_to_multiple_of}`):
/// the output vocabulary is X's (`base`: the base_model's, or the first model's, without the tokens whose
/// id is >= its config's vocab_size; `union`: that one plus every other token of every input, appended;
/// a model: that model's tokenizer), plus the `tokens` it lacks. Each input's embedding and lm_head rows
/// are then taken by token, and the method merges those (docs/MERGEKIT.md, "Tokenizers").
struct RecipeTokenizer {
  enum class Source { kBase, kUnion, kModel };
  Source source = Source::kUnion;  ///< mergekit's default for `tokenizer:` without `source`
  RecipeModelRef model;            ///< kModel
  std::vector<std::pair<std::string, RecipeTokenEmbedding>> tokens;  ///< in file order
  std::uint64_t pad_to_multiple_of = 0;  ///< 0 = none; else rows rounded up, the new rows the mean row
};

/// The parameter values a recipe gives one tensor, by name (what `taskvec merge --explain` prints).
struct ResolvedValues {
  std::vector<std::pair<std::string, double>> global;               ///< the method's global parameters
  std::vector<std::vector<std::pair<std::string, double>>> models;  ///< per kernel model, its model-scope ones
};

/// A parsed, validated merge recipe, with mergekit's meaning (docs/MERGEKIT.md): a `models:` entry that is
/// the base_model is used only as the base (removed from `models`); slerp's t = 0 end is the base.
struct Recipe {
  std::filesystem::path file;                   ///< the recipe file ("<string>" when parsed from text)
  const MergeMethod* method = nullptr;
  std::optional<std::filesystem::path> base_model;
  std::optional<std::filesystem::path> base_model_adapter;  ///< base_model: BASE+ADAPTER
  std::vector<RecipeModel> models;
  std::map<std::string, RecipeValue> params;    ///< global `parameters:` (also defaults of model-scope ones)
  std::optional<DType> dtype;                   ///< compute dtype as written (taskvec computes in f32)
  std::optional<DType> out_dtype;
  std::uint64_t seed = 0;
  std::string source_text;                      ///< the YAML as read (saved as mergekit_config.yml beside a folder output)
  std::optional<std::string> name;              ///< a stage's `name` (mergekit-multi); other stages refer to it as a model
  /// Set by merge_stages: the output folder of an earlier stage that a path now names -> that stage's
  /// name, so that the model card lists "stage NAME", not a temporary folder.
  std::map<std::string, std::string> stage_inputs;
  /// mergekit's `slices:` form. Then `models` lists each distinct source model once (no parameters) and
  /// the base_model, when it is a source, too.
  std::vector<RecipeSlice> slices;
  /// `tokenizer_source:` / `tokenizer:` (mergekit's tokenizer merge); nullopt = the vocabularies must agree.
  std::optional<RecipeTokenizer> tokenizer;
  /// `chat_template:` as written: "auto" (the inputs' most common template), a built-in name (alpaca,
  /// chatml, exaone, llama3, mistral) or a Jinja template text; nullopt keeps the copied one.
  std::optional<std::string> chat_template;
  /// What the recipe does that a user should know: parameters without effect, where mergekit would fail
  /// or differ. Printed as warnings by `taskvec merge`.
  std::vector<std::string> warnings;

  /// Parameters for one tensor, checked (cross-parameter ranges; linear's normalize with zero weight sum).
  /// Throws Error{kRecipe} naming the tensor, the key and the recipe file.
  void resolve(const std::string& tensor_name, int num_layers, std::vector<MergeModelParams>& model_params,
               MergeGlobalParams& global, ResolvedValues* values = nullptr) const;
  /// The same for explicit parameter sources (slices): one model-scope map per kernel model, then
  /// `scope` (a slice's parameters, may be null) before the global ones; `layer` of `num_layers` places
  /// gradients (layer < 0: no layer, the first value).
  void resolve_at(const std::string& tensor_name, int layer, int num_layers,
                  const std::vector<const std::map<std::string, RecipeValue>*>& model_maps,
                  const std::map<std::string, RecipeValue>* scope, std::vector<MergeModelParams>& model_params,
                  MergeGlobalParams& global, ResolvedValues* values = nullptr) const;
};

/// Parses YAML text. `file` names the recipe in messages. Relative model paths are kept as written: they
/// resolve against the working directory, as in mergekit.
/// Throws Error{kRecipe} with the key, the file and the line.
Recipe parse_recipe(const std::string& yaml_text, const std::filesystem::path& file = "<string>");
/// Reads and parses a recipe file (Error{kIo} when unreadable). A file of several YAML documents is
/// Error{kRecipe}: read it with load_recipe_stages.
Recipe load_recipe(const std::filesystem::path& file);

/// A multi-stage recipe (mergekit-multi): the YAML documents of the text (separated by '---'), one
/// Recipe each, in file order; a single document gives one stage. Stage names are unique and at most one
/// stage has none (the final merge). Throws Error{kRecipe} as parse_recipe, per document.
std::vector<Recipe> parse_recipe_stages(const std::string& yaml_text, const std::filesystem::path& file = "<string>");
/// Reads and parses a multi-stage recipe file (Error{kIo} when unreadable).
std::vector<Recipe> load_recipe_stages(const std::filesystem::path& file);

/// Runs the stages of a multi-stage recipe in dependency order: a model path (base_model, models, slice
/// sources) equal to another stage's name is that stage's output. Intermediate outputs are folders
/// `intermediate_dir`/NAME (kept; one that exists already is reused unless `rerun`), or, with an empty
/// `intermediate_dir`, folders in a temporary folder beside `output` that is removed at the end (and the
/// folders left there by runs that were killed, whose process is gone, are removed first). The
/// final stage (the unnamed one, else the one no stage refers to) is written to `output`. Throws
/// Error{kRecipe} for a reference cycle or no single final stage, and what merge_checkpoints throws. The
/// report is the final stage's; every stage's warnings are in it, prefixed "stage 'NAME': ".
EditReport merge_stages(const std::vector<Recipe>& stages, const std::filesystem::path& output, const EditOptions& options,
                        const std::filesystem::path& intermediate_dir = {}, bool rerun = false);

/// The layer index of a tensor name: the number after "layers.", "layer.", "h.", "blocks.", "block."
/// (as a whole dotted component, first occurrence), e.g. "model.layers.12.mlp.w" -> 12; -1 when none.
int merge_layer_index(std::string_view tensor_name);
/// `tensor_name` with its layer index (as merge_layer_index finds it) replaced by `layer`, e.g.
/// ("model.layers.12.mlp.w", 3) -> "model.layers.3.mlp.w"; the name unchanged when it has none.
std::string merge_with_layer_index(std::string_view tensor_name, int layer);

// ---------------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------------

/// Runs a recipe over checkpoints: opens base and models, checks every model has the base's tensors
/// with equal shapes (kTensorMissing / kShapeMismatch), resolves every tensor's parameters and the
/// memory budget ((models + 2) x elements x 4 bytes per tensor in flight, kTensorTooLarge) before any
/// byte is written, then merges float tensors over options.threads workers at precomputed offsets
/// (output bytes independent of the thread count). Non-float / unselected tensors are copied from the
/// base (or the first model when the method has no base). Out dtype: options.out_dtype, else the
/// recipe's out_dtype, else dtype, else the base tensor's.
EditReport merge_checkpoints(const Recipe& recipe, const std::filesystem::path& output, const EditOptions& options);

}  // namespace taskvec
