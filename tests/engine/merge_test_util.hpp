// Helpers for the merge kernel tests: a tiny tensor case and a runner.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "taskvec/merge.hpp"

namespace taskvec::testing_merge {

struct Case {
  std::string name = "layers.0.w";
  std::vector<std::uint64_t> shape;
  std::vector<float> base;
  std::vector<std::vector<float>> models;
  std::vector<MergeModelParams> params;
  MergeGlobalParams global;
  std::vector<float> thresholds;
  std::vector<std::string>* notes = nullptr;  ///< receives the kernel's notes when set

  /// base + tau for each task vector; params default (weight 1, density 1).
  static Case from_taus(std::vector<float> base, const std::vector<std::vector<float>>& taus) {
    Case c;
    c.shape = {base.size()};
    c.base = std::move(base);
    for (const auto& t : taus) {
      std::vector<float> m(t.size());
      for (std::size_t i = 0; i < t.size(); ++i) m[i] = c.base[i] + t[i];
      c.models.push_back(std::move(m));
    }
    c.params.resize(taus.size());
    return c;
  }
  void set_density(float d) {
    for (auto& p : params) p.density = d;
  }
  std::vector<float> run(MergeKernel kernel) const {
    std::vector<std::span<const float>> spans(models.begin(), models.end());
    MergeTensor in;
    in.name = name;
    in.shape = shape;
    in.base = base;
    in.models = spans;
    in.model_params = params;
    in.global = global;
    in.trim_thresholds = thresholds;
    in.notes = notes;
    std::vector<float> out(in.element_count());
    kernel(in, out);
    return out;
  }
};

}  // namespace taskvec::testing_merge
