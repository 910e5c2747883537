// The merge driver: recipe + checkpoints -> merged checkpoint. Everything that can fail on the inputs
// (missing tensors, shapes, recipe values per tensor, memory budget) is checked before the writer
// exists; then whole tensors are merged on worker threads and written at precomputed offsets.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <fmt/ranges.h>

#include "engine/internal.hpp"
#include "engine/overflow.hpp"
#include "engine/parallel.hpp"
#include "merge_internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {


struct MergeJob {
  std::string out_name;                              // the output tensor's name (slices renumber layers)
  const CheckpointTensor* ref = nullptr;             // layout reference (base, or first model)
  const CheckpointTensor* base = nullptr;            // kernel base, null when the method takes none
  std::vector<const CheckpointTensor*> models;       // kernel models (endpoints for slerp)
  DType out = DType::kF32;
  enum class Kind { kCopy, kConvert, kMerge } kind = Kind::kCopy;
  std::vector<MergeModelParams> model_params;
  MergeGlobalParams global;
  std::uint64_t elements = 0;
  std::uint64_t per_element = 0;   // bytes in flight per element
  std::uint64_t need_bytes = 0;    // per_element x elements (whole-tensor jobs)
  bool chunked = false;            // element-wise method or plain conversion: runs in chunks
  std::vector<float> rescale_factors;  // dare_linear with rescale: true: one L1 factor per model (pre-pass)
  std::size_t shard = 0, index = 0;
};

struct WorkItem {
  std::size_t job;
  std::uint64_t begin, count;  // elements (whole tensor for copies)
};

// Bytes-in-flight gate: a tensor waits until its decoded inputs fit in the budget beside the others
// (one tensor alone always runs: the planner already refused tensors larger than the budget).
class BudgetGate {
 public:
  explicit BudgetGate(std::uint64_t budget) : budget_(budget) {}
  void acquire(std::uint64_t bytes) {
    std::unique_lock lock(mutex_);
    cv_.wait(lock, [&] { return in_flight_ == 0 || in_flight_ + bytes <= budget_; });
    in_flight_ += bytes;
    peak_ = std::max(peak_, in_flight_);
  }
  void release(std::uint64_t bytes) {
    {
      std::lock_guard lock(mutex_);
      in_flight_ -= bytes;
    }
    cv_.notify_all();
  }
  std::uint64_t peak() const { return peak_; }

 private:
  std::uint64_t budget_, in_flight_ = 0, peak_ = 0;
  std::mutex mutex_;
  std::condition_variable cv_;
};

[[noreturn]] void nonfinite(const std::string& tensor, const std::string& file, std::uint64_t i, float v) {
  throw Error(ErrorCode::kNonFinite, fmt::format("tensor '{}' in {}: element {} is {} (use --allow-nonfinite to proceed)",
                                                 tensor, file, i, std::isnan(v) ? "NaN" : "Inf"));
}

void check_finite(const std::vector<float>& v, const std::string& tensor, const std::string& file, std::uint64_t first) {
  bool ok = true;
  for (float x : v) ok &= (x - x == 0.0f);  // false for NaN and Inf; branch-free so it vectorizes
  if (ok) return;
  for (std::uint64_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i])) nonfinite(tensor, file, first + i, v[i]);
}

std::vector<float> decode_range(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count) {
  std::vector<float> v(count);
  std::vector<std::byte> staging;
  detail::read_decoded(t, begin, count, v.data(), staging);
  return v;
}

std::vector<float> decode_all(const CheckpointTensor& t) { return decode_range(t, 0, t.info->num_elements()); }

bool is_svd_method(const MergeMethod& m) { return m.name == "tsv_merge" || m.name == "iso_c"; }

// Methods that take the base when one is given, though they need none (mergekit: the origin of the
// interpolation's task vectors).
bool takes_base(const MergeMethod& m) { return m.needs_base || m.name == "nuslerp" || m.name == "multislerp"; }

// --keep-extra-tensors FROM: an index into recipe.models (from 0) or one of their paths (as written in the
// recipe, or a path to the same file; both relative to the working directory). nullopt when FROM is empty.
std::optional<std::size_t> resolve_keep_from(const Recipe& recipe, const std::string& from) {
  if (from.empty()) return std::nullopt;
  if (std::all_of(from.begin(), from.end(), [](char c) { return c >= '0' && c <= '9'; }) && from.size() < 10) {
    const std::size_t i = std::stoul(from);
    if (i < recipe.models.size()) return i;
  }
  for (std::size_t i = 0; i < recipe.models.size(); ++i) {
    const std::filesystem::path& p = recipe.models[i].path;
    std::error_code ec;
    if (p == from || std::filesystem::equivalent(from, p, ec)) return i;
  }
  std::vector<std::string> paths;
  for (const auto& m : recipe.models) paths.push_back(m.path.string());
  throw Error(ErrorCode::kInvalidArgument,
              fmt::format("--keep-extra-tensors '{}' names no model of {}: give an index from 0 to {} or one of the "
                          "models' paths ({})",
                          from, recipe.file.string(), recipe.models.empty() ? 0 : recipe.models.size() - 1, fmt::join(paths, ", ")));
}

}  // namespace

namespace {

// torch's name of a float dtype, as config.json's torch_dtype spells it.
const char* torch_dtype_name(DType d) {
  switch (d) {
    case DType::kF16: return "float16";
    case DType::kBF16: return "bfloat16";
    case DType::kF32: return "float32";
    case DType::kF64: return "float64";
    case DType::kF8E4M3: return "float8_e4m3fn";
    case DType::kF8E5M2: return "float8_e5m2";
    default: return nullptr;
  }
}

// A README.md model card in mergekit's layout (front matter, method, models, the configuration).
std::string model_card(const Recipe& recipe) {
  // An earlier stage's output is named by its stage, not by its (temporary) folder.
  const auto shown = [&](const std::filesystem::path& p) {
    const auto it = recipe.stage_inputs.find(p.string());
    return it == recipe.stage_inputs.end() ? p.string() : fmt::format("stage {}", it->second);
  };
  std::vector<std::string> inputs;
  if (recipe.base_model) inputs.push_back(shown(*recipe.base_model));
  for (const auto& m : recipe.models)
    inputs.push_back(m.adapter ? fmt::format("{}+{}", shown(m.path), m.adapter->string()) : shown(m.path));
  std::string card = "---\nbase_model:\n";
  for (const auto& i : inputs) card += fmt::format("- {}\n", i);
  card += "library_name: transformers\ntags:\n- merge\n- taskvec\n---\n";
  card += fmt::format("# {}\n\nThis is a merge of pre-trained models created with taskvec {}.\n\n",
                      recipe.file.stem().string(), taskvec_version());
  card += "## Merge Details\n### Merge Method\n\n";
  card += fmt::format("This model was merged using the {} merge method{}.\n\n", recipe.method->name,
                      recipe.base_model ? fmt::format(" with {} as the base", shown(*recipe.base_model)) : "");
  card += "### Models Merged\n\nThe following models were included in the merge:\n";
  for (const auto& m : recipe.models)
    card += m.adapter ? fmt::format("* {} + {}\n", shown(m.path), m.adapter->string()) : fmt::format("* {}\n", shown(m.path));
  card += "\n### Configuration\n\nThe following YAML configuration was used to produce this model:\n\n```yaml\n";
  card += recipe.source_text;
  if (!recipe.source_text.empty() && recipe.source_text.back() != '\n') card += "\n";
  card += "```\n";
  return card;
}

// mergekit's slices: the output tensors, layer by layer (renumbered from 0 across the slices), each merged
// from the same layer of every source of its slice; embeddings from the first slice's sources, the other
// tensors outside the layers (final norm, head) from the last slice's. Returns the output's layer count.
template <class AddJob>
int plan_slices(const Recipe& recipe, const std::vector<Checkpoint>& models, const AddJob& add_job) {
  const std::string mname(recipe.method->name);
  const auto is_pre = [](const std::string& n) {
    return n.find("embed") != std::string::npos || n.find("wte.") != std::string::npos ||
           n.find("wpe.") != std::string::npos;
  };
  std::map<std::size_t, std::map<int, std::vector<std::string>>> layers_of;  // model -> layer -> tensor names
  const auto layer_names = [&](std::size_t model) -> const std::map<int, std::vector<std::string>>& {
    auto it = layers_of.find(model);
    if (it != layers_of.end()) return it->second;
    auto& by_layer = layers_of[model];
    for (const auto& name : models[model].tensor_names())
      if (const int l = merge_layer_index(name); l >= 0) by_layer[l].push_back(name);
    return by_layer;
  };
  static const std::map<std::string, RecipeValue> kNone;
  const auto emit = [&](const std::string& out_name, std::size_t s, const std::vector<std::string>& in_names, int layer,
                        int count) {
    const RecipeSlice& slice = recipe.slices[s];
    std::vector<const CheckpointTensor*> ts;
    for (std::size_t j = 0; j < slice.sources.size(); ++j) {
      const Checkpoint& c = models[slice.sources[j].model];
      const CheckpointTensor* t = c.find(in_names[j]);
      if (t == nullptr)
        throw Error(ErrorCode::kTensorMissing,
                    fmt::format("{}: slices[{}].sources[{}]: {} has no tensor '{}' (for the output's '{}')",
                                recipe.file.string(), s, j, c.path().string(), in_names[j], out_name));
      if (!ts.empty() && t->info->shape != ts.front()->info->shape)
        throw Error(ErrorCode::kShapeMismatch,
                    fmt::format("{}: slices[{}]: tensor '{}' of {} has shape [{}] but '{}' of {} has [{}]",
                                recipe.file.string(), s, in_names[j], c.path().string(), fmt::join(t->info->shape, ", "),
                                in_names[0], models[slice.sources[0].model].path().string(),
                                fmt::join(ts.front()->info->shape, ", ")));
      ts.push_back(t);
    }
    // The base (w_0, or slerp's t = 0 end) and the models the method combines.
    std::optional<std::size_t> bj;
    for (std::size_t j = 0; j < slice.sources.size(); ++j)
      if (slice.base && slice.sources[j].model == *slice.base) bj = j;
    const CheckpointTensor* kbase = nullptr;
    std::vector<const CheckpointTensor*> kmodels;
    std::vector<const std::map<std::string, RecipeValue>*> maps;
    std::vector<std::string> labels;
    const bool all_models = mname == "linear" || mname == "passthrough" || mname == "karcher" || !bj;
    if (!all_models && mname == "slerp") {
      kmodels.push_back(ts[*bj]);
      maps.push_back(&kNone);
      labels.push_back(fmt::format("{} (base, t = 0)", models[slice.sources[*bj].model].path().string()));
    } else if (!all_models) {
      kbase = ts[*bj];
    }
    for (std::size_t j = 0; j < ts.size(); ++j) {
      if (!all_models && j == *bj) continue;
      kmodels.push_back(ts[j]);
      maps.push_back(&slice.sources[j].params);
      labels.push_back(fmt::format("slices[{}].sources[{}] {}", s, j, models[slice.sources[j].model].path().string()));
    }
    const CheckpointTensor* layout = kbase ? kbase : kmodels.front();
    add_job(out_name, layout, takes_base(*recipe.method) ? kbase : nullptr, std::move(kmodels), labels,
            [&recipe, &slice, out_name, layer, count, maps](MergeJob& job, ResolvedValues* values) {
              recipe.resolve_at(out_name, layer, count, maps, &slice.params, job.model_params, job.global, values);
            });
  };
  const auto same_name_everywhere = [](const RecipeSlice& slice, const std::string& name) {
    return std::vector<std::string>(slice.sources.size(), name);
  };
  const std::size_t last = recipe.slices.size() - 1;
  for (const auto& name : models[recipe.slices.front().sources.front().model].tensor_names())
    if (merge_layer_index(name) < 0 && is_pre(name)) emit(name, 0, same_name_everywhere(recipe.slices.front(), name), -1, 1);
  int out_layer = 0;
  for (std::size_t s = 0; s < recipe.slices.size(); ++s) {
    const RecipeSlice& slice = recipe.slices[s];
    const int count = slice.layers();
    for (int i = 0; i < count; ++i, ++out_layer) {
      const RecipeSliceSource& first = slice.sources.front();
      const auto& by_layer = layer_names(first.model);
      const auto it = by_layer.find(first.begin + i);
      if (it == by_layer.end())
        throw Error(ErrorCode::kTensorMissing,
                    fmt::format("{}: slices[{}].sources[0]: {} has no layer {} (its layer_range is [{}, {}]; it has {} "
                                "layers)",
                                recipe.file.string(), s, models[first.model].path().string(), first.begin + i, first.begin,
                                first.end, by_layer.empty() ? 0 : by_layer.rbegin()->first + 1));
      for (const auto& name : it->second) {
        std::vector<std::string> in_names;
        for (const auto& src : slice.sources) in_names.push_back(merge_with_layer_index(name, src.begin + i));
        emit(merge_with_layer_index(name, out_layer), s, in_names, i, count);
      }
    }
  }
  for (const auto& name : models[recipe.slices[last].sources.front().model].tensor_names())
    if (merge_layer_index(name) < 0 && !is_pre(name)) emit(name, last, same_name_everywhere(recipe.slices[last], name), -1, 1);
  return out_layer;
}

// `chat_template:` written into the output's tokenizer_config.json (and chat_template.jinja, which newer
// transformers read first, when the output has one), as mergekit's _set_chat_template.
void set_chat_template(const Recipe& recipe, const std::vector<const Checkpoint*>& inputs, detail::OutputAuxiliary& aux) {
  if (!recipe.chat_template) return;
  const std::optional<std::string> text = detail::chat_template_text(*recipe.chat_template, inputs);
  if (!text) {
    aux.warnings.push_back("chat_template: auto: no input has a chat template, so none is set (as mergekit)");
    return;
  }
  std::optional<std::string> config;
  if (auto it = aux.generated.find("tokenizer_config.json"); it != aux.generated.end()) config = it->second;
  else config = detail::read_auxiliary(aux.copies, "tokenizer_config.json");
  if (!config) {
    aux.warnings.push_back("chat_template is given but the output has no tokenizer_config.json (no tokenizer is copied), "
                           "so it is not saved (as mergekit)");
    return;
  }
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(*config);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorCode::kIo, fmt::format("tokenizer_config.json of the output: cannot parse it to set chat_template: {}", e.what()));
  }
  if (!j.is_object()) throw Error(ErrorCode::kIo, "tokenizer_config.json of the output is not a JSON object: cannot set chat_template");
  j["chat_template"] = *text;
  aux.generated["tokenizer_config.json"] = j.dump(2) + "\n";
  for (const auto& f : aux.copies)
    if (f.filename() == "chat_template.jinja") aux.generated["chat_template.jinja"] = *text;
}

void add_merge_files(const Recipe& recipe, const std::vector<MergeJob>& jobs, const EditOptions& options,
                     int out_layers, const std::optional<detail::VocabMerge>& vocab_merge,
                     const std::vector<const Checkpoint*>& inputs, detail::OutputAuxiliary& aux) {
  if (vocab_merge) {
    // The tokenizer of the merged vocabulary replaces the base's (mergekit saves it whatever --copy-tokenizer says).
    std::erase_if(aux.copies, detail::is_tokenizer_file);
    aux.copies.insert(aux.copies.end(), vocab_merge->copies.begin(), vocab_merge->copies.end());
    for (const auto& [name, text] : vocab_merge->generated) aux.generated[name] = text;
  } else if (!options.copy_tokenizer) {
    std::erase_if(aux.copies, detail::is_tokenizer_file);
  }
  set_chat_template(recipe, inputs, aux);
  // The recipe beside the weights, under the name tools built around mergekit look for.
  aux.generated["mergekit_config.yml"] = recipe.source_text;
  if (options.write_model_card) aux.generated["README.md"] = model_card(recipe);
  // config.json's torch_dtype = the dtype of the float tensors written, when they all have one.
  std::optional<DType> out;
  bool uniform = true;
  for (const auto& j : jobs) {
    if (!dtype_is_editable(j.out) || j.kind == MergeJob::Kind::kCopy) continue;
    if (out && *out != j.out) uniform = false;
    out = j.out;
  }
  const char* name = out && uniform ? torch_dtype_name(*out) : nullptr;
  if (name == nullptr && out_layers == 0 && !vocab_merge) return;
  std::optional<std::string> text;
  if (auto it = aux.generated.find("config.json"); it != aux.generated.end()) {
    text = it->second;
  } else {
    try {
      text = detail::read_auxiliary(aux.copies, "config.json");
    } catch (const Error& e) {
      aux.warnings.push_back(fmt::format("{} (its torch_dtype is not updated)", e.what()));
    }
  }
  if (!text) return;
  if (auto updated = detail::config_with_updates(*text, name ? std::optional<std::string>(name) : std::nullopt,
                                                 out_layers > 0 ? std::optional<std::uint64_t>(out_layers) : std::nullopt,
                                                 vocab_merge ? std::optional<std::uint64_t>(vocab_merge->rows) : std::nullopt))
    aux.generated["config.json"] = std::move(*updated);
}

}  // namespace

EditReport merge_checkpoints(const Recipe& recipe, const std::filesystem::path& output, const EditOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (recipe.method == nullptr) throw Error(ErrorCode::kInternal, "merge_checkpoints: recipe without a method");
  const MergeMethod& method = *recipe.method;
  if (options.out_dtype && !dtype_is_writable_float(*options.out_dtype))
    throw Error(ErrorCode::kInvalidArgument, fmt::format("--dtype {} is not a float dtype taskvec can write",
                                                         dtype_name(*options.out_dtype)));
  const detail::TensorFilter filter(options.include, options.exclude);

  // ---- open inputs ----
  // MODEL+ADAPTER: the model PEFT's merge_and_unload would give, computed per chunk.
  const auto open_model = [](const std::filesystem::path& path, const std::optional<std::filesystem::path>& adapter) {
    Checkpoint model = Checkpoint::open(path);
    if (!adapter) {
      detail::require_model(model, "a model of the recipe (write BASE+ADAPTER for an adapter)");
      return model;
    }
    const Checkpoint lora = Checkpoint::open(*adapter);
    if (!lora.is_adapter()) {
      throw Error(ErrorCode::kInvalidAdapter, fmt::format("{}: not a PEFT adapter folder (no adapter_config.json), in "
                                                          "'{}+{}'", adapter->string(), path.string(), adapter->string()));
    }
    return lora.adapter_over(model, AdapterUse::kModel);
  };
  // Recipe paths resolve against the working directory, as in mergekit; a path that exists only beside
  // the recipe is most likely meant from there, so say so instead of "not found".
  const auto check_relative = [&](const std::filesystem::path& p) {
    std::error_code ec;
    if (p.empty() || p.is_absolute() || std::filesystem::exists(p, ec) || recipe.file == "<string>") return;
    const std::filesystem::path beside = recipe.file.parent_path() / p;
    if (!recipe.file.parent_path().empty() && std::filesystem::exists(beside, ec))
      throw Error(ErrorCode::kRecipe,
                  fmt::format("{}: model path '{}' does not exist in the working directory; paths in a recipe are "
                              "relative to the working directory, as in mergekit (there is a '{}' beside the recipe: "
                              "run from that folder or write that path)",
                              recipe.file.string(), p.string(), beside.string()));
  };
  if (recipe.base_model) check_relative(*recipe.base_model);
  if (recipe.base_model_adapter) check_relative(*recipe.base_model_adapter);
  for (const auto& m : recipe.models) {
    check_relative(m.path);
    if (m.adapter) check_relative(*m.adapter);
  }
  std::optional<Checkpoint> base;
  if (recipe.base_model) base.emplace(open_model(*recipe.base_model, recipe.base_model_adapter));
  std::vector<Checkpoint> models;
  for (const auto& m : recipe.models) models.push_back(open_model(m.path, m.adapter));
  // Quantized storage and kinds of input: the checks linear edits make (input_check.cpp).
  std::vector<std::string> kind_warnings;
  if (base) {
    detail::check_not_quantized(*base);
    if (auto w = detail::task_vector_as_model_warning(*base, "the base_model of the recipe")) kind_warnings.push_back(*w);
  }
  for (std::size_t i = 0; i < models.size(); ++i) {
    detail::check_not_quantized(models[i]);
    if (auto w = detail::task_vector_as_model_warning(models[i], fmt::format("models[{}] of the recipe", i)))
      kind_warnings.push_back(*w);
  }
  if (!options.keep_extra_tensors_from.empty() && options.drop_extra_tensors)
    throw Error(ErrorCode::kInvalidArgument, "--keep-extra-tensors and --drop-extra-tensors exclude each other: give one");
  const std::optional<std::size_t> keep_from = resolve_keep_from(recipe, options.keep_extra_tensors_from);
  // Tied word embeddings against untied heads: refuse, or untie (reconcile_tied_embeddings).
  bool untied_ref = false;
  std::vector<std::string> tie_warnings;
  {
    std::vector<const Checkpoint*> all;
    if (base) all.push_back(&*base);
    for (const auto& m : models) all.push_back(&m);
    // The architecture guard (mergekit refuses mixed architectures unless --allow-crimes): before any
    // tensor is read, the inputs' config.json must agree on model_type, architectures, sizes and vocabulary.
    std::vector<detail::ConfigDifference> differences;
    // A tokenizer merge is what reconciles different vocabularies.
    detail::check_input_configs(all, options.merge_extra_rows, tie_warnings, &differences, recipe.tokenizer.has_value());
    // Slices take layer ranges: sources of different depths are what frankenmerges stack (mergekit too).
    if (!recipe.slices.empty())
      std::erase_if(differences, [](const detail::ConfigDifference& d) { return d.key.ends_with("num_hidden_layers"); });
    if (!differences.empty()) {
      std::size_t wk = 3, wa = 5;
      for (const auto& d : differences) {
        wk = std::max(wk, d.key.size());
        wa = std::max(wa, d.value_a.size() + d.file_a.string().size() + 5);
      }
      std::vector<std::string> table = {fmt::format("{:<{}}  {:<{}}  {}", "key", wk, "value", wa, "differs from")};
      for (const auto& d : differences)
        table.push_back(fmt::format("{:<{}}  {:<{}}  {} in {}", d.key, wk, d.value_a + " in " + d.file_a.string(), wa,
                                    d.value_b, d.file_b.string()));
      if (!options.allow_crimes)
        throw Error(ErrorCode::kArchitectureMismatch,
                    fmt::format("the inputs' config.json disagree on their architecture, so they are not merged "
                                "(--allow-crimes merges them anyway, as mergekit's flag); {} difference{}",
                                differences.size(), differences.size() == 1 ? "" : "s"),
                    std::move(table));
      for (const auto& d : differences)
        tie_warnings.push_back(fmt::format("config.json differs on {}: {} in {} but {} in {}; merged anyway (--allow-crimes)",
                                           d.key, d.value_a, d.file_a.string(), d.value_b, d.file_b.string()));
    }
    ReconciledInputs reconciled = reconcile_tied_embeddings(all, options.untie_embeddings);
    std::size_t k = 0;
    if (base) base.emplace(std::move(reconciled.inputs[k++]));
    for (auto& m : models) m = std::move(reconciled.inputs[k++]);
    untied_ref = reconciled.untied_base;
    tie_warnings.insert(tie_warnings.end(), reconciled.warnings.begin(), reconciled.warnings.end());
  }
  // mergekit's tokenizer merge: every input's embedding rows are taken by output token (vocab_merge.cpp).
  std::optional<detail::VocabMerge> vocab_merge;
  if (recipe.tokenizer) {
    std::vector<Checkpoint*> inputs;
    std::vector<RecipeModelRef> refs;
    std::vector<std::string> labels;
    std::optional<std::size_t> base_index;
    if (base) {
      base_index = 0;
      inputs.push_back(&*base);
      refs.push_back({*recipe.base_model, recipe.base_model_adapter});
      labels.push_back(fmt::format("base_model {}", recipe.base_model->string()));
    }
    for (std::size_t i = 0; i < models.size(); ++i) {
      inputs.push_back(&models[i]);
      refs.push_back({recipe.models[i].path, recipe.models[i].adapter});
      labels.push_back(fmt::format("models[{}] {}", i, recipe.models[i].path.string()));
    }
    vocab_merge = detail::merge_vocabularies(recipe, inputs, refs, labels, base_index);
    tie_warnings.insert(tie_warnings.end(), vocab_merge->warnings.begin(), vocab_merge->warnings.end());
  }
  const Checkpoint& ref = base ? *base : models.front();
  const bool slerp_from_base = method.name == "slerp" && base && models.size() == 1;

  EditReport report;
  report.warnings = recipe.warnings;
  report.warnings.insert(report.warnings.end(), kind_warnings.begin(), kind_warnings.end());
  report.warnings.insert(report.warnings.end(), tie_warnings.begin(), tie_warnings.end());
  if (base) report.warnings.insert(report.warnings.end(), base->notes().begin(), base->notes().end());
  for (const auto& m : models) report.warnings.insert(report.warnings.end(), m.notes().begin(), m.notes().end());
  std::optional<DType> out_dtype = options.out_dtype;
  if (!out_dtype) out_dtype = recipe.out_dtype ? recipe.out_dtype : recipe.dtype;

  // ---- plan every tensor (recipe values and budget checked here, before any byte is written) ----
  std::vector<MergeJob> jobs;
  // One output tensor: copied or converted from `layout` (integer/bool tensors, tensors not selected),
  // or merged from kbase and kmodels with the parameters `resolve` sets.
  // --explain: each set of resolved parameters (as text) and the tensors that have it, in first-seen order.
  std::vector<std::pair<std::string, std::vector<std::string>>> explained;
  std::map<std::string, std::size_t> explained_at;
  const auto format_value = [&](const std::string& name, double v) {
    const MergeParamSpec* spec = method.find_param(name);
    std::string text = fmt::format("{:g}", v);
    if (spec && spec->type == MergeParamType::kBool) text = v != 0 ? "true" : "false";
    if (spec && spec->type == MergeParamType::kChoice && v >= 0 && v < static_cast<double>(spec->choices.size()))
      text = std::string(spec->choices[static_cast<std::size_t>(v)]);
    return fmt::format("{}={}{}", name, text, spec && v != spec->default_value ? "*" : "");
  };
  const auto explain = [&](const std::string& out_name, const ResolvedValues& values, const std::vector<std::string>& labels) {
    std::string text = "  global:";
    for (const auto& [name, v] : values.global) text += fmt::format(" {}", format_value(name, v));
    if (values.global.empty()) text += " (none)";
    for (std::size_t m = 0; m < values.models.size(); ++m) {
      text += fmt::format("\n  {}:", m < labels.size() ? labels[m] : fmt::format("models[{}]", m));
      for (const auto& [name, v] : values.models[m]) text += fmt::format(" {}", format_value(name, v));
      if (values.models[m].empty()) text += " (no per-model parameters)";
    }
    const auto [it, fresh] = explained_at.emplace(text, explained.size());
    if (fresh) explained.push_back({text, {}});
    explained[it->second].second.push_back(out_name);
  };
  const auto add_job = [&](std::string out_name, const CheckpointTensor* layout, const CheckpointTensor* kbase,
                           std::vector<const CheckpointTensor*> kmodels, const std::vector<std::string>& labels,
                           const std::function<void(MergeJob&, ResolvedValues*)>& resolve) {
    MergeJob job;
    job.out_name = std::move(out_name);
    job.ref = layout;
    const TensorInfo& info = *job.ref->info;
    job.elements = info.num_elements();
    const bool editable = dtype_is_editable(info.dtype);
    const bool chosen = filter.selects(job.out_name);
    job.out = editable && out_dtype ? *out_dtype : info.dtype;
    if (!editable || !chosen) {
      job.kind = job.out == info.dtype ? MergeJob::Kind::kCopy : MergeJob::Kind::kConvert;
      ++report.tensors_copied;
      job.chunked = true;
      job.per_element = job.kind == MergeJob::Kind::kConvert ? 16 : 0;
    } else {
      job.kind = MergeJob::Kind::kMerge;
      ++report.tensors_edited;
      job.base = kbase;
      job.models = std::move(kmodels);
      ResolvedValues values;
      resolve(job, options.explain ? &values : nullptr);
      if (options.explain) explain(job.out_name, values, labels);
      // decoded inputs + result (f32), one delta buffer, sign and count lanes (TIES), encoded output (<= 8 B)
      std::uint64_t per_element = 4 * (job.models.size() + 2) + 24;
      if (is_svd_method(method)) per_element += 8 * 6;  // f64 SVD workspaces
      if (method.name == "della" || method.name == "della_linear") per_element += 4 * job.models.size() + 8;
      job.per_element = per_element;
      job.chunked = method.elementwise;
      job.need_bytes = per_element * job.elements;
      if (!job.chunked && job.need_bytes > options.memory_budget)
        throw Error(ErrorCode::kTensorTooLarge,
                    fmt::format("tensor '{}' ({} elements) needs {} bytes to merge with {} (whole-tensor method), more than "
                                "the memory budget of {} bytes; raise --memory-budget to at least {}",
                                job.out_name, job.elements, job.need_bytes, method.name, options.memory_budget,
                                job.need_bytes));
    }
    jobs.push_back(std::move(job));
  };
  int out_layers = 0;  // slices: the output's layer count (config.json num_hidden_layers)
  if (!recipe.slices.empty()) {
    out_layers = plan_slices(recipe, models, add_job);
  } else {
    // Every model must have the reference's tensors, with the same shapes (the checks linear edits make).
    for (const Checkpoint& other : models) {
      for (const auto& name : ref.tensor_names()) {
        const CheckpointTensor* r = ref.find(name);
        const CheckpointTensor* t = other.find(name);
        detail::check_input_tensor(name, ref, *r, other, t, /*extra_rows_flag=*/false, /*merge_extra_rows=*/false);
        if (&other != &ref && !dtype_is_editable(r->info->dtype)) {
          if (auto w = detail::integer_tensor_change(name, *r, *t, ref.path().string())) report.warnings.push_back(*w);
        }
      }
    }
    // Tensors the models have and the reference lacks (a new head): refused, kept from one model, or dropped.
    std::vector<const CheckpointTensor*> extra;  // copied from models[*keep_from]
    {
      std::vector<std::string> seen;
      for (const Checkpoint& other : models) {
        for (const auto& name : other.tensor_names()) {
          if (ref.find(name) || std::find(seen.begin(), seen.end(), name) != seen.end()) continue;
          seen.push_back(name);
          if (keep_from) {
            const Checkpoint& from = models[*keep_from];
            const CheckpointTensor* t = from.find(name);
            if (!t)
              detail::throw_extra_tensor(name, other, ref,
                                         fmt::format(", nor in {} (--keep-extra-tensors {}), so it cannot be kept from it; "
                                                     "name a model that has it, or use --drop-extra-tensors",
                                                     from.path().string(), options.keep_extra_tensors_from));
            extra.push_back(t);
            report.warnings.push_back(fmt::format("tensor '{}' is not in {}: copied unchanged from {} (--keep-extra-tensors)",
                                                  name, ref.path().string(), from.path().string()));
          } else if (options.drop_extra_tensors) {
            report.warnings.push_back(fmt::format("tensor '{}' of {} is not in {}: left out (--drop-extra-tensors)", name,
                                                  other.path().string(), ref.path().string()));
          } else {
            detail::throw_extra_tensor(
                name, other, ref,
                ": it would be lost; use --keep-extra-tensors FROM to copy it unchanged from one model (FROM: its index "
                "in the recipe's models list, from 0, or its path), or --drop-extra-tensors to leave it out");
          }
        }
      }
    }

    int num_layers = 1;
    for (const auto& name : ref.tensor_names()) num_layers = std::max(num_layers, merge_layer_index(name) + 1);
    jobs.reserve(ref.tensor_names().size());
    std::vector<std::string> labels;
    if (slerp_from_base) labels.push_back(fmt::format("{} (base, t = 0)", recipe.base_model->string()));
    for (std::size_t m = 0; m < recipe.models.size(); ++m)
      labels.push_back(fmt::format("models[{}] {}", m, recipe.models[m].path.string()));
    for (const auto& name : ref.tensor_names()) {
      std::vector<const CheckpointTensor*> kmodels;
      if (slerp_from_base) kmodels.push_back(base->find(name));
      for (const auto& m : models) kmodels.push_back(m.find(name));
      add_job(name, ref.find(name), takes_base(method) && base ? base->find(name) : nullptr, std::move(kmodels), labels,
              [&](MergeJob& job, ResolvedValues* values) {
                recipe.resolve(name, num_layers, job.model_params, job.global, values);
                if (slerp_from_base) {
                  job.model_params.insert(job.model_params.begin(), MergeModelParams{});
                  if (values) values->models.insert(values->models.begin(), {});
                }
              });
    }
    for (const CheckpointTensor* t : extra) {  // --keep-extra-tensors: copied (or converted) like unselected tensors
      MergeJob job;
      job.out_name = t->info->name;
      job.ref = t;
      job.elements = t->info->num_elements();
      const bool editable = dtype_is_editable(t->info->dtype);
      job.out = editable && out_dtype ? *out_dtype : t->info->dtype;
      job.kind = job.out == t->info->dtype ? MergeJob::Kind::kCopy : MergeJob::Kind::kConvert;
      job.chunked = true;
      job.per_element = job.kind == MergeJob::Kind::kConvert ? 16 : 0;
      ++report.tensors_copied;
      jobs.push_back(std::move(job));
    }
  }

  if (options.explain) {
    report.explanation.push_back(fmt::format("{} ({}): resolved parameters per tensor; * = not {}'s default",
                                             recipe.file.string(), method.name, method.name));
    for (const auto& [text, names] : explained) {
      std::string list;
      for (std::size_t i = 0; i < names.size() && i < 4; ++i) list += (i ? ", " : "") + names[i];
      if (names.size() > 4) list += fmt::format(", ... ({} more)", names.size() - 4);
      report.explanation.push_back(fmt::format("{} tensor{}: {}", names.size(), names.size() == 1 ? "" : "s", list));
      report.explanation.push_back(text);
    }
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return report;
  }

  // ---- whole-model TIES trim: per model, the k-th largest |tau| over every merged tensor ----
  std::vector<float> trim_thresholds;
  const bool trim_model = std::any_of(jobs.begin(), jobs.end(), [](const MergeJob& j) {
    return j.kind == MergeJob::Kind::kMerge && j.global.trim_model;
  });
  if (trim_model && !recipe.slices.empty())
    throw Error(ErrorCode::kRecipe, fmt::format("{}: 'trim: model' (a whole-model threshold per model) is not supported "
                                                "with slices; use the per-tensor trim", recipe.file.string()));
  if (trim_model) {
    std::vector<double> densities(models.size(), -1.0);
    for (std::size_t m = 0; m < models.size(); ++m) {
      for (const auto& j : jobs) {
        if (j.kind != MergeJob::Kind::kMerge || !j.global.trim_model) continue;
        if (densities[m] < 0) densities[m] = j.model_params[m].density;
        if (j.model_params[m].density != static_cast<float>(densities[m]))
          throw Error(ErrorCode::kRecipe, fmt::format("{}: 'trim: model' needs one density per model, but models[{}] has "
                                                      "different densities for different tensors", recipe.file.string(), m));
      }
    }
    for (std::size_t m = 0; m < models.size() && !options.dry_run; ++m) {
      MagnitudeThreshold threshold(densities[m]);
      std::vector<float> b, x;
      do {
        for (const auto& j : jobs) {
          if (j.kind != MergeJob::Kind::kMerge || !j.global.trim_model) continue;
          b = decode_all(*j.base);
          x = decode_all(*j.models[m]);
          for (std::size_t i = 0; i < x.size(); ++i) x[i] -= b[i];
          threshold.add(x);
        }
      } while (threshold.next_pass());
      trim_thresholds.push_back(threshold.threshold());
    }
  }

  // ---- dare_linear with mergekit's rescale (L1 norm match): one factor per model and tensor, from a
  // pass over the tensor in pieces, so that the merge itself still runs in chunks ----
  if (method.name == "dare_linear" && !options.dry_run) {
    for (auto& j : jobs) {
      if (j.kind != MergeJob::Kind::kMerge || j.global.rescale != MergeRescale::kL1Norm) continue;
      std::vector<double> before(j.models.size()), after(j.models.size());
      constexpr std::uint64_t kPiece = 1u << 20;
      for (std::uint64_t b = 0; b < j.elements; b += kPiece) {
        const std::uint64_t count = std::min(kPiece, j.elements - b);
        const std::vector<float> bv = decode_range(*j.base, b, count);
        std::vector<std::vector<float>> mv;
        for (const auto* t : j.models) mv.push_back(decode_range(*t, b, count));
        std::vector<std::span<const float>> spans(mv.begin(), mv.end());
        const std::vector<std::uint64_t> shape{count};
        MergeTensor in;
        in.name = j.out_name;
        in.shape = shape;
        in.first_index = b;
        in.base = bv;
        in.models = spans;
        in.model_params = j.model_params;
        in.global = j.global;
        dare_l1_sums(in, before, after);
      }
      for (std::size_t m = 0; m < j.models.size(); ++m)
        j.rescale_factors.push_back(before[m] < 1e-7 || after[m] < 1e-7 ? 1.0f : static_cast<float>(before[m] / after[m]));
    }
  }

  // ---- output plan ----
  std::vector<TensorSpec> specs;
  for (const auto& j : jobs) specs.push_back({j.out_name, j.out, j.ref->info->shape});
  auto metadata = ref.metadata();
  metadata.erase(kMetaKind);
  metadata.erase(kMetaPretrainedFingerprint);
  metadata["taskvec.merge_method"] = std::string(method.name);
  for (const auto& [k, v] : options.extra_metadata) metadata[k] = v;
  report.plan = CheckpointPlan::build(output, std::move(specs), metadata, options.write);
  for (auto& j : jobs) std::tie(j.shard, j.index) = report.plan.location.at(j.out_name);
  const unsigned threads = detail::resolve_threads(options.threads);
  // Work items: whole tensors, or chunks sized so that every worker's chunk fits the budget at once.
  std::vector<WorkItem> items;
  std::uint64_t planned_peak = 0;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    const MergeJob& job = jobs[j];
    if (job.kind == MergeJob::Kind::kCopy || !job.chunked || job.elements == 0) {
      items.push_back({j, 0, job.elements});
      planned_peak = std::max(planned_peak, job.need_bytes);
      continue;
    }
    const std::uint64_t chunk =
        std::clamp<std::uint64_t>(options.memory_budget / (std::uint64_t(threads) * job.per_element), 4096, 1u << 24);
    for (std::uint64_t b = 0; b < job.elements; b += chunk) items.push_back({j, b, std::min(chunk, job.elements - b)});
    planned_peak = std::max(planned_peak, std::min(job.elements, chunk) * job.per_element * threads);
  }
  if (options.dry_run) {
    report.peak_chunk_bytes = planned_peak;
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return report;
  }

  std::vector<std::filesystem::path> inputs;
  if (base) inputs.insert(inputs.end(), base->files().begin(), base->files().end());
  for (const auto& m : models) inputs.insert(inputs.end(), m.files().begin(), m.files().end());
  if (base && base->folder()) inputs.push_back(*base->folder());  // protects input folders
  for (const auto& m : models) if (m.folder()) inputs.push_back(*m.folder());
  CheckpointWriter writer(report.plan, options.write, inputs);

  // Largest items first so the last worker does not start a big one alone; the order changes
  // nothing in the output (every tensor has its own precomputed offset, every chunk its own range).
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.count > b.count; });
  std::vector<std::atomic<std::uint64_t>> chunks_left(jobs.size());
  for (const auto& item : items) ++chunks_left[item.job];

  BudgetGate gate(options.memory_budget);
  std::atomic<std::uint64_t> bytes_read{0}, bytes_written{0}, tensors_done{0};
  const auto stream_start = std::chrono::steady_clock::now();
  auto progress = [&] {
    if (!options.on_progress) return;
    Progress p;
    p.tensors_done = tensors_done.load();
    p.tensors_total = jobs.size();
    p.bytes_done = bytes_written.load();
    p.bytes_total = report.plan.total_bytes;
    p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - stream_start).count();
    options.on_progress(p);
  };

  // Issue 10 reports: per job, whether some chunk of the output has a nonzero element; the merged
  // tensors whose magnitude trim keeps no element of a non-zero task vector (job, message).
  std::vector<std::atomic<bool>> out_nonzero(jobs.size());
  std::mutex dropped_mutex;
  std::vector<std::pair<std::size_t, std::string>> dropped;
  std::map<std::string, std::vector<std::size_t>> kernel_notes;  // note -> jobs (under dropped_mutex)

  std::vector<std::atomic<std::uint64_t>> clamped(jobs.size());  // --clamp-overflow, per job
  detail::parallel_for(
      items.size(), threads,
      [&](std::size_t k, unsigned) {
        const WorkItem& item = items[k];
        const MergeJob& job = jobs[item.job];
        const std::string& name = job.out_name;
        auto finish = [&] {
          if (chunks_left[item.job].fetch_sub(1) == 1) ++tensors_done;
        };
        if (job.kind == MergeJob::Kind::kCopy) {
          std::vector<std::byte> staging;
          detail::copy_tensor_bytes(*job.ref, 0, job.ref->info->num_bytes(), writer, job.shard, job.index, staging);
          bytes_read += job.ref->info->num_bytes();
          bytes_written += job.ref->info->num_bytes();
          finish();
          return;
        }
        const std::uint64_t need = job.per_element * item.count;
        gate.acquire(need);
        struct Release {
          BudgetGate& g;
          std::uint64_t n;
          ~Release() { g.release(n); }
        } guard{gate, need};
        std::vector<float> result;
        if (job.kind == MergeJob::Kind::kConvert) {
          result = decode_range(*job.ref, item.begin, item.count);
          bytes_read += item.count * (dtype_bits(job.ref->info->dtype) / 8);
        } else {
          std::vector<float> base_values;
          if (job.base) {
            base_values = decode_range(*job.base, item.begin, item.count);
            bytes_read += item.count * (dtype_bits(job.base->info->dtype) / 8);
            if (!options.allow_nonfinite) check_finite(base_values, name, job.base->file().string(), item.begin);
          }
          std::vector<std::vector<float>> model_values;
          for (const auto* t : job.models) {
            model_values.push_back(decode_range(*t, item.begin, item.count));
            bytes_read += item.count * (dtype_bits(t->info->dtype) / 8);
            if (!options.allow_nonfinite) check_finite(model_values.back(), name, t->file().string(), item.begin);
          }
          std::vector<std::span<const float>> spans(model_values.begin(), model_values.end());
          const std::vector<std::uint64_t> chunk_shape{item.count};
          MergeTensor in;
          in.name = name;
          in.shape = job.chunked ? std::span<const std::uint64_t>(chunk_shape) : std::span<const std::uint64_t>(job.ref->info->shape);
          in.first_index = item.begin;
          in.base = base_values;
          in.models = spans;
          in.model_params = job.model_params;
          in.global = job.global;
          if (job.global.trim_model) in.trim_thresholds = trim_thresholds;
          in.rescale_factors = job.rescale_factors;
          std::vector<std::string> notes;
          in.notes = &notes;
          result.resize(item.count);
          method.kernel(in, result);
          if (!notes.empty()) {
            std::lock_guard lock(dropped_mutex);
            for (auto& n : notes) {
              auto& v = kernel_notes[n];
              if (std::find(v.begin(), v.end(), item.job) == v.end()) v.push_back(item.job);
            }
          }
          if (item.begin == 0 && item.count == job.elements) {  // the top-k methods merge whole tensors
            std::string lost;
            // ties with `trim: model` keeps floor(density x all merged elements) by one threshold per
            // model: infinite when that count is 0 (MagnitudeThreshold), and then every tensor loses its delta.
            const bool whole_model = job.global.trim_model && method.name == "ties";
            for (std::size_t m = 0; m < model_values.size(); ++m) {
              const std::int64_t kept =
                  whole_model ? (m < trim_thresholds.size() && std::isinf(trim_thresholds[m]) ? 0 : -1)
                              : merge_topk_kept(method.name, job.model_params[m], job.global, job.elements);
              if (kept != 0) continue;
              bool moved = false;
              for (std::uint64_t i = 0; i < item.count && !moved; ++i)
                moved = model_values[m][i] != (base_values.empty() ? 0.0f : base_values[i]);
              if (moved) lost += fmt::format("{}models[{}] (density {:g})", lost.empty() ? "" : ", ", m,
                                             job.model_params[m].density);
            }
            if (!lost.empty() && whole_model) {
              std::string msg = fmt::format(
                  "tensor '{}' ({} element{}): ties with 'trim: model' keeps floor(density x the model's merged "
                  "elements) = 0 elements, so the non-zero task vector of {} is dropped from the merge; raise density",
                  name, job.elements, job.elements == 1 ? "" : "s", lost);
              std::lock_guard lock(dropped_mutex);
              dropped.emplace_back(item.job, std::move(msg));
            } else if (!lost.empty()) {
              std::string msg = fmt::format(
                  "tensor '{}' ({} element{}): {} keeps {}(density x {}) = 0 of its elements, so the non-zero task "
                  "vector of {} is dropped from the merge{}; raise density for this tensor in the recipe (e.g. a "
                  "{{filter: '{}', value: 1}} entry under 'density')",
                  name, job.elements, job.elements == 1 ? "" : "s", method.name, job.global.round_count ? "round" : "floor",
                  job.elements, lost, method.name == "ties" ? " (mergekit stops with an error here)" : "", name);
              std::lock_guard lock(dropped_mutex);
              dropped.emplace_back(item.job, std::move(msg));
            }
          }
          if (!options.allow_nonfinite) {
            bool ok = true;
            for (float x : result) ok &= (x - x == 0.0f);
            if (!ok)
              for (std::uint64_t i = 0; i < result.size(); ++i)
                if (!std::isfinite(result[i]))
                  // Every input was checked finite above: an Inf is the f32 arithmetic overflowing.
                  throw Error(std::isinf(result[i]) ? ErrorCode::kOverflow : ErrorCode::kNonFinite,
                              fmt::format("tensor '{}': the merged value of element {} is {} although every input is "
                                          "finite (parameters too large?); use --allow-nonfinite to proceed",
                                          name, item.begin + i, std::isinf(result[i]) ? "beyond +-3.4e38 (Inf in f32)"
                                                                                      : "NaN"));
          }
        }
        if (job.kind == MergeJob::Kind::kMerge && !out_nonzero[item.job].load(std::memory_order_relaxed)) {
          bool nonzero = false;
          for (float x : result) nonzero |= x != 0.0f;
          if (nonzero) out_nonzero[item.job].store(true, std::memory_order_relaxed);
        }
        const std::uint64_t osize = dtype_bits(job.out) / 8;
        if (osize < sizeof(float)) {
          // Convert jobs too: an F32 weight of 70000 does not fit F16 either.
          const std::uint64_t n = detail::check_overflow(job.out, result.data(), result.size(), item.begin, name,
                                                         job.ref->file().string(), options.clamp_overflow);
          if (n != 0) clamped[item.job] += n;
        }
        std::vector<std::byte> bytes(item.count * osize);
        encode_from_f32(job.out, result.data(), bytes.data(), result.size());
        writer.write(job.shard, job.index, item.begin * osize, bytes);
        bytes_written += bytes.size();
        finish();
      },
      progress);
  progress();
  // At most kListed warnings of one kind by name, then one line with the count of the others.
  constexpr std::size_t kListed = 5;
  auto warn_capped = [&](const std::vector<std::string>& lines, const char* rest) {
    for (std::size_t i = 0; i < lines.size() && i < kListed; ++i) report.warnings.push_back(lines[i]);
    if (lines.size() > kListed) report.warnings.push_back(fmt::format("... and {} more tensors {}", lines.size() - kListed, rest));
  };
  std::sort(dropped.begin(), dropped.end());
  std::vector<std::string> dropped_lines;
  for (auto& d : dropped) dropped_lines.push_back(std::move(d.second));
  warn_capped(dropped_lines, "whose density keeps no element of a non-zero task vector");
  // What the kernels noted (e.g. where mergekit would fail or differ), one line per note with the tensors.
  for (auto& [note, js] : kernel_notes) {
    std::sort(js.begin(), js.end());
    std::vector<std::string> names;
    for (std::size_t i = 0; i < js.size() && i < kListed; ++i) names.push_back("'" + jobs[js[i]].out_name + "'");
    report.warnings.push_back(fmt::format("{} tensor{} ({}{}): {}", js.size(), js.size() == 1 ? "" : "s",
                                          fmt::join(names, ", "), js.size() > kListed ? ", ..." : "", note));
  }
  // A merged tensor whose every output element is zero, while the base (or, without a base, one of
  // the models) has a nonzero element: the merge erased it. Read again only for those tensors.
  std::vector<std::string> zero_lines;
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    const MergeJob& job = jobs[j];
    if (job.kind != MergeJob::Kind::kMerge || job.elements == 0 || out_nonzero[j].load()) continue;
    std::vector<const CheckpointTensor*> sources = job.models;
    if (job.base) sources = {job.base};
    bool had_nonzero = false;
    for (const CheckpointTensor* t : sources) {
      constexpr std::uint64_t kPiece = 1u << 20;
      for (std::uint64_t b = 0; b < job.elements && !had_nonzero; b += kPiece)
        for (float x : decode_range(*t, b, std::min(kPiece, job.elements - b))) had_nonzero |= x != 0.0f;
      if (had_nonzero) break;
    }
    if (had_nonzero)
      zero_lines.push_back(fmt::format("tensor '{}': every element of the output is zero, while the {} is not (the merge "
                                       "erased it; check its weights, density and lambda)",
                                       job.out_name, job.base ? "base model's tensor" : "models' tensor"));
  }
  warn_capped(zero_lines, "whose every output element is zero");
  for (std::size_t j = 0; j < jobs.size(); ++j) {
    if (clamped[j].load() == 0) continue;
    report.warnings.push_back(fmt::format("tensor '{}': {} element(s) beyond the largest finite {} value {} were "
                                          "clamped to it (--clamp-overflow)",
                                          jobs[j].out_name, clamped[j].load(), dtype_name(jobs[j].out),
                                          dtype_max_finite(jobs[j].out)));
  }
  if (report.plan.is_folder) {
    detail::OutputAuxiliary aux;
    if (ref.folder()) aux = detail::output_auxiliary_files(ref, untied_ref);
    std::vector<const Checkpoint*> all;
    if (base) all.push_back(&*base);
    for (const auto& m : models) all.push_back(&m);
    add_merge_files(recipe, jobs, options, out_layers, vocab_merge, all, aux);
    report.warnings.insert(report.warnings.end(), aux.warnings.begin(), aux.warnings.end());
    writer.commit(aux.copies, aux.generated);
    report.auxiliary_files = aux.file_names();
  } else {
    writer.commit();
  }
  report.bytes_read = bytes_read.load();
  report.bytes_written = bytes_written.load();
  report.peak_chunk_bytes = gate.peak();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace taskvec
