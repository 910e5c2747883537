// PyTorch zip checkpoints (layout in pytorch_reader.hpp): the opener and the TensorSource.
#include "format/pytorch_reader.hpp"

#include <algorithm>
#include <cstring>
#include <numeric>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "format/torch_pickle.hpp"
#include "format/zip_archive.hpp"
#include "taskvec/error.hpp"

namespace taskvec::format_detail {

namespace {

__extension__ typedef unsigned __int128 u128;

constexpr unsigned char kZipMagic[4] = {'P', 'K', 3, 4};
// pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2): PROTO 2, LONG1 of 10 bytes, little-endian.
constexpr unsigned char kLegacyMagic[14] = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19};

bool starts_with(std::span<const std::byte> bytes, const unsigned char* magic, std::size_t n) {
  return bytes.size() >= n && std::memcmp(bytes.data(), magic, n) == 0;
}

// True for "P/data.pkl" with P a non-empty name without '/'.
bool is_data_pkl(std::string_view name) {
  constexpr std::string_view kTail = "/data.pkl";
  if (name.size() <= kTail.size() || !name.ends_with(kTail)) return false;
  return name.substr(0, name.size() - kTail.size()).find('/') == std::string_view::npos;
}

bool is_row_major(const std::vector<std::uint64_t>& shape, const std::vector<std::uint64_t>& stride) {
  std::uint64_t expected = 1;
  for (std::size_t k = shape.size(); k-- > 0;) {
    if (shape[k] == 0) return true;  // no elements: any strides
  }
  for (std::size_t k = shape.size(); k-- > 0;) {
    if (shape[k] != 1 && stride[k] != expected) return false;  // size-1 dims may have any stride (as torch)
    expected *= shape[k];
  }
  return true;
}

[[noreturn]] void fail_tensor(ErrorCode code, const std::string& label, const std::string& name, const std::string& what) {
  throw Error(code, fmt::format("{}: tensor {}: {}", label, quote_name(name), what));
}

// How one tensor's row-major bytes are found in the file.
struct View {
  std::string name;                    // for messages
  std::uint64_t begin = 0, bytes = 0;  // the TensorInfo's virtual range
  std::uint64_t storage_file_offset = 0;
  std::uint64_t elsize = 0;
  std::uint64_t offset = 0;            // elements
  std::vector<std::uint64_t> shape, stride;
  bool contiguous = true;
};

class PytorchSource final : public TensorSource {
 public:
  PytorchSource(MappedFile file, std::vector<View> views) : file_(std::move(file)), views_(std::move(views)) {}
  const std::filesystem::path& path() const noexcept override { return file_.path(); }
  std::string_view format() const noexcept override { return "pytorch"; }
  void read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const override;

 private:
  void gather(const View& v, std::uint64_t first, std::uint64_t count, std::byte* out) const;

  MappedFile file_;
  std::vector<View> views_;  // non-empty views, sorted by begin
};

void PytorchSource::read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const {
  if (dst.empty()) return;
  const auto it = std::lower_bound(views_.begin(), views_.end(), info.data_begin,
                                   [](const View& v, std::uint64_t b) { return v.begin < b; });
  if (it == views_.end() || it->begin != info.data_begin || it->bytes != info.num_bytes()) {
    throw Error(ErrorCode::kInternal, fmt::format("{}: tensor {} is not a tensor of this file", path().string(), quote_name(info.name)));
  }
  const View& v = *it;
  if (byte_offset > v.bytes || dst.size() > v.bytes - byte_offset) {
    throw Error(ErrorCode::kInternal, fmt::format("{}: tensor {}: read of [{}, +{}) outside its {} bytes", path().string(),
                                                  quote_name(v.name), byte_offset, dst.size(), v.bytes));
  }
  if (v.contiguous) {
    file_.read_at(v.storage_file_offset + v.offset * v.elsize + byte_offset, dst);
    return;
  }
  // Strided: gather whole elements in blocks, copy the requested bytes out of each block.
  constexpr std::uint64_t kBlock = 65536;  // elements
  std::vector<std::byte> block;
  std::uint64_t done = 0;
  while (done < dst.size()) {
    const std::uint64_t at = byte_offset + done;
    const std::uint64_t first = at / v.elsize;
    const std::uint64_t end_elem = (byte_offset + dst.size() + v.elsize - 1) / v.elsize;
    const std::uint64_t count = std::min(kBlock, end_elem - first);
    block.resize(static_cast<std::size_t>(count * v.elsize));
    gather(v, first, count, block.data());
    const std::uint64_t skip = at - first * v.elsize;
    const std::uint64_t n = std::min<std::uint64_t>(count * v.elsize - skip, dst.size() - done);
    std::memcpy(dst.data() + done, block.data() + skip, static_cast<std::size_t>(n));
    done += n;
  }
}

// Elements [first, first + count) of the row-major order of view v, into out (count x elsize bytes).
// Reads each run of nearby storage elements with one pread (gaps under 4 KiB are read through).
void PytorchSource::gather(const View& v, std::uint64_t first, std::uint64_t count, std::byte* out) const {
  const std::size_t rank = v.shape.size();
  std::vector<std::uint64_t> coord(rank);
  std::uint64_t rest = first;
  for (std::size_t k = rank; k-- > 0;) {
    coord[k] = rest % v.shape[k];
    rest /= v.shape[k];
  }
  std::vector<std::uint64_t> index(static_cast<std::size_t>(count));  // storage element of each output element
  std::uint64_t cur = v.offset;
  for (std::size_t k = 0; k < rank; ++k) cur += coord[k] * v.stride[k];
  for (std::uint64_t e = 0; e < count; ++e) {
    index[static_cast<std::size_t>(e)] = cur;
    for (std::size_t k = rank; k-- > 0;) {  // odometer step
      if (++coord[k] < v.shape[k]) {
        cur += v.stride[k];
        break;
      }
      cur -= (coord[k] - 1) * v.stride[k];
      coord[k] = 0;
    }
  }
  std::vector<std::uint32_t> order(static_cast<std::size_t>(count));
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) { return index[a] < index[b]; });
  const std::uint64_t max_gap = std::max<std::uint64_t>(1, 4096 / v.elsize);
  const std::uint64_t max_run = std::max<std::uint64_t>(1, (std::uint64_t{1} << 20) / v.elsize);
  std::vector<std::byte> run;
  std::size_t i = 0;
  while (i < order.size()) {
    const std::uint64_t lo = index[order[i]];
    std::size_t j = i + 1;
    while (j < order.size() && index[order[j]] - index[order[j - 1]] <= max_gap && index[order[j]] - lo < max_run) ++j;
    const std::uint64_t hi = index[order[j - 1]];
    run.resize(static_cast<std::size_t>((hi - lo + 1) * v.elsize));
    file_.read_at(v.storage_file_offset + lo * v.elsize, run);
    for (std::size_t k = i; k < j; ++k) {
      std::memcpy(out + std::size_t{order[k]} * v.elsize, run.data() + (index[order[k]] - lo) * v.elsize, static_cast<std::size_t>(v.elsize));
    }
    i = j;
  }
}

}  // namespace

bool looks_like_zip(std::span<const std::byte> first_bytes) noexcept { return starts_with(first_bytes, kZipMagic, 4); }

bool looks_like_pytorch_zip(std::span<const std::byte> first_bytes) noexcept {
  if (!looks_like_zip(first_bytes) || first_bytes.size() < 30) return false;
  const std::size_t name_len = std::to_integer<std::size_t>(first_bytes[26]) | (std::to_integer<std::size_t>(first_bytes[27]) << 8);
  if (first_bytes.size() - 30 < name_len) return false;
  return is_data_pkl(std::string_view(reinterpret_cast<const char*>(first_bytes.data()) + 30, name_len));
}

bool looks_like_legacy_pytorch(std::span<const std::byte> first_bytes) noexcept {
  return starts_with(first_bytes, kLegacyMagic, sizeof kLegacyMagic);
}

const TensorInfo* PytorchFile::find(std::string_view name) const noexcept {
  const auto it = std::lower_bound(tensors.begin(), tensors.end(), name, [](const TensorInfo& t, std::string_view n) { return t.name < n; });
  return it == tensors.end() || it->name != name ? nullptr : &*it;
}

PytorchFile open_pytorch_file(const std::filesystem::path& path) {
  MappedFile file = MappedFile::open(path);
  const std::string label = path.string();
  std::vector<std::byte> head(static_cast<std::size_t>(std::min<std::uint64_t>(file.size(), sizeof kLegacyMagic)));
  file.read_at(0, head);
  if (looks_like_legacy_pytorch(head)) {
    throw Error(ErrorCode::kUnsupported,
                label + ": a PyTorch checkpoint in the legacy format (torch < 1.6 or _use_new_zipfile_serialization=False), "
                        "which taskvec does not read. Convert it with a trusted torch, e.g. "
                        "python3 -c \"import torch; torch.save(torch.load('old.bin'), 'new.bin')\" "
                        "(or save it as safetensors with safetensors.torch.save_file)");
  }
  if (!looks_like_zip(head)) {
    throw Error(ErrorCode::kInvalidArchive, label + ": not a PyTorch checkpoint: it does not start with a zip header (PK\\x03\\x04)");
  }
  const ZipDirectory dir = read_zip_directory(
      file.size(), [&](std::uint64_t off, std::span<std::byte> dst) { file.read_at(off, dst); }, label);

  PytorchFile out;
  out.path = path;
  const ZipEntry* pkl = nullptr;
  for (const ZipEntry& e : dir.entries) {
    if (!is_data_pkl(e.name)) continue;
    if (pkl != nullptr) throw Error(ErrorCode::kInvalidArchive, label + ": two data.pkl entries, " + quote_name(pkl->name) + " and " + quote_name(e.name));
    pkl = &e;
  }
  if (pkl == nullptr) throw Error(ErrorCode::kInvalidArchive, label + ": a zip archive without a PREFIX/data.pkl entry: not a PyTorch checkpoint");
  out.archive_prefix = pkl->name.substr(0, pkl->name.size() - std::string_view("/data.pkl").size());
  const std::string prefix = out.archive_prefix + "/";

  if (const ZipEntry* bo = dir.find(prefix + "byteorder")) {
    if (bo->size > 16) throw Error(ErrorCode::kInvalidArchive, label + ": " + quote_name(bo->name) + " is not 'little' or 'big'");
    std::string order(static_cast<std::size_t>(bo->size), '\0');
    file.read_at(bo->data_offset, std::as_writable_bytes(std::span<char>(order)));
    if (order == "big") throw Error(ErrorCode::kUnsupported, label + ": a big-endian PyTorch checkpoint (byteorder 'big'); taskvec reads little-endian data");
    if (order != "little") throw Error(ErrorCode::kInvalidArchive, label + ": " + quote_name(bo->name) + " is " + quote_name(order) + ", not 'little' or 'big'");
  }

  // The whole pickle is checked before any tensor byte is read.
  if (pkl->size > kMaxPickleBytes) {
    throw Error(ErrorCode::kInvalidPickle, fmt::format("{}: {} is {} bytes, more than the limit of {}", label, quote_name(pkl->name), pkl->size, kMaxPickleBytes));
  }
  std::vector<std::byte> pkl_bytes(static_cast<std::size_t>(pkl->size));
  file.read_at(pkl->data_offset, pkl_bytes);
  TorchStateDict sd = parse_torch_pickle(pkl_bytes, label);
  out.nested_key = std::move(sd.nested_key);
  out.notes = std::move(sd.notes);

  std::sort(sd.tensors.begin(), sd.tensors.end(), [](const TorchTensorRecord& a, const TorchTensorRecord& b) { return a.name < b.name; });
  std::vector<View> views;
  std::uint64_t virtual_end = 0;
  for (TorchTensorRecord& r : sd.tensors) {
    const auto fail = [&](ErrorCode code, const std::string& what) { fail_tensor(code, label, r.name, what); };
    const std::uint64_t elsize = dtype_bits(r.dtype) / 8;
    const std::string entry_name = prefix + "data/" + r.storage_key;
    const ZipEntry* entry = dir.find(entry_name);
    if (entry == nullptr) fail_tensor(ErrorCode::kInvalidArchive, label, r.name, "its storage entry " + quote_name(entry_name) + " is missing from the archive");
    const u128 storage_bytes = static_cast<u128>(r.storage_numel) * elsize;
    if (storage_bytes != entry->size) {
      fail(ErrorCode::kInvalidPickle, fmt::format("storage {} holds {} x {} ({} bytes) but entry {} has {} bytes", quote_name(r.storage_key),
                                                  r.storage_numel, dtype_name(r.dtype), static_cast<std::uint64_t>(storage_bytes),
                                                  quote_name(entry_name), entry->size));
    }
    u128 numel = 1, last = r.storage_offset;
    for (std::size_t k = 0; k < r.shape.size(); ++k) {
      numel *= r.shape[k];
      if (numel > (static_cast<u128>(1) << 64)) numel = static_cast<u128>(1) << 64;  // saturate; refused below
      if (r.shape[k] > 0) last += static_cast<u128>(r.shape[k] - 1) * r.stride[k];
    }
    const u128 bytes = numel * elsize;
    if (bytes > (static_cast<u128>(1) << 53)) {
      fail(ErrorCode::kInvalidPickle, fmt::format("shape {} x {} is more than 2^53 bytes", format_dims(r.shape), dtype_name(r.dtype)));
    }
    if (numel > 0 && last >= r.storage_numel) {
      fail(ErrorCode::kInvalidPickle, fmt::format("view (offset {}, size {}, stride {}) reaches element {} of storage {}, which has {}",
                                                  r.storage_offset, format_dims(r.shape), format_dims(r.stride), static_cast<std::uint64_t>(last),
                                                  quote_name(r.storage_key), r.storage_numel));
    }
    TensorInfo info;
    info.name = r.name;
    info.dtype = r.dtype;
    info.shape = r.shape;
    info.data_begin = virtual_end;
    info.data_end = virtual_end + static_cast<std::uint64_t>(bytes);
    if (info.data_end > (std::uint64_t{1} << 62)) fail(ErrorCode::kInvalidPickle, "the tensors together are more than 2^62 bytes");
    virtual_end = info.data_end;
    if (bytes > 0) {
      View v;
      v.name = r.name;
      v.begin = info.data_begin;
      v.bytes = info.num_bytes();
      v.storage_file_offset = entry->data_offset;
      v.elsize = elsize;
      v.offset = r.storage_offset;
      v.contiguous = is_row_major(r.shape, r.stride);
      v.shape = std::move(r.shape);
      v.stride = std::move(r.stride);
      views.push_back(std::move(v));
    }
    out.tensors.push_back(std::move(info));
  }
  out.source = std::make_shared<PytorchSource>(std::move(file), std::move(views));
  return out;
}

}  // namespace taskvec::format_detail
