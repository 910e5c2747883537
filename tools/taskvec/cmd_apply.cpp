// taskvec apply PRETRAINED -t TAU:LAMBDA [-t ...] -o OUT: theta = pretrained + sum lambda_i tau_i.
#include <cmath>
#include <cstdlib>

#include <fmt/format.h>

#include "cli.hpp"
#include "taskvec/error.hpp"

namespace taskvec::cli {

void add_apply_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("apply", "theta = pretrained + sum lambda_i * tau_i (negative lambda negates: forgetting)");
  struct Args {
    std::string pretrained, output;
    std::vector<std::string> terms;
    EditFlags flags;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("pretrained", args->pretrained, "Pretrained checkpoint")->required();
  cmd->add_option("-t,--task-vector", args->terms, "TAU[:LAMBDA] (lambda defaults to 1); repeat for addition")
      ->required()
      ->allow_extra_args(false);
  cmd->add_option("-o,--output", args->output, "Output .safetensors file or folder")->required();
  add_edit_flags(*cmd, args->flags);
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      finish_edit_options(args->flags, global);
      Checkpoint pre = Checkpoint::open(args->pretrained);
      std::vector<Checkpoint> taus;
      std::vector<double> lambdas;
      taus.reserve(args->terms.size());
      for (const auto& text : args->terms) {
        auto [path, lambda] = split_term(text);
        taus.push_back(Checkpoint::open(path));
        lambdas.push_back(lambda);
      }
      std::vector<std::pair<const Checkpoint*, double>> terms;
      for (std::size_t i = 0; i < taus.size(); ++i) terms.emplace_back(&taus[i], lambdas[i]);
      EditReport report = apply_task_vectors(pre, terms, args->output, args->flags.options);
      print_edit_report(report, global, args->flags.options.dry_run);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
