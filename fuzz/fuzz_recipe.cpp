// Fuzz target: parse_recipe (YAML merge recipes) on arbitrary text, then the per-tensor parameter
// resolution a merge would run for a few typical tensor names.
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "taskvec/merge.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace taskvec;
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_only_taskvec_errors([&] {
    const Recipe r = parse_recipe(text, "/recipes/fuzz.yaml");
    fuzz::check(r.method != nullptr, "a parsed recipe has a method");
    fuzz::check(!r.models.empty(), "a parsed recipe has models");
    std::vector<MergeModelParams> model_params;
    MergeGlobalParams global;
    for (const char* name : {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
                             "model.layers.7.self_attn.q_proj.weight", "lm_head.weight"}) {
      r.resolve(name, 8, model_params, global);
      fuzz::check(model_params.size() == r.models.size(), "one parameter set per model");
    }
  });
  return 0;
}
