// taskvec: the one error type of the library and its stable codes.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace taskvec {

/// What went wrong. Tests check the code, never the message text. The CLI maps each code to an
/// exit status with exit_status(); docs/CLI.md lists the mapping.
enum class ErrorCode : int {
  // Usage and arguments.
  kInvalidArgument = 1,  ///< a flag, option value or API argument is out of range or malformed
  kExpression,           ///< an edit expression does not parse or is not linear in the models
  kRecipe,               ///< a merge recipe (YAML) is malformed or has an unknown key / bad value
  // I/O.
  kIo,                   ///< a file cannot be opened, read, mapped, written, synced or renamed
  kOutputExists,         ///< the output exists (without --force) or would overwrite an input
  kDiskFull,             ///< no space left (ENOSPC / EFBIG) while writing an output
  // safetensors format rules (docs/FORMATS.md, rules B1-B25).
  kHeaderTooSmall,       ///< file shorter than 8 bytes, or header length N < 2 (B1)
  kHeaderTooLarge,       ///< header length N > 100,000,000 bytes (B2)
  kInvalidHeaderLength,  ///< 8 + N exceeds the file size (B3)
  kInvalidUtf8,          ///< header bytes are not valid UTF-8 (B4)
  kInvalidJson,          ///< header is not one JSON object, or a JSON value has the wrong type (B5, B6)
  kDuplicateKey,         ///< the same tensor name / JSON key occurs twice (B18)
  kInvalidMetadata,      ///< __metadata__ is not a string -> string object (B7)
  kInvalidTensorEntry,   ///< a tensor entry lacks dtype/shape/data_offsets or has bad types (B8)
  kInvalidName,          ///< a tensor name is empty, has NUL/control characters, or is "__metadata__" (B25)
  kUnknownDtype,         ///< dtype string is not one of the known safetensors dtypes (B9)
  kInvalidShape,         ///< a shape entry is negative, non-integer or above 2^53 (B10, B23)
  kShapeOverflow,        ///< element count x dtype size overflows 64 bits (B14)
  kInvalidOffsets,       ///< data_offsets malformed, begin > end, gap, overlap or past the buffer (B12, B13)
  kTensorSizeMismatch,   ///< end - begin != elements x dtype size (B15, B16)
  kIncompleteBuffer,     ///< trailing bytes after the last tensor, or the file is truncated (B17)
  // Sharded checkpoints (model.safetensors.index.json).
  kInvalidIndex,         ///< the index file is malformed or disagrees with the shard headers
  kShardMissing,         ///< a shard named by the index does not exist
  kShardEscapes,         ///< a shard path leaves the checkpoint folder (.., absolute, symlink out)
  // Other formats (docs/FORMATS.md).
  kInvalidArchive,       ///< a zip archive (PyTorch checkpoint) is malformed, truncated, compressed or escapes with '..'
  kInvalidPickle,        ///< a pickle stream is malformed, truncated, or not a state dict
  kUnsafePickle,         ///< a pickle calls a global or uses an opcode outside torch's state-dict allow-list (never executed)
  kInvalidAdapter,       ///< a PEFT adapter's config or weights are malformed, or a variant taskvec does not implement
  // Inputs that do not fit together.
  kTensorMissing,        ///< a tensor of one input is missing from another
  kShapeMismatch,        ///< the same tensor has different shapes in two inputs
  kDtypeMismatch,        ///< the same tensor has dtypes that cannot be combined
  kBaseMismatch,         ///< a task vector was made from another pretrained checkpoint
  kArchitectureMismatch, ///< merge inputs' config.json disagree on the architecture (without --allow-crimes)
  kNonFinite,            ///< NaN or Inf in an input tensor (without --allow-nonfinite)
  kTensorTooLarge,       ///< a whole-tensor method needs more memory than the budget allows
  kQuantized,            ///< quantized storage (bitsandbytes, GPTQ, AWQ, block-scaled FP8) that cannot be merged as is
  kOverflow,             ///< a finite result does not fit the output dtype (F16/BF16/FP8 would store Inf)
  kUnsupported,          ///< a feature or dtype this build or method does not support
  kInternal,             ///< a broken invariant inside taskvec (a bug: please report it)
};

/// Stable lower_snake_case name of a code, e.g. "invalid_offsets" (used in --json output).
std::string_view error_code_name(ErrorCode code) noexcept;

/// Process exit status for a code: 2 usage, 3 I/O, 4 invalid file, 5 inputs do not fit together,
/// 6 output refused, 7 disk full, 70 internal. 0 and 1 are never returned (1 = unexpected exception).
int exit_status(ErrorCode code) noexcept;

/// The exception thrown by every taskvec library function. what() is a full sentence that names the
/// file and the tensor involved, e.g. "a.safetensors: tensor 'w': data_offsets [0, 8] overlap ...".
/// `table`: optional lines shown under the message (e.g. the architecture differences of merge inputs);
/// the CLI prints each on its own line, escaped like the message.
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message, std::vector<std::string> table = {})
      : std::runtime_error(message), code_(code), table_(std::move(table)) {}
  ErrorCode code() const noexcept { return code_; }
  const std::vector<std::string>& table() const noexcept { return table_; }

 private:
  ErrorCode code_;
  std::vector<std::string> table_;
};

}  // namespace taskvec
