// taskvec: safetensors files: the validating header parser, read-only mapped files, and the writer.
//
// File layout (https://github.com/huggingface/safetensors, README "Format"):
//
//   offset 0        8                 8+N                                    file size
//          +--------+-----------------+--------------------------------------+
//          | N: u64 | header: N bytes | data buffer: tensors, tiled exactly   |
//          |  (LE)  | UTF-8 JSON obj, | by data_offsets [begin, end) relative |
//          |        | space padded    | to byte 8+N; no gaps, no trailing     |
//          +--------+-----------------+--------------------------------------+
//
//   header = { "__metadata__": {"k": "v", ...},                      (optional, string -> string)
//              "name": {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ... }
//
// Every rule of the format (docs/FORMATS.md, B1-B25) is enforced on read; docs/FORMATS.md lists them
// with the ErrorCode each one raises.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "taskvec/dtype.hpp"

namespace taskvec {

/// `text` with every control byte (< 0x20, 0x7F; NUL, ESC included) written as \xHH (the rest unchanged),
/// so untrusted names and metadata cannot drive a terminal when printed. Never throws but bad_alloc.
std::string escape_control(std::string_view text);


/// Largest header length N accepted on read and produced on write, in bytes (B2).
inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;
/// Longest tensor name accepted, in bytes (Error{kInvalidName} beyond; real names are < 200 bytes).
inline constexpr std::size_t kMaxTensorNameLength = 1024;

/// One tensor entry of a safetensors header. Offsets are relative to the data buffer (byte 8+N).
struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::uint64_t> shape;  ///< row-major; empty = scalar (1 element)
  std::uint64_t data_begin = 0;      ///< bytes, relative to the data buffer
  std::uint64_t data_end = 0;        ///< bytes, exclusive

  std::uint64_t num_elements() const noexcept;  ///< product of shape (1 for a scalar); validated not to overflow
  std::uint64_t num_bytes() const noexcept { return data_end - data_begin; }
};

/// The parsed, validated header of one safetensors file.
struct SafetensorsHeader {
  std::vector<TensorInfo> tensors;               ///< sorted by name
  std::map<std::string, std::string> metadata;   ///< __metadata__ (empty if absent)
  std::uint64_t header_size = 0;                 ///< N, bytes
  std::vector<std::string> warnings;             ///< lenient-read notes (e.g. unknown fields in an entry, B8)
  std::uint64_t data_start() const noexcept { return 8 + header_size; }  ///< absolute file offset of the data buffer
  /// The entry named `name`, or nullptr. O(log n).
  const TensorInfo* find(std::string_view name) const noexcept;
};

/// Parses and validates a safetensors header. `file_prefix` holds at least the first
/// min(file_size, 8 + N) bytes of the file; `file_size` is the whole file's size in bytes; `label`
/// (usually the path) starts every error message. Enforces B1-B18, B22, B23, B25 in the reference's
/// order and throws Error with the matching ErrorCode (kHeaderTooSmall ... kIncompleteBuffer).
/// Pure function on bytes: the fuzz target and the corruption catalogue call it directly.
SafetensorsHeader parse_safetensors_header(std::span<const std::byte> file_prefix, std::uint64_t file_size,
                                           const std::string& label);

/// A read-only memory map of a whole file. Never writes to the file. Move-only.
class MappedFile {
 public:
  /// Maps `path` read-only (MAP_PRIVATE, PROT_READ). Throws Error{kIo} naming the path.
  static MappedFile open(const std::filesystem::path& path);
  MappedFile() = default;
  MappedFile(MappedFile&&) noexcept;
  MappedFile& operator=(MappedFile&&) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  std::span<const std::byte> bytes() const noexcept { return {data_, size_}; }
  std::uint64_t size() const noexcept { return size_; }
  const std::filesystem::path& path() const noexcept { return path_; }
  /// Hints the kernel that [offset, offset+length) will be read soon (MADV_WILLNEED). Never throws.
  void advise_willneed(std::uint64_t offset, std::uint64_t length) const noexcept;
  /// Releases the pages of [offset, offset+length) from this process (MADV_DONTNEED); the page cache
  /// keeps them. Used after a chunk is consumed so resident memory stays bounded. Never throws.
  void advise_dontneed(std::uint64_t offset, std::uint64_t length) const noexcept;
  /// Copies bytes [offset, offset + dst.size()) of the file into `dst` with pread(2), not through the
  /// mapping: no page faults, no pages mapped into this process. Thread-safe. Throws Error{kIo} naming
  /// the path on a read error or when the range ends past the file (e.g. it shrank after opening).
  void read_at(std::uint64_t offset, std::span<std::byte> dst) const;

 private:
  const std::byte* data_ = nullptr;
  std::uint64_t size_ = 0;
  int fd_ = -1;
  std::filesystem::path path_;
};

/// One opened, validated safetensors file: its header plus a read-only mapping of its bytes.
class SafetensorsFile {
 public:
  /// Opens, maps and validates `path` (all rules of parse_safetensors_header). Throws Error.
  static std::shared_ptr<const SafetensorsFile> open(const std::filesystem::path& path);

  const SafetensorsHeader& header() const noexcept { return header_; }
  const std::filesystem::path& path() const noexcept { return file_.path(); }
  const MappedFile& mapped() const noexcept { return file_; }
  /// The bytes of one tensor of this file (little-endian, row-major); valid while this object lives.
  std::span<const std::byte> tensor_bytes(const TensorInfo& info) const noexcept;
  /// Absolute file offset of a tensor's first byte.
  std::uint64_t tensor_file_offset(const TensorInfo& info) const noexcept { return header_.data_start() + info.data_begin; }

  SafetensorsFile(MappedFile file, SafetensorsHeader header) : file_(std::move(file)), header_(std::move(header)) {}

 private:
  MappedFile file_;
  SafetensorsHeader header_;
};

/// What the writer needs to know of one output tensor before any data exists.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::uint64_t> shape;
  /// elements x dtype size; throws Error{kShapeOverflow}, or Error{kTensorSizeMismatch} when a
  /// sub-byte dtype (F4, F6_*) does not fill whole bytes (B15).
  std::uint64_t num_bytes() const;
};

/// The byte layout of a safetensors file computed from specs alone (so data can be written at
/// precomputed offsets by several threads). Deterministic: as the reference writer does (B20), data
/// is ordered by descending element size, then name, so each tensor starts aligned to its element
/// size; the header JSON has sorted keys and no insignificant whitespace and is padded with spaces
/// so that N % 8 == 0.
struct SafetensorsLayout {
  std::string header_bytes;                      ///< the 8-byte N followed by the padded JSON
  std::vector<TensorSpec> tensors;               ///< in data order (descending element size, then name)
  std::vector<std::uint64_t> file_offsets;       ///< absolute file offset of each tensor in `tensors`
  std::uint64_t file_size = 0;                   ///< bytes

  /// Builds the layout. Throws Error{kInvalidName} for an empty/NUL/control-character/duplicate name
  /// or "__metadata__", Error{kHeaderTooLarge} past kMaxHeaderSize, Error{kShapeOverflow} (also when
  /// the data would end past 2^53 bytes), Error{kInvalidMetadata} for metadata that is not UTF-8.
  /// The header JSON has no "__metadata__" key when `metadata` is empty.
  static SafetensorsLayout build(std::vector<TensorSpec> specs, const std::map<std::string, std::string>& metadata);
  /// Index into `tensors` of `name`; throws Error{kTensorMissing}.
  std::size_t index_of(std::string_view name) const;
};

/// An output file written in place at precomputed offsets and published atomically: data goes to a
/// temp file ".NAME.tmp-XXXXXX" in the same folder; commit() fsyncs it, renames it onto `path` and
/// fsyncs the folder. Destroying an uncommitted AtomicFile removes the temp file. write_at() is
/// thread-safe (pwrite). ENOSPC/EFBIG raise Error{kDiskFull}; other failures Error{kIo}.
/// Installs handlers for SIGINT, SIGTERM and SIGHUP that remove the temp file of every AtomicFile not yet
/// committed (unlink, async-signal-safe), then end the process as the signal would have (default action
/// re-raised). For programs: the taskvec CLI calls it first thing. SIGKILL cannot be caught: after it a
/// hidden temp file may stay (docs/SECURITY.md).
void install_interrupt_cleanup() noexcept;
/// Makes the handlers of install_interrupt_cleanup also remove `folder` and everything in it (with
/// async-signal-safe calls only; symlinks inside are removed, never followed), e.g. a command's
/// temporary folder of candidate outputs. Returns a slot for release_interrupt_folder, or -1 when the 16
/// slots are taken (the folder is then not removed on a signal).
int register_interrupt_folder(const std::filesystem::path& folder) noexcept;
/// Stops removing the folder of `slot` on a signal (call it before removing or keeping the folder).
void release_interrupt_folder(int slot) noexcept;

class AtomicFile {
 public:
  /// Creates the temp file and reserves `size` bytes (posix_fallocate, so a full disk fails early; on
  /// tmpfs, where fallocate would zero every page, a free-space check and ftruncate instead).
  AtomicFile(std::filesystem::path path, std::uint64_t size);
  AtomicFile(AtomicFile&&) noexcept;
  AtomicFile& operator=(AtomicFile&&) = delete;
  AtomicFile(const AtomicFile&) = delete;
  ~AtomicFile();

  /// pwrite of `bytes` at `offset`. Every kWritebackBytes written, starts the write-back of the file's
  /// dirty pages (sync_file_range, SYNC_FILE_RANGE_WRITE: no wait) so the disk writes during the
  /// stream and the fsync of commit() finds little left to do.
  void write_at(std::uint64_t offset, std::span<const std::byte> bytes) const;
  /// fsyncs the temp file (the slow, fallible half of commit(); nothing is published yet).
  void sync();
  /// sync() if not done yet, then renames the temp file onto path() and fsyncs the folder.
  void commit();
  static constexpr std::uint64_t kWritebackBytes = std::uint64_t{32} << 20;
  const std::filesystem::path& path() const noexcept { return path_; }
  const std::filesystem::path& temp_path() const noexcept { return temp_path_; }

 private:
  std::filesystem::path path_;
  std::filesystem::path temp_path_;
  int fd_ = -1;
  int slot_ = -1;  // in the table install_interrupt_cleanup() empties on SIGINT / SIGTERM / SIGHUP
  bool committed_ = false;
  bool synced_ = false;
  mutable std::atomic<std::uint64_t> unsynced_{0};  // bytes written since the last write-back start
};

/// Writes one safetensors file: header at construction, tensor data by write_tensor(), then commit().
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::filesystem::path path, SafetensorsLayout layout);
  const SafetensorsLayout& layout() const noexcept { return layout_; }
  /// Writes `bytes` at byte `offset_in_tensor` of tensor number `index` (of layout().tensors).
  /// Thread-safe. Throws Error{kInternal} if the write would leave the tensor's span.
  void write_tensor(std::size_t index, std::uint64_t offset_in_tensor, std::span<const std::byte> bytes) const;
  void sync() { file_.sync(); }
  void commit() { file_.commit(); }

 private:
  SafetensorsLayout layout_;
  AtomicFile file_;
};

/// Convenience for tests and small tools: writes whole tensors given as (spec, bytes) to `path`
/// atomically. Throws as SafetensorsLayout::build and AtomicFile.
void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<TensorSpec, std::vector<std::byte>>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace taskvec
