#include "lab/store.hpp"

#include <cstring>
#include <vector>

#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec::lab {
namespace {

std::vector<std::int64_t> to_sizes(const std::vector<std::uint64_t>& shape) {
  return {shape.begin(), shape.end()};
}

torch::Tensor decode(const CheckpointTensor& t) {
  const auto n = static_cast<std::size_t>(t.info->num_elements());
  auto out = torch::empty(to_sizes(t.info->shape), torch::kFloat32);
  std::vector<std::byte> bytes(t.info->num_bytes());
  t.read(0, bytes);
  decode_to_f32(t.info->dtype, bytes.data(), out.data_ptr<float>(), n);
  return out;
}

}  // namespace

void write_tensors(const std::filesystem::path& path, const std::map<std::string, torch::Tensor>& tensors,
                   const std::map<std::string, std::string>& metadata) {
  std::vector<std::pair<TensorSpec, std::vector<std::byte>>> items;
  for (const auto& [name, value] : tensors) {
    auto t = value.detach().to(torch::kFloat32).contiguous();
    TensorSpec spec{name, DType::kF32, {}};
    for (auto d : t.sizes()) spec.shape.push_back(static_cast<std::uint64_t>(d));
    std::vector<std::byte> bytes(static_cast<std::size_t>(t.numel()) * sizeof(float));
    std::memcpy(bytes.data(), t.data_ptr<float>(), bytes.size());  // little-endian host, as safetensors
    items.emplace_back(std::move(spec), std::move(bytes));
  }
  write_safetensors(path, items, metadata);
}

void save_backbone(Backbone& backbone, const std::filesystem::path& path,
                   const std::map<std::string, std::string>& metadata) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& p : backbone->named_parameters()) tensors.emplace(p.key(), p.value());
  write_tensors(path, tensors, metadata);
}

std::map<std::string, torch::Tensor> read_tensors(const std::filesystem::path& path) {
  const auto ckpt = Checkpoint::open(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& name : ckpt.tensor_names()) out.emplace(name, decode(ckpt.at(name)));
  return out;
}

void load_backbone(Backbone& backbone, const std::filesystem::path& path) {
  const auto ckpt = Checkpoint::open(path);
  torch::NoGradGuard no_grad;
  for (auto& p : backbone->named_parameters()) {
    const auto& t = ckpt.at(p.key());
    if (to_sizes(t.info->shape) != p.value().sizes().vec())
      throw Error(ErrorCode::kShapeMismatch, path.string() + ": tensor '" + p.key() + "' has another shape than the model's");
    p.value().copy_(decode(t));
  }
}

Editor::Editor() {
  options_.threads = 1;
  options_.write.force = true;
}

void Editor::task_vector(const std::filesystem::path& pretrained, const std::filesystem::path& finetuned,
                         const std::filesystem::path& out) const {
  const auto pre = Checkpoint::open(pretrained);
  const auto ft = Checkpoint::open(finetuned);
  make_task_vector(pre, ft, out, options_);
}

void Editor::apply(const std::filesystem::path& pretrained,
                   const std::vector<std::pair<std::filesystem::path, double>>& task_vectors,
                   const std::filesystem::path& out) const {
  const auto pre = Checkpoint::open(pretrained);
  std::vector<Checkpoint> taus;
  taus.reserve(task_vectors.size());
  for (const auto& tv : task_vectors) taus.push_back(Checkpoint::open(tv.first));
  std::vector<std::pair<const Checkpoint*, double>> terms;
  for (std::size_t i = 0; i < taus.size(); ++i) terms.emplace_back(&taus[i], task_vectors[i].second);
  apply_task_vectors(pre, terms, out, options_);
}

SimilarityReport Editor::similarity(const std::vector<std::pair<std::string, std::filesystem::path>>& task_vectors) const {
  std::vector<Checkpoint> taus;
  taus.reserve(task_vectors.size());
  for (const auto& tv : task_vectors) taus.push_back(Checkpoint::open(tv.second));
  std::vector<std::pair<std::string, const Checkpoint*>> models;
  for (std::size_t i = 0; i < taus.size(); ++i) models.emplace_back(task_vectors[i].first, &taus[i]);
  return task_vector_similarity(nullptr, models, options_);
}

void Editor::random_like(const std::filesystem::path& pretrained, const std::filesystem::path& tau, std::uint64_t seed,
                         const std::filesystem::path& out) const {
  const auto pre = Checkpoint::open(pretrained);
  const auto tau_tensors = read_tensors(tau);
  auto gen = at::detail::createCPUGenerator(seed);
  std::map<std::string, torch::Tensor> random;
  for (const auto& [name, t] : tau_tensors) {
    auto r = at::normal(0.0, 1.0, t.sizes(), gen);
    const double norm = t.norm().item<double>(), rnorm = r.norm().item<double>();
    random.emplace(name, rnorm > 0 ? r * (norm / rnorm) : r);
  }
  write_tensors(out, random,
                {{kMetaKind, "task_vector"}, {kMetaPretrainedFingerprint, pre.fingerprint()},
                 {kMetaPretrainedName, pretrained.filename().string()}, {kMetaFinetunedName, "random"}});
}

}  // namespace taskvec::lab
