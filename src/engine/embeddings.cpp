// Tied word embeddings: many decoder LMs store no lm_head.weight and reuse the input embedding as the
// output head. Merging such a checkpoint with one that has its own head must not silently drop or
// invent a head; see reconcile_tied_embeddings in include/taskvec/engine.hpp.
#include <array>
#include <cstdlib>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "engine/internal.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

// The embedding a missing head is tied to, or nullptr if the checkpoint is not tied.
const char* tied_embedding(const Checkpoint& ckpt) {
  if (ckpt.find(kHeadName) != nullptr) return nullptr;
  // config says untied (every tie_word_embeddings flag, nested sub-configs included): a head is simply missing
  if (detail::config_ties_embeddings(ckpt) == false) return nullptr;
  for (const char* name : detail::kEmbeddingNames) {
    if (ckpt.find(name) != nullptr) return name;
  }
  return nullptr;
}

}  // namespace

ReconciledInputs reconcile_tied_embeddings(const std::vector<const Checkpoint*>& inputs, bool untie) {
  ReconciledInputs result;
  std::vector<const char*> tied(inputs.size(), nullptr);
  const Checkpoint* with_head = nullptr;
  const Checkpoint* tied_one = nullptr;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    tied[i] = tied_embedding(*inputs[i]);
    if (tied[i] != nullptr && tied_one == nullptr) tied_one = inputs[i];
    if (inputs[i]->find(kHeadName) != nullptr && with_head == nullptr) with_head = inputs[i];
  }
  for (const Checkpoint* c : inputs) result.inputs.push_back(*c);
  if (tied_one == nullptr || with_head == nullptr) return result;  // all tied or none: nothing to do
  if (!untie) {
    throw Error(ErrorCode::kTensorMissing,
                fmt::format("{} has no {} (its head is tied to its input embedding {}) but {} has its own {}; "
                            "pass --untie-embeddings to read the tied checkpoints' head from their embedding "
                            "(the output then has its own {} and its config.json says tie_word_embeddings: false)",
                            tied_one->path().string(), kHeadName, tied_embedding(*tied_one), with_head->path().string(),
                            kHeadName, kHeadName));
  }
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (tied[i] == nullptr) continue;
    result.inputs[i].add_alias(kHeadName, tied[i]);
    result.warnings.push_back(fmt::format("--untie-embeddings: {} of {} is read from its tied {}", kHeadName,
                                          inputs[i]->path().string(), tied[i]));
    if (i == 0) result.untied_base = true;
  }
  return result;
}

}  // namespace taskvec


namespace taskvec::detail {

std::string shape_text(const std::vector<std::uint64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ", ")); }

namespace {

std::optional<std::regex> compile_regex(const std::string& pattern, const char* flag) {
  if (pattern.empty()) return std::nullopt;
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw Error(ErrorCode::kInvalidArgument, fmt::format("{} '{}' is not a valid regular expression: {}", flag, pattern, e.what()));
  }
}

}  // namespace

TensorFilter::TensorFilter(const std::string& include, const std::string& exclude)
    : include_(compile_regex(include, "--include")), exclude_(compile_regex(exclude, "--exclude")) {}

bool TensorFilter::selects(const std::string& name) const {
  if (include_ && !std::regex_search(name, *include_)) return false;
  if (exclude_ && std::regex_search(name, *exclude_)) return false;
  return true;
}

}  // namespace taskvec::detail
