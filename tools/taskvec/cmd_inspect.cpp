// taskvec inspect CKPT [--json]: tensors, dtypes, shapes, parameter count, bytes, metadata.
#include <map>
#include <nlohmann/json.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cli.hpp"

namespace taskvec::cli {

void add_inspect_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("inspect", "List tensors, dtypes, shapes, parameter count, bytes and metadata");
  auto path = std::make_shared<std::string>();
  auto summary_only = std::make_shared<bool>(false);
  cmd->add_option("checkpoint", *path, "A .safetensors file, an index .json, or a Hugging Face folder")->required();
  cmd->add_flag("--summary", *summary_only, "Totals only, no tensor list");
  cmd->callback([&global, &action, path, summary_only] {
    action = [&global, path, summary_only] {
      Checkpoint ckpt = Checkpoint::open(*path);
      std::map<std::string, std::pair<std::uint64_t, std::uint64_t>> by_dtype;  // dtype -> (elements, bytes)
      for (const auto& name : ckpt.tensor_names()) {
        const TensorInfo& info = *ckpt.at(name).info;
        auto& entry = by_dtype[std::string(dtype_name(info.dtype))];
        entry.first += info.num_elements();
        entry.second += info.num_bytes();
      }
      if (global.json) {
        nlohmann::ordered_json j;
        j["path"] = *path;
        j["format"] = ckpt.format();
        j["shards"] = nlohmann::json::array();
        for (const auto& file : ckpt.files()) j["shards"].push_back(file.string());
        j["tensor_count"] = ckpt.tensor_names().size();
        j["parameters"] = ckpt.total_elements();
        j["bytes"] = ckpt.total_bytes();
        j["dtypes"] = nlohmann::ordered_json::object();
        for (const auto& [dtype, e] : by_dtype) j["dtypes"][dtype] = {{"parameters", e.first}, {"bytes", e.second}};
        j["metadata"] = ckpt.metadata();
        j["fingerprint"] = ckpt.fingerprint();
        j["notes"] = ckpt.notes();
        if (!*summary_only) {
          auto tensors = nlohmann::ordered_json::array();
          for (const auto& name : ckpt.tensor_names()) {
            const CheckpointTensor& t = ckpt.at(name);
            tensors.push_back({{"name", name},
                               {"dtype", std::string(dtype_name(t.info->dtype))},
                               {"shape", t.info->shape},
                               {"parameters", t.info->num_elements()},
                               {"bytes", t.info->num_bytes()},
                               {"shard", t.file().filename().string()}});
          }
          j["tensors"] = std::move(tensors);
        }
        fmt::print("{}\n", j.dump(2));
        return 0;
      }
      fmt::print("{}: {} tensors, {} parameters, {} bytes in {} shard(s) ({})\n", *path, ckpt.tensor_names().size(),
                 ckpt.total_elements(), ckpt.total_bytes(), ckpt.files().size(), ckpt.format());
      for (const auto& [dtype, e] : by_dtype) fmt::print("  {:<8} {:>14} parameters {:>16} bytes\n", dtype, e.first, e.second);
      // Untrusted text: control bytes (ESC, NUL, ...) are escaped so they never reach the terminal.
      for (const auto& [k, v] : ckpt.metadata()) {
        fmt::print("  metadata {} = {}\n", escape_control(k), v.size() > 80 ? fmt::format("{}...", escape_control(v.substr(0, 77))) : escape_control(v));
      }
      for (const auto& note : ckpt.notes()) fmt::print(stderr, "taskvec: warning: {}\n", escape_control(note));
      fmt::print("  fingerprint {}\n", ckpt.fingerprint());
      if (!*summary_only) {
        fmt::print("\n  {:<56} {:<8} {:<22} {:>14}\n", "tensor", "dtype", "shape", "parameters");
        for (const auto& name : ckpt.tensor_names()) {
          const TensorInfo& info = *ckpt.at(name).info;
          fmt::print("  {:<56} {:<8} {:<22} {:>14}\n", escape_control(name), dtype_name(info.dtype), fmt::format("[{}]", fmt::join(info.shape, ", ")),
                     info.num_elements());
        }
      }
      return 0;
    };
  });
}

}  // namespace taskvec::cli
