// taskvec format layer: PEFT LoRA adapters as task vectors (layout: peft_adapter.hpp).
#include "format/peft_adapter.hpp"
#include "format/pytorch_reader.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <regex>
#include <set>
#include <system_error>

#include <nlohmann/json.hpp>

#include "format/internal.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"

namespace taskvec::peft {
namespace {

using format_detail::format_dims;
using format_detail::quote_name;

[[noreturn]] void fail(const std::string& label, const std::string& what) {
  throw Error(ErrorCode::kInvalidAdapter, label + ": " + what);
}

// ---- config -----------------------------------------------------------------------------------

bool get_bool(const nlohmann::json& doc, const char* key, bool fallback, const std::string& label) {
  const auto it = doc.find(key);
  if (it == doc.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) fail(label, std::string("\"") + key + "\" is not true or false");
  return it->get<bool>();
}

std::uint64_t get_rank(const nlohmann::json& v, const std::string& what, const std::string& label) {
  // nlohmann parses every non-negative integer as unsigned: anything else is not a positive integer.
  if (!v.is_number_unsigned() || v.get<std::uint64_t>() == 0) {
    fail(label, what + " is " + v.dump() + ", not a positive integer");
  }
  return v.get<std::uint64_t>();
}

double get_alpha(const nlohmann::json& v, const std::string& what, const std::string& label) {
  if (!v.is_number() || !std::isfinite(v.get<double>())) fail(label, what + " is " + v.dump() + ", not a finite number");
  return v.get<double>();
}

std::vector<std::string> get_string_list(const nlohmann::json& v, const std::string& what, const std::string& label) {
  std::vector<std::string> out;
  if (v.is_null()) return out;
  if (!v.is_array()) fail(label, what + " is not a list of strings");
  for (const auto& e : v) {
    if (!e.is_string()) fail(label, what + " holds " + e.dump() + ", not a string");
    out.push_back(e.get<std::string>());
  }
  return out;
}

// A variant field that must be absent, null (or, for lists, empty) for plain LoRA.
void refuse_if_set(const nlohmann::json& doc, const char* key, const char* variant, const std::string& label) {
  const auto it = doc.find(key);
  if (it == doc.end() || it->is_null() || (it->is_boolean() && !it->get<bool>()) ||
      (it->is_array() && it->empty())) {
    return;
  }
  fail(label, std::string("\"") + key + "\": " + it->dump() + " enables " + variant +
                  ", whose weight change is not s * B @ A; taskvec reads plain LoRA adapters only");
}

template <typename T>
std::vector<std::pair<std::string, T>> get_pattern(const nlohmann::ordered_json& doc, const char* key,
                                                   const std::string& label) {
  std::vector<std::pair<std::string, T>> out;
  const auto it = doc.find(key);
  if (it == doc.end() || it->is_null()) return out;
  if (!it->is_object()) fail(label, std::string("\"") + key + "\" is not an object");
  for (const auto& [pattern, value] : it->items()) {
    const nlohmann::json v = nlohmann::json::parse(value.dump());
    const std::string what = std::string(key) + " " + quote_name(pattern);
    if constexpr (std::is_same_v<T, std::uint64_t>) {
      out.emplace_back(pattern, get_rank(v, what, label));
    } else {
      out.emplace_back(pattern, get_alpha(v, what, label));
    }
    (void)pattern_matches(pattern, "", label);  // validates the regex now, not at first use
  }
  return out;
}

// ---- keys -------------------------------------------------------------------------------------

constexpr std::string_view kPrefix = "base_model.model.";

std::vector<std::string> split_dots(std::string_view s) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t dot = s.find('.', start);
    out.emplace_back(s.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return out;
}

std::string join_dots(const std::vector<std::string>& parts, std::size_t begin, std::size_t end) {
  std::string out;
  for (std::size_t i = begin; i < end; ++i) {
    if (i > begin) out += '.';
    out += parts[i];
  }
  return out;
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

struct Factors {
  const TensorInfo* a = nullptr;
  const TensorInfo* b = nullptr;
  bool embedding = false;
  const TensorInfo* saved_base = nullptr;
};

std::uint64_t product(std::span<const std::uint64_t> dims) {
  std::uint64_t p = 1;
  for (const auto d : dims) p *= d;  // shapes were validated by the file's reader
  return p;
}

}  // namespace

// ---- AdapterConfig ------------------------------------------------------------------------------

bool pattern_matches(const std::string& key, std::string_view module, const std::string& label) {
  try {
    const std::regex re("(.*\\.)?(" + key + ")$", std::regex::ECMAScript);
    return std::regex_match(module.begin(), module.end(), re);
  } catch (const std::regex_error& e) {
    fail(label, "pattern " + quote_name(key) + " is not a valid regular expression (" + e.what() + ")");
  }
}

std::uint64_t AdapterConfig::rank_for(std::string_view module) const {
  for (const auto& [key, value] : rank_pattern) {
    if (pattern_matches(key, module, "rank_pattern")) return value;
  }
  return r;
}

double AdapterConfig::alpha_for(std::string_view module) const {
  for (const auto& [key, value] : alpha_pattern) {
    if (pattern_matches(key, module, "alpha_pattern")) return value;
  }
  return lora_alpha;
}

double AdapterConfig::scale_for(std::string_view module) const {
  const double rank = static_cast<double>(rank_for(module));
  const double alpha = alpha_for(module);
  return use_rslora ? alpha / std::sqrt(rank) : alpha / rank;
}

AdapterConfig parse_adapter_config(std::string_view json_text, const std::string& label) {
  const nlohmann::json doc =
      format_detail::parse_json_strict(json_text, label, ErrorCode::kInvalidAdapter, ErrorCode::kInvalidAdapter);
  if (!doc.is_object()) fail(label, "the adapter config is not a JSON object");
  AdapterConfig c;

  const auto type = doc.find("peft_type");
  if (type == doc.end()) fail(label, "no \"peft_type\": not a PEFT adapter config");
  if (!type->is_string()) fail(label, "\"peft_type\" is not a string");
  c.peft_type = type->get<std::string>();
  if (c.peft_type != "LORA") {
    fail(label, "peft_type " + quote_name(c.peft_type) +
                    " is not supported: taskvec reads LoRA adapters (peft_type \"LORA\") only");
  }

  if (const auto it = doc.find("r"); it != doc.end() && !it->is_null()) c.r = get_rank(*it, "\"r\"", label);
  if (const auto it = doc.find("lora_alpha"); it != doc.end() && !it->is_null()) {
    c.lora_alpha = get_alpha(*it, "\"lora_alpha\"", label);
  }
  c.use_rslora = get_bool(doc, "use_rslora", false, label);
  c.fan_in_fan_out = get_bool(doc, "fan_in_fan_out", false, label);

  if (get_bool(doc, "use_dora", false, label)) {
    fail(label, "\"use_dora\": true: DoRA adapters (a magnitude vector rescales W + dW per column) are not supported");
  }
  c.lora_bias = get_bool(doc, "lora_bias", false, label);
  if (const auto it = doc.find("bias"); it != doc.end() && !it->is_null()) {
    if (!it->is_string()) fail(label, "\"bias\" is not a string");
    if (it->get<std::string>() != "none") {
      fail(label, "\"bias\": " + quote_name(it->get<std::string>()) +
                      ": adapters with trained biases are not supported (only bias \"none\")");
    }
  }
  if (get_bool(doc, "use_qalora", false, label)) {
    fail(label, "\"use_qalora\": true: QALoRA (A acts on pooled input groups) is not supported");
  }
  refuse_if_set(doc, "layer_replication", "layer replication (LoRA on duplicated layers)", label);
  refuse_if_set(doc, "alora_invocation_tokens", "aLoRA (activated LoRA, applied per token: cannot be merged)", label);
  refuse_if_set(doc, "use_bdlora", "BD-LoRA (block-diagonal factors)", label);
  refuse_if_set(doc, "arrow_config", "Arrow routing", label);
  refuse_if_set(doc, "kasa_config", "KaSA (a learned diagonal between A and B)", label);
  refuse_if_set(doc, "monteclora_config", "MonteCLoRA (extra sampler tensors)", label);
  refuse_if_set(doc, "target_parameters", "LoRA on nn.Parameter tensors (MoE experts)", label);
  refuse_if_set(doc, "trainable_token_indices", "trainable tokens (a sparse embedding delta)", label);

  if (const auto it = doc.find("init_lora_weights"); it != doc.end() && !it->is_null()) {
    if (it->is_boolean()) {
      c.init_lora_weights = it->get<bool>() ? "true" : "false";
    } else if (it->is_string()) {
      c.init_lora_weights = it->get<std::string>();
      std::string lower = c.init_lora_weights;
      std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char ch) { return std::tolower(ch); });
      if (lower.starts_with("pissa") || lower == "olora" || lower == "corda" || lower == "lora_ga") {
        fail(label, "\"init_lora_weights\": " + quote_name(c.init_lora_weights) +
                        ": this adapter is relative to a residual base model (the principal part moved into A and "
                        "B), not to the original base; convert it first (save_pretrained with "
                        "path_initial_model_for_weight_conversion)");
      }
      if (lower == "loftq") {
        fail(label, "\"init_lora_weights\": \"loftq\": this adapter is relative to the LoftQ-quantized base model, "
                    "not to the original base");
      }
    } else {
      fail(label, "\"init_lora_weights\" is neither a boolean nor a string");
    }
  }

  if (const auto it = doc.find("target_modules"); it != doc.end() && !it->is_null()) {
    if (it->is_string()) {
      c.target_modules_regex = it->get<std::string>();
    } else {
      c.target_modules = get_string_list(*it, "\"target_modules\"", label);
    }
  }
  if (const auto it = doc.find("modules_to_save"); it != doc.end()) {
    c.modules_to_save = get_string_list(*it, "\"modules_to_save\"", label);
  }
  if (const auto it = doc.find("base_model_name_or_path"); it != doc.end() && it->is_string()) {
    c.base_model_name_or_path = it->get<std::string>();
  }

  // The patterns in file order: PEFT takes the first matching key (Python dicts keep insertion order).
  const auto ordered = nlohmann::ordered_json::parse(json_text);
  c.rank_pattern = get_pattern<std::uint64_t>(ordered, "rank_pattern", label);
  c.alpha_pattern = get_pattern<double>(ordered, "alpha_pattern", label);
  return c;
}

// ---- mapping ------------------------------------------------------------------------------------

AdapterTensors map_adapter_tensors(const AdapterConfig& config, std::span<const TensorInfo> tensors,
                                   const std::string& label) {
  AdapterTensors out;
  std::map<std::string, Factors> factors;                      // module -> its factors
  std::vector<std::pair<std::string, const TensorInfo*>> saved_bases;  // module -> base_layer.weight
  std::vector<std::pair<FullTensor, const TensorInfo*>> full;
  std::set<std::string> adapter_names;
  std::vector<std::pair<std::string, const TensorInfo*>> lora_biases;  // module -> lora_B.bias

  auto note_adapter = [&](const std::string& name, const TensorInfo& t) {
    if (!adapter_names.empty() && !adapter_names.contains(name)) {
      fail(label, "tensor " + quote_name(t.name) + " names adapter " + quote_name(name) + " but another key names " +
                      quote_name(*adapter_names.begin()) + ": a file with several adapters is not supported");
    }
    adapter_names.insert(name);
  };

  for (const TensorInfo& t : tensors) {
    std::string_view key = t.name;
    if (key.starts_with(kPrefix)) key.remove_prefix(kPrefix.size());
    const std::vector<std::string> parts = split_dots(key);
    const std::size_t n = parts.size();
    const std::string quoted = quote_name(t.name);

    for (const auto& p : parts) {
      if (p == "original_module") fail(label, "tensor " + quoted + " is the original copy of a modules_to_save module, which PEFT never saves");
      if (p == "lora_magnitude_vector") fail(label, "tensor " + quoted + " is a DoRA magnitude vector: DoRA is not supported");
    }

    // LoRA factors: the last lora_A / lora_B / lora_embedding_A / lora_embedding_B component.
    std::size_t marker = n;
    for (std::size_t i = n; i-- > 0;) {
      if (parts[i] == "lora_A" || parts[i] == "lora_B" || parts[i] == "lora_embedding_A" || parts[i] == "lora_embedding_B") {
        marker = i;
        break;
      }
    }
    if (marker != n) {
      const std::string& kind = parts[marker];
      const bool embedding = kind.starts_with("lora_embedding");
      const std::size_t tail = n - marker - 1;
      bool ok = marker > 0;
      if (!embedding) {
        if (tail >= 1 && parts[n - 1] == "bias" && kind == "lora_B") {
          if (!config.lora_bias) {
            fail(label, "tensor " + quoted + " is a lora_B bias but the config does not say \"lora_bias\": true");
          }
          if (marker == 0 || tail > 2) fail(label, "tensor " + quoted + " is not a <module>.lora_B.bias key");
          if (tail == 2) note_adapter(parts[marker + 1], t);
          lora_biases.emplace_back(join_dots(parts, 0, marker), &t);
          continue;
        }
        ok = ok && (tail == 1 || tail == 2) && parts[n - 1] == "weight";
        if (ok && tail == 2) note_adapter(parts[marker + 1], t);
      } else {
        ok = ok && tail <= 1;
        if (ok && tail == 1) note_adapter(parts[marker + 1], t);
      }
      if (!ok) fail(label, "tensor " + quoted + " is not a PEFT LoRA key (<module>." + kind + (embedding ? "" : ".weight") + ")");
      Factors& f = factors[join_dots(parts, 0, marker)];
      const bool is_a = kind.back() == 'A';
      const TensorInfo*& slot = is_a ? f.a : f.b;
      if (slot != nullptr) {
        fail(label, "tensors " + quote_name(slot->name) + " and " + quoted + " are both " + kind + " of module " +
                        quote_name(join_dots(parts, 0, marker)));
      }
      if ((f.a != nullptr || f.b != nullptr) && f.embedding != embedding) {
        fail(label, "tensor " + quoted + " mixes lora_embedding_* and lora_A/lora_B factors on one module");
      }
      slot = &t;
      f.embedding = embedding;
      continue;
    }
    for (const auto& p : parts) {
      if (p.starts_with("lora_")) fail(label, "tensor " + quoted + ": " + quote_name(p) + " is not a LoRA factor taskvec knows (LoRA variant?)");
    }

    // <module>.base_layer.weight: the base weight of a LoRA module (save_embedding_layers).
    if (n >= 3 && parts[n - 2] == "base_layer") {
      if (parts[n - 1] != "weight") {
        fail(label, "tensor " + quoted + ": a saved base layer other than its weight (a trained bias?) is not supported");
      }
      saved_bases.emplace_back(join_dots(parts, 0, n - 2), &t);
      continue;
    }

    // <path>.modules_to_save.<adapter>.<param>: a modules_to_save tensor with the in-memory key.
    if (const auto it = std::find(parts.begin(), parts.end(), "modules_to_save"); it != parts.end()) {
      const std::size_t i = static_cast<std::size_t>(it - parts.begin());
      if (i == 0 || n - i < 3) fail(label, "tensor " + quoted + " is not a <module>.modules_to_save.<adapter>.<param> key");
      note_adapter(parts[i + 1], t);
      full.push_back({{join_dots(parts, 0, i) + "." + join_dots(parts, i + 2, n), t.name}, &t});
      continue;
    }

    // A plain key: a tensor of a modules_to_save module (PEFT matches module names by suffix), or a saved
    // embed_tokens / lm_head (PEFT's EMBEDDING_LAYER_NAMES; saved when the vocabulary was resized).
    bool is_full = false;
    for (std::size_t j = 1; j < n && !is_full; ++j) {
      const std::string module = join_dots(parts, 0, j);
      for (const auto& m : config.modules_to_save) {
        if (!m.empty() && (ends_with(module, m) || ends_with(std::string(kPrefix) + module, m))) is_full = true;
      }
    }
    if (!is_full && n >= 2 && (parts[n - 2] == "embed_tokens" || parts[n - 2] == "lm_head")) is_full = true;
    if (!is_full) {
      fail(label, "tensor " + quoted + " is neither a LoRA factor (lora_A, lora_B, lora_embedding_A, lora_embedding_B), "
                  "nor a tensor of a modules_to_save module, nor a saved embedding");
    }
    full.push_back({{std::string(key), t.name}, &t});
  }

  std::map<std::string, std::string> targets;  // target -> the adapter key that defines it
  auto claim = [&](const std::string& target, const std::string& source) {
    const auto [it, inserted] = targets.emplace(target, source);
    if (!inserted) {
      fail(label, "tensors " + quote_name(it->second) + " and " + quote_name(source) + " both define base tensor " +
                      quote_name(target));
    }
  };

  for (auto& [module, f] : factors) {
    if (f.a == nullptr || f.b == nullptr) {
      const TensorInfo* lone = f.a != nullptr ? f.a : f.b;
      fail(label, "tensor " + quote_name(lone->name) + " has no matching " +
                      (f.embedding ? (f.a ? "lora_embedding_B" : "lora_embedding_A") : (f.a ? "lora_B" : "lora_A")) +
                      " for module " + quote_name(module));
    }
    for (const TensorInfo* x : {f.a, f.b}) {
      if (!dtype_is_editable(x->dtype)) {
        fail(label, "tensor " + quote_name(x->name) + ": dtype " + std::string(dtype_name(x->dtype)) +
                        " is not a float dtype taskvec decodes (F16, BF16, F32, F64, F8_E4M3, F8_E5M2)");
      }
    }
    const auto& as = f.a->shape;
    const auto& bs = f.b->shape;
    const std::string shapes = "A " + quote_name(f.a->name) + " " + format_dims(as) + ", B " + quote_name(f.b->name) +
                               " " + format_dims(bs);
    LoraModule m;
    m.module = module;
    m.target = module + ".weight";
    m.a_name = f.a->name;
    m.b_name = f.b->name;
    m.is_embedding = f.embedding;
    if (f.embedding) {
      if (as.size() != 2 || bs.size() != 2 || as[0] != bs[1]) {
        fail(label, "embedding LoRA " + shapes + " do not fit: expected A [r, num_embeddings], B [embedding_dim, r]");
      }
      m.shape = {as[1], bs[0]};
    } else {
      bool ok = as.size() >= 2 && bs.size() == as.size() && as[0] == bs[1];
      for (std::size_t i = 2; ok && i < bs.size(); ++i) ok = bs[i] == 1;
      if (!ok) fail(label, "LoRA " + shapes + " do not fit: expected A [r, in(, k...)], B [out, r(, 1...)]");
      m.fan_in_fan_out = config.fan_in_fan_out && as.size() == 2;
      if (m.fan_in_fan_out) {
        m.shape = {as[1], bs[0]};
      } else {
        m.shape = {bs[0]};
        m.shape.insert(m.shape.end(), as.begin() + 1, as.end());
      }
    }
    m.rank = as[0];
    const std::uint64_t expected = config.rank_for(module);
    if (m.rank != expected) {
      fail(label, "tensor " + quote_name(f.a->name) + " has rank " + std::to_string(m.rank) + " but the config gives module " +
                      quote_name(module) + " rank " + std::to_string(expected) + " (r / rank_pattern)");
    }
    m.scale = config.scale_for(module);
    claim(m.target, f.a->name);
    out.modules.push_back(std::move(m));
  }

  for (const auto& [module, info] : lora_biases) {
    const std::string& wanted = module;  // clang 14 cannot capture a structured binding
    auto it = std::find_if(out.modules.begin(), out.modules.end(), [&](const LoraModule& m) { return m.module == wanted; });
    if (it == out.modules.end() || it->is_embedding) {
      fail(label, "tensor " + quote_name(info->name) + " is the lora_B bias of module " + quote_name(module) +
                      ", which has no lora_A / lora_B factors");
    }
    const std::uint64_t rows = it->fan_in_fan_out ? it->shape[1] : it->shape[0];
    if (info->shape != std::vector<std::uint64_t>{rows} || !dtype_is_editable(info->dtype)) {
      fail(label, "tensor " + quote_name(info->name) + " has shape " + format_dims(info->shape) + " and dtype " +
                      std::string(dtype_name(info->dtype)) + ": a lora_B bias is a float vector of lora_B's " +
                      std::to_string(rows) + " rows");
    }
    claim(module + ".bias", info->name);
    out.bias_deltas.push_back({module + ".bias", info->name, it->scale});
  }
  std::sort(out.bias_deltas.begin(), out.bias_deltas.end(), [](const auto& x, const auto& y) { return x.target < y.target; });
  for (const auto& [module, info] : saved_bases) {
    const std::string& wanted = module;  // clang 14 cannot capture a structured binding
    auto it = std::find_if(out.modules.begin(), out.modules.end(), [&](const LoraModule& m) { return m.module == wanted; });
    if (it == out.modules.end()) {
      fail(label, "tensor " + quote_name(info->name) + " is the base layer of module " + quote_name(module) +
                      ", which has no LoRA factors");
    }
    if (info->shape != it->shape) {
      fail(label, "tensor " + quote_name(info->name) + " has shape " + format_dims(info->shape) + " but the LoRA delta of " +
                      quote_name(module) + " has shape " + format_dims(it->shape));
    }
    it->saved_base_name = info->name;
  }
  for (auto& [f, info] : full) {
    claim(f.target, f.source);
    out.full_tensors.push_back(std::move(f));
  }
  std::sort(out.modules.begin(), out.modules.end(), [](const auto& x, const auto& y) { return x.target < y.target; });
  std::sort(out.full_tensors.begin(), out.full_tensors.end(), [](const auto& x, const auto& y) { return x.target < y.target; });
  if (!adapter_names.empty()) out.adapter_name = *adapter_names.begin();
  return out;
}

void orient_to_base(LoraModule& module, const std::vector<std::uint64_t>& base_shape, const std::string& label) {
  if (base_shape == module.shape) return;
  if (!module.is_embedding && module.shape.size() == 2 && base_shape.size() == 2 && base_shape[0] == module.shape[1] &&
      base_shape[1] == module.shape[0]) {
    module.fan_in_fan_out = !module.fan_in_fan_out;
    std::swap(module.shape[0], module.shape[1]);
    return;
  }
  throw Error(ErrorCode::kShapeMismatch, label + ": base tensor " + quote_name(module.target) + " has shape " +
                                             format_dims(base_shape) + " but the LoRA delta from " +
                                             quote_name(module.a_name) + " has shape " + format_dims(module.shape));
}

// ---- LoraProductSource -----------------------------------------------------------------------------

namespace {
// Reads and decodes elements [first, first + count) of tensor `t` to f64.
void read_f64(const TensorRef& t, std::uint64_t first, std::uint64_t count, double* dst) {
  if (count == 0) return;
  const std::uint64_t esize = dtype_bits(t.info->dtype) / 8;
  std::vector<std::byte> raw(count * esize);
  t.source->read(*t.info, first * esize, raw);
  decode_to_f64(t.info->dtype, raw.data(), dst, count);
}
}  // namespace

LoraProductSource::LoraProductSource(LoraModule module, TensorRef a, TensorRef b, std::shared_ptr<const void> keep_alive)
    : module_(std::move(module)), a_(a), b_(b), keep_alive_(std::move(keep_alive)) {
  const auto& as = a_.info->shape;
  const auto& bs = b_.info->shape;
  const std::string label = a_.source->path().string();
  if (!dtype_is_editable(a_.info->dtype) || !dtype_is_editable(b_.info->dtype) || as.size() < 2 ||
      bs.size() != as.size() || as[0] != module_.rank || bs[1] != module_.rank) {
    fail(label, "LoRA factors " + quote_name(a_.info->name) + " " + format_dims(as) + " and " + quote_name(b_.info->name) +
                    " " + format_dims(bs) + " do not fit module " + quote_name(module_.module));
  }
  const bool transposed = module_.fan_in_fan_out || module_.is_embedding;
  if (transposed && as.size() != 2) fail(label, "a transposed LoRA delta must be 2-D (" + quote_name(a_.info->name) + ")");
  if (transposed) {
    rows_ = as[1];
    cols_ = bs[0];
  } else {
    rows_ = bs[0];
    cols_ = product(std::span(as).subspan(1));
  }
  if (product(module_.shape) != rows_ * cols_) {
    fail(label, "module " + quote_name(module_.module) + ": shape " + format_dims(module_.shape) +
                    " does not match its factors " + format_dims(as) + ", " + format_dims(bs));
  }
  info_.name = module_.target;
  info_.dtype = DType::kF32;
  info_.shape = module_.shape;
  info_.data_begin = 0;
  info_.data_end = rows_ * cols_ * 4;
}

void LoraProductSource::read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const {
  const std::uint64_t size = info_.num_bytes();
  if (info.num_bytes() != size || byte_offset > size || dst.size() > size - byte_offset) {
    throw Error(ErrorCode::kInvalidArgument, path().string() + ": LoRA delta " + quote_name(info_.name) + ": bytes [" +
                                                 std::to_string(byte_offset) + ", " +
                                                 std::to_string(byte_offset + dst.size()) + ") are not inside its " +
                                                 std::to_string(size) + " bytes");
  }
  if (dst.empty()) return;
  const std::uint64_t r = module_.rank;
  const bool transposed = module_.fan_in_fan_out || module_.is_embedding;
  const std::uint64_t first_elem = byte_offset / 4;
  const std::uint64_t end_elem = (byte_offset + dst.size() + 3) / 4;
  const std::uint64_t row0 = first_elem / cols_;
  const std::uint64_t row1 = (end_elem + cols_ - 1) / cols_;
  const std::uint64_t nrows = row1 - row0;

  // left[(row - row0) * r + k] = L[row, k]; right[k * cols + col] = R[k, col]; dW = s * L @ R.
  std::vector<double> left(nrows * r);
  std::vector<double> right(r * cols_);
  if (!transposed) {
    read_f64(b_, row0 * r, nrows * r, left.data());  // B rows [row0, row1)
    read_f64(a_, 0, r * cols_, right.data());        // all of A: r x cols
  } else {
    std::vector<double> piece(nrows);
    for (std::uint64_t k = 0; k < r; ++k) {  // L[row, k] = A[k, row]
      read_f64(a_, k * rows_ + row0, nrows, piece.data());
      for (std::uint64_t i = 0; i < nrows; ++i) left[i * r + k] = piece[i];
    }
    std::vector<double> b(cols_ * r);  // R[k, col] = B[col, k]
    read_f64(b_, 0, cols_ * r, b.data());
    for (std::uint64_t col = 0; col < cols_; ++col) {
      for (std::uint64_t k = 0; k < r; ++k) right[k * cols_ + col] = b[col * r + k];
    }
  }

  std::vector<double> acc(cols_);
  std::vector<float> row_out(cols_);
  const double s = module_.scale;
  for (std::uint64_t row = row0; row < row1; ++row) {
    std::fill(acc.begin(), acc.end(), 0.0);
    const double* l = left.data() + (row - row0) * r;
    for (std::uint64_t k = 0; k < r; ++k) {
      const double lk = l[k];
      const double* rk = right.data() + k * cols_;
      for (std::uint64_t col = 0; col < cols_; ++col) acc[col] += lk * rk[col];
    }
    for (std::uint64_t col = 0; col < cols_; ++col) row_out[col] = static_cast<float>(s * acc[col]);
    // Copy the part of this row's bytes that falls inside [byte_offset, byte_offset + dst.size()).
    const std::uint64_t row_begin = row * cols_ * 4;
    const std::uint64_t lo = std::max(row_begin, byte_offset);
    const std::uint64_t hi = std::min(row_begin + cols_ * 4, byte_offset + dst.size());
    if (lo < hi) {
      std::memcpy(dst.data() + (lo - byte_offset), reinterpret_cast<const std::byte*>(row_out.data()) + (lo - row_begin),
                  hi - lo);
    }
  }
}

// ---- sources and folders ------------------------------------------------------------------------


bool is_adapter_folder(const std::filesystem::path& path) noexcept {
  std::error_code ec;
  return std::filesystem::is_directory(path, ec) && std::filesystem::is_regular_file(path / kAdapterConfigName, ec);
}

AdapterFiles find_adapter_files(const std::filesystem::path& folder) {
  std::error_code ec;
  AdapterFiles files{folder, folder / kAdapterConfigName, folder / kAdapterSafetensorsName};
  if (!std::filesystem::exists(files.config, ec)) {
    throw Error(ErrorCode::kIo, folder.string() + ": no " + kAdapterConfigName + ": not a PEFT adapter folder");
  }
  if (std::filesystem::exists(files.weights, ec)) return files;
  if (std::filesystem::exists(folder / kAdapterBinName, ec)) {
    files.weights = folder / kAdapterBinName;
    return files;
  }
  throw Error(ErrorCode::kIo, folder.string() + ": PEFT adapter folder without " + kAdapterSafetensorsName + " or " +
                                  kAdapterBinName);
}

void CombinedSource::read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const {
  if (byte_offset > info.num_bytes() || dst.size() > info.num_bytes() - byte_offset) {
    throw Error(ErrorCode::kInvalidArgument, "tensor " + quote_name(info.name) + ": bytes outside the tensor");
  }
  if (dst.empty()) return;
  const std::uint64_t first = byte_offset / 4, last = (byte_offset + dst.size() + 3) / 4, n = last - first;
  std::vector<double> acc(n, 0.0), x(n);
  std::vector<std::byte> raw;
  for (const auto& [c, t] : terms_) {
    const std::uint64_t size = dtype_bits(t.info->dtype) / 8;
    raw.resize(n * size);
    t.source->read(*t.info, first * size, raw);
    decode_to_f64(t.info->dtype, raw.data(), x.data(), n);
    for (std::uint64_t i = 0; i < n; ++i) acc[i] += c * x[i];
  }
  std::vector<std::byte> out(n * 4);
  encode_from_f64(DType::kF32, acc.data(), out.data(), n);
  std::copy_n(out.begin() + static_cast<std::ptrdiff_t>(byte_offset - first * 4), dst.size(), dst.begin());
}


std::vector<AdapterTensor> make_adapter_tensors(const AdapterTensors& mapping, std::span<const TensorRef> tensors,
                                                const std::shared_ptr<const void>& keep_alive) {
  std::map<std::string_view, TensorRef> by_name;
  for (const TensorRef& t : tensors) by_name.emplace(t.info->name, t);
  auto ref = [&](const std::string& name) {
    const auto it = by_name.find(name);
    if (it == by_name.end()) throw Error(ErrorCode::kInternal, "adapter tensor " + quote_name(name) + " has no source");
    return it->second;
  };
  std::vector<AdapterTensor> out;
  for (const LoraModule& m : mapping.modules) {
    auto src = std::make_shared<LoraProductSource>(m, ref(m.a_name), ref(m.b_name), keep_alive);
    out.push_back({AdapterTensor::Kind::kDelta, src->info(), src, m});
  }
  for (const BiasDelta& d : mapping.bias_deltas) {
    const TensorRef original = ref(d.source);
    AdapterTensor t{AdapterTensor::Kind::kDelta, *original.info, std::make_shared<CombinedSource>(original.source->path(), std::vector<std::pair<double, TensorRef>>{{d.scale, original}}, keep_alive), {}};
    t.info.name = d.target;
    t.info.dtype = DType::kF32;
    t.info.data_begin = 0;
    t.info.data_end = 4 * original.info->num_elements();
    out.push_back(std::move(t));
  }
  for (const FullTensor& f : mapping.full_tensors) {
    const TensorRef original = ref(f.source);
    AdapterTensor t{AdapterTensor::Kind::kFull, *original.info, std::make_shared<RenamedSource>(original, keep_alive), {}};
    t.info.name = f.target;
    out.push_back(std::move(t));
  }
  std::sort(out.begin(), out.end(), [](const auto& x, const auto& y) { return x.info.name < y.info.name; });
  return out;
}

OpenedAdapter open_adapter_folder(const std::filesystem::path& folder) {
  OpenedAdapter opened;
  opened.files = find_adapter_files(folder);
  opened.config = parse_adapter_config(
      format_detail::read_folder_file(folder, opened.files.config, kMaxAdapterConfigSize, ErrorCode::kInvalidAdapter),
      opened.files.config.string());
  const auto weights = format_detail::resolve_inside(folder, opened.files.weights, opened.files.weights.filename().string());
  if (opened.files.weights.filename() == kAdapterBinName) {
    // adapter_model.bin: a PyTorch zip, read by the restricted unpickler (nothing is executed).
    auto file = std::make_shared<const format_detail::PytorchFile>(format_detail::open_pytorch_file(weights));
    opened.mapping = map_adapter_tensors(opened.config, file->tensors, opened.files.weights.string());
    std::vector<TensorRef> refs;
    for (const TensorInfo& t : file->tensors) refs.push_back({&t, file->source.get()});
    opened.tensors = make_adapter_tensors(opened.mapping, refs, file);
    return opened;
  }
  auto source = std::make_shared<const SafetensorsFileSource>(SafetensorsFile::open(weights));
  const auto& infos = source->file().header().tensors;
  opened.mapping = map_adapter_tensors(opened.config, infos, opened.files.weights.string());
  std::vector<TensorRef> refs;
  refs.reserve(infos.size());
  for (const TensorInfo& t : infos) refs.push_back({&t, source.get()});
  opened.tensors = make_adapter_tensors(opened.mapping, refs, source);
  return opened;
}

}  // namespace taskvec::peft
