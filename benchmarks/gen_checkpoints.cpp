// taskvec_gen_checkpoints: deterministic Llama-shaped BF16 checkpoints for the end-to-end benchmarks
// (docs/BENCHMARKS.md). Writes OUT/pre (the "pretrained" model) and OUT/ft1 .. OUT/ftN ("fine-tuned" =
// pretrained + small noise), each a Hugging Face folder: sharded model-0000k-of-0000n.safetensors,
// model.safetensors.index.json and config.json, through taskvec's CheckpointPlan/CheckpointWriter.
//
// Values are a pure function of (seed, tensor name, model, element index): a counter-based generator
// (splitmix64 of key + index), so any chunk can be made by any thread and the files are the same for
// every thread count and every run.
//
//   pre[i]  = bf16(w),         w = std * tri(u)        (matrices, std 0.02; norms: 1 + 0.05 * tri(u))
//   ftk[i]  = bf16(w + n_k),   n_k = noise * std * tri(u_k)
//
// tri(u) is the sum of two uniforms in [-1/2, 1/2) scaled to unit variance (a triangular distribution,
// cheap and bounded). --sparse writes only the headers and extends each shard to its full size with
// ftruncate: the data reads as zeros, the disk holds almost nothing, and `taskvec ... --dry-run` can plan
// a 70B-shaped edit on a small disk.
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace fs = std::filesystem;
using namespace taskvec;

namespace {

struct Architecture {
  std::uint64_t hidden = 0, intermediate = 0, layers = 0, vocab = 0, heads = 0, kv_heads = 0;
  std::uint64_t max_shard_size = 0;  // bytes per shard of the generated folders
};

// Llama-style shapes; sizes chosen to match the usual model classes (parameter counts printed on run).
Architecture preset(const std::string& name) {
  //                 hidden  inter  layers vocab  heads kv   shard
  if (name == "tiny") return {256, 688, 8, 8192, 4, 4, 8'000'000};          // ~10.5M
  if (name == "125m") return {768, 2048, 12, 32000, 12, 12, 100'000'000};  // ~134M
  if (name == "350m") return {1024, 2816, 24, 32000, 16, 16, 250'000'000};  // ~374M
  if (name == "1.3b") return {2048, 5504, 24, 32000, 16, 16, 1'000'000'000};  // ~1.35B
  if (name == "7b") return {4096, 11008, 32, 32000, 32, 32, 5'000'000'000};  // ~6.7B
  if (name == "70b") return {8192, 28672, 80, 32000, 64, 8, 5'000'000'000};  // ~69B, GQA
  throw Error(ErrorCode::kInvalidArgument, fmt::format("unknown preset '{}' (tiny, 125m, 350m, 1.3b, 7b, 70b)", name));
}

struct Tensor {
  std::string name;
  std::vector<std::uint64_t> shape;
  bool norm = false;  // RMSNorm weight: values around 1
  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

std::vector<Tensor> llama_tensors(const Architecture& a) {
  const std::uint64_t head_dim = a.hidden / a.heads;
  const std::uint64_t kv = a.kv_heads * head_dim;
  std::vector<Tensor> t;
  t.push_back({"model.embed_tokens.weight", {a.vocab, a.hidden}});
  for (std::uint64_t l = 0; l < a.layers; ++l) {
    const std::string p = fmt::format("model.layers.{}.", l);
    t.push_back({p + "self_attn.q_proj.weight", {a.hidden, a.hidden}});
    t.push_back({p + "self_attn.k_proj.weight", {kv, a.hidden}});
    t.push_back({p + "self_attn.v_proj.weight", {kv, a.hidden}});
    t.push_back({p + "self_attn.o_proj.weight", {a.hidden, a.hidden}});
    t.push_back({p + "mlp.gate_proj.weight", {a.intermediate, a.hidden}});
    t.push_back({p + "mlp.up_proj.weight", {a.intermediate, a.hidden}});
    t.push_back({p + "mlp.down_proj.weight", {a.hidden, a.intermediate}});
    t.push_back({p + "input_layernorm.weight", {a.hidden}, true});
    t.push_back({p + "post_attention_layernorm.weight", {a.hidden}, true});
  }
  t.push_back({"model.norm.weight", {a.hidden}, true});
  t.push_back({"lm_head.weight", {a.vocab, a.hidden}});
  return t;
}

constexpr std::uint64_t splitmix64(std::uint64_t x) noexcept {
  x += 0x9E37'79B9'7F4A'7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58'476D'1CE4'E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D0'49BB'1331'11EBull;
  return x ^ (x >> 31);
}

std::uint64_t stream_key(std::uint64_t seed, const std::string& name, std::uint64_t model) {
  std::uint64_t h = 0xCBF2'9CE4'8422'2325ull;  // FNV-1a of the name
  for (unsigned char c : name) h = (h ^ c) * 0x0000'0100'0000'01B3ull;
  return splitmix64(splitmix64(seed ^ h) + model);
}

// Two 32-bit uniforms from one 64-bit draw, summed: triangular on (-1, 1), scaled to unit variance.
inline float triangular(std::uint64_t bits) noexcept {
  constexpr float kScale = 2.449489743f / 4294967296.0f;  // sqrt(6) / 2^32
  const auto lo = static_cast<std::int64_t>(bits & 0xFFFF'FFFFull);
  const auto hi = static_cast<std::int64_t>(bits >> 32);
  return static_cast<float>(lo + hi - 0xFFFF'FFFFll) * kScale;
}

struct Options {
  std::string preset = "tiny";
  Architecture arch;
  std::uint64_t finetuned = 3;
  std::uint64_t seed = 1;
  double noise = 0.1;  // fine-tuning noise, relative to the weights' std
  unsigned threads = 0;
  bool sparse = false;
  bool force = false;
  fs::path out;
};

nlohmann::json config_json(const Architecture& a) {
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"hidden_size", a.hidden},
          {"intermediate_size", a.intermediate},
          {"num_hidden_layers", a.layers},
          {"num_attention_heads", a.heads},
          {"num_key_value_heads", a.kv_heads},
          {"vocab_size", a.vocab},
          {"hidden_act", "silu"},
          {"rms_norm_eps", 1e-5},
          {"max_position_embeddings", 4096},
          {"tie_word_embeddings", false},
          {"torch_dtype", "bfloat16"}};
}

void write_text(const fs::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
  if (!f) throw Error(ErrorCode::kIo, path.string() + ": cannot write");
}

// Header-only shards extended to full size: holes read as zeros (valid BF16 zeros).
void write_sparse(const CheckpointPlan& plan) {
  fs::create_directories(plan.output);
  nlohmann::json weight_map = nlohmann::json::object();
  for (const auto& s : plan.shards) {
    const int fd = ::open(s.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(ErrorCode::kIo, s.path.string() + ": cannot create");
    const std::string& h = s.layout.header_bytes;
    const bool ok = ::pwrite(fd, h.data(), h.size(), 0) == static_cast<ssize_t>(h.size()) &&
                    ::ftruncate(fd, static_cast<off_t>(s.layout.file_size)) == 0;
    ::close(fd);
    if (!ok) throw Error(ErrorCode::kIo, s.path.string() + ": cannot write the sparse shard");
    for (const auto& t : s.layout.tensors) weight_map[t.name] = s.path.filename().string();
  }
  if (plan.shards.size() > 1) {
    const nlohmann::json index = {{"metadata", {{"total_size", plan.total_bytes}}}, {"weight_map", weight_map}};
    write_text(plan.output / kIndexFileName, index.dump(2) + "\n");
  }
}

// One model: model 0 is the pretrained one, k >= 1 the k-th fine-tuned one.
void write_model(const Options& o, const std::vector<Tensor>& tensors, std::uint64_t model, const fs::path& folder) {
  std::vector<TensorSpec> specs;
  for (const auto& t : tensors) specs.push_back({t.name, DType::kBF16, t.shape});
  CheckpointWriteOptions wo;
  wo.max_shard_size = o.arch.max_shard_size;
  wo.force = o.force;
  CheckpointPlan plan = CheckpointPlan::build(folder, specs, {{"format", "pt"}}, wo);
  const auto start = std::chrono::steady_clock::now();
  if (o.sparse) {
    write_sparse(plan);
  } else {
    CheckpointWriter writer(plan, wo);
    constexpr std::uint64_t kChunk = 1u << 20;
    struct Item {
      std::size_t tensor;
      std::uint64_t begin, count;
    };
    std::vector<Item> items;
    for (std::size_t i = 0; i < tensors.size(); ++i) {
      const std::uint64_t n = tensors[i].elements();
      for (std::uint64_t b = 0; b < n; b += kChunk) items.push_back({i, b, std::min(kChunk, n - b)});
    }
    std::atomic<std::size_t> next{0};
    std::atomic<bool> failed{false};
    std::exception_ptr error;
    std::mutex error_mutex;
    auto work = [&] {
      std::vector<float> values(kChunk);
      std::vector<std::byte> bytes(kChunk * 2);
      try {
        for (std::size_t k = next++; k < items.size() && !failed; k = next++) {
          const Item& it = items[k];
          const Tensor& t = tensors[it.tensor];
          const std::uint64_t pre_key = stream_key(o.seed, t.name, 0);
          const std::uint64_t ft_key = stream_key(o.seed, t.name, model);
          const float std_dev = t.norm ? 0.05f : 0.02f;
          const float offset = t.norm ? 1.0f : 0.0f;
          const float noise = static_cast<float>(o.noise) * std_dev;
          float* v = values.data();
          for (std::uint64_t j = 0; j < it.count; ++j) v[j] = offset + std_dev * triangular(splitmix64(pre_key + it.begin + j));
          if (model != 0) {
            for (std::uint64_t j = 0; j < it.count; ++j) v[j] += noise * triangular(splitmix64(ft_key + it.begin + j));
          }
          encode_from_f32(DType::kBF16, v, bytes.data(), it.count);
          const auto [shard, index] = plan.location.at(t.name);
          writer.write(shard, index, it.begin * 2, std::span<const std::byte>(bytes.data(), it.count * 2));
        }
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    };
    std::vector<std::thread> pool;
    for (unsigned w = 0; w < o.threads; ++w) pool.emplace_back(work);
    for (auto& th : pool) th.join();
    if (error) std::rethrow_exception(error);
    writer.commit();
  }
  write_text(folder / "config.json", config_json(o.arch).dump(2) + "\n");
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print(stderr, "wrote {}: {} shard(s), {:.3f} GB{} in {:.2f} s\n", folder.string(), plan.shards.size(),
             double(plan.total_bytes) / 1e9, o.sparse ? " (sparse)" : "", s);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"taskvec_gen_checkpoints: deterministic Llama-shaped BF16 checkpoints, OUT/pre and OUT/ft1..ftN"};
  Options o;
  Architecture custom{};
  std::string shard_text;
  app.add_option("-o,--output", o.out, "Output folder (receives pre/, ft1/, ...)")->required();
  app.add_option("--preset", o.preset, "tiny (~10M), 125m, 350m, 1.3b, 7b, 70b");
  app.add_option("--hidden", custom.hidden, "Override: hidden size");
  app.add_option("--intermediate", custom.intermediate, "Override: MLP intermediate size");
  app.add_option("--layers", custom.layers, "Override: decoder layers");
  app.add_option("--vocab", custom.vocab, "Override: vocabulary size");
  app.add_option("--heads", custom.heads, "Override: attention heads");
  app.add_option("--kv-heads", custom.kv_heads, "Override: key/value heads");
  app.add_option("--max-shard-size", custom.max_shard_size, "Override: bytes per shard");
  app.add_option("-n,--finetuned", o.finetuned, "Number of fine-tuned models (default 3)");
  app.add_option("--seed", o.seed, "Seed (default 1)");
  app.add_option("--noise", o.noise, "Fine-tuning noise relative to the weights' std (default 0.1)");
  app.add_option("--threads", o.threads, "Writer threads (default: all cores)");
  app.add_flag("--sparse", o.sparse, "Headers only, files extended with holes (reads as zeros): for --dry-run plans");
  app.add_flag("--force", o.force, "Replace existing outputs");
  CLI11_PARSE(app, argc, argv);
  try {
    o.arch = preset(o.preset);
    auto take = [](std::uint64_t& field, std::uint64_t value) {
      if (value != 0) field = value;
    };
    take(o.arch.hidden, custom.hidden);
    take(o.arch.intermediate, custom.intermediate);
    take(o.arch.layers, custom.layers);
    take(o.arch.vocab, custom.vocab);
    take(o.arch.heads, custom.heads);
    take(o.arch.kv_heads, custom.kv_heads);
    take(o.arch.max_shard_size, custom.max_shard_size);
    if (o.arch.heads == 0 || o.arch.hidden % o.arch.heads != 0 || o.arch.kv_heads == 0 || o.arch.heads % o.arch.kv_heads != 0) {
      throw Error(ErrorCode::kInvalidArgument, "hidden must be a multiple of heads, heads a multiple of kv-heads");
    }
    if (o.threads == 0) o.threads = std::max(1u, std::thread::hardware_concurrency());
    const auto tensors = llama_tensors(o.arch);
    std::uint64_t params = 0;
    for (const auto& t : tensors) params += t.elements();
    fmt::print(stderr, "{}: hidden {} intermediate {} layers {} vocab {} heads {}/{}: {} tensors, {:.1f}M parameters\n",
               o.preset, o.arch.hidden, o.arch.intermediate, o.arch.layers, o.arch.vocab, o.arch.heads, o.arch.kv_heads,
               tensors.size(), double(params) / 1e6);
    fs::create_directories(o.out);
    for (std::uint64_t m = 0; m <= o.finetuned; ++m) {
      write_model(o, tensors, m, o.out / (m == 0 ? std::string("pre") : fmt::format("ft{}", m)));
    }
    // Written last: the benchmark script reuses a folder only when this file matches its request.
    nlohmann::json stamp = config_json(o.arch);
    stamp["preset"] = o.preset;
    stamp["parameters"] = params;
    stamp["finetuned"] = o.finetuned;
    stamp["seed"] = o.seed;
    stamp["noise"] = o.noise;
    stamp["sparse"] = o.sparse;
    stamp["max_shard_size"] = o.arch.max_shard_size;
    write_text(o.out / "generated.json", stamp.dump(2) + "\n");
    return 0;
  } catch (const Error& e) {
    fmt::print(stderr, "taskvec_gen_checkpoints: error ({}): {}\n", error_code_name(e.code()), e.what());
    return exit_status(e.code());
  } catch (const std::exception& e) {
    fmt::print(stderr, "taskvec_gen_checkpoints: error: {}\n", e.what());
    return 1;
  }
}
