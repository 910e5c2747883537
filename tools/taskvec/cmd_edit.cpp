// taskvec edit --model NAME=PATH ... [--pretrained NAME] 'EXPR' -o OUT: a linear expression over models.
#include <fmt/format.h>

#include "cli.hpp"
#include "taskvec/error.hpp"

namespace taskvec::cli {

std::map<std::string, Checkpoint> open_named_models(const std::vector<std::string>& specs, const std::string& pretrained) {
  std::map<std::string, Checkpoint> opened;
  for (const auto& spec : specs) {
    auto eq = spec.find('=');
    if (eq == std::string::npos || eq == 0 || eq + 1 == spec.size()) {
      throw Error(ErrorCode::kInvalidArgument, fmt::format("--model '{}' must be NAME=PATH", spec));
    }
    std::string name = spec.substr(0, eq);
    for (char c : name) {
      if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') {
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("--model '{}': names may hold letters, digits and '_' only", spec));
      }
    }
    if (std::isdigit(static_cast<unsigned char>(name[0])) || name == "tau") {
      throw Error(ErrorCode::kInvalidArgument, fmt::format("--model '{}': '{}' cannot be a model name", spec, name));
    }
    if (opened.count(name)) throw Error(ErrorCode::kInvalidArgument, fmt::format("--model name '{}' given twice", name));
    opened.emplace(name, Checkpoint::open(spec.substr(eq + 1)));
  }
  if (!opened.count(pretrained)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("no --model named '{}': name the pretrained checkpoint with --pretrained NAME", pretrained));
  }
  return opened;
}

void add_edit_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand(
      "edit", "Evaluate a linear expression over named models, e.g. 'pre + 0.5*(tau(c) + tau(b) - tau(a))'");
  struct Args {
    std::vector<std::string> models;
    std::string pretrained = "pre", expression, output;
    EditFlags flags;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("-m,--model", args->models, "NAME=PATH of a checkpoint; repeat for each model")
      ->required()
      ->allow_extra_args(false);
  cmd->add_option("--pretrained", args->pretrained, "Name of the pretrained model, the base of tau() (default: pre)");
  cmd->add_option("expression", args->expression, "Expression with + - * /, numbers, parentheses, NAME and tau(NAME)")->required();
  cmd->add_option("-o,--output", args->output, "Output .safetensors file or folder")->required();
  add_edit_flags(*cmd, args->flags);
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      finish_edit_options(args->flags, global);
      std::map<std::string, Checkpoint> opened = open_named_models(args->models, args->pretrained);
      std::map<std::string, const Checkpoint*> models;
      for (const auto& [name, ckpt] : opened) models[name] = &ckpt;
      EditReport report = edit_expression(models, args->pretrained, args->expression, args->output, args->flags.options);
      print_edit_report(report, global, args->flags.options.dry_run);
      return 0;
    };
  });
}

}  // namespace taskvec::cli
