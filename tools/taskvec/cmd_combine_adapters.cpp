// taskvec combine-adapters -t ADAPTER[:LAMBDA] [-t ...] [--rank R] -o OUT_ADAPTER/: a linear combination
// of PEFT LoRA adapters written as one adapter (exact concatenation, or re-factored to rank R).
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "cli.hpp"
#include "taskvec/error.hpp"
#include "taskvec/lora.hpp"

namespace taskvec::cli {

namespace {

void print_combine_report(const CombineAdaptersReport& report, const std::vector<std::string>& paths, bool ranked,
                          const GlobalFlags& global) {
  if (global.json) {
    nlohmann::ordered_json j;
    j["output"] = report.output.string();
    j["r"] = report.r;
    j["lora_alpha"] = report.r;
    j["target_modules"] = report.target_modules;
    j["modules_to_save"] = report.modules_to_save;
    j["bytes_written"] = report.bytes_written;
    j["seconds"] = report.seconds;
    auto modules = nlohmann::ordered_json::array();
    for (const auto& m : report.modules) {
      nlohmann::ordered_json o;
      o["tensor"] = m.tensor;
      o["module"] = m.module;
      o["kind"] = m.kind;
      o["shape"] = m.shape;
      std::vector<std::string> from;
      for (auto i : m.inputs) from.push_back(paths[i]);
      o["inputs"] = from;
      o["input_rank"] = m.input_rank;
      o["rank"] = m.rank;
      o["delta_norm"] = m.delta_norm;
      o["relative_error"] = m.relative_error;
      const bool factored = m.kind == "lora" || m.kind == "lora_embedding";
      o["svd"] = factored && ranked ? (m.randomized ? "randomized" : "exact") : "none";
      modules.push_back(std::move(o));
    }
    j["modules"] = std::move(modules);
    fmt::print("{}\n", j.dump(2));
    return;
  }
  if (global.quiet) return;
  fmt::print("wrote {} (adapter_model.safetensors, adapter_config.json): r = lora_alpha = {}, {} LoRA module(s), {} "
             "saved whole, {} bytes of tensors, in {:.2f} s{}\n",
             report.output.string(), report.r, report.target_modules.size(), report.modules_to_save.size(),
             report.bytes_written, report.seconds, ranked ? "" : " (exact: factors concatenated)");
  fmt::print("  {:<52} {:<16} {:<16} {:>6} {:>5} {:>12} {:>7}\n", "tensor", "kind", "shape", "sum r", "rank",
             "rel. error", "-t #");
  for (const auto& m : report.modules) {
    const bool factored = m.kind == "lora" || m.kind == "lora_embedding";
    fmt::print("  {:<52} {:<16} {:<16} {:>6} {:>5} {:>12} {:>7}\n", m.tensor, m.kind,
               fmt::format("[{}]", fmt::join(m.shape, ", ")), factored ? std::to_string(m.input_rank) : "-",
               factored ? std::to_string(m.rank) : "-",
               factored && ranked ? fmt::format("{:.6g}", m.relative_error) : "-",
               fmt::format("{}", fmt::join(m.inputs, ",")));
  }
}

}  // namespace

void add_combine_adapters_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("combine-adapters",
                                 "Write sum lambda_i * adapter_i of PEFT LoRA adapters as one adapter (exact, or --rank R)");
  struct Args {
    std::vector<std::string> terms;
    std::string output, dtype_text, svd = "auto";
    CombineAdaptersOptions options;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("-t,--adapter", args->terms, "ADAPTER[:LAMBDA] (lambda defaults to 1); repeat")->required();
  cmd->add_option("-o,--output", args->output, "Output adapter folder")->required();
  cmd->add_option("--rank", args->options.rank,
                  "Re-factor each module's combined dW by a truncated SVD to rank min(R, sum of ranks) (default: "
                  "exact concatenation)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dtype", args->dtype_text, "float32 (default), bfloat16 or float16 for the factors and biases");
  cmd->add_option("--svd", args->svd, "with --rank: auto (default), exact or randomized")
      ->check(CLI::IsMember({"auto", "exact", "randomized"}));
  cmd->add_option("--base-model-name", args->options.base_model_name,
                  "adapter_config.json base_model_name_or_path (default: the first adapter's)");
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
      std::vector<Checkpoint> adapters;
      std::vector<double> lambdas;
      std::vector<std::string> paths;
      for (const auto& text : args->terms) {
        auto [path, lambda] = split_term(text);
        adapters.push_back(Checkpoint::open(path));
        if (!adapters.back().is_adapter()) {
          throw Error(ErrorCode::kInvalidArgument,
                      fmt::format("-t '{}': {} is not a PEFT LoRA adapter folder (adapter_config.json)", text, path));
        }
        lambdas.push_back(lambda);
        paths.push_back(path);
      }
      std::vector<AdapterTerm> terms;
      for (std::size_t i = 0; i < adapters.size(); ++i) terms.push_back({&adapters[i], lambdas[i]});
      const CombineAdaptersReport report = combine_adapters(terms, args->output, args->options);
      print_combine_report(report, paths, args->options.rank > 0, global);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
