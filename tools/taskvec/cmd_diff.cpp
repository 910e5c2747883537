// taskvec diff PRETRAINED FINETUNED -o TAU: the task vector tau = finetuned - pretrained.
#include "cli.hpp"

namespace taskvec::cli {

void add_diff_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("diff", "Write the task vector tau = finetuned - pretrained (F32 by default)");
  struct Args {
    std::string pretrained, finetuned, output;
    EditFlags flags;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("pretrained", args->pretrained, "Pretrained checkpoint")->required();
  cmd->add_option("finetuned", args->finetuned, "Fine-tuned checkpoint")->required();
  cmd->add_option("-o,--output", args->output, "Output .safetensors file or folder")->required();
  add_edit_flags(*cmd, args->flags);
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      finish_edit_options(args->flags, global);
      Checkpoint pre = Checkpoint::open(args->pretrained);
      Checkpoint ft = Checkpoint::open(args->finetuned);
      EditReport report = make_task_vector(pre, ft, args->output, args->flags.options);
      print_edit_report(report, global, args->flags.options.dry_run);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
