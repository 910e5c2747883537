// PEFT LoRA adapters as checkpoints: Checkpoint::open of an adapter folder, and Checkpoint::adapter_over,
// which completes an adapter against its base model into a task vector or a model whose tensors are
// computed on demand (src/format/peft_adapter.hpp holds the adapter format itself).
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "format/peft_adapter.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/engine.hpp"  // kMetaKind
#include "taskvec/error.hpp"

namespace taskvec {

namespace fs = std::filesystem;
using format_detail::quote_name;

using peft::CombinedSource;
using Terms = std::vector<std::pair<double, peft::TensorRef>>;

Checkpoint Checkpoint::open_adapter(const fs::path& folder) {
  auto opened = std::make_shared<peft::OpenedAdapter>(peft::open_adapter_folder(folder));
  Checkpoint ck;
  ck.path_ = folder;
  ck.folder_ = folder;
  ck.format_ = "lora";
  for (const auto& t : opened->tensors) {
    ck.tensors_.emplace(t.info.name, CheckpointTensor{&t.info, t.source.get()});
    ck.sources_.push_back(t.source);
  }
  ck.files_ = {opened->files.weights};  // the config is read by open; the folder is protected as folder()
  ck.names_.reserve(ck.tensors_.size());
  for (const auto& [name, t] : ck.tensors_) ck.names_.push_back(name);
  ck.metadata_[kMetaKind] = "lora_adapter";
  ck.adapter_ = std::move(opened);
  return ck;
}

std::string Checkpoint::adapter_base_model() const { return adapter_ ? adapter_->config.base_model_name_or_path : ""; }

Checkpoint Checkpoint::adapter_over(const Checkpoint& base, AdapterUse use) const {
  if (!is_adapter()) throw Error(ErrorCode::kInvalidArgument, path_.string() + ": not a PEFT adapter");
  const std::string label = adapter_->files.weights.string();
  // Every target must be a tensor of the base, in one of the two orientations: checked before anything.
  std::map<std::string, const peft::AdapterTensor*> by_target;
  for (const auto& t : adapter_->tensors) {
    const CheckpointTensor* b = base.find(t.info.name);
    if (b == nullptr) {
      throw Error(ErrorCode::kTensorMissing,
                  fmt::format("{}: the adapter changes tensor {}, which {} lacks: this adapter was made for another "
                              "model{}",
                              label, quote_name(t.info.name), base.path().string(),
                              adapter_->config.base_model_name_or_path.empty()
                                  ? std::string()
                                  : " (" + quote_name(adapter_->config.base_model_name_or_path) + ")"));
    }
    if (t.kind == peft::AdapterTensor::Kind::kDelta && !dtype_is_editable(b->info->dtype)) {
      throw Error(ErrorCode::kDtypeMismatch,
                  fmt::format("{}: the adapter's LoRA module changes tensor {}, which is {} in {}: not a float tensor",
                              label, quote_name(t.info.name), dtype_name(b->info->dtype), base.path().string()));
    }
    if ((t.kind == peft::AdapterTensor::Kind::kFull || !t.module) && b->info->shape != t.info.shape) {
      throw Error(ErrorCode::kShapeMismatch,
                  fmt::format("{}: saved tensor {} has shape {} but {} in {}", label, quote_name(t.info.name),
                              format_detail::format_dims(t.info.shape), format_detail::format_dims(b->info->shape),
                              base.path().string()));
    }
    by_target.emplace(t.info.name, &t);
  }

  Checkpoint out;
  out.path_ = path_;
  // kModel takes the base's folder (config, tokenizer); both list the adapter folder among files(), so
  // no output is ever written into it.
  out.folder_ = use == AdapterUse::kModel ? base.folder_ : folder_;
  if (use == AdapterUse::kModel) out.auxiliary_ = base.auxiliary_;
  out.derived_ = true;
  out.format_ = "lora";
  out.aliases_ = base.aliases_;
  out.sources_ = base.sources_;
  out.sources_.insert(out.sources_.end(), sources_.begin(), sources_.end());
  out.files_ = base.files_;
  out.files_.insert(out.files_.end(), files_.begin(), files_.end());
  if (folder_) out.files_.push_back(*folder_);
  std::sort(out.files_.begin(), out.files_.end());
  out.names_ = base.names_;
  out.notes_ = notes_;
  out.adapter_ = adapter_;
  out.owned_infos_ = base.owned_infos_;
  if (use == AdapterUse::kTaskVector) {
    out.metadata_[kMetaKind] = "task_vector";
  } else {
    out.metadata_ = base.metadata_;
    out.index_metadata_ = base.index_metadata_;
  }
  const auto add = [&](const std::string& name, TensorInfo info, std::shared_ptr<const TensorSource> source) {
    auto owned = std::make_shared<const TensorInfo>(std::move(info));
    out.tensors_.emplace(name, CheckpointTensor{owned.get(), source.get()});
    out.owned_infos_.push_back(std::move(owned));
    out.sources_.push_back(std::move(source));
  };
  const auto f32_info = [](const std::string& name, const std::vector<std::uint64_t>& shape) {
    TensorInfo info;
    info.name = name;
    info.dtype = DType::kF32;
    info.shape = shape;
    std::uint64_t n = 1;
    for (const auto d : shape) n *= d;
    info.data_end = 4 * n;
    return info;
  };

  for (const auto& name : base.names_) {
    const CheckpointTensor& b = base.tensors_.at(name);
    const auto it = by_target.find(name);
    if (it == by_target.end()) {
      if (use == AdapterUse::kModel || !dtype_is_editable(b.info->dtype)) {
        out.tensors_.emplace(name, b);  // unchanged: the base tensor itself
      } else {
        add(name, f32_info(name, b.info->shape), std::make_shared<CombinedSource>(b.file(), Terms{}));
      }
      continue;
    }
    const peft::AdapterTensor& t = *it->second;
    const CheckpointTensor own{&t.info, t.source.get()};
    if (t.kind == peft::AdapterTensor::Kind::kFull) {
      if (use == AdapterUse::kModel) {
        out.tensors_.emplace(name, own);
      } else {
        add(name, f32_info(name, b.info->shape),
            std::make_shared<CombinedSource>(own.file(), Terms{{1.0, {own.info, own.source}}, {-1.0, {b.info, b.source}}}));
      }
      continue;
    }
    // A LoRA delta, oriented as the base tensor (PEFT decides the transpose by the module's type); a
    // bias delta (lora_bias) as it is.
    std::shared_ptr<const TensorSource> delta = t.source;
    const TensorInfo* delta_info = &t.info;
    peft::LoraModule module;
    if (t.module) {
      module = *t.module;
      peft::orient_to_base(module, b.info->shape, label);
    }
    if (t.module && module.fan_in_fan_out != t.module->fan_in_fan_out) {
      const auto* product = static_cast<const peft::LoraProductSource*>(t.source.get());
      auto flipped = std::make_shared<peft::LoraProductSource>(module, product->a(), product->b(), product->keep_alive());
      delta_info = &flipped->info();
      delta = flipped;
      out.sources_.push_back(flipped);
    }
    if (use == AdapterUse::kTaskVector) {
      out.tensors_.emplace(name, CheckpointTensor{delta_info, delta.get()});
    } else {
      add(name, f32_info(name, b.info->shape),
          std::make_shared<CombinedSource>(delta->path(), Terms{{1.0, {b.info, b.source}}, {1.0, {delta_info, delta.get()}}}));
    }
  }
  return out;
}

}  // namespace taskvec
