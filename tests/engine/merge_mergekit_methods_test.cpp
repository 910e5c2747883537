// mergekit's newer merge methods (nuslerp, multislerp, karcher, nearswap, sce, arcee_fusion, ram,
// ramplus_tl) on tiny tensors. Expected values are worked by hand in comments, or come from a plain f64
// transcription of mergekit/merge_methods/*.py written here (vectors and loops, none of the kernels' helpers).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/recipe_at.hpp"
#include "merge_test_util.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

using testing_merge::Case;
using Vec = std::vector<double>;

void expect_near(const std::vector<float>& got, const Vec& want, double tol = 2e-6) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
}

// ---- f64 vector helpers for the reference transcriptions ----
double dotp(const Vec& a, const Vec& b) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
double norm(const Vec& a) { return std::sqrt(dotp(a, a)); }
Vec scaled(const Vec& a, double s) {
  Vec r(a);
  for (auto& x : r) x *= s;
  return r;
}
Vec add(const Vec& a, const Vec& b) {
  Vec r(a);
  for (std::size_t i = 0; i < r.size(); ++i) r[i] += b[i];
  return r;
}
Vec sub(const Vec& a, const Vec& b) { return add(a, scaled(b, -1)); }
Vec to_d(const std::vector<float>& v) { return Vec(v.begin(), v.end()); }

Case make(std::vector<float> base, std::vector<std::vector<float>> models) {
  Case c;
  c.shape = {base.empty() ? models[0].size() : base.size()};
  c.base = std::move(base);
  c.models = std::move(models);
  c.params.resize(c.models.size());
  return c;
}

// ============================== nearswap ==============================

TEST(MergekitMethodNearswap, HandComputed) {
  // w = clamp(t / max(|base - m|, 1e-6), 0, 1), out = w m + (1 - w) base, t = 0.1:
  //   |d| 0.05 -> w 1 (m); |d| 0.5 -> w 0.2: 0.2 * 1.5 + 0.8 * 1 = 1.1; |d| 0 -> m; |d| 1 -> w 0.1: 3 + 0.1 * 1 = 3.1
  Case c = make({0, 1, 2, 3}, {{0.05f, 1.5f, 2.0f, 4.0f}});
  c.global.t = 0.1f;
  expect_near(c.run(merge_nearswap), {0.05, 1.1, 2.0, 3.1});
}

TEST(MergekitMethodNearswap, ZeroOrNegativeTKeepsTheBase) {
  Case c = make({0, 1, 2}, {{0.5f, -1.0f, 2.5f}});
  c.global.t = 0;
  expect_near(c.run(merge_nearswap), {0, 1, 2});
  c.global.t = -3;  // w clamps to 0
  expect_near(c.run(merge_nearswap), {0, 1, 2});
  c.global.t = 1e9f;  // w clamps to 1: the model
  expect_near(c.run(merge_nearswap), {0.5, -1.0, 2.5});
}

// ============================== sce ==============================

// sce.py transcribed: tvs = m - base; select by variance; weights = mean(tv^2) normalised; sign mask; divide.
Vec ref_sce(const Vec& base, const std::vector<Vec>& models, double select_topk) {
  const std::size_t n = base.size(), mc = models.size();
  std::vector<Vec> tv;
  for (const auto& m : models) tv.push_back(sub(m, base));
  if (select_topk < 1) {
    Vec mask(n, 0.0);
    if (select_topk > 0) {
      Vec var(n);
      std::size_t nonzero = 0;
      for (std::size_t i = 0; i < n; ++i) {
        double mean = 0;
        for (const auto& t : tv) mean += t[i] / mc;
        for (const auto& t : tv) var[i] += (t[i] - mean) * (t[i] - mean) / mc;
        nonzero += var[i] != 0;
      }
      const auto k = static_cast<std::size_t>(nonzero * select_topk);
      std::vector<std::size_t> idx(n);
      std::iota(idx.begin(), idx.end(), 0);
      std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return var[a] > var[b]; });
      for (std::size_t j = 0; j < k; ++j) mask[idx[j]] = 1;
    }
    for (auto& t : tv)
      for (std::size_t i = 0; i < n; ++i) t[i] *= mask[i];
  }
  Vec w(mc);
  double wsum = 0;
  for (std::size_t m = 0; m < mc; ++m) wsum += (w[m] = dotp(tv[m], tv[m]) / n);
  for (auto& x : w) x = std::fabs(wsum) < 1e-6 ? 1.0 / mc : x / wsum;
  Vec out(n);
  for (std::size_t i = 0; i < n; ++i) {
    double s = 0;
    for (const auto& t : tv) s += t[i];
    const double maj = s >= 0 ? 1 : -1;
    double num = 0, den = 0;
    for (std::size_t m = 0; m < mc; ++m) {
      const double sg = tv[m][i] > 0 ? 1 : tv[m][i] < 0 ? -1 : 0;
      if (sg == maj) {
        num += tv[m][i] * w[m];
        den += w[m];
      }
    }
    out[i] = base[i] + num / std::max(den, 1e-6);
  }
  return out;
}

TEST(MergekitMethodSce, MatchesReference) {
  Case c = make({0.1f, 0.2f, -0.3f, 0.4f, 0.0f, 1.0f},
                {{0.6f, 0.1f, 0.0f, 0.4f, -0.8f, 1.9f}, {-0.3f, 0.4f, 0.3f, 0.1f, -0.3f, 0.2f}, {0.2f, -0.5f, -0.5f, 0.8f, 0.9f, 1.0f}});
  std::vector<Vec> models;
  for (const auto& m : c.models) models.push_back(to_d(m));
  for (float k : {1.0f, 0.5f, 0.34f, 0.0f}) {
    c.global.select_topk = k;
    expect_near(c.run(merge_sce), ref_sce(to_d(c.base), models, k));
  }
}

TEST(MergekitMethodSce, HandComputedTwoModels) {
  // tau1 = (1, 2), tau2 = (-1, 2): mean squares 2.5 and 2.5 -> weights 0.5, 0.5. Element 0: sum 0 elects +,
  // only tau1 agrees: 0.5 * 1 / 0.5 = 1. Element 1: both agree: (1 + 1) / 1 = 2.
  Case c = Case::from_taus({0, 0}, {{1, 2}, {-1, 2}});
  expect_near(c.run(merge_sce), {1, 2});
  // select_topk 0.5: variances (1, 0): one nonzero, floor(0.5 * 1) = 0 positions kept -> the base.
  c.global.select_topk = 0.5f;
  expect_near(c.run(merge_sce), {0, 0});
}

TEST(MergekitMethodSce, ZeroTaskVectorsGiveTheBase) {
  Case c = Case::from_taus({1, 2, 3}, {{0, 0, 0}, {0, 0, 0}});
  expect_near(c.run(merge_sce), {1, 2, 3});
  c.global.select_topk = 0.5f;
  expect_near(c.run(merge_sce), {1, 2, 3});
}

// ============================== multislerp ==============================

// multislerp.py transcribed.
Vec ref_multislerp(const Vec* base, const std::vector<Vec>& models, Vec w, bool normalize_weights, double eps) {
  if (models.size() == 1) return models[0];
  std::vector<Vec> x;
  for (const auto& m : models) x.push_back(base ? sub(m, *base) : m);
  if (normalize_weights) {
    const double s = std::accumulate(w.begin(), w.end(), 0.0);
    for (auto& e : w) e /= s;
  }
  Vec norms;
  std::vector<Vec> unit;
  for (const auto& v : x) {
    norms.push_back(norm(v));
    unit.push_back(scaled(v, 1.0 / (norms.back() + eps)));
  }
  Vec mean(x[0].size(), 0.0);
  for (std::size_t m = 0; m < x.size(); ++m) mean = add(mean, scaled(unit[m], w[m]));
  const double mean_norm = norm(mean);
  Vec res;
  if (mean_norm < eps) {
    res = add(scaled(x[0], w[0]), scaled(x[1], w[1]));  // two-model fallback
  } else {
    mean = scaled(mean, 1.0 / mean_norm);
    Vec tangent(mean.size(), 0.0);
    for (std::size_t m = 0; m < x.size(); ++m) tangent = add(tangent, scaled(sub(unit[m], scaled(mean, dotp(unit[m], mean))), w[m]));
    const double tn = norm(tangent) + eps;
    res = add(scaled(mean, std::cos(tn)), scaled(tangent, std::sin(tn) / tn));
    double avg = 0;
    for (std::size_t m = 0; m < x.size(); ++m) avg += norms[m] * w[m];
    res = scaled(res, avg);
  }
  return base ? add(res, *base) : res;
}

TEST(MergekitMethodMultislerp, MatchesReferenceWithAndWithoutBase) {
  Case c = make({0.5f, -0.2f, 0.1f, 0.3f},
                {{1.0f, 0.5f, -0.5f, 0.2f}, {0.2f, -1.0f, 0.7f, 0.9f}, {-0.4f, 0.3f, 0.6f, -0.2f}});
  c.params[0].weight = 0.5f;
  c.params[1].weight = 1.0f;
  c.params[2].weight = 2.5f;
  std::vector<Vec> models;
  for (const auto& m : c.models) models.push_back(to_d(m));
  const Vec base = to_d(c.base);
  const Vec w = {0.5, 1.0, 2.5};
  expect_near(c.run(merge_multislerp), ref_multislerp(&base, models, w, true, 1e-8));
  c.global.normalize_weights = false;
  expect_near(c.run(merge_multislerp), ref_multislerp(&base, models, w, false, 1e-8), 1e-5);
  c.global.normalize_weights = true;
  c.base.clear();
  expect_near(c.run(merge_multislerp), ref_multislerp(nullptr, models, w, true, 1e-8));
}

TEST(MergekitMethodMultislerp, HandComputedOrthogonalPair) {
  // Unit task vectors e0, e1 with equal weights: mean direction (1, 1)/sqrt2, mean norm 1 -> (0.7071, 0.7071).
  Case c = Case::from_taus({1, 1}, {{1, 0}, {0, 1}});
  const double h = std::sqrt(0.5);
  expect_near(c.run(merge_multislerp), {1 + h, 1 + h});
}

TEST(MergekitMethodMultislerp, CancellingOrZeroVectorsFallBackToLinear) {
  // Antipodal pair with equal weights: mergekit's two-model fallback, 0.5 a + 0.5 (-a) = 0.
  Case c = Case::from_taus({1, 2}, {{1, 2}, {-1, -2}});
  expect_near(c.run(merge_multislerp), {1, 2});
  // Three zero task vectors: mergekit raises; taskvec gives the base (weighted sum) and a note.
  std::vector<std::string> notes;
  Case z = Case::from_taus({1, 2}, {{0, 0}, {0, 0}, {0, 0}});
  z.notes = &notes;
  expect_near(z.run(merge_multislerp), {1, 2});
  EXPECT_EQ(notes.size(), 1u);
  // One model: that model.
  Case one = Case::from_taus({1, 2}, {{0.5f, 0.5f}});
  expect_near(one.run(merge_multislerp), {1.5, 2.5});
  // normalize_weights with weights summing to 0: mergekit writes NaN; taskvec refuses.
  c.params[0].weight = 1;
  c.params[1].weight = -1;
  EXPECT_THROW(c.run(merge_multislerp), Error);
}

// ============================== karcher ==============================

// karcher.py transcribed (alphas 1/N).
Vec ref_karcher(const std::vector<Vec>& t, int max_iter, double tol) {
  const std::size_t mc = t.size();
  if (mc == 1) return t[0];
  Vec norms;
  std::vector<Vec> units;
  for (const auto& v : t) {
    const double nv = norm(v);
    norms.push_back(nv);
    units.push_back(nv == 0 ? Vec(v.size(), 0.0) : scaled(v, 1.0 / nv));
  }
  std::vector<std::size_t> valid;
  for (std::size_t i = 0; i < mc; ++i)
    if (norms[i] > tol) valid.push_back(i);
  if (valid.empty()) return Vec(t[0].size(), 0.0);
  const double a = 1.0 / valid.size();
  Vec u(t[0].size(), 0.0);
  for (auto i : valid) u = add(u, scaled(units[i], a));
  const double nu = norm(u);
  u = nu < tol ? units[valid[0]] : scaled(u, 1.0 / nu);
  for (int it = 0; it < max_iter; ++it) {
    Vec T(u.size(), 0.0);
    for (auto i : valid) {
      const double d = std::clamp(dotp(u, units[i]), -1.0, 1.0);
      const double th = std::acos(d);
      if (th < tol) continue;
      T = add(T, scaled(sub(units[i], scaled(u, d)), a * th / std::sin(th)));
    }
    const double nt = norm(T);
    if (nt < tol) break;
    u = add(scaled(u, std::cos(nt)), scaled(T, std::sin(nt) / nt));
    const double n2 = norm(u);
    if (n2 > tol) u = scaled(u, 1.0 / n2);
  }
  double s = 0;
  for (double nv : norms) s += nv / mc;
  return scaled(u, s);
}

TEST(MergekitMethodKarcher, MatchesReference) {
  Case c = make({}, {{1.0f, 0.5f, -0.5f, 0.2f}, {0.2f, -1.0f, 0.7f, 0.9f}, {-0.4f, 0.3f, 0.6f, -0.2f}});
  std::vector<Vec> models;
  for (const auto& m : c.models) models.push_back(to_d(m));
  expect_near(c.run(merge_karcher), ref_karcher(models, 10, 1e-5));
  c.global.max_iter = 1;
  expect_near(c.run(merge_karcher), ref_karcher(models, 1, 1e-5));
  c.global.max_iter = 100;
  c.global.tol = 1e-9f;
  expect_near(c.run(merge_karcher), ref_karcher(models, 100, 1e-9));
}

TEST(MergekitMethodKarcher, HandComputedOrthogonalPair) {
  // Unit e0 and 3 e1: the Karcher mean of two points is their geodesic midpoint (1, 1)/sqrt2; the scale is
  // the mean norm 2: (sqrt2, sqrt2).
  Case c = make({}, {{1, 0}, {0, 3}});
  expect_near(c.run(merge_karcher), {std::sqrt(2.0), std::sqrt(2.0)}, 1e-5);
}

TEST(MergekitMethodKarcher, ParallelAndZeroModels) {
  // Parallel models: the direction is theirs, the scale their mean norm: the arithmetic mean.
  Case c = make({}, {{1, 2, 2}, {3, 6, 6}});
  expect_near(c.run(merge_karcher), {2, 4, 4});
  // All-zero models: zeros (mergekit too).
  Case z = make({}, {{0, 0}, {0, 0}});
  expect_near(z.run(merge_karcher), {0, 0});
  // One zero model among two: it is left out of the direction but counts in the scale (mergekit).
  Case h = make({}, {{0, 0}, {0, 4}});
  expect_near(h.run(merge_karcher), {0, 2});
}

// ============================== nuslerp ==============================

// nuslerp() of nuslerp.py on one pair of vectors.
Vec ref_nuslerp_vec(double t, const Vec& v0, const Vec& v1) {
  const Vec u0 = scaled(v0, 1.0 / std::max(norm(v0), 1e-7)), u1 = scaled(v1, 1.0 / std::max(norm(v1), 1e-7));
  const double th = std::acos(std::clamp(dotp(u0, u1), -1.0, 1.0));
  const double s = std::sin(th);
  if (std::fabs(s) < 1e-8) return add(scaled(v0, 1 - t), scaled(v1, t));
  return add(scaled(v0, std::sin((1 - t) * th) / s), scaled(v1, std::sin(t * th) / s));
}

TEST(MergekitMethodNuslerp, HandComputedAndWeights) {
  // e0, e1 at t = 0.5: sin(pi/4) (e0 + e1) / sin(pi/2).
  Case c = make({}, {{1, 0}, {0, 1}});
  const double h = std::sqrt(0.5);
  expect_near(c.run(merge_nuslerp), {h, h});
  // weights 1, 3: t = 3/4: (sin(pi/8), sin(3pi/8)).
  c.params[1].weight = 3;
  expect_near(c.run(merge_nuslerp), {std::sin(M_PI / 8), std::sin(3 * M_PI / 8)});
  // Weights summing to ~0: t = 0.5.
  c.params[0].weight = 1;
  c.params[1].weight = -1;
  expect_near(c.run(merge_nuslerp), {h, h});
  // With a base: slerp of the task vectors, added back.
  Case b = Case::from_taus({1, 2}, {{1, 0}, {0, 1}});
  expect_near(b.run(merge_nuslerp), {1 + h, 2 + h});
}

TEST(MergekitMethodNuslerp, RowsAndColumnsMatchReference) {
  // 2 x 3 tensor: nuslerp_flatten false slerps each row (last dimension); with nuslerp_row_wise each column.
  Case c = make({}, {{1, 0, 2, 0.5f, -1, 1}, {0, 1, 1, 0.5f, 1, 2}});
  c.shape = {2, 3};
  c.params[0].weight = 2;  // t = 1/3
  const double t = 1.0 / 3.0;
  const Vec a = to_d(c.models[0]), b = to_d(c.models[1]);
  Vec whole = ref_nuslerp_vec(t, a, b);
  expect_near(c.run(merge_nuslerp), whole);
  c.global.nuslerp_flatten = false;
  Vec rows;
  for (int r = 0; r < 2; ++r) {
    const Vec o = ref_nuslerp_vec(t, Vec(a.begin() + 3 * r, a.begin() + 3 * r + 3), Vec(b.begin() + 3 * r, b.begin() + 3 * r + 3));
    rows.insert(rows.end(), o.begin(), o.end());
  }
  expect_near(c.run(merge_nuslerp), rows);
  c.global.nuslerp_row_wise = true;
  Vec cols(6);
  for (int j = 0; j < 3; ++j) {
    const Vec o = ref_nuslerp_vec(t, {a[j], a[3 + j]}, {b[j], b[3 + j]});
    cols[j] = o[0];
    cols[3 + j] = o[1];
  }
  expect_near(c.run(merge_nuslerp), cols);
}

TEST(MergekitMethodNuslerp, ParallelAndZeroVectorsInterpolateLinearly) {
  Case c = make({}, {{1, 2}, {3, 6}});  // parallel: (1 - t) v0 + t v1 = (2, 4)
  expect_near(c.run(merge_nuslerp), {2, 4});
  std::vector<std::string> notes;
  Case z = Case::from_taus({1, 1}, {{0, 0}, {2, 4}});  // zero task vector: base + t v1 (mergekit: sin(pi/4) v1)
  z.notes = &notes;
  expect_near(z.run(merge_nuslerp), {2, 3});
  EXPECT_EQ(notes.size(), 1u);
}

// ============================== arcee_fusion ==============================

// arcee_fusion.py transcribed: importance = |p - b| * KL(softmax(p)+1e-8 || softmax(b)+1e-8) per row;
// threshold = median + 1.5 IQR with quantile q at sorted[floor(q (n - 1))].
Vec ref_arcee_fusion(const Vec& base, const Vec& model, std::size_t row) {
  const std::size_t n = base.size();
  Vec imp(n);
  for (std::size_t r0 = 0; r0 < n; r0 += row) {
    auto soft = [&](const Vec& x) {
      Vec y(row);
      double s = 0;
      for (std::size_t j = 0; j < row; ++j) s += (y[j] = std::exp(x[r0 + j]));
      for (auto& e : y) e = e / s + 1e-8;
      return y;
    };
    const Vec p = soft(model), q = soft(base);
    double kl = 0;
    for (std::size_t j = 0; j < row; ++j) kl += p[j] * std::log(p[j] / q[j]);
    for (std::size_t j = 0; j < row; ++j) imp[r0 + j] = std::fabs(model[r0 + j] - base[r0 + j]) * kl;
  }
  Vec sorted = imp;
  std::sort(sorted.begin(), sorted.end());
  auto qf = [&](double q) { return sorted[static_cast<std::size_t>(q * (n - 1))]; };
  const double thr = qf(0.5) + 1.5 * (qf(0.75) - qf(0.25));
  Vec out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = imp[i] >= thr ? model[i] : base[i];
  return out;
}

TEST(MergekitMethodArceeFusion, MatchesReference) {
  // 2 x 4; row 1 barely moves, row 0 has one large change: only the outliers of the importance are kept.
  Case c = make({0.1f, 0.2f, 0.3f, 0.4f, -0.1f, 0.0f, 0.1f, 0.2f},
                {{0.1f, 1.7f, 0.35f, 0.4f, -0.1f, 0.01f, 0.1f, 0.2f}});
  c.shape = {2, 4};
  const Vec want = ref_arcee_fusion(to_d(c.base), to_d(c.models[0]), 4);
  const auto got = c.run(merge_arcee_fusion);
  expect_near(got, want);
  // Hand check of the mask: the importances are 0 except elements 1, 2 (row 0) and 5 (row 1, small KL);
  // sorted, floor(0.5 * 7) = 3 -> median 0, q1 0, q3 (index 5) = the element-5 importance, so the
  // threshold lies above it and only elements 1 and 2 (the row with the large KL) keep their change.
  EXPECT_FLOAT_EQ(got[1], 1.7f);
  EXPECT_FLOAT_EQ(got[2], 0.35f);
  EXPECT_FLOAT_EQ(got[5], 0.0f);
}

TEST(MergekitMethodArceeFusion, IdenticalModelIsTheBase) {
  // Every importance 0: threshold 0, every entry passes (>=), delta 0: the base.
  Case c = Case::from_taus({1, 2, 3}, {{0, 0, 0}});
  expect_near(c.run(merge_arcee_fusion), {1, 2, 3});
}

// ============================== ram / ramplus_tl ==============================

// Task vectors (base 1..6): per element, which models count (|tau| > 1e-5):
//   0: m2 only (m1's 1e-6 is below epsilon)   -> unique 0.3
//   1: m1, m2, m3                              -> shared (0.5 + 0.1 + 0.3) / 3 = 0.3
//   2: m1 only                                 -> unique 0.2
//   3: none (m3's 2e-6 is below epsilon)       -> 0
//   4: m1, m2                                  -> shared (-0.4 - 0.2) / 2 = -0.3
//   5: m2 only                                 -> unique 0.1
Case ram_case() {
  return Case::from_taus({1, 2, 3, 4, 5, 6}, {{1e-6f, 0.5f, 0.2f, 0, -0.4f, 0},
                                              {0.3f, 0.1f, 0, 0, -0.2f, 0.1f},
                                              {0, 0.3f, 0, 2e-6f, 0, 0}});
}

TEST(MergekitMethodRam, HandComputed) {
  Case c = ram_case();
  expect_near(c.run(merge_ram), {1.3, 2.3, 3.2, 4.0, 4.7, 6.1}, 3e-6);
  EXPECT_EQ(c.run(merge_ram)[3], 4.0f);  // below epsilon: the base exactly
}

TEST(MergekitMethodRam, ZeroTaskVectorsGiveTheBase) {
  Case c = Case::from_taus({1, -2}, {{0, 0}, {0, 0}});
  expect_near(c.run(merge_ram), {1, -2});
  expect_near(c.run(merge_ramplus_tl), {1, -2});
}

TEST(MergekitMethodRamplusTl, HandComputed) {
  // m1: shared {1, 4} = 2, unique {2} = 1 -> rho 2; m2: shared {1, 4} = 2, unique {0, 5} = 2 -> rho 1;
  // m3: shared 1, unique 0 -> rho 1 / 1e-5 (no unique entries: no effect).
  // Defaults r 0.1, alpha 0.2: both clamp to 0.2 -> lambda 1.02 on unique entries.
  Case c = ram_case();
  expect_near(c.run(merge_ramplus_tl), {1 + 0.306, 2.3, 3 + 0.204, 4.0, 4.7, 6 + 0.102}, 3e-6);
  // r 0.5, alpha 3: lambda_1 = 1 + 0.5 * 2 = 2, lambda_2 = 1 + 0.5 * 1 = 1.5.
  c.global.r = 0.5f;
  c.global.alpha = 3;
  expect_near(c.run(merge_ramplus_tl), {1 + 0.45, 2.3, 3 + 0.4, 4.0, 4.7, 6 + 0.15}, 3e-6);
  // r 0: plain RAM.
  c.global.r = 0;
  EXPECT_EQ(c.run(merge_ramplus_tl), c.run(merge_ram));
}

// ============================== registry and recipes ==============================

TEST(MergekitMethodRegistry, ParametersAndDefaultsAreMergekits) {
  struct P {
    const char* name;
    MergeParamScope scope;
    double def;
  };
  struct M {
    const char* name;
    bool needs_base;
    std::size_t min_models, max_models;
    std::vector<P> params;
  };
  const auto G = MergeParamScope::kGlobal, L = MergeParamScope::kModel;
  const std::size_t any = 1u << 20;
  const std::vector<M> methods = {
      {"nuslerp", false, 2, 2, {{"weight", L, 1}, {"nuslerp_row_wise", G, 0}, {"nuslerp_flatten", G, 1}}},
      {"multislerp", false, 1, any, {{"weight", L, 1}, {"normalize_weights", G, 1}, {"eps", G, 1e-8}}},
      {"karcher", false, 1, any, {{"max_iter", G, 10}, {"tol", G, 1e-5}}},
      {"nearswap", true, 1, 1, {{"t", G, 0.5}}},
      {"sce", true, 1, any, {{"select_topk", G, 1}, {"int8_mask", G, 0}}},
      {"arcee_fusion", true, 1, 1, {}},
      {"ram", true, 1, any, {{"epsilon", G, 1e-5}}},
      {"ramplus_tl", true, 1, any, {{"r", G, 0.1}, {"alpha", G, 0.2}, {"epsilon", G, 1e-5}}},
  };
  for (const auto& m : methods) {
    const MergeMethod* found = find_merge_method(m.name);
    ASSERT_NE(found, nullptr) << m.name;
    EXPECT_EQ(found->needs_base, m.needs_base) << m.name;
    EXPECT_EQ(found->min_models, m.min_models) << m.name;
    EXPECT_EQ(found->max_models, m.max_models) << m.name;
    EXPECT_EQ(found->params.size(), m.params.size()) << m.name;
    for (const auto& p : m.params) {
      const MergeParamSpec* spec = found->find_param(p.name);
      ASSERT_NE(spec, nullptr) << m.name << "." << p.name;
      EXPECT_EQ(spec->scope, p.scope) << m.name << "." << p.name;
      EXPECT_DOUBLE_EQ(spec->default_value, p.def) << m.name << "." << p.name;
    }
  }
  EXPECT_TRUE(find_merge_method("nearswap")->elementwise);
  EXPECT_TRUE(find_merge_method("ram")->elementwise);
  EXPECT_FALSE(find_merge_method("ramplus_tl")->elementwise);  // its ratios are per tensor
  // The defaults a recipe without parameters resolves to are the struct's too.
  const MergeGlobalParams g;
  EXPECT_FALSE(g.nuslerp_row_wise);
  EXPECT_TRUE(g.nuslerp_flatten);
  EXPECT_TRUE(g.normalize_weights);
  EXPECT_FLOAT_EQ(g.eps, 1e-8f);
  EXPECT_EQ(g.max_iter, 10);
  EXPECT_FLOAT_EQ(g.tol, 1e-5f);
  EXPECT_FLOAT_EQ(g.select_topk, 1.0f);
  EXPECT_FLOAT_EQ(g.epsilon, 1e-5f);
  EXPECT_FLOAT_EQ(g.r, 0.1f);
  EXPECT_FLOAT_EQ(g.alpha, 0.2f);
}

void resolve(const Recipe& r, std::vector<MergeModelParams>& mp, MergeGlobalParams& gp) {
  r.resolve("model.layers.0.mlp.w", 2, mp, gp);
}

TEST(MergekitMethodRecipe, Nuslerp) {
  const Recipe r = parse_recipe(R"(
merge_method: nuslerp
models:
  - model: a
    parameters: {weight: 0.3}
  - model: b
    parameters: {weight: 0.7}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  resolve(r, mp, gp);
  ASSERT_EQ(mp.size(), 2u);
  EXPECT_FLOAT_EQ(mp[0].weight, 0.3f);
  EXPECT_FLOAT_EQ(mp[1].weight, 0.7f);
  EXPECT_FALSE(gp.nuslerp_flatten);
  EXPECT_TRUE(gp.nuslerp_row_wise);
  EXPECT_EQ(r.warnings.size(), 0u);
}

TEST(MergekitMethodRecipe, Multislerp) {
  const Recipe r = parse_recipe(R"(
merge_method: multislerp
base_model: base
models:
  - model: a
    parameters: {weight: 1.0}
  - model: b
    parameters: {weight: 2.0}
  - model: c
    parameters: {weight: [0.5, 1.5]}
parameters:
  normalize_weights: false
  eps: 1.0e-6
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  resolve(r, mp, gp);
  ASSERT_EQ(mp.size(), 3u);
  EXPECT_FLOAT_EQ(mp[1].weight, 2.0f);
  EXPECT_FLOAT_EQ(mp[2].weight, 0.5f);  // layer 0 of 2
  EXPECT_FALSE(gp.normalize_weights);
  EXPECT_FLOAT_EQ(gp.eps, 1e-6f);
}

TEST(MergekitMethodRecipe, Karcher) {
  const Recipe r = parse_recipe("merge_method: karcher\nmodels: [a, b, c]\nparameters: {max_iter: 20, tol: 1.0e-7}\n");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  resolve(r, mp, gp);
  EXPECT_EQ(mp.size(), 3u);
  EXPECT_EQ(gp.max_iter, 20);
  EXPECT_FLOAT_EQ(gp.tol, 1e-7f);
}

TEST(MergekitMethodRecipe, NearswapWithTheBaseListedAsOneOfTheTwoModels) {
  // mergekit's form: two models, one of them the base_model.
  const Recipe r = parse_recipe(R"(
merge_method: nearswap
base_model: base
models:
  - model: base
  - model: other
parameters:
  t: 0.0001
)");
  ASSERT_EQ(r.models.size(), 1u);
  EXPECT_EQ(r.models[0].path, std::filesystem::path("other"));
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  resolve(r, mp, gp);
  EXPECT_FLOAT_EQ(gp.t, 1e-4f);
  EXPECT_THROW(parse_recipe("merge_method: nearswap\nmodels: [a]\nparameters: {t: 0.1}\n"), Error);  // needs a base
  EXPECT_THROW(parse_recipe("merge_method: nearswap\nbase_model: b\nmodels: [a, c]\n"), Error);     // one model only
}

TEST(MergekitMethodRecipe, Sce) {
  const Recipe r = parse_recipe(R"(
merge_method: sce
base_model: base
models: [a, b, c]
parameters:
  select_topk: 0.1
  int8_mask: true
dtype: bfloat16
)");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  resolve(r, mp, gp);
  EXPECT_FLOAT_EQ(gp.select_topk, 0.1f);
  EXPECT_THROW(parse_recipe("merge_method: sce\nmodels: [a, b]\n"), Error);  // needs a base
}

TEST(MergekitMethodRecipe, ArceeFusionAsMergekitsExample) {
  // mergekit/examples/arcee_fusion.yml
  const Recipe r = parse_recipe(R"(
models:
  - model: model_a
  - model: model_b
merge_method: arcee_fusion
base_model: model_a
dtype: bfloat16
)");
  EXPECT_EQ(r.method->name, "arcee_fusion");
  ASSERT_EQ(r.models.size(), 1u);
  EXPECT_EQ(r.models[0].path, std::filesystem::path("model_b"));
}

TEST(MergekitMethodRecipe, RamAndRamplusTl) {
  const Recipe r = parse_recipe("merge_method: ram\nbase_model: base\nmodels: [a, b]\nparameters: {epsilon: 1.0e-4}\n");
  std::vector<MergeModelParams> mp;
  MergeGlobalParams gp;
  resolve(r, mp, gp);
  EXPECT_FLOAT_EQ(gp.epsilon, 1e-4f);
  const Recipe p = parse_recipe(R"(
merge_method: ramplus_tl
base_model: base
models:
  - model: a
  - model: b
    parameters: {epsilon: 0.5}
parameters:
  r: 0.3
  alpha: 0.5
)");
  resolve(p, mp, gp);
  EXPECT_FLOAT_EQ(gp.r, 0.3f);
  EXPECT_FLOAT_EQ(gp.alpha, 0.5f);
  EXPECT_FLOAT_EQ(gp.epsilon, 1e-5f);  // a model-level epsilon is ignored (global in mergekit), with a warning
  EXPECT_EQ(p.warnings.size(), 1u);
}

// ============================== through the driver ==============================

TEST(MergekitMethodDriver, RecipesRunOnFiles) {
  test::TempDir dir;
  test::write_model(dir / "base.safetensors", {{"layers.0.w", DType::kF32, {2, 2}, {0, 1, 2, 3}}});
  test::write_model(dir / "a.safetensors", {{"layers.0.w", DType::kF32, {2, 2}, {0.05, 1.5, 2.0, 4.0}}});
  test::write_model(dir / "b.safetensors", {{"layers.0.w", DType::kF32, {2, 2}, {0, 1.2, 2.5, 3}}});
  EditOptions o;
  o.threads = 2;
  int runs = 0;
  const auto run = [&](const std::string& yaml) {
    const auto out = dir / ("out" + std::to_string(runs++) + ".safetensors");
    merge_checkpoints(test::recipe_at(dir, yaml), out, o);
    return test::read_values(out, "layers.0.w");
  };
  const auto near = [](const std::vector<double>& got, const Vec& want) {
    ASSERT_EQ(got.size(), want.size());
    for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-6) << i;
  };
  // As MergekitMethodNearswap.HandComputed (element-wise: chunked).
  near(run("merge_method: nearswap\nbase_model: base.safetensors\nmodels: [base.safetensors, a.safetensors]\n"
           "parameters: {t: 0.1}\n"),
       {0.05, 1.1, 2.0, 3.1});
  // RAM: a (0.05, 0.5, 0, 1), b (0, 0.2, 0.5, 0): unique 0.05, shared 0.35, unique 0.5, unique 1.
  near(run("merge_method: ram\nbase_model: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"),
       {0.05, 1.35, 2.5, 4.0});
  // SCE without selection: mean squares (1.2525 / 4, 0.29 / 4) -> weights 0.812, 0.188 (values from the
  // reference transcription).
  const Vec sce = ref_sce({0, 1, 2, 3}, {{0.05, 1.5, 2.0, 4.0}, {0, 1.2, 2.5, 3}}, 1.0);
  near(run("merge_method: sce\nbase_model: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"), sce);
}

}  // namespace
}  // namespace taskvec
