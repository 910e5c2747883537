// taskvec: where the bytes of a checkpoint tensor come from. Every format reader (src/format/) and
// every computed tensor (a LoRA product) implements TensorSource; the engine reads through
// CheckpointTensor::read and never knows the format (docs/ARCHITECTURE.md, "Tensor sources").
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>

#include "taskvec/safetensors.hpp"  // TensorInfo

namespace taskvec {

/// A provider of tensor bytes: one file of some format (a safetensors shard, a PyTorch zip, a GGUF
/// file) or a computation over other tensors. A source serves the tensors whose TensorInfo it made;
/// what TensorInfo::data_begin / data_end mean is the source's business (for safetensors, offsets in
/// the data buffer), but data_end - data_begin is always the tensor's size in bytes:
/// num_elements * dtype size.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  /// The input file the bytes are read from: for messages, and so that no output is written over or
  /// inside it. For a computed tensor, the file holding its factors.
  virtual const std::filesystem::path& path() const noexcept = 0;
  /// The format, for inspect and messages: "safetensors", "pytorch", "lora", ...
  virtual std::string_view format() const noexcept = 0;
  /// Copies bytes [byte_offset, byte_offset + dst.size()) of tensor `info`'s canonical encoding into
  /// `dst`: row-major, contiguous, little-endian, elements of info.dtype. The caller has checked that
  /// the range lies inside the tensor. Thread-safe; never maps input pages into the process.
  /// Throws Error{kIo} naming the file when a read fails, or the format's own error when the bytes
  /// turn out to be invalid.
  virtual void read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const = 0;
};

}  // namespace taskvec
