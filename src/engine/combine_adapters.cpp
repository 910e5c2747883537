// combine_adapters: sum_i lambda_i * adapter_i written as one PEFT LoRA adapter. Per module,
//   sum_i lambda_i s_i B_i A_i = [lambda_1 s_1 B_1 | ... | lambda_k s_k B_k] [A_1; ...; A_k]
// exactly (rank sum r_i); with a rank the product is materialized in f64 and re-factored by the
// truncated SVD. Two phases: every check (shapes, kinds, saved tensors, the output path), then the
// factors computed and written through CheckpointWriter (the files appear at the end, atomically).
#include <chrono>
#include <climits>
#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>

#include "engine/adapter_output.hpp"
#include "engine/internal.hpp"
#include "engine/svd.hpp"
#include "format/internal.hpp"
#include "format/peft_adapter.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"
#include "taskvec/lora.hpp"

namespace taskvec {

namespace fs = std::filesystem;
using format_detail::format_dims;
using format_detail::quote_name;

namespace {

// One input's share of a module.
struct Piece {
  std::size_t term = 0;
  const peft::LoraModule* module = nullptr;
  peft::TensorRef a, b;  // A [r, tail...], B [out, r, 1...]
  double coef = 1;       // lambda * s
};

struct Module {
  std::string target;
  const peft::LoraModule* first = nullptr;
  std::uint64_t b_rows = 0, a_cols = 0;  // B viewed [b_rows, r], A viewed [r, a_cols]
  std::vector<std::uint64_t> a_tail, b_tail;  // A's dims after r; B's dims after r
  std::vector<Piece> pieces;
  std::uint64_t k = 0;  // sum of ranks
};

struct Bias {
  std::string target, module;
  std::vector<std::uint64_t> shape;
  std::vector<std::pair<std::size_t, const CheckpointTensor*>> terms;  // (term, s * bias as F32)
};

std::vector<double> read_f64(const peft::TensorRef& t) {
  const std::uint64_t n = t.info->num_elements();
  std::vector<std::byte> raw(t.info->num_bytes());
  t.source->read(*t.info, 0, raw);
  std::vector<double> out(n);
  decode_to_f64(t.info->dtype, raw.data(), out.data(), n);
  return out;
}

const char* kind_of(const peft::LoraModule& m) { return m.is_embedding ? "lora_embedding" : "lora"; }

std::uint64_t product(const std::vector<std::uint64_t>& dims) {
  std::uint64_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

std::string module_of_target(const std::string& target) {
  const auto dot = target.rfind('.');
  return dot == std::string::npos ? std::string() : target.substr(0, dot);
}

void encode_checked(const std::string& what, DType dtype, const std::vector<double>& v, std::vector<std::byte>& out) {
  const std::size_t bad = find_overflow(dtype, v.data(), v.size());
  if (bad < v.size()) {
    throw Error(ErrorCode::kOverflow, fmt::format("{}: value {} is beyond the range of {} (use --dtype float32 or "
                                                  "bfloat16)",
                                                  what, v[bad], dtype_name(dtype)));
  }
  out.resize(v.size() * (dtype_bits(dtype) / 8));
  encode_from_f64(dtype, v.data(), out.data(), v.size());
}

}  // namespace

CombineAdaptersReport combine_adapters(const std::vector<AdapterTerm>& terms, const fs::path& output,
                                       const CombineAdaptersOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  // ---- 1. checks (headers only) ----
  if (terms.empty()) throw Error(ErrorCode::kInvalidArgument, "combine-adapters needs at least one adapter (-t)");
  if (options.rank < 0) throw Error(ErrorCode::kInvalidArgument, "--rank must be at least 1");
  const DType dtype = options.out_dtype.value_or(DType::kF32);
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("--dtype {}: an adapter is written as float32, bfloat16 or float16", dtype_name(dtype)));
  }
  std::vector<const peft::OpenedAdapter*> opened;
  for (const auto& t : terms) {
    if (t.adapter == nullptr || t.adapter->adapter() == nullptr) {
      throw Error(ErrorCode::kInvalidArgument, fmt::format("{}: not a PEFT LoRA adapter folder (combine-adapters "
                                                           "takes adapters only)",
                                                           t.adapter ? t.adapter->path().string() : "?"));
    }
    if (!std::isfinite(t.lambda)) {
      throw Error(ErrorCode::kInvalidArgument, fmt::format("{}: lambda {} is not finite", t.adapter->path().string(), t.lambda));
    }
    opened.push_back(t.adapter->adapter());
  }
  const auto label = [&](std::size_t i) { return opened[i]->files.weights.string(); };

  std::map<std::string, Module> modules;  // by target
  std::map<std::string, Bias> biases;
  std::map<std::string, std::pair<std::size_t, const CheckpointTensor*>> saved;  // target -> (term, tensor)
  for (std::size_t i = 0; i < terms.size(); ++i) {
    const Checkpoint& ck = *terms[i].adapter;
    for (const auto& t : opened[i]->tensors) {
      if (!t.module) continue;
      const peft::LoraModule& m = *t.module;
      if (m.saved_base_name) {
        throw Error(ErrorCode::kUnsupported,
                    fmt::format("{}: module {} comes with its own copy of the base weight ({}, save_embedding_layers): "
                                "the model it defines is that copy + dW, which a combination of adapters cannot "
                                "express",
                                label(i), quote_name(m.module), quote_name(*m.saved_base_name)));
      }
      const auto* src = static_cast<const peft::LoraProductSource*>(t.source.get());
      Piece p{i, &m, src->a(), src->b(), terms[i].lambda * m.scale};
      const auto& as = p.a.info->shape;
      const auto& bs = p.b.info->shape;
      Module& mod = modules[m.target];
      if (mod.first == nullptr) {
        mod.target = m.target;
        mod.first = &m;
        mod.a_tail.assign(as.begin() + 1, as.end());
        mod.b_tail.assign(bs.begin() + 2, bs.end());
        mod.b_rows = bs[0];
        mod.a_cols = product(mod.a_tail);
      } else {
        const peft::LoraModule& f = *mod.first;
        const std::size_t j = mod.pieces.front().term;
        if (f.shape != m.shape || f.is_embedding != m.is_embedding ||
            std::vector<std::uint64_t>(as.begin() + 1, as.end()) != mod.a_tail || bs[0] != mod.b_rows ||
            std::vector<std::uint64_t>(bs.begin() + 2, bs.end()) != mod.b_tail) {
          throw Error(ErrorCode::kShapeMismatch,
                      fmt::format("{} and {}: module {} does not agree: dW {} ({}, A {}, B {}) in the first, {} ({}, A "
                                  "{}, B {}) in the second; these adapters are not for the same model",
                                  label(j), label(i), quote_name(m.module), format_dims(f.shape), kind_of(f),
                                  format_dims(mod.pieces.front().a.info->shape),
                                  format_dims(mod.pieces.front().b.info->shape), format_dims(m.shape), kind_of(m),
                                  format_dims(as), format_dims(bs)));
        }
        if (f.fan_in_fan_out != m.fan_in_fan_out) {
          throw Error(ErrorCode::kUnsupported,
                      fmt::format("{} and {}: module {} has fan_in_fan_out {} in the first and {} in the second: their "
                                  "deltas are transposed to each other, so they are not combined",
                                  label(j), label(i), quote_name(m.module), f.fan_in_fan_out, m.fan_in_fan_out));
        }
      }
      mod.k += p.a.info->shape[0];
      mod.pieces.push_back(p);
    }
    for (const auto& d : opened[i]->mapping.bias_deltas) {
      Bias& b = biases[d.target];
      const CheckpointTensor& t = ck.at(d.target);  // s * lora_B.bias, F32
      if (b.terms.empty()) {
        b.target = d.target;
        b.module = module_of_target(d.target);
        b.shape = t.info->shape;
      } else if (b.shape != t.info->shape) {
        throw Error(ErrorCode::kShapeMismatch,
                    fmt::format("{} and {}: the lora_B.bias of module {} is {} in the first, {} in the second",
                                label(b.terms.front().first), label(i), quote_name(b.module), format_dims(b.shape),
                                format_dims(t.info->shape)));
      }
      b.terms.emplace_back(i, &t);
    }
    for (const auto& f : opened[i]->mapping.full_tensors) {
      const std::string module = module_of_target(f.target);
      if (const auto it = saved.find(f.target); it != saved.end()) {
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("{} and {}: both save module {} whole (modules_to_save, tensor {}): a combination of "
                                "full tensors is only defined relative to the base model; combine them with `taskvec "
                                "apply BASE -t ...` instead, or leave one out",
                                label(it->second.first), label(i), quote_name(module), quote_name(f.target)));
      }
      if (terms[i].lambda != 1) {
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("{}: module {} is saved whole (modules_to_save, tensor {}) and its lambda is {}: a "
                                "scaled full tensor is only defined relative to the base model (theta_base + lambda * "
                                "(saved - base)); use lambda 1, or `taskvec apply BASE -t ...`",
                                label(i), quote_name(module), quote_name(f.target), terms[i].lambda));
      }
      saved[f.target] = {i, &ck.at(f.target)};
    }
  }
  for (const auto& [target, s] : saved) {
    if (modules.count(target) || biases.count(target)) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("{}: tensor {} is saved whole (modules_to_save) there but is a LoRA target of another "
                              "input: a PEFT module is either a LoRA target or saved whole",
                              label(s.first), quote_name(target)));
    }
  }
  bool fan_in_fan_out = false;
  if (!modules.empty()) {
    const Module& f = modules.begin()->second;
    fan_in_fan_out = f.first->fan_in_fan_out;
    for (const auto& [target, m] : modules) {
      if (!m.first->is_embedding && m.first->fan_in_fan_out != fan_in_fan_out) {
        throw Error(ErrorCode::kUnsupported,
                    fmt::format("{} and {}: module {} has fan_in_fan_out {} but module {} has {}: adapter_config.json "
                                "has one fan_in_fan_out for every module",
                                label(f.pieces.front().term), label(m.pieces.front().term), quote_name(f.first->module),
                                fan_in_fan_out, quote_name(m.first->module), m.first->fan_in_fan_out));
      }
    }
  }
  for (const auto& [target, m] : modules) {
    if (options.rank > 0 && (m.b_rows > INT_MAX || m.a_cols > INT_MAX || m.k > INT_MAX)) {
      throw Error(ErrorCode::kUnsupported, fmt::format("{}: module {} is too large for LAPACK's int dimensions",
                                                       label(m.pieces.front().term), quote_name(m.first->module)));
    }
  }
  if (modules.empty() && biases.empty() && saved.empty()) {
    throw Error(ErrorCode::kInvalidArgument, "nothing to combine: the adapters have no tensors");
  }
  std::vector<const Checkpoint*> inputs_ck;
  for (const auto& t : terms) inputs_ck.push_back(t.adapter);
  detail::check_adapter_output(output, inputs_ck, options.force);

  // ---- 2. the factors ----
  CombineAdaptersReport report;
  report.output = output;
  std::vector<TensorSpec> specs;
  std::map<std::string, std::pair<std::vector<double>, std::vector<double>>> factors;  // target -> (A, B)
  std::map<std::string, int> ranks;
  for (const auto& [target, m] : modules) {
    const std::string p = detail::kAdapterPrefix + m.first->module;
    const std::uint64_t k = m.k;
    // Concatenated: A [k, a_cols] stacked, B [b_rows, k] with each input's columns times lambda * s.
    std::vector<double> a(k * m.a_cols), b(m.b_rows * k);
    std::uint64_t off = 0;
    for (const Piece& piece : m.pieces) {
      const std::uint64_t r = piece.a.info->shape[0];
      const auto pa = read_f64(piece.a);
      const auto pb = read_f64(piece.b);
      std::copy(pa.begin(), pa.end(), a.begin() + static_cast<std::ptrdiff_t>(off * m.a_cols));
      for (std::uint64_t o = 0; o < m.b_rows; ++o)
        for (std::uint64_t j = 0; j < r; ++j) b[o * k + off + j] = piece.coef * pb[o * r + j];
      off += r;
    }
    CombinedModuleReport rep;
    rep.tensor = target;
    rep.module = m.first->module;
    rep.kind = kind_of(*m.first);
    rep.shape = m.first->shape;
    for (const Piece& piece : m.pieces) rep.inputs.push_back(piece.term);
    rep.input_rank = static_cast<int>(k);
    std::uint64_t rank = k;
    if (options.rank > 0) {
      const int rows = static_cast<int>(m.b_rows), cols = static_cast<int>(m.a_cols), ki = static_cast<int>(k);
      std::vector<double> dw(m.b_rows * m.a_cols);
      detail::gemm_rm(false, false, rows, cols, ki, b.data(), ki, a.data(), cols, dw.data(), cols);
      double norm2 = 0;
      for (double v : dw) norm2 += v * v;
      detail::SvdOptions svd_options;
      svd_options.method = options.svd == LoraSvdMethod::kExact        ? detail::SvdMethod::kExact
                           : options.svd == LoraSvdMethod::kRandomized ? detail::SvdMethod::kRandomized
                                                                       : detail::SvdMethod::kAuto;
      const int want = static_cast<int>(std::min<std::uint64_t>(static_cast<std::uint64_t>(options.rank), k));
      const detail::TruncatedSvd svd = detail::truncated_svd(dw, rows, cols, want, svd_options);
      dw = {};
      const int kept = svd.rank;
      double kept2 = 0;
      for (int j = 0; j < kept; ++j) kept2 += svd.s[j] * svd.s[j];
      rep.delta_norm = std::sqrt(norm2);
      rep.randomized = svd.randomized;
      if (norm2 > 0) {
        if (!svd.randomized) {
          double dropped2 = 0;
          for (std::size_t j = static_cast<std::size_t>(kept); j < svd.all_s.size(); ++j) dropped2 += svd.all_s[j] * svd.all_s[j];
          rep.relative_error = std::sqrt(dropped2) / rep.delta_norm;
        } else {
          rep.relative_error = std::sqrt(std::max(0.0, norm2 - kept2)) / rep.delta_norm;
        }
      }
      rank = static_cast<std::uint64_t>(kept);
      a.assign(rank * m.a_cols, 0.0);
      b.assign(m.b_rows * rank, 0.0);
      for (std::uint64_t j = 0; j < rank; ++j)
        for (std::uint64_t c = 0; c < m.a_cols; ++c) a[j * m.a_cols + c] = svd.vt[j * m.a_cols + c];
      for (std::uint64_t o = 0; o < m.b_rows; ++o)
        for (std::uint64_t j = 0; j < rank; ++j) b[o * rank + j] = svd.u[o * rank + j] * svd.s[j];
    }
    rep.rank = static_cast<int>(rank);
    std::vector<std::uint64_t> a_shape{rank}, b_shape{m.b_rows, rank};
    a_shape.insert(a_shape.end(), m.a_tail.begin(), m.a_tail.end());
    b_shape.insert(b_shape.end(), m.b_tail.begin(), m.b_tail.end());
    const bool embed = m.first->is_embedding;
    specs.push_back({p + (embed ? ".lora_embedding_A" : ".lora_A.weight"), dtype, a_shape});
    specs.push_back({p + (embed ? ".lora_embedding_B" : ".lora_B.weight"), dtype, b_shape});
    ranks[m.first->module] = rep.rank;
    report.target_modules.push_back(m.first->module);
    factors[target] = {std::move(a), std::move(b)};
    report.modules.push_back(std::move(rep));
  }
  std::map<std::string, std::vector<double>> bias_values;
  std::vector<std::byte> staging;
  for (const auto& [target, bias] : biases) {
    std::vector<double> sum(product(bias.shape), 0.0), x(sum.size());
    CombinedModuleReport rep;
    for (const auto& [i, t] : bias.terms) {
      detail::read_decoded(*t, 0, x.size(), x.data(), staging);
      for (std::size_t j = 0; j < x.size(); ++j) sum[j] += terms[i].lambda * x[j];
      rep.inputs.push_back(i);
    }
    specs.push_back({detail::kAdapterPrefix + bias.module + ".lora_B.bias", dtype, bias.shape});
    rep.tensor = target;
    rep.module = bias.module;
    rep.kind = "lora_bias";
    rep.shape = bias.shape;
    report.modules.push_back(std::move(rep));
    bias_values[target] = std::move(sum);
  }
  std::set<std::string> to_save;
  for (const auto& [target, s] : saved) {
    specs.push_back({detail::kAdapterPrefix + target, s.second->info->dtype, s.second->info->shape});
    CombinedModuleReport rep;
    rep.tensor = target;
    rep.module = module_of_target(target);
    rep.kind = "modules_to_save";
    rep.shape = s.second->info->shape;
    rep.inputs = {s.first};
    to_save.insert(rep.module);
    report.modules.push_back(std::move(rep));
  }
  std::sort(report.modules.begin(), report.modules.end(),
            [](const CombinedModuleReport& x, const CombinedModuleReport& y) { return x.tensor < y.tensor; });
  report.modules_to_save.assign(to_save.begin(), to_save.end());
  report.r = 0;
  for (const auto& [m, r] : ranks) report.r = std::max(report.r, r);
  if (report.r == 0) report.r = 1;  // no LoRA module (only saved tensors / biases): any r

  detail::AdapterConfigFields fields;
  fields.r = report.r;
  fields.module_ranks = ranks;
  fields.target_modules = report.target_modules;
  fields.modules_to_save = report.modules_to_save;
  fields.lora_bias = !biases.empty();
  fields.fan_in_fan_out = fan_in_fan_out;
  fields.base_model_name = options.base_model_name.empty() ? terms[0].adapter->adapter_base_model() : options.base_model_name;
  report.adapter_config = detail::adapter_config_text(fields);

  // ---- 3. write ----
  std::vector<fs::path> inputs;
  for (const auto& t : terms) {
    for (auto& f : detail::adapter_input_paths(*t.adapter)) inputs.push_back(std::move(f));
    if (t.adapter->folder()) inputs.push_back(*t.adapter->folder());
  }
  const auto writer = detail::make_adapter_writer(output, std::move(specs), options.force, inputs, report.bytes_written);
  std::vector<std::byte> bytes;
  for (const auto& [target, m] : modules) {
    const std::string p = detail::kAdapterPrefix + m.first->module;
    const bool embed = m.first->is_embedding;
    const auto& [a, b] = factors.at(target);
    encode_checked("module " + quote_name(m.first->module) + " factor A", dtype, a, bytes);
    writer->write(p + (embed ? ".lora_embedding_A" : ".lora_A.weight"), 0, bytes);
    encode_checked("module " + quote_name(m.first->module) + " factor B", dtype, b, bytes);
    writer->write(p + (embed ? ".lora_embedding_B" : ".lora_B.weight"), 0, bytes);
  }
  for (const auto& [target, bias] : biases) {
    encode_checked("module " + quote_name(bias.module) + " lora_B.bias", dtype, bias_values.at(target), bytes);
    writer->write(detail::kAdapterPrefix + bias.module + ".lora_B.bias", 0, bytes);
  }
  for (const auto& [target, s] : saved) {
    const std::uint64_t size = s.second->info->num_bytes();
    for (std::uint64_t off = 0; off < size; off += detail::kReadPieceBytes) {
      bytes.resize(std::min<std::uint64_t>(detail::kReadPieceBytes, size - off));
      s.second->read(off, bytes);
      writer->write(detail::kAdapterPrefix + target, off, bytes);
    }
  }
  writer->commit({}, {{detail::kAdapterConfigFile, report.adapter_config}});
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace taskvec
