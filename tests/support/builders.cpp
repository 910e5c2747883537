#include "support/builders.hpp"

#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "taskvec/safetensors.hpp"

namespace taskvec::test {

std::string RawSafetensors::bytes() const { return make_safetensors_bytes(header, data, header_size); }

std::string make_safetensors_bytes(std::string_view header_json, std::string_view data,
                                   std::optional<std::uint64_t> header_size) {
  const std::uint64_t n = header_size.value_or(header_json.size());
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  out.append(header_json);
  out.append(data);
  return out;
}

std::filesystem::path write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) throw std::runtime_error("cannot write " + path.string());
  return path;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<std::byte> encode_values(const FloatTensor& t) {
  std::vector<std::byte> out;
  switch (t.dtype) {
    case DType::kF32:
      out.resize(t.values.size() * 4);
      if (!t.values.empty()) std::memcpy(out.data(), t.values.data(), out.size());
      break;
    case DType::kF64: {
      out.resize(t.values.size() * 8);
      for (std::size_t i = 0; i < t.values.size(); ++i) {
        const double d = t.values[i];
        std::memcpy(out.data() + 8 * i, &d, 8);
      }
      break;
    }
    default:
      out.resize(t.values.size() * dtype_bits(t.dtype) / 8);
      encode_from_f32(t.dtype, t.values.data(), out.data(), t.values.size());
      break;
  }
  return out;
}

std::filesystem::path write_float_safetensors(const std::filesystem::path& path, const std::vector<FloatTensor>& tensors,
                                              const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<TensorSpec, std::vector<std::byte>>> parts;
  for (const auto& t : tensors) {
    TensorSpec spec{t.name, t.dtype, t.shape};
    std::uint64_t elements = 1;
    for (const auto d : t.shape) elements *= d;
    if (elements != t.values.size()) {
      throw std::runtime_error("write_float_safetensors: tensor '" + t.name + "' has " +
                               std::to_string(t.values.size()) + " values for " + std::to_string(elements) + " elements");
    }
    parts.emplace_back(std::move(spec), encode_values(t));
  }
  write_safetensors(path, parts, metadata);
  return path;
}

std::filesystem::path write_f32_tensor(const std::filesystem::path& path, const std::string& name,
                                       const std::vector<std::uint64_t>& shape, const std::vector<float>& values) {
  return write_float_safetensors(path, {FloatTensor{name, DType::kF32, shape, values}});
}

}  // namespace taskvec::test
