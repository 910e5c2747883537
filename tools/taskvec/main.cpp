// taskvec: the command-line tool. Parses flags once (CLI11), runs the chosen subcommand, and maps a
// taskvec::Error to its documented exit status (docs/CLI.md).
#include <sys/resource.h>

#include <cstdio>
#include <exception>

#include <fmt/core.h>

#include "cli.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace {

// Every input shard keeps a file descriptor open for the run (its data is read with pread): allow as
// many as the hard limit, so that merging many sharded models does not stop at the usual soft 1024.
void raise_open_file_limit() {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0 && lim.rlim_cur < lim.rlim_max) {
    lim.rlim_cur = lim.rlim_max;
    ::setrlimit(RLIMIT_NOFILE, &lim);
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace taskvec;
  raise_open_file_limit();
  taskvec::install_interrupt_cleanup();  // Ctrl-C or a kill removes the hidden temp files of outputs not yet published
  CLI::App app{"taskvec: edit neural networks with task arithmetic (task vectors, negation, addition, analogies, merges)"};
  app.set_version_flag("--version", std::string("taskvec ") + taskvec::taskvec_version());
  app.require_subcommand(1);
  app.fallthrough();
  cli::GlobalFlags global;
  app.add_flag("--json", global.json, "Machine-readable JSON output on stdout");
  app.add_flag("-q,--quiet", global.quiet, "No progress display and no summary");
  cli::Action action;
  cli::add_inspect_command(app, global, action);
  cli::add_validate_command(app, global, action);
  cli::add_diff_command(app, global, action);
  cli::add_apply_command(app, global, action);
  cli::add_edit_command(app, global, action);
  cli::add_merge_command(app, global, action);
  cli::add_similarity_command(app, global, action);
  cli::add_extract_lora_command(app, global, action);
  cli::add_combine_adapters_command(app, global, action);
  cli::add_sweep_command(app, global, action);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    // taskvec's own error form, with where to look.
    std::string command;
    for (const auto* sub : app.get_subcommands()) command = sub->get_name();
    fmt::print(stderr, "taskvec: error (invalid_argument): {} (see 'taskvec {}--help')\n", escape_control(e.what()),
               command.empty() ? "" : command + " ");
    return 2;
  }
  try {
    return action ? action() : 2;
  } catch (const Error& e) {
    std::fflush(stdout);
    fmt::print(stderr, "taskvec: error ({}): {}\n", error_code_name(e.code()), escape_control(e.what()));
    for (const auto& line : e.table()) fmt::print(stderr, "  {}\n", escape_control(line));
    return exit_status(e.code());
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "taskvec: unexpected error: {}\n", escape_control(e.what()));
    return 1;
  }
}
