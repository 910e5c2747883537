// Writes a recipe into a test folder and loads it as `taskvec merge` run from that folder would: relative
// model paths (which resolve against the working directory, as in mergekit) are anchored to the folder,
// so tests need not change the process's working directory. One helper for every engine test.
#pragma once

#include <fstream>
#include <string>

#include "support/temp_dir.hpp"
#include "taskvec/merge.hpp"

namespace taskvec::test {

inline Recipe recipe_at(const TempDir& dir, const std::string& yaml) {
  const auto path = dir / "recipe.yaml";
  std::ofstream(path) << yaml;
  Recipe r = load_recipe(path);
  const auto anchor = [&](std::filesystem::path& p) {
    if (p.is_relative()) p = dir.path() / p;
  };
  if (r.base_model) anchor(*r.base_model);
  if (r.base_model_adapter) anchor(*r.base_model_adapter);
  for (auto& m : r.models) {
    anchor(m.path);
    if (m.adapter) anchor(*m.adapter);
  }
  return r;
}

}  // namespace taskvec::test
