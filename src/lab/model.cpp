#include "lab/model.hpp"

#include <cmath>
#include <numeric>
#include <random>

namespace taskvec::lab {
namespace nn = torch::nn;

BackboneImpl::BackboneImpl() {
  conv1 = register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, 32, 5).stride(2).padding(2)));
  conv2 = register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 64, 3).stride(2).padding(1)));
  conv3 = register_module("conv3", nn::Conv2d(nn::Conv2dOptions(64, 128, 3).stride(2).padding(1)));
  fc = register_module("fc", nn::Linear(2048, 128));
}

torch::Tensor BackboneImpl::forward(const torch::Tensor& x) {
  auto h = x.unsqueeze(1) * 2.0f - 1.0f;
  h = torch::relu(conv1(h));
  h = torch::relu(conv2(h));
  h = torch::relu(conv3(h));
  h = fc(h.flatten(1));
  return nn::functional::normalize(h, nn::functional::NormalizeFuncOptions().dim(1).eps(1e-8));
}

torch::Tensor Head::logits(const torch::Tensor& features) const {
  return torch::addmm(bias, features, weight.t());
}

Backbone clone_backbone(Backbone& src) {
  Backbone dst;
  torch::NoGradGuard no_grad;
  auto from = src->named_parameters();
  for (auto& p : dst->named_parameters()) p.value().copy_(from[p.key()]);
  return dst;
}

namespace {

std::vector<std::int64_t> permutation(std::int64_t n, std::mt19937_64& rng) {
  std::vector<std::int64_t> perm(static_cast<std::size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  for (std::int64_t i = n - 1; i > 0; --i) {
    const auto j = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(i + 1));
    std::swap(perm[static_cast<std::size_t>(i)], perm[static_cast<std::size_t>(j)]);
  }
  return perm;
}

// Epoch-wise shuffled minibatches, deterministic from the seed.
class BatchSampler {
 public:
  BatchSampler(std::int64_t n, int batch, std::uint64_t seed) : n_(n), batch_(batch), rng_(seed) {}
  torch::Tensor next() {
    std::vector<std::int64_t> idx;
    idx.reserve(static_cast<std::size_t>(batch_));
    while (static_cast<int>(idx.size()) < batch_) {
      if (pos_ >= perm_.size()) {
        perm_ = permutation(n_, rng_);
        pos_ = 0;
      }
      idx.push_back(perm_[pos_++]);
    }
    return torch::tensor(idx, torch::kInt64);
  }

 private:
  std::int64_t n_;
  int batch_;
  std::mt19937_64 rng_;
  std::vector<std::int64_t> perm_;
  std::size_t pos_ = 0;
};

void set_lr(torch::optim::AdamW& opt, double lr) {
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
}

torch::Tensor batched_features(Backbone& backbone, const torch::Tensor& x) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> out;
  for (std::int64_t i = 0; i < x.size(0); i += 1024) out.push_back(backbone->forward(x.slice(0, i, std::min(x.size(0), i + 1024))));
  return torch::cat(out);
}

}  // namespace

Dataset few_shot(const Dataset& data, int per_class, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto perm = permutation(data.size(), rng);
  auto labels = data.y.accessor<std::int64_t, 1>();
  std::vector<int> count(10, 0);
  std::vector<std::int64_t> picked;
  for (auto i : perm) {
    const auto c = labels[i];
    if (c >= 0 && c < 10 && count[static_cast<std::size_t>(c)] < per_class) {
      ++count[static_cast<std::size_t>(c)];
      picked.push_back(i);
    }
  }
  std::sort(picked.begin(), picked.end());
  return data.select(torch::tensor(picked, torch::kInt64));
}

Head fit_linear_probe(Backbone& backbone, const Dataset& shots, int num_classes, double l2, int iterations) {
  const auto f = batched_features(backbone, shots.x);
  auto w = torch::zeros({num_classes, f.size(1)}, torch::requires_grad());
  auto b = torch::zeros({num_classes}, torch::requires_grad());
  torch::optim::Adam opt({w, b}, torch::optim::AdamOptions(0.05));
  for (int it = 0; it < iterations; ++it) {
    auto loss = torch::cross_entropy_loss(torch::addmm(b, f, w.t()), shots.y) + l2 * w.pow(2).sum();
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
  return {w.detach().clone(), b.detach().clone()};
}

double scheduled_lr(const TrainOptions& o, int step) {
  const int warm = std::max(1, static_cast<int>(std::lround(o.warmup_fraction * o.steps)));
  if (step < warm) return o.lr * (step + 1) / warm;
  const double t = static_cast<double>(step - warm) / std::max(1, o.steps - warm);
  return 0.5 * o.lr * (1.0 + std::cos(M_PI * t));
}

namespace {

void train_loop(Backbone& backbone, const std::function<torch::Tensor(const torch::Tensor&)>& logits_of,
                std::vector<torch::Tensor> params, const Dataset& data, const TrainOptions& o) {
  backbone->train();
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(o.lr).weight_decay(o.weight_decay));
  BatchSampler sampler(data.size(), o.batch, o.seed);
  double running = 0;
  for (int step = 0; step < o.steps; ++step) {
    set_lr(opt, scheduled_lr(o, step));
    const auto idx = sampler.next();
    auto loss = torch::cross_entropy_loss(logits_of(backbone->forward(data.x.index_select(0, idx))), data.y.index_select(0, idx));
    opt.zero_grad();
    loss.backward();
    opt.step();
    running = step == 0 ? loss.item<double>() : 0.95 * running + 0.05 * loss.item<double>();
    if (o.on_log && ((step + 1) % 100 == 0 || step + 1 == o.steps)) o.on_log(step + 1, running);
    if (o.checkpoint_every > 0 && (step + 1) % o.checkpoint_every == 0 && o.on_checkpoint) o.on_checkpoint(step + 1);
  }
  backbone->eval();
}

}  // namespace

Head pretrain(Backbone& backbone, const Dataset& data, const TrainOptions& o) {
  nn::Linear head(128, 10);
  auto params = backbone->parameters();
  for (auto& p : head->parameters()) params.push_back(p);
  train_loop(backbone, [&](const torch::Tensor& f) { return head->forward(f); }, params, data, o);
  return {head->weight.detach().clone(), head->bias.detach().clone()};
}

void finetune(Backbone& backbone, const Head& head, const Dataset& data, const TrainOptions& o) {
  train_loop(backbone, [&](const torch::Tensor& f) { return head.logits(f); }, backbone->parameters(), data, o);
}

double accuracy(Backbone& backbone, const Head& head, const Dataset& data) {
  if (data.size() == 0) return 0.0;
  backbone->eval();
  torch::NoGradGuard no_grad;
  std::int64_t correct = 0;
  for (std::int64_t i = 0; i < data.size(); i += 1024) {
    const auto j = std::min(data.size(), i + 1024);
    auto pred = head.logits(backbone->forward(data.x.slice(0, i, j))).argmax(1);
    correct += pred.eq(data.y.slice(0, i, j)).sum().item<std::int64_t>();
  }
  return static_cast<double>(correct) / static_cast<double>(data.size());
}

}  // namespace taskvec::lab
