// Multi-stage recipes (mergekit-multi): named stages run in dependency order, a stage's name used as a
// model path means its output. docs/METHODS.md "Multi-stage recipes".
#include <fmt/format.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <filesystem>
#include <map>
#include <random>
#include <set>

#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {

namespace {

namespace fs = std::filesystem;

// The stage names a recipe refers to among `names` (its base_model and model paths, as written).
std::set<std::string> references(const Recipe& r, const std::set<std::string>& names) {
  std::set<std::string> out;
  const auto check = [&](const fs::path& p) {
    if (names.count(p.string())) out.insert(p.string());
  };
  if (r.base_model) check(*r.base_model);
  for (const auto& m : r.models) check(m.path);
  if (r.tokenizer) {
    if (r.tokenizer->source == RecipeTokenizer::Source::kModel) check(r.tokenizer->model.path);
    for (const auto& [token, e] : r.tokenizer->tokens) check(e.model.path);
  }
  return out;
}

constexpr std::string_view kStagesPrefix = ".taskvec-stages-";

// Temporary folders of earlier runs beside `output` whose process no longer exists (killed or
// interrupted before it could remove them): ".taskvec-stages-PID-XXXXXXXX" with PID not alive.
void remove_stale_stage_folders(const fs::path& parent) {
  std::error_code ec;
  for (fs::directory_iterator it(parent, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!name.starts_with(kStagesPrefix) || !it->is_directory(ec)) continue;
    const std::string rest = name.substr(kStagesPrefix.size());
    const auto dash = rest.find('-');
    if (dash == std::string::npos || dash == 0 || rest.find_first_not_of("0123456789") != dash) continue;
    const long pid = std::stol(rest.substr(0, dash));
    if (pid <= 0 || pid == static_cast<long>(::getpid())) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive (or not ours to judge)
    std::error_code rm;
    fs::remove_all(it->path(), rm);
  }
}

// Removes a temporary folder of intermediates when the run ends, however it ends.
struct TemporaryFolder {
  fs::path path;
  ~TemporaryFolder() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

}  // namespace

EditReport merge_stages(const std::vector<Recipe>& stages, const fs::path& output, const EditOptions& options,
                        const fs::path& intermediate_dir, bool rerun) {
  if (stages.empty()) throw Error(ErrorCode::kInvalidArgument, "merge_stages: no stage");
  if (stages.size() == 1 && intermediate_dir.empty()) return merge_checkpoints(stages.front(), output, options);
  const std::string file = stages.front().file.string();
  std::error_code ec;
  std::set<std::string> names;
  for (const auto& s : stages)
    if (s.name) names.insert(*s.name);
  // Dependencies, and the final stage: the unnamed one, else the one stage no other refers to.
  std::vector<std::set<std::string>> deps;
  std::set<std::string> referenced;
  for (const auto& s : stages) {
    deps.push_back(references(s, names));
    if (s.name && deps.back().count(*s.name))
      throw Error(ErrorCode::kRecipe, fmt::format("{}: stage '{}' uses its own output as a model", file, *s.name));
    referenced.insert(deps.back().begin(), deps.back().end());
  }
  std::optional<std::size_t> final_stage;
  for (std::size_t i = 0; i < stages.size(); ++i)
    if (!stages[i].name) final_stage = i;
  if (!final_stage) {
    std::vector<std::string> sinks;
    for (std::size_t i = 0; i < stages.size(); ++i)
      if (!referenced.count(*stages[i].name)) {
        sinks.push_back(*stages[i].name);
        final_stage = i;
      }
    if (sinks.size() != 1)
      throw Error(ErrorCode::kRecipe,
                  fmt::format("{}: {} stages are used by no other ({}): leave the 'name' out of the one to write to the "
                              "output", file, sinks.size(), fmt::format("{}", fmt::join(sinks, ", "))));
  }
  // Topological order (Kahn), file order among the ready ones.
  std::vector<std::size_t> order;
  std::set<std::string> done;
  std::vector<bool> placed(stages.size(), false);
  while (order.size() < stages.size()) {
    bool progress = false;
    for (std::size_t i = 0; i < stages.size(); ++i) {
      if (placed[i]) continue;
      if (!std::includes(done.begin(), done.end(), deps[i].begin(), deps[i].end())) continue;
      placed[i] = true;
      order.push_back(i);
      if (stages[i].name) done.insert(*stages[i].name);
      progress = true;
    }
    if (!progress) {
      // The unplaced stages wait on a cycle; name those in it: leave out, again and again, the ones no
      // other unplaced stage waits on.
      std::vector<bool> in_cycle(stages.size());
      for (std::size_t i = 0; i < stages.size(); ++i) in_cycle[i] = !placed[i];
      for (bool removed = true; removed;) {
        removed = false;
        for (std::size_t i = 0; i < stages.size(); ++i) {
          if (!in_cycle[i] || !stages[i].name) {
            if (in_cycle[i] && !stages[i].name) in_cycle[i] = false, removed = true;  // the final stage: no one waits on it
            continue;
          }
          bool waited_on = false;
          for (std::size_t j = 0; j < stages.size() && !waited_on; ++j) waited_on = in_cycle[j] && deps[j].count(*stages[i].name);
          if (!waited_on) in_cycle[i] = false, removed = true;
        }
      }
      std::vector<std::string> stuck;
      for (std::size_t i = 0; i < stages.size(); ++i)
        if (in_cycle[i]) stuck.push_back(*stages[i].name);
      throw Error(ErrorCode::kRecipe, fmt::format("{}: the stages {} use each other's outputs in a cycle", file,
                                                  fmt::format("{}", fmt::join(stuck, ", "))));
    }
  }
  if (options.dry_run || options.explain)
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("{}: {} plans one merge, and this recipe has {} stages whose later ones read the earlier "
                            "ones' outputs; plan a stage on its own", file, options.dry_run ? "--dry-run" : "--explain",
                            stages.size()));
  if (fs::exists(output, ec) && !options.write.force)
    throw Error(ErrorCode::kOutputExists, fmt::format("{} already exists (use --force to replace it)", output.string()));
  // Where the intermediates go.
  TemporaryFolder temporary;
  fs::path folder = intermediate_dir;
  if (folder.empty()) {
    std::random_device rd;
    const fs::path parent = output.has_parent_path() ? output.parent_path() : fs::path(".");
    remove_stale_stage_folders(parent);
    folder = parent / fmt::format("{}{}-{:08x}", kStagesPrefix, static_cast<long>(::getpid()), rd());
    temporary.path = folder;
  }
  fs::create_directories(folder, ec);
  if (ec) throw Error(ErrorCode::kIo, fmt::format("{}: cannot create the folder for intermediate stages: {}", folder.string(), ec.message()));

  std::map<std::string, fs::path> outputs;  // stage name -> its output folder
  std::vector<std::string> warnings;
  EditReport final_report;
  for (std::size_t i : order) {
    Recipe stage = stages[i];
    const auto resolve = [&](fs::path& p) {
      if (const auto it = outputs.find(p.string()); it != outputs.end()) {
        p = it->second;
        stage.stage_inputs[p.string()] = it->first;
      }
    };
    if (stage.base_model) resolve(*stage.base_model);
    for (auto& m : stage.models) resolve(m.path);
    if (stage.tokenizer) {
      if (stage.tokenizer->source == RecipeTokenizer::Source::kModel) resolve(stage.tokenizer->model.path);
      for (auto& [token, e] : stage.tokenizer->tokens)
        if (!e.model.path.empty()) resolve(e.model.path);
    }
    const std::string label = stage.name ? *stage.name : "(final)";
    const bool is_final = i == *final_stage;
    const fs::path out = is_final ? output : folder / *stage.name;
    if (!is_final && !rerun && !intermediate_dir.empty() && fs::exists(out)) {
      warnings.push_back(fmt::format("stage '{}': {} exists already and is used as it is (--no-lazy recomputes it)", label,
                                     out.string()));
      outputs[*stage.name] = out;
      continue;
    }
    EditOptions stage_options = options;
    if (!is_final) {
      stage_options.write.force = rerun || intermediate_dir.empty();
      stage_options.dry_run = false;
    }
    EditReport report = merge_checkpoints(stage, out, stage_options);
    for (const auto& w : report.warnings) warnings.push_back(fmt::format("stage '{}': {}", label, w));
    if (!is_final) {
      outputs[*stage.name] = out;
    } else {
      final_report = std::move(report);
    }
  }
  final_report.warnings = std::move(warnings);
  return final_report;
}

}  // namespace taskvec
