// taskvec-lab: the backbone (a small CLIP-like image encoder), frozen linear heads, training and
// evaluation (docs/REPRODUCTION.md describes the recipe).
//
// Backbone, 355,456 parameters, no batch norm (it would complicate weight arithmetic):
//   x [N,28,28] in [0,1] -> 2x-1 -> conv 5x5/2 (1->32) ReLU -> conv 3x3/2 (32->64) ReLU
//   -> conv 3x3/2 (64->128) ReLU -> flatten 2048 -> linear 128 -> L2-normalise -> feature [N,128]
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <torch/torch.h>

#include "lab/data.hpp"

namespace taskvec::lab {

struct BackboneImpl : torch::nn::Module {
  BackboneImpl();
  /// x [N, 28, 28] float32 in [0, 1] -> unit-norm features [N, 128].
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(Backbone);

/// A frozen linear classifier on features: logits [N, C] = f W^T + b. Tensors never require grad.
struct Head {
  torch::Tensor weight;  ///< [C, 128]
  torch::Tensor bias;    ///< [C]
  torch::Tensor logits(const torch::Tensor& features) const;
};

/// Deep copy of a backbone's parameters into a fresh Backbone.
Backbone clone_backbone(Backbone& src);

/// Up to `per_class` examples of each label 0..9, picked by a permutation from std::mt19937_64(seed).
Dataset few_shot(const Dataset& data, int per_class, std::uint64_t seed);

/// Multinomial logistic regression on the backbone's (frozen) features of `shots`: the zero-shot head
/// stand-in. Full-batch Adam (lr 0.05) from zero, mean cross-entropy + l2 * sum(W^2).
Head fit_linear_probe(Backbone& backbone, const Dataset& shots, int num_classes = 10, double l2 = 0, int iterations = 300);

/// AdamW with a linear warm-up over warmup_fraction of the steps, then cosine decay to 0.
struct TrainOptions {
  int steps = 300;
  double lr = 3e-4;
  double weight_decay = 0.1;
  int batch = 128;
  double warmup_fraction = 0.1;
  std::uint64_t seed = 0;
  int checkpoint_every = 0;                        ///< 0 = never call on_checkpoint
  std::function<void(int step)> on_checkpoint;     ///< called after steps k, 2k, ... (not after `steps` unless divisible)
  std::function<void(int step, double loss)> on_log;  ///< called every 100 steps and at the end
};
double scheduled_lr(const TrainOptions& options, int step);

/// Supervised pretraining of backbone + a new linear head (10 classes); returns the head, frozen
/// (the control head).
Head pretrain(Backbone& backbone, const Dataset& data, const TrainOptions& options);

/// Fine-tunes the backbone only, against the frozen `head`.
void finetune(Backbone& backbone, const Head& head, const Dataset& data, const TrainOptions& options);

/// Top-1 accuracy in [0, 1] of backbone + head on `data` (batches of 1024, no grad).
double accuracy(Backbone& backbone, const Head& head, const Dataset& data);

}  // namespace taskvec::lab
