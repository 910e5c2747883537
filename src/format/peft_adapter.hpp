// taskvec format layer (internal): PEFT LoRA adapters read as task vectors.
//
// A PEFT adapter folder (PeftModel.save_pretrained, or transformers' model.save_pretrained after
// add_adapter) holds:
//
//   adapter_folder/
//     adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": false,
//                                    "fan_in_fan_out": false, "bias": "none", "use_dora": false,
//                                    "target_modules": ["q_proj", "v_proj"] | "regex", "modules_to_save": [...],
//                                    "rank_pattern": {"pattern": r, ...}, "alpha_pattern": {"pattern": alpha, ...},
//                                    "base_model_name_or_path": "...", ... (other fields ignored)}
//     adapter_model.safetensors    the adapter's tensors (or adapter_model.bin, a PyTorch zip checkpoint,
//                                  read by src/format/pytorch_reader.hpp)
//
// Tensor keys (the adapter name, "default", is removed on save by get_peft_model_state_dict; the
// "base_model.model." prefix is absent in files written through transformers' integration):
//
//   [base_model.model.]<module>.lora_A.weight        A: [r, in]            (Linear; Conv: [r, in, k...])
//   [base_model.model.]<module>.lora_B.weight        B: [out, r]           (Linear; Conv: [out, r, 1...])
//   [base_model.model.]<module>.lora_embedding_A     A: [r, num_embeddings]          (nn.Embedding; no ".weight")
//   [base_model.model.]<module>.lora_embedding_B     B: [embedding_dim, r]
//   [base_model.model.]<module>.lora_A.<adapter>.weight / .lora_embedding_A.<adapter>   (accepted when
//                                                    every key names the same single adapter)
//   [base_model.model.]<path>.<param>                a full tensor of a modules_to_save module (saved
//                                                    without PEFT's "modules_to_save.<adapter>." part)
//   [base_model.model.]<module>.base_layer.weight    the base weight of a LoRA module, saved when PEFT's
//                                                    save_embedding_layers is on (embedding targeted)
//   [base_model.model.]<embed>.weight                a full embed_tokens / lm_head (resized vocabulary)
//
// The delta of one LoRA module, in base-weight orientation (PEFT's get_delta_weight):
//
//   Linear / Conv:       dW = s * B @ A                      [out, in(, k...)]
//   fan_in_fan_out:      dW = s * (B @ A)^T                  [in, out]   (GPT-2's Conv1D stores W as in x out)
//   Embedding:           dW = s * (B @ A)^T                  [num_embeddings, embedding_dim]
//   s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; r and alpha per module from
//   rank_pattern / alpha_pattern (first key in file order whose regex matches, see pattern_matches).
//
// docs/FORMATS.md, "PEFT LoRA adapters", lists the key mapping and every refusal with its ErrorCode.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "format/internal.hpp"  // SafetensorsFileSource
#include "taskvec/safetensors.hpp"
#include "taskvec/tensor_source.hpp"

namespace taskvec::peft {

inline constexpr const char* kAdapterConfigName = "adapter_config.json";
inline constexpr const char* kAdapterSafetensorsName = "adapter_model.safetensors";
inline constexpr const char* kAdapterBinName = "adapter_model.bin";
/// Largest adapter_config.json read (bytes); real ones are a few KiB.
inline constexpr std::uint64_t kMaxAdapterConfigSize = 10'000'000;

/// The parts of adapter_config.json that decide the math. Defaults are PEFT's LoraConfig defaults.
struct AdapterConfig {
  std::string peft_type = "LORA";
  std::uint64_t r = 8;             ///< default rank (> 0)
  double lora_alpha = 8;           ///< default alpha (finite)
  bool use_rslora = false;         ///< scale = alpha / sqrt(r) instead of alpha / r
  bool fan_in_fan_out = false;     ///< base weight stored [in, out] (GPT-2 Conv1D): dW transposed
  bool lora_bias = false;          ///< lora_B has a bias: d(bias) = s * lora_B.bias (PEFT's merge)
  /// Per-module overrides in file order; the first key whose pattern matches wins (pattern_matches).
  std::vector<std::pair<std::string, std::uint64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<std::string> target_modules;        ///< list form (informational; the tensors decide)
  std::optional<std::string> target_modules_regex;  ///< string form (a regex, or "all-linear")
  std::vector<std::string> modules_to_save;       ///< module-name suffixes whose full tensors are saved
  std::string base_model_name_or_path;            ///< "" when absent
  std::string init_lora_weights;                  ///< as written ("true", "gaussian", ...), for messages

  /// r of `module` (a module path without "base_model.model.", e.g. "model.layers.0.self_attn.q_proj"):
  /// the value of the first rank_pattern key that pattern_matches, else r.
  std::uint64_t rank_for(std::string_view module) const;
  /// alpha of `module`: alpha_pattern as rank_for, else lora_alpha.
  double alpha_for(std::string_view module) const;
  /// The scale s of `module`: alpha_for / rank_for, or alpha_for / sqrt(rank_for) with use_rslora.
  double scale_for(std::string_view module) const;
};

/// PEFT's rank_pattern / alpha_pattern rule (peft.utils.other.get_pattern_key, PEFT >= 0.15.0): `key`
/// matches `module` when the whole module name matches the regex `(.*\.)?(key)$`; so "q_proj" matches
/// "model.layers.0.self_attn.q_proj", "layers.0.self_attn.q_proj" matches it too, "proj" does not.
/// (PEFT < 0.15 used `.*\.key$`: the same except for a key that is the whole module name or has a
/// top-level '|'.) Module names have no "base_model.model." prefix.
/// Keys are ECMAScript regexes (std::regex), which agree with Python's re for the patterns PEFT users
/// write (names, dots, \d, [..], |, ^). Throws Error{kInvalidAdapter} naming `label` and the key when
/// it is not a valid regex.
bool pattern_matches(const std::string& key, std::string_view module, const std::string& label);

/// Parses adapter_config.json. `label` (the config's path) starts every message. Throws
/// Error{kInvalidAdapter} for: text that is not one JSON object (or has a duplicate key); a missing
/// "peft_type" or one other than "LORA" (IA3, VERA, OFT, BOFT, LOHA, LOKR, ADALORA, PROMPT_TUNING, ...,
/// named in the message); r, rank_pattern values not positive integers; lora_alpha, alpha_pattern values
/// not finite numbers; a pattern key that is not a valid regex; a wrong JSON type for a known field; and
/// for the variants whose delta is not s * B @ A (each named): use_dora (DoRA), bias other
/// than "none" (trained biases are full tensors, not deltas), layer_replication, use_qalora (QALoRA),
/// alora_invocation_tokens (aLoRA), use_bdlora (BD-LoRA), arrow_config (Arrow), kasa_config (KaSA),
/// monteclora_config (MonteCLoRA), target_parameters (LoRA on nn.Parameter, MoE experts),
/// trainable_token_indices (trainable tokens), init_lora_weights "pissa*", "olora", "corda", "lora_ga"
/// (unconverted: relative to a residual base) and "loftq" (relative to a quantized base). Unknown fields
/// are ignored.
AdapterConfig parse_adapter_config(std::string_view json_text, const std::string& label);

/// One LoRA module of an adapter: dW = scale * B @ A, oriented as the base weight (see the header).
struct LoraModule {
  std::string module;        ///< module path, e.g. "model.layers.0.self_attn.q_proj"
  std::string target;        ///< the base tensor it changes: module + ".weight"
  std::string a_name;        ///< adapter tensor holding A
  std::string b_name;        ///< adapter tensor holding B
  std::uint64_t rank = 0;    ///< r (A's first dimension, B's second)
  double scale = 1;          ///< s
  bool fan_in_fan_out = false;  ///< dW = s * (B @ A)^T; never set with is_embedding
  bool is_embedding = false;    ///< lora_embedding_A/B: dW = s * (B @ A)^T
  /// Shape of dW = the base weight's shape: [out, in] (fan_in_fan_out: [in, out]; embedding:
  /// [num_embeddings, embedding_dim]; conv: [out, in, k...]).
  std::vector<std::uint64_t> shape;
  /// The adapter's own copy of the base weight (".base_layer.weight", saved by save_embedding_layers),
  /// if any: the model PEFT loads is that copy + dW. Equal to the base unless the vocabulary was resized.
  std::optional<std::string> saved_base_name;
};

/// A full tensor of the adapter that replaces a base tensor (modules_to_save, a saved embedding).
struct FullTensor {
  std::string target;   ///< base tensor name, e.g. "score.weight"
  std::string source;   ///< adapter tensor name, e.g. "base_model.model.score.weight"
};

/// What an adapter's tensors mean.
/// A LoRA bias (lora_bias: true): the base bias changes by scale * lora_B.bias, as PEFT merges it.
struct BiasDelta {
  std::string target;   ///< base tensor name: module + ".bias"
  std::string source;   ///< adapter tensor name: <module>.lora_B.bias
  double scale = 1;     ///< the module's s
};

struct AdapterTensors {
  std::vector<LoraModule> modules;          ///< sorted by target
  std::vector<FullTensor> full_tensors;     ///< sorted by target
  std::vector<BiasDelta> bias_deltas;       ///< sorted by target
  std::optional<std::string> adapter_name;  ///< the adapter name found in the keys, if they had one
};

/// Maps the tensors of an adapter file (name, dtype, shape; offsets unused) to LoRA modules and full
/// tensors. `label` (the weights file) starts every message. Throws Error{kInvalidAdapter} naming the key
/// for: a key that is none of the forms in the header comment (also lora_magnitude_vector: DoRA;
/// lora_B.bias without "lora_bias": true, or one whose module has no LoRA factors or whose shape is
/// not B's [out]; keys naming two adapter names); an A without its B or a B without its A;
/// A/B shapes that do not fit (A rank < 2, B not [out, r(, 1...)], A's r != B's r), or an r other than
/// the config's for that module (rank_pattern); a factor whose dtype is not a float dtype taskvec decodes
/// (dtype_is_editable); two keys with the same target (e.g. LoRA and modules_to_save on one module).
AdapterTensors map_adapter_tensors(const AdapterConfig& config, std::span<const TensorInfo> tensors,
                                   const std::string& label);

/// Orients `module` against the base tensor's shape. PEFT decides the transpose by the base module's
/// type, not the config (nn.Linear forces fan_in_fan_out off, transformers' Conv1D forces it on), so:
/// when `base_shape` equals module.shape nothing changes; when it equals the shape with the two
/// dimensions swapped (a non-square 2-D, non-embedding module) fan_in_fan_out is flipped and the shape
/// swapped; a square weight keeps the config's choice. Otherwise throws Error{kShapeMismatch} naming
/// `label`, the target and both shapes.
void orient_to_base(LoraModule& module, const std::vector<std::uint64_t>& base_shape, const std::string& label);

/// A tensor of some source: what a CheckpointTensor will be. Both pointers must outlive the user.
struct TensorRef {
  const TensorInfo* info = nullptr;
  const TensorSource* source = nullptr;
};

/// dW of one LoRA module, computed on demand. Output: F32, shape module.shape, name module.target,
/// data_begin 0. Values are computed in f64 (A and B decoded exactly with decode_to_f64, products
/// summed over k = 0..r-1 in order, times s) and rounded once to f32: any byte range gives the same bits
/// as the whole tensor, at any thread count, and a rank-r sum loses nothing before the final rounding.
/// Memory per read(): O(rows_in_range * r + r * cols) doubles plus one row of output floats, where a row
/// is one row of dW ([out] rows of [in...] for Linear/Conv; [in] rows of [out] when transposed).
/// Nothing is cached between reads (the r x cols factor is re-read and decoded per read). Thread-safe:
/// no mutable state.
class LoraProductSource final : public TensorSource {
 public:
  /// `a` and `b` are the module's factors (their dtype editable, shapes as map_adapter_tensors checked:
  /// re-checked here, Error{kInvalidAdapter}); `keep_alive` owns what their pointers point into.
  LoraProductSource(LoraModule module, TensorRef a, TensorRef b, std::shared_ptr<const void> keep_alive = {});

  const std::filesystem::path& path() const noexcept override { return a_.source->path(); }
  std::string_view format() const noexcept override { return "lora"; }
  /// The output tensor's entry (F32, module.shape, data [0, 4 * elements)).
  const TensorInfo& info() const noexcept { return info_; }
  const LoraModule& module() const noexcept { return module_; }
  /// The factors and what keeps them alive (to build a re-oriented product over the same factors).
  TensorRef a() const noexcept { return a_; }
  TensorRef b() const noexcept { return b_; }
  const std::shared_ptr<const void>& keep_alive() const noexcept { return keep_alive_; }
  /// Writes bytes [byte_offset, byte_offset + dst.size()) of dW's F32 little-endian encoding; any byte
  /// offset (mid-element, mid-row) works. `info` must be info() (only its size is checked). Throws
  /// Error{kInvalidArgument} for a range outside the tensor, and what the factor sources throw.
  void read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const override;

 private:
  LoraModule module_;
  TensorRef a_, b_;
  std::shared_ptr<const void> keep_alive_;
  TensorInfo info_;
  std::uint64_t rows_ = 0, cols_ = 0;  // dW viewed as rows_ x cols_
};

/// sum_i c_i * x_i over tensors of one element count, element by element in f64 (each input decoded
/// exactly), rounded once to F32; no terms: zeros. Serves the F32 tensor `info` it is read with: a bias
/// delta (s * lora_B.bias), an adapter's base + dW, a saved tensor's saved - base. Memory per read():
/// the requested elements, once per input. Throws Error{kInvalidArgument} for a range outside `info`,
/// and what the inputs' sources throw. Thread-safe: no mutable state.
class CombinedSource final : public TensorSource {
 public:
  CombinedSource(std::filesystem::path path, std::vector<std::pair<double, TensorRef>> terms,
                 std::shared_ptr<const void> keep_alive = {})
      : path_(std::move(path)), terms_(std::move(terms)), keep_alive_(std::move(keep_alive)) {}
  const std::filesystem::path& path() const noexcept override { return path_; }
  std::string_view format() const noexcept override { return "lora"; }
  void read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const override;

 private:
  std::filesystem::path path_;
  std::vector<std::pair<double, TensorRef>> terms_;
  std::shared_ptr<const void> keep_alive_;
};

/// Serves a tensor of another source under another name (a full tensor renamed to its base name): read()
/// ignores the info it is given and reads `original`.
class RenamedSource final : public TensorSource {
 public:
  RenamedSource(TensorRef original, std::shared_ptr<const void> keep_alive = {})
      : original_(original), keep_alive_(std::move(keep_alive)) {}
  const std::filesystem::path& path() const noexcept override { return original_.source->path(); }
  std::string_view format() const noexcept override { return original_.source->format(); }
  void read(const TensorInfo&, std::uint64_t byte_offset, std::span<std::byte> dst) const override {
    original_.source->read(*original_.info, byte_offset, dst);
  }

 private:
  TensorRef original_;
  std::shared_ptr<const void> keep_alive_;
};

using format_detail::SafetensorsFileSource;

/// The files of an adapter folder.
struct AdapterFiles {
  std::filesystem::path folder;
  std::filesystem::path config;    ///< folder / adapter_config.json
  std::filesystem::path weights;   ///< folder / adapter_model.safetensors
};

/// True when `path` is a folder holding adapter_config.json (a file, or a symlink to one). Never throws.
bool is_adapter_folder(const std::filesystem::path& path) noexcept;

/// Finds the files of the adapter folder `folder`. Throws Error{kIo} when adapter_config.json or any
/// weights file is missing. adapter_model.safetensors wins over adapter_model.bin (a PyTorch zip, read
/// by the restricted unpickler), as in PEFT.
AdapterFiles find_adapter_files(const std::filesystem::path& folder);

/// One tensor the adapter defines, under its base name.
struct AdapterTensor {
  enum class Kind { kDelta, kFull };
  Kind kind = Kind::kDelta;    ///< kDelta: dW to add to the base; kFull: the fine-tuned tensor itself
  TensorInfo info;             ///< name = base name; F32 for a delta, the file's dtype for a full tensor
  std::shared_ptr<const TensorSource> source;
  std::optional<LoraModule> module;  ///< for a delta
};

/// Builds the sources of an already mapped adapter over its tensors (any format): one
/// LoraProductSource per module, one RenamedSource per full tensor; sorted by name. `tensors` must hold
/// every name `mapping` uses (else Error{kInternal}); `keep_alive` owns what the refs point into.
std::vector<AdapterTensor> make_adapter_tensors(const AdapterTensors& mapping, std::span<const TensorRef> tensors,
                                                const std::shared_ptr<const void>& keep_alive);

/// An opened adapter folder.
struct OpenedAdapter {
  AdapterFiles files;
  AdapterConfig config;
  AdapterTensors mapping;
  std::vector<AdapterTensor> tensors;  ///< sorted by name
};

/// find_adapter_files + parse_adapter_config (read with format_detail::read_folder_file: inside the
/// folder, regular, <= kMaxAdapterConfigSize, else Error{kShardEscapes} / Error{kIo} /
/// Error{kInvalidAdapter}) + SafetensorsFile::open (the safetensors rules) + map_adapter_tensors +
/// make_adapter_tensors. No tensor data is read.
OpenedAdapter open_adapter_folder(const std::filesystem::path& folder);

}  // namespace taskvec::peft
