// taskvec: checkpoints = one safetensors file, or a Hugging Face folder of shards with
// model.safetensors.index.json, seen as one name -> tensor map; and the (sharded) checkpoint writer.
//
// Index file (transformers' sharded format):
//   { "metadata": {"total_size": 123, ...}, "weight_map": {"tensor.name": "model-00001-of-00002.safetensors", ...} }
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "taskvec/safetensors.hpp"
#include "taskvec/tensor_source.hpp"

namespace taskvec {

/// Name of the index file of a sharded Hugging Face checkpoint.
inline constexpr const char* kIndexFileName = "model.safetensors.index.json";

/// Largest index, config.json or other auxiliary file read or copied from a model folder (bytes). The
/// tokenizer.json of big vocabularies is 10-20 MB; checked before anything is read.
inline constexpr std::uint64_t kMaxFolderFileSize = 100'000'000;

/// A tensor of a checkpoint: its entry (name, dtype, shape) and the source of its bytes, whatever the
/// format (a safetensors shard, a PyTorch archive, a computed LoRA product).
struct CheckpointTensor {
  const TensorInfo* info = nullptr;
  const TensorSource* source = nullptr;
  /// The input file the bytes come from (for messages).
  const std::filesystem::path& file() const noexcept { return source->path(); }
  /// Copies the tensor's bytes [byte_offset, byte_offset + dst.size()) of its canonical encoding
  /// (row-major, little-endian, info->dtype) into `dst` with pread(2): no page of the input is mapped
  /// into the process (the page cache holds it), which is how the engine streams
  /// (docs/ARCHITECTURE.md). Thread-safe. Throws Error{kInvalidArgument} when the range is not inside
  /// the tensor, Error{kIo} naming the file when the read fails.
  void read(std::uint64_t byte_offset, std::span<std::byte> dst) const;
};

namespace format_detail {
struct TensorFile;  // one opened tensor file of any format (src/format/internal.hpp)
}  // namespace format_detail
namespace peft {
struct OpenedAdapter;  // src/format/peft_adapter.hpp
}  // namespace peft

/// How a PEFT adapter is seen over a base model (Checkpoint::adapter_over).
enum class AdapterUse {
  kTaskVector,  ///< tau: dW = s * B @ A for each LoRA module, (saved - base) for a modules_to_save tensor, 0 elsewhere
  kModel,       ///< theta = base + tau: what PEFT's merge_and_unload gives
};

/// A read-only, validated checkpoint. Opening maps the shards and validates every header and the
/// index; no tensor data is read. Cheap to move; the tensors' bytes live as long as the Checkpoint.
class Checkpoint {
 public:
  /// Opens `path`, its format detected from the bytes (docs/FORMATS.md): a .safetensors file; an index
  /// .json file; a PEFT adapter folder (adapter_config.json: see is_adapter()); or a folder holding, in
  /// this order of preference, model.safetensors.index.json, model.safetensors,
  /// pytorch_model.bin.index.json, pytorch_model.bin, exactly one .safetensors file, exactly one
  /// .bin/.pt/.pth file.
  /// For an index: every shard must exist (kShardMissing) and lie inside the folder, symlinks resolved
  /// (kShardEscapes, checked before the shard is opened); every tensor must be in exactly one shard and
  /// the weight_map must agree with the shard headers both ways (kInvalidIndex). A PyTorch file throws
  /// what its reader finds (kInvalidArchive, kInvalidPickle, kUnsafePickle naming the refused global,
  /// kUnsupported for a legacy pre-1.6 file or GGUF), an adapter folder kInvalidAdapter. Throws Error.
  static Checkpoint open(const std::filesystem::path& path);

  /// The path as given by the user (for messages).
  const std::filesystem::path& path() const noexcept { return path_; }
  /// The folder of a folder/index checkpoint; nullopt for a single-file checkpoint.
  const std::optional<std::filesystem::path>& folder() const noexcept { return folder_; }
  /// Every input file the tensors are read from, sorted (the shards of a sharded folder; one path
  /// for a single file; for an adapter seen over a base, the base's files, the adapter's files and the
  /// adapter folder). Outputs are never written over or inside these.
  const std::vector<std::filesystem::path>& files() const noexcept { return files_; }
  /// The format detected from the bytes: "safetensors", "pytorch", "lora" (see docs/FORMATS.md).
  const std::string& format() const noexcept { return format_; }
  /// All tensor names, sorted.
  const std::vector<std::string>& tensor_names() const noexcept { return names_; }
  /// The tensor named `name`, or nullptr.
  const CheckpointTensor* find(std::string_view name) const noexcept;
  /// The tensor named `name`; throws Error{kTensorMissing} naming this checkpoint and the tensor.
  const CheckpointTensor& at(std::string_view name) const;
  /// __metadata__ of the first safetensors shard (transformers writes the same on every shard); empty
  /// for other formats.
  const std::map<std::string, std::string>& metadata() const noexcept { return metadata_; }
  /// The index file's "metadata" object as strings (empty for a single file).
  const std::map<std::string, std::string>& index_metadata() const noexcept { return index_metadata_; }
  /// Sum of all tensors' data bytes.
  std::uint64_t total_bytes() const noexcept;
  /// Sum of all tensors' element counts.
  std::uint64_t total_elements() const noexcept;
  /// Files of the folder that are not tensors but belong to the model, copied into a folder output:
  /// config.json, generation_config.json, tokenizer*, special_tokens_map.json, added_tokens.json,
  /// vocab*, merges.txt, *.model, chat_template*, preprocessor_config.json, processor_config.json, and
  /// the remote-code modules (NAME.py) that the auto_map of config.json, tokenizer_config.json,
  /// (pre)processor_config.json names. Found and checked by open(): each must resolve inside the
  /// folder (Error{kShardEscapes} otherwise), be a regular file of at most kMaxFolderFileSize bytes
  /// (Error{kIo}). Empty for a single file.
  std::vector<std::filesystem::path> auxiliary_files() const { return auxiliary_; }
  /// Things open() noticed and ignored, one sentence each, for the user (the engine copies them into
  /// EditReport::warnings): .safetensors files beside an index that it does not name, a
  /// model.safetensors beside an index, auto_map code of another repository or missing from the folder.
  const std::vector<std::string>& notes() const noexcept { return notes_; }
  /// A 16-hex-digit fingerprint of the content: FNV-1a over every tensor's name, dtype, shape and
  /// up to 64 evenly spaced 64-byte samples of its data. Reads ~4 KiB per tensor. Used to tie a task
  /// vector to the pretrained checkpoint it was made from.
  std::string fingerprint() const;

  /// Makes `alias` a second name for the data of tensor `target` (e.g. lm_head.weight for
  /// model.embed_tokens.weight when the config ties them). Copies of this Checkpoint keep the alias.
  /// Throws Error{kTensorMissing} if `target` is absent, Error{kInvalidArgument} if `alias` exists.
  void add_alias(const std::string& alias, const std::string& target);
  /// Replaces tensor `name` by `info` (its name set to `name`; dtype, shape and data_begin / data_end as
  /// `source` serves it) read from `source`, a computed tensor (e.g. embedding rows taken by token in a
  /// tokenizer merge). The old entry's bytes stay readable through sources that refer to it. Copies of
  /// this Checkpoint made afterwards keep the replacement. Throws Error{kTensorMissing} if `name` is absent.
  void replace_tensor(const std::string& name, TensorInfo info, std::shared_ptr<const TensorSource> source);
  /// True for a PEFT LoRA adapter folder. Its tensors are named as the base model's: F32 deltas
  /// dW = s * B @ A (computed on demand, per chunk) for the LoRA modules, and the saved tensors of
  /// modules_to_save. Use it through adapter_over().
  bool is_adapter() const noexcept { return adapter_ != nullptr && !derived_; }
  /// The opened adapter (config, tensor mapping, factor sources) when is_adapter(), else nullptr. Lives
  /// as long as this Checkpoint (or any copy of it). Defined in src/format/peft_adapter.hpp.
  const peft::OpenedAdapter* adapter() const noexcept { return is_adapter() ? adapter_.get() : nullptr; }
  /// The adapter's base_model_name_or_path ("" when absent or not an adapter).
  std::string adapter_base_model() const;
  /// This adapter seen over `base`, as a checkpoint with every tensor of `base` (same names, shapes):
  /// kTaskVector gives tau (F32 deltas; zero where the adapter changes nothing; integer tensors as in
  /// base), kModel gives base + tau (F32 where changed, the base tensor elsewhere). Computed on demand:
  /// no data is read here. The result keeps both checkpoints' sources alive. Throws
  /// Error{kInvalidArgument} if this is not an adapter, Error{kTensorMissing} for an adapter target the
  /// base lacks, Error{kShapeMismatch} (naming both shapes) when a delta does not fit its base tensor in
  /// either orientation (PEFT's fan_in_fan_out), Error{kDtypeMismatch} for a delta on a non-float tensor.
  Checkpoint adapter_over(const Checkpoint& base, AdapterUse use) const;

  /// The folder's config.json "tie_word_embeddings" value; nullopt without a folder, a readable
  /// config.json, or that key.
  std::optional<bool> tied_word_embeddings() const;

 private:
  void add_file(format_detail::TensorFile&& file, const std::string& label);
  static Checkpoint open_adapter(const std::filesystem::path& folder);

  std::filesystem::path path_;
  std::shared_ptr<std::vector<std::unique_ptr<TensorInfo>>> aliases_;  // entries of alias names
  std::optional<std::filesystem::path> folder_;
  std::string format_;
  std::vector<std::shared_ptr<const TensorSource>> sources_;  // owners of the tensors' sources
  std::vector<std::filesystem::path> files_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::string> names_;
  std::map<std::string, CheckpointTensor, std::less<>> tensors_;
  std::map<std::string, std::string> index_metadata_;
  std::vector<std::filesystem::path> auxiliary_;
  std::vector<std::string> notes_;
  std::shared_ptr<const peft::OpenedAdapter> adapter_;
  bool derived_ = false;  // made by adapter_over: keeps adapter_ alive but is not an adapter itself
  std::vector<std::shared_ptr<const TensorInfo>> owned_infos_;  // entries of derived checkpoints
};

/// How a checkpoint is written.
struct CheckpointWriteOptions {
  std::uint64_t max_shard_size = 5'000'000'000;  ///< bytes of tensor data per shard (HF's "5GB")
  bool force = false;                            ///< allow replacing an existing output
};

/// The planned output: where each tensor goes. Built before any data is computed (so --dry-run can
/// print it). Output path rules: a path ending in ".safetensors" is one file; any other path is a
/// folder that receives model.safetensors, or model-0000k-of-0000n.safetensors shards plus
/// model.safetensors.index.json when the data exceeds max_shard_size. Tensors are assigned to shards
/// in name order, greedily; a tensor larger than max_shard_size gets a shard of its own.
struct CheckpointPlan {
  struct Shard {
    std::filesystem::path path;   ///< final path of this shard file
    SafetensorsLayout layout;
  };
  std::filesystem::path output;               ///< the file or folder given
  bool is_folder = false;
  std::vector<Shard> shards;
  std::map<std::string, std::pair<std::size_t, std::size_t>, std::less<>> location;  ///< name -> (shard, index in layout)
  std::uint64_t total_bytes = 0;              ///< tensor data bytes

  /// Plans `specs` (any order) with `metadata` written into every shard's __metadata__.
  /// Throws Error{kInvalidArgument} for max_shard_size 0, Error{kInvalidName} for a duplicate name,
  /// and what SafetensorsLayout::build throws.
  static CheckpointPlan build(const std::filesystem::path& output, std::vector<TensorSpec> specs,
                              const std::map<std::string, std::string>& metadata, const CheckpointWriteOptions& options);
};

/// Writes a planned checkpoint. Refuses (kOutputExists) an existing output file / index / shard
/// unless options.force, and any output path that is one of `inputs` (even with force: inputs are
/// never overwritten; for an input folder or index, nothing in that folder is replaced). Creates a
/// folder output if needed. Every shard is an AtomicFile; commit() publishes the shards, copies
/// `auxiliary_files` into the folder atomically (ignored for a single-file output; an existing
/// copy is kOutputExists without force, checked before anything is published), and writes the
/// index file last. A one-shard folder gets model.safetensors and no index (a stale index left by
/// an earlier sharded run is removed, which only happens with force). Destroying an uncommitted
/// writer leaves no output and no temp file.
class CheckpointWriter {
 public:
  CheckpointWriter(CheckpointPlan plan, const CheckpointWriteOptions& options,
                   const std::vector<std::filesystem::path>& inputs = {});
  const CheckpointPlan& plan() const noexcept { return plan_; }
  /// Writes bytes at `offset_in_tensor` of tensor `name`. Thread-safe.
  void write(std::string_view name, std::uint64_t offset_in_tensor, std::span<const std::byte> bytes) const;
  /// Same, addressed by (shard, index) from plan().location; the fast path.
  void write(std::size_t shard, std::size_t index, std::uint64_t offset_in_tensor, std::span<const std::byte> bytes) const;
  /// Publishes the output: every shard, the auxiliary files (copied into a folder output) and the
  /// index are first written and fsynced under temp names, so a full disk or an unreadable auxiliary
  /// file fails before any final name exists; then they are renamed, the index last. With force, model
  /// files of an earlier output in the folder that this one does not have are removed (never an input).
  /// `generated_files` (file name in the output folder -> content) are files taskvec writes itself, e.g.
  /// a rewritten config.json: written the same checked, atomic way, inside the output folder (never a
  /// system temp folder), and they replace a copied auxiliary file of the same name. Ignored for a
  /// single-file output. Throws Error{kDiskFull, kIo, kOutputExists}; Error{kInvalidArgument} for a
  /// generated name that is not a plain file name.
  void commit(const std::vector<std::filesystem::path>& auxiliary_files = {},
              const std::map<std::string, std::string>& generated_files = {});
  /// Without commit(): removes the temp files, and the output folder if this writer created it and it
  /// is empty.
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

 private:
  void remove_stale_model_files() const;

  CheckpointPlan plan_;
  std::vector<std::filesystem::path> inputs_;
  std::vector<std::unique_ptr<SafetensorsWriter>> writers_;
  bool force_ = false;
  bool committed_ = false;
  bool created_folder_ = false;
};

/// Validates a checkpoint completely (open() plus nothing else to check today); returns normally or
/// throws the first Error found. The `taskvec validate` command.
void validate_checkpoint(const std::filesystem::path& path);

}  // namespace taskvec
