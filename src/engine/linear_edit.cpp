// The streaming task-arithmetic kernel: out = s*base + sum a_i (x_i - base) + sum b_j tau_j, chunk by
// chunk, on worker threads, written at precomputed offsets (see include/taskvec/engine.hpp).
#include <algorithm>
#include <deque>
#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "base/simd_clones.hpp"
#include "engine/internal.hpp"
#include "engine/overflow.hpp"
#include "engine/parallel.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

// A chunk is at most 64 Ki elements: its staged input bytes (4 BF16 inputs: 512 KiB) stay in the L2
// cache from the pread that copies them out of the page cache to their decode.
constexpr std::uint64_t kMaxChunkElements = 1u << 16;
// A chunk is computed in blocks whose decoded base, accumulator and input (3 x 8 KiB in f32) stay in L1:
// every pass over them after the decode hits L1.
constexpr std::uint64_t kBlockElements = 2048;
constexpr std::uint64_t kCopyItemBytes = std::uint64_t{8} << 20;
constexpr std::uint64_t kLaneBytes = 3 * kBlockElements * sizeof(double);  // Lanes<float> + Lanes<double>, at most

std::string file_of(const CheckpointTensor& t) { return t.file().string(); }

enum class DtypePolicy { kBase, kTaskVector };

struct Job {
  const CheckpointTensor* base = nullptr;
  std::vector<const CheckpointTensor*> inputs;  // aligned with terms
  DType out = DType::kF32;
  bool compute = false;  // false: raw byte copy of the base tensor
  bool apply_terms = false;  // false: out = base_scale * base only (tensor not selected)
  bool wide = false;     // f64 arithmetic
  std::size_t shard = 0, index = 0;
  std::uint64_t elements = 0, chunk = 0, chunks = 0;
  std::atomic<std::uint64_t> chunks_left{0};
  std::atomic<bool> nonzero{false};  // some chunk's result has an element != 0 (issue 10: all-zero outputs)
  std::vector<std::uint64_t> shape;            // output shape
  // --merge-extra-rows: inputs whose first dimension differs from the base's (e.g. a vocabulary of
  // 32007 rows against 32000). Rows all inputs share are combined; the others are copied.
  bool resized = false;
  std::uint64_t base_elements = 0;             // elements the base has
  std::vector<std::uint64_t> input_elements;   // elements each input has (aligned with inputs)
  std::atomic<std::uint64_t> clamped{0};       // --clamp-overflow: elements saturated to the dtype's range
};

struct Item {
  std::size_t job;
  std::uint64_t begin;  // element (compute) or byte (copy) offset
  std::uint64_t count;
};



template <typename T>
bool all_finite(const T* v, std::uint64_t n) {
  // Branch-free OR-reduction so the loop vectorizes; NaN and Inf both fail v - v == 0.
  bool ok = true;
  for (std::uint64_t i = 0; i < n; ++i) ok &= (v[i] - v[i] == T(0));
  return ok;
}

// acc += a * (x - base) and acc += a * x over one block. The f32 versions are also compiled for AVX2
// (base/simd_clones.hpp: no FMA, so the bytes do not depend on the CPU).
template <typename T>
void add_relative(T* __restrict acc, const T* __restrict x, const T* __restrict base, T a, std::uint64_t n) {
  for (std::uint64_t i = 0; i < n; ++i) acc[i] += a * (x[i] - base[i]);
}
template <typename T>
void add_absolute(T* __restrict acc, const T* __restrict x, T a, std::uint64_t n) {
  for (std::uint64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}
TASKVEC_SIMD_CLONES void add_relative(float* __restrict acc, const float* __restrict x, const float* __restrict base,
                                      float a, std::uint64_t n) {
  for (std::uint64_t i = 0; i < n; ++i) acc[i] += a * (x[i] - base[i]);
}
TASKVEC_SIMD_CLONES void add_absolute(float* __restrict acc, const float* __restrict x, float a, std::uint64_t n) {
  for (std::uint64_t i = 0; i < n; ++i) acc[i] += a * x[i];
}
// acc += a * (x - base) with x read straight from little-endian BF16 bytes: the widening (the BF16 bits
// as the top half of an f32) is exact, as decode_to_f32's is, and saves one pass through the block.
// decode_to_f32 also quiets a signalling NaN; here the subtraction quiets it, keeping the payload, so
// every finite result is bit for bit the decode + add_relative one (NaN only under --allow-nonfinite).
TASKVEC_SIMD_CLONES void add_relative_bf16(float* __restrict acc, const std::byte* __restrict x,
                                           const float* __restrict base, float a, std::uint64_t n) {
  for (std::uint64_t i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, x + 2 * i, sizeof bits);
    const float v = std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
    acc[i] += a * (v - base[i]);
  }
}
// An integer OR-reduction, which vectorizes (the bool AND of all_finite does not, at ~9 instructions per
// element): adding one to the exponent field carries into bit 31 exactly when the exponent is all ones
// (Inf or NaN).
TASKVEC_SIMD_CLONES bool all_finite_f32(const float* __restrict v, std::uint64_t n) {
  std::uint32_t carry = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, v + i, sizeof bits);
    carry |= (bits & 0x7F80'0000u) + 0x0080'0000u;
  }
  return (carry & 0x8000'0000u) == 0;
}

// Whether some element of v is != 0 (+0 and -0 are zero; NaN counts as nonzero): an integer
// OR-reduction of the bits without the sign bit, which vectorizes.
template <typename T>
bool any_nonzero(const T* __restrict v, std::uint64_t n) {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  U bits = 0;
  for (std::uint64_t i = 0; i < n; ++i) bits |= std::bit_cast<U>(v[i]);
  return (bits & ~(U{1} << (8 * sizeof(U) - 1))) != 0;
}

// The same OR-reduction over encoded F16 / BF16 bits: true when no element is Inf or NaN (exponent field
// all ones: 0x7C00 for F16, 0x7F80 for BF16). Reads half the bytes of a check on the f32 accumulator.
TASKVEC_SIMD_CLONES bool all_finite_u16(const std::byte* __restrict v, std::uint64_t n, std::uint32_t exp_mask,
                                        std::uint32_t exp_low) {
  std::uint32_t carry = 0;
  for (std::uint64_t i = 0; i < n; ++i) {
    std::uint16_t bits;
    std::memcpy(&bits, v + 2 * i, sizeof bits);
    carry |= (static_cast<std::uint32_t>(bits) & exp_mask) + exp_low;
  }
  return (carry & 0x8000u) == 0;
}

template <typename T>
void decode(DType dtype, const std::byte* src, T* dst, std::uint64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    decode_to_f32(dtype, src, dst, n);
  } else {
    decode_to_f64(dtype, src, dst, n);
  }
}

template <typename T>
void encode(DType dtype, const T* src, std::byte* dst, std::uint64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    encode_from_f32(dtype, src, dst, n);
  } else {
    encode_from_f64(dtype, src, dst, n);
  }
}

template <typename T>
struct Lanes {
  std::vector<T> base, acc, tmp;
  void reserve(std::uint64_t n) {
    if (base.size() < n) {
      base.resize(n);
      acc.resize(n);
      tmp.resize(n);
    }
  }
};

// Per-worker scratch, reused across chunks: decoded base, accumulator, decoded input, encoded output.
struct Buffers {
  Lanes<float> f32;
  Lanes<double> f64;
  std::vector<std::byte> out;
  std::vector<std::byte> staged;  // the chunk's input bytes, read with pread
  std::vector<const std::byte*> sources;  // where each input's bytes start in `staged`
  template <typename T>
  Lanes<T>& lanes() {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      return f64;
    }
  }
};

class Engine {
 public:
  Engine(const Checkpoint& base, double base_scale, const std::vector<LinearTerm>& terms, const EditOptions& options,
         DtypePolicy policy)
      : inputs_(reconcile(base, terms, options.untie_embeddings)),
        base_(inputs_.inputs.front()),
        scale_(base_scale),
        terms_(retarget(terms, inputs_)),
        options_(options),
        policy_(policy) {}

  EditReport run(const std::filesystem::path& output, std::map<std::string, std::string> metadata) {
    auto start = std::chrono::steady_clock::now();
    EditReport report;
    report.warnings = inputs_.warnings;
    for (const auto& c : inputs_.inputs) report.warnings.insert(report.warnings.end(), c.notes().begin(), c.notes().end());
    detail::check_input_configs(inputs_.inputs, options_.merge_extra_rows, report.warnings);
    plan_jobs(report);
    std::vector<TensorSpec> specs;
    specs.reserve(jobs_.size());
    for (const auto& job : jobs_) specs.push_back({job->base->info->name, job->out, job->shape});
    for (const auto& [k, v] : options_.extra_metadata) metadata[k] = v;
    report.plan = CheckpointPlan::build(output, std::move(specs), metadata, options_.write);
    for (auto& job : jobs_) {
      auto [shard, index] = report.plan.location.at(job->base->info->name);
      job->shard = shard;
      job->index = index;
    }
    threads_ = detail::resolve_threads(options_.threads);
    // Bytes per element of a chunk in flight on one worker: the staged input bytes and the encoded
    // output (and, for --merge-extra-rows, three decoded vectors).
    std::uint64_t per_element = 1;
    std::uint64_t largest = 1;  // no buffer is larger than the largest computed tensor
    for (const auto& job : jobs_) {
      if (!job->compute) continue;
      largest = std::max(largest, job->elements);
      std::uint64_t bytes = dtype_bits(job->base->info->dtype) / 8 + dtype_bits(job->out) / 8;
      if (job->apply_terms) {
        for (const CheckpointTensor* t : job->inputs) bytes += dtype_bits(t->info->dtype) / 8;
      }
      if (job->resized) bytes += 3 * (job->wide ? sizeof(double) : sizeof(float));
      per_element = std::max(per_element, bytes);
    }
    const std::uint64_t fixed = kLaneBytes + detail::kReadPieceBytes;  // lanes; staging of copies and decodes
    const std::uint64_t per_worker = options_.memory_budget / threads_;
    chunk_elements_ = std::clamp<std::uint64_t>(per_worker > fixed ? (per_worker - fixed) / per_element : 0, 1024,
                                                kMaxChunkElements);
    chunk_elements_ = std::min(chunk_elements_, largest);
    report.peak_chunk_bytes = std::uint64_t(threads_) * (chunk_elements_ * per_element + fixed);
    if (options_.dry_run) {
      report.seconds = seconds_since(start);
      return report;
    }

    std::vector<std::filesystem::path> inputs;
    inputs.insert(inputs.end(), base_.files().begin(), base_.files().end());
    for (const auto& term : terms_) inputs.insert(inputs.end(), term.input->files().begin(), term.input->files().end());
    for (const auto& c : inputs_.inputs) if (c.folder()) inputs.push_back(*c.folder());  // protects input folders
    CheckpointWriter writer(report.plan, options_.write, inputs);

    std::vector<Item> items = make_items();
    std::vector<Buffers> buffers(threads_);
    std::atomic<std::uint64_t> bytes_done{0}, tensors_done{0}, bytes_read{0};
    std::uint64_t bytes_total = report.plan.total_bytes;
    auto stream_start = std::chrono::steady_clock::now();
    auto report_progress = [&] {
      if (!options_.on_progress) return;
      Progress p;
      p.tensors_done = tensors_done.load();
      p.tensors_total = jobs_.size();
      p.bytes_done = bytes_done.load();
      p.bytes_total = bytes_total;
      p.seconds = seconds_since(stream_start);
      options_.on_progress(p);
    };
    detail::parallel_for(
        items.size(), threads_,
        [&](std::size_t i, unsigned worker) {
          const Item& item = items[i];
          Job& job = *jobs_[item.job];
          std::uint64_t read = 0, written = 0;
          if (!job.compute) {
            detail::copy_tensor_bytes(*job.base, item.begin, item.count, writer, job.shard, job.index, buffers[worker].staged);
            read = written = item.count;
          } else if (job.resized) {
            if (job.wide) {
              run_resized_chunk<double>(job, item, buffers[worker], writer, read, written);
            } else {
              run_resized_chunk<float>(job, item, buffers[worker], writer, read, written);
            }
          } else if (job.wide) {
            run_chunk<double>(job, item, buffers[worker], writer, read, written);
          } else {
            run_chunk<float>(job, item, buffers[worker], writer, read, written);
          }
          bytes_done += written;
          bytes_read += read;
          if (job.chunks_left.fetch_sub(1) == 1) ++tensors_done;
        },
        report_progress);
    report_progress();
    warn_zero_outputs(report);
    for (const auto& job : jobs_) {
      if (job->clamped.load() == 0) continue;
      report.warnings.push_back(fmt::format("tensor '{}': {} element(s) beyond the largest finite {} value {} were "
                                            "clamped to it (--clamp-overflow)",
                                            job->base->info->name, job->clamped.load(), dtype_name(job->out),
                                            dtype_max_finite(job->out)));
    }
    if (report.plan.is_folder && base_.folder()) {
      const detail::OutputAuxiliary aux = detail::output_auxiliary_files(
          base_, inputs_.untied_base, detail::output_vocab(report.plan, inputs_.inputs));
      report.warnings.insert(report.warnings.end(), aux.warnings.begin(), aux.warnings.end());
      writer.commit(aux.copies, aux.generated);
      report.auxiliary_files = aux.file_names();
    } else {
      writer.commit();
    }
    report.bytes_read = bytes_read.load();
    report.bytes_written = bytes_done.load();
    report.seconds = seconds_since(start);
    return report;
  }

 private:
  static double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
  }

  void plan_jobs(EditReport& report) {
    const detail::TensorFilter filter(options_.include, options_.exclude);
    if (options_.out_dtype && !dtype_is_writable_float(*options_.out_dtype)) {
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("--dtype {} is not a float dtype taskvec can write (F32, F16, BF16, F64, F8_E4M3, F8_E5M2)",
                              dtype_name(*options_.out_dtype)));
    }
    // Every check on the inputs is the shared one (input_check.cpp), as for merge and similarity.
    const std::string base_file = base_.path().string();
    for (const auto& term : terms_) {
      for (const auto& name : term.input->tensor_names()) {
        if (base_.find(name) == nullptr) {
          detail::throw_extra_tensor(name, *term.input, base_,
                                     ", the pretrained checkpoint: an edit writes the pretrained checkpoint's "
                                     "tensors only, so it would be lost; give inputs with the same tensors");
        }
      }
    }
    for (const auto& name : base_.tensor_names()) {
      if (options_.only_selected && !filter.selects(name)) continue;  // left out, not copied
      auto job = std::make_unique<Job>();
      job->base = base_.find(name);
      const TensorInfo& bi = *job->base->info;
      bool editable = dtype_is_editable(bi.dtype);
      for (const auto& term : terms_) {
        const CheckpointTensor* t = term.input->find(name);
        if (detail::check_input_tensor(name, base_, *job->base, *term.input, t, /*extra_rows_flag=*/true,
                                       options_.merge_extra_rows) == detail::TensorFit::kExtraRows) {
          job->resized = true;
        }
        if (!editable && term.relative) {
          if (auto w = detail::integer_tensor_change(name, *job->base, *t, "the pretrained checkpoint " + base_file)) {
            report.warnings.push_back(std::move(*w));
          }
        }
        job->inputs.push_back(t);
      }
      job->elements = bi.num_elements();
      job->shape = bi.shape;
      if (job->resized) {
        job->base_elements = job->elements;
        for (const CheckpointTensor* t : job->inputs) {
          job->input_elements.push_back(t->info->num_elements());
          job->shape[0] = std::max(job->shape[0], t->info->shape[0]);
        }
        // Elements per row from the trailing dimensions (all inputs share them), so that a base with no
        // rows still gives the rows of the others.
        std::uint64_t row = 1;
        for (std::size_t d = 1; d < bi.shape.size(); ++d) row *= bi.shape[d];
        job->elements = row * job->shape[0];
        // Each row past the base comes from the first input that has it (run_resized_chunk): one
        // warning per input that provides some.
        std::uint64_t covered = bi.shape[0];
        for (const CheckpointTensor* t : job->inputs) {
          const std::uint64_t rows = t->info->shape[0];
          if (rows <= covered) continue;
          report.warnings.push_back(fmt::format("tensor '{}': rows {}..{} are not in the pretrained checkpoint: copied "
                                                "from {} (the first input that has them), not combined",
                                                name, covered, rows - 1, file_of(*t)));
          covered = rows;
        }
      }
      if (!editable) {
        job->out = bi.dtype;
        job->compute = false;
      } else {
        job->apply_terms = filter.selects(name) && !terms_.empty();
        if (options_.out_dtype) {
          job->out = *options_.out_dtype;
        } else if (policy_ == DtypePolicy::kTaskVector) {
          job->out = bi.dtype == DType::kF64 ? DType::kF64 : DType::kF32;
        } else {
          job->out = bi.dtype;
        }
        bool identity = !job->apply_terms && scale_ == 1.0 && job->out == bi.dtype && !job->resized;
        job->compute = !identity;
        // f64 arithmetic when any side is F64: an F64 task vector of F32 models (diff --dtype f64) then
        // gives the F32 fine-tuned weights back bit for bit (docs/NUMERICS.md).
        job->wide = bi.dtype == DType::kF64 || job->out == DType::kF64;
        for (const CheckpointTensor* t : job->inputs) job->wide = job->wide || t->info->dtype == DType::kF64;
      }
      if (job->compute && (job->apply_terms || scale_ != 1.0)) {
        ++report.tensors_edited;
      } else {
        ++report.tensors_copied;
      }
      jobs_.push_back(std::move(job));
    }
  }

  std::vector<Item> make_items() {
    std::vector<Item> items;
    for (std::size_t j = 0; j < jobs_.size(); ++j) {
      Job& job = *jobs_[j];
      std::uint64_t total = job.compute ? job.elements : job.base->info->num_bytes();
      // Copies move through one read piece at a time whatever the item size; items of kCopyItemBytes
      // only spread large tensors over the workers.
      std::uint64_t step = job.compute ? chunk_elements_ : kCopyItemBytes;
      std::uint64_t n = 0;
      for (std::uint64_t begin = 0; begin < total; begin += step, ++n) {
        items.push_back({j, begin, std::min(step, total - begin)});
      }
      if (total == 0) {
        items.push_back({j, 0, 0});
        n = 1;
      }
      job.chunks_left = n;
    }
    return items;
  }

  // diff writes task vectors, legitimately zero for frozen tensors: no all-zero report there (docs/NUMERICS.md).
  bool track_zero() const { return policy_ != DtypePolicy::kTaskVector; }

  // Issue 10: a computed output tensor whose every element is zero while the base's is not (an edit
  // that erased it) is reported; the base is read again only for those tensors. At most 5 by name.
  void warn_zero_outputs(EditReport& report) const {
    if (!track_zero()) return;
    std::vector<std::string> names;
    std::vector<float> piece;
    std::vector<std::byte> staged;
    for (const auto& job : jobs_) {
      if (!job->compute || job->elements == 0 || job->nonzero.load()) continue;
      constexpr std::uint64_t kPiece = 1u << 16;
      bool base_nonzero = false;
      const std::uint64_t base_elements = job->base->info->num_elements();
      for (std::uint64_t b = 0; b < base_elements && !base_nonzero; b += kPiece) {
        const std::uint64_t count = std::min(kPiece, base_elements - b);
        piece.resize(count);
        detail::read_decoded(*job->base, b, count, piece.data(), staged);
        base_nonzero = any_nonzero(piece.data(), count);
      }
      if (base_nonzero) names.push_back(job->base->info->name);
    }
    for (std::size_t i = 0; i < names.size() && i < 5; ++i) {
      report.warnings.push_back(fmt::format("tensor '{}': every element of the output is zero, while the base "
                                            "checkpoint's tensor is not (check the coefficients)",
                                            names[i]));
    }
    if (names.size() > 5)
      report.warnings.push_back(fmt::format("... and {} more tensors whose every output element is zero", names.size() - 5));
  }

  // --merge-extra-rows: out = s*base + sum of the terms over the elements an input has (the others add
  // nothing); elements past the base come from the first input that has them. Not the hot path.
  template <typename T>
  void run_resized_chunk(Job& job, const Item& item, Buffers& buf, const CheckpointWriter& writer, std::uint64_t& read,
                         std::uint64_t& written) {
    const std::uint64_t n = item.count, begin = item.begin, end = item.begin + item.count;
    std::vector<T> base(n), acc(n, T(0)), tmp(n);
    const TensorInfo& bi = *job.base->info;
    const std::uint64_t nb = begin < job.base_elements ? std::min(n, job.base_elements - begin) : 0;
    detail::read_decoded(*job.base, begin, nb, base.data(), buf.staged);
    read += nb * (dtype_bits(bi.dtype) / 8);
    for (std::uint64_t i = 0; i < nb; ++i) acc[i] = scale_ == 1.0 ? base[i] : static_cast<T>(scale_) * base[i];
    const std::size_t nterms = job.apply_terms ? terms_.size() : 0;
    for (std::size_t k = 0; k < nterms; ++k) {
      const CheckpointTensor& in = *job.inputs[k];
      const std::uint64_t size = dtype_bits(in.info->dtype) / 8;
      const std::uint64_t have = job.input_elements[k] > begin ? std::min(nb, job.input_elements[k] - begin) : 0;
      detail::read_decoded(in, begin, have, tmp.data(), buf.staged);
      read += have * size;
      const T a = static_cast<T>(terms_[k].coefficient);
      for (std::uint64_t i = 0; i < have; ++i) acc[i] += terms_[k].relative ? a * (tmp[i] - base[i]) : a * tmp[i];
    }
    for (std::uint64_t pos = begin + nb; pos < end;) {
      std::size_t k = 0;
      while (job.input_elements[k] <= pos) ++k;  // some input has every output element
      const CheckpointTensor& in = *job.inputs[k];
      const std::uint64_t size = dtype_bits(in.info->dtype) / 8;
      const std::uint64_t count = std::min(end, job.input_elements[k]) - pos;
      detail::read_decoded(in, pos, count, acc.data() + (pos - begin), buf.staged);
      read += count * size;
      pos += count;
    }
    if (!options_.allow_nonfinite && !all_finite(acc.data(), n)) {
      throw Error(ErrorCode::kNonFinite, fmt::format("tensor '{}': NaN or Inf in the inputs or the result near element {} "
                                                     "(use --allow-nonfinite to proceed)",
                                                     bi.name, begin));
    }
    if (track_zero() && !job.nonzero.load(std::memory_order_relaxed) && any_nonzero(acc.data(), n))
      job.nonzero.store(true, std::memory_order_relaxed);
    const std::uint64_t osize = dtype_bits(job.out) / 8;
    if (osize < sizeof(T)) {
      job.clamped += detail::check_overflow(job.out, acc.data(), n, begin, bi.name, file_of(*job.base),
                                            options_.clamp_overflow);
    }
    if (buf.out.size() < n * osize) buf.out.resize(n * osize);
    encode<T>(job.out, acc.data(), buf.out.data(), n);
    writer.write(job.shard, job.index, begin * osize, std::span<const std::byte>(buf.out.data(), n * osize));
    written += n * osize;
  }

  template <typename T>
  void run_chunk(Job& job, const Item& item, Buffers& buf, const CheckpointWriter& writer, std::uint64_t& read,
                 std::uint64_t& written) {
    const std::uint64_t n = item.count;
    Lanes<T>& lanes = buf.lanes<T>();
    lanes.reserve(std::min(n, kBlockElements));
    T* base = lanes.base.data();
    T* acc = lanes.acc.data();
    T* tmp = lanes.tmp.data();
    const TensorInfo& bi = *job.base->info;
    const std::uint64_t bsize = dtype_bits(bi.dtype) / 8;
    const std::size_t nterms = job.apply_terms ? terms_.size() : 0;
    // Stage the chunk's bytes of every input: pread copies them out of the page cache (cat's cost)
    // into this worker's buffer. Reading through the mapping instead cost page faults, MADV_DONTNEED
    // calls with cross-core TLB shootdowns, and decodes stalled on first reads of page-cache memory:
    // the 125m benchmark's edit took 0.25 s that way, 0.20 s this way (docs/BENCHMARKS.md).
    std::uint64_t staged_bytes = n * bsize;
    for (std::size_t k = 0; k < nterms; ++k) staged_bytes += n * (dtype_bits(job.inputs[k]->info->dtype) / 8);
    if (buf.staged.size() < staged_bytes) buf.staged.resize(staged_bytes);
    std::vector<const std::byte*>& src = buf.sources;
    src.resize(nterms + 1);
    {
      std::byte* at = buf.staged.data();
      auto stage = [&](const CheckpointTensor& t) {
        const std::uint64_t size = dtype_bits(t.info->dtype) / 8;
        t.read(item.begin * size, {at, n * size});
        at += n * size;
        return at - n * size;
      };
      src[0] = stage(*job.base);
      for (std::size_t k = 0; k < nterms; ++k) src[k + 1] = stage(*job.inputs[k]);
    }
    const std::byte* base_bytes = src[0];
    const std::uint64_t osize = dtype_bits(job.out) / 8;
    if (buf.out.size() < n * osize) buf.out.resize(n * osize);
    const T s = static_cast<T>(scale_);
    // The output dtype is narrower than the accumulator: a finite result may not fit it (F16 > 65504).
    const bool narrows = osize < sizeof(T);
    // F16 / BF16 from f32 (the hot case): check the encoded block, which holds an Inf exactly where a
    // finite result overflowed (or an input was non-finite: check_overflow then finds nothing).
    const bool check_encoded = std::is_same_v<T, float> && std::endian::native == std::endian::little &&
                               (job.out == DType::kF16 || job.out == DType::kBF16);
    const std::uint32_t exp_mask = job.out == DType::kF16 ? 0x7C00u : 0x7F80u;
    const std::uint32_t exp_low = job.out == DType::kF16 ? 0x0400u : 0x0080u;
    std::uint64_t clamped = 0;
    bool finite = true;
    // Once a block of the job has a nonzero result, no later block checks (one cheap OR pass at most per chunk).
    bool nonzero = !track_zero() || job.nonzero.load(std::memory_order_relaxed);
    for (std::uint64_t b = 0; b < n; b += kBlockElements) {
      const std::uint64_t m = std::min(kBlockElements, n - b);
      decode<T>(bi.dtype, base_bytes + b * bsize, base, m);
      if (scale_ == 1.0) {
        std::copy(base, base + m, acc);
      } else if (scale_ == 0.0) {
        std::fill(acc, acc + m, T(0));
      } else {
        for (std::uint64_t i = 0; i < m; ++i) acc[i] = s * base[i];
      }
      for (std::size_t k = 0; k < nterms; ++k) {
        const CheckpointTensor& in = *job.inputs[k];
        const std::uint64_t isize = dtype_bits(in.info->dtype) / 8;
        const T a = static_cast<T>(terms_[k].coefficient);
        if constexpr (std::is_same_v<T, float> && std::endian::native == std::endian::little) {
          if (terms_[k].relative && in.info->dtype == DType::kBF16) {
            add_relative_bf16(acc, src[k + 1] + b * isize, base, a, m);
            continue;
          }
        }
        decode<T>(in.info->dtype, src[k + 1] + b * isize, tmp, m);
        if (terms_[k].relative) {
          add_relative(acc, tmp, base, a, m);
        } else {
          add_absolute(acc, tmp, a, m);
        }
      }
      if (!options_.allow_nonfinite) {
        if constexpr (std::is_same_v<T, float>) {
          finite &= all_finite_f32(acc, m);
        } else {
          finite &= all_finite(acc, m);
        }
      }
      if (!nonzero) nonzero = any_nonzero(acc, m);
      std::byte* out = buf.out.data() + b * osize;
      if (check_encoded) {
        encode<T>(job.out, acc, out, m);
        if (!all_finite_u16(out, m, exp_mask, exp_low)) {
          const std::uint64_t c = detail::check_overflow(job.out, acc, m, item.begin + b, bi.name, file_of(*job.base),
                                                         options_.clamp_overflow);
          if (c != 0) encode<T>(job.out, acc, out, m);  // the clamped values
          clamped += c;
        }
        continue;
      }
      if (narrows) {
        clamped += detail::check_overflow(job.out, acc, m, item.begin + b, bi.name, file_of(*job.base),
                                          options_.clamp_overflow);
      }
      encode<T>(job.out, acc, out, m);
    }
    if (clamped != 0) job.clamped += clamped;
    if (nonzero && !job.nonzero.load(std::memory_order_relaxed)) job.nonzero.store(true, std::memory_order_relaxed);
    read += staged_bytes;
    if (!finite) report_nonfinite<T>(job, item, buf);
    writer.write(job.shard, job.index, item.begin * osize, std::span<const std::byte>(buf.out.data(), n * osize));
    written += n * osize;
  }

  // Slow path, only after a non-finite result: find which input holds the NaN/Inf, for the message.
  template <typename T>
  [[noreturn]] void report_nonfinite(const Job& job, const Item& item, Buffers& buf) {
    buf.lanes<T>().reserve(item.count);
    T* tmp = buf.lanes<T>().tmp.data();
    const std::string& name = job.base->info->name;
    std::vector<const CheckpointTensor*> all{job.base};
    if (job.apply_terms) all.insert(all.end(), job.inputs.begin(), job.inputs.end());
    for (const CheckpointTensor* t : all) {
      detail::read_decoded(*t, item.begin, item.count, tmp, buf.staged);
      for (std::uint64_t i = 0; i < item.count; ++i) {
        if (!std::isfinite(tmp[i])) {
          throw Error(ErrorCode::kNonFinite,
                      fmt::format("tensor '{}' in {}: element {} is {} (use --allow-nonfinite to proceed)", name,
                                  file_of(*t), item.begin + i, std::isnan(tmp[i]) ? "NaN" : "Inf"));
        }
      }
    }
    // Every input is finite: the arithmetic itself overflowed (beyond +-3.4e38 in f32). Name the element.
    decode<T>(job.out, buf.out.data(), tmp, item.count);
    std::uint64_t at = 0;
    while (at + 1 < item.count && std::isfinite(tmp[at])) ++at;
    throw Error(ErrorCode::kOverflow,
                fmt::format("tensor '{}' (from {}): element {} overflows the {} arithmetic (beyond +-{}) although "
                            "every input is finite (coefficients too large?); use --dtype f64 to compute in f64, "
                            "or --allow-nonfinite to write Inf",
                            name, file_of(*job.base), item.begin + at, std::is_same_v<T, float> ? "f32" : "f64",
                            std::is_same_v<T, float> ? dtype_max_finite(DType::kF32) : dtype_max_finite(DType::kF64)));
  }

  // The base is inputs_.inputs[0], the terms' checkpoints follow in order (copies that may carry an
  // lm_head alias, see reconcile_tied_embeddings).
  static ReconciledInputs reconcile(const Checkpoint& base, const std::vector<LinearTerm>& terms, bool untie) {
    std::vector<const Checkpoint*> all{&base};
    for (const auto& term : terms) {
      if (term.input == nullptr) throw Error(ErrorCode::kInternal, "linear_edit: null input checkpoint");
      all.push_back(term.input);
    }
    for (const Checkpoint* c : all) detail::check_not_quantized(*c);  // before anything else is read
    return reconcile_tied_embeddings(all, untie);
  }
  static std::vector<LinearTerm> retarget(std::vector<LinearTerm> terms, const ReconciledInputs& inputs) {
    for (std::size_t i = 0; i < terms.size(); ++i) terms[i].input = &inputs.inputs[i + 1];
    return terms;
  }

  ReconciledInputs inputs_;
  const Checkpoint& base_;
  double scale_;
  std::vector<LinearTerm> terms_;
  const EditOptions& options_;
  DtypePolicy policy_;
  std::vector<std::unique_ptr<Job>> jobs_;
  unsigned threads_ = 1;
  std::uint64_t chunk_elements_ = kMaxChunkElements;
};

}  // namespace

EditReport linear_edit(const Checkpoint& base, double base_scale, const std::vector<LinearTerm>& terms,
                       const std::filesystem::path& output, const EditOptions& options) {
  return Engine(base, base_scale, terms, options, DtypePolicy::kBase).run(output, base.metadata());
}

EditReport make_task_vector(const Checkpoint& pretrained, const Checkpoint& given_finetuned,
                            const std::filesystem::path& output, const EditOptions& options) {
  // An adapter as FINETUNED: the model it defines over PRETRAINED, so the result is its dense delta.
  detail::require_model(pretrained, "PRETRAINED of diff");
  std::optional<Checkpoint> adapter_model;
  const Checkpoint& finetuned = detail::as_model(given_finetuned, pretrained, adapter_model);
  // A task vector as either side makes a difference of a difference: refused unless --force.
  std::vector<std::string> warnings;
  for (const auto& [ckpt, role] : {std::pair{&pretrained, "PRETRAINED"}, std::pair{&finetuned, "FINETUNED"}}) {
    auto w = detail::task_vector_as_model_warning(*ckpt, fmt::format("{} of diff", role));
    if (!w) continue;
    if (!options.force_base) {
      throw Error(ErrorCode::kBaseMismatch, fmt::format("{}; diff takes two models (--force proceeds anyway)", *w));
    }
    warnings.push_back(fmt::format("--force: {}", *w));
  }
  std::vector<LinearTerm> terms{{&finetuned, 1.0, true}};
  auto metadata = pretrained.metadata();
  metadata[kMetaKind] = "task_vector";
  metadata[kMetaPretrainedFingerprint] = pretrained.fingerprint();
  metadata[kMetaPretrainedName] = pretrained.path().filename().string();
  metadata[kMetaFinetunedName] = finetuned.path().filename().string();
  EditReport report = Engine(pretrained, 0.0, terms, options, DtypePolicy::kTaskVector).run(output, metadata);
  report.warnings.insert(report.warnings.begin(), warnings.begin(), warnings.end());
  if (options.out_dtype && *options.out_dtype != DType::kF32 && *options.out_dtype != DType::kF64) {
    report.warnings.push_back(fmt::format("task vector stored as {}: applying it will no longer give back the fine-tuned "
                                          "weights bit for bit (F32, the default, does for BF16/F16 models)",
                                          dtype_name(*options.out_dtype)));
  }
  return report;
}

EditReport apply_task_vectors(const Checkpoint& pretrained, const std::vector<std::pair<const Checkpoint*, double>>& task_vectors,
                              const std::filesystem::path& output, const EditOptions& options) {
  std::vector<LinearTerm> terms;
  std::vector<std::string> warnings;
  detail::require_model(pretrained, "the pretrained checkpoint of apply");
  if (auto w = detail::task_vector_as_model_warning(pretrained, "the pretrained checkpoint")) warnings.push_back(*w);
  std::string fingerprint;
  std::deque<Checkpoint> adapters;  // adapters completed over the pretrained checkpoint (stable addresses)
  for (const auto& [tau, lambda] : task_vectors) {
    if (tau->is_adapter()) {
      adapters.push_back(tau->adapter_over(pretrained, AdapterUse::kTaskVector));
      if (auto w = detail::adapter_base_note(*tau, pretrained)) warnings.push_back(*w);
      terms.push_back({&adapters.back(), lambda, false});
      continue;
    }
    const auto& meta = tau->metadata();
    auto kind = meta.find(kMetaKind);
    auto recorded = meta.find(kMetaPretrainedFingerprint);
    if (kind == meta.end() || kind->second != "task_vector") {
      // No label: decide by content. A task vector of a fine-tune is small beside the weights it was
      // made from; a full model passed by mistake is about as large (its sum would double the weights).
      const std::optional<double> ratio = detail::sampled_norm_ratio(*tau, pretrained);
      if (ratio && *ratio >= detail::kFullModelNormRatio) {
        const std::string text = fmt::format(
            "{} looks like a full model, not a task vector: ||{}||/||{}|| = {:.2f} over a sample of the float "
            "tensors (a task vector of a fine-tune is well under {}), and it has no taskvec.kind=task_vector "
            "metadata; make a task vector with `taskvec diff {} {} -o tau.safetensors`, or use `taskvec edit`",
            tau->path().string(), tau->path().filename().string(), pretrained.path().filename().string(), *ratio,
            detail::kFullModelNormRatio, pretrained.path().string(), tau->path().string());
        if (!options.force_base) throw Error(ErrorCode::kBaseMismatch, fmt::format("{}; --force applies it anyway", text));
        warnings.push_back(fmt::format("--force: {}", text));
      }
    }
    if (kind == meta.end() || kind->second != "task_vector" || recorded == meta.end()) {
      warnings.push_back(fmt::format("{} has no taskvec task-vector metadata: cannot check it was made from {}",
                                     tau->path().string(), pretrained.path().string()));
    } else {
      if (fingerprint.empty()) fingerprint = pretrained.fingerprint();
      if (recorded->second != fingerprint) {
        std::string made_from = meta.count(kMetaPretrainedName) ? meta.at(kMetaPretrainedName) : "another checkpoint";
        if (!options.force_base) {
          throw Error(ErrorCode::kBaseMismatch,
                      fmt::format("task vector {} was made from {} (fingerprint {}), not from {} (fingerprint {}); "
                                  "use --force to apply it anyway",
                                  tau->path().string(), made_from, recorded->second, pretrained.path().string(), fingerprint));
        }
        warnings.push_back(fmt::format("--force: applying {} made from {} to {}", tau->path().string(), made_from,
                                       pretrained.path().string()));
      }
    }
    terms.push_back({tau, lambda, false});
  }
  auto metadata = pretrained.metadata();
  metadata.erase(kMetaKind);
  metadata.erase(kMetaPretrainedFingerprint);
  EditReport report = Engine(pretrained, 1.0, terms, options, DtypePolicy::kBase).run(output, metadata);
  report.warnings.insert(report.warnings.begin(), warnings.begin(), warnings.end());
  return report;
}

EditReport edit_expression(const std::map<std::string, const Checkpoint*>& models, const std::string& pretrained_name,
                           const std::string& expression, const std::filesystem::path& output, const EditOptions& options) {
  std::vector<std::string> names;
  for (const auto& [name, ckpt] : models) names.push_back(name);
  LinearExpression parsed = parse_expression(expression, names, pretrained_name);
  const Checkpoint& base = *models.at(pretrained_name);
  if (base.is_adapter()) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("the pretrained model '{}' ({}) is a PEFT adapter, not a model: give the base model it "
                            "was trained on as the pretrained model",
                            pretrained_name, base.path().string()));
  }
  std::vector<LinearTerm> terms;
  std::deque<Checkpoint> adapters;  // adapters completed over the base (stable addresses)
  std::vector<std::string> adapter_warnings;
  for (const auto& [name, coefficient] : parsed.coefficients) {
    if (name == pretrained_name) continue;
    const Checkpoint& model = *models.at(name);
    if (model.is_adapter()) {
      // The model an adapter defines is base + tau, so coefficient * (model - base) = coefficient * tau:
      // the completed task vector enters as is, not relative to the base.
      adapters.push_back(model.adapter_over(base, AdapterUse::kTaskVector));
      if (auto w = detail::adapter_base_note(model, base)) adapter_warnings.push_back(*w);
      terms.push_back({&adapters.back(), coefficient, false});
    } else {
      terms.push_back({&model, coefficient, true});
    }
  }
  // The coefficients come from decimal literals combined in doubles, so an expression meant to keep the
  // base (sum 1, a model) or drop it (sum 0, a task vector) can sum to 1 -+ 2^-53 or to 2^-54: snap
  // sums within a few roundings of 1 or 0 to the exact value, or the base would be scaled by it
  // (1-ulp changes on the f64 path, a residue of the base in a task vector).
  double total = parsed.total();
  double magnitude = 0;
  for (const auto& [name, coefficient] : parsed.coefficients) magnitude += std::abs(coefficient);
  const double rounding = 16 * std::numeric_limits<double>::epsilon() * std::max(1.0, magnitude);
  if (std::abs(total - 1.0) <= rounding) total = 1.0;
  if (std::abs(total) <= rounding) total = 0.0;
  EditReport report = Engine(base, total, terms, options, DtypePolicy::kBase).run(output, base.metadata());
  report.warnings.insert(report.warnings.begin(), adapter_warnings.begin(), adapter_warnings.end());
  for (auto it = models.rbegin(); it != models.rend(); ++it) {
    if (it->first != pretrained_name && !parsed.coefficients.count(it->first)) continue;
    const std::string role = it->first == pretrained_name ? fmt::format("the pretrained model '{}'", it->first)
                                                          : fmt::format("the model '{}'", it->first);
    if (auto w = detail::task_vector_as_model_warning(*it->second, role)) report.warnings.insert(report.warnings.begin(), *w);
  }
  if (std::abs(total - 1.0) > 1e-9) {
    report.warnings.insert(report.warnings.begin(),
                           fmt::format("the coefficients sum to {} rather than 1: the result is {} a model", total,
                                       std::abs(total) < 1e-9 ? "a task vector, not" : "a scaled model, not"));
  }
  return report;
}

}  // namespace taskvec
