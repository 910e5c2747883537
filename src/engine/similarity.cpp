// Norms, cosine similarities and sign conflicts of task vectors, with fixed-order reductions: every
// 64 Ki-element chunk produces f64 partial sums, combined in chunk order, so the result is the same for
// any thread count.
#include <algorithm>
#include <deque>
#include <cmath>

#include <fmt/format.h>

#include "engine/internal.hpp"
#include "engine/parallel.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

constexpr std::uint64_t kChunk = 1u << 16;

struct Chunk {
  std::string name;  // tensor
  std::uint64_t begin, count;
};

}  // namespace

SimilarityReport task_vector_similarity(const Checkpoint* pretrained,
                                        const std::vector<std::pair<std::string, const Checkpoint*>>& given,
                                        const EditOptions& options) {
  // A PEFT adapter is compared as the model it defines over the pretrained checkpoint (base + dW), so
  // its task vector is dW: it needs the pretrained checkpoint.
  if (pretrained) detail::require_model(*pretrained, "the --base of similarity");
  std::deque<Checkpoint> adapters;
  std::vector<std::pair<std::string, const Checkpoint*>> models;
  for (const auto& [label, model] : given) {
    if (!model->is_adapter()) {
      models.emplace_back(label, model);
      continue;
    }
    if (pretrained == nullptr) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("{} is a PEFT adapter: compare it with --base PRETRAINED (its task vector is its "
                              "delta over that model)", model->path().string()));
    }
    adapters.push_back(model->adapter_over(*pretrained, AdapterUse::kModel));
    models.emplace_back(label, &adapters.back());
  }
  const std::size_t n = models.size();
  if (n == 0) throw Error(ErrorCode::kInvalidArgument, "similarity needs at least one model or task vector");
  const Checkpoint& first = pretrained ? *pretrained : *models.front().second;
  const detail::TensorFilter filter(options.include, options.exclude);

  // The checks of linear edits and merges (input_check.cpp), before any data is read.
  SimilarityReport report;
  if (pretrained) detail::check_not_quantized(*pretrained);
  for (const auto& [label, model] : models) detail::check_not_quantized(*model);
  if (pretrained) {
    for (const auto& [label, model] : models) {
      if (auto w = detail::task_vector_as_model_warning(*model, "a fine-tuned model (with a pretrained checkpoint, "
                                                                "its task vector is it minus the pretrained one)"))
        report.warnings.push_back(*w);
    }
  } else {
    std::vector<std::string> unlabeled;
    for (const auto& [label, model] : models) {
      if (detail::checkpoint_kind(*model) != "task_vector") unlabeled.push_back(model->path().string());
    }
    if (unlabeled.size() == n) {
      report.compared = "weights";
      report.warnings.push_back(
          "no input is labeled a task vector (taskvec.kind=task_vector): comparing the checkpoints' weights, not task "
          "vectors; pass --base PRE to compare the task vectors MODEL - PRE");
    } else {
      for (const auto& path : unlabeled)
        report.warnings.push_back(fmt::format("{} has no taskvec.kind=task_vector metadata: compared as a task vector; "
                                              "if it is a model, pass --base PRE",
                                              path));
    }
  }
  for (const auto& [label, model] : models) {
    std::size_t left_out = 0;  // named one by one up to 8 per input, then counted
    for (const auto& name : model->tensor_names()) {
      if (first.find(name) != nullptr) continue;
      if (++left_out <= 8)
        report.warnings.push_back(fmt::format("tensor '{}' of {} is not in {}: not compared", name,
                                              model->path().string(), first.path().string()));
    }
    if (left_out > 8)
      report.warnings.push_back(fmt::format("{} more tensors of {} are not in {}: not compared", left_out - 8,
                                            model->path().string(), first.path().string()));
  }
  std::vector<Chunk> chunks;
  for (const auto& name : first.tensor_names()) {
    const CheckpointTensor& ref = first.at(name);
    for (const auto& [label, model] : models) {
      detail::check_input_tensor(name, first, ref, *model, model->find(name), /*extra_rows_flag=*/false,
                                 /*merge_extra_rows=*/false);
    }
    if (!dtype_is_editable(ref.info->dtype)) continue;
    if (!filter.selects(name)) continue;
    bool all_float = true;
    for (const auto& [label, model] : models) all_float = all_float && dtype_is_editable(model->at(name).info->dtype);
    if (!all_float) continue;
    std::uint64_t elements = ref.info->num_elements();
    for (std::uint64_t b = 0; b < elements; b += kChunk) chunks.push_back({name, b, std::min(kChunk, elements - b)});
  }

  // Partials per chunk: n*n dot products, n*n sign conflicts, n*n both-non-zero counts.
  const std::size_t stride = 3 * n * n;
  std::vector<double> partial(chunks.size() * stride, 0.0);
  unsigned threads = detail::resolve_threads(options.threads);
  std::vector<std::vector<float>> scratch(threads);
  std::vector<std::vector<std::byte>> staging(threads);
  detail::parallel_for(chunks.size(), threads, [&](std::size_t c, unsigned worker) {
    const Chunk& chunk = chunks[c];
    std::vector<float>& buf = scratch[worker];
    buf.resize((n + 1) * chunk.count);
    float* base = buf.data() + n * chunk.count;
    if (pretrained) {
      const CheckpointTensor& b = pretrained->at(chunk.name);
      detail::read_decoded(b, chunk.begin, chunk.count, base, staging[worker]);
    }
    for (std::size_t i = 0; i < n; ++i) {
      const CheckpointTensor& t = models[i].second->at(chunk.name);
      float* tau = buf.data() + i * chunk.count;
      detail::read_decoded(t, chunk.begin, chunk.count, tau, staging[worker]);
      if (pretrained) {
        for (std::uint64_t k = 0; k < chunk.count; ++k) tau[k] -= base[k];
      }
    }
    double* out = partial.data() + c * stride;
    for (std::size_t i = 0; i < n; ++i) {
      const float* a = buf.data() + i * chunk.count;
      for (std::size_t j = i; j < n; ++j) {
        const float* b = buf.data() + j * chunk.count;
        double dot = 0, conflicts = 0, both = 0;
        for (std::uint64_t k = 0; k < chunk.count; ++k) {
          dot += double(a[k]) * double(b[k]);
          bool nz = a[k] != 0 && b[k] != 0;
          both += nz;
          conflicts += nz && ((a[k] < 0) != (b[k] < 0));
        }
        out[i * n + j] = dot;
        out[n * n + i * n + j] = conflicts;
        out[2 * n * n + i * n + j] = both;
      }
    }
  });

  std::vector<double> total(stride, 0.0);
  for (std::size_t c = 0; c < chunks.size(); ++c) {
    for (std::size_t k = 0; k < stride; ++k) total[k] += partial[c * stride + k];
  }
  report.cosine.assign(n, std::vector<double>(n, 0.0));
  report.sign_conflict.assign(n, std::vector<double>(n, 0.0));
  for (std::size_t i = 0; i < n; ++i) {
    report.names.push_back(models[i].first);
    report.norms.push_back(std::sqrt(total[i * n + i]));
  }
  for (std::size_t i = 0; i < n; ++i) {
    for (std::size_t j = i; j < n; ++j) {
      double denom = report.norms[i] * report.norms[j];
      // Clamped: the rounding of the dot product and the norms can put |cos| a few ulps above 1.
      double cosine = denom > 0 ? std::clamp(total[i * n + j] / denom, -1.0, 1.0) : 0.0;
      double both = total[2 * n * n + i * n + j];
      double conflict = both > 0 ? total[n * n + i * n + j] / both : 0.0;
      report.cosine[i][j] = report.cosine[j][i] = cosine;
      report.sign_conflict[i][j] = report.sign_conflict[j][i] = conflict;
    }
  }
  return report;
}

}  // namespace taskvec
