// Internal helpers shared by the engine's two drivers (linear_edit.cpp, merge_driver.cpp).
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <regex>
#include <string>
#include <vector>

#include "taskvec/checkpoint.hpp"

namespace taskvec::detail {

/// "[2, 3]" for messages.
std::string shape_text(const std::vector<std::uint64_t>& shape);

/// --include / --exclude (EditOptions): a tensor is selected when its name matches `include` (if
/// given) and does not match `exclude` (if given); ECMAScript, std::regex_search. The constructor
/// throws Error{kInvalidArgument} naming the flag for an invalid pattern.
class TensorFilter {
 public:
  TensorFilter(const std::string& include, const std::string& exclude);
  bool selects(const std::string& name) const;

 private:
  std::optional<std::regex> include_, exclude_;
};

/// A private folder under the system temp dir (for rewritten auxiliary files), removed with its
/// contents on destruction. Throws Error{kIo} if it cannot be created.
struct ScratchFolder {
  std::filesystem::path path;
  ScratchFolder();
  ~ScratchFolder();
  ScratchFolder(const ScratchFolder&) = delete;
  ScratchFolder& operator=(const ScratchFolder&) = delete;
};

/// The base folder's auxiliary files (config.json, tokenizer, ...) to copy into a folder output. When
/// the base's tied head was untied (reconcile_tied_embeddings), config.json is replaced by a copy with
/// "tie_word_embeddings": false written into `scratch` (a folder the caller creates and removes).
std::vector<std::filesystem::path> output_auxiliary_files(const Checkpoint& base, bool untied_base,
                                                          const std::filesystem::path& scratch);

}  // namespace taskvec::detail
