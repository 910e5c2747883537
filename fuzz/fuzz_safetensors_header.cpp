// Fuzz target: parse_safetensors_header on arbitrary bytes taken as a whole file.
// A header that parses must describe tensors that lie inside the file and tile its data buffer.
#include <span>

#include "fuzz_common.hpp"
#include "taskvec/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace taskvec;
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  fuzz::expect_only_taskvec_errors([&] {
    const SafetensorsHeader h = parse_safetensors_header(bytes, size, "fuzz.safetensors");
    fuzz::check(h.data_start() <= size, "data buffer starts inside the file");
    std::uint64_t total = 0;
    for (const TensorInfo& t : h.tensors) {
      fuzz::check(t.data_begin <= t.data_end, "begin <= end");
      fuzz::check(t.data_end <= size - h.data_start(), "tensor inside the data buffer");
      const unsigned __int128 bits = static_cast<unsigned __int128>(t.num_elements()) * dtype_bits(t.dtype);
      fuzz::check(bits == static_cast<unsigned __int128>(t.num_bytes()) * 8, "byte span = elements x dtype size");
      total += t.num_bytes();
    }
    fuzz::check(total == size - h.data_start(), "tensors tile the data buffer exactly");
    // Touch every tensor's bytes the way SafetensorsFile::tensor_bytes does: ASan checks the bounds.
    unsigned sum = 0;
    for (const TensorInfo& t : h.tensors) {
      const auto span = bytes.subspan(static_cast<std::size_t>(h.data_start() + t.data_begin),
                                      static_cast<std::size_t>(t.num_bytes()));
      if (!span.empty()) sum += static_cast<unsigned>(span.front()) + static_cast<unsigned>(span.back());
    }
    (void)sum;
  });
  return 0;
}
