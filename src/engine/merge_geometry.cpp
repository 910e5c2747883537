// Merge kernels that need a whole-tensor statistic: Model Stock (angle between task vectors), SLERP
// (angle between models), and the SVD methods TSV-Merge and Iso-C (LAPACKE dgesdd, f64).
#include <algorithm>
#include <cmath>
#include <string>

#include "engine/svd.hpp"
#include "merge_internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

using namespace merge_detail;
using detail::gemm_rm;

void merge_model_stock(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "model_stock", true, 1);
  const std::size_t t = in.models.size();
  // filter_wise: one ratio per row (the last dimension; a 1-D tensor is one row), as mergekit.
  const std::size_t row = in.global.filter_wise && in.shape.size() >= 2 && in.shape.back() > 0
                              ? static_cast<std::size_t>(in.shape.back())
                              : std::max<std::size_t>(n, 1);
  bool clamped = false;
  std::vector<double> norm2(t);
  std::vector<std::vector<double>> dot(t, std::vector<double>(t));
  for (std::size_t r0 = 0; r0 < n; r0 += row) {
    const std::size_t r1 = std::min(n, r0 + row);
    // Pairwise cosines of the task vectors with f64 accumulation.
    std::fill(norm2.begin(), norm2.end(), 0.0);
    for (auto& d : dot) std::fill(d.begin(), d.end(), 0.0);
    for (std::size_t i = r0; i < r1; ++i) {
      for (std::size_t a = 0; a < t; ++a) {
        const double da = static_cast<double>(in.models[a][i]) - in.base[i];
        norm2[a] += da * da;
        for (std::size_t b = a + 1; b < t; ++b) dot[a][b] += da * (static_cast<double>(in.models[b][i]) - in.base[i]);
      }
    }
    double ratio = 1.0;  // one model: t = 1 (the model itself; mergekit needs two)
    if (t >= 2) {
      double cos_sum = 0;
      std::size_t pairs = 0;
      for (std::size_t a = 0; a < t; ++a)
        for (std::size_t b = a + 1; b < t; ++b, ++pairs)
          if (norm2[a] > 0 && norm2[b] > 0) cos_sum += std::clamp(dot[a][b] / std::sqrt(norm2[a] * norm2[b]), -1.0, 1.0);
      // Opposed task vectors would give t < 0 or a pole at cos = -1/(N-1) (mergekit returns that: NaN or
      // huge values); the paper assumes acute angles, so the mean cosine is clamped to [0, 1].
      const double mean = cos_sum / static_cast<double>(pairs);
      clamped = clamped || mean < 0;
      const double c = std::clamp(mean, 0.0, 1.0);
      const double nn = static_cast<double>(t);
      ratio = nn * c / (1.0 + (nn - 1.0) * c);
    }
    const float tr = static_cast<float>(ratio);
    for (std::size_t i = r0; i < r1; ++i) {
      float s = 0;
      for (std::size_t m = 0; m < t; ++m) s += in.models[m][i];
      const float mean = s / static_cast<float>(t);
      out[i] = tr * mean + (1.0f - tr) * in.base[i];
    }
  }
  if (clamped && in.notes)
    in.notes->push_back("the task vectors point apart (mean cosine < 0): taskvec keeps the base (ratio 0), where "
                        "mergekit's ratio N cos / (1 + (N-1) cos) would be negative or blow up");
}

void merge_slerp(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "slerp", false, 2, 2);
  const auto a = in.models[0];
  const auto b = in.models[1];
  const double t = in.global.t;
  double na = 0, nb = 0, ab = 0;
  for (std::size_t i = 0; i < n; ++i) {
    na += static_cast<double>(a[i]) * a[i];
    nb += static_cast<double>(b[i]) * b[i];
    ab += static_cast<double>(a[i]) * b[i];
  }
  double ca = 1.0 - t, cb = t;  // linear fallback
  if (na > 0 && nb > 0) {
    const double c = std::clamp(ab / std::sqrt(na * nb), -1.0, 1.0);
    if (std::fabs(c) <= 0.9995) {
      const double omega = std::acos(c);
      const double s = std::sin(omega);
      ca = std::sin((1.0 - t) * omega) / s;
      cb = std::sin(t * omega) / s;
    }
  }
  for (std::size_t i = 0; i < n; ++i)
    out[i] = static_cast<float>(ca * a[i] + cb * b[i]);
}

namespace {

// Row-major c (m x n) = a[:, :kk] (row stride lda) * diag(scale) * b (kk x n).
std::vector<double> scaled_product(const std::vector<double>& a, int lda, const std::vector<double>& scale,
                                   const std::vector<double>& b, int m, int kk, int n) {
  std::vector<double> as(static_cast<std::size_t>(m) * kk);
  for (int i = 0; i < m; ++i)
    for (int k = 0; k < kk; ++k) as[static_cast<std::size_t>(i) * kk + k] = a[static_cast<std::size_t>(i) * lda + k] * scale[k];
  std::vector<double> c(static_cast<std::size_t>(m) * n, 0.0);
  gemm_rm(false, false, m, n, kk, as.data(), kk, b.data(), n, c.data(), n);
  return c;
}

// Row-major thin SVD (detail::svd_thin, shared with extract-lora).
void svd(std::vector<double>& a, int m, int n, std::vector<double>& u, std::vector<double>& s, std::vector<double>& vt) {
  detail::svd_thin(a, m, n, u, s, vt);
}

// The orthogonal polar factor of a (m x n, row-major): a = P S Q^T -> P Q^T (m x n). Directions with a
// numerically zero singular value are left out (the partial isometry on a's range): for a rank-deficient
// a the full factor is not unique and LAPACK's arbitrary null-space basis would leak into the result.
std::vector<double> polar(std::vector<double> a, int m, int n) {
  std::vector<double> u, s, vt;
  svd(a, m, n, u, s, vt);
  const int r = std::min(m, n);
  const double tol = (s.empty() ? 0.0 : s[0]) * std::max(m, n) * 1e-12;
  int rank = 0;
  while (rank < r && s[rank] > tol) ++rank;  // singular values are sorted descending
  return scaled_product(u, r, std::vector<double>(rank, 1.0), vt, m, rank, n);
}

bool is_matrix(const MergeTensor& in) { return in.shape.size() == 2 && in.shape[0] > 0 && in.shape[1] > 0; }

void check_svd_size(const MergeTensor& in, const char* method) {
  if (in.shape[0] > 0x7FFFFFFF || in.shape[1] > 0x7FFFFFFF)
    throw Error(ErrorCode::kUnsupported, std::string(method) + ": tensor '" + std::string(in.name) + "' is too large for LAPACK");
}

// Non-matrix tensors in TSV / Iso-C: base + lambda * mean of the weighted task vectors (as the papers).
void mean_of_task_vectors(const MergeTensor& in, std::span<float> out) {
  const std::size_t t = in.models.size();
  for (std::size_t i = 0; i < out.size(); ++i) {
    float s = 0;
    for (std::size_t m = 0; m < t; ++m) s += in.model_params[m].weight * (in.models[m][i] - in.base[i]);
    out[i] = in.base[i] + in.global.lambda * (s / static_cast<float>(t));
  }
}

}  // namespace

void merge_tsv(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "tsv_merge", true, 1);
  if (!is_matrix(in)) return mean_of_task_vectors(in, out);
  check_svd_size(in, "tsv_merge");
  const int m = static_cast<int>(in.shape[0]), n = static_cast<int>(in.shape[1]);
  const int t = static_cast<int>(in.models.size());
  const int rmax = std::min(m, n);
  const int r = std::max(1, rmax / t);
  const int total = r * t;
  std::vector<double> ucat(static_cast<std::size_t>(m) * total), vtcat(static_cast<std::size_t>(total) * n), sigma(total);
  std::vector<double> a(static_cast<std::size_t>(m) * n), u, s, vt;
  for (int k = 0; k < t; ++k) {
    const double w = in.model_params[k].weight;
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = w * (static_cast<double>(in.models[k][i]) - in.base[i]);
    svd(a, m, n, u, s, vt);
    for (int c = 0; c < r; ++c) {
      const int col = k * r + c;
      sigma[col] = s[c];  // r <= min(m, n), so every column exists
      for (int i = 0; i < m; ++i) ucat[static_cast<std::size_t>(i) * total + col] = u[static_cast<std::size_t>(i) * rmax + c];
      for (int j = 0; j < n; ++j) vtcat[static_cast<std::size_t>(col) * n + j] = vt[static_cast<std::size_t>(c) * n + j];
    }
  }
  const auto uo = polar(std::move(ucat), m, total);
  const auto vo = polar(std::move(vtcat), total, n);
  const auto delta = scaled_product(uo, total, sigma, vo, m, total, n);
  const double lambda = in.global.lambda;
  for (std::size_t i = 0; i < delta.size(); ++i) out[i] = static_cast<float>(in.base[i] + lambda * delta[i]);
}

void merge_iso_c(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "iso_c", true, 1);
  if (!is_matrix(in)) return mean_of_task_vectors(in, out);
  check_svd_size(in, "iso_c");
  const int m = static_cast<int>(in.shape[0]), n = static_cast<int>(in.shape[1]);
  std::vector<double> a(static_cast<std::size_t>(m) * n, 0.0), u, s, vt;
  for (std::size_t k = 0; k < in.models.size(); ++k) {
    const double w = in.model_params[k].weight;
    for (std::size_t i = 0; i < a.size(); ++i) a[i] += w * (static_cast<double>(in.models[k][i]) - in.base[i]);
  }
  svd(a, m, n, u, s, vt);
  const int r = std::min(m, n);
  double mean = 0;
  for (double v : s) mean += v;
  mean /= r;
  const auto delta = scaled_product(u, r, std::vector<double>(r, mean), vt, m, r, n);
  const double lambda = in.global.lambda;
  for (std::size_t i = 0; i < delta.size(); ++i) out[i] = static_cast<float>(in.base[i] + lambda * delta[i]);
}

}  // namespace taskvec
