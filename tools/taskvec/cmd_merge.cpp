// taskvec merge RECIPE.yaml -o OUT [--seed N]: TIES, DARE, Breadcrumbs, DELLA, ... from a YAML recipe
// (docs/METHODS.md). --seed overrides the recipe's seed; --dtype overrides its out_dtype.
#include <optional>

#include "cli.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec::cli {

void add_merge_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("merge", "Merge models with a YAML recipe (ties, dare_ties, breadcrumbs, della, "
                                          "model_stock, slerp, consensus, tsv_merge, iso_c, ...; docs/METHODS.md)");
  struct Args {
    std::string recipe, output;
    std::optional<std::uint64_t> seed;
    EditFlags flags;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML: merge_method, base_model, models, parameters, ...)")
      ->required();
  cmd->add_option("-o,--output", args->output, "Output .safetensors file or folder")->required();
  cmd->add_option("--seed", args->seed, "Seed of the random masks (dare_*, della); overrides the recipe's seed");
  add_edit_flags(*cmd, args->flags, /*linear=*/false);
  // merge_checkpoints unties like the linear commands (reconcile_tied_embeddings); its error suggests this flag.
  cmd->add_flag("--untie-embeddings", args->flags.options.untie_embeddings,
                "When tied-embedding checkpoints (no lm_head.weight) meet ones with their own lm_head.weight, "
                "read the tied ones' head from their embedding and write an untied output");
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      finish_edit_options(args->flags, global);
      Recipe recipe = load_recipe(args->recipe);
      if (args->seed) recipe.seed = *args->seed;
      EditReport report = merge_checkpoints(recipe, args->output, args->flags.options);
      print_edit_report(report, global, args->flags.options.dry_run);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
