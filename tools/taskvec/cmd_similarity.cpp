// taskvec similarity [--base PRE] A B C ...: cosine similarity matrix, norms and sign conflicts of
// task vectors (fine-tuned models minus --base, or task-vector files).
#include <filesystem>
#include <nlohmann/json.hpp>

#include <fmt/format.h>

#include "cli.hpp"
#include "taskvec/error.hpp"

namespace taskvec::cli {

void add_similarity_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand("similarity", "Cosine similarity, norms and sign conflicts of task vectors");
  struct Args {
    std::string base, format = "table", include, exclude;
    std::vector<std::string> models;
    unsigned threads = 0;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("--base", args->base, "Pretrained checkpoint: inputs are fine-tuned models (tau = model - base); "
                                        "without it, inputs are task-vector files");
  cmd->add_option("models", args->models, "[NAME=]PATH of each model or task vector (at least 2)")->required();
  cmd->add_option("--format", args->format, "table, csv or json (--json implies json)")
      ->check(CLI::IsMember({"table", "csv", "json"}));
  cmd->add_option("--include", args->include, "Only tensors matching this regex");
  cmd->add_option("--exclude", args->exclude, "Skip tensors matching this regex");
  cmd->add_option("--threads", args->threads, "Worker threads (default: all cores)");
  cmd->callback([&global, &action, args] {
    action = [&global, args] {
      std::optional<Checkpoint> base;
      if (!args->base.empty()) base.emplace(Checkpoint::open(args->base));
      std::vector<std::pair<std::string, Checkpoint>> opened;
      for (const auto& spec : args->models) {
        auto eq = spec.find('=');
        std::string path = eq == std::string::npos ? spec : spec.substr(eq + 1);
        std::string name = eq == std::string::npos ? std::filesystem::path(path).stem().string() : spec.substr(0, eq);
        opened.emplace_back(name, Checkpoint::open(path));
      }
      std::vector<std::pair<std::string, const Checkpoint*>> models;
      for (const auto& [name, ckpt] : opened) models.emplace_back(name, &ckpt);
      EditOptions options;
      options.include = args->include;
      options.exclude = args->exclude;
      options.threads = args->threads;
      SimilarityReport r = task_vector_similarity(base ? &*base : nullptr, models, options);
      const std::size_t n = r.names.size();
      for (const auto& w : r.warnings) fmt::print(stderr, "taskvec: warning: {}\n", w);
      const bool weights = r.compared == "weights";
      if (global.json || args->format == "json") {
        nlohmann::ordered_json j{{"compared", r.compared}, {"names", r.names},   {"norms", r.norms},
                                 {"cosine", r.cosine},     {"sign_conflict", r.sign_conflict}, {"warnings", r.warnings}};
        fmt::print("{}\n", j.dump(2));
      } else if (args->format == "csv") {
        fmt::print("name");
        for (const auto& name : r.names) fmt::print(",{}", name);
        fmt::print("\n");
        for (std::size_t i = 0; i < n; ++i) {
          fmt::print("{}", r.names[i]);
          for (std::size_t k = 0; k < n; ++k) fmt::print(",{:.6f}", r.cosine[i][k]);
          fmt::print("\n");
        }
      } else {
        fmt::print("{}\n{:>16}",
                   weights ? "cosine similarity of the checkpoints' weights (not task vectors: pass --base PRE to "
                             "compare task vectors)"
                           : "cosine similarity of task vectors",
                   "");
        for (const auto& name : r.names) fmt::print(" {:>10.10}", name);
        fmt::print(" {:>12}\n", "norm");
        for (std::size_t i = 0; i < n; ++i) {
          fmt::print("{:>16.16}", r.names[i]);
          for (std::size_t k = 0; k < n; ++k) fmt::print(" {:>10.4f}", r.cosine[i][k]);
          fmt::print(" {:>12.6g}\n", r.norms[i]);
        }
        fmt::print("\nsign conflicts (fraction of coordinates where both are non-zero and signs differ)\n");
        for (std::size_t i = 0; i < n; ++i) {
          for (std::size_t k = i + 1; k < n; ++k) {
            fmt::print("  {} vs {}: {:.4f}\n", r.names[i], r.names[k], r.sign_conflict[i][k]);
          }
        }
      }
      return 0;
    };
  });
}

}  // namespace taskvec::cli
