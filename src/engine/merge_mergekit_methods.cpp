// mergekit's newer merge methods, with mergekit's semantics and defaults (mergekit/merge_methods/*.py):
// nuslerp, multislerp, karcher, nearswap, sce, arcee_fusion, ram, ramplus_tl. Norms, dots and sums are
// accumulated in f64; the element-wise arithmetic follows mergekit's order. Where mergekit divides by
// zero, returns NaN or fails on inputs a checkpoint can contain, taskvec does the sensible thing and
// records a note saying what mergekit would do. docs/METHODS.md documents each one.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "merge_internal.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

using namespace merge_detail;

namespace {

void note(const MergeTensor& in, std::string text) {
  if (in.notes) in.notes->push_back(std::move(text));
}

// The vector a geometric method works on: the task vector when a base is given, else the model.
double vec(const MergeTensor& in, std::size_t m, std::size_t i) {
  return in.base.empty() ? static_cast<double>(in.models[m][i]) : static_cast<double>(in.models[m][i]) - in.base[i];
}

double base_at(const MergeTensor& in, std::size_t i) { return in.base.empty() ? 0.0 : static_cast<double>(in.base[i]); }

void copy_model(const MergeTensor& in, std::size_t m, std::span<float> out) {
  std::copy(in.models[m].begin(), in.models[m].end(), out.begin());
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// nuslerp (mergekit/merge_methods/nuslerp.py)
// ---------------------------------------------------------------------------------------------

void merge_nuslerp(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "nuslerp", false, 2, 2);
  if (n == 0) return;
  const double w0 = in.model_params[0].weight, w1 = in.model_params[1].weight;
  // mergekit: "fairly arbitrary, but more sane than exploding".
  const double t = std::fabs(w0 + w1) < 1e-6 ? 0.5 : w1 / (w0 + w1);
  // Vector v holds the elements i with vector_of(i) == v: the whole tensor (flatten, or 1-D / scalar
  // tensors), the rows of the last dimension, or (row_wise) the vectors along dimension 0.
  std::size_t count = 1, len = n;
  const bool per_vector = !in.global.nuslerp_flatten && in.shape.size() >= 2;
  const bool along0 = per_vector && in.global.nuslerp_row_wise;
  if (per_vector) {
    len = static_cast<std::size_t>(along0 ? in.shape.front() : in.shape.back());
    count = len == 0 ? 0 : n / len;
  }
  const auto vector_of = [&](std::size_t i) { return !per_vector ? 0 : along0 ? i % count : i / len; };
  std::vector<double> na(count, 0.0), nb(count, 0.0), ab(count, 0.0);
  for (std::size_t i = 0; i < n; ++i) {
    const double a = vec(in, 0, i), b = vec(in, 1, i);
    const std::size_t v = vector_of(i);
    na[v] += a * a;
    nb[v] += b * b;
    ab[v] += a * b;
  }
  std::vector<double> ca(count, 1.0 - t), cb(count, t);  // linear interpolation by default
  bool zero_vector = false;
  for (std::size_t v = 0; v < count; ++v) {
    if (na[v] == 0 || nb[v] == 0) {
      // mergekit normalises a zero vector to zero, so cos = 0 and theta = pi/2: it would return
      // sin((1-t) pi/2) v0 + sin(t pi/2) v1, a scale that depends on an undefined angle.
      zero_vector = zero_vector || na[v] != nb[v];
      continue;
    }
    const double cos_theta = ab[v] / (std::max(std::sqrt(na[v]), 1e-7) * std::max(std::sqrt(nb[v]), 1e-7));
    const double theta = std::acos(std::clamp(cos_theta, -1.0, 1.0));
    const double s = std::sin(theta);
    if (std::fabs(s) < 1e-8) continue;  // (nearly) colinear: linear, as mergekit
    ca[v] = std::sin((1.0 - t) * theta) / s;
    cb[v] = std::sin(t * theta) / s;
  }
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t v = vector_of(i);
    out[i] = static_cast<float>(base_at(in, i) + ca[v] * vec(in, 0, i) + cb[v] * vec(in, 1, i));
  }
  if (zero_vector)
    note(in, "nuslerp: one of the two (task) vectors is zero: taskvec interpolates linearly; mergekit would treat it as "
             "orthogonal and scale the other by sin(t pi/2)");
}

// ---------------------------------------------------------------------------------------------
// multislerp (mergekit/merge_methods/multislerp.py)
// ---------------------------------------------------------------------------------------------

void merge_multislerp(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "multislerp", false, 1);
  const std::size_t mc = in.models.size();
  if (mc == 1) return copy_model(in, 0, out);  // mergekit: no interpolation needed
  std::vector<double> w(mc);
  double wsum = 0;
  for (std::size_t m = 0; m < mc; ++m) wsum += (w[m] = in.model_params[m].weight);
  if (in.global.normalize_weights) {
    if (wsum == 0)
      throw Error(ErrorCode::kInvalidArgument, "multislerp: tensor '" + std::string(in.name) +
                                                   "': normalize_weights with weights summing to 0 (mergekit would divide by "
                                                   "zero and write NaN)");
    for (auto& x : w) x /= wsum;
  }
  const double eps = in.global.eps;
  std::vector<double> norm(mc, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t m = 0; m < mc; ++m) norm[m] += vec(in, m, i) * vec(in, m, i);
  std::vector<double> inv(mc);  // u_m = X_m * inv[m]
  for (std::size_t m = 0; m < mc; ++m) {
    norm[m] = std::sqrt(norm[m]);
    inv[m] = 1.0 / (norm[m] + eps);
  }
  // mean = sum_m w_m u_m (not yet normalised), element i.
  const auto mean_at = [&](std::size_t i) {
    double s = 0;
    for (std::size_t m = 0; m < mc; ++m) s += w[m] * vec(in, m, i) * inv[m];
    return s;
  };
  double mean_norm2 = 0;
  std::vector<double> dot(mc, 0.0);  // u_m . mean (unnormalised)
  for (std::size_t i = 0; i < n; ++i) {
    const double s = mean_at(i);
    mean_norm2 += s * s;
    for (std::size_t m = 0; m < mc; ++m) dot[m] += vec(in, m, i) * inv[m] * s;
  }
  const double mean_norm = std::sqrt(mean_norm2);
  if (mean_norm < eps) {
    // The weighted unit vectors cancel (antipodal models, or zero task vectors): mergekit falls back to
    // linear interpolation for two models and raises an error for more; taskvec interpolates linearly.
    if (mc > 2)
      note(in, "multislerp: the weighted mean of the unit vectors is zero (e.g. unchanged or antipodal task vectors): "
               "taskvec uses the weighted sum; mergekit raises an error for more than two models");
    for (std::size_t i = 0; i < n; ++i) {
      double s = 0;
      for (std::size_t m = 0; m < mc; ++m) s += w[m] * vec(in, m, i);
      out[i] = static_cast<float>(base_at(in, i) + s);
    }
    return;
  }
  for (auto& d : dot) d /= mean_norm;  // u_m . mean_hat
  // Tangent vectors u_m - (u_m . mean_hat) mean_hat, combined with the weights.
  const auto tangent_at = [&](std::size_t i) {
    const double mh = mean_at(i) / mean_norm;
    double s = 0;
    for (std::size_t m = 0; m < mc; ++m) s += w[m] * (vec(in, m, i) * inv[m] - dot[m] * mh);
    return s;
  };
  double tn2 = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double x = tangent_at(i);
    tn2 += x * x;
  }
  const double tn = std::sqrt(tn2) + eps;
  const double c = std::cos(tn), sn = std::sin(tn) / tn;
  double avg_norm = 0;
  for (std::size_t m = 0; m < mc; ++m) avg_norm += norm[m] * w[m];
  for (std::size_t i = 0; i < n; ++i) {
    const double r = (mean_at(i) / mean_norm) * c + tangent_at(i) * sn;
    out[i] = static_cast<float>(base_at(in, i) + r * avg_norm);
  }
}

// ---------------------------------------------------------------------------------------------
// karcher (mergekit/merge_methods/karcher.py)
// ---------------------------------------------------------------------------------------------

void merge_karcher(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "karcher", false, 1);
  const std::size_t mc = in.models.size();
  if (mc == 1) return copy_model(in, 0, out);
  const double tol = in.global.tol;
  const auto x = [&](std::size_t m, std::size_t i) { return static_cast<double>(in.models[m][i]); };
  std::vector<double> norm(mc, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t m = 0; m < mc; ++m) norm[m] += x(m, i) * x(m, i);
  std::vector<std::size_t> valid;
  bool any_nonzero = false;
  for (std::size_t m = 0; m < mc; ++m) {
    norm[m] = std::sqrt(norm[m]);
    any_nonzero = any_nonzero || norm[m] > 0;
    if (norm[m] > tol) valid.push_back(m);
  }
  if (valid.empty()) {
    // Every norm is <= tol: mergekit returns zeros; taskvec the arithmetic mean (zeros for zero tensors).
    if (any_nonzero)
      note(in, "karcher: every model's norm is <= tol: taskvec takes the arithmetic mean; mergekit would write zeros");
    for (std::size_t i = 0; i < n; ++i) {
      double s = 0;
      for (std::size_t m = 0; m < mc; ++m) s += x(m, i);
      out[i] = static_cast<float>(s / static_cast<double>(mc));
    }
    return;
  }
  const double a = 1.0 / static_cast<double>(valid.size());  // equal weights over the valid models
  const auto unit = [&](std::size_t m, std::size_t i) { return x(m, i) / norm[m]; };
  std::vector<double> u(n, 0.0), tv(n);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t m : valid) u[i] += a * unit(m, i);
  const auto norm_of = [](const std::vector<double>& v) {
    double s = 0;
    for (double e : v) s += e * e;
    return std::sqrt(s);
  };
  const double nu = norm_of(u);
  if (nu < tol) {
    for (std::size_t i = 0; i < n; ++i) u[i] = unit(valid[0], i);
  } else {
    for (auto& e : u) e /= nu;
  }
  bool antipodal = false;
  std::vector<double> coef(mc), dot(mc);
  for (int it = 0; it < in.global.max_iter; ++it) {
    for (std::size_t m : valid) {
      double d = 0;
      for (std::size_t i = 0; i < n; ++i) d += u[i] * unit(m, i);
      d = std::clamp(d, -1.0, 1.0);
      const double theta = std::acos(d);
      const double s = std::sin(theta);
      dot[m] = d;
      coef[m] = 0;
      if (theta < tol) continue;
      if (s == 0) {  // exactly opposite: the log map is undefined (mergekit: 0 * inf = NaN)
        antipodal = true;
        continue;
      }
      coef[m] = a * theta / s;
    }
    std::fill(tv.begin(), tv.end(), 0.0);
    for (std::size_t m : valid) {
      if (coef[m] == 0) continue;
      for (std::size_t i = 0; i < n; ++i) tv[i] += coef[m] * (unit(m, i) - dot[m] * u[i]);
    }
    const double nt = norm_of(tv);
    if (nt < tol) break;
    const double c = std::cos(nt), s = std::sin(nt);
    for (std::size_t i = 0; i < n; ++i) u[i] = c * u[i] + s * (tv[i] / nt);
    const double nu2 = norm_of(u);
    if (nu2 > tol)
      for (auto& e : u) e /= nu2;
  }
  if (antipodal)
    note(in, "karcher: a model points exactly opposite the running mean: taskvec leaves it out of that step; mergekit "
             "would divide by sin(pi) = 0");
  double scale = 0;  // weighted sum of every model's norm (zero vectors included), as mergekit
  for (std::size_t m = 0; m < mc; ++m) scale += norm[m] / static_cast<double>(mc);
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<float>(scale * u[i]);
}

// ---------------------------------------------------------------------------------------------
// nearswap (mergekit/merge_methods/nearswap.py)
// ---------------------------------------------------------------------------------------------

void merge_nearswap(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "nearswap", true, 1, 1);
  const float t = in.global.t;
  const auto b = in.models[0];
  for (std::size_t i = 0; i < n; ++i) {
    const float a = in.base[i];
    const float w = std::clamp(t / std::max(std::fabs(a - b[i]), 1e-6f), 0.0f, 1.0f);
    out[i] = w * b[i] + (1.0f - w) * a;
  }
}

// ---------------------------------------------------------------------------------------------
// sce (mergekit/merge_methods/sce.py)
// ---------------------------------------------------------------------------------------------

void merge_sce(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "sce", true, 1);
  const std::size_t mc = in.models.size();
  const float topk = in.global.select_topk;
  // Select: keep the floor(select_topk * nonzero) positions of largest variance across the task vectors
  // (population variance; ties by lower index).
  std::vector<std::uint8_t> keep;
  if (topk < 1) {
    keep.assign(n, 0);
    if (topk > 0) {
      std::vector<float> var(n);
      std::uint64_t nonzero = 0;
      for (std::size_t i = 0; i < n; ++i) {
        double s = 0, s2 = 0;
        for (std::size_t m = 0; m < mc; ++m) s += static_cast<double>(in.models[m][i] - in.base[i]);
        const double mean = s / static_cast<double>(mc);
        for (std::size_t m = 0; m < mc; ++m) {
          const double d = static_cast<double>(in.models[m][i] - in.base[i]) - mean;
          s2 += d * d;
        }
        var[i] = static_cast<float>(s2 / static_cast<double>(mc));
        nonzero += var[i] != 0;
      }
      const std::uint64_t k = merge_keep_count(topk, nonzero);
      if (k > 0) {
        const std::vector<float> zeros(n, 0.0f);
        const RankBand band = rank_band(var, zeros, 0, k);
        for (std::size_t i = 0; i < n; ++i) keep[i] = band.contains(var[i], i);
      }
    }
  }
  const auto tau = [&](std::size_t m, std::size_t i) {
    return keep.empty() || keep[i] ? in.models[m][i] - in.base[i] : 0.0f;
  };
  // Calculate: one weight per task vector, its mean square, normalised (equal when they sum below 1e-6).
  std::vector<double> w(mc, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t m = 0; m < mc; ++m) {
      const double d = tau(m, i);
      w[m] += d * d;
    }
  double wsum = 0;
  for (auto& x : w) wsum += (x /= std::max<double>(1.0, static_cast<double>(n)));
  for (auto& x : w) x = std::fabs(wsum) < 1e-6 ? 1.0 / static_cast<double>(mc) : x / wsum;
  // Erase: TIES sign election on the sum (0 elects +), agreeing entries averaged with their weights.
  for (std::size_t i = 0; i < n; ++i) {
    double s = 0;
    for (std::size_t m = 0; m < mc; ++m) s += tau(m, i);
    const bool positive = s >= 0;
    double num = 0, den = 0;
    for (std::size_t m = 0; m < mc; ++m) {
      const float d = tau(m, i);
      if (positive ? d > 0 : d < 0) {
        num += w[m] * d;
        den += w[m];
      }
    }
    out[i] = static_cast<float>(in.base[i] + num / std::max(den, 1e-6));
  }
}

// ---------------------------------------------------------------------------------------------
// arcee_fusion (mergekit/merge_methods/arcee_fusion.py)
// ---------------------------------------------------------------------------------------------

void merge_arcee_fusion(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "arcee_fusion", true, 1, 1);
  if (n == 0) return;
  const auto model = in.models[0];
  const std::size_t row = in.shape.empty() || in.shape.back() == 0 ? n : static_cast<std::size_t>(in.shape.back());
  // Importance: |model - base| times the KL divergence of the softmaxes (+1e-8) of the row.
  std::vector<float> importance(n);
  std::vector<double> p(row), q(row);
  for (std::size_t r0 = 0; r0 < n; r0 += row) {
    const std::size_t len = std::min(row, n - r0);
    const auto softmax = [&](std::span<const float> x, std::vector<double>& y) {
      double mx = -INFINITY, s = 0;
      for (std::size_t j = 0; j < len; ++j) mx = std::max(mx, static_cast<double>(x[r0 + j]));
      for (std::size_t j = 0; j < len; ++j) s += (y[j] = std::exp(static_cast<double>(x[r0 + j]) - mx));
      for (std::size_t j = 0; j < len; ++j) y[j] = y[j] / s + 1e-8;
    };
    softmax(model, p);
    softmax(in.base, q);
    double kl = 0;
    for (std::size_t j = 0; j < len; ++j) kl += p[j] * std::log(p[j] / q[j]);
    for (std::size_t j = 0; j < len; ++j)
      importance[r0 + j] = static_cast<float>(std::fabs(static_cast<double>(model[r0 + j]) - in.base[r0 + j]) * kl);
  }
  // Threshold: median + 1.5 IQR, quantile q at sorted index floor(q (N - 1)).
  std::vector<float> sorted = importance;
  const auto at = [&](double qq) {
    const auto k = static_cast<std::size_t>(qq * static_cast<double>(n - 1));
    std::nth_element(sorted.begin(), sorted.begin() + static_cast<std::ptrdiff_t>(k), sorted.end());
    return sorted[k];
  };
  const float median = at(0.5), q1 = at(0.25), q3 = at(0.75);
  const float threshold = median + 1.5f * (q3 - q1);
  for (std::size_t i = 0; i < n; ++i)
    out[i] = importance[i] >= threshold ? in.base[i] + (model[i] - in.base[i]) : in.base[i];
  if (n > 1000000)
    note(in, "arcee_fusion: quantiles over all " + std::to_string(n) +
                 " elements; mergekit estimates them from 1e6 randomly sampled ones (a different mask on every run)");
}

// ---------------------------------------------------------------------------------------------
// ram, ramplus_tl (mergekit/merge_methods/ram.py)
// ---------------------------------------------------------------------------------------------

namespace {

// lambda: the factor of model m's unique entries (empty: 1).
void ram_combine(const MergeTensor& in, std::span<float> out, const std::vector<double>& lambda) {
  const std::size_t mc = in.models.size();
  const float eps = in.global.epsilon;
  for (std::size_t i = 0; i < out.size(); ++i) {
    std::size_t count = 0, last = 0;
    double sum = 0;
    for (std::size_t m = 0; m < mc; ++m) {
      const float d = in.models[m][i] - in.base[i];
      if (std::fabs(d) > eps) {
        ++count;
        last = m;
        sum += d;
      }
    }
    double merged = 0;
    if (count == 1) merged = lambda.empty() ? sum : sum * lambda[last];
    else if (count > 1) merged = sum / static_cast<double>(count);
    out[i] = static_cast<float>(in.base[i] + merged);
  }
}

}  // namespace

void merge_ram(const MergeTensor& in, std::span<float> out) {
  check_inputs(in, out, "ram", true, 1);
  ram_combine(in, out, {});
}

void merge_ramplus_tl(const MergeTensor& in, std::span<float> out) {
  const std::size_t n = check_inputs(in, out, "ramplus_tl", true, 1);
  const std::size_t mc = in.models.size();
  const float eps = in.global.epsilon;
  std::vector<std::uint64_t> shared(mc, 0), unique(mc, 0);
  for (std::size_t i = 0; i < n; ++i) {
    std::size_t count = 0;
    for (std::size_t m = 0; m < mc; ++m) count += std::fabs(in.models[m][i] - in.base[i]) > eps;
    if (count == 0) continue;
    for (std::size_t m = 0; m < mc; ++m)
      if (std::fabs(in.models[m][i] - in.base[i]) > eps) ++(count == 1 ? unique : shared)[m];
  }
  std::vector<double> lambda(mc);
  const double r = in.global.r, alpha = in.global.alpha;
  for (std::size_t m = 0; m < mc; ++m) {
    // rho = shared / max(unique, epsilon); lambda = 1 + r clamp(rho, 0, alpha) (alpha < 0: alpha, as torch).
    const double rho = static_cast<double>(shared[m]) / std::max(static_cast<double>(unique[m]), static_cast<double>(eps));
    lambda[m] = 1.0 + r * std::min(std::max(rho, 0.0), alpha);
  }
  ram_combine(in, out, lambda);
}

}  // namespace taskvec
