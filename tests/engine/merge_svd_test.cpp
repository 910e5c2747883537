// TSV-Merge and Iso-C on tiny matrices (hand-computed), and the isotropy invariant of Iso-C.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "merge_test_util.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

using testing_merge::Case;

void expect_near(const std::vector<float>& got, const std::vector<float>& want, float tol = 1e-5f) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
}

Case matrix_case(std::uint64_t m, std::uint64_t n, std::vector<float> base, std::vector<std::vector<float>> taus) {
  Case c = Case::from_taus(std::move(base), taus);
  c.shape = {m, n};
  return c;
}

std::vector<float> random_vector(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

TEST(MergeIsoC, FlattensTheSpectrum) {
  // diag(3, 1): mean singular value 2 -> diag(2, 2)
  Case c = matrix_case(2, 2, {1, 0, 0, 1}, {{3, 0, 0, 1}});
  expect_near(c.run(merge_iso_c), {3, 0, 0, 3});
  c.global.lambda = 0.5f;
  expect_near(c.run(merge_iso_c), {2, 0, 0, 2});
}

TEST(MergeIsoC, OutputSingularValuesAreAllEqual) {
  const std::uint64_t m = 6, n = 4;
  Case c = matrix_case(m, n, random_vector(m * n, 1), {random_vector(m * n, 2), random_vector(m * n, 3)});
  c.params[1].weight = 0.5f;
  const auto out = c.run(merge_iso_c);
  std::vector<double> d(m * n);
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<double>(out[i]) - c.base[i];
  // D^T D must be s^2 I: every singular value equal.
  double diag0 = 0;
  for (std::size_t a = 0; a < n; ++a)
    for (std::size_t b = 0; b < n; ++b) {
      double g = 0;
      for (std::size_t i = 0; i < m; ++i) g += d[i * n + a] * d[i * n + b];
      if (a == 0 && b == 0) diag0 = g;
      if (a == b) EXPECT_NEAR(g, diag0, 1e-4 * diag0);
      else EXPECT_NEAR(g, 0.0, 1e-4 * diag0);
    }
  EXPECT_GT(diag0, 0.1);
}

TEST(MergeIsoC, VectorsFallBackToMeanOfTaskVectors) {
  Case c = Case::from_taus({1, 1}, {{1, 2}, {3, 4}});
  expect_near(c.run(merge_iso_c), {3, 4});
  expect_near(c.run(merge_tsv), {3, 4});
}

TEST(MergeTsv, OneModelReproducesTheTaskVector) {
  const std::uint64_t m = 5, n = 3;
  Case c = matrix_case(m, n, random_vector(m * n, 4), {random_vector(m * n, 5)});
  std::vector<float> want(m * n);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] = c.models[0][i];
  expect_near(c.run(merge_tsv), want, 1e-4f);
}

TEST(MergeTsv, OrthogonalTasksAddUp) {
  Case c = matrix_case(2, 2, {0, 0, 0, 0}, {{2, 0, 0, 0}, {0, 0, 0, 3}});
  expect_near(c.run(merge_tsv), {2, 0, 0, 3});
}

TEST(MergeTsv, IdenticalRankOneTasksAreNotDoubleCounted) {
  // U = [e1 e1] whitens to [e1 e1] / sqrt2 (same for V): Delta = (1 + 1) / 2 e1 e1^T.
  Case c = matrix_case(2, 2, {0, 0, 0, 0}, {{1, 0, 0, 0}, {1, 0, 0, 0}});
  expect_near(c.run(merge_tsv), {1, 0, 0, 0});
}

TEST(MergeTsv, MoreTasksThanRankKeepsOneComponentEach) {
  const std::uint64_t m = 2, n = 3;
  Case c = matrix_case(m, n, std::vector<float>(6, 0.0f),
                       {random_vector(6, 7), random_vector(6, 8), random_vector(6, 9)});
  for (float x : c.run(merge_tsv)) EXPECT_TRUE(std::isfinite(x));
}

}  // namespace
}  // namespace taskvec
