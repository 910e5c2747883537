// taskvec: LoRA extraction. The task vector tau = theta_ft - theta_pre of each weight matrix is
// factored by a truncated SVD, tau ~= B A with B = U diag(sigma) (out x r) and A = V^T (r x in), and
// written as a PEFT LoRA adapter folder (adapter_model.safetensors + adapter_config.json) with
// lora_alpha = r, so PEFT's scale alpha / r is 1 and the merged model is theta_pre + B A.
// The same job as mergekit-extract-lora; docs/CLI.md ("extract-lora") says what goes where.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"
#include "taskvec/engine.hpp"

namespace taskvec {

/// How extract_lora factors each matrix.
enum class LoraSvdMethod {
  kAuto,        ///< exact for min(m, n) <= 512 (or rank + 10 >= min(m, n) / 2), randomized above
  kExact,       ///< LAPACK dgesdd of the whole matrix (slow for big ones: O(m n min(m, n)))
  kRandomized,  ///< Halko-Martinsson-Tropp, oversampling 10, 2 power iterations, fixed seed
};

struct LoraOptions {
  int rank = 0;                 ///< R >= 1: each matrix gets rank min(R, rows, cols) (lower with sv_epsilon)
  /// In [0, 1): singular values below sv_epsilon * sigma_max of the same matrix are dropped, so the
  /// matrix's rank can be below R (recorded in adapter_config.json's rank_pattern). 0: keep R.
  /// Relative to sigma_max (mergekit's --sv-epsilon is an absolute threshold).
  double sv_epsilon = 0;
  /// ECMAScript regexes searched in tensor names: a tensor takes part when it matches one of `include`
  /// (all do when empty) and none of `exclude`. Tensors not taking part are neither compared nor written.
  std::vector<std::string> include, exclude;
  /// Dtype of every written tensor: F32, BF16 or F16. Default: the fine-tuned tensor's dtype when it is
  /// one of those, else F32. Factors are computed in f64 and rounded once.
  std::optional<DType> out_dtype;
  /// Input embeddings (module leaf embed_tokens, wte, wpe, word_embeddings, embed_in, ...; see
  /// docs/CLI.md) as LoRA too (lora_embedding_A / lora_embedding_B), and the output head (lm_head,
  /// embed_out) as an ordinary LoRA module. false (the default, as mergekit): both are saved whole, as
  /// modules_to_save.
  bool embed_lora = false;
  LoraSvdMethod svd = LoraSvdMethod::kAuto;
  std::string task_type;        ///< adapter_config.json task_type, e.g. CAUSAL_LM; empty = null
  std::string base_model_name;  ///< base_model_name_or_path; empty = the base checkpoint's path as given
  unsigned threads = 0;         ///< tensors factored at once; 0 = hardware concurrency
  bool force = false;           ///< replace an existing adapter in the output folder
  std::function<void(const Progress&)> on_progress;  ///< optional; bytes are input bytes of the matrices
};

/// What happened to one tensor of the checkpoints.
struct LoraTensorReport {
  std::string tensor;                  ///< the checkpoints' tensor name
  std::string module;                  ///< its module path (the name without its last component)
  /// "lora" (lora_A / lora_B), "lora_embedding" (lora_embedding_A / _B), "lora_bias" (lora_B.bias = tau
  /// of a LoRA module's bias), "modules_to_save" (the fine-tuned tensor saved whole).
  std::string kind;
  std::vector<std::uint64_t> shape;
  int rank = 0;                        ///< rank kept ("lora", "lora_embedding"; else 0)
  double tau_norm = 0;                 ///< ||tau||_F
  /// ||tau - B A||_F / ||tau||_F of the SVD truncation (factors before rounding to the output dtype):
  /// exact: sqrt(sum of dropped sigma^2) / ||tau||; randomized: sqrt(max(0, ||tau||^2 - sum kept sigma^2))
  /// / ||tau|| (the dropped values are not computed; exact when the kept triplets are exact, an
  /// overestimate otherwise, and limited by cancellation to ~1e-8 relative). 0 for other kinds.
  double relative_error = 0;
  double energy_kept = 1;              ///< sum kept sigma^2 / ||tau||^2 (1 for other kinds)
  bool randomized = false;             ///< the randomized SVD ran
  double seconds = 0;                  ///< read + SVD + encode
};

struct LoraReport {
  std::filesystem::path output;                ///< the adapter folder
  int r = 0;                                   ///< adapter_config.json r (= lora_alpha): the largest kept rank
  std::vector<LoraTensorReport> tensors;       ///< the tensors written, by tensor name
  std::vector<std::string> skipped_identical;  ///< tensors equal in both checkpoints: left out
  std::vector<std::string> target_modules;     ///< full module paths with LoRA factors, sorted
  std::vector<std::string> modules_to_save;    ///< full module paths saved whole, sorted
  std::string adapter_config;                  ///< the adapter_config.json text written
  std::uint64_t bytes_written = 0;             ///< adapter_model.safetensors bytes of tensor data
  double seconds = 0;
  std::vector<std::string> warnings;
};

/// Writes the PEFT LoRA adapter of `finetuned` relative to `base` into the folder `output`:
/// adapter_model.safetensors (keys base_model.model.<module>.lora_A.weight [r, in] and .lora_B.weight
/// [out, r]; lora_embedding_A [r, rows] / lora_embedding_B [cols, r] for embeddings; lora_B.bias;
/// base_model.model.<tensor> for modules_to_save) and adapter_config.json (LoraConfig's fields).
/// Every selected tensor of both checkpoints is checked (names, shapes, float vs non-float dtypes) and
/// quantized storage refused before any SVD, and the output folder is checked (not inside an input
/// folder, nothing to replace without force) before any SVD as well; the files appear atomically at the
/// end (CheckpointWriter). The factors wait in an unnamed scratch file beside the output folder until
/// every rank is known (memory: per worker one matrix in f64 and its factors). Throws
/// Error{kInvalidArgument} (rank < 1, sv_epsilon outside [0, 1), a dtype other than F32/BF16/F16, an
/// output path ending in .safetensors, a bad regex, nothing that differs), kTensorMissing /
/// kShapeMismatch / kDtypeMismatch naming the file and tensor, kQuantized, kNonFinite (NaN/Inf in a
/// task vector, naming the file and tensor), kOverflow (a value beyond F16's range), kOutputExists,
/// kUnsupported (LAPACKE missing; a module with a LoRA weight and another changed tensor besides its
/// bias), kIo, kDiskFull.
LoraReport extract_lora(const Checkpoint& base, const Checkpoint& finetuned, const std::filesystem::path& output,
                        const LoraOptions& options);

/// One input of combine_adapters: a PEFT LoRA adapter (Checkpoint::open of an adapter folder) and its
/// coefficient lambda.
struct AdapterTerm {
  const Checkpoint* adapter = nullptr;
  double lambda = 1;
};

struct CombineAdaptersOptions {
  /// 0: exact, every module's factors concatenated (rank = sum of the inputs' ranks of that module).
  /// R >= 1: each module's combined dW re-factored by a truncated SVD to rank min(R, sum r_i, rows, cols).
  int rank = 0;
  /// Dtype of the written factors and bias: F32 (default), BF16 or F16. Values computed in f64, rounded
  /// once. modules_to_save tensors are copied with their own dtype.
  std::optional<DType> out_dtype;
  LoraSvdMethod svd = LoraSvdMethod::kAuto;  ///< with rank >= 1 (as extract_lora)
  std::string base_model_name;  ///< base_model_name_or_path; empty = the first input's, if any
  bool force = false;           ///< replace an existing adapter in the output folder
};

/// What happened to one module (or bias / saved tensor) of the combination.
struct CombinedModuleReport {
  std::string tensor;                 ///< the base tensor it changes, e.g. "model.layers.0.q_proj.weight"
  std::string module;                 ///< its module path
  std::string kind;                   ///< "lora", "lora_embedding", "lora_bias", "modules_to_save"
  std::vector<std::uint64_t> shape;   ///< of dW (base-weight orientation), or of the bias / saved tensor
  std::vector<std::size_t> inputs;    ///< indices of the terms that have it
  int input_rank = 0;                 ///< sum of those inputs' ranks ("lora", "lora_embedding")
  int rank = 0;                       ///< rank written
  /// With rank >= 1: ||dW||_F of the combination and ||dW - B A||_F / ||dW||_F of the truncation
  /// (computed as extract_lora's LoraTensorReport::relative_error); 0 for the exact concatenation.
  double delta_norm = 0;
  double relative_error = 0;
  bool randomized = false;
};

struct CombineAdaptersReport {
  std::filesystem::path output;
  int r = 0;                                  ///< adapter_config.json r (= lora_alpha): the largest rank
  std::vector<CombinedModuleReport> modules;  ///< by tensor name
  std::vector<std::string> target_modules, modules_to_save;
  std::string adapter_config;                 ///< the adapter_config.json text written
  std::uint64_t bytes_written = 0;
  double seconds = 0;
};

/// Writes sum_i lambda_i * adapter_i as one PEFT LoRA adapter folder `output` (adapter_model.safetensors
/// + adapter_config.json). For a module of dW_i = s_i B_i A_i (B_i [out, r_i], A_i [r_i, in]; embedding
/// and fan_in_fan_out modules the same in factor orientation, dW = (B A)^T):
///   sum_i lambda_i s_i B_i A_i = [lambda_1 s_1 B_1 | ... | lambda_k s_k B_k] [A_1; ...; A_k]
/// exactly, so without options.rank the output has B = the concatenated scaled B's [out, sum r_i] and
/// A = the stacked A's [sum r_i, in], over the inputs that have the module; lora_alpha = r per module
/// (scale 1). With options.rank the combined dW (materialized in f64, rows x cols doubles per module)
/// is factored by detail::truncated_svd: B = U diag(sigma), A = V^T. lora_B.bias deltas combine as
/// sum_i lambda_i s_i bias_i. A modules_to_save tensor is copied only when exactly one input has it and
/// its lambda is 1 (a combination of full tensors needs the base); else Error{kInvalidArgument} naming
/// the module. Every check runs before any output exists: Error{kInvalidArgument} (no terms, a term that
/// is not an adapter, rank < 0, a dtype other than F32/BF16/F16, a non-finite lambda), kShapeMismatch
/// (a module whose shape or kind differs between two inputs, naming both files and the module),
/// kUnsupported (fan_in_fan_out disagreeing on a module or across the output; a module with a saved
/// base_layer copy; dimensions beyond LAPACK's int), kOutputExists (output inside an input folder, or
/// existing without force), kOverflow (a value beyond F16), and what reading the inputs and writing throws.
CombineAdaptersReport combine_adapters(const std::vector<AdapterTerm>& terms, const std::filesystem::path& output,
                                       const CombineAdaptersOptions& options);

}  // namespace taskvec
