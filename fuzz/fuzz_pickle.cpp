// Fuzz target: the PyTorch readers on arbitrary bytes. Input starting with "PK\3\4" is read as a
// zip archive (read_zip_directory over the bytes); anything else is data.pkl (parse_torch_pickle).
// Both may only fail with taskvec::Error; what they accept must hold together: zip entries lie inside
// the bytes, before the central directory, without overlap; pickle records have shape and stride of
// one rank and names that are valid tensor names.
#include <algorithm>
#include <cstring>
#include <span>

#include "format/torch_pickle.hpp"
#include "format/zip_archive.hpp"
#include "fuzz_common.hpp"
#include "taskvec/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace taskvec;
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  fuzz::expect_only_taskvec_errors([&] {
    if (size >= 4 && std::memcmp(data, "PK\x03\x04", 4) == 0) {
      const auto dir = format_detail::read_zip_directory(
          size,
          [&](std::uint64_t offset, std::span<std::byte> dst) {
            fuzz::check(offset <= size && dst.size() <= size - offset, "zip reads stay inside the file");
            std::memcpy(dst.data(), data + offset, dst.size());
          },
          "fuzz.pt");
      for (const auto& e : dir.entries) {
        fuzz::check(e.data_offset <= dir.central_directory_offset && e.size <= dir.central_directory_offset - e.data_offset,
                    "entry data before the central directory");
        fuzz::check(e.local_header_offset < e.data_offset, "local header before the data");
        fuzz::check(dir.find(e.name) == &e, "names are unique and indexed");
      }
      return;
    }
    const auto sd = format_detail::parse_torch_pickle(bytes, "fuzz.pkl");
    for (const auto& t : sd.tensors) {
      fuzz::check(t.shape.size() == t.stride.size(), "shape and stride have one rank");
      fuzz::check(!t.name.empty() && !t.storage_key.empty(), "names are not empty");
      fuzz::check(t.storage_key.find('/') == std::string::npos, "storage keys are plain entry names");
    }
  });
  return 0;
}
