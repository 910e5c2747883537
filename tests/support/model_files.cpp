#include "support/model_files.hpp"

#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>

#include "taskvec/checkpoint.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec::test {

namespace {

template <typename I>
void append_ints(std::vector<std::byte>& out, const std::vector<double>& values) {
  for (double v : values) {
    I x = static_cast<I>(v);
    const auto* p = reinterpret_cast<const std::byte*>(&x);
    out.insert(out.end(), p, p + sizeof(I));
  }
}

}  // namespace

void write_model(const std::filesystem::path& path, const std::vector<TensorValues>& tensors,
                 const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<TensorSpec, std::vector<std::byte>>> specs;
  for (const auto& t : tensors) {
    std::vector<std::byte> bytes;
    switch (t.dtype) {
      case DType::kI64: append_ints<std::int64_t>(bytes, t.values); break;
      case DType::kI32: append_ints<std::int32_t>(bytes, t.values); break;
      case DType::kU8:
      case DType::kBool: append_ints<std::uint8_t>(bytes, t.values); break;
      default:
        bytes.resize(t.values.size() * dtype_bits(t.dtype) / 8);
        encode_from_f64(t.dtype, t.values.data(), bytes.data(), t.values.size());
    }
    specs.push_back({TensorSpec{t.name, t.dtype, t.shape}, std::move(bytes)});
  }
  std::filesystem::remove(path);
  write_safetensors(path, specs, metadata);
}

std::vector<std::byte> read_all_bytes(const CheckpointTensor& t) {
  std::vector<std::byte> out(t.info->num_bytes());
  t.read(0, out);
  return out;
}

std::vector<double> read_values(const std::filesystem::path& path, const std::string& name) {
  Checkpoint ckpt = Checkpoint::open(path);
  const CheckpointTensor& t = ckpt.at(name);
  std::uint64_t n = t.info->num_elements();
  std::vector<double> out(n);
  const std::vector<std::byte> bytes = read_all_bytes(t);
  switch (t.info->dtype) {
    case DType::kI64:
      for (std::uint64_t i = 0; i < n; ++i) {
        std::int64_t x;
        std::memcpy(&x, bytes.data() + 8 * i, 8);
        out[i] = static_cast<double>(x);
      }
      break;
    case DType::kI32:
      for (std::uint64_t i = 0; i < n; ++i) {
        std::int32_t x;
        std::memcpy(&x, bytes.data() + 4 * i, 4);
        out[i] = x;
      }
      break;
    case DType::kU8:
    case DType::kBool:
      for (std::uint64_t i = 0; i < n; ++i) out[i] = static_cast<double>(std::to_integer<std::uint8_t>(bytes[i]));
      break;
    default:
      decode_to_f64(t.info->dtype, bytes.data(), out.data(), n);
  }
  return out;
}

std::vector<std::uint8_t> read_tensor_bytes(const std::filesystem::path& path, const std::string& name) {
  Checkpoint ckpt = Checkpoint::open(path);
  const std::vector<std::byte> bytes = read_all_bytes(ckpt.at(name));
  std::vector<std::uint8_t> out(bytes.size());
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  return out;
}

DType read_dtype(const std::filesystem::path& path, const std::string& name) {
  return Checkpoint::open(path).at(name).info->dtype;
}

std::vector<std::uint8_t> file_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace taskvec::test
