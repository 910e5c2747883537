// Internal helpers shared by the engine's two drivers (linear_edit.cpp, merge_driver.cpp).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"

namespace taskvec::detail {

/// Bytes read per pread when a tensor range is decoded piecewise (read_decoded): 256 KiB, so that the
/// staged bytes stay in the L2 cache while they are decoded.
inline constexpr std::uint64_t kReadPieceBytes = std::uint64_t{1} << 18;

/// Reads elements [begin, begin + count) of `t` (any editable float dtype) and decodes them into
/// dst[0..count) as f32 / f64 (exact widening, docs/NUMERICS.md), reading at most kReadPieceBytes at a
/// time into `staging` (grown as needed, reusable across calls). Throws as CheckpointTensor::read.
void read_decoded(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, float* dst,
                  std::vector<std::byte>& staging);
void read_decoded(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, double* dst,
                  std::vector<std::byte>& staging);

/// Copies bytes [byte_begin, byte_begin + byte_count) of `t` unchanged to the same offsets of output
/// tensor (shard, index) of `writer`, kReadPieceBytes at a time through `staging`. Throws as
/// CheckpointTensor::read and CheckpointWriter::write.
void copy_tensor_bytes(const CheckpointTensor& t, std::uint64_t byte_begin, std::uint64_t byte_count,
                       const CheckpointWriter& writer, std::size_t shard, std::size_t index, std::vector<std::byte>& staging);

/// True when `a` and `b` hold the same number of bytes and the same bytes (read with pread, 256 KiB
/// pieces). Throws as CheckpointTensor::read.
bool same_bytes(const CheckpointTensor& a, const CheckpointTensor& b);

/// "[2, 3]" for messages.
std::string shape_text(const std::vector<std::uint64_t>& shape);

/// --include / --exclude (EditOptions): a tensor is selected when its name matches `include` (if
/// given) and does not match `exclude` (if given); ECMAScript, std::regex_search. The constructor
/// throws Error{kInvalidArgument} naming the flag for an invalid pattern.
class TensorFilter {
 public:
  TensorFilter(const std::string& include, const std::string& exclude);
  bool selects(const std::string& name) const;

 private:
  std::optional<std::regex> include_, exclude_;
};

/// What a folder output gets besides its tensors: the base folder's auxiliary files to copy
/// (config.json, tokenizer, ...) and files taskvec writes itself (file name -> content), which replace
/// a copy of the same name; both go through CheckpointWriter::commit.
struct OutputAuxiliary {
  std::vector<std::filesystem::path> copies;
  std::map<std::string, std::string> generated;
};

/// The base's auxiliary files; when the base's tied head was untied (reconcile_tied_embeddings),
/// config.json is generated with "tie_word_embeddings": false. Throws Error{kIo} for a config.json that
/// cannot be parsed.
OutputAuxiliary output_auxiliary_files(const Checkpoint& base, bool untied_base);

}  // namespace taskvec::detail
