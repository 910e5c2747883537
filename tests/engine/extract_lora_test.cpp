// LoRA extraction (extract_lora) and the truncated SVD under it. Expected values are independent of
// the code under test: matrices built from known singular values (orthonormal vectors made by
// Gram-Schmidt here), closed forms for diagonal task vectors, products B A computed in the test.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "../src/engine/svd.hpp"
#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"
#include "taskvec/lora.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::TempDir;
using test::TensorValues;
using test::write_model;

Error error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e;
  }
  return Error(ErrorCode::kInternal, "no error where one was expected");
}

// k orthonormal vectors of length n (rows of the result, row-major k x n), by modified Gram-Schmidt
// (twice, for orthogonality to rounding) of Gaussian vectors.
std::vector<double> orthonormal_rows(int k, int n, std::mt19937_64& gen) {
  std::normal_distribution<double> normal;
  std::vector<double> q(static_cast<std::size_t>(k) * n);
  for (auto& v : q) v = normal(gen);
  for (int i = 0; i < k; ++i) {
    double* row = &q[static_cast<std::size_t>(i) * n];
    for (int pass = 0; pass < 2; ++pass) {
      for (int j = 0; j < i; ++j) {
        const double* prev = &q[static_cast<std::size_t>(j) * n];
        double dot = 0;
        for (int c = 0; c < n; ++c) dot += row[c] * prev[c];
        for (int c = 0; c < n; ++c) row[c] -= dot * prev[c];
      }
    }
    double norm = 0;
    for (int c = 0; c < n; ++c) norm += row[c] * row[c];
    norm = std::sqrt(norm);
    for (int c = 0; c < n; ++c) row[c] /= norm;
  }
  return q;
}

// m x n = sum_k sigma_k u_k v_k^T with orthonormal u_k (length m) and v_k (length n).
std::vector<double> with_spectrum(int m, int n, const std::vector<double>& sigma, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  const int k = static_cast<int>(sigma.size());
  const auto u = orthonormal_rows(k, m, gen), v = orthonormal_rows(k, n, gen);
  std::vector<double> a(static_cast<std::size_t>(m) * n, 0.0);
  for (int t = 0; t < k; ++t)
    for (int i = 0; i < m; ++i) {
      const double f = sigma[t] * u[static_cast<std::size_t>(t) * m + i];
      for (int j = 0; j < n; ++j) a[static_cast<std::size_t>(i) * n + j] += f * v[static_cast<std::size_t>(t) * n + j];
    }
  return a;
}

double frobenius_of_difference(const std::vector<double>& a, const detail::TruncatedSvd& s) {
  double err = 0;
  for (int i = 0; i < s.m; ++i)
    for (int j = 0; j < s.n; ++j) {
      double v = 0;
      for (int k = 0; k < s.rank; ++k) v += s.u[static_cast<std::size_t>(i) * s.rank + k] * s.s[k] * s.vt[static_cast<std::size_t>(k) * s.n + j];
      const double d = a[static_cast<std::size_t>(i) * s.n + j] - v;
      err += d * d;
    }
  return std::sqrt(err);
}

// ---- truncated SVD ----

TEST(Svd, RandomizedMatchesKnownDecayingSpectrum) {
  const int m = 600, n = 900, rank = 20;
  std::vector<double> sigma(80);
  for (int k = 0; k < 80; ++k) sigma[k] = 10.0 * std::pow(0.7, k);
  const auto a = with_spectrum(m, n, sigma, 7);
  detail::SvdOptions opt;
  opt.method = detail::SvdMethod::kRandomized;
  const auto r = detail::truncated_svd(a, m, n, rank, opt);
  ASSERT_TRUE(r.randomized);
  ASSERT_EQ(r.rank, rank);
  // HMT bound for q = 2, p = 10: relative error of sigma_k ~ (sigma_{l+1} / sigma_k)^(2q+1) <= 0.7^50 ~ 2e-8.
  for (int k = 0; k < rank; ++k) EXPECT_NEAR(r.s[k], sigma[k], 1e-7 * sigma[k]) << k;
  double tail = 0;
  for (int k = rank; k < 80; ++k) tail += sigma[k] * sigma[k];
  EXPECT_NEAR(frobenius_of_difference(a, r), std::sqrt(tail), 1e-6 * std::sqrt(tail));

  opt.method = detail::SvdMethod::kExact;
  const auto e = detail::truncated_svd(a, m, n, rank, opt);
  ASSERT_FALSE(e.randomized);
  ASSERT_EQ(e.all_s.size(), 600u);
  for (int k = 0; k < rank; ++k) EXPECT_NEAR(e.s[k], sigma[k], 1e-10 * sigma[0]) << k;
  for (int k = 0; k < rank; ++k) EXPECT_NEAR(r.s[k], e.s[k], 1e-7 * e.s[k]) << k;
  // Same input, same options: the same bits (fixed-seed test matrix).
  opt.method = detail::SvdMethod::kRandomized;
  const auto again = detail::truncated_svd(a, m, n, rank, opt);
  EXPECT_EQ(again.s, r.s);
  EXPECT_EQ(again.u, r.u);
}

TEST(Svd, WideAndTallAndAutoThreshold) {
  const std::vector<double> sigma{3, 2, 1};
  for (auto [m, n] : {std::pair{700, 550}, std::pair{550, 700}}) {
    const auto a = with_spectrum(m, n, sigma, 3);
    const auto r = detail::truncated_svd(a, m, n, 3);  // auto: min(m, n) > 512 and 2 (3 + 10) < 550
    EXPECT_TRUE(r.randomized);
    for (int k = 0; k < 3; ++k) EXPECT_NEAR(r.s[k], sigma[k], 1e-10);
    EXPECT_LT(frobenius_of_difference(a, r), 1e-10);
  }
  const auto small = with_spectrum(100, 40, sigma, 4);
  EXPECT_FALSE(detail::truncated_svd(small, 100, 40, 3).randomized);  // min(m, n) <= 512: exact
  // rank larger than min(m, n) is clamped
  EXPECT_EQ(detail::truncated_svd(small, 100, 40, 1000).rank, 40);
}

// ---- extract_lora ----

// Row-major product of b (m x r) and a (r x n).
std::vector<double> product(const std::vector<double>& b, const std::vector<double>& a, std::size_t m, std::size_t r,
                            std::size_t n) {
  std::vector<double> c(m * n, 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t k = 0; k < r; ++k)
      for (std::size_t j = 0; j < n; ++j) c[i * n + j] += b[i * r + k] * a[k * n + j];
  return c;
}

std::vector<double> gaussian(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<double> v(n);
  for (auto& x : v) x = scale * normal(gen);
  return v;
}

double rel_frobenius(const std::vector<double>& x, const std::vector<double>& ref) {
  double d = 0, r = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    d += (x[i] - ref[i]) * (x[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return std::sqrt(d / r);
}

const LoraTensorReport* find_report(const LoraReport& r, const std::string& tensor) {
  for (const auto& t : r.tensors)
    if (t.tensor == tensor) return &t;
  return nullptr;
}

class ExtractLora : public ::testing::Test {
 protected:
  TempDir dir;
  LoraOptions options;
};

TEST_F(ExtractLora, ExactRankTaskVectorComesBack) {
  // tau = B A of rank 3 (48 x 40), in F64 inputs so tau is exact; factors written as F32.
  const std::size_t m = 48, n = 40, r = 3;
  const auto b = gaussian(m * r, 1), a = gaussian(r * n, 2);
  const auto tau = product(b, a, m, r, n);
  const auto base = gaussian(m * n, 3);
  std::vector<double> ft(m * n);
  for (std::size_t i = 0; i < ft.size(); ++i) ft[i] = base[i] + tau[i];
  // f64 rounding of base + tau: the task vector as the engine sees it is ft - base.
  std::vector<double> seen(m * n);
  for (std::size_t i = 0; i < ft.size(); ++i) seen[i] = ft[i] - base[i];
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  write_model(dir / "base.safetensors", {{name, DType::kF64, {m, n}, base}});
  write_model(dir / "ft.safetensors", {{name, DType::kF64, {m, n}, ft}});
  options.rank = 3;
  const auto report = extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"),
                                   dir / "adapter", options);
  const std::string p = "base_model.model.model.layers.0.self_attn.q_proj";
  EXPECT_EQ(test::read_dtype(dir / "adapter" / "adapter_model.safetensors", p + ".lora_A.weight"), DType::kF32);  // F64 inputs: F32 factors
  const auto la = read_values(dir / "adapter" / "adapter_model.safetensors", p + ".lora_A.weight");
  const auto lb = read_values(dir / "adapter" / "adapter_model.safetensors", p + ".lora_B.weight");
  ASSERT_EQ(la.size(), r * n);
  ASSERT_EQ(lb.size(), m * r);
  // Tolerance: F32 factors (relative rounding 6e-8 per entry) of a well-conditioned rank-3 product.
  EXPECT_LT(rel_frobenius(product(lb, la, m, r, n), seen), 1e-6);
  const auto* t = find_report(report, name);
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->kind, "lora");
  EXPECT_EQ(t->rank, 3);
  EXPECT_LT(t->relative_error, 1e-12);
  EXPECT_NEAR(t->energy_kept, 1.0, 1e-12);
  double norm2 = 0;
  for (double v : seen) norm2 += v * v;
  EXPECT_NEAR(t->tau_norm, std::sqrt(norm2), 1e-12 * std::sqrt(norm2));
  EXPECT_FALSE(t->randomized);
  EXPECT_EQ(report.r, 3);
}

TEST_F(ExtractLora, DiagonalErrorsRankPatternAndConfig) {
  // Module x: tau = diag(5, 4, 3, 2, 1) in a 6 x 5 matrix (singular values 5..1). Module y: 4 x 4
  // identity (singular values 1, 1, 1, 1). --rank 4 --sv-epsilon 0.5: x keeps sigma >= 2.5 -> 5, 4, 3
  // (rank 3); y keeps 4. Closed forms: x's error sqrt(2^2 + 1^2) / sqrt(55), energy 50 / 55.
  std::vector<double> x0(30), x1(30, 0.0), y0(16), y1(16, 0.0);
  for (std::size_t i = 0; i < 30; ++i) x0[i] = 0.25 * static_cast<double>(i % 7);  // exact in F32
  for (std::size_t i = 0; i < 16; ++i) y0[i] = -0.5 * static_cast<double>(i % 3);
  x1 = x0;
  y1 = y0;
  for (int k = 0; k < 5; ++k) x1[static_cast<std::size_t>(k) * 5 + k] += 5 - k;
  for (int k = 0; k < 4; ++k) y1[static_cast<std::size_t>(k) * 4 + k] += 1;
  const std::vector<double> norm0{1, 1, 1}, norm1{1, 1.5, 1};
  const std::vector<double> emb0(12, 0.5);
  std::vector<double> emb1 = emb0;
  emb1[4] = 2;
  const std::vector<double> bias0{0, 0, 0, 0, 0, 0}, bias1{0, 1, 0, 0, 0, -1};
  write_model(dir / "base.safetensors", {{"m.x.weight", DType::kF32, {6, 5}, x0},
                                         {"m.x.bias", DType::kF32, {6}, bias0},
                                         {"m.y.weight", DType::kF32, {4, 4}, y0},
                                         {"m.norm.weight", DType::kF32, {3}, norm0},
                                         {"m.embed_tokens.weight", DType::kF32, {4, 3}, emb0},
                                         {"m.same.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}},
                                         {"m.steps", DType::kI64, {1}, {3}}});
  write_model(dir / "ft.safetensors", {{"m.x.weight", DType::kF32, {6, 5}, x1},
                                       {"m.x.bias", DType::kF32, {6}, bias1},
                                       {"m.y.weight", DType::kF32, {4, 4}, y1},
                                       {"m.norm.weight", DType::kF32, {3}, norm1},
                                       {"m.embed_tokens.weight", DType::kF32, {4, 3}, emb1},
                                       {"m.same.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}},
                                       {"m.steps", DType::kI64, {1}, {4}}});
  options.rank = 4;
  options.sv_epsilon = 0.5;
  options.task_type = "CAUSAL_LM";
  const auto report = extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"),
                                   dir / "adapter", options);
  const auto* x = find_report(report, "m.x.weight");
  ASSERT_NE(x, nullptr);
  EXPECT_EQ(x->rank, 3);
  EXPECT_NEAR(x->relative_error, std::sqrt(5.0 / 55.0), 1e-12);
  EXPECT_NEAR(x->energy_kept, 50.0 / 55.0, 1e-12);
  EXPECT_NEAR(x->tau_norm, std::sqrt(55.0), 1e-12);
  const auto* y = find_report(report, "m.y.weight");
  ASSERT_NE(y, nullptr);
  EXPECT_EQ(y->rank, 4);
  EXPECT_NEAR(y->relative_error, 0.0, 1e-12);
  EXPECT_EQ(report.skipped_identical, std::vector<std::string>{"m.same.weight"});
  ASSERT_EQ(report.warnings.size(), 1u);  // the I64 tensor that changed
  EXPECT_NE(report.warnings[0].find("m.steps"), std::string::npos);

  // The factors of x give diag(5, 4, 3, 0, 0) back (F32 factors of exact small integers).
  const auto la = read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.m.x.lora_A.weight");
  const auto lb = read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.m.x.lora_B.weight");
  ASSERT_EQ(la.size(), 3u * 5);
  ASSERT_EQ(lb.size(), 6u * 3);
  const auto bx = product(lb, la, 6, 3, 5);
  for (std::size_t i = 0; i < 6; ++i)
    for (std::size_t j = 0; j < 5; ++j)
      EXPECT_NEAR(bx[i * 5 + j], (i == j && i < 3) ? 5.0 - static_cast<double>(i) : 0.0, 1e-5) << i << "," << j;
  // Bias of a LoRA module: its task vector as lora_B.bias; norm and embedding saved whole (fine-tuned values).
  EXPECT_EQ(read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.m.x.lora_B.bias"), bias1);
  EXPECT_EQ(read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.m.norm.weight"), norm1);
  EXPECT_EQ(read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.m.embed_tokens.weight"), emb1);

  // Exactly these keys, nothing else.
  const auto adapter = Checkpoint::open(dir / "adapter" / "adapter_model.safetensors");
  const std::vector<std::string> keys{"base_model.model.m.embed_tokens.weight", "base_model.model.m.norm.weight",
                                      "base_model.model.m.x.lora_A.weight",     "base_model.model.m.x.lora_B.bias",
                                      "base_model.model.m.x.lora_B.weight",     "base_model.model.m.y.lora_A.weight",
                                      "base_model.model.m.y.lora_B.weight"};
  EXPECT_EQ(adapter.tensor_names(), keys);
  EXPECT_EQ(adapter.metadata().at("format"), "pt");
  EXPECT_EQ(std::set<fs::path>({dir / "adapter" / "adapter_config.json", dir / "adapter" / "adapter_model.safetensors"}),
            std::set<fs::path>(fs::directory_iterator(dir / "adapter"), fs::directory_iterator()));

  const auto config = nlohmann::json::parse(test::read_file(dir / "adapter" / "adapter_config.json"));
  const nlohmann::json expected = {
      {"alpha_pattern", {{"m.x", 3}}},
      {"auto_mapping", nullptr},
      {"base_model_name_or_path", (dir / "base.safetensors").string()},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"init_lora_weights", true},
      {"layers_pattern", nullptr},
      {"layers_to_transform", nullptr},
      {"lora_alpha", 4},
      {"lora_bias", true},
      {"lora_dropout", 0.0},
      {"modules_to_save", {"m.embed_tokens", "m.norm"}},
      {"peft_type", "LORA"},
      {"r", 4},
      {"rank_pattern", {{"m.x", 3}}},
      {"revision", nullptr},
      {"target_modules", {"m.x", "m.y"}},
      {"task_type", "CAUSAL_LM"},
      {"use_dora", false},
      {"use_rslora", false},
  };
  EXPECT_EQ(config, expected) << config.dump(2);
  EXPECT_EQ(report.adapter_config, test::read_file(dir / "adapter" / "adapter_config.json"));
}

TEST_F(ExtractLora, EmbeddingLoraIsTransposedAsPeftExpects) {
  // tau of an embedding (10 rows x 6 cols) = c d^T (rank 1 after the epsilon); PEFT's embedding delta
  // is (lora_embedding_B @ lora_embedding_A)^T with A [r, rows] and B [cols, r].
  std::vector<double> e0(60, 0.0), e1(60);
  for (std::size_t i = 0; i < 10; ++i)
    for (std::size_t j = 0; j < 6; ++j) e1[i * 6 + j] = static_cast<double>(i + 1) * (static_cast<double>(j) - 2.5);
  write_model(dir / "base.safetensors", {{"model.embed_tokens.weight", DType::kF32, {10, 6}, e0}});
  write_model(dir / "ft.safetensors", {{"model.embed_tokens.weight", DType::kF32, {10, 6}, e1}});
  options.rank = 4;
  options.sv_epsilon = 1e-6;
  options.embed_lora = true;
  const auto report = extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"),
                                   dir / "adapter", options);
  ASSERT_EQ(report.tensors.size(), 1u);
  EXPECT_EQ(report.tensors[0].kind, "lora_embedding");
  EXPECT_EQ(report.tensors[0].rank, 1);
  const auto a = read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.model.embed_tokens.lora_embedding_A");
  const auto b = read_values(dir / "adapter" / "adapter_model.safetensors", "base_model.model.model.embed_tokens.lora_embedding_B");
  ASSERT_EQ(a.size(), 10u);  // [1, 10]
  ASSERT_EQ(b.size(), 6u);   // [6, 1]
  const auto ba = product(b, a, 6, 1, 10);  // (6 x 10); its transpose must be tau
  for (std::size_t i = 0; i < 10; ++i)
    for (std::size_t j = 0; j < 6; ++j) EXPECT_NEAR(ba[j * 10 + i], e1[i * 6 + j], 1e-5);
  const auto config = nlohmann::json::parse(test::read_file(dir / "adapter" / "adapter_config.json"));
  EXPECT_EQ(config["target_modules"], nlohmann::json({"model.embed_tokens"}));
  EXPECT_TRUE(config["modules_to_save"].is_null());
  EXPECT_EQ(config["r"], 1);
}

TEST_F(ExtractLora, RandomizedReportsErrorFromNorm) {
  // 600 x 560 > the exact threshold: the randomized SVD runs; a known spectrum 2^-k (k < 40) at rank 8:
  // error sqrt(sum_{k>=8} 4^-k) / sqrt(sum_k 4^-k), computed here.
  std::vector<double> sigma(40);
  double all = 0, tail = 0;
  for (int k = 0; k < 40; ++k) {
    sigma[k] = std::ldexp(1.0, -k);
    all += sigma[k] * sigma[k];
    if (k >= 8) tail += sigma[k] * sigma[k];
  }
  const auto tau = with_spectrum(600, 560, sigma, 11);
  write_model(dir / "base.safetensors", {{"l.w.weight", DType::kF64, {600, 560}, std::vector<double>(600 * 560, 0.0)}});
  write_model(dir / "ft.safetensors", {{"l.w.weight", DType::kF64, {600, 560}, tau}});
  options.rank = 8;
  const auto report = extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"),
                                   dir / "adapter", options);
  ASSERT_EQ(report.tensors.size(), 1u);
  EXPECT_TRUE(report.tensors[0].randomized);
  // ||tau||^2 - kept (cancellation: the error is ~1e-3 of the norm, so ~1e-13 absolute is plenty)
  EXPECT_NEAR(report.tensors[0].relative_error, std::sqrt(tail / all), 1e-6);
  EXPECT_NEAR(report.tensors[0].energy_kept, 1 - tail / all, 1e-10);
}

TEST_F(ExtractLora, SameBytesForAnyThreadCount) {
  std::vector<TensorValues> base, ft;
  for (int k = 0; k < 5; ++k) {
    const std::string name = "layers." + std::to_string(k) + ".proj.weight";
    const auto b = gaussian(30 * 20, 100 + k), d = gaussian(30 * 20, 200 + k, 0.1);
    std::vector<double> f(b.size());
    for (std::size_t i = 0; i < f.size(); ++i) f[i] = b[i] + d[i];
    base.push_back({name, DType::kF32, {30, 20}, b});
    ft.push_back({name, DType::kF32, {30, 20}, f});
  }
  write_model(dir / "base.safetensors", base);
  write_model(dir / "ft.safetensors", ft);
  options.rank = 4;
  std::vector<std::vector<std::uint8_t>> files;
  for (unsigned threads : {1u, 4u}) {
    options.threads = threads;
    const fs::path out = dir / ("a" + std::to_string(threads));
    extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"), out, options);
    files.push_back(test::file_bytes(out / "adapter_model.safetensors"));
  }
  EXPECT_EQ(files[0], files[1]);
}

TEST_F(ExtractLora, ShapeMismatchBeforeAnyOutput) {
  write_model(dir / "base.safetensors", {{"a.weight", DType::kF32, {2, 3}, {1, 2, 3, 4, 5, 6}},
                                         {"b.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
  write_model(dir / "ft.safetensors", {{"a.weight", DType::kF32, {2, 3}, {1, 2, 3, 4, 5, 7}},
                                       {"b.weight", DType::kF32, {4}, {1, 2, 3, 4}}});
  options.rank = 1;
  const Error e = error_of([&] {
    extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"), dir / "out",
                 options);
  });
  EXPECT_EQ(e.code(), ErrorCode::kShapeMismatch) << e.what();
  EXPECT_NE(std::string(e.what()).find("b.weight"), std::string::npos) << e.what();
  EXPECT_NE(std::string(e.what()).find("ft.safetensors"), std::string::npos) << e.what();
  EXPECT_FALSE(fs::exists(dir / "out"));
  // A tensor only the fine-tune has, too.
  write_model(dir / "ft2.safetensors", {{"a.weight", DType::kF32, {2, 3}, {1, 2, 3, 4, 5, 7}},
                                        {"b.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}},
                                        {"c.weight", DType::kF32, {1}, {1}}});
  EXPECT_EQ(error_of([&] {
              extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft2.safetensors"),
                           dir / "out", options);
            }).code(),
            ErrorCode::kTensorMissing);
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST_F(ExtractLora, OutputIntoInputFolderRefused) {
  fs::create_directories(dir / "base");
  write_model(dir / "base" / "model.safetensors", {{"a.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
  write_model(dir / "ft.safetensors", {{"a.weight", DType::kF32, {2, 2}, {1, 2, 3, 5}}});
  options.rank = 1;
  for (const fs::path& out : {dir / "base", dir / "base" / "adapter"}) {
    const Error e = error_of(
        [&] { extract_lora(Checkpoint::open(dir / "base"), Checkpoint::open(dir / "ft.safetensors"), out, options); });
    EXPECT_EQ(e.code(), ErrorCode::kOutputExists) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir / "base" / "adapter"));
  EXPECT_FALSE(fs::exists(dir / "base" / "adapter_config.json"));
  // An existing adapter is replaced only with force.
  extract_lora(Checkpoint::open(dir / "base"), Checkpoint::open(dir / "ft.safetensors"), dir / "ad", options);
  EXPECT_EQ(error_of([&] {
              extract_lora(Checkpoint::open(dir / "base"), Checkpoint::open(dir / "ft.safetensors"), dir / "ad", options);
            }).code(),
            ErrorCode::kOutputExists);
  options.force = true;
  extract_lora(Checkpoint::open(dir / "base"), Checkpoint::open(dir / "ft.safetensors"), dir / "ad", options);
}

TEST_F(ExtractLora, ArgumentsChecked) {
  write_model(dir / "base.safetensors", {{"a.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
  write_model(dir / "ft.safetensors", {{"a.weight", DType::kF32, {2, 2}, {1, 2, 3, 4}}});
  const auto run = [&](const fs::path& out) {
    return error_of([&] {
             extract_lora(Checkpoint::open(dir / "base.safetensors"), Checkpoint::open(dir / "ft.safetensors"), out,
                          options);
           }).code();
  };
  options.rank = 0;
  EXPECT_EQ(run(dir / "o"), ErrorCode::kInvalidArgument);
  options.rank = 1;
  options.sv_epsilon = 1;
  EXPECT_EQ(run(dir / "o"), ErrorCode::kInvalidArgument);
  options.sv_epsilon = 0;
  EXPECT_EQ(run(dir / "o.safetensors"), ErrorCode::kInvalidArgument);
  EXPECT_EQ(run(dir / "o"), ErrorCode::kInvalidArgument);  // nothing differs
  options.out_dtype = DType::kF64;
  EXPECT_EQ(run(dir / "o"), ErrorCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(dir / "o"));
}

}  // namespace
}  // namespace taskvec
