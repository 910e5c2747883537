// A consumer of the taskvec library: writes a pretrained and a fine-tuned checkpoint, makes the task
// vector tau = finetuned - pretrained with the engine, and checks it against the values computed here.
// Usage: consumer FOLDER (written into). Prints "consumer ok" and exits 0 when the values agree.
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace {

std::vector<std::byte> bytes_of(const std::vector<float>& v) {
  std::vector<std::byte> b(v.size() * sizeof(float));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FOLDER\n", argv[0]);
    return 2;
  }
  try {
    const std::filesystem::path dir = argv[1];
    const taskvec::TensorSpec spec{"w", taskvec::DType::kF32, {2, 2}};
    const std::vector<float> pre = {1.0f, 2.0f, 3.0f, 4.0f}, ft = {1.5f, 2.0f, 2.0f, 8.0f};
    taskvec::write_safetensors(dir / "pre.safetensors", {{spec, bytes_of(pre)}});
    taskvec::write_safetensors(dir / "ft.safetensors", {{spec, bytes_of(ft)}});
    const auto p = taskvec::Checkpoint::open(dir / "pre.safetensors");
    const auto f = taskvec::Checkpoint::open(dir / "ft.safetensors");
    taskvec::EditOptions options;
    options.write.force = true;
    taskvec::make_task_vector(p, f, dir / "tau.safetensors", options);
    const auto tau = taskvec::Checkpoint::open(dir / "tau.safetensors");
    const taskvec::CheckpointTensor& t = tau.at("w");
    std::vector<std::byte> raw(t.info->num_bytes());
    t.read(0, raw);
    std::vector<float> got(4);
    taskvec::decode_to_f32(t.info->dtype, raw.data(), got.data(), got.size());
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (got[i] != ft[i] - pre[i]) {
        std::fprintf(stderr, "tau[%zu] = %g, expected %g\n", i, got[i], ft[i] - pre[i]);
        return 1;
      }
    }
    std::printf("consumer ok: tau = [%g, %g, %g, %g]\n", got[0], got[1], got[2], got[3]);
    return 0;
  } catch (const taskvec::Error& e) {
    std::fprintf(stderr, "consumer: %s\n", e.what());
    return 1;
  }
}
