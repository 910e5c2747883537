// taskvec: task arithmetic on checkpoints (Ilharco et al., "Editing Models with Task Arithmetic",
// ICLR 2023): task vectors (diff), applying them (addition / negation), linear edit expressions
// (analogies), all as one streaming kernel:
//
//   out[t] = s * base[t] + sum_i a_i * (x_i[t] - base[t]) + sum_j b_j * tau_j[t]      for each tensor t
//
// read chunk by chunk from memory-mapped inputs with f32 accumulation (f64 when the base tensor is F64)
// and written at precomputed offsets, so the output bytes do not depend on the thread count.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"

namespace taskvec {

/// Metadata keys taskvec writes into a task vector's __metadata__.
inline constexpr const char* kMetaKind = "taskvec.kind";                         ///< "task_vector"
inline constexpr const char* kMetaPretrainedFingerprint = "taskvec.pretrained_fingerprint";
inline constexpr const char* kMetaPretrainedName = "taskvec.pretrained";        ///< file name, for messages
inline constexpr const char* kMetaFinetunedName = "taskvec.finetuned";

/// Progress of a running edit, reported from the calling thread, at most ~10 times a second.
struct Progress {
  std::uint64_t tensors_done = 0, tensors_total = 0;
  std::uint64_t bytes_done = 0, bytes_total = 0;  ///< output bytes
  double seconds = 0;                             ///< since the stream started
};

/// Options shared by every edit.
struct EditOptions {
  std::optional<DType> out_dtype;        ///< float tensors' output dtype; default: the base tensor's dtype
  std::string include;                   ///< ECMAScript regex (std::regex_search): edit only matching tensors
  std::string exclude;                   ///< ... and not these; the others are copied from the base unchanged
  /// Linear edits: the tensors include/exclude does not select are left out of the output instead of
  /// copied (the Python package computes one tensor of a lazy expression this way).
  bool only_selected = false;
  unsigned threads = 0;                  ///< worker threads; 0 = std::thread::hardware_concurrency()
  std::uint64_t memory_budget = 512ull << 20;  ///< bytes of decoded chunks and output buffers in flight
  CheckpointWriteOptions write;          ///< shard size, --force
  bool allow_nonfinite = false;          ///< proceed when an input holds NaN/Inf (else Error{kNonFinite})
  /// A finite result beyond the output dtype's range (F16 > 65504, ...): false: Error{kOverflow} naming
  /// the tensor and element; true: saturate it to +-the dtype's largest finite value, and report the
  /// count of clamped elements per tensor in EditReport::warnings. Edits and merges.
  bool clamp_overflow = false;
  bool force_base = false;               ///< apply task vectors made from another pretrained checkpoint
  bool dry_run = false;                  ///< plan only: no file is written
  bool untie_embeddings = false;         ///< see reconcile_tied_embeddings
  /// Inputs whose first dimension differs from the base's (a vocabulary of 32007 rows against 32000):
  /// combine the rows all have, copy extra rows from the first input (in term order) that has them.
  /// Off: such a tensor is Error{kShapeMismatch} naming both shapes. linear_edit and its wrappers only.
  bool merge_extra_rows = false;
  /// merge only: tensors the models have but the reference (base_model, else the first model) lacks,
  /// e.g. a new classification head score.weight. Empty and !drop_extra_tensors: Error{kTensorMissing}
  /// naming the tensor and both flags. Else a model of the recipe, by its index in `models` (from 0) or
  /// its path: each such tensor is copied from it unchanged (Error{kTensorMissing} if it lacks one;
  /// Error{kInvalidArgument} if it names no model). --keep-extra-tensors FROM.
  std::string keep_extra_tensors_from;
  /// merge only: leave such tensors out of the output, with a warning naming each. --drop-extra-tensors.
  bool drop_extra_tensors = false;
  /// merge only: inputs whose config.json disagree on model_type, architectures, hidden size, layer
  /// count, heads or vocabulary are merged anyway, with a warning per difference (mergekit's
  /// --allow-crimes). Off: Error{kArchitectureMismatch} with a table of the differences, before any data
  /// is read.
  bool allow_crimes = false;
  /// merge only, folder output: write a README.md model card (method, inputs, the recipe, taskvec's
  /// version), as mergekit does. --no-model-card turns it off.
  bool write_model_card = true;
  /// merge only, folder output: copy the base's tokenizer files (mergekit's --copy-tokenizer, default on).
  bool copy_tokenizer = true;
  /// merge only: plan, and fill EditReport::explanation with every tensor's resolved parameters (which
  /// differ from the method's defaults marked); nothing is read beyond the headers, nothing is written.
  bool explain = false;
  std::map<std::string, std::string> extra_metadata;  ///< added to the output's __metadata__
  std::function<void(const Progress&)> on_progress;   ///< optional
};

/// taskvec's version, e.g. "0.1.0" (CMake's project version).
const char* taskvec_version() noexcept;

/// One term of a linear edit. `relative` terms contribute a_i * (x_i - base); the others b_j * x_j
/// (used for task-vector files, which already are differences).
struct LinearTerm {
  const Checkpoint* input = nullptr;
  double coefficient = 0;
  bool relative = true;
};

/// What an edit did (or, for a dry run, would do).
struct EditReport {
  CheckpointPlan plan;                    ///< output files, tensors, dtypes, shapes, sizes
  std::uint64_t tensors_edited = 0;       ///< float tensors computed from the terms
  std::uint64_t tensors_copied = 0;       ///< integer/bool or not selected: copied from the base
  std::uint64_t bytes_read = 0, bytes_written = 0;
  double seconds = 0;
  std::uint64_t peak_chunk_bytes = 0;     ///< largest bytes in flight reached (<= memory_budget)
  std::vector<std::string> warnings;      ///< e.g. "tensor 'pos_ids' (I64) differs in b.safetensors: copied from the base"
  /// Files a folder output received besides its tensors (config.json, tokenizer files, remote-code
  /// modules, ...; copied from the inputs or written by taskvec), by file name, sorted. Empty for a
  /// single-file output and for a dry run.
  std::vector<std::string> auxiliary_files;
  /// merge with EditOptions::explain: the resolved parameters, one group of lines per set of tensors that
  /// share them (nothing is written).
  std::vector<std::string> explanation;
};

/// The general kernel: out = base_scale * base + sum(terms). All inputs must have the base's tensor
/// names and shapes (Error{kTensorMissing}/kShapeMismatch naming both files, the tensor and both
/// shapes). Non-float tensors and tensors not selected by include/exclude are copied from the base.
/// Checks NaN/Inf in inputs (kNonFinite), writes `output` atomically (see CheckpointWriter) and copies
/// the base folder's auxiliary files along when `output` is a folder.
EditReport linear_edit(const Checkpoint& base, double base_scale, const std::vector<LinearTerm>& terms,
                       const std::filesystem::path& output, const EditOptions& options);

/// tau = finetuned - pretrained (Ilharco et al. eq. 1), stored as F32 unless options.out_dtype says
/// otherwise, with __metadata__ taskvec.kind=task_vector and the pretrained fingerprint.
EditReport make_task_vector(const Checkpoint& pretrained, const Checkpoint& finetuned,
                            const std::filesystem::path& output, const EditOptions& options);

/// theta = pretrained + sum_j lambda_j * tau_j; negative lambda negates (forgetting). Each task vector's
/// recorded fingerprint must match `pretrained` (Error{kBaseMismatch}) unless options.force_base.
EditReport apply_task_vectors(const Checkpoint& pretrained,
                              const std::vector<std::pair<const Checkpoint*, double>>& task_vectors,
                              const std::filesystem::path& output, const EditOptions& options);

/// A parsed linear edit expression: coefficients per model name, as in
/// `pre + 0.5*(tau(c) + tau(b) - tau(a))` -> {pre: 0.5, a: -0.5, b: 0.5, c: 0.5}.
struct LinearExpression {
  std::map<std::string, double> coefficients;  ///< by model name; absent = 0
  /// Sum of all coefficients: 1 for a model, 0 for a task vector.
  double total() const;
};

/// Parses an edit expression over model names: numbers, names, `tau(NAME)` (= NAME - pretrained),
/// unary -, binary + - *, and /, by a number, parentheses. Multiplying two model terms, dividing by a
/// model, an unknown name or a syntax error throws Error{kExpression} with the column.
LinearExpression parse_expression(const std::string& text, const std::vector<std::string>& model_names,
                                  const std::string& pretrained_name);

/// Runs an expression over named checkpoints (one of them the pretrained base).
EditReport edit_expression(const std::map<std::string, const Checkpoint*>& models, const std::string& pretrained_name,
                           const std::string& expression, const std::filesystem::path& output,
                           const EditOptions& options);

/// Inputs after reconcile_tied_embeddings.
struct ReconciledInputs {
  std::vector<Checkpoint> inputs;         ///< same order as given; tied ones carry an lm_head alias when untying
  bool untied_base = false;               ///< the base (inputs[0]) was tied and now has an lm_head alias
  std::vector<std::string> warnings;
};

/// Tied word embeddings (a checkpoint without lm_head.weight whose head is its input embedding, e.g.
/// model.embed_tokens.weight, and whose config.json does not say tie_word_embeddings: false) mixed
/// with checkpoints that have their own lm_head.weight: by default Error{kTensorMissing} explaining
/// the choice; with `untie`, lm_head.weight of each tied input reads its embedding, so every input
/// has a head and the output gets its own lm_head.weight (docs/CLI.md). inputs[0] is the base.
ReconciledInputs reconcile_tied_embeddings(const std::vector<const Checkpoint*>& inputs, bool untie);

/// Names tried, in order, for the input embedding that a missing lm_head.weight is tied to.
inline constexpr const char* kHeadName = "lm_head.weight";

/// Norms and cosine similarities of task vectors, over float tensors selected by include/exclude.
/// Reductions use f64 partials per fixed 64 Ki-element chunk combined in chunk order, so results do
/// not depend on the thread count.
struct SimilarityReport {
  std::vector<std::string> names;
  std::vector<double> norms;                    ///< L2 norm of each task vector
  std::vector<std::vector<double>> cosine;      ///< names.size() squared
  std::vector<std::vector<double>> sign_conflict;  ///< fraction of coordinates, both non-zero, with opposite signs
  /// What was compared: "task_vectors" (with a pretrained checkpoint, or inputs labeled
  /// taskvec.kind=task_vector), or "weights" (no pretrained checkpoint and no input labeled a task
  /// vector: the cosines are of the checkpoints' weights).
  std::string compared = "task_vectors";
  std::vector<std::string> warnings;            ///< e.g. weights compared, tensors left out of the comparison
};

/// `models` are fine-tuned checkpoints when `pretrained` is given (tau = model - pretrained), else
/// task-vector files (when none is labeled taskvec.kind=task_vector, the report says compared =
/// "weights" and warns). Throws as linear_edit for mismatched inputs (kTensorMissing, kShapeMismatch,
/// kDtypeMismatch) and Error{kQuantized} for quantized storage.
SimilarityReport task_vector_similarity(const Checkpoint* pretrained,
                                        const std::vector<std::pair<std::string, const Checkpoint*>>& models,
                                        const EditOptions& options);

}  // namespace taskvec
