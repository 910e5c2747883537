// YAML recipes: valid recipes parse to the expected values; every error case raises kRecipe.
#include <gtest/gtest.h>

#include <cmath>

#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

ErrorCode code_of(const std::string& yaml) {
  try {
    parse_recipe(yaml, "r.yaml");
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;  // parsed: not an error
}

std::string message_of(const std::string& yaml) {
  try {
    parse_recipe(yaml, "r.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Recipe, ParsesTiesRecipe) {
  const Recipe r = parse_recipe(R"(
merge_method: ties
base_model: base.safetensors
models:
  - model: a.safetensors
    parameters: {weight: 0.7, density: 0.4}
  - model: /abs/b.safetensors
parameters:
  lambda: 0.9
  density: 0.3
  disjoint: sum
dtype: bfloat16
out_dtype: float16
seed: 17
)",
                                "/recipes/r.yaml");
  EXPECT_EQ(r.method->name, "ties");
  // Paths stay as written: mergekit resolves them against the working directory, not the recipe's folder.
  EXPECT_EQ(*r.base_model, std::filesystem::path("base.safetensors"));
  ASSERT_EQ(r.models.size(), 2u);
  EXPECT_EQ(r.models[0].path, std::filesystem::path("a.safetensors"));
  EXPECT_EQ(r.models[1].path, std::filesystem::path("/abs/b.safetensors"));
  EXPECT_EQ(*r.dtype, DType::kBF16);
  EXPECT_EQ(*r.out_dtype, DType::kF16);
  EXPECT_EQ(r.seed, 17u);
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  r.resolve("model.layers.0.w", 4, mp, gp);
  ASSERT_EQ(mp.size(), 2u);
  EXPECT_FLOAT_EQ(mp[0].weight, 0.7f);
  EXPECT_FLOAT_EQ(mp[0].density, 0.4f);
  EXPECT_FLOAT_EQ(mp[1].weight, 1.0f);    // method default
  EXPECT_FLOAT_EQ(mp[1].density, 0.3f);   // global default of a model parameter
  EXPECT_FLOAT_EQ(gp.lambda, 0.9f);
  EXPECT_EQ(gp.divisor, MergeDivisor::kNone);
  EXPECT_FALSE(gp.trim_model);
  EXPECT_EQ(gp.seed, 17u);
}

TEST(Recipe, MethodDefaults) {
  const Recipe r = parse_recipe("merge_method: linear\nmodels: [a, b]\n");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  r.resolve("x", 1, mp, gp);
  EXPECT_TRUE(gp.normalize);  // linear normalizes by default
  EXPECT_FALSE(r.base_model);
  // mergekit's registry: dare_ties has density 1, rescale true (L1 norm match), normalize false.
  const Recipe d = parse_recipe("merge_method: dare_ties\nbase_model: b\nmodels: [a]\n");
  d.resolve("x", 1, mp, gp);
  EXPECT_FLOAT_EQ(mp[0].density, 1.0f);
  EXPECT_EQ(gp.rescale, MergeRescale::kL1Norm);
  EXPECT_FALSE(gp.normalize);
  EXPECT_EQ(gp.divisor, MergeDivisor::kNone);
}

TEST(Recipe, EmptyParameterBlocksAreAllowed) {
  const Recipe r = parse_recipe("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\nparameters:\n");
  EXPECT_TRUE(r.params.empty());
  EXPECT_TRUE(r.models[0].params.empty());
}

TEST(Recipe, MergekitNormalizeChoosesTheTiesDivisor) {
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  const std::string base = "base_model: b\nmodels: [a]\n";
  parse_recipe("merge_method: dare_ties\n" + base + "parameters: {normalize: true}\n").resolve("x", 1, mp, gp);
  EXPECT_EQ(gp.divisor, MergeDivisor::kSignedWeights);
  parse_recipe("merge_method: ties\n" + base + "parameters: {normalize: false}\n").resolve("x", 1, mp, gp);
  EXPECT_EQ(gp.divisor, MergeDivisor::kNone);
  parse_recipe("merge_method: ties\n" + base + "parameters: {disjoint: sum}\n").resolve("x", 1, mp, gp);
  EXPECT_EQ(gp.divisor, MergeDivisor::kNone);
  parse_recipe("merge_method: ties\n" + base + "parameters: {disjoint: mean}\n").resolve("x", 1, mp, gp);
  EXPECT_EQ(gp.divisor, MergeDivisor::kAbsWeights);
  // mergekit's per-method defaults: ties and della normalize, dare_ties and breadcrumbs_ties sum.
  for (const auto& [method, divisor] : std::vector<std::pair<std::string, MergeDivisor>>{
           {"ties", MergeDivisor::kSignedWeights}, {"della", MergeDivisor::kSignedWeights},
           {"dare_ties", MergeDivisor::kNone}, {"breadcrumbs_ties", MergeDivisor::kNone}}) {
    parse_recipe("merge_method: " + method + "\n" + base).resolve("x", 1, mp, gp);
    EXPECT_EQ(gp.divisor, divisor) << method;
    EXPECT_FLOAT_EQ(mp[0].density, 1.0f) << method;
  }
}

TEST(Recipe, LayerIndex) {
  EXPECT_EQ(merge_layer_index("model.layers.12.mlp.down_proj.weight"), 12);
  EXPECT_EQ(merge_layer_index("transformer.h.3.attn.c_attn.weight"), 3);
  EXPECT_EQ(merge_layer_index("blocks.0.norm.weight"), 0);
  EXPECT_EQ(merge_layer_index("encoder.layer.7.output.dense.bias"), 7);
  EXPECT_EQ(merge_layer_index("model.embed_tokens.weight"), -1);
  EXPECT_EQ(merge_layer_index("lm_head.weight"), -1);
  EXPECT_EQ(merge_layer_index("layers.x.w"), -1);
}

TEST(Recipe, LayerListIsInterpolatedOverLayers) {
  const Recipe r = parse_recipe(R"(
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters:
      weight: [0.0, 1.0, 0.5]
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  // 5 layers: positions 0, 0.5, 1, 1.5, 2 over the list
  const float want[] = {0.0f, 0.5f, 1.0f, 0.75f, 0.5f};
  for (int l = 0; l < 5; ++l) {
    r.resolve("model.layers." + std::to_string(l) + ".w", 5, mp, gp);
    EXPECT_FLOAT_EQ(mp[0].weight, want[l]) << l;
  }
  r.resolve("model.embed_tokens.weight", 5, mp, gp);  // no layer index: first value
  EXPECT_FLOAT_EQ(mp[0].weight, 0.0f);
  r.resolve("model.layers.0.w", 1, mp, gp);  // mergekit: a model of one layer sits at t = 1, the last value
  EXPECT_FLOAT_EQ(mp[0].weight, 0.5f);
}

TEST(Recipe, FiltersApplyByTensorNameFirstMatchWins) {
  const Recipe r = parse_recipe(R"(
merge_method: slerp
base_model: base
models: [other]
parameters:
  t:
    - filter: self_attn
      value: 0.25
    - filter: mlp
      value: [0.0, 1.0]
    - filter: attn
      value: 0.9
    - value: 0.5
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  r.resolve("model.layers.1.self_attn.q.weight", 3, mp, gp);
  EXPECT_FLOAT_EQ(gp.t, 0.25f);
  r.resolve("model.layers.1.mlp.up.weight", 3, mp, gp);
  EXPECT_FLOAT_EQ(gp.t, 0.5f);
  r.resolve("model.layers.2.mlp.up.weight", 3, mp, gp);
  EXPECT_FLOAT_EQ(gp.t, 1.0f);
  r.resolve("model.layers.1.cross_attn.weight", 3, mp, gp);
  EXPECT_FLOAT_EQ(gp.t, 0.9f);
  r.resolve("model.norm.weight", 3, mp, gp);
  EXPECT_FLOAT_EQ(gp.t, 0.5f);
}

TEST(Recipe, FilterWithoutDefaultFallsBackToMethodDefault) {
  const Recipe r = parse_recipe(R"(
merge_method: ties
base_model: base
models: [a]
parameters:
  density: [{filter_regex: "^lm_head", value: 0.9}]
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  r.resolve("lm_head.weight", 1, mp, gp);
  EXPECT_FLOAT_EQ(mp[0].density, 0.9f);
  r.resolve("other.lm_head.weight", 1, mp, gp);  // the regex is anchored
  EXPECT_FLOAT_EQ(mp[0].density, 1.0f);          // mergekit's default density
}

// mergekit's filter is `filter in tensor_name`: "layers.1." does not match layers.10, "*" matches
// everything, and regex characters are literal. taskvec's regex is the explicit filter_regex key.
TEST(Recipe, FilterIsASubstringAsInMergekit) {
  const Recipe r = parse_recipe(R"(
merge_method: task_arithmetic
base_model: b
models:
  - model: a
    parameters:
      weight:
        - {filter: "layers.1.", value: 0.1}
        - {filter: "^model", value: 0.2}
        - {filter_regex: "layers\\.2[0-9]\\.", value: 0.3}
        - {filter: "*", value: 0.4}
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  const std::vector<std::pair<std::string, float>> want = {{"model.layers.1.mlp.w", 0.1f},
                                                           {"model.layers.10.mlp.w", 0.4f},
                                                           {"x.^model.w", 0.2f},
                                                           {"model.layers.23.w", 0.3f},
                                                           {"lm_head.weight", 0.4f}};
  for (const auto& [name, w] : want) {
    r.resolve(name, 30, mp, gp);
    EXPECT_FLOAT_EQ(mp[0].weight, w) << name;
  }
}

TEST(Recipe, ErrorsAreRecipeErrors) {
  const std::string base = "base_model: b\nmodels: [a]\n";
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "slices: []\n"), ErrorCode::kRecipe);                // unknown key
  EXPECT_EQ(code_of("merge_method: frankenmerge\n" + base), ErrorCode::kRecipe);                         // unknown method
  EXPECT_EQ(code_of(base), ErrorCode::kRecipe);                                                          // no method
  EXPECT_EQ(code_of("merge_method: ties\nbase_model: b\n"), ErrorCode::kRecipe);                        // no models
  EXPECT_EQ(code_of("merge_method: ties\nmodels: [a]\n"), ErrorCode::kRecipe);                          // base missing
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: 0}\n"), ErrorCode::kRecipe);   // density 0
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: -1.5}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [0.5, -0.2]}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: high}\n"), ErrorCode::kRecipe); // wrong type
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {densty: 0.5}\n"), ErrorCode::kRecipe);  // unknown param
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {disjoint: median}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {lambda: {a: 1}}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    weight: 1\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\nbase_model: b\nmodels:\n  - parameters: {weight: 1}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: della\n" + base + "parameters: {density: 0.5, epsilon: 0.6}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: della\n" + base + "parameters: {density: 0.9, epsilon: 0.2}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n"
                    "    parameters: {weight: -1}\n"),
            ErrorCode::kRecipe);  // normalize with weights summing to 0
  EXPECT_EQ(code_of("merge_method: slerp\nmodels: [a, b, c]\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: slerp\nmodels: [a]\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "dtype: int8\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "seed: -3\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "seed: abc\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [{filter_regex: '(', value: 0.5}]}\n"),
            ErrorCode::kRecipe);  // bad regex
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [{filter: a, filter_regex: b, value: 1}]}\n"),
            ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [{filter: x}]}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [0.5, {value: 0.5}]}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {normalize: true, disjoint: sum}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: model_stock\n" + base + "parameters: {normalise: true}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {rescale: l3}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\nbase_model: b\nmodels: [b]\n"), ErrorCode::kRecipe);  // only the base
  EXPECT_EQ(code_of("merge_method: consensus\n" + base + "parameters: {k: 1.5}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {trim: [tensor, model]}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("- just\n- a list\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {lambda: .inf}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {lambda: .nan}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ~\n" + base), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\nbase_model: b\nmodels: [~]\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [[0.5]]}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: {density: [{value: {a: 1}}]}\n"), ErrorCode::kRecipe);
  EXPECT_EQ(code_of("merge_method: [ties\n"), ErrorCode::kRecipe);  // invalid YAML
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "? {a: 1}\n: 2\n"), ErrorCode::kRecipe);  // mapping as a key
  EXPECT_EQ(code_of("merge_method: ties\n" + base + "parameters: [1, 2]\n"), ErrorCode::kRecipe);
}

TEST(Recipe, ZeroWeightSumWithFiltersIsCaughtPerTensor) {
  const Recipe r = parse_recipe(R"(
merge_method: linear
models:
  - model: a
    parameters: {weight: [{filter: attn, value: 0}, {value: 1}]}
parameters: {normalize: true}
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  EXPECT_NO_THROW(r.resolve("mlp.w", 1, mp, gp));
  try {
    r.resolve("attn.w", 1, mp, gp);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kRecipe);
  }
}

TEST(Recipe, MessagesNameKeyFileAndLine) {
  const std::string msg = message_of("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters:\n  density: -2\n");
  EXPECT_NE(msg.find("r.yaml:5"), std::string::npos) << msg;
  EXPECT_NE(msg.find("density"), std::string::npos) << msg;
  const std::string unk = message_of("merge_method: ties\nbase_model: b\nmodels: [a]\ntokenizer_sorce: base\n");
  EXPECT_NE(unk.find("tokenizer_sorce"), std::string::npos) << unk;
  EXPECT_NE(unk.find("did you mean 'tokenizer_source'?"), std::string::npos) << unk;
  EXPECT_NE(unk.find("r.yaml:4"), std::string::npos) << unk;
}

TEST(Recipe, LoadRecipeMissingFileIsIo) {
  try {
    load_recipe("/nonexistent/recipe.yaml");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
  }
}

}  // namespace
}  // namespace taskvec

namespace taskvec {
namespace {

TEST(Recipe, ExampleRecipesParse) {
  const std::filesystem::path folder = std::filesystem::path(TASKVEC_SOURCE_DIR) / "examples" / "recipes";
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder)) {
    if (entry.path().extension() != ".yaml") continue;
    EXPECT_NO_THROW(load_recipe(entry.path())) << entry.path();
    ++count;
  }
  EXPECT_GE(count, 8);
}

// Filters that make std::regex backtrack exponentially (or by a high power of the name's length) are
// refused when the recipe is read; ordinary filters, lazy quantifiers and special characters inside a
// class are fine.
TEST(Recipe, FiltersThatBacktrackWithoutBoundAreRefused) {
  auto recipe_with = [](const std::string& filter) {
    return "merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {density: [{filter_regex: '" + filter +
           "', value: 0.5}]}\n";
  };
  for (const char* bad : {"a**", "a+*", "x*?*", "(a+)*", "(a|b)*", "((ab)*c)+", "(a{2,3})+", ".*.*.*.*.*x", "a?b?c?d?e?"}) {
    EXPECT_EQ(code_of(recipe_with(bad)), ErrorCode::kRecipe) << bad;
    EXPECT_NE(message_of(recipe_with(bad)).find(bad), std::string::npos) << message_of(recipe_with(bad));
  }
  for (const char* good : {"self_attn", "^model\\.embed", "layers\\.(1[0-9]|2[0-3])\\.", "mlp\\.(up|gate)_proj",
                           ".*?attn", "[*+?]x*", "a{2,3}b", "\\*+", "(ab)+c", "layers\\.[0-9]+\\..*\\.weight$"}) {
    const Recipe r = parse_recipe(recipe_with(good), "r.yaml");
    EXPECT_EQ(r.method->name, "ties") << good;
  }
}


// Aliases share the anchored node: one inside its own anchor makes a cycle (recursion used to overflow
// the stack), and a few lines of nested aliases expand to billions of nodes (the fuzzer timed out on
// one). Both are refused when the recipe is read; an ordinary alias (a shared parameters block) works.
TEST(Recipe, AliasCyclesAndExpansionBombsAreRefused) {
  const std::string cycle = "merge_method: linear\nmodels: &m\n  - model: a\n    parameters: {weight: *m}\n";
  EXPECT_EQ(code_of(cycle), ErrorCode::kRecipe);
  EXPECT_NE(message_of(cycle).find("r.yaml:4: 'models[0].parameters.weight': an alias refers to a collection that "
                                   "contains it (anchored on line 2)"),
            std::string::npos)
      << message_of(cycle);

  std::string bomb = "merge_method: linear\nmodels: [a]\nparameters:\n  x0: &a0 [1,1,1,1,1,1,1,1,1,1]\n";
  for (int level = 1; level <= 8; ++level) {  // 10^9 nodes once expanded
    bomb += "  x" + std::to_string(level) + ": &a" + std::to_string(level) + " [";
    for (int i = 0; i < 10; ++i) bomb += (i ? ",*a" : "*a") + std::to_string(level - 1);
    bomb += "]\n";
  }
  EXPECT_EQ(code_of(bomb), ErrorCode::kRecipe);
  EXPECT_NE(message_of(bomb).find("expands to more than 100000 YAML nodes"), std::string::npos) << message_of(bomb);

  std::string deep = "merge_method: linear\nmodels: [a]\nparameters: {x: ";
  for (int i = 0; i < 70; ++i) deep += "[";
  for (int i = 0; i < 70; ++i) deep += "]";
  deep += "}\n";
  EXPECT_NE(message_of(deep).find("nested more than 64 levels deep"), std::string::npos) << message_of(deep);

  const Recipe shared = parse_recipe(R"(
merge_method: ties
base_model: b
models:
  - model: x
    parameters: &p {weight: 0.25, density: 0.5}
  - model: y
    parameters: *p
)", "r.yaml");
  ASSERT_EQ(shared.models.size(), 2u);
  std::vector<MergeModelParams> per_model;
  MergeGlobalParams global;
  shared.resolve("w", 1, per_model, global);
  ASSERT_EQ(per_model.size(), 2u);
  EXPECT_DOUBLE_EQ(per_model[1].weight, 0.25);
  EXPECT_DOUBLE_EQ(per_model[1].density, 0.5);
}


// A stray ',' or ']' where a document starts: yaml-cpp's LoadAll returned the same empty document for
// ever on these (the fuzzer's ",52" timed out). They are invalid YAML, refused at once.
TEST(Recipe, StrayFlowTokensAreInvalidYaml) {
  EXPECT_NE(message_of(",52").find("r.yaml:1: invalid YAML: unexpected ','"), std::string::npos) << message_of(",52");
  EXPECT_NE(message_of("[1, 2]\n,\n").find("r.yaml:2: invalid YAML: unexpected ','"), std::string::npos)
      << message_of("[1, 2]\n,\n");
  EXPECT_EQ(code_of("merge_method: linear\nmodels: [a]\n]\n"), ErrorCode::kRecipe);
}

}  // namespace
}  // namespace taskvec

namespace taskvec {
namespace {

bool has_warning(const Recipe& r, const std::string& text) {
  for (const auto& w : r.warnings)
    if (w.find(text) != std::string::npos) return true;
  return false;
}

// mergekit ignores a parameter of another method and a global one under a model: warnings, not errors.
// A name no method knows is a misspelling: an error, with the closest name.
TEST(Recipe, ParametersWithoutEffectWarnAndMisspellingsSuggest) {
  const Recipe r = parse_recipe(R"(
merge_method: task_arithmetic
base_model: b
models:
  - model: a
    parameters: {weight: 0.5, density: 0.3, lambda: 2}
parameters: {gamma: 0.1, int8_mask: true}
)", "r.yaml");
  EXPECT_TRUE(has_warning(r, "r.yaml:6: 'models[0].parameters.density': has no effect on task_arithmetic")) << r.warnings.size();
  EXPECT_TRUE(has_warning(r, "'models[0].parameters.lambda': is a global parameter: under a model it has no effect"));
  EXPECT_TRUE(has_warning(r, "'parameters.gamma': has no effect on task_arithmetic"));
  EXPECT_EQ(r.warnings.size(), 3u);  // int8_mask is task_arithmetic's own (a memory hint)
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  r.resolve("w", 1, mp, gp);
  EXPECT_FLOAT_EQ(gp.lambda, 1.0f);  // the model-level lambda is ignored, as in mergekit

  const std::string typo = message_of("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {densty: 0.5}\n");
  EXPECT_NE(typo.find("'parameters.densty': unknown parameter (did you mean 'density'?)"), std::string::npos) << typo;
  const std::string method = message_of("merge_method: dare_tie\nbase_model: b\nmodels: [a]\n");
  EXPECT_NE(method.find("did you mean 'dare_ties'?"), std::string::npos) << method;
  const std::string key = message_of("merge_method: ties\nbase_model: b\nmodels: [a]\nparameter: {density: 0.5}\n");
  EXPECT_NE(key.find("did you mean 'parameters'?"), std::string::npos) << key;
  const std::string modules = message_of("merge_method: ties\nbase_model: b\nmodels: [a]\nmodules: {}\n");
  EXPECT_NE(modules.find("'modules': is a mergekit key taskvec does not support yet"), std::string::npos) << modules;
}

// mergekit's tokenizer keys (config.py's TokenizerConfig): the legacy and the modern form, token sources.
TEST(Recipe, TokenizerKeysAsMergekitReadsThem) {
  Recipe r = parse_recipe("merge_method: linear\nmodels: [a, b]\ntokenizer_source: union\n");
  ASSERT_TRUE(r.tokenizer);
  EXPECT_EQ(r.tokenizer->source, RecipeTokenizer::Source::kUnion);
  r = parse_recipe("merge_method: linear\nmodels: [a, b]\ntokenizer_source: b\n");
  EXPECT_EQ(r.tokenizer->source, RecipeTokenizer::Source::kModel);
  EXPECT_EQ(r.tokenizer->model.path, "b");
  // `tokenizer:` without a source means union, as mergekit's default.
  r = parse_recipe("merge_method: linear\nmodels: [a, b]\ntokenizer:\n  pad_to_multiple_of: 64\n  tokens:\n"
                   "    <x>: {source: a, force: true}\n    <y>: {source: {kind: zero}}\n"
                   "    <z>: {source: {kind: model_token, model: b, token_id: 7}}\n");
  EXPECT_EQ(r.tokenizer->source, RecipeTokenizer::Source::kUnion);
  EXPECT_EQ(r.tokenizer->pad_to_multiple_of, 64u);
  ASSERT_EQ(r.tokenizer->tokens.size(), 3u);
  EXPECT_EQ(r.tokenizer->tokens[0].first, "<x>");
  EXPECT_EQ(r.tokenizer->tokens[0].second.kind, RecipeTokenEmbedding::Kind::kModel);
  EXPECT_TRUE(r.tokenizer->tokens[0].second.force);
  EXPECT_EQ(r.tokenizer->tokens[1].second.kind, RecipeTokenEmbedding::Kind::kZero);
  EXPECT_EQ(r.tokenizer->tokens[2].second.kind, RecipeTokenEmbedding::Kind::kModelToken);
  EXPECT_EQ(r.tokenizer->tokens[2].second.token_id, 7);
  EXPECT_FALSE(r.tokenizer->tokens[2].second.force);
  r = parse_recipe("merge_method: linear\nmodels: [a, b]\nchat_template: llama3\n");
  EXPECT_EQ(r.chat_template, "llama3");
  EXPECT_FALSE(r.tokenizer);
  // A token without a source: a warning (mergekit would stop), the token is still added.
  r = parse_recipe("merge_method: linear\nmodels: [a, b]\ntokenizer:\n  tokens:\n    <x>:\n");
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find("has no source"), std::string::npos) << r.warnings[0];
  EXPECT_NE(message_of("merge_method: linear\nmodels: [a, b]\ntokenizer: {pad_to_multiple_of: 0}\n").find("pad_to_multiple_of"),
            std::string::npos);
  EXPECT_NE(message_of("merge_method: linear\nmodels: [a, b]\ntokenizer: {tokens: {x: {force: true}}}\n").find("force needs a source"),
            std::string::npos);
  EXPECT_NE(message_of("merge_method: linear\nmodels: [a, b]\ntokenizer: {tokens: {x: {source: {kind: one}}}}\n").find("unknown kind 'one'"),
            std::string::npos);
  EXPECT_NE(message_of("merge_method: linear\nmodels: [a, b]\nchat_template: '{x}'\n").find("nor a Jinja template"),
            std::string::npos);
}

// mergekit's README lists the base among the models; mergekit uses it only as the base.
TEST(Recipe, BaseListedAmongModelsIsOnlyTheBase) {
  const Recipe r = parse_recipe(R"(
merge_method: task_arithmetic
base_model: ./base
models:
  - model: base
    parameters: {weight: 0.3}
  - model: a
    parameters: {weight: 0.5}
  - model: c
    parameters: {weight: 0.5}
parameters: {normalize: true}
)", "r.yaml");
  ASSERT_EQ(r.models.size(), 2u);
  EXPECT_EQ(r.models[0].path, "a");
  EXPECT_EQ(r.models[1].path, "c");
  EXPECT_TRUE(has_warning(r, "'models[0]': is the base_model: used only as the base"));
  EXPECT_TRUE(has_warning(r, "its parameters are ignored"));
  // slerp: the base is the t = 0 end whatever its place in the list.
  const Recipe s = parse_recipe("merge_method: slerp\nbase_model: A\nmodels: [B, A]\nparameters: {t: 0.25}\n");
  ASSERT_EQ(s.models.size(), 1u);
  EXPECT_EQ(s.models[0].path, "B");
  // linear averages the base like any other model.
  const Recipe l = parse_recipe("merge_method: linear\nbase_model: A\nmodels: [A, B]\n");
  EXPECT_EQ(l.models.size(), 2u);
  // A base with an adapter is another model than the base without it.
  const Recipe a = parse_recipe("merge_method: ties\nbase_model: A\nmodels: [A+lora, B]\n");
  EXPECT_EQ(a.models.size(), 2u);
}

TEST(Recipe, SlicesParseWithTheirChecks) {
  const Recipe r = parse_recipe(R"(slices:
  - sources:
      - {model: a, layer_range: [0, 2], parameters: {weight: 0.5}}
      - {model: b, layer_range: [2, 4]}
    parameters: {weight: 2}
merge_method: linear
)", "r.yaml");
  ASSERT_EQ(r.slices.size(), 1u);
  ASSERT_EQ(r.models.size(), 2u);
  EXPECT_EQ(r.slices[0].sources[1].begin, 2);
  EXPECT_EQ(r.slices[0].layers(), 2);
  // mergekit's order: the source's value, then the slice's, then the global one.
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  r.resolve_at("w", 0, 2, {&r.slices[0].sources[0].params, &r.slices[0].sources[1].params}, &r.slices[0].params, mp, gp);
  EXPECT_FLOAT_EQ(mp[0].weight, 0.5f);
  EXPECT_FLOAT_EQ(mp[1].weight, 2.0f);
  const std::string head = "merge_method: passthrough\nslices:\n  - sources:\n";
  EXPECT_NE(message_of(head + "      - {model: a, layer_range: [-1, 2]}\n").find("starts before layer 0"), std::string::npos);
  EXPECT_NE(message_of(head + "      - {model: a, layer_range: [2, 2]}\n").find("holds no layer"), std::string::npos);
  EXPECT_NE(message_of(head + "      - {model: a, layer_rang: [0, 2]}\n").find("did you mean 'layer_range'?"), std::string::npos);
  EXPECT_NE(message_of(head + "      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 2]}\n")
                .find("passthrough takes 1 model per slice, got 2"),
            std::string::npos);
  EXPECT_NE(message_of("merge_method: ties\nbase_model: c\n" + head.substr(25) + "      - {model: a, layer_range: [0, 2]}\n")
                .find("ties needs the base model among each slice's sources"),
            std::string::npos);
  const Recipe s = parse_recipe("merge_method: slerp\nbase_model: c\nparameters: {t: 0.5}\nslices:\n  - sources:\n"
                                "      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 2]}\n");
  EXPECT_TRUE(has_warning(s, "slerp with a base_model that is not one of this slice's sources"));
}

TEST(Recipe, RescaleTakesBooleansAndInverseDensity) {
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  const std::string head = "merge_method: dare_linear\nbase_model: b\nmodels: [a]\nparameters: {rescale: ";
  for (const auto& [text, want] : std::vector<std::pair<std::string, MergeRescale>>{
           {"true", MergeRescale::kL1Norm}, {"True", MergeRescale::kL1Norm}, {"false", MergeRescale::kNone},
           {"no", MergeRescale::kNone}, {"inverse_density", MergeRescale::kInverseDensity}}) {
    parse_recipe(head + text + "}\n").resolve("w", 1, mp, gp);
    EXPECT_EQ(gp.rescale, want) << text;
  }
}

// mergekit's defaults, per method (mergekit/merge_methods/registry.py and generalized_task_arithmetic.py).
TEST(Recipe, DefaultsAreMergekits) {
  struct Want {
    const char* method;
    float density, epsilon;
    bool normalize;
    MergeRescale rescale;
  };
  const Want table[] = {
      {"task_arithmetic", 1, 0.15f, false, MergeRescale::kNone}, {"ties", 1, 0.15f, true, MergeRescale::kNone},
      {"dare_linear", 1, 0.15f, false, MergeRescale::kL1Norm},   {"dare_ties", 1, 0.15f, false, MergeRescale::kL1Norm},
      {"breadcrumbs", 1, 0.15f, false, MergeRescale::kNone},     {"breadcrumbs_ties", 1, 0.15f, false, MergeRescale::kNone},
      {"della", 1, 0.15f, true, MergeRescale::kL1Norm},          {"della_linear", 1, 0.15f, false, MergeRescale::kL1Norm},
  };
  for (const Want& w : table) {
    const Recipe r = parse_recipe(std::string("merge_method: ") + w.method + "\nbase_model: b\nmodels: [a, c]\n");
    std::vector<MergeModelParams> mp;
    MergeGlobalParams gp;
    r.resolve("model.layers.0.w", 2, mp, gp);
    EXPECT_FLOAT_EQ(mp[0].density, w.density) << w.method;
    EXPECT_FLOAT_EQ(mp[0].gamma, 0.01f) << w.method;
    EXPECT_FLOAT_EQ(mp[0].epsilon, w.epsilon) << w.method;
    EXPECT_FLOAT_EQ(mp[0].weight, 1.0f) << w.method;
    EXPECT_EQ(gp.normalize, w.normalize) << w.method;
    EXPECT_EQ(gp.rescale, w.rescale) << w.method;
    EXPECT_FLOAT_EQ(gp.lambda, 1.0f) << w.method;
    EXPECT_FALSE(gp.sign_tie_majority) << w.method;
    EXPECT_FALSE(gp.round_count) << w.method;
    EXPECT_EQ(gp.rank_dim, 1) << w.method;
  }
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  parse_recipe("merge_method: linear\nmodels: [a, c]\n").resolve("w", 1, mp, gp);
  EXPECT_TRUE(gp.normalize);
  // density >= 1 and slerp's t outside [0, 1] are mergekit values: accepted (t with a warning).
  EXPECT_NO_THROW(parse_recipe("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {density: 1.5}\n"));
  const Recipe s = parse_recipe("merge_method: slerp\nbase_model: b\nmodels: [a]\nparameters: {t: 1.5}\n");
  EXPECT_TRUE(has_warning(s, "t = 1.5 lies outside [0, 1]: slerp extrapolates"));
}

}  // namespace
}  // namespace taskvec
