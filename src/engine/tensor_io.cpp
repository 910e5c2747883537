// Reading tensor ranges for the engine: pread into a small staging buffer, then decode (internal.hpp).
#include <algorithm>
#include <cstring>

#include "engine/internal.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec::detail {
namespace {

template <typename T>
void read_decoded_impl(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, T* dst,
                       std::vector<std::byte>& staging) {
  const DType dtype = t.info->dtype;
  const std::uint64_t size = dtype_bits(dtype) / 8;
  const std::uint64_t piece = std::max<std::uint64_t>(1, kReadPieceBytes / size);
  if (count > 0 && staging.size() < std::min(count, piece) * size) staging.resize(std::min(count, piece) * size);
  for (std::uint64_t done = 0; done < count;) {
    const std::uint64_t m = std::min(piece, count - done);
    t.read((begin + done) * size, {staging.data(), m * size});
    if constexpr (std::is_same_v<T, float>) {
      decode_to_f32(dtype, staging.data(), dst + done, m);
    } else {
      decode_to_f64(dtype, staging.data(), dst + done, m);
    }
    done += m;
  }
}

}  // namespace

void read_decoded(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, float* dst,
                  std::vector<std::byte>& staging) {
  read_decoded_impl(t, begin, count, dst, staging);
}

void read_decoded(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count, double* dst,
                  std::vector<std::byte>& staging) {
  read_decoded_impl(t, begin, count, dst, staging);
}

void copy_tensor_bytes(const CheckpointTensor& t, std::uint64_t byte_begin, std::uint64_t byte_count,
                       const CheckpointWriter& writer, std::size_t shard, std::size_t index, std::vector<std::byte>& staging) {
  const std::uint64_t piece = std::min(byte_count, kReadPieceBytes);
  if (staging.size() < piece) staging.resize(piece);
  for (std::uint64_t done = 0; done < byte_count;) {
    const std::uint64_t m = std::min(piece, byte_count - done);
    const std::span<std::byte> bytes(staging.data(), m);
    t.read(byte_begin + done, bytes);
    writer.write(shard, index, byte_begin + done, bytes);
    done += m;
  }
}

bool same_bytes(const CheckpointTensor& a, const CheckpointTensor& b) {
  const std::uint64_t size = a.info->num_bytes();
  if (b.info->num_bytes() != size) return false;
  std::vector<std::byte> x(std::min(size, kReadPieceBytes)), y(x.size());
  for (std::uint64_t done = 0; done < size;) {
    const std::uint64_t m = std::min<std::uint64_t>(x.size(), size - done);
    a.read(done, {x.data(), m});
    b.read(done, {y.data(), m});
    if (std::memcmp(x.data(), y.data(), m) != 0) return false;
    done += m;
  }
  return true;
}

}  // namespace taskvec::detail
