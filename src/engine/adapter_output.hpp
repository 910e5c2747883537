// Internal: writing a PEFT LoRA adapter folder (adapter_model.safetensors + adapter_config.json),
// shared by extract_lora and combine_adapters: the output-path checks, the adapter_config.json text and
// the one-file plan.
#pragma once

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"

namespace taskvec::detail {

inline constexpr const char* kAdapterPrefix = "base_model.model.";
inline constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";
inline constexpr const char* kAdapterConfigFile = "adapter_config.json";

/// Every input path of `c` that an output must never replace: c.path(), and the file of each tensor.
std::vector<std::filesystem::path> adapter_input_paths(const Checkpoint& c);

/// Checks the adapter folder `output` before any work: not a .safetensors path (kInvalidArgument), not
/// an input folder or inside one, not an input file (kOutputExists, even with force), not an existing
/// non-folder, and (without force) no adapter_model.safetensors / adapter_config.json already there
/// (kOutputExists). CheckpointWriter checks the same again when it is created.
void check_adapter_output(const std::filesystem::path& output, const std::vector<const Checkpoint*>& inputs, bool force);

/// The LoraConfig fields taskvec writes. lora_alpha = r, and per module alpha = rank (alpha_pattern =
/// rank_pattern), so PEFT's scale alpha / r is 1 for every module: dW = B @ A.
struct AdapterConfigFields {
  int r = 0;                                 ///< the largest module rank (also lora_alpha)
  std::map<std::string, int> module_ranks;   ///< module path -> rank; those != r go into the patterns
  std::vector<std::string> target_modules;   ///< full module paths with LoRA factors, sorted
  std::vector<std::string> modules_to_save;  ///< full module paths saved whole, sorted
  bool lora_bias = false;
  bool fan_in_fan_out = false;
  std::string base_model_name;               ///< base_model_name_or_path ("" = null)
  std::string task_type;                     ///< "" = null
};

/// adapter_config.json text (2-space JSON, trailing newline) for `fields`.
std::string adapter_config_text(const AdapterConfigFields& fields);

/// The writer of the single file `output`/adapter_model.safetensors (metadata {"format": "pt"}) holding
/// `specs`; `inputs` are never written over (CheckpointWriter). `bytes` receives the tensor data size.
/// Throws as CheckpointPlan::build and CheckpointWriter, Error{kInternal} if the plan is not one file.
std::unique_ptr<CheckpointWriter> make_adapter_writer(const std::filesystem::path& output, std::vector<TensorSpec> specs,
                                                      bool force, const std::vector<std::filesystem::path>& inputs,
                                                      std::uint64_t& bytes);

}  // namespace taskvec::detail
