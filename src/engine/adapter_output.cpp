// Writing PEFT LoRA adapter folders: see adapter_output.hpp.
#include "engine/adapter_output.hpp"

#include <climits>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "format/internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec::detail {

namespace fs = std::filesystem;

std::vector<fs::path> adapter_input_paths(const Checkpoint& c) {
  std::set<fs::path> files{c.path()};
  for (const auto& name : c.tensor_names()) files.insert(c.at(name).file());
  return {files.begin(), files.end()};
}

void check_adapter_output(const fs::path& output, const std::vector<const Checkpoint*>& inputs, bool force) {
  if (output.extension() == ".safetensors") {
    throw Error(ErrorCode::kInvalidArgument, output.string() + ": an adapter is a folder (it receives " +
                                                 kAdapterWeightsFile + " and " + kAdapterConfigFile +
                                                 "), not a .safetensors file");
  }
  std::error_code ec;
  const fs::path out = fs::weakly_canonical(fs::absolute(output, ec), ec);
  for (const Checkpoint* c : inputs) {
    if (c->folder()) {
      const fs::path root = fs::canonical(*c->folder(), ec);
      if (!ec && format_detail::path_inside(root, out)) {
        throw Error(ErrorCode::kOutputExists,
                    fmt::format("{}: the output {} the input checkpoint folder {}; writing there would replace or "
                                "shadow that input's files, so it is refused whatever the flags (--force does not "
                                "change this): choose an output path outside it",
                                output.string(), out == root ? "is" : "is inside", root.string()));
      }
    }
    for (const auto& f : adapter_input_paths(*c)) {
      if (format_detail::same_path(f, output)) {
        throw Error(ErrorCode::kOutputExists,
                    output.string() + ": the output would overwrite the input " + f.string() + " (refused even with --force)");
      }
    }
  }
  if (fs::exists(output, ec) && !fs::is_directory(output, ec)) {
    throw Error(ErrorCode::kOutputExists, output.string() + ": exists and is not a folder");
  }
  if (!force) {
    for (const char* name : {kAdapterWeightsFile, kAdapterConfigFile}) {
      if (fs::exists(fs::symlink_status(output / name, ec))) {
        throw Error(ErrorCode::kOutputExists, (output / name).string() + ": already exists (use --force to replace it)");
      }
    }
  }
}

std::string adapter_config_text(const AdapterConfigFields& f) {
  nlohmann::json pattern = nlohmann::json::object();
  for (const auto& [m, r] : f.module_ranks)
    if (r != f.r) pattern[m] = r;
  const auto or_null = [](const std::string& s) { return s.empty() ? nlohmann::json(nullptr) : nlohmann::json(s); };
  nlohmann::json config = {
      {"alpha_pattern", pattern},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", or_null(f.base_model_name)},
      {"bias", "none"},
      {"fan_in_fan_out", f.fan_in_fan_out},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"lora_alpha", f.r},
      {"lora_bias", f.lora_bias},
      {"lora_dropout", 0.0},
      {"modules_to_save", f.modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(f.modules_to_save)},
      {"peft_type", "LORA"},
      {"r", f.r},
      {"rank_pattern", pattern},
      {"revision", nullptr},
      {"target_modules", f.target_modules},
      {"task_type", or_null(f.task_type)},
      {"use_dora", false},
      {"use_rslora", false},
  };
  return config.dump(2) + "\n";
}

std::unique_ptr<CheckpointWriter> make_adapter_writer(const fs::path& output, std::vector<TensorSpec> specs, bool force,
                                                      const std::vector<fs::path>& inputs, std::uint64_t& bytes) {
  CheckpointWriteOptions write;
  write.max_shard_size = UINT64_MAX;
  write.force = force;
  CheckpointPlan plan = CheckpointPlan::build(output, std::move(specs), {{"format", "pt"}}, write);
  if (!plan.is_folder || plan.shards.size() != 1) {
    throw Error(ErrorCode::kInternal, output.string() + ": the adapter plan is not one file in a folder");
  }
  plan.shards[0].path = output / kAdapterWeightsFile;
  bytes = plan.total_bytes;
  return std::make_unique<CheckpointWriter>(std::move(plan), write, inputs);
}

}  // namespace taskvec::detail
