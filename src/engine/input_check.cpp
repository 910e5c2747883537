// Input checks shared by the linear edits (linear_edit.cpp), the merge driver (merge_driver.cpp) and
// similarity (similarity.cpp): quantized storage, kinds of input (task vector or model), missing,
// extra and mismatched tensors, integer tensors a fine-tune changed. One function per problem, so the
// wording and the error code are the same whichever command meets it (docs/SECURITY.md, "Inputs
// refused or reported").
#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string_view>

#include <fmt/format.h>

#include "engine/internal.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec::detail {
namespace {

namespace fs = std::filesystem;

constexpr std::uintmax_t kConfigCapBytes = std::uintmax_t{16} << 20;

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool is_f8(DType d) {
  return d == DType::kF8E4M3 || d == DType::kF8E5M2 || d == DType::kF8E4M3FNUZ || d == DType::kF8E5M2FNUZ;
}

std::string file_of(const CheckpointTensor& t) { return t.file().string(); }

struct Finding {
  std::string method;   // "bitsandbytes 4-bit", ...
  std::string tensor;   // an example tensor (the packed weight)
  std::string file;     // where it is (a shard, or config.json)
  std::string detail;   // what gave it away
};

// Quantized storage recognised from tensor names and dtypes (the companions each method ships).
std::optional<Finding> quantized_tensors(const Checkpoint& c) {
  auto has = [&](const std::string& n) { return c.find(n) != nullptr; };
  for (const auto& name : c.tensor_names()) {
    const CheckpointTensor& t = *c.find(name);
    auto found = [&](std::string method, const std::string& owner, const std::string& companion) {
      const CheckpointTensor* o = c.find(owner);
      return Finding{std::move(method), owner, file_of(o ? *o : t),
                     fmt::format("tensor '{}' comes with '{}'", owner, companion)};
    };
    if (is_f8(t.info->dtype)) {
      const std::string prefix = ends_with(name, ".weight") ? name.substr(0, name.size() - 7) : name;
      for (const char* suffix : {".weight_scale_inv", ".weight_scale", ".scale_inv", ".input_scale"}) {
        if (has(prefix + suffix)) {
          return found(fmt::format("block-scaled FP8 ({} weights with scale tensors)", dtype_name(t.info->dtype)), name,
                       prefix + suffix);
        }
      }
    }
    const auto qs = name.find(".quant_state.");
    if (qs != std::string::npos) {
      const bool nf4 = name.find("nf4") != std::string::npos;
      return found(nf4 ? "bitsandbytes 4-bit (nf4)" : "bitsandbytes 4-bit", name.substr(0, qs), name);
    }
    for (const char* suffix : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"}) {
      if (ends_with(name, suffix)) {
        return found("bitsandbytes 4-bit", name.substr(0, name.size() - std::string_view(suffix).size()), name);
      }
    }
    for (const char* suffix : {".SCB", ".weight_format"}) {
      if (ends_with(name, suffix)) {
        return found("bitsandbytes 8-bit", name.substr(0, name.size() - std::string_view(suffix).size()) + ".weight",
                     name);
      }
    }
    for (const char* suffix : {".qweight", ".qzeros", ".g_idx"}) {
      if (ends_with(name, suffix)) {
        const std::string prefix = name.substr(0, name.size() - std::string_view(suffix).size());
        const bool gptq = has(prefix + ".g_idx");
        std::string with;
        for (const char* part : {".qweight", ".qzeros", ".scales", ".g_idx"}) {
          if (has(prefix + part)) with += fmt::format("{}'{}{}'", with.empty() ? "" : ", ", prefix, part);
        }
        const CheckpointTensor* q = c.find(prefix + ".qweight");
        return Finding{gptq ? "GPTQ" : "GPTQ or AWQ (packed integer weights)", prefix + ".qweight",
                       file_of(q ? *q : t), fmt::format("packed weights and their companions {}", with)};
      }
    }
  }
  return std::nullopt;
}

// quantization_config of the folder's config.json, if any.
std::optional<Finding> quantized_config(const Checkpoint& c) {
  const std::optional<std::string> text = read_config_text(c);
  if (!text) return std::nullopt;
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(*text);
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;  // not interpreted: the tensors are still checked
  }
  if (!j.is_object()) return std::nullopt;
  for (const char* key : {"quantization_config", "compression_config"}) {
    auto q = j.find(key);
    if (q == j.end() || q->is_null()) continue;
    std::string method = "unknown quant_method";
    if (q->is_object()) {
      auto m = q->find("quant_method");
      if (m != q->end() && m->is_string()) {
        method = m->get<std::string>();
      } else if (q->value("load_in_4bit", false) == true) {
        method = "bitsandbytes (load_in_4bit)";
      } else if (q->value("load_in_8bit", false) == true) {
        method = "bitsandbytes (load_in_8bit)";
      }
    }
    return Finding{method, "", (*c.folder() / "config.json").string(),
                   fmt::format("its \"{}\" names quant_method '{}'", key, method)};
  }
  return std::nullopt;
}

}  // namespace

std::optional<std::string> read_config_text(const Checkpoint& ckpt) {
  if (!ckpt.folder()) return std::nullopt;
  const fs::path config = *ckpt.folder() / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return std::nullopt;  // a FIFO or device is never opened
  const std::uintmax_t size = fs::file_size(config, ec);
  if (ec) throw Error(ErrorCode::kIo, fmt::format("{}: cannot read its size: {}", config.string(), ec.message()));
  if (size > kConfigCapBytes) {
    throw Error(ErrorCode::kIo, fmt::format("{}: {} bytes, more than the {} bytes a config.json may have; "
                                            "remove or fix it",
                                            config.string(), size, kConfigCapBytes));
  }
  std::ifstream in(config, std::ios::binary);
  if (!in) throw Error(ErrorCode::kIo, fmt::format("{}: cannot be opened", config.string()));
  std::string text(static_cast<std::size_t>(size), '\0');
  in.read(text.data(), static_cast<std::streamsize>(size));
  text.resize(static_cast<std::size_t>(in.gcount()));  // it may have shrunk: read what is there, never more
  return text;
}

void check_not_quantized(const Checkpoint& ckpt) {
  std::optional<Finding> tensors = quantized_tensors(ckpt);
  std::optional<Finding> config = quantized_config(ckpt);
  if (!tensors && !config) return;
  std::string method = config ? config->method : tensors->method;
  std::string example;
  std::string file;
  std::string why;
  if (tensors) {
    example = tensors->tensor;
    file = tensors->file;
    why = tensors->detail;
    if (config) why += fmt::format("; {} says quant_method '{}'", config->file, config->method);
  } else {
    // Name one tensor the method packs: the first non-float one, else the first.
    for (const auto& name : ckpt.tensor_names()) {
      if (!dtype_is_editable(ckpt.find(name)->info->dtype)) {
        example = name;
        break;
      }
    }
    if (example.empty() && !ckpt.tensor_names().empty()) example = ckpt.tensor_names().front();
    file = config->file;
    why = config->detail;
  }
  throw Error(ErrorCode::kQuantized,
              fmt::format("{}: {} is a quantized checkpoint ({}: {}; e.g. tensor '{}'): its packed codes and scales "
                          "cannot be combined as numbers, the result would be a corrupt model; supply the "
                          "full-precision (or dequantized) checkpoints",
                          ckpt.path().string(), file, method, why, example));
}

std::string checkpoint_kind(const Checkpoint& ckpt) {
  auto it = ckpt.metadata().find(kMetaKind);
  return it == ckpt.metadata().end() ? std::string() : it->second;
}

void require_model(const Checkpoint& ckpt, const std::string& role) {
  if (!ckpt.is_adapter()) return;
  throw Error(ErrorCode::kInvalidArgument,
              fmt::format("{} is a PEFT adapter (deltas only), not a model, but is used as {}: give the model it was "
                          "trained on there, and the adapter as a task vector (apply -t ADAPTER, tau(NAME) in edit, "
                          "model: BASE+ADAPTER in a recipe)",
                          ckpt.path().string(), role));
}

const Checkpoint& as_model(const Checkpoint& ckpt, const Checkpoint& base, std::optional<Checkpoint>& holder) {
  if (!ckpt.is_adapter()) return ckpt;
  holder.emplace(ckpt.adapter_over(base, AdapterUse::kModel));
  return *holder;
}

std::optional<std::string> adapter_base_note(const Checkpoint& adapter, const Checkpoint& base) {
  const std::string recorded = adapter.adapter_base_model();
  if (recorded.empty()) return std::nullopt;
  std::filesystem::path base_path = base.folder() ? *base.folder() : base.path();
  const std::string base_name = std::filesystem::path(base_path).lexically_normal().filename().string();
  const std::string recorded_name = std::filesystem::path(recorded).lexically_normal().filename().string();
  if (!base_name.empty() && base_name == recorded_name) return std::nullopt;
  return fmt::format("{} was trained on {} (base_model_name_or_path); applying it to {}", adapter.path().string(),
                     escape_control(recorded), base.path().string());
}

std::optional<std::string> task_vector_as_model_warning(const Checkpoint& ckpt, const std::string& role) {
  if (checkpoint_kind(ckpt) != "task_vector") return std::nullopt;
  return fmt::format("{} is a task vector (taskvec.kind=task_vector), not a model, but is used as {}: the result "
                     "mixes a difference of weights with weights; give the fine-tuned model itself, or use "
                     "`taskvec apply PRE -t {}`",
                     ckpt.path().string(), role, ckpt.path().string());
}

std::optional<double> sampled_norm_ratio(const Checkpoint& x, const Checkpoint& ref) {
  constexpr std::uint64_t kPiece = 4096;
  constexpr std::size_t kPieces = 4, kTensors = 256;
  std::vector<std::string> names;
  for (const auto& name : x.tensor_names()) {
    const CheckpointTensor* a = x.find(name);
    const CheckpointTensor* b = ref.find(name);
    if (b == nullptr || !dtype_is_editable(a->info->dtype) || !dtype_is_editable(b->info->dtype)) continue;
    if (a->info->shape != b->info->shape || a->info->num_elements() == 0) continue;
    names.push_back(name);
  }
  if (names.empty()) return std::nullopt;
  const std::size_t take = std::min(names.size(), kTensors);
  std::vector<float> va(kPiece), vb(kPiece);
  std::vector<std::byte> staging;
  double sx = 0, sr = 0;
  for (std::size_t k = 0; k < take; ++k) {
    const std::string& name = names[k * names.size() / take];  // evenly spaced over the sorted names
    const CheckpointTensor& a = *x.find(name);
    const CheckpointTensor& b = *ref.find(name);
    const std::uint64_t n = a.info->num_elements();
    const std::uint64_t len = std::min(n, kPiece);
    const std::uint64_t pieces = std::min<std::uint64_t>(kPieces, (n + kPiece - 1) / kPiece);
    for (std::uint64_t p = 0; p < pieces; ++p) {
      const std::uint64_t begin = pieces == 1 ? 0 : (n - len) * p / (pieces - 1);
      read_decoded(a, begin, len, va.data(), staging);
      read_decoded(b, begin, len, vb.data(), staging);
      for (std::uint64_t i = 0; i < len; ++i) {
        // NaN/Inf are reported by the edit itself; here they only must not decide the kind.
        if (std::isfinite(va[i])) sx += double(va[i]) * double(va[i]);
        if (std::isfinite(vb[i])) sr += double(vb[i]) * double(vb[i]);
      }
    }
  }
  if (!(sr > 0)) return std::nullopt;
  return std::sqrt(sx / sr);
}

TensorFit check_input_tensor(const std::string& name, const Checkpoint& ref, const CheckpointTensor& r,
                             const Checkpoint& input, const CheckpointTensor* t, bool extra_rows_flag,
                             bool merge_extra_rows) {
  if (t == nullptr) {
    throw Error(ErrorCode::kTensorMissing,
                fmt::format("tensor '{}' of {} is missing from {}: every input needs the tensors of {}", name,
                            ref.path().string(), input.path().string(), ref.path().string()));
  }
  const bool editable = dtype_is_editable(r.info->dtype);
  TensorFit fit = TensorFit::kSame;
  if (t->info->shape != r.info->shape) {
    const auto& rs = r.info->shape;
    const auto& ts = t->info->shape;
    const bool rows_only = !ts.empty() && ts.size() == rs.size() && std::equal(ts.begin() + 1, ts.end(), rs.begin() + 1);
    if (!rows_only || !merge_extra_rows || !editable) {
      throw Error(ErrorCode::kShapeMismatch,
                  fmt::format("tensor '{}': shape {} in {} but {} in {}{}", name, shape_text(rs), file_of(r),
                              shape_text(ts), file_of(*t),
                              rows_only && editable && extra_rows_flag && !merge_extra_rows
                                  ? " (--merge-extra-rows combines the rows both have and copies the extra rows)"
                                  : ""));
    }
    fit = TensorFit::kExtraRows;
  }
  if (editable && !dtype_is_editable(t->info->dtype)) {
    throw Error(ErrorCode::kDtypeMismatch,
                fmt::format("tensor '{}': dtype {} in {} cannot be combined with {} in {}", name, dtype_name(r.info->dtype),
                            file_of(r), dtype_name(t->info->dtype), file_of(*t)));
  }
  return fit;
}

std::optional<std::string> integer_tensor_change(const std::string& name, const CheckpointTensor& r,
                                                 const CheckpointTensor& t, const std::string& copied_from) {
  if (t.info->dtype == r.info->dtype && same_bytes(r, t)) return std::nullopt;
  return fmt::format("tensor '{}' ({}) differs in {}: integer/bool tensors are never combined, it is copied from {}",
                     name, dtype_name(r.info->dtype), file_of(t), copied_from);
}

void throw_extra_tensor(const std::string& name, const Checkpoint& input, const Checkpoint& ref, const std::string& hint) {
  throw Error(ErrorCode::kTensorMissing, fmt::format("tensor '{}' of {} is not in {}{}", name, input.path().string(),
                                                     ref.path().string(), hint));
}

}  // namespace taskvec::detail
