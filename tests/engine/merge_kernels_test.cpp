// Merge kernels on tiny tensors, expected values computed by hand (METHODS-SPEC.md worked examples).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "merge_test_util.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec {
namespace {

using testing_merge::Case;

// METHODS-SPEC.md 3.2 worked example.
const std::vector<float> kTau1 = {0.5f, -0.1f, 0.3f, 0.0f, -0.8f};
const std::vector<float> kTau2 = {-0.4f, 0.2f, 0.6f, -0.1f, -0.3f};
const std::vector<float> kTau3 = {0.1f, -0.7f, -0.2f, 0.4f, 0.9f};

Case worked_example() { return Case::from_taus(std::vector<float>(5, 0.0f), {kTau1, kTau2, kTau3}); }

void expect_near(const std::vector<float>& got, const std::vector<float>& want, float tol = 1e-6f) {
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], tol) << "element " << i;
}

void expect_finite(const std::vector<float>& v) {
  for (float x : v) EXPECT_TRUE(std::isfinite(x));
}

std::vector<float> random_vector(std::size_t n, unsigned seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(gen);
  return v;
}

Case random_case(std::size_t n, std::size_t models, unsigned seed) {
  Case c;
  c.shape = {n};
  c.base = random_vector(n, seed);
  for (std::size_t m = 0; m < models; ++m) {
    auto tau = random_vector(n, seed + 100 + static_cast<unsigned>(m), 0.01f);
    for (std::size_t i = 0; i < n; ++i) tau[i] += c.base[i];
    c.models.push_back(tau);
  }
  c.params.resize(models);
  return c;
}

// ---------------- registry ----------------

TEST(MergeRegistry, EveryMethodIsRegisteredWithSaneDefaults) {
  const char* names[] = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                         "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp", "magnitude_prune", "consensus",
                         "tsv_merge", "iso_c", "nuslerp", "multislerp", "karcher", "nearswap", "sce", "arcee_fusion",
                         "ram", "ramplus_tl", "passthrough"};
  for (const char* name : names) {
    const MergeMethod* m = find_merge_method(name);
    ASSERT_NE(m, nullptr) << name;
    EXPECT_NE(m->kernel, nullptr);
    for (const auto& p : m->params) {
      EXPECT_TRUE(p.default_value >= p.min && p.default_value <= p.max) << name << "." << p.name;
      if (p.min_open) {
        EXPECT_GT(p.default_value, p.min) << name << "." << p.name;
      }
    }
  }
  EXPECT_EQ(merge_methods().size(), std::size(names));
  EXPECT_EQ(find_merge_method("frankenmerge"), nullptr);
  EXPECT_FALSE(find_merge_method("slerp")->needs_base);
  EXPECT_EQ(find_merge_method("ties")->find_param("density")->default_value, 1.0);  // mergekit's default
}

// ---------------- linear / task arithmetic ----------------

TEST(MergeLinear, WeightedAverageAndSum) {
  Case c = Case::from_taus({0, 0}, {{1, 2}, {3, 4}});
  c.base.clear();
  c.global.normalize = true;
  expect_near(c.run(merge_linear), {2, 3});
  c.params[1].weight = 3;
  expect_near(c.run(merge_linear), {2.5f, 3.5f});
  c.global.normalize = false;
  expect_near(c.run(merge_linear), {10, 14});
}

TEST(MergeLinear, OneModelAtWeightOneIsThatModel) {
  Case c = random_case(100, 1, 7);
  EXPECT_EQ(c.run(merge_linear), c.models[0]);
  c.global.normalize = true;
  EXPECT_EQ(c.run(merge_linear), c.models[0]);
}

TEST(MergeLinear, NormalizeWithZeroWeightSumIsAnError) {
  Case c = Case::from_taus({0, 0}, {{1, 2}, {3, 4}});
  c.params[0].weight = 1;
  c.params[1].weight = -1;
  c.global.normalize = true;
  try {
    c.run(merge_linear);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
  }
  // mergekit's task arithmetic divides by 1 where |sum w| < 1e-8 (and says so): base + tau_0 - tau_1.
  std::vector<std::string> notes;
  c.notes = &notes;
  expect_near(c.run(merge_task_arithmetic), {-2, -2});
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("the weights sum to 0"), std::string::npos) << notes[0];
}

TEST(MergeTaskArithmetic, WorkedExample) {
  Case c = worked_example();
  c.global.lambda = 0.3f;
  expect_near(c.run(merge_task_arithmetic), {0.06f, -0.18f, 0.21f, 0.09f, -0.06f});
  c.global.lambda = 0.0f;
  expect_near(c.run(merge_task_arithmetic), {0, 0, 0, 0, 0});
}

TEST(MergeTaskArithmetic, NegationAndNegativeWeights) {
  Case c = Case::from_taus({1, 2}, {{0.5f, -0.25f}});
  c.global.lambda = -1;
  expect_near(c.run(merge_task_arithmetic), {0.5f, 2.25f});
  c.global.lambda = 1;
  c.params[0].weight = -2;
  expect_near(c.run(merge_task_arithmetic), {0.0f, 2.5f});
}

TEST(MergeTaskArithmetic, AveragingIsLambdaOneOverT) {
  Case c = Case::from_taus({0, 0}, {{1, 2}, {3, 4}});
  c.global.lambda = 0.5f;
  expect_near(c.run(merge_task_arithmetic), {2, 3});
  c.global.lambda = 1;
  c.global.normalize = true;
  expect_near(c.run(merge_task_arithmetic), {2, 3});
}

TEST(MergeTaskArithmetic, OneModelWeightOneGivesTheModel) {
  Case c = random_case(1000, 1, 3);
  expect_near(c.run(merge_task_arithmetic), c.models[0], 1e-6f);
}

// ---------------- TIES ----------------

TEST(MergeTies, WorkedExampleCleanTrimDensity40) {
  Case c = worked_example();
  c.set_density(0.4f);  // keeps 2 of 5
  expect_near(c.run(merge_ties), {0.5f, -0.7f, 0.6f, 0.0f, 0.9f});
  c.global.divisor = MergeDivisor::kNone;  // no coordinate has two agreeing survivors
  expect_near(c.run(merge_ties), {0.5f, -0.7f, 0.6f, 0.0f, 0.9f});
  c.global.lambda = 0.5f;
  expect_near(c.run(merge_ties), {0.25f, -0.35f, 0.3f, 0.0f, 0.45f});
}

TEST(MergeTies, WorkedExampleDensity20) {
  Case c = worked_example();
  c.set_density(0.2f);  // one survivor per task: -0.8, 0.6, 0.9
  expect_near(c.run(merge_ties), {0, 0, 0.6f, 0, 0.9f});
}

TEST(MergeTies, WorkedExampleNoTrim) {
  Case c = worked_example();
  c.set_density(1.0f);
  expect_near(c.run(merge_ties), {0.3f, -0.4f, 0.45f, 0.4f, -0.55f});
  c.global.divisor = MergeDivisor::kNone;
  expect_near(c.run(merge_ties), {0.6f, -0.8f, 0.9f, 0.4f, -1.1f});
}

TEST(MergeTies, WorkedExampleOfficialTrimWithWholeModelThreshold) {
  Case c = worked_example();
  c.global.trim_model = true;
  for (const auto& tau : {kTau1, kTau2, kTau3}) {
    MagnitudeThreshold th(0.6);  // keeps round(0.6 * 5) = 3
    th.add(std::span<const float>(tau).first(2));
    th.add(std::span<const float>(tau).subspan(2));
    ASSERT_TRUE(th.next_pass());
    th.add(tau);
    EXPECT_FALSE(th.next_pass());
    c.thresholds.push_back(th.threshold());
  }
  EXPECT_FLOAT_EQ(c.thresholds[0], 0.3f);
  EXPECT_FLOAT_EQ(c.thresholds[1], 0.3f);
  EXPECT_FLOAT_EQ(c.thresholds[2], 0.4f);
  expect_near(c.run(merge_ties), {0.5f, -0.7f, 0.45f, 0.4f, -0.55f});
  c.global.divisor = MergeDivisor::kNone;
  expect_near(c.run(merge_ties), {0.5f, -0.7f, 0.9f, 0.4f, -1.1f});
}

TEST(MergeTies, AllSignsAgreeNoTrimIsMeanAndSumIsTaskArithmetic) {
  Case c = Case::from_taus({0, 0, 0}, {{1, -2, 0.5f}, {3, -4, 1.5f}});
  expect_near(c.run(merge_ties), {2, -3, 1});
  c.global.divisor = MergeDivisor::kNone;
  expect_near(c.run(merge_ties), {4, -6, 2});
}

TEST(MergeTies, TiesInMagnitudeKeepTheLowerIndex) {
  Case c = Case::from_taus({0, 0, 0, 0}, {{0.5f, -0.5f, 0.5f, 0.1f}});
  c.set_density(0.5f);
  expect_near(c.run(merge_ties), {0.5f, -0.5f, 0, 0});
  c.set_density(0.75f);
  expect_near(c.run(merge_ties), {0.5f, -0.5f, 0.5f, 0});
}

TEST(MergeTies, ZerosInTaskVectors) {
  Case c = Case::from_taus({1, 1, 1, 1}, {{0, 0, 0.25f, 0}, {0, 0, 0, 0}});
  c.set_density(0.5f);
  expect_near(c.run(merge_ties), {1, 1, 1.25f, 1});
}

TEST(MergeTies, NegativeWeightsAndMajorityFill) {
  // c1 = [1, 2], c2 = -[1, -1] = [-1, 1]: mass [0, 3].
  Case c = Case::from_taus({0, 0}, {{1, 2}, {1, -1}});
  c.params[1].weight = -1;
  // mergekit: coordinate 0 elects + (sum >= 0), c1 agrees: 1 / w1 = 1; coordinate 1: both agree,
  // (2 + 1) / (w1 + w2) = 3 / 0, and a zero divisor is 1: 3.
  expect_near(c.run(merge_ties), {1, 3});
  // taskvec's rules: the majority sign (+) and / sum |w|: 1 / 1, 3 / 2.
  c.global.sign_tie_majority = true;
  c.global.divisor = MergeDivisor::kAbsWeights;
  expect_near(c.run(merge_ties), {1, 1.5f});
}

TEST(MergeTies, MajorityFillPicksTheAgreeingSurvivor) {
  Case c = Case::from_taus({0, 0, 0}, {{0.5f, 1, 1}, {-0.5f, 0, 0}});
  expect_near(c.run(merge_ties), {0.5f, 1, 1});
  Case d = Case::from_taus({0, 0, 0}, {{0.5f, -1, -1}, {-0.5f, 0, 0}});
  expect_near(d.run(merge_ties), {0.5f, -1, -1});  // mergekit: a zero sum elects +
  d.global.sign_tie_majority = true;
  expect_near(d.run(merge_ties), {-0.5f, -1, -1});  // the tensor's majority sign is -
}

TEST(MergeTies, AllSignsCancellingLeavesTheBase) {
  Case c = Case::from_taus({1, 2, 3}, {{1, -2, 3}, {-1, 2, -3}});
  expect_near(c.run(merge_ties), {2, 4, 6});  // mergekit: every sum is 0, + wins, the positive delta stays
  c.global.sign_tie_majority = true;          // no majority sign: nothing agrees
  expect_near(c.run(merge_ties), {1, 2, 3});
}

TEST(MergeTies, AllZeroDeltasLeaveTheBaseUnchanged) {
  Case c = Case::from_taus({1.5f, -2, 3}, {{0, 0, 0}, {0, 0, 0}});
  for (float d : {0.2f, 0.5f, 1.0f}) {
    c.set_density(d);
    EXPECT_EQ(c.run(merge_ties), c.base);
    EXPECT_EQ(c.run(merge_dare_ties), c.base);
    EXPECT_EQ(c.run(merge_breadcrumbs_ties), c.base);
  }
}

TEST(MergeTies, DensityThatRemovesEverythingGivesTheBaseAndNoNan) {
  Case c = Case::from_taus({1, 2, 3, 4}, {{1, 1, 1, 1}, {2, 2, 2, 2}});
  c.set_density(0.1f);  // round(0.4) = 0 kept
  const auto out = c.run(merge_ties);
  expect_finite(out);
  EXPECT_EQ(out, c.base);
  expect_finite(c.run(merge_magnitude_prune));
  expect_finite(c.run(merge_breadcrumbs));
}

TEST(MergeTies, DensityOneOneModelIsTaskArithmetic) {
  Case c = random_case(999, 1, 11);
  EXPECT_EQ(c.run(merge_ties), c.run(merge_task_arithmetic));
  c.global.lambda = 0.7f;
  EXPECT_EQ(c.run(merge_ties), c.run(merge_task_arithmetic));
}

TEST(MergeTies, TrimModelWithoutThresholdsIsAnError) {
  Case c = worked_example();
  c.global.trim_model = true;
  EXPECT_THROW(c.run(merge_ties), Error);
}

TEST(MagnitudeThreshold, KeepsTiesAndHandlesEmptyKeep) {
  std::vector<float> v = {0.1f, -0.7f, 0.3f, 0.3f, -0.2f};
  MagnitudeThreshold th(0.4);  // k = 2: second largest |v| = 0.3
  th.add(v);
  th.next_pass();
  th.add(v);
  th.next_pass();
  EXPECT_FLOAT_EQ(th.threshold(), 0.3f);
  MagnitudeThreshold none(0.01);
  none.add(v);
  EXPECT_FALSE(none.next_pass());
  EXPECT_TRUE(std::isinf(none.threshold()));
}

TEST(MergeKeepCount, FloorsAsMergekitOrRoundsHalfUp) {
  EXPECT_EQ(merge_keep_count(0.4, 5), 2u);
  EXPECT_EQ(merge_keep_count(0.1, 5), 0u);   // int(0.5) = 0
  EXPECT_EQ(merge_keep_count(0.39, 10), 3u);
  EXPECT_EQ(merge_keep_count(0.1, 5, true), 1u);   // 0.5 -> 1
  EXPECT_EQ(merge_keep_count(0.39, 10, true), 4u);
  EXPECT_EQ(merge_keep_count(0.1, 4, true), 0u);
  EXPECT_EQ(merge_keep_count(1.0, 7), 7u);
  EXPECT_EQ(merge_keep_count(1.5, 7), 7u);
  EXPECT_EQ(merge_keep_count(0.0, 7), 0u);
}

// ---------------- DARE ----------------

TEST(MergeDare, DensityOneIsTaskArithmeticExactly) {
  Case c = random_case(4096, 3, 5);
  c.params[1].weight = -0.5f;
  c.global.lambda = 0.3f;
  EXPECT_EQ(c.run(merge_dare_linear), c.run(merge_task_arithmetic));
  EXPECT_EQ(c.run(merge_dare_ties), c.run(merge_ties));
}

TEST(MergeDare, KeptFractionMatchesDensity) {
  const std::size_t n = 1'000'000;
  for (float density : {0.1f, 0.3f, 0.9f}) {
    std::vector<float> tau(n, 1.0f);
    dare_drop(tau, merge_rng_key(42, "layers.3.w", 1), 0, density, false);
    std::size_t kept = 0;
    for (float x : tau) kept += x != 0;
    const double frac = static_cast<double>(kept) / n;
    const double sigma = std::sqrt(density * (1.0 - density) / n);
    EXPECT_NEAR(frac, density, 6 * sigma) << density;
  }
}

TEST(MergeDare, SurvivorsAreRescaledOrDropped) {
  Case c = Case::from_taus(std::vector<float>(64, 1.0f), {std::vector<float>(64, 0.5f)});
  c.set_density(0.25f);
  c.global.rescale = MergeRescale::kInverseDensity;
  int kept = 0;
  for (float x : c.run(merge_dare_linear)) {
    EXPECT_TRUE(x == 1.0f || x == 3.0f) << x;  // 1 + 0.5 / 0.25
    kept += x == 3.0f;
  }
  EXPECT_GT(kept, 0);
  EXPECT_LT(kept, 64);
  c.global.rescale = MergeRescale::kNone;
  for (float x : c.run(merge_dare_linear)) EXPECT_TRUE(x == 1.0f || x == 1.5f);
  // mergekit's rescale: one factor |tau|_1 / |kept|_1 = 64 / kept for the tensor.
  c.global.rescale = MergeRescale::kL1Norm;
  const float scaled = 1.0f + 0.5f * (64.0f * 0.5f / (static_cast<float>(kept) * 0.5f));
  for (float x : c.run(merge_dare_linear)) EXPECT_TRUE(x == 1.0f || std::fabs(x - scaled) < 1e-6f) << x << " " << scaled;
}

TEST(MergeDare, MonteCarloMeanOverSeedsIsTheTaskVector) {
  Case c = worked_example();
  c.set_density(0.5f);
  c.global.rescale = MergeRescale::kInverseDensity;  // the paper's rule: unbiased per element
  const int seeds = 4000;
  std::vector<double> mean(5, 0.0);
  for (int s = 0; s < seeds; ++s) {
    c.global.seed = static_cast<std::uint64_t>(s);
    const auto out = c.run(merge_dare_linear);
    for (int i = 0; i < 5; ++i) mean[i] += out[i] / seeds;
  }
  // E = sum of the three task vectors; each dropped term has sd |tau|, so the mean's sd <= 1.2/sqrt(4000).
  const std::vector<float> ta = {0.2f, -0.6f, 0.7f, 0.3f, -0.2f};
  for (int i = 0; i < 5; ++i) EXPECT_NEAR(mean[i], ta[i], 5 * 1.2 / std::sqrt(seeds)) << i;
}

TEST(MergeDare, IndependentOfChunking) {
  const auto tau = random_vector(10'007, 9);
  const std::uint64_t key = merge_rng_key(7, "blocks.2.attn", 0);
  std::vector<float> whole = tau;
  dare_drop(whole, key, 0, 0.3f, true);
  for (std::size_t chunk : {1u, 7u, 1000u, 4096u}) {
    std::vector<float> parts = tau;
    for (std::size_t at = 0; at < parts.size(); at += chunk) {
      const std::size_t len = std::min(chunk, parts.size() - at);
      dare_drop(std::span<float>(parts).subspan(at, len), key, at, 0.3f, true);
    }
    EXPECT_EQ(parts, whole) << chunk;
  }
}

TEST(MergeDare, KernelMasksAreTheChunkApiMasks) {
  // The kernel tests u < density in integers; dare_drop in double: both must draw the same masks,
  // also for a chunk that starts inside the tensor (first_index).
  const auto tau = random_vector(5000, 12);
  for (float density : {0.3f, 1e-3f, 0.999f}) {
    Case c = Case::from_taus(std::vector<float>(tau.size(), 0.0f), {tau});
    c.name = "blocks.4.mlp";
    c.global.seed = 77;
    c.global.rescale = MergeRescale::kInverseDensity;
    c.set_density(density);
    std::vector<float> want = tau;
    dare_drop(want, merge_rng_key(77, "blocks.4.mlp", 0), 0, density, true);
    EXPECT_EQ(c.run(merge_dare_linear), want) << density;

    std::vector<float> tail(tau.begin() + 1000, tau.end());
    dare_drop(tail, merge_rng_key(77, "blocks.4.mlp", 0), 1000, density, true);
    std::vector<std::span<const float>> spans = {std::span<const float>(c.models[0]).subspan(1000)};
    const std::vector<std::uint64_t> shape = {tau.size() - 1000};
    MergeTensor in;
    in.name = c.name;
    in.shape = shape;
    in.base = std::span<const float>(c.base).subspan(1000);
    in.models = spans;
    in.model_params = c.params;
    in.global = c.global;
    in.first_index = 1000;
    std::vector<float> out(tail.size());
    merge_dare_linear(in, out);
    EXPECT_EQ(out, tail) << density;
  }
}

TEST(MergeDare, MasksDependOnSeedTensorAndModel) {
  const auto k0 = merge_rng_key(1, "a", 0);
  EXPECT_NE(k0, merge_rng_key(2, "a", 0));
  EXPECT_NE(k0, merge_rng_key(1, "b", 0));
  EXPECT_NE(k0, merge_rng_key(1, "a", 1));
  EXPECT_EQ(k0, merge_rng_key(1, "a", 0));
  for (std::uint64_t i = 0; i < 1000; ++i) {
    const double u = merge_rng_uniform(k0, i);
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
  }
}

TEST(MergeDare, TinyDensityGivesNoNan) {
  Case c = random_case(100, 2, 8);
  c.set_density(1e-7f);
  expect_finite(c.run(merge_dare_linear));
  expect_finite(c.run(merge_dare_ties));
}

// ---------------- Breadcrumbs / magnitude pruning ----------------

TEST(MergeBreadcrumbs, DropsOutliersAndSmallEntries) {
  Case c = Case::from_taus(std::vector<float>(10, 0.0f),
                           {{0.9f, -0.1f, 0.5f, -0.3f, 0.05f, 0.7f, -0.2f, 0.0f, 0.4f, 0.6f}});
  c.params[0].gamma = 0.1f;    // drops 0.9
  c.params[0].density = 0.3f;  // keeps 0.7, 0.6, 0.5
  expect_near(c.run(merge_breadcrumbs), {0, 0, 0.5f, 0, 0, 0.7f, 0, 0, 0, 0.6f});
}

TEST(MergeBreadcrumbs, TwoModelsLinearAndTies) {
  Case c = Case::from_taus({0, 0, 0, 0}, {{0.9f, -0.5f, 0.3f, 0.1f}, {-0.2f, 0.8f, -0.4f, 0.05f}});
  for (auto& p : c.params) {
    p.gamma = 0.25f;  // one outlier per model
    p.density = 0.5f;
  }
  // masked: [0, -0.5, 0.3, 0] and [-0.2, 0, -0.4, 0]
  expect_near(c.run(merge_breadcrumbs), {-0.2f, -0.5f, -0.1f, 0});
  expect_near(c.run(merge_breadcrumbs_ties), {-0.2f, -0.5f, -0.4f, 0});
}

TEST(MergeBreadcrumbs, TensorSmallerThanOneOverGammaKeepsItsDelta) {
  Case c = Case::from_taus({0, 0, 0, 0, 0}, {{0.5f, -0.1f, 0.3f, 0.2f, -0.8f}});
  c.params[0].gamma = 0.01f;  // int(0.05) = 0 outliers
  c.params[0].density = 1.0f;
  expect_near(c.run(merge_breadcrumbs), {0.5f, -0.1f, 0.3f, 0.2f, -0.8f});
  // mergekit keeps sorted[n_bot:-0], nothing; taskvec keeps the int(0.4 * 5) = 2 largest and notes it.
  std::vector<std::string> notes;
  c.notes = &notes;
  c.params[0].density = 0.4f;
  expect_near(c.run(merge_breadcrumbs), {0.5f, 0, 0, 0, -0.8f});
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_NE(notes[0].find("mergekit keeps nothing"), std::string::npos) << notes[0];
  // density >= 1 keeps everything, outliers included (mergekit returns the tensor untouched)
  c.params[0].gamma = 0.2f;
  c.params[0].density = 1.0f;
  expect_near(c.run(merge_breadcrumbs), {0.5f, -0.1f, 0.3f, 0.2f, -0.8f});
  // int(0.8 * 5) = 4 kept after int(0.2 * 5) = 1 outlier
  c.params[0].density = 0.8f;
  expect_near(c.run(merge_breadcrumbs), {0.5f, -0.1f, 0.3f, 0.2f, 0});
  // gamma + density > 1: fewer outliers, so that int(0.9 * 5) = 4 are kept
  c.params[0].gamma = 0.4f;
  c.params[0].density = 0.9f;
  expect_near(c.run(merge_breadcrumbs), {0.5f, -0.1f, 0.3f, 0.2f, 0});
}

TEST(MergeMagnitudePrune, KeepsLargestAndOptionallyRescales) {
  Case c = Case::from_taus({0, 0, 0, 0}, {{0.9f, -0.5f, 0.3f, 0.1f}});
  c.set_density(0.5f);
  c.global.rescale = MergeRescale::kNone;
  expect_near(c.run(merge_magnitude_prune), {0.9f, -0.5f, 0, 0});
  c.global.rescale = MergeRescale::kInverseDensity;
  expect_near(c.run(merge_magnitude_prune), {1.8f, -1.0f, 0, 0});
}

// ---------------- DELLA ----------------

TEST(MergeDella, EpsilonZeroIsDareTies) {
  Case c = random_case(2048, 3, 21);
  c.shape = {32, 64};
  c.set_density(0.4f);
  for (auto& p : c.params) p.epsilon = 0.0f;
  EXPECT_EQ(c.run(merge_della), c.run(merge_dare_ties));
  c.set_density(1.0f);
  EXPECT_EQ(c.run(merge_della), c.run(merge_ties));
}

TEST(MergeDella, LargerMagnitudesAreKeptMoreOften) {
  // One model, rows of 100 entries with magnitudes 1..100: keep probability rises from 0.3 to 0.7.
  const std::size_t rows = 400, cols = 100;
  Case c;
  c.shape = {rows, cols};
  c.base.assign(rows * cols, 0.0f);
  std::vector<float> m(rows * cols);
  for (std::size_t r = 0; r < rows; ++r)
    for (std::size_t j = 0; j < cols; ++j) m[r * cols + j] = static_cast<float>((j * 37 + r) % cols + 1);
  c.models = {m};
  c.params = {MergeModelParams{}};
  c.params[0].density = 0.5f;
  c.params[0].epsilon = 0.2f;
  c.global.rescale = MergeRescale::kNone;
  const auto out = c.run(merge_della);
  double small_kept = 0, large_kept = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (out[i] != 0) {
      EXPECT_EQ(out[i], m[i]);
    }
    (m[i] <= 50 ? small_kept : large_kept) += out[i] != 0;
  }
  // expected fractions: 0.3 + 0.2 * mean rank / 99 ~ 0.399 and ~ 0.601 over 20000 entries each
  EXPECT_NEAR(small_kept / 20000, 0.399, 0.02);
  EXPECT_NEAR(large_kept / 20000, 0.601, 0.02);
}

TEST(MergeDella, EpsilonOutsideRangeIsAnError) {
  Case c = worked_example();
  c.set_density(0.1f);
  for (auto& p : c.params) p.epsilon = 0.2f;
  EXPECT_THROW(c.run(merge_della), Error);
}

// A plain reference for the magnitude bands: stable sort by |tau| descending (ties keep index order),
// keep ranks [top, top + keep). Independent of the kernels' radix select.
std::vector<float> reference_band(const std::vector<float>& tau, std::size_t top, std::size_t keep) {
  std::vector<std::size_t> idx(tau.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) { return std::fabs(tau[a]) > std::fabs(tau[b]); });
  std::vector<float> out(tau.size(), 0.0f);
  for (std::size_t r = top; r < std::min(tau.size(), top + keep); ++r) out[idx[r]] = tau[idx[r]];
  return out;
}

TEST(MergeBands, MatchAPlainSortOnTiedRandomValues) {
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> q(-6, 6);  // few distinct magnitudes: many ties
  for (std::size_t n : {1u, 7u, 100u, 1001u, 70000u}) {
    std::vector<float> tau(n);
    for (auto& x : tau) x = 0.125f * static_cast<float>(q(gen));
    for (float density : {0.05f, 0.2f, 0.5f, 0.9f, 1.0f}) {
      for (float gamma : {0.0f, 0.01f, 0.1f}) {
        Case c = Case::from_taus(std::vector<float>(n, 0.0f), {tau});
        c.params[0].density = density;
        c.params[0].gamma = gamma;
        // mergekit's magnitude_outliers counts, computed here independently of merge_breadcrumbs_band.
        std::size_t keep = n, top = 0;
        if (density < 1) {
          keep = static_cast<std::size_t>(std::floor(static_cast<double>(density) * static_cast<double>(n)));
          top = static_cast<std::size_t>(std::floor(static_cast<double>(gamma) * static_cast<double>(n)));
          if (top + keep > n) top = n - keep;
        }
        EXPECT_EQ(c.run(merge_breadcrumbs), reference_band(tau, top, keep)) << n << " " << density << " " << gamma;
        if (gamma == 0.0f) {  // no outliers: the band is the top-k of ties and magnitude_prune
          EXPECT_EQ(c.run(merge_ties), reference_band(tau, 0, keep)) << n << " " << density;
          c.global.rescale = MergeRescale::kNone;
          EXPECT_EQ(c.run(merge_magnitude_prune), reference_band(tau, 0, keep)) << n << " " << density;
        }
      }
    }
  }
}

// ---------------- Model Stock / SLERP ----------------

TEST(MergeModelStock, OrthogonalGivesBaseParallelGivesAverage) {
  Case c = Case::from_taus({1, 1}, {{1, 0}, {0, 1}});
  expect_near(c.run(merge_model_stock), {1, 1});
  Case d = Case::from_taus({1, 1}, {{1, 2}, {1, 2}});
  expect_near(d.run(merge_model_stock), {2, 3});
}

TEST(MergeModelStock, AngleOf45Degrees) {
  // cos = 1/sqrt2, t = 2c / (1 + c) = 2 (sqrt2 - 1); mean theta = [1, 0.5]
  Case c = Case::from_taus({0, 0}, {{1, 0}, {1, 1}});
  const float t = 2.0f * (std::sqrt(2.0f) - 1.0f);
  expect_near(c.run(merge_model_stock), {t, 0.5f * t}, 1e-5f);
}

TEST(MergeModelStock, OpposedAndZeroDeltasFallBackToBase) {
  Case c = Case::from_taus({3, 4}, {{1, 0}, {-1, 0}});
  expect_near(c.run(merge_model_stock), {3, 4});
  Case z = Case::from_taus({3, 4}, {{0, 0}, {0, 0}});
  expect_near(z.run(merge_model_stock), {3, 4});
}

TEST(MergeSlerp, EndpointsMidpointAndParallelFallback) {
  Case c = Case::from_taus({0, 0}, {{1, 0}, {0, 1}});
  c.base.clear();
  c.global.t = 0;
  EXPECT_EQ(c.run(merge_slerp), c.models[0]);
  c.global.t = 1;
  EXPECT_EQ(c.run(merge_slerp), c.models[1]);
  c.global.t = 0.5f;
  const float h = std::sqrt(0.5f);
  expect_near(c.run(merge_slerp), {h, h});
  Case p = Case::from_taus({0, 0}, {{1, 2}, {2, 4}});
  p.base.clear();
  p.global.t = 0.25f;
  expect_near(p.run(merge_slerp), {1.25f, 2.5f});
  Case z = Case::from_taus({0, 0}, {{0, 0}, {2, 4}});
  z.base.clear();
  z.global.t = 0.5f;
  expect_near(z.run(merge_slerp), {1, 2});
}

TEST(MergeSlerp, RandomEndpointsAreExact) {
  Case c = random_case(300, 2, 4);
  c.base.clear();
  c.global.t = 0;
  EXPECT_EQ(c.run(merge_slerp), c.models[0]);
  c.global.t = 1;
  EXPECT_EQ(c.run(merge_slerp), c.models[1]);
}

TEST(MergeSlerp, NeedsExactlyTwoModels) {
  Case c = Case::from_taus({0, 0}, {{1, 0}});
  c.base.clear();
  EXPECT_THROW(c.run(merge_slerp), Error);
}

// ---------------- Consensus ----------------

TEST(MergeConsensus, TallMasksAndK) {
  // tau_MTL = [2.1, 0.1, 0.4]; with lambda_t = 0.5 the votes are [2, 2, 1].
  Case c = Case::from_taus({0, 0, 0}, {{1, 0.5f, 0}, {1, -0.4f, 0.1f}, {0.1f, 0, 0.3f}});
  for (auto& p : c.params) p.tall_lambda = 0.5f;
  c.global.k = 2;
  expect_near(c.run(merge_consensus), {2.1f, 0.1f, 0});
  c.global.k = 1;
  expect_near(c.run(merge_consensus), {2.1f, 0.1f, 0.4f});
  c.global.k = 0;  // task arithmetic
  expect_near(c.run(merge_consensus), c.run(merge_task_arithmetic));
  c.global.k = 3;
  expect_near(c.run(merge_consensus), {0, 0, 0});
  c.global.k = 2;
  c.global.lambda = 0.5f;
  expect_near(c.run(merge_consensus), {1.05f, 0.05f, 0});
}

// ---------------- input checks ----------------

TEST(MergeKernels, InconsistentInputsAreErrors) {
  Case c = worked_example();
  c.models[1].pop_back();
  EXPECT_THROW(c.run(merge_task_arithmetic), Error);
  Case d = worked_example();
  d.base.clear();
  EXPECT_THROW(d.run(merge_ties), Error);
  Case e = worked_example();
  e.params.pop_back();
  EXPECT_THROW(e.run(merge_linear), Error);
}

}  // namespace
}  // namespace taskvec
