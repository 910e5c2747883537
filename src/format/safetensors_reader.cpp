// The validating safetensors header parser (FORMAT-RULES.md part B) and SafetensorsFile.
#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {

using format_detail::format_dims;
using format_detail::quote_name;

std::uint64_t TensorInfo::num_elements() const noexcept {
  std::uint64_t n = 1;
  for (const std::uint64_t d : shape) {
    if (__builtin_mul_overflow(n, d, &n)) return UINT64_MAX;
  }
  return n;
}

const TensorInfo* SafetensorsHeader::find(std::string_view name) const noexcept {
  const auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                                   [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  if (it == tensors.end() || it->name != name) return nullptr;
  return &*it;
}

namespace {

using nlohmann::json;

[[noreturn]] void fail(ErrorCode code, const std::string& label, const std::string& what) {
  throw Error(code, label + ": " + what);
}

[[noreturn]] void fail_tensor(ErrorCode code, const std::string& label, const std::string& name,
                              const std::string& what) {
  throw Error(code, label + ": tensor " + quote_name(name) + ": " + what);
}

std::string json_type(const json& v) {
  if (v.is_number_unsigned()) return "a non-negative integer";
  if (v.is_number_integer()) return "a negative integer";
  if (v.is_number_float()) return "a non-integer number";
  return std::string("a JSON ") + v.type_name();
}

// Reads a JSON natural number <= 2^53 (B10, B23), or nullopt with `why` set.
std::optional<std::uint64_t> json_natural(const json& v, std::string& why) {
  if (!v.is_number_unsigned()) {
    why = json_type(v) + " (" + v.dump() + ")";
    return std::nullopt;
  }
  const auto x = v.get<std::uint64_t>();
  if (x > format_detail::kMaxJsonInteger) {
    why = std::to_string(x) + " above 2^53";
    return std::nullopt;
  }
  return x;
}

void parse_metadata(const json& value, const std::string& label, SafetensorsHeader& out) {
  if (value.is_object()) {
    // A tensor-shaped entry under the reserved name is a tensor named "__metadata__" (B8), not
    // metadata with odd values: say so rather than complain about value types.
    const bool looks_like_tensor =
        (value.contains("data_offsets") && !value["data_offsets"].is_string()) ||
        (value.contains("shape") && !value["shape"].is_string());
    if (looks_like_tensor) {
      fail(ErrorCode::kInvalidName, label, "'__metadata__' is reserved and cannot name a tensor");
    }
  } else {
    fail(ErrorCode::kInvalidMetadata, label, "__metadata__ is " + json_type(value) + ", not an object");
  }
  for (const auto& [k, v] : value.items()) {
    if (!v.is_string()) {
      fail(ErrorCode::kInvalidMetadata, label,
           "__metadata__ value of " + quote_name(k) + " is " + json_type(v) + ", not a string");
    }
    out.metadata.emplace(k, v.get<std::string>());
  }
}

TensorInfo parse_entry(const std::string& name, const json& value, const std::string& label,
                       std::vector<std::string>& warnings) {
  if (const auto problem = format_detail::name_problem(name); !problem.empty()) {
    fail_tensor(ErrorCode::kInvalidName, label, name, problem);
  }
  if (!value.is_object()) {
    fail_tensor(ErrorCode::kInvalidTensorEntry, label, name, "entry is " + json_type(value) + ", not an object");
  }
  TensorInfo info;
  info.name = name;

  const auto dtype_it = value.find("dtype");
  if (dtype_it == value.end()) fail_tensor(ErrorCode::kInvalidTensorEntry, label, name, "missing \"dtype\"");
  if (!dtype_it->is_string()) {
    fail_tensor(ErrorCode::kInvalidTensorEntry, label, name, "\"dtype\" is " + json_type(*dtype_it) + ", not a string");
  }
  const auto& dtype_text = dtype_it->get_ref<const std::string&>();
  const auto dtype = parse_dtype(dtype_text);
  if (!dtype) fail_tensor(ErrorCode::kUnknownDtype, label, name, "unknown dtype " + quote_name(dtype_text));
  info.dtype = *dtype;

  const auto shape_it = value.find("shape");
  if (shape_it == value.end()) fail_tensor(ErrorCode::kInvalidTensorEntry, label, name, "missing \"shape\"");
  if (!shape_it->is_array()) {
    fail_tensor(ErrorCode::kInvalidTensorEntry, label, name, "\"shape\" is " + json_type(*shape_it) + ", not an array");
  }
  for (std::size_t i = 0; i < shape_it->size(); ++i) {
    std::string why;
    const auto d = json_natural((*shape_it)[i], why);
    if (!d) fail_tensor(ErrorCode::kInvalidShape, label, name, "shape entry " + std::to_string(i) + " is " + why);
    info.shape.push_back(*d);
  }

  const auto off_it = value.find("data_offsets");
  if (off_it == value.end()) fail_tensor(ErrorCode::kInvalidTensorEntry, label, name, "missing \"data_offsets\"");
  if (!off_it->is_array() || off_it->size() != 2) {
    fail_tensor(ErrorCode::kInvalidOffsets, label, name,
                "\"data_offsets\" must be an array [begin, end], got " + off_it->dump());
  }
  std::string why;
  const auto begin = json_natural((*off_it)[0], why);
  if (!begin) fail_tensor(ErrorCode::kInvalidOffsets, label, name, "data_offsets begin is " + why);
  const auto end = json_natural((*off_it)[1], why);
  if (!end) fail_tensor(ErrorCode::kInvalidOffsets, label, name, "data_offsets end is " + why);
  info.data_begin = *begin;
  info.data_end = *end;

  for (const auto& [k, v] : value.items()) {
    if (k != "dtype" && k != "shape" && k != "data_offsets") {
      warnings.push_back(label + ": tensor " + quote_name(name) + ": ignoring unknown field " + quote_name(k));
    }
  }
  return info;
}

// N, the header length: the first 8 bytes of a safetensors file, little-endian (B1).
std::uint64_t header_length(std::span<const std::byte> first8) {
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint64_t>(first8[static_cast<std::size_t>(i)]);
  return n;
}

}  // namespace

SafetensorsHeader parse_safetensors_header(std::span<const std::byte> file_prefix, std::uint64_t file_size,
                                           const std::string& label) {
  // B1: the 8-byte little-endian header length.
  if (file_size < 8) {
    fail(ErrorCode::kHeaderTooSmall, label, "file is " + std::to_string(file_size) + " bytes, shorter than the 8-byte header length");
  }
  if (file_prefix.size() < 8) fail(ErrorCode::kInternal, label, "parse_safetensors_header given fewer than 8 bytes");
  const std::uint64_t n = header_length(file_prefix);
  if (n < 2) {
    fail(ErrorCode::kHeaderTooSmall, label, "header length N = " + std::to_string(n) + " cannot hold a JSON object");
  }
  // B2
  if (n > kMaxHeaderSize) {
    fail(ErrorCode::kHeaderTooLarge, label,
         "header length N = " + std::to_string(n) + " exceeds the limit of " + std::to_string(kMaxHeaderSize) + " bytes");
  }
  // B3 (n is at most 1e8, so 8 + n cannot overflow)
  if (8 + n > file_size) {
    fail(ErrorCode::kInvalidHeaderLength, label,
         "header length N = " + std::to_string(n) + " but the file has only " + std::to_string(file_size) + " bytes");
  }
  if (file_prefix.size() < 8 + n) fail(ErrorCode::kInternal, label, "parse_safetensors_header given a short prefix");
  const std::string_view text(reinterpret_cast<const char*>(file_prefix.data()) + 8, static_cast<std::size_t>(n));

  // B4
  if (!format_detail::is_valid_utf8(text)) fail(ErrorCode::kInvalidUtf8, label, "header is not valid UTF-8");
  // B5, B6 (nlohmann skips leading/trailing JSON whitespace), B18
  const json doc = format_detail::parse_json_strict(text, label, ErrorCode::kInvalidJson, ErrorCode::kDuplicateKey);
  if (!doc.is_object()) fail(ErrorCode::kInvalidJson, label, "header is " + json_type(doc) + ", not a JSON object");

  // B7, B8, B9, B10, B23, B25: typing of every entry.
  SafetensorsHeader header;
  header.header_size = n;
  for (const auto& [key, value] : doc.items()) {
    if (key == "__metadata__") {
      parse_metadata(value, label, header);
    } else {
      header.tensors.push_back(parse_entry(key, value, label, header.warnings));
    }
  }

  // B12-B16: sorted by offsets, the tensors tile the data buffer. Ties sort by end then name, so
  // zero-byte tensors sharing an offset with the next tensor's begin come first and pass.
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(header.tensors.size());
  for (const auto& t : header.tensors) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return std::tie(a->data_begin, a->data_end, a->name) < std::tie(b->data_begin, b->data_end, b->name);
  });
  std::uint64_t expected = 0;
  const std::string* previous = nullptr;
  for (const TensorInfo* t : by_offset) {
    const std::string offsets = fmt::format("[{}, {}]", t->data_begin, t->data_end);
    if (t->data_end < t->data_begin) {
      fail_tensor(ErrorCode::kInvalidOffsets, label, t->name, "data_offsets " + offsets + " end before begin");
    }
    if (t->data_begin != expected) {
      std::string what = "data_offsets " + offsets + (t->data_begin > expected ? " leave a gap: " : " overlap: ");
      what += previous ? "the previous tensor " + quote_name(*previous) + " ends at " + std::to_string(expected)
                       : std::string("the data buffer starts at 0");
      fail_tensor(ErrorCode::kInvalidOffsets, label, t->name, what);
    }
    std::uint64_t elements = 1;
    for (const std::uint64_t d : t->shape) {
      if (__builtin_mul_overflow(elements, d, &elements)) {
        fail_tensor(ErrorCode::kShapeOverflow, label, t->name, "shape " + format_dims(t->shape) + " overflows 64 bits");
      }
    }
    std::uint64_t bits = 0;
    if (__builtin_mul_overflow(elements, std::uint64_t{dtype_bits(t->dtype)}, &bits)) {
      fail_tensor(ErrorCode::kShapeOverflow, label, t->name,
                  "shape " + format_dims(t->shape) + " x " + std::string(dtype_name(t->dtype)) + " overflows 64 bits");
    }
    if (bits % 8 != 0) {
      fail_tensor(ErrorCode::kTensorSizeMismatch, label, t->name,
                  "shape " + format_dims(t->shape) + " x " + std::string(dtype_name(t->dtype)) + " is " +
                      std::to_string(bits) + " bits, not a whole number of bytes");
    }
    if (t->data_end - t->data_begin != bits / 8) {
      fail_tensor(ErrorCode::kTensorSizeMismatch, label, t->name,
                  "data_offsets " + offsets + " but shape " + format_dims(t->shape) + " x " +
                      std::string(dtype_name(t->dtype)) + " needs " + std::to_string(bits / 8) + " bytes");
    }
    expected = t->data_end;
    previous = &t->name;
  }

  // B17: the tensors end exactly where the file ends.
  const std::uint64_t buffer = file_size - 8 - n;
  if (expected != buffer) {
    fail(ErrorCode::kIncompleteBuffer, label,
         expected < buffer ? "the tensors end at data byte " + std::to_string(expected) + " but the data buffer has " +
                                 std::to_string(buffer) + " bytes (trailing bytes)"
                           : "the tensors need " + std::to_string(expected) + " data bytes but the file has only " +
                                 std::to_string(buffer) + " (truncated file?)");
  }

  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  return header;
}

std::shared_ptr<const SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  MappedFile file = MappedFile::open(path);
  // The header is read with pread, not through the mapping: a file that shrinks after it was opened
  // is then a clean kIo error instead of a SIGBUS. At most 8 + kMaxHeaderSize bytes are read.
  std::vector<std::byte> prefix(static_cast<std::size_t>(std::min<std::uint64_t>(file.size(), 8)));
  file.read_at(0, prefix);
  if (const std::uint64_t n = prefix.size() == 8 ? header_length(prefix) : 0; n > 0 && n <= kMaxHeaderSize) {
    prefix.resize(static_cast<std::size_t>(std::min<std::uint64_t>(file.size(), 8 + n)));
    file.read_at(8, std::span(prefix).subspan(8));  // the JSON after the 8 bytes already read
  }
  SafetensorsHeader header = parse_safetensors_header(prefix, file.size(), path.string());
  return std::make_shared<const SafetensorsFile>(std::move(file), std::move(header));
}

std::span<const std::byte> SafetensorsFile::tensor_bytes(const TensorInfo& info) const noexcept {
  return file_.bytes().subspan(static_cast<std::size_t>(header_.data_start() + info.data_begin),
                               static_cast<std::size_t>(info.data_end - info.data_begin));
}

namespace format_detail {

void SafetensorsFileSource::read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const {
  if (byte_offset > info.num_bytes() || dst.size() > info.num_bytes() - byte_offset) {
    throw Error(ErrorCode::kInvalidArgument, file_->path().string() + ": tensor " + quote_name(info.name) +
                                                 ": read past its " + std::to_string(info.num_bytes()) + " bytes");
  }
  file_->mapped().read_at(file_->tensor_file_offset(info) + byte_offset, dst);
}

}  // namespace format_detail

}  // namespace taskvec
