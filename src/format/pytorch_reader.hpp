// taskvec format layer: PyTorch checkpoints (torch.save of a state dict since torch 1.6; internal
// header). A file is a zip archive of STORED entries (zip_archive.hpp) under one top folder PREFIX:
//
//   PREFIX/data.pkl     the pickled state dict (torch_pickle.hpp); tensors are persistent ids
//                       ('storage', torch.FloatStorage, KEY, 'cpu', numel) + offset, size, stride
//   PREFIX/data/KEY     one storage: numel x element size bytes, little-endian, 64-byte aligned
//   PREFIX/version      "3\n" (serialization version; not read)
//   PREFIX/byteorder    "little" or "big" (torch >= 2.1; absent = little; "big" is refused)
//   (other entries, e.g. .data/serialization_id, are ignored)
//
// data.pkl is parsed completely (every global checked against the allow-list) before any tensor data
// is read. Tensors are strided views of storages: several tensors may share one storage; a view that
// is not row-major (e.g. a transposed matrix saved as is) is gathered on read.
//
// The legacy format (torch < 1.6, or _use_new_zipfile_serialization=False) is a bare pickle stream
// starting with the pickled magic number 0x1950a86a20f9469cfc6c; it is detected and refused.
#pragma once

#include <cstddef>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "taskvec/safetensors.hpp"
#include "taskvec/tensor_source.hpp"

namespace taskvec::format_detail {

/// Bytes a caller should pass to the looks_like_* functions (they also work with fewer).
inline constexpr std::size_t kPytorchSniffBytes = 512;

/// True if `first_bytes` (the start of a file) begin with a zip local header ("PK\3\4").
bool looks_like_zip(std::span<const std::byte> first_bytes) noexcept;
/// True if `first_bytes` begin with a zip local header whose entry is named PREFIX/data.pkl: the
/// entry torch.save writes first. (A zip whose data.pkl is not first is found by open_pytorch_file.)
bool looks_like_pytorch_zip(std::span<const std::byte> first_bytes) noexcept;
/// True if `first_bytes` begin with the legacy torch.save magic: PROTO 2, LONG1 0x1950a86a20f9469cfc6c.
bool looks_like_legacy_pytorch(std::span<const std::byte> first_bytes) noexcept;

/// One opened, validated PyTorch checkpoint file.
struct PytorchFile {
  std::filesystem::path path;
  std::string archive_prefix;            ///< the top folder of every entry, e.g. "archive"
  /// Sorted by name. dtype from the storage class (FloatStorage F32, HalfStorage F16, BFloat16Storage
  /// BF16, DoubleStorage F64, LongStorage I64, IntStorage I32, ShortStorage I16, CharStorage I8,
  /// ByteStorage U8, BoolStorage BOOL). data_begin / data_end are offsets in a virtual buffer in which
  /// the tensors tile in name order (as in a safetensors data buffer), not file offsets:
  /// data_end - data_begin = num_elements x dtype size. Only `source` interprets them.
  std::vector<TensorInfo> tensors;
  /// Serves every tensor of `tensors` (and copies of their TensorInfo under other names): format()
  /// "pytorch"; read() copies the row-major bytes with pread, gathering strided views.
  std::shared_ptr<const TensorSource> source;
  std::string nested_key;                ///< "" or the top-level key holding the state dict ("state_dict", "model", "module")
  std::vector<std::string> notes;        ///< one sentence each: the nested key used, non-tensor entries skipped

  /// The tensor named `name`, or nullptr. O(log n).
  const TensorInfo* find(std::string_view name) const noexcept;
};

/// Opens and validates a PyTorch zip checkpoint; reads its directory and data.pkl, no tensor data.
/// Throws Error{kIo} when the file cannot be opened or read; Error{kUnsupported} for the legacy
/// (pre-1.6) format, with the command that converts it, and for a big-endian archive;
/// Error{kInvalidArchive} for a file that is not a zip, what read_zip_directory refuses, no or two
/// PREFIX/data.pkl entries, a storage entry that is missing (naming tensor and entry);
/// Error{kInvalidPickle} for a data.pkl over kMaxPickleBytes, what parse_torch_pickle refuses, a
/// storage entry whose size is not numel x element size, a view that does not fit in its storage
/// (storage_offset + the largest index >= numel), a tensor over 2^53 bytes (each naming the tensor);
/// and kUnsafePickle / kUnsupported / kInvalidName from parse_torch_pickle.
PytorchFile open_pytorch_file(const std::filesystem::path& path);

}  // namespace taskvec::format_detail
