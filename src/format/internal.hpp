// taskvec format layer: helpers shared by the format sources (not a public header).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "taskvec/error.hpp"
#include "taskvec/tensor_source.hpp"

namespace taskvec::format_detail {

/// Largest integer accepted in a shape or data_offsets entry (2^53: exact in every JSON parser).
inline constexpr std::uint64_t kMaxJsonInteger = std::uint64_t{1} << 53;

/// True if `bytes` is well-formed UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF).
bool is_valid_utf8(std::string_view bytes) noexcept;

/// Why a name cannot be a tensor name (empty, NUL, control character, invalid UTF-8), or empty.
std::string name_problem(std::string_view name);

/// Parses JSON text, rejecting duplicate keys in any object. On a duplicate key throws
/// Error{duplicate_code}, on any other syntax error Error{syntax_code}; messages start with `label`.
nlohmann::json parse_json_strict(std::string_view text, const std::string& label, ErrorCode syntax_code,
                                 ErrorCode duplicate_code);

/// Renders a string for a message: quoted, with control bytes escaped.
std::string quote_name(std::string_view text);

/// "[a, b, c]".
std::string format_dims(const std::vector<std::uint64_t>& dims);

/// strerror_r as a std::string.
std::string errno_text(int err);

/// a == b as files: equivalent() when both exist, else equal weakly_canonical paths. Never throws.
bool same_path(const std::filesystem::path& a, const std::filesystem::path& b) noexcept;

/// True if `inner` is `folder` or lies below it, comparing path components (both already canonical).
bool path_inside(const std::filesystem::path& folder, const std::filesystem::path& inner) noexcept;

/// Reads a small file of a checkpoint folder (an index, config.json, ...) with one set of checks, all
/// made before any byte is read: the path resolves (symlinks followed) inside `folder`, else
/// Error{kShardEscapes}; it is opened O_NONBLOCK (a FIFO never blocks) and must be a regular file,
/// else Error{kIo}; its size must be <= `max_bytes`, else Error{too_large_code}. Reads at most
/// max_bytes + 1 bytes, so a file growing meanwhile is refused too.
std::string read_folder_file(const std::filesystem::path& folder, const std::filesystem::path& path,
                             std::uint64_t max_bytes, ErrorCode too_large_code);

/// Checks that `path` resolves (symlink chains followed by hand, dangling ones too) inside `folder`;
/// throws Error{kShardEscapes} naming `what` otherwise. Returns the resolved path.
std::filesystem::path resolve_inside(const std::filesystem::path& folder, const std::filesystem::path& path,
                                     const std::string& what);

/// A TensorSource over one opened safetensors file: read() is one pread (MappedFile::read_at) at the
/// tensor's offset. Throws Error{kInvalidArgument} for a range outside the tensor, Error{kIo} on a
/// failed read.
class SafetensorsFileSource final : public TensorSource {
 public:
  explicit SafetensorsFileSource(std::shared_ptr<const SafetensorsFile> file) : file_(std::move(file)) {}
  const std::filesystem::path& path() const noexcept override { return file_->path(); }
  std::string_view format() const noexcept override { return "safetensors"; }
  void read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const override;
  const SafetensorsFile& file() const noexcept { return *file_; }

 private:
  std::shared_ptr<const SafetensorsFile> file_;
};

/// One opened tensor file of any format, as Checkpoint::open assembles them: its source (which owns
/// the TensorInfos), its tensors sorted by name, its metadata (safetensors __metadata__) and notes for
/// the user (Checkpoint::notes).
struct TensorFile {
  std::shared_ptr<const TensorSource> source;
  std::vector<const TensorInfo*> tensors;
  std::map<std::string, std::string> metadata;
  std::vector<std::string> notes;
};

}  // namespace taskvec::format_detail
