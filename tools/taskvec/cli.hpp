// taskvec CLI: the shared pieces every subcommand uses. One file per subcommand (cmd_<name>.cpp)
// defines add_<name>_command(); main.cpp registers them all and catches taskvec::Error once.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <map>
#include <vector>
#include <string>
#include <utility>

#include "taskvec/engine.hpp"

namespace taskvec::cli {

/// Flags common to all commands, filled by CLI11 before the chosen command runs.
struct GlobalFlags {
  bool json = false;    ///< machine-readable output on stdout
  bool quiet = false;   ///< no progress, no summary
};

/// What main() runs after parsing: the chosen subcommand's action. Returns the exit status.
using Action = std::function<int()>;

/// Flags of an edit that writes a checkpoint (diff, apply, edit, merge): --dtype, --include,
/// --exclude, --threads, --memory-budget, --max-shard-size, --force, --allow-nonfinite, --dry-run.
/// Values land in `options` (and `dtype_text`, parsed by finish_edit_options) when parsing ends.
struct EditFlags {
  EditOptions options;
  std::string dtype_text;
  std::string memory_budget_text = "512MiB";
  std::string max_shard_size_text;  ///< empty: 5GB
  bool max_shard_size_given = false;  ///< set by finish_edit_options
};
/// `linear`: also --merge-extra-rows and --untie-embeddings (diff, apply, edit; not merge).
void add_edit_flags(CLI::App& command, EditFlags& flags, bool linear = true);
/// Parses the text flags into flags.options (sizes like 512MiB, 5GB, 1000000); sets a progress
/// display on stderr when it is a terminal and not --quiet. Throws Error{kInvalidArgument}.
void finish_edit_options(EditFlags& flags, const GlobalFlags& global);
/// Parses a byte size: plain bytes, or a number with B/bytes, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB.
std::uint64_t parse_size(const std::string& text);
/// "path:lambda" -> (path, lambda), lambda 1 without ':'; the last ':' separates, so paths may contain
/// ':'. Throws Error{kInvalidArgument} for a coefficient that is not a finite number.
std::pair<std::string, double> split_term(const std::string& text);
/// Opens the checkpoints of repeated `--model NAME=PATH` flags (NAME: letters, digits, '_', not starting
/// with a digit, not "tau"); `pretrained` must be one of the names. Throws Error{kInvalidArgument} and
/// what Checkpoint::open throws. Used by edit and sweep.
std::map<std::string, Checkpoint> open_named_models(const std::vector<std::string>& specs, const std::string& pretrained);
/// Prints an EditReport: a human summary (or the dry-run plan) on stdout, or JSON with --json.
void print_edit_report(const EditReport& report, const GlobalFlags& global, bool dry_run);

// One per subcommand; each registers itself on `app` and sets `action` when chosen.
void add_inspect_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_validate_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_diff_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_apply_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_edit_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_similarity_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_merge_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_extract_lora_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_combine_adapters_command(CLI::App& app, const GlobalFlags& global, Action& action);
void add_sweep_command(CLI::App& app, const GlobalFlags& global, Action& action);

}  // namespace taskvec::cli
