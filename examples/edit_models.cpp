// A small program that uses taskvec as a library: task vectors from two fine-tuned models, then a
// multi-task model by addition and a "forgetting" model by negation (Ilharco et al. 2023, sec. 3-4).
//
//   build/bin/taskvec_example PRETRAINED FINETUNED_A FINETUNED_B OUT_FOLDER
#include <cstdio>
#include <filesystem>

#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s PRETRAINED FINETUNED_A FINETUNED_B OUT_FOLDER\n", argv[0]);
    return 2;
  }
  try {
    namespace fs = std::filesystem;
    const fs::path out = argv[4];
    fs::create_directories(out);
    taskvec::Checkpoint pre = taskvec::Checkpoint::open(argv[1]);
    taskvec::Checkpoint ft_a = taskvec::Checkpoint::open(argv[2]);
    taskvec::Checkpoint ft_b = taskvec::Checkpoint::open(argv[3]);

    taskvec::EditOptions options;  // defaults: all cores, 512 MiB in flight, dtype of the pretrained model
    options.write.force = true;
    taskvec::make_task_vector(pre, ft_a, out / "tau_a.safetensors", options);
    taskvec::make_task_vector(pre, ft_b, out / "tau_b.safetensors", options);
    taskvec::Checkpoint tau_a = taskvec::Checkpoint::open(out / "tau_a.safetensors");
    taskvec::Checkpoint tau_b = taskvec::Checkpoint::open(out / "tau_b.safetensors");

    // Addition: one model for both tasks. Negation: forget task A.
    taskvec::apply_task_vectors(pre, {{&tau_a, 0.5}, {&tau_b, 0.5}}, out / "multitask.safetensors", options);
    auto report = taskvec::apply_task_vectors(pre, {{&tau_a, -1.0}}, out / "forget_a.safetensors", options);
    std::printf("wrote %s: %llu tensors edited in %.3f s\n", (out / "forget_a.safetensors").c_str(),
                static_cast<unsigned long long>(report.tensors_edited), report.seconds);
    return 0;
  } catch (const taskvec::Error& e) {
    std::fprintf(stderr, "error (%s): %s\n", std::string(taskvec::error_code_name(e.code())).c_str(), e.what());
    return taskvec::exit_status(e.code());
  }
}
