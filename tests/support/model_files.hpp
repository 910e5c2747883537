// Test support: small checkpoints written with taskvec's writer from plain values, and read back.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec::test {

/// One tensor given by value. Float dtypes are encoded with encode_from_f64 (so pick values the dtype
/// represents exactly when a test needs exact bits); integer dtypes take the values cast to integers.
struct TensorValues {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<std::uint64_t> shape;
  std::vector<double> values;
};

/// Writes `tensors` as one safetensors file at `path` (replacing it).
void write_model(const std::filesystem::path& path, const std::vector<TensorValues>& tensors,
                 const std::map<std::string, std::string>& metadata = {});

/// Every byte of tensor `t` (its canonical encoding), read through CheckpointTensor::read.
std::vector<std::byte> read_all_bytes(const CheckpointTensor& t);

/// The values of tensor `name` of the checkpoint at `path` (file or folder), decoded to double
/// (float dtypes exactly; integer dtypes converted).
std::vector<double> read_values(const std::filesystem::path& path, const std::string& name);

/// The raw little-endian bytes of tensor `name`.
std::vector<std::uint8_t> read_tensor_bytes(const std::filesystem::path& path, const std::string& name);

/// The dtype of tensor `name`.
DType read_dtype(const std::filesystem::path& path, const std::string& name);

/// Every byte of a file.
std::vector<std::uint8_t> file_bytes(const std::filesystem::path& path);

/// A file's text; empty when it cannot be read (e.g. a stderr log that was never written).
std::string read_text(const std::filesystem::path& path);

}  // namespace taskvec::test
