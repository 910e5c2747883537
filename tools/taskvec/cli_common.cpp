#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "cli.hpp"
#include "taskvec/error.hpp"

namespace taskvec::cli {

void add_edit_flags(CLI::App& command, EditFlags& flags, bool linear) {
  command.add_option("--dtype", flags.dtype_text,
                     "Output dtype of float tensors: f32, f16, bf16, f64, f8_e4m3, f8_e5m2 (default: the pretrained "
                     "tensor's dtype; F32 for task vectors)");
  command.add_option("--include", flags.options.include, "Edit only tensors whose name matches this regex (ECMAScript)");
  command.add_option("--exclude", flags.options.exclude,
                     "Do not edit tensors whose name matches this regex; they are copied from the pretrained checkpoint");
  command.add_option("--threads", flags.options.threads, "Worker threads (default: all cores)");
  command.add_option("--memory-budget", flags.memory_budget_text,
                     "Bytes of input and output chunks in flight, e.g. 512MiB (default 512MiB)");
  command.add_option("--max-shard-size", flags.max_shard_size_text,
                     "Largest shard of a folder output, e.g. 5GB (default 5GB; below 1 MB write the unit: 4096bytes, 4KiB)");
  command.add_flag("--force", flags.options.write.force,
                   "Replace an existing output; apply task vectors made from another pretrained checkpoint");
  command.add_flag("--allow-nonfinite", flags.options.allow_nonfinite, "Proceed when an input holds NaN or Inf");
  command.add_flag("--dry-run", flags.options.dry_run, "Print the plan (tensors, output files, sizes) and stop");
  command.add_flag("--clamp-overflow", flags.options.clamp_overflow,
                   "Saturate results beyond the output dtype's range (e.g. F16 > 65504) to its largest finite value, "
                   "with a warning counting them per tensor (default: error, exit 5)");
  if (!linear) {  // merge only (issue 10, inputs): tensors the models have and the base lacks
    command.add_option("--keep-extra-tensors", flags.options.keep_extra_tensors_from,
                       "FROM: copy tensors that the models have but the base lacks (a new head) unchanged from this "
                       "model: its index in the recipe's models list (from 0) or its path");
    command.add_flag("--drop-extra-tensors", flags.options.drop_extra_tensors,
                     "Leave out tensors that the models have but the base lacks (default: an error)");
  }
  if (!linear) return;  // the two flags below exist for diff / apply / edit only
  command.add_flag("--merge-extra-rows", flags.options.merge_extra_rows,
                   "Tensors whose first dimension differs (e.g. a vocabulary of 32007 vs 32000 rows): combine the "
                   "rows all inputs have, copy the extra rows from the first input that has them");
  command.add_flag("--untie-embeddings", flags.options.untie_embeddings,
                   "When tied-embedding checkpoints (no lm_head.weight) meet ones with their own lm_head.weight, "
                   "read the tied ones' head from their embedding and write an untied output");
}

std::uint64_t parse_size(const std::string& text) {
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  std::string number = text.substr(0, i);
  std::string unit = text.substr(i);
  for (auto& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  double multiplier = 0;
  if (unit.empty() || unit == "b" || unit == "bytes") multiplier = 1;
  else if (unit == "kb" || unit == "k") multiplier = 1e3;
  else if (unit == "mb" || unit == "m") multiplier = 1e6;
  else if (unit == "gb" || unit == "g") multiplier = 1e9;
  else if (unit == "tb" || unit == "t") multiplier = 1e12;
  else if (unit == "kib") multiplier = 1024.0;
  else if (unit == "mib") multiplier = 1024.0 * 1024;
  else if (unit == "gib") multiplier = 1024.0 * 1024 * 1024;
  else if (unit == "tib") multiplier = 1024.0 * 1024 * 1024 * 1024;
  char* end = nullptr;
  double value = number.empty() ? -1 : std::strtod(number.c_str(), &end);
  if (multiplier == 0 || value <= 0 || end != number.c_str() + number.size() || !std::isfinite(value * multiplier) ||
      value * multiplier >= 1.8e19) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("'{}' is not a size: use bytes or a number with KB, MB, GB, KiB, MiB, GiB", text));
  }
  return static_cast<std::uint64_t>(value * multiplier);
}

namespace {

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  int u = 0;
  while (bytes >= 1000 && u < 4) {
    bytes /= 1000;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.2f} {}", bytes, units[u]);
}

std::string shape_text(const std::vector<std::uint64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

}  // namespace

void finish_edit_options(EditFlags& flags, const GlobalFlags& global) {
  if (!flags.dtype_text.empty()) {
    auto dtype = parse_dtype_user(flags.dtype_text);
    if (!dtype) throw Error(ErrorCode::kInvalidArgument, fmt::format("--dtype '{}' is not a known dtype", flags.dtype_text));
    flags.options.out_dtype = *dtype;
  }
  flags.options.memory_budget = parse_size(flags.memory_budget_text);
  flags.max_shard_size_given = !flags.max_shard_size_text.empty();
  flags.options.write.max_shard_size = parse_size(flags.max_shard_size_given ? flags.max_shard_size_text : "5GB");
  if (flags.max_shard_size_given && flags.options.write.max_shard_size < 1000000) {
    // "5B" is 5 bytes here but 5 billion in mergekit's --out-shard-size: a tiny shard needs an explicit unit.
    std::string unit = flags.max_shard_size_text;
    unit.erase(0, unit.find_first_not_of("0123456789."));
    for (auto& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (unit.empty() || unit == "b")
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("--max-shard-size '{}' would be {} bytes per shard: write the unit (e.g. 5GB; mergekit's "
                              "--out-shard-size 5B means 5e9 bytes; for a tiny shard on purpose, '{}bytes' or KiB)",
                              flags.max_shard_size_text, flags.options.write.max_shard_size,
                              flags.options.write.max_shard_size));
  }
  flags.options.force_base = flags.options.write.force;
  if (!global.quiet && !global.json && isatty(STDERR_FILENO)) {
    flags.options.on_progress = [](const Progress& p) {
      double fraction = p.bytes_total ? double(p.bytes_done) / double(p.bytes_total) : 1.0;
      double rate = p.seconds > 0 ? double(p.bytes_done) / p.seconds : 0;
      double eta = rate > 0 ? double(p.bytes_total - p.bytes_done) / rate : 0;
      fmt::print(stderr, "\r\033[K{:5.1f}%  {}/{} tensors  {} / {}  {}/s  ETA {:.0f} s", 100 * fraction, p.tensors_done,
                 p.tensors_total, human_bytes(double(p.bytes_done)), human_bytes(double(p.bytes_total)), human_bytes(rate),
                 eta);
      std::fflush(stderr);
    };
  }
}

void print_edit_report(const EditReport& report, const GlobalFlags& global, bool dry_run) {
  if (report.plan.shards.empty() && !dry_run) return;
  if (!global.json && !global.quiet && isatty(STDERR_FILENO)) fmt::print(stderr, "\r\033[K");
  for (const auto& w : report.warnings) fmt::print(stderr, "taskvec: warning: {}\n", w);
  if (global.json) {
    nlohmann::ordered_json j;
    j["dry_run"] = dry_run;
    j["output"] = report.plan.output.string();
    j["tensors_edited"] = report.tensors_edited;
    j["tensors_copied"] = report.tensors_copied;
    j["total_bytes"] = report.plan.total_bytes;
    j["bytes_read"] = report.bytes_read;
    j["bytes_written"] = report.bytes_written;
    j["seconds"] = report.seconds;
    j["peak_chunk_bytes"] = report.peak_chunk_bytes;
    j["warnings"] = report.warnings;
    j["auxiliary_files"] = report.auxiliary_files;
    auto files = nlohmann::ordered_json::array();
    for (const auto& shard : report.plan.shards) {
      nlohmann::ordered_json f;
      f["path"] = shard.path.string();
      f["bytes"] = shard.layout.file_size;
      auto tensors = nlohmann::ordered_json::array();
      for (const auto& t : shard.layout.tensors) {
        tensors.push_back({{"name", t.name}, {"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape},
                           {"bytes", t.num_bytes()}});
      }
      f["tensors"] = std::move(tensors);
      files.push_back(std::move(f));
    }
    j["files"] = std::move(files);
    fmt::print("{}\n", j.dump(2));
    return;
  }
  if (global.quiet) return;
  if (dry_run) {
    fmt::print("plan for {}: {} tensors ({} edited, {} copied), {} of tensor data in {} file(s); "
               "memory in flight at most {}\n",
               report.plan.output.string(), report.tensors_edited + report.tensors_copied, report.tensors_edited,
               report.tensors_copied, human_bytes(double(report.plan.total_bytes)), report.plan.shards.size(),
               human_bytes(double(report.peak_chunk_bytes)));
    for (const auto& shard : report.plan.shards) {
      fmt::print("  {}  ({}, {} tensors)\n", shard.path.string(), human_bytes(double(shard.layout.file_size)),
                 shard.layout.tensors.size());
      for (const auto& t : shard.layout.tensors) {
        fmt::print("    {:<48} {:<8} {:<20} {:>12}\n", t.name, dtype_name(t.dtype), shape_text(t.shape), t.num_bytes());
      }
    }
    fmt::print("dry run: nothing written\n");
    return;
  }
  double rate = report.seconds > 0 ? double(report.bytes_read + report.bytes_written) / report.seconds : 0;
  fmt::print("wrote {} ({} file(s), {} tensors: {} edited, {} copied, {}) in {:.2f} s ({}/s read+write)\n",
             report.plan.output.string(), report.plan.shards.size(), report.tensors_edited + report.tensors_copied,
             report.tensors_edited, report.tensors_copied, human_bytes(double(report.bytes_written)), report.seconds,
             human_bytes(rate));
  if (!report.auxiliary_files.empty()) fmt::print("  with {}\n", fmt::join(report.auxiliary_files, ", "));
}

std::pair<std::string, double> split_term(const std::string& text) {
  auto colon = text.rfind(':');
  if (colon == std::string::npos) return {text, 1.0};
  std::string number = text.substr(colon + 1);
  char* end = nullptr;
  double value = std::strtod(number.c_str(), &end);
  if (number.empty() || end != number.c_str() + number.size() || !std::isfinite(value)) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("-t '{}': the scaling coefficient after ':' must be a number, e.g. tau.safetensors:-0.5", text));
  }
  return {text.substr(0, colon), value};
}

}  // namespace taskvec::cli
