// taskvec extract-lora BASE FINETUNED --rank R -o ADAPTER_DIR: the fine-tune's task vector as a PEFT
// LoRA adapter (truncated SVD per weight matrix).
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "taskvec/error.hpp"
#include "taskvec/lora.hpp"

namespace taskvec::cli {

namespace {

void print_lora_report(const LoraReport& report, const GlobalFlags& global) {
  if (!global.json && !global.quiet && isatty(STDERR_FILENO)) fmt::print(stderr, "\r\033[K");
  for (const auto& w : report.warnings) fmt::print(stderr, "taskvec: warning: {}\n", w);
  if (global.json) {
    nlohmann::ordered_json j;
    j["output"] = report.output.string();
    j["r"] = report.r;
    j["lora_alpha"] = report.r;
    j["target_modules"] = report.target_modules;
    j["modules_to_save"] = report.modules_to_save;
    j["skipped_identical"] = report.skipped_identical;
    j["bytes_written"] = report.bytes_written;
    j["seconds"] = report.seconds;
    j["warnings"] = report.warnings;
    auto tensors = nlohmann::ordered_json::array();
    for (const auto& t : report.tensors) {
      nlohmann::ordered_json o;
      o["tensor"] = t.tensor;
      o["module"] = t.module;
      o["kind"] = t.kind;
      o["shape"] = t.shape;
      o["rank"] = t.rank;
      o["tau_norm"] = t.tau_norm;
      o["relative_error"] = t.relative_error;
      o["energy_kept"] = t.energy_kept;
      o["svd"] = t.kind == "lora" || t.kind == "lora_embedding" ? (t.randomized ? "randomized" : "exact") : "none";
      o["seconds"] = t.seconds;
      tensors.push_back(std::move(o));
    }
    j["tensors"] = std::move(tensors);
    fmt::print("{}\n", j.dump(2));
    return;
  }
  if (global.quiet) return;
  fmt::print("wrote {} (adapter_model.safetensors, adapter_config.json): r = lora_alpha = {}, {} LoRA module(s), {} "
             "saved whole, {} tensor(s) identical and skipped, {} bytes of tensors, in {:.2f} s\n",
             report.output.string(), report.r, report.target_modules.size(), report.modules_to_save.size(),
             report.skipped_identical.size(), report.bytes_written, report.seconds);
  fmt::print("  {:<52} {:<16} {:<16} {:>5} {:>12} {:>12} {:>11}\n", "tensor", "kind", "shape", "rank", "rel. error",
             "energy kept", "svd");
  for (const auto& t : report.tensors) {
    const bool factored = t.kind == "lora" || t.kind == "lora_embedding";
    fmt::print("  {:<52} {:<16} {:<16} {:>5} {:>12} {:>12} {:>11}\n", t.tensor, t.kind,
               fmt::format("[{}]", fmt::join(t.shape, ", ")), factored ? std::to_string(t.rank) : "-",
               factored ? fmt::format("{:.6g}", t.relative_error) : "-",
               factored ? fmt::format("{:.6f}", t.energy_kept) : "-",
               factored ? (t.randomized ? "randomized" : "exact") : "-");
  }
}

}  // namespace

void add_extract_lora_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("extract-lora",
                                 "Write the fine-tune's task vector as a PEFT LoRA adapter (truncated SVD per matrix)");
  struct Args {
    std::string base, finetuned, output, dtype_text, svd = "auto";
    LoraOptions options;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("base", args->base, "Base (pretrained) checkpoint")->required();
  cmd->add_option("finetuned", args->finetuned, "Fine-tuned checkpoint")->required();
  cmd->add_option("-o,--output", args->output, "Output adapter folder")->required();
  cmd->add_option("--rank", args->options.rank, "Largest LoRA rank R (each matrix: min(R, rows, cols))")->required();
  cmd->add_option("--sv-epsilon", args->options.sv_epsilon,
                  "Drop singular values below E * the largest one of the same matrix (0 <= E < 1; default 0)");
  cmd->add_option("--include", args->options.include,
                  "Only tensors whose name matches this regex (ECMAScript; repeatable: any of them)");
  cmd->add_option("--exclude", args->options.exclude, "Leave out tensors whose name matches this regex (repeatable)");
  cmd->add_option("--dtype", args->dtype_text,
                  "float32, bfloat16 or float16 for every adapter tensor (default: the fine-tuned tensor's dtype)");
  cmd->add_flag("--embed-lora", args->options.embed_lora,
                "Embeddings as LoRA (lora_embedding_A/B; lm_head as lora_A/B) instead of modules_to_save");
  cmd->add_option("--svd", args->svd, "auto (default), exact or randomized")
      ->check(CLI::IsMember({"auto", "exact", "randomized"}));
  cmd->add_option("--task-type", args->options.task_type, "adapter_config.json task_type, e.g. CAUSAL_LM (default null)");
  cmd->add_option("--base-model-name", args->options.base_model_name,
                  "adapter_config.json base_model_name_or_path (default: BASE as given)");
  cmd->add_option("--threads", args->options.threads, "Matrices factored at once (default: all cores)");
  cmd->add_flag("--force", args->options.force, "Replace an existing adapter in the output folder");
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      if (!args->dtype_text.empty()) {
        const auto dtype = parse_dtype_user(args->dtype_text);
        if (!dtype || (*dtype != DType::kF32 && *dtype != DType::kBF16 && *dtype != DType::kF16)) {
          throw Error(ErrorCode::kInvalidArgument,
                      fmt::format("--dtype '{}': use float32, bfloat16 or float16", args->dtype_text));
        }
        args->options.out_dtype = *dtype;
      }
      args->options.svd = args->svd == "exact"        ? LoraSvdMethod::kExact
                          : args->svd == "randomized" ? LoraSvdMethod::kRandomized
                                                      : LoraSvdMethod::kAuto;
      if (!global.quiet && !global.json && isatty(STDERR_FILENO)) {
        args->options.on_progress = [](const Progress& p) {
          fmt::print(stderr, "\r\033[K{}/{} matrices  {:.0f} s", p.tensors_done, p.tensors_total, p.seconds);
          std::fflush(stderr);
        };
      }
      Checkpoint base = Checkpoint::open(args->base);
      Checkpoint ft = Checkpoint::open(args->finetuned);
      const LoraReport report = extract_lora(base, ft, args->output, args->options);
      print_lora_report(report, global);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
