// taskvec validate CKPT: every format rule; exit 0 only for a valid checkpoint.
#include <nlohmann/json.hpp>

#include <fmt/format.h>

#include "cli.hpp"
#include "taskvec/error.hpp"

namespace taskvec::cli {

void add_validate_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("validate", "Check every rule of the checkpoint's format (safetensors, PyTorch, PEFT adapter) and index; exit 0 only when valid");
  auto path = std::make_shared<std::string>();
  cmd->add_option("checkpoint", *path, "A .safetensors file, an index .json, or a Hugging Face folder")->required();
  cmd->callback([&global, &action, path] {
    action = [&global, path] {
      try {
        Checkpoint ckpt = Checkpoint::open(*path);
        if (global.json) {
          nlohmann::ordered_json j{{"path", *path}, {"valid", true}, {"tensors", ckpt.tensor_names().size()},
                                   {"format", ckpt.format()}, {"shards", ckpt.files().size()}, {"notes", ckpt.notes()}};
          fmt::print("{}\n", j.dump(2));
        } else if (!global.quiet) {
          for (const auto& note : ckpt.notes()) fmt::print(stderr, "taskvec: warning: {}\n", escape_control(note));
          fmt::print("valid: {} ({} tensors in {} shard(s))\n", *path, ckpt.tensor_names().size(), ckpt.files().size());
        }
        return 0;
      } catch (const Error& e) {
        if (!global.json) throw;
        nlohmann::ordered_json j{{"path", *path}, {"valid", false}, {"error", std::string(error_code_name(e.code()))},
                                 {"message", e.what()}};
        fmt::print("{}\n", j.dump(2));
        return exit_status(e.code());
      }
    };
  });
}

}  // namespace taskvec::cli
