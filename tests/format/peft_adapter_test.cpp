// PEFT LoRA adapters read as task vectors (src/format/peft_adapter.hpp). Every expected dW is computed
// here by explicit f64 loops over the factor values the test wrote, independently of the kernel.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../src/format/peft_adapter.hpp"
#include "support/builders.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"

namespace taskvec::peft {
namespace {

using test::FloatTensor;
using test::TempDir;

// The error thrown by `fn`, which must throw Error{code} with every one of `needles` in its message.
void expect_error(const std::function<void()>& fn, ErrorCode code, const std::vector<std::string>& needles) {
  try {
    fn();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "'" << n << "' not in: " << e.what();
    return;
  }
  ADD_FAILURE() << "no Error thrown";
}

std::string config_json(const std::string& extra = "", int r = 2, double alpha = 4) {
  return R"({"peft_type": "LORA", "r": )" + std::to_string(r) + R"(, "lora_alpha": )" + std::to_string(alpha) +
         R"(, "bias": "none", "target_modules": ["q_proj", "v_proj"])" + extra + "}";
}

std::filesystem::path write_adapter(const TempDir& dir, const std::string& config, const std::vector<FloatTensor>& tensors) {
  const auto folder = dir.subdir("adapter");
  test::write_file(folder / kAdapterConfigName, config);
  test::write_float_safetensors(folder / kAdapterSafetensorsName, tensors);
  return folder;
}

const AdapterTensor& find(const OpenedAdapter& a, const std::string& name) {
  for (const auto& t : a.tensors) {
    if (t.info.name == name) return t;
  }
  throw std::runtime_error("no tensor " + name);
}

std::vector<float> read_all(const AdapterTensor& t) {
  std::vector<float> out(t.info.num_bytes() / 4);
  t.source->read(t.info, 0, std::as_writable_bytes(std::span(out)));
  return out;
}

// dW[o][i] = s * sum_k B[o][k] * A[k][i] for A [r, in], B [out, r] row-major; as f32.
std::vector<float> expected_ba(const std::vector<float>& a, const std::vector<float>& b, std::size_t r, std::size_t in,
                               std::size_t out, double s, bool transpose) {
  std::vector<float> dw(in * out);
  for (std::size_t o = 0; o < out; ++o) {
    for (std::size_t i = 0; i < in; ++i) {
      double sum = 0;
      for (std::size_t k = 0; k < r; ++k) sum += static_cast<double>(b[o * r + k]) * a[k * in + i];
      const float v = static_cast<float>(s * sum);
      if (transpose) {
        dw[i * out + o] = v;
      } else {
        dw[o * in + i] = v;
      }
    }
  }
  return dw;
}

TensorInfo info(const std::string& name, std::vector<std::uint64_t> shape, DType dtype = DType::kF32) {
  TensorInfo t;
  t.name = name;
  t.dtype = dtype;
  t.shape = std::move(shape);
  std::uint64_t n = 1;
  for (auto d : t.shape) n *= d;
  t.data_end = n * dtype_bits(dtype) / 8;
  return t;
}

const std::vector<float> kA2x4 = {0.5f, -1.0f, 2.0f, 0.25f, 1.5f, 0.75f, -0.5f, 3.0f};  // [2, 4]
const std::vector<float> kB3x2 = {1.0f, -2.0f, 0.5f, 4.0f, -1.5f, 0.125f};              // [3, 2]

TEST(PeftAdapter, LinearDeltaIsScaledBTimesA) {
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(), {
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", DType::kF32, {3, 2}, kB3x2}});
  const OpenedAdapter a = open_adapter_folder(folder);
  ASSERT_EQ(a.tensors.size(), 1u);
  const auto& t = find(a, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(t.kind, AdapterTensor::Kind::kDelta);
  EXPECT_EQ(t.info.dtype, DType::kF32);
  EXPECT_EQ(t.info.shape, (std::vector<std::uint64_t>{3, 4}));
  ASSERT_TRUE(t.module.has_value());
  EXPECT_EQ(t.module->rank, 2u);
  EXPECT_EQ(t.module->scale, 2.0);  // alpha 4 / r 2
  EXPECT_EQ(t.source->format(), "lora");
  EXPECT_EQ(read_all(t), expected_ba(kA2x4, kB3x2, 2, 4, 3, 2.0, false));
  EXPECT_FALSE(a.mapping.adapter_name.has_value());
}

TEST(PeftAdapter, HalfPrecisionFactorsAreDecoded) {
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(), {
      {"base_model.model.q_proj.lora_A.weight", DType::kBF16, {2, 4}, kA2x4},
      {"base_model.model.q_proj.lora_B.weight", DType::kF16, {3, 2}, kB3x2}});
  const OpenedAdapter a = open_adapter_folder(folder);
  EXPECT_EQ(read_all(find(a, "q_proj.weight")), expected_ba(kA2x4, kB3x2, 2, 4, 3, 2.0, false));
}

TEST(PeftAdapter, RsLoraScaleIsAlphaOverSqrtR) {
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(R"(, "use_rslora": true)", 2, 3), {
      {"base_model.model.q_proj.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
      {"base_model.model.q_proj.lora_B.weight", DType::kF32, {3, 2}, kB3x2}});
  const OpenedAdapter a = open_adapter_folder(folder);
  const auto& t = find(a, "q_proj.weight");
  const double s = 3.0 / std::sqrt(2.0);
  EXPECT_DOUBLE_EQ(t.module->scale, s);
  const auto got = read_all(t);
  const auto want = expected_ba(kA2x4, kB3x2, 2, 4, 3, s, false);
  ASSERT_EQ(got.size(), want.size());
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-6 * std::abs(want[i]));
}

TEST(PeftAdapter, RankAndAlphaPatternsPerModuleFirstMatchInFileOrder) {
  // q_proj: rank 1 from the first matching key "q_proj" (the later, more specific key is never reached);
  // v_proj: default r 2, alpha 8 from alpha_pattern; o_proj: r 2 alpha 4.
  const std::string extra =
      R"(, "rank_pattern": {"q_proj": 1, "model.layers.0.self_attn.q_proj": 3}, "alpha_pattern": {"layers\\.\\d+\\.self_attn\\.v_proj": 8})";
  const std::vector<float> a1 = {1.0f, 2.0f, -3.0f, 0.5f};  // [1, 4]
  const std::vector<float> b1 = {2.0f, -1.0f, 0.25f};       // [3, 1]
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(extra), {
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", DType::kF32, {1, 4}, a1},
      {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", DType::kF32, {3, 1}, b1},
      {"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
      {"base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight", DType::kF32, {3, 2}, kB3x2},
      {"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
      {"base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight", DType::kF32, {3, 2}, kB3x2}});
  const OpenedAdapter a = open_adapter_folder(folder);
  const auto& q = find(a, "model.layers.0.self_attn.q_proj.weight");
  const auto& v = find(a, "model.layers.0.self_attn.v_proj.weight");
  const auto& o = find(a, "model.layers.0.self_attn.o_proj.weight");
  EXPECT_EQ(q.module->rank, 1u);
  EXPECT_EQ(q.module->scale, 4.0);  // alpha 4 / r 1
  EXPECT_EQ(v.module->scale, 4.0);  // alpha 8 / r 2
  EXPECT_EQ(o.module->scale, 2.0);  // alpha 4 / r 2
  EXPECT_EQ(read_all(q), expected_ba(a1, b1, 1, 4, 3, 4.0, false));
  EXPECT_EQ(read_all(v), expected_ba(kA2x4, kB3x2, 2, 4, 3, 4.0, false));
  EXPECT_EQ(read_all(o), expected_ba(kA2x4, kB3x2, 2, 4, 3, 2.0, false));
}

TEST(PeftAdapter, PatternMatchesAWholeTrailingModuleName) {
  const std::string m = "model.layers.0.self_attn.q_proj";
  EXPECT_TRUE(pattern_matches("q_proj", m, "t"));
  EXPECT_TRUE(pattern_matches("self_attn.q_proj", m, "t"));
  EXPECT_TRUE(pattern_matches(m, m, "t"));
  EXPECT_TRUE(pattern_matches("^model.layers.0.self_attn.q_proj", m, "t"));
  EXPECT_TRUE(pattern_matches("layers\\.\\d+\\.self_attn\\.(q|k)_proj", m, "t"));
  EXPECT_FALSE(pattern_matches("proj", m, "t"));      // not a whole component
  EXPECT_FALSE(pattern_matches("self_attn", m, "t"));  // must end the name
  EXPECT_FALSE(pattern_matches("layers.1.self_attn.q_proj", m, "t"));
  expect_error([] { (void)pattern_matches("q_(proj", "x", "cfg.json"); }, ErrorCode::kInvalidAdapter, {"cfg.json", "q_(proj"});
}

TEST(PeftAdapter, FanInFanOutTransposesTheDelta) {
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(R"(, "fan_in_fan_out": true)"), {
      {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
      {"base_model.model.transformer.h.0.attn.c_attn.lora_B.weight", DType::kF32, {3, 2}, kB3x2}});
  const OpenedAdapter a = open_adapter_folder(folder);
  const auto& t = find(a, "transformer.h.0.attn.c_attn.weight");
  EXPECT_TRUE(t.module->fan_in_fan_out);
  EXPECT_EQ(t.info.shape, (std::vector<std::uint64_t>{4, 3}));  // Conv1D weight: [in, out]
  EXPECT_EQ(read_all(t), expected_ba(kA2x4, kB3x2, 2, 4, 3, 2.0, true));
}

TEST(PeftAdapter, EmbeddingDeltaIsTransposedBTimesA) {
  // A [r=2, num_embeddings=5], B [embedding_dim=3, r=2]: dW [5, 3], dW[n][d] = s * sum_k B[d][k] A[k][n].
  const std::vector<float> a = {1, 2, 3, 4, 5, -1, 0.5f, 0, 2, -2};
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(R"(, "fan_in_fan_out": false)"), {
      {"base_model.model.model.embed_tokens.lora_embedding_A", DType::kF32, {2, 5}, a},
      {"base_model.model.model.embed_tokens.lora_embedding_B", DType::kF32, {3, 2}, kB3x2}});
  const OpenedAdapter opened = open_adapter_folder(folder);
  const auto& t = find(opened, "model.embed_tokens.weight");
  EXPECT_TRUE(t.module->is_embedding);
  EXPECT_EQ(t.info.shape, (std::vector<std::uint64_t>{5, 3}));
  std::vector<float> want(15);
  for (int n = 0; n < 5; ++n) {
    for (int d = 0; d < 3; ++d) {
      double sum = 0;
      for (int k = 0; k < 2; ++k) sum += static_cast<double>(kB3x2[d * 2 + k]) * a[k * 5 + n];
      want[n * 3 + d] = static_cast<float>(2.0 * sum);
    }
  }
  EXPECT_EQ(read_all(t), want);
}

TEST(PeftAdapter, ConvDeltaContractsTheRank) {
  // A [r=2, in=2, 1, 2], B [out=3, r=2, 1, 1]: dW[o][i][h][w] = s * sum_k B[o][k] A[k][i][h][w].
  const std::vector<float> a = {1, -1, 2, 0.5f, 3, 0.25f, -2, 1};
  TempDir dir;
  const auto folder = write_adapter(dir, config_json(), {
      {"base_model.model.conv.lora_A.weight", DType::kF32, {2, 2, 1, 2}, a},
      {"base_model.model.conv.lora_B.weight", DType::kF32, {3, 2, 1, 1}, kB3x2}});
  const OpenedAdapter opened = open_adapter_folder(folder);
  const auto& t = find(opened, "conv.weight");
  EXPECT_EQ(t.info.shape, (std::vector<std::uint64_t>{3, 2, 1, 2}));
  std::vector<float> want(12);
  for (int o = 0; o < 3; ++o) {
    for (int i = 0; i < 2; ++i) {
      for (int w = 0; w < 2; ++w) {
        double sum = 0;
        for (int k = 0; k < 2; ++k) sum += static_cast<double>(kB3x2[o * 2 + k]) * a[k * 4 + i * 2 + w];
        want[o * 4 + i * 2 + w] = static_cast<float>(2.0 * sum);
      }
    }
  }
  EXPECT_EQ(read_all(t), want);
}

TEST(PeftAdapter, EveryByteRangeMatchesTheWholeTensor) {
  // Ranges starting and ending mid-element and mid-row, direct and transposed.
  for (const bool fifo : {false, true}) {
    TempDir dir;
    const auto folder = write_adapter(dir, config_json(fifo ? R"(, "fan_in_fan_out": true)" : ""), {
        {"base_model.model.m.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
        {"base_model.model.m.lora_B.weight", DType::kF32, {3, 2}, kB3x2}});
    const OpenedAdapter opened = open_adapter_folder(folder);
    const auto& t = find(opened, "m.weight");
    const auto whole = expected_ba(kA2x4, kB3x2, 2, 4, 3, 2.0, fifo);
    const auto* bytes = reinterpret_cast<const std::byte*>(whole.data());
    for (std::uint64_t off = 0; off <= 48; ++off) {
      for (std::uint64_t len = 0; off + len <= 48; ++len) {
        std::vector<std::byte> got(len, std::byte{0xAB});
        t.source->read(t.info, off, got);
        // (memcmp of 0 bytes still needs non-null pointers: an empty vector's data() may be null.)
        ASSERT_TRUE(len == 0 || std::memcmp(got.data(), bytes + off, len) == 0)
            << "fifo " << fifo << " offset " << off << " length " << len;
      }
    }
    std::vector<std::byte> one(1);
    expect_error([&] { t.source->read(t.info, 48, one); }, ErrorCode::kInvalidArgument, {"m.weight"});
  }
}

TEST(PeftAdapter, ModulesToSaveAreFullTensorsUnderTheirBaseNames) {
  TempDir dir;
  const std::vector<float> w = {1, 2, 3, 4, 5, 6};
  const std::vector<float> bias = {-1, 7};
  const auto folder = write_adapter(dir, config_json(R"(, "modules_to_save": ["score"])"), {
      {"base_model.model.q_proj.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
      {"base_model.model.q_proj.lora_B.weight", DType::kF32, {3, 2}, kB3x2},
      {"base_model.model.score.weight", DType::kBF16, {2, 3}, w},
      {"base_model.model.score.bias", DType::kF32, {2}, bias}});
  const OpenedAdapter a = open_adapter_folder(folder);
  ASSERT_EQ(a.tensors.size(), 3u);
  const auto& sw = find(a, "score.weight");
  EXPECT_EQ(sw.kind, AdapterTensor::Kind::kFull);
  EXPECT_EQ(sw.info.dtype, DType::kBF16);
  std::vector<std::uint16_t> bits(6);
  sw.source->read(sw.info, 0, std::as_writable_bytes(std::span(bits)));
  for (int i = 0; i < 6; ++i) EXPECT_EQ(bf16_to_f32(bits[i]), w[i]);
  EXPECT_EQ(read_all(find(a, "score.bias")), bias);
}

TEST(PeftAdapter, InMemoryModulesToSaveKeyAndAdapterNamesAreAccepted) {
  TensorInfo a = info("model.q_proj.lora_A.default.weight", {2, 4});
  TensorInfo b = info("model.q_proj.lora_B.default.weight", {3, 2});
  TensorInfo s = info("base_model.model.score.modules_to_save.default.weight", {2, 3});
  const auto m = map_adapter_tensors(parse_adapter_config(config_json(), "c"), std::vector{a, b, s}, "w");
  ASSERT_EQ(m.modules.size(), 1u);
  EXPECT_EQ(m.modules[0].target, "model.q_proj.weight");  // no base_model.model. prefix: taken as is
  EXPECT_EQ(m.adapter_name, "default");
  ASSERT_EQ(m.full_tensors.size(), 1u);
  EXPECT_EQ(m.full_tensors[0].target, "score.weight");
  TensorInfo other = info("model.k_proj.lora_A.other.weight", {2, 4});
  TensorInfo other_b = info("model.k_proj.lora_B.other.weight", {3, 2});
  expect_error([&] { map_adapter_tensors(parse_adapter_config(config_json(), "c"), std::vector{a, b, other, other_b}, "w"); },
               ErrorCode::kInvalidAdapter, {"w:", "several adapters", "other"});
}

TEST(PeftAdapter, SavedEmbeddingBaseLayerIsAttachedToItsModule) {
  const std::vector<TensorInfo> t = {info("base_model.model.model.embed_tokens.lora_embedding_A", {2, 5}),
                                     info("base_model.model.model.embed_tokens.lora_embedding_B", {3, 2}),
                                     info("base_model.model.model.embed_tokens.base_layer.weight", {5, 3}),
                                     info("base_model.model.lm_head.weight", {5, 3})};
  const auto m = map_adapter_tensors(parse_adapter_config(config_json(), "c"), t, "w");
  ASSERT_EQ(m.modules.size(), 1u);
  EXPECT_EQ(m.modules[0].saved_base_name, "base_model.model.model.embed_tokens.base_layer.weight");
  ASSERT_EQ(m.full_tensors.size(), 1u);
  EXPECT_EQ(m.full_tensors[0].target, "lm_head.weight");
}

TEST(PeftAdapter, OrientToBaseFollowsTheBaseShape) {
  LoraModule m;
  m.target = "c_attn.weight";
  m.shape = {3, 4};
  orient_to_base(m, {3, 4}, "base");
  EXPECT_FALSE(m.fan_in_fan_out);
  orient_to_base(m, {4, 3}, "base");  // a Conv1D base with fan_in_fan_out false in the config
  EXPECT_TRUE(m.fan_in_fan_out);
  EXPECT_EQ(m.shape, (std::vector<std::uint64_t>{4, 3}));
  expect_error([&] { orient_to_base(m, {4, 4}, "base.safetensors"); }, ErrorCode::kShapeMismatch,
               {"base.safetensors", "c_attn.weight", "[4, 4]", "[4, 3]"});
}

TEST(PeftAdapter, ConfigRefusals) {
  struct Case {
    std::string json;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {R"({"peft_type": "IA3"})", {"IA3"}},
      {R"({"peft_type": "VERA", "r": 4})", {"VERA"}},
      {R"({"peft_type": "LOHA"})", {"LOHA"}},
      {R"({"r": 4})", {"peft_type"}},
      {config_json(R"(, "use_dora": true)"), {"DoRA"}},
      {R"({"peft_type": "LORA", "bias": "all"})", {"bias", "all"}},
      {R"({"peft_type": "LORA", "bias": "lora_only"})", {"lora_only"}},
      {config_json(R"(, "layer_replication": [[0, 4], [2, 5]])"), {"layer_replication"}},
      {config_json(R"(, "use_qalora": true)"), {"QALoRA"}},
      {config_json(R"(, "alora_invocation_tokens": [1, 2])"), {"aLoRA"}},
      {config_json(R"(, "target_parameters": ["experts.down_proj"])"), {"target_parameters"}},
      {config_json(R"(, "trainable_token_indices": [3])"), {"trainable_token_indices"}},
      {config_json(R"(, "init_lora_weights": "pissa_niter_4")"), {"pissa_niter_4", "residual"}},
      {config_json(R"(, "init_lora_weights": "loftq")"), {"loftq"}},
      {R"({"peft_type": "LORA", "r": 0})", {"\"r\"", "positive integer"}},
      {R"({"peft_type": "LORA", "r": 2.5})", {"\"r\""}},
      {R"({"peft_type": "LORA", "lora_alpha": "16"})", {"lora_alpha"}},
      {R"({"peft_type": "LORA", "use_rslora": "yes"})", {"use_rslora"}},
      {R"({"peft_type": "LORA", "rank_pattern": {"q_proj": -1}})", {"rank_pattern", "q_proj"}},
      {R"({"peft_type": "LORA", "rank_pattern": {"q_(proj": 4}})", {"q_(proj", "regular expression"}},
      {R"({"peft_type": "LORA", "r": 2, "r": 4})", {}},
      {"[1, 2]", {"not a JSON object"}},
      {"{\"peft_type\": ", {}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.json);
    auto needles = c.needles;
    needles.push_back("adapter_config.json");
    expect_error([&] { (void)parse_adapter_config(c.json, "adapter_config.json"); }, ErrorCode::kInvalidAdapter, needles);
  }
}

TEST(PeftAdapter, ConfigDefaultsAndIgnoredFields) {
  const auto c = parse_adapter_config(
      R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "lora_dropout": 0.05, "some_future_field": {"x": 1},
          "target_modules": "all-linear", "layer_replication": null, "init_lora_weights": "gaussian",
          "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})",
      "c");
  EXPECT_EQ(c.r, 8u);
  EXPECT_EQ(c.lora_alpha, 8.0);
  EXPECT_EQ(c.scale_for("anything"), 1.0);
  EXPECT_EQ(c.target_modules_regex, "all-linear");
  EXPECT_EQ(c.base_model_name_or_path, "meta-llama/Llama-3.2-1B");
  EXPECT_EQ(c.init_lora_weights, "gaussian");
}

TEST(PeftAdapter, TensorRefusals) {
  const AdapterConfig cfg = parse_adapter_config(config_json(), "c");
  const TensorInfo a = info("base_model.model.q_proj.lora_A.weight", {2, 4});
  const TensorInfo b = info("base_model.model.q_proj.lora_B.weight", {3, 2});
  struct Case {
    std::string what;
    std::vector<TensorInfo> tensors;
    std::vector<std::string> needles;
  };
  const std::vector<Case> cases = {
      {"rank differs from the config's r", {info("base_model.model.q_proj.lora_A.weight", {3, 4}), info("base_model.model.q_proj.lora_B.weight", {3, 3})}, {"lora_A.weight", "rank 3", "rank 2"}},
      {"A and B ranks differ", {a, info("base_model.model.q_proj.lora_B.weight", {3, 1})}, {"lora_B.weight", "do not fit"}},
      {"B not [out, r]", {a, info("base_model.model.q_proj.lora_B.weight", {2, 3})}, {"do not fit"}},
      {"1-D A", {info("base_model.model.q_proj.lora_A.weight", {2}), b}, {"do not fit"}},
      {"lone A", {a}, {"lora_A.weight", "no matching lora_B", "q_proj"}},
      {"lone B", {b}, {"lora_B.weight", "no matching lora_A"}},
      {"lone embedding A", {info("base_model.model.emb.lora_embedding_A", {2, 5})}, {"lora_embedding_A", "no matching lora_embedding_B"}},
      {"unknown key", {a, b, info("base_model.model.q_proj.weight", {3, 4})}, {"base_model.model.q_proj.weight", "neither a LoRA factor"}},
      {"unknown lora_ key", {a, b, info("base_model.model.q_proj.lora_diag.weight", {2})}, {"lora_diag"}},
      {"DoRA magnitude", {a, b, info("base_model.model.q_proj.lora_magnitude_vector", {3})}, {"lora_magnitude_vector", "DoRA"}},
      {"lora_bias", {a, b, info("base_model.model.q_proj.lora_B.bias", {3})}, {"lora_B.bias", "\"lora_bias\": true"}},
      {"integer factor", {info("base_model.model.q_proj.lora_A.weight", {2, 4}, DType::kI32), b}, {"lora_A.weight", "I32"}},
      {"lora_A without .weight", {info("base_model.model.q_proj.lora_A", {2, 4}), b}, {"base_model.model.q_proj.lora_A", "not a PEFT LoRA key"}},
      {"two A for one module", {a, b, info("q_proj.lora_A.weight", {2, 4})}, {"both lora_A"}},
      {"base_layer without LoRA", {a, b, info("base_model.model.k_proj.base_layer.weight", {3, 4})}, {"k_proj", "no LoRA factors"}},
      {"original_module", {a, b, info("base_model.model.score.original_module.weight", {3, 4})}, {"original_module"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    expect_error([&] { (void)map_adapter_tensors(cfg, c.tensors, "adapter_model.safetensors"); }, ErrorCode::kInvalidAdapter,
                 [&] { auto n = c.needles; n.push_back("adapter_model.safetensors"); return n; }());
  }
  // A modules_to_save tensor and a LoRA delta for the same base tensor.
  const AdapterConfig mts = parse_adapter_config(config_json(R"(, "modules_to_save": ["q_proj"])"), "c");
  expect_error([&] { (void)map_adapter_tensors(mts, std::vector{a, b, info("base_model.model.q_proj.weight", {3, 4})}, "w"); },
               ErrorCode::kInvalidAdapter, {"both define base tensor", "q_proj.weight"});
}

TEST(PeftAdapter, Folders) {
  TempDir dir;
  EXPECT_FALSE(is_adapter_folder(dir.path()));
  EXPECT_FALSE(is_adapter_folder(dir / "missing"));
  const auto folder = dir.subdir("a");
  test::write_file(folder / kAdapterConfigName, config_json());
  EXPECT_TRUE(is_adapter_folder(folder));
  EXPECT_FALSE(is_adapter_folder(folder / kAdapterConfigName));
  expect_error([&] { (void)find_adapter_files(folder); }, ErrorCode::kIo, {"adapter_model.safetensors"});
  test::write_file(folder / kAdapterBinName, "PK");
  EXPECT_EQ(find_adapter_files(folder).weights, folder / kAdapterBinName);  // a .bin alone is used
  expect_error([&] { (void)open_adapter_folder(folder); }, ErrorCode::kInvalidArchive, {"adapter_model.bin"});
  test::write_float_safetensors(folder / kAdapterSafetensorsName,
                                {{"base_model.model.q_proj.lora_A.weight", DType::kF32, {2, 4}, kA2x4},
                                 {"base_model.model.q_proj.lora_B.weight", DType::kF32, {3, 2}, kB3x2}});
  EXPECT_EQ(find_adapter_files(folder).weights, folder / kAdapterSafetensorsName);  // safetensors wins
  EXPECT_EQ(open_adapter_folder(folder).tensors.size(), 1u);
  const auto no_config = dir.subdir("b");
  expect_error([&] { (void)find_adapter_files(no_config); }, ErrorCode::kIo, {"adapter_config.json"});
  // The config's own errors name the config file.
  test::write_file(folder / kAdapterConfigName, R"({"peft_type": "IA3"})");
  expect_error([&] { (void)open_adapter_folder(folder); }, ErrorCode::kInvalidAdapter, {"adapter_config.json", "IA3"});
}

}  // namespace
}  // namespace taskvec::peft
