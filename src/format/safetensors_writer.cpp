// Deterministic safetensors layouts and the writer (B20, B24).
#include <algorithm>
#include <set>
#include <string>

#include "format/internal.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {

using format_detail::format_dims;
using format_detail::quote_name;

std::uint64_t TensorSpec::num_bytes() const {
  std::uint64_t elements = 1;
  for (const std::uint64_t d : shape) {
    if (__builtin_mul_overflow(elements, d, &elements)) {
      throw Error(ErrorCode::kShapeOverflow, "tensor " + quote_name(name) + ": shape " + format_dims(shape) + " overflows 64 bits");
    }
  }
  std::uint64_t bits = 0;
  if (__builtin_mul_overflow(elements, std::uint64_t{dtype_bits(dtype)}, &bits)) {
    throw Error(ErrorCode::kShapeOverflow, "tensor " + quote_name(name) + ": shape " + format_dims(shape) + " x " +
                                               std::string(dtype_name(dtype)) + " overflows 64 bits");
  }
  if (bits % 8 != 0) {
    throw Error(ErrorCode::kTensorSizeMismatch, "tensor " + quote_name(name) + ": shape " + format_dims(shape) + " x " +
                                                    std::string(dtype_name(dtype)) + " is not a whole number of bytes");
  }
  return bits / 8;
}

namespace {

// Data order of the reference writer (B20): larger elements first, then by name.
bool data_order(const TensorSpec& a, const TensorSpec& b) {
  const unsigned ba = dtype_bits(a.dtype);
  const unsigned bb = dtype_bits(b.dtype);
  if (ba != bb) return ba > bb;
  return a.name < b.name;
}

}  // namespace

SafetensorsLayout SafetensorsLayout::build(std::vector<TensorSpec> specs,
                                           const std::map<std::string, std::string>& metadata) {
  std::set<std::string_view> seen;
  for (const auto& s : specs) {
    if (s.name == "__metadata__") {
      throw Error(ErrorCode::kInvalidName, "tensor '__metadata__': the name is reserved for the header's metadata");
    }
    if (const auto problem = format_detail::name_problem(s.name); !problem.empty()) {
      throw Error(ErrorCode::kInvalidName, "tensor " + quote_name(s.name) + ": " + problem);
    }
    if (!seen.insert(s.name).second) {
      throw Error(ErrorCode::kInvalidName, "tensor " + quote_name(s.name) + ": the name occurs twice");
    }
    if (static_cast<std::size_t>(s.dtype) >= kDTypeCount) {
      throw Error(ErrorCode::kInvalidArgument, "tensor " + quote_name(s.name) + ": invalid dtype");
    }
  }
  for (const auto& [k, v] : metadata) {
    if (!format_detail::is_valid_utf8(k) || !format_detail::is_valid_utf8(v)) {
      throw Error(ErrorCode::kInvalidMetadata, "metadata key " + quote_name(k) + ": key or value is not valid UTF-8");
    }
  }
  std::sort(specs.begin(), specs.end(), data_order);

  nlohmann::json header = nlohmann::json::object();  // std::map underneath: keys come out sorted
  if (!metadata.empty()) {
    auto& meta = header["__metadata__"] = nlohmann::json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
  }
  SafetensorsLayout layout;
  std::vector<std::uint64_t> begins;
  begins.reserve(specs.size());
  std::uint64_t offset = 0;
  for (const auto& s : specs) {
    const std::uint64_t bytes = s.num_bytes();
    std::uint64_t end = 0;
    if (__builtin_add_overflow(offset, bytes, &end) || end > format_detail::kMaxJsonInteger) {
      throw Error(ErrorCode::kShapeOverflow, "tensor " + quote_name(s.name) + ": the data would end past 2^53 bytes");
    }
    header[s.name] = {{"dtype", std::string(dtype_name(s.dtype))},
                      {"shape", s.shape},
                      {"data_offsets", {offset, end}}};
    begins.push_back(offset);
    offset = end;
  }
  std::string json_text = header.dump();
  // Pad with spaces so the data buffer starts at a multiple of 8 (B6, B20).
  json_text.append((8 - json_text.size() % 8) % 8, ' ');
  const std::uint64_t n = json_text.size();
  if (n > kMaxHeaderSize) {
    throw Error(ErrorCode::kHeaderTooLarge, "the header would be " + std::to_string(n) + " bytes, over the limit of " +
                                                std::to_string(kMaxHeaderSize));
  }
  layout.header_bytes.reserve(8 + n);
  for (int i = 0; i < 8; ++i) layout.header_bytes.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  layout.header_bytes += json_text;
  layout.file_offsets.reserve(specs.size());
  for (const std::uint64_t b : begins) layout.file_offsets.push_back(8 + n + b);
  layout.file_size = 8 + n + offset;
  layout.tensors = std::move(specs);
  return layout;
}

std::size_t SafetensorsLayout::index_of(std::string_view name) const {
  // `tensors` is sorted by (descending element bits, name): binary search each run of equal bits.
  std::size_t i = 0;
  while (i < tensors.size()) {
    const unsigned bits = dtype_bits(tensors[i].dtype);
    const auto run_end = std::partition_point(tensors.begin() + static_cast<std::ptrdiff_t>(i), tensors.end(),
                                              [bits](const TensorSpec& t) { return dtype_bits(t.dtype) == bits; });
    const auto it = std::lower_bound(tensors.begin() + static_cast<std::ptrdiff_t>(i), run_end, name,
                                     [](const TensorSpec& t, std::string_view n) { return t.name < n; });
    if (it != run_end && it->name == name) return static_cast<std::size_t>(it - tensors.begin());
    i = static_cast<std::size_t>(run_end - tensors.begin());
  }
  throw Error(ErrorCode::kTensorMissing, "no tensor " + quote_name(name) + " in the output layout");
}

SafetensorsWriter::SafetensorsWriter(std::filesystem::path path, SafetensorsLayout layout)
    : layout_(std::move(layout)), file_(std::move(path), layout_.file_size) {
  file_.write_at(0, std::as_bytes(std::span(layout_.header_bytes.data(), layout_.header_bytes.size())));
}

void SafetensorsWriter::write_tensor(std::size_t index, std::uint64_t offset_in_tensor,
                                     std::span<const std::byte> bytes) const {
  if (index >= layout_.tensors.size()) {
    throw Error(ErrorCode::kInternal, file_.path().string() + ": tensor index " + std::to_string(index) + " out of range");
  }
  const std::uint64_t size = layout_.tensors[index].num_bytes();
  std::uint64_t end = 0;
  if (__builtin_add_overflow(offset_in_tensor, std::uint64_t{bytes.size()}, &end) || end > size) {
    throw Error(ErrorCode::kInternal, file_.path().string() + ": tensor " + quote_name(layout_.tensors[index].name) +
                                          ": write of " + std::to_string(bytes.size()) + " bytes at " +
                                          std::to_string(offset_in_tensor) + " leaves its " + std::to_string(size) +
                                          " bytes");
  }
  file_.write_at(layout_.file_offsets[index] + offset_in_tensor, bytes);
}

void write_safetensors(const std::filesystem::path& path,
                       const std::vector<std::pair<TensorSpec, std::vector<std::byte>>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [spec, bytes] : tensors) {
    if (bytes.size() != spec.num_bytes()) {
      throw Error(ErrorCode::kInvalidArgument, path.string() + ": tensor " + quote_name(spec.name) + ": " +
                                                   std::to_string(bytes.size()) + " bytes given, shape " +
                                                   format_dims(spec.shape) + " x " +
                                                   std::string(dtype_name(spec.dtype)) + " needs " +
                                                   std::to_string(spec.num_bytes()));
    }
    specs.push_back(spec);
  }
  SafetensorsWriter writer(path, SafetensorsLayout::build(std::move(specs), metadata));
  for (const auto& [spec, bytes] : tensors) writer.write_tensor(writer.layout().index_of(spec.name), 0, bytes);
  writer.commit();
}

}  // namespace taskvec
