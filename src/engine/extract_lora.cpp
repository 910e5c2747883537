// extract_lora: the task vector of each weight matrix factored by a truncated SVD and written as a PEFT
// LoRA adapter. Three phases:
//   1. checks: names, shapes, dtypes, quantization, the output path; which tensor becomes what
//   2. per matrix (parallel over tensors): tau in f64, truncated SVD, factors encoded into a scratch file
//   3. the plan (ranks now known), CheckpointWriter: factors copied from the scratch file, biases and
//      modules_to_save computed from the checkpoints, adapter_config.json generated, commit
#include "taskvec/lora.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <map>
#include <mutex>
#include <set>

#include <fmt/format.h>

#include "engine/adapter_output.hpp"
#include "engine/internal.hpp"
#include "engine/parallel.hpp"
#include "engine/svd.hpp"
#include "format/internal.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

namespace fs = std::filesystem;

namespace {

constexpr const char* kPrefix = detail::kAdapterPrefix;
constexpr const char* kConfigFile = detail::kAdapterConfigFile;
constexpr std::uint64_t kPiece = 1 << 16;  // elements decoded / encoded at a time outside the SVD

// The only place that names the file a tensor lives in (for messages and the writer's protection).
fs::path file_of(const CheckpointTensor& t) { return t.file(); }

// Module leaves taken for embeddings (mergekit: the model's input / output embeddings and every
// nn.Embedding; taskvec sees no module types, so it goes by these names).
const std::set<std::string, std::less<>> kInputEmbeddings{
    "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "embed_in", "embed_positions", "tok_embeddings", "shared", "embeddings"};
const std::set<std::string, std::less<>> kOutputEmbeddings{"lm_head", "embed_out"};

std::string module_of(const std::string& name) {
  if (name.ends_with(".weight")) return name.substr(0, name.size() - 7);
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? std::string() : name.substr(0, dot);
}

std::string leaf_of(const std::string& module) {
  const auto dot = module.rfind('.');
  return dot == std::string::npos ? module : module.substr(dot + 1);
}

std::string join_regexes(const std::vector<std::string>& patterns) {
  if (patterns.size() == 1) return patterns[0];
  std::string out;
  for (const auto& p : patterns) {
    if (!out.empty()) out.append("|");
    out.append("(?:").append(p).append(")");
  }
  return out;
}

enum class Kind { kLora, kLoraEmbedding, kBias, kWhole };

struct Entry {
  std::string name, module;
  const CheckpointTensor* base = nullptr;
  const CheckpointTensor* ft = nullptr;
  Kind kind = Kind::kWhole;
  DType out_dtype = DType::kF32;
};

// Phase 2 result of one matrix.
struct Factors {
  bool identical = false;
  int rank = 0;
  std::uint64_t offset = 0, a_bytes = 0, b_bytes = 0;  // in the scratch file: A then B
  double norm = 0, relative_error = 0, energy_kept = 1, seconds = 0;
  bool randomized = false;
};

// An unnamed file for the encoded factors until the plan exists: O_TMPFILE in `dir` (nothing ever
// appears under a name), else a mkstemp file unlinked at once.
class ScratchFile {
 public:
  explicit ScratchFile(const fs::path& dir) {
    fd_ = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd_ < 0) {
      std::string templ = (dir / ".taskvec-lora-scratch-XXXXXX").string();
      fd_ = ::mkostemp(templ.data(), O_CLOEXEC);
      if (fd_ >= 0) ::unlink(templ.c_str());
    }
    if (fd_ < 0) {
      const int err = errno;
      throw Error(ErrorCode::kIo, dir.string() + ": cannot create a scratch file for the factors: " +
                                      format_detail::errno_text(err));
    }
    dir_ = dir;
  }
  ~ScratchFile() { ::close(fd_); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;

  std::uint64_t reserve(std::uint64_t bytes) { return end_.fetch_add(bytes); }
  void write(std::uint64_t offset, std::span<const std::byte> data) const {
    std::size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::pwrite(fd_, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : ENOSPC;
        throw Error(err == ENOSPC || err == EDQUOT ? ErrorCode::kDiskFull : ErrorCode::kIo,
                    dir_.string() + ": cannot write the scratch file of the factors: " + format_detail::errno_text(err));
      }
      done += static_cast<std::size_t>(n);
    }
  }
  void read(std::uint64_t offset, std::span<std::byte> data) const {
    std::size_t done = 0;
    while (done < data.size()) {
      const ssize_t n = ::pread(fd_, data.data() + done, data.size() - done, static_cast<off_t>(offset + done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : EIO;
        throw Error(ErrorCode::kIo, dir_.string() + ": cannot read the scratch file of the factors: " +
                                        format_detail::errno_text(err));
      }
      done += static_cast<std::size_t>(n);
    }
  }

 private:
  int fd_ = -1;
  fs::path dir_;
  std::atomic<std::uint64_t> end_{0};
};

// The output folder's nearest existing ancestor (the scratch file's place).
fs::path existing_ancestor(const fs::path& output) {
  std::error_code ec;
  fs::path p = fs::absolute(output, ec);
  while (!p.empty() && !fs::is_directory(p, ec)) {
    if (p == p.parent_path()) break;
    p = p.parent_path();
  }
  return p.empty() ? fs::path(".") : p;
}

bool values_equal(const CheckpointTensor& a, const CheckpointTensor& b) {
  if (a.info->dtype == b.info->dtype) return detail::same_bytes(a, b);
  const std::uint64_t n = a.info->num_elements();
  std::vector<double> x(std::min(n, kPiece)), y(x.size());
  std::vector<std::byte> staging;
  for (std::uint64_t begin = 0; begin < n; begin += kPiece) {
    const std::uint64_t count = std::min(kPiece, n - begin);
    detail::read_decoded(a, begin, count, x.data(), staging);
    detail::read_decoded(b, begin, count, y.data(), staging);
    for (std::uint64_t i = 0; i < count; ++i)
      if (!(x[i] == y[i])) return false;
  }
  return true;
}

[[noreturn]] void throw_non_finite(const Entry& e, std::uint64_t index, double base, double ft) {
  const bool base_bad = !std::isfinite(base);
  throw Error(ErrorCode::kNonFinite,
              fmt::format("{}: tensor '{}' element {} is {} (base {}, fine-tuned {}): the task vector is not finite",
                          file_of(base_bad ? *e.base : *e.ft).string(), e.name, index, base_bad ? base : ft, base, ft));
}

// Encodes src[0, n) into `dtype` at dst, refusing values beyond its range (F16 > 65504).
void encode_checked(const Entry& e, const char* what, DType dtype, const double* src, std::size_t n, std::byte* dst) {
  const std::size_t bad = find_overflow(dtype, src, n);
  if (bad < n) {
    throw Error(ErrorCode::kOverflow, fmt::format("tensor '{}': {} value {} is beyond the range of {} (use --dtype "
                                                  "float32 or bfloat16)",
                                                  e.name, what, src[bad], dtype_name(dtype)));
  }
  encode_from_f64(dtype, src, dst, n);
}

// tau = ft - base of e's elements [begin, begin + count) into dst, checking finiteness.
void read_tau(const Entry& e, std::uint64_t begin, std::uint64_t count, double* dst, std::vector<double>& tmp,
              std::vector<std::byte>& staging) {
  detail::read_decoded(*e.base, begin, count, dst, staging);
  tmp.resize(std::max<std::size_t>(tmp.size(), std::min(count, kPiece)));
  for (std::uint64_t p = 0; p < count; p += kPiece) {
    const std::uint64_t c = std::min(kPiece, count - p);
    detail::read_decoded(*e.ft, begin + p, c, tmp.data(), staging);
    for (std::uint64_t i = 0; i < c; ++i) {
      const double b = dst[p + i], f = tmp[i];
      const double t = f - b;
      if (!std::isfinite(t)) throw_non_finite(e, begin + p + i, b, f);
      dst[p + i] = t;
    }
  }
}

Factors factor(const Entry& e, const LoraOptions& options, ScratchFile& scratch) {
  const auto start = std::chrono::steady_clock::now();
  const std::int64_t m = static_cast<std::int64_t>(e.base->info->shape[0]);
  const std::int64_t n = static_cast<std::int64_t>(e.base->info->shape[1]);
  std::vector<double> tau(static_cast<std::size_t>(m * n)), tmp;
  std::vector<std::byte> staging;
  read_tau(e, 0, tau.size(), tau.data(), tmp, staging);
  Factors f;
  double norm2 = 0;
  for (double v : tau) norm2 += v * v;
  if (norm2 == 0) {
    f.identical = true;
    return f;
  }
  f.norm = std::sqrt(norm2);
  detail::SvdOptions svd_options;
  svd_options.method = options.svd == LoraSvdMethod::kExact        ? detail::SvdMethod::kExact
                       : options.svd == LoraSvdMethod::kRandomized ? detail::SvdMethod::kRandomized
                                                                   : detail::SvdMethod::kAuto;
  detail::TruncatedSvd svd = detail::truncated_svd(tau, m, n, options.rank, svd_options);
  tau.clear();
  tau.shrink_to_fit();
  int keep = svd.rank;
  if (options.sv_epsilon > 0 && keep > 0) {
    const double threshold = options.sv_epsilon * svd.s[0];
    while (keep > 1 && svd.s[keep - 1] < threshold) --keep;
  }
  double kept2 = 0;
  for (int k = 0; k < keep; ++k) kept2 += svd.s[k] * svd.s[k];
  f.rank = keep;
  f.randomized = svd.randomized;
  if (!svd.randomized) {
    double dropped2 = 0, all2 = 0;
    for (std::size_t k = 0; k < svd.all_s.size(); ++k) {
      all2 += svd.all_s[k] * svd.all_s[k];
      if (k >= static_cast<std::size_t>(keep)) dropped2 += svd.all_s[k] * svd.all_s[k];
    }
    f.relative_error = std::sqrt(dropped2) / f.norm;
    f.energy_kept = all2 > 0 ? kept2 / all2 : 1.0;
  } else {
    f.relative_error = std::sqrt(std::max(0.0, norm2 - kept2)) / f.norm;
    f.energy_kept = std::min(1.0, kept2 / norm2);
  }
  // lora: B = U diag(s) (m x keep), A = V^T (keep x n). lora_embedding (tau^T = B A, PEFT's embedding
  // delta is (B A)^T): B = V diag(s) (n x keep), A = U^T (keep x m).
  const int r = svd.rank;
  const bool embed = e.kind == Kind::kLoraEmbedding;
  const std::int64_t a_cols = embed ? m : n, b_rows = embed ? n : m;
  std::vector<double> a(static_cast<std::size_t>(keep * a_cols)), b(static_cast<std::size_t>(b_rows * keep));
  for (int k = 0; k < keep; ++k) {
    for (std::int64_t j = 0; j < a_cols; ++j)
      a[static_cast<std::size_t>(k * a_cols + j)] =
          embed ? svd.u[static_cast<std::size_t>(j * r + k)] : svd.vt[static_cast<std::size_t>(k * n + j)];
  }
  for (std::int64_t i = 0; i < b_rows; ++i) {
    for (int k = 0; k < keep; ++k)
      b[static_cast<std::size_t>(i * keep + k)] =
          (embed ? svd.vt[static_cast<std::size_t>(k * n + i)] : svd.u[static_cast<std::size_t>(i * r + k)]) * svd.s[k];
  }
  const std::uint64_t esize = dtype_bits(e.out_dtype) / 8;
  f.a_bytes = a.size() * esize;
  f.b_bytes = b.size() * esize;
  std::vector<std::byte> bytes(f.a_bytes + f.b_bytes);
  encode_checked(e, "factor A", e.out_dtype, a.data(), a.size(), bytes.data());
  encode_checked(e, "factor B", e.out_dtype, b.data(), b.size(), bytes.data() + f.a_bytes);
  f.offset = scratch.reserve(bytes.size());
  scratch.write(f.offset, bytes);
  f.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return f;
}

// Writes tensor `out_name` of `writer` from e: the fine-tuned values (whole) or tau (bias), encoded.
void write_values(const Entry& e, bool tau, const std::string& out_name, const CheckpointWriter& writer) {
  const std::uint64_t n = e.base->info->num_elements();
  const std::uint64_t esize = dtype_bits(e.out_dtype) / 8;
  std::vector<double> values(std::min(n, kPiece)), tmp;
  std::vector<std::byte> staging, bytes(values.size() * esize);
  for (std::uint64_t begin = 0; begin < n; begin += kPiece) {
    const std::uint64_t count = std::min(kPiece, n - begin);
    if (tau) {
      read_tau(e, begin, count, values.data(), tmp, staging);
    } else {
      detail::read_decoded(*e.ft, begin, count, values.data(), staging);
    }
    encode_checked(e, tau ? "the task vector's" : "the fine-tuned", e.out_dtype, values.data(), count, bytes.data());
    writer.write(out_name, begin * esize, std::span(bytes.data(), count * esize));
  }
}

}  // namespace

LoraReport extract_lora(const Checkpoint& base, const Checkpoint& given_finetuned, const fs::path& output,
                        const LoraOptions& options) {
  // An adapter as FINETUNED is re-factorized: the model it defines over BASE.
  detail::require_model(base, "BASE of extract-lora");
  std::optional<Checkpoint> adapter_model;
  const Checkpoint& finetuned = detail::as_model(given_finetuned, base, adapter_model);
  const auto start = std::chrono::steady_clock::now();
  // ---- 1. checks (nothing read but headers, 1-D tensors and tensors saved whole) ----
  if (options.rank < 1) throw Error(ErrorCode::kInvalidArgument, "--rank must be at least 1");
  if (!(options.sv_epsilon >= 0 && options.sv_epsilon < 1)) {
    throw Error(ErrorCode::kInvalidArgument, fmt::format("--sv-epsilon {} is outside [0, 1): it is a fraction of the "
                                                         "largest singular value of each matrix", options.sv_epsilon));
  }
  if (options.out_dtype && *options.out_dtype != DType::kF32 && *options.out_dtype != DType::kBF16 &&
      *options.out_dtype != DType::kF16) {
    throw Error(ErrorCode::kInvalidArgument, fmt::format("--dtype {}: an adapter is written as float32, bfloat16 or "
                                                         "float16", dtype_name(*options.out_dtype)));
  }
  const detail::TensorFilter filter(join_regexes(options.include), join_regexes(options.exclude));
  detail::check_not_quantized(base);
  detail::check_not_quantized(finetuned);
  LoraReport report;
  report.output = output;
  std::vector<Entry> entries;
  for (const auto& name : base.tensor_names()) {
    if (!filter.selects(name)) continue;
    const CheckpointTensor& r = base.at(name);
    const CheckpointTensor* t = finetuned.find(name);
    detail::check_input_tensor(name, base, r, finetuned, t, false, false);
    if (!dtype_is_editable(r.info->dtype)) {
      if (t->info->dtype != r.info->dtype || !detail::same_bytes(r, *t)) {
        report.warnings.push_back(fmt::format("tensor '{}' ({}) differs in {}: integer/bool tensors have no LoRA; "
                                              "left out of the adapter",
                                              name, dtype_name(r.info->dtype), file_of(*t).string()));
      }
      continue;
    }
    Entry e;
    e.name = name;
    e.module = module_of(name);
    e.base = &r;
    e.ft = t;
    const DType ft_dtype = t->info->dtype;
    e.out_dtype = options.out_dtype ? *options.out_dtype
                  : (ft_dtype == DType::kF32 || ft_dtype == DType::kBF16 || ft_dtype == DType::kF16) ? ft_dtype
                                                                                                    : DType::kF32;
    const auto& shape = r.info->shape;
    const bool matrix = shape.size() == 2 && shape[0] > 0 && shape[1] > 0 && name.ends_with(".weight") &&
                        !e.module.empty();
    const std::string leaf = leaf_of(e.module);
    if (matrix && kInputEmbeddings.count(leaf)) e.kind = options.embed_lora ? Kind::kLoraEmbedding : Kind::kWhole;
    else if (matrix && kOutputEmbeddings.count(leaf)) e.kind = options.embed_lora ? Kind::kLora : Kind::kWhole;
    else if (matrix) e.kind = Kind::kLora;
    else if (shape.size() == 1 && name.ends_with(".bias")) e.kind = Kind::kBias;
    else e.kind = Kind::kWhole;
    if ((e.kind == Kind::kLora || e.kind == Kind::kLoraEmbedding) && (shape[0] > INT_MAX || shape[1] > INT_MAX)) {
      throw Error(ErrorCode::kUnsupported, fmt::format("{}: tensor '{}' {} is too large for LAPACK's int dimensions",
                                                       file_of(r).string(), name, detail::shape_text(shape)));
    }
    entries.push_back(std::move(e));
  }
  for (const auto& name : finetuned.tensor_names()) {
    if (filter.selects(name) && base.find(name) == nullptr) detail::throw_extra_tensor(name, finetuned, base, "");
  }
  detail::check_adapter_output(output, {&base, &finetuned}, options.force);

  // Which modules have a matrix that may become a LoRA; their other changed tensors besides the bias
  // cannot be expressed (a module is either a LoRA target or saved whole). Tensors saved whole and
  // biases are compared now (cheap next to the SVDs).
  std::map<std::string, const Entry*> lora_weight;  // module -> its matrix entry
  for (const auto& e : entries)
    if (e.kind == Kind::kLora || e.kind == Kind::kLoraEmbedding) lora_weight[e.module] = &e;
  std::vector<char> changed(entries.size(), 1);  // char, not bool: written by the workers
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (e.kind == Kind::kLora || e.kind == Kind::kLoraEmbedding) continue;
    changed[i] = !values_equal(*e.base, *e.ft);
    if (!changed[i]) continue;
    const auto it = lora_weight.find(e.module);
    if (it != lora_weight.end() && (e.kind != Kind::kBias || it->second->kind == Kind::kLoraEmbedding)) {
      throw Error(ErrorCode::kUnsupported,
                  fmt::format("{}: tensor '{}' changed, and its module '{}' has the matrix '{}' that becomes a LoRA: a "
                              "PEFT module is either a LoRA target or saved whole; leave one of them out with --exclude",
                              file_of(*e.ft).string(), e.name, e.module, it->second->name));
    }
  }

  // ---- 2. the SVDs ----
  std::vector<std::size_t> matrices;
  std::uint64_t matrix_bytes = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    if (entries[i].kind == Kind::kLora || entries[i].kind == Kind::kLoraEmbedding) {
      matrices.push_back(i);
      matrix_bytes += entries[i].base->info->num_bytes();
    }
  }
  std::optional<ScratchFile> scratch;
  if (!matrices.empty()) scratch.emplace(existing_ancestor(output));
  std::vector<Factors> factors(entries.size());
  std::atomic<std::uint64_t> done{0}, bytes_done{0};
  const auto idle = [&] {
    if (!options.on_progress) return;
    Progress p;
    p.tensors_done = done.load();
    p.tensors_total = matrices.size();
    p.bytes_done = bytes_done.load();
    p.bytes_total = matrix_bytes;
    p.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    options.on_progress(p);
  };
  detail::parallel_for(
      matrices.size(), detail::resolve_threads(options.threads),
      [&](std::size_t k, unsigned) {
        const std::size_t i = matrices[k];
        factors[i] = factor(entries[i], options, *scratch);
        changed[i] = !factors[i].identical;
        done.fetch_add(1);
        bytes_done.fetch_add(entries[i].base->info->num_bytes());
      },
      idle);
  idle();

  // ---- 3. the adapter ----
  std::set<std::string> targets, saved_whole;
  bool lora_bias = false;
  std::vector<TensorSpec> specs;
  std::map<std::string, int> ranks;  // module -> kept rank
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (!changed[i]) {
      report.skipped_identical.push_back(e.name);
      continue;
    }
    const auto& shape = e.base->info->shape;
    LoraTensorReport t;
    t.tensor = e.name;
    t.module = e.module;
    t.shape = shape;
    const std::string p = kPrefix + e.module;
    if (e.kind == Kind::kLora || e.kind == Kind::kLoraEmbedding) {
      const Factors& f = factors[i];
      const auto r = static_cast<std::uint64_t>(f.rank);
      if (e.kind == Kind::kLora) {
        specs.push_back({p + ".lora_A.weight", e.out_dtype, {r, shape[1]}});
        specs.push_back({p + ".lora_B.weight", e.out_dtype, {shape[0], r}});
      } else {
        specs.push_back({p + ".lora_embedding_A", e.out_dtype, {r, shape[0]}});
        specs.push_back({p + ".lora_embedding_B", e.out_dtype, {shape[1], r}});
      }
      targets.insert(e.module);
      ranks[e.module] = f.rank;
      t.kind = e.kind == Kind::kLora ? "lora" : "lora_embedding";
      t.rank = f.rank;
      t.tau_norm = f.norm;
      t.relative_error = f.relative_error;
      t.energy_kept = f.energy_kept;
      t.randomized = f.randomized;
      t.seconds = f.seconds;
    } else {
      continue;  // biases and whole tensors: below, once the LoRA modules are known
    }
    report.tensors.push_back(std::move(t));
  }
  // Biases and whole tensors, now that the LoRA modules are known.
  std::vector<std::pair<const Entry*, std::string>> value_tensors;  // (entry, output name); bias: tau
  std::vector<bool> value_is_tau;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (!changed[i] || e.kind == Kind::kLora || e.kind == Kind::kLoraEmbedding) continue;
    LoraTensorReport t;
    t.tensor = e.name;
    t.module = e.module;
    t.shape = e.base->info->shape;
    if (e.kind == Kind::kBias && targets.count(e.module)) {
      t.kind = "lora_bias";
      lora_bias = true;
      value_tensors.emplace_back(&e, kPrefix + e.module + ".lora_B.bias");
      value_is_tau.push_back(true);
    } else {
      t.kind = "modules_to_save";
      if (e.module.empty()) {
        throw Error(ErrorCode::kUnsupported, fmt::format("{}: tensor '{}' changed but belongs to no module (no '.' in "
                                                         "its name): PEFT cannot save it; leave it out with --exclude",
                                                         file_of(*e.ft).string(), e.name));
      }
      saved_whole.insert(e.module);
      value_tensors.emplace_back(&e, kPrefix + e.name);
      value_is_tau.push_back(false);
    }
    specs.push_back({value_tensors.back().second, e.out_dtype, e.base->info->shape});
    report.tensors.push_back(std::move(t));
  }
  for (const auto& m : targets) {
    if (saved_whole.count(m)) {
      throw Error(ErrorCode::kUnsupported, fmt::format("module '{}' is both a LoRA target and saved whole", m));
    }
  }
  std::sort(report.tensors.begin(), report.tensors.end(),
            [](const LoraTensorReport& a, const LoraTensorReport& b) { return a.tensor < b.tensor; });
  if (specs.empty()) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("nothing to extract: every selected tensor of {} equals {}", finetuned.path().string(),
                            base.path().string()));
  }
  report.r = options.rank;
  if (!ranks.empty()) {
    report.r = 0;
    for (const auto& [m, r] : ranks) report.r = std::max(report.r, r);
  }
  report.target_modules.assign(targets.begin(), targets.end());
  report.modules_to_save.assign(saved_whole.begin(), saved_whole.end());

  detail::AdapterConfigFields fields;
  fields.r = report.r;
  fields.module_ranks = ranks;
  fields.target_modules = report.target_modules;
  fields.modules_to_save = report.modules_to_save;
  fields.lora_bias = lora_bias;
  fields.base_model_name = options.base_model_name.empty() ? base.path().string() : options.base_model_name;
  fields.task_type = options.task_type;
  report.adapter_config = detail::adapter_config_text(fields);

  std::vector<fs::path> inputs = detail::adapter_input_paths(base);
  for (auto& f : detail::adapter_input_paths(finetuned)) inputs.push_back(std::move(f));
  const auto writer_ptr = detail::make_adapter_writer(output, std::move(specs), options.force, inputs, report.bytes_written);
  const CheckpointWriter& writer = *writer_ptr;
  std::vector<std::byte> buf;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const Entry& e = entries[i];
    if (!changed[i] || (e.kind != Kind::kLora && e.kind != Kind::kLoraEmbedding)) continue;
    const Factors& f = factors[i];
    const std::string p = kPrefix + e.module;
    const bool embed = e.kind == Kind::kLoraEmbedding;
    const std::pair<std::string, std::uint64_t> parts[2] = {{p + (embed ? ".lora_embedding_A" : ".lora_A.weight"), 0},
                                                            {p + (embed ? ".lora_embedding_B" : ".lora_B.weight"), f.a_bytes}};
    for (const auto& [name, rel] : parts) {
      const std::uint64_t size = rel == 0 ? f.a_bytes : f.b_bytes;
      for (std::uint64_t off = 0; off < size; off += detail::kReadPieceBytes) {
        const std::uint64_t c = std::min<std::uint64_t>(detail::kReadPieceBytes, size - off);
        buf.resize(c);
        scratch->read(f.offset + rel + off, buf);
        writer.write(name, off, buf);
      }
    }
  }
  for (std::size_t k = 0; k < value_tensors.size(); ++k)
    write_values(*value_tensors[k].first, value_is_tau[k], value_tensors[k].second, writer);
  writer_ptr->commit({}, {{kConfigFile, report.adapter_config}});
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace taskvec
