// taskvec-lab: the bridge between libtorch modules and taskvec checkpoints. Backbones are saved as
// safetensors through taskvec's writer and read back through taskvec::Checkpoint; every task vector
// and every edit goes through taskvec's engine (engine.hpp): the same code path as the CLI.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "lab/model.hpp"
#include "taskvec/engine.hpp"

namespace taskvec::lab {

/// Writes every named parameter of `backbone` (F32, names as torch gives them: conv1.weight, ...) to
/// `path` with taskvec::write_safetensors. Throws taskvec::Error.
void save_backbone(Backbone& backbone, const std::filesystem::path& path,
                   const std::map<std::string, std::string>& metadata = {});

/// Reads `path` (any editable dtype, decoded to f32) into `backbone`'s parameters. Every parameter
/// must be present with its shape (Error{kTensorMissing | kShapeMismatch}).
void load_backbone(Backbone& backbone, const std::filesystem::path& path);

/// Every tensor of a checkpoint decoded to f32 torch tensors.
std::map<std::string, torch::Tensor> read_tensors(const std::filesystem::path& path);

/// Writes f32 torch tensors as a safetensors file through taskvec's writer.
void write_tensors(const std::filesystem::path& path, const std::map<std::string, torch::Tensor>& tensors,
                   const std::map<std::string, std::string>& metadata = {});

/// The lab's edits, all through taskvec's engine with 1 worker thread (libtorch has the 2 cores) and
/// outputs replaced in place (force).
class Editor {
 public:
  Editor();
  /// tau = finetuned - pretrained (taskvec::make_task_vector).
  void task_vector(const std::filesystem::path& pretrained, const std::filesystem::path& finetuned,
                   const std::filesystem::path& out) const;
  /// theta = pretrained + sum lambda_j tau_j (taskvec::apply_task_vectors).
  void apply(const std::filesystem::path& pretrained,
             const std::vector<std::pair<std::filesystem::path, double>>& task_vectors,
             const std::filesystem::path& out) const;
  /// Cosine similarity of task-vector files (taskvec::task_vector_similarity).
  SimilarityReport similarity(const std::vector<std::pair<std::string, std::filesystem::path>>& task_vectors) const;
  /// A random vector with the same per-tensor L2 norms as the task vector `tau`, saved as a task vector of
  /// `pretrained` (the paper's Table 1 baseline). Gaussian directions from a torch generator seeded by `seed`.
  void random_like(const std::filesystem::path& pretrained, const std::filesystem::path& tau, std::uint64_t seed,
                   const std::filesystem::path& out) const;

 private:
  EditOptions options_;
};

}  // namespace taskvec::lab
