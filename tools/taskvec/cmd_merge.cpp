// taskvec merge RECIPE.yaml [OUT] [-o OUT] [--seed N]: TIES, DARE, Breadcrumbs, DELLA, ... from a YAML
// recipe in mergekit's format and meaning (docs/METHODS.md, docs/MERGEKIT.md). --seed overrides the
// recipe's seed; --dtype overrides its out_dtype. mergekit-yaml's habits: the output as a positional
// argument, --out-shard-size, --allow-crimes, --copy-tokenizer / --no-copy-tokenizer, and its flags that
// mean nothing here accepted with a note.
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <optional>

#include "cli.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec::cli {

namespace {

// mergekit's parse_kmb: a plain integer, or an integer with K, M or B (10^3, 10^6, 10^9). mergekit
// compares it with the bytes written (numel x element size), so "5B" is 5 GB.
std::uint64_t parse_kmb(const std::string& text) {
  std::string digits = text;
  std::uint64_t scale = 1;
  if (!digits.empty()) {
    const char last = static_cast<char>(std::tolower(static_cast<unsigned char>(digits.back())));
    if (last == 'k' || last == 'm' || last == 'b') {
      scale = last == 'k' ? 1000ull : last == 'm' ? 1000000ull : 1000000000ull;
      digits.pop_back();
    }
  }
  const bool number = !digits.empty() && digits.size() <= 12 &&
                      digits.find_first_not_of("0123456789") == std::string::npos;
  if (!number || std::stoull(digits) == 0)
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("--out-shard-size '{}' is not mergekit's form: an integer with K, M or B (e.g. 5B, 500M)", text));
  return std::stoull(digits) * scale;
}

}  // namespace

void add_merge_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("merge", "Merge models with a YAML recipe in mergekit's format and meaning (ties, "
                                          "dare_ties, breadcrumbs, della, model_stock, slerp, consensus, tsv_merge, "
                                          "iso_c, ...; docs/METHODS.md, docs/MERGEKIT.md)");
  struct Args {
    std::string recipe, output, output_positional, out_shard_size, intermediate_dir;
    bool no_lazy = false;
    std::optional<std::uint64_t> seed;
    bool no_model_card = false, no_copy_tokenizer = false, copy_tokenizer = false;
    bool cuda = false, lazy_unpickle = false, low_cpu_memory = false, trust_remote_code = false;
    EditFlags flags;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML: merge_method, base_model, models, parameters, ...)")
      ->required();
  cmd->add_option("out", args->output_positional, "Output .safetensors file or folder (as mergekit-yaml CONFIG OUT; or -o)");
  cmd->add_option("-o,--output", args->output, "Output .safetensors file or folder");
  cmd->add_option("--seed,--random-seed", args->seed,
                  "Seed of the random masks (dare_*, della*); overrides the recipe's seed (mergekit: --random-seed)");
  add_edit_flags(*cmd, args->flags, /*linear=*/false);
  cmd->add_option("--out-shard-size", args->out_shard_size,
                  "mergekit's shard size: an integer with K, M or B (5B = 5e9 bytes, as mergekit counts it); "
                  "instead of --max-shard-size");
  // merge_checkpoints unties like the linear commands (reconcile_tied_embeddings); its error suggests this flag.
  cmd->add_flag("--untie-embeddings", args->flags.options.untie_embeddings,
                "When tied-embedding checkpoints (no lm_head.weight) meet ones with their own lm_head.weight, "
                "read the tied ones' head from their embedding and write an untied output");
  cmd->add_flag("--allow-crimes", args->flags.options.allow_crimes,
                "Merge inputs whose config.json disagree on the architecture (model_type, sizes, layers, heads, "
                "vocabulary), with a warning per difference (mergekit's flag)");
  cmd->add_option("--intermediate-dir", args->intermediate_dir,
                  "Multi-stage recipes (several YAML documents, as mergekit-multi): keep each named stage's output in "
                  "DIR/NAME and reuse it on the next run (default: a temporary folder beside the output, removed after)");
  cmd->add_flag("--no-lazy", args->no_lazy, "With --intermediate-dir: recompute stages whose output exists (mergekit-multi's flag)");
  cmd->add_flag("--explain", args->flags.options.explain,
                "Print every tensor's resolved parameters (grouped: tensors that share them), marking those that differ "
                "from the method's defaults, and stop; nothing is written");
  cmd->add_flag("--no-model-card", args->no_model_card, "Do not write a README.md model card into a folder output");
  cmd->add_flag("--copy-tokenizer", args->copy_tokenizer, "Copy the base's tokenizer files into a folder output (default)");
  cmd->add_flag("--no-copy-tokenizer", args->no_copy_tokenizer, "Do not copy the base's tokenizer files");
  // mergekit flags that mean nothing to taskvec: accepted, with a note.
  cmd->add_flag("--cuda", args->cuda, "mergekit flag: accepted, no effect (taskvec computes on the CPU)");
  cmd->add_flag("--lazy-unpickle", args->lazy_unpickle, "mergekit flag: accepted, no effect (pickles are always read lazily)");
  cmd->add_flag("--low-cpu-memory", args->low_cpu_memory, "mergekit flag: accepted, no effect (memory is bounded by --memory-budget)");
  cmd->add_flag("--trust-remote-code", args->trust_remote_code, "mergekit flag: accepted, no effect (no model code is ever run)");
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      const auto same_output = [](const std::string& a, const std::string& b) {
        const auto norm = [](const std::string& p) {
          std::string s = std::filesystem::path(p).lexically_normal().string();
          while (s.size() > 1 && s.back() == '/') s.pop_back();
          return s;
        };
        return norm(a) == norm(b);
      };
      if (!args->output.empty() && !args->output_positional.empty() && !same_output(args->output, args->output_positional))
        throw Error(ErrorCode::kInvalidArgument, fmt::format("two outputs: '{}' and -o '{}'; give one",
                                                             args->output_positional, args->output));
      const std::string output = args->output.empty() ? args->output_positional : args->output;
      if (output.empty())
        throw Error(ErrorCode::kInvalidArgument, "no output: give it after the recipe (taskvec merge RECIPE OUT) or as -o OUT");
      if (args->copy_tokenizer && args->no_copy_tokenizer)
        throw Error(ErrorCode::kInvalidArgument, "--copy-tokenizer and --no-copy-tokenizer exclude each other");
      finish_edit_options(args->flags, global);
      if (!args->out_shard_size.empty()) {
        if (args->flags.max_shard_size_given)
          throw Error(ErrorCode::kInvalidArgument, "--out-shard-size and --max-shard-size exclude each other: give one");
        args->flags.options.write.max_shard_size = parse_kmb(args->out_shard_size);
      }
      args->flags.options.write_model_card = !args->no_model_card;
      args->flags.options.copy_tokenizer = !args->no_copy_tokenizer;
      for (const auto& [set, flag, why] : {std::tuple{args->cuda, "--cuda", "taskvec computes on the CPU"},
                                            std::tuple{args->lazy_unpickle, "--lazy-unpickle", "PyTorch pickles are always read lazily, never executed"},
                                            std::tuple{args->low_cpu_memory, "--low-cpu-memory", "memory is bounded by --memory-budget"},
                                            std::tuple{args->trust_remote_code, "--trust-remote-code", "no code from a model repository is ever run"}}) {
        if (set) fmt::print(stderr, "taskvec: note: {} (a mergekit flag) has no effect: {}\n", flag, why);
      }
      std::vector<Recipe> stages = load_recipe_stages(args->recipe);
      for (auto& stage : stages)
        if (args->seed) stage.seed = *args->seed;
      EditReport report = merge_stages(stages, output, args->flags.options, args->intermediate_dir, args->no_lazy);
      if (args->flags.options.explain) {
        for (const auto& w : report.warnings) fmt::print(stderr, "taskvec: warning: {}\n", w);
        for (const auto& line : report.explanation) fmt::print("{}\n", line);
        return 0;
      }
      print_edit_report(report, global, args->flags.options.dry_run);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
