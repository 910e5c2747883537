// Fuzz target: the sharded-checkpoint index parser. Each input is written as
// model.safetensors.index.json into a scratch folder that also holds two small valid shards (one in a
// sub-folder) and a file outside the folder; Checkpoint::open then parses the index, resolves and
// contains the shard paths and cross-checks the shard headers. There is no pure index-parsing
// function (checkpoint.cpp parses and resolves in one go), so the file system is part of the target.
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "fuzz_common.hpp"
#include "taskvec/checkpoint.hpp"

namespace {

namespace fs = std::filesystem;

fs::path g_root;    // scratch root, removed at exit
fs::path g_folder;  // g_root/model: the checkpoint folder

void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A valid one-tensor F32 safetensors file, built by hand so the harness does not depend on the writer.
std::string tiny_shard(const std::string& tensor) {
  const std::string header = "{\"" + tensor + "\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  return out + header + std::string(8, '\x01');
}

void remove_scratch() {
  std::error_code ec;
  if (!g_root.empty()) fs::remove_all(g_root, ec);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* /*argc*/, char*** /*argv*/) {
  const char* tmp = std::getenv("TMPDIR");
  std::string templ = std::string(tmp && *tmp ? tmp : "/tmp") + "/taskvec-fuzz-index-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) std::abort();
  g_root = templ;
  g_folder = g_root / "model";
  fs::create_directories(g_folder / "sub");
  write_bytes(g_folder / "model-00001-of-00002.safetensors", tiny_shard("a.weight"));
  write_bytes(g_folder / "model-00002-of-00002.safetensors", tiny_shard("b.weight"));
  write_bytes(g_folder / "sub" / "model.safetensors", tiny_shard("c.weight"));
  write_bytes(g_root / "outside.safetensors", tiny_shard("x.weight"));  // must never be opened
  std::atexit(remove_scratch);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace taskvec;
  write_bytes(g_folder / kIndexFileName, std::string(reinterpret_cast<const char*>(data), size));
  fuzz::expect_only_taskvec_errors([&] {
    const Checkpoint ck = Checkpoint::open(g_folder);
    // Whatever parsed must be confined to the folder and agree with itself.
    const fs::path root = fs::canonical(g_folder);
    for (const auto& file : ck.files()) {
      const fs::path p = fs::canonical(file);
      fuzz::check(p.string().rfind(root.string() + "/", 0) == 0, "every shard lies inside the checkpoint folder");
    }
    for (const auto& name : ck.tensor_names()) fuzz::check(ck.find(name) != nullptr, "every listed tensor is found");
    (void)ck.fingerprint();
  });
  return 0;
}
