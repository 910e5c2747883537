// taskvec tests: builders for safetensors files, valid and deliberately corrupt, made in code.
//
// Raw files are assembled from parts, so a test can break exactly one rule:
//
//   make_safetensors_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", bytes_of(1.0f))
//     -> 8-byte little-endian N = size of the JSON text, the JSON text, then the data bytes.
//   RawSafetensors{.header = "{}", .header_size = 100}  -> N claims 100 bytes that are not there.
//
// Valid files from float values (encoded to the tensor's dtype) come from write_float_safetensors,
// which goes through the real writer (taskvec::write_safetensors).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "taskvec/dtype.hpp"

namespace taskvec::test {

/// The parts of a raw safetensors file; bytes() concatenates them.
struct RawSafetensors {
  std::string header;                          ///< header text, written as is (no padding added)
  std::optional<std::uint64_t> header_size;    ///< N to write; default header.size()
  std::string data;                            ///< data buffer bytes, written as is
  std::string bytes() const;                   ///< u64 LE N + header + data
};

/// u64 LE N (default: header_json.size()) + header_json + data.
std::string make_safetensors_bytes(std::string_view header_json, std::string_view data = {},
                                   std::optional<std::uint64_t> header_size = std::nullopt);

/// Writes `bytes` to `path` (creating or truncating it) and returns `path`. Throws std::runtime_error.
std::filesystem::path write_file(const std::filesystem::path& path, std::string_view bytes);

/// Reads a whole file as bytes. Throws std::runtime_error.
std::string read_file(const std::filesystem::path& path);

/// The little-endian bytes of values of a trivially copyable type, e.g. bytes_of<float>({1, 2}).
template <typename T>
std::string bytes_of(const std::vector<T>& values) {
  return std::string(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
}

/// A tensor given by float values, encoded to `dtype` when written (F32 and F64 directly, other
/// editable dtypes with taskvec::encode_from_f32). values.size() must equal the shape's element count.
struct FloatTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::uint64_t> shape;
  std::vector<float> values;
};

/// The encoded little-endian bytes of t.values in t.dtype.
std::vector<std::byte> encode_values(const FloatTensor& t);

/// Writes a valid safetensors file of `tensors` (through taskvec::write_safetensors) and returns `path`.
std::filesystem::path write_float_safetensors(const std::filesystem::path& path, const std::vector<FloatTensor>& tensors,
                                              const std::map<std::string, std::string>& metadata = {});

/// Shorthand for a one-tensor F32 file: write_float_safetensors(path, {{name, kF32, shape, values}}).
std::filesystem::path write_f32_tensor(const std::filesystem::path& path, const std::string& name,
                                       const std::vector<std::uint64_t>& shape, const std::vector<float>& values);

}  // namespace taskvec::test
