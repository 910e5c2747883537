// Checkpoint::open: one safetensors file, or a Hugging Face folder (single file or index + shards).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "format/internal.hpp"
#include "format/peft_adapter.hpp"
#include "format/pytorch_reader.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

namespace fs = std::filesystem;
using format_detail::quote_name;
using format_detail::TensorFile;

namespace {

bool is_safetensors_name(const fs::path& p) { return p.extension() == ".safetensors"; }

// True if `inner` (canonical) is `folder` (canonical) or lies below it.
bool inside(const fs::path& folder, const fs::path& inner) {
  auto f = folder.begin();
  auto i = inner.begin();
  for (; f != folder.end(); ++f, ++i) {
    if (i == inner.end() || *f != *i) return false;
  }
  return true;
}

// Resolves shard `name` of the index in `folder`; throws kShardEscapes if it leaves the folder
// (absolute, "..", or a symlink pointing out, even a dangling one) and kShardMissing if absent.
fs::path resolve_shard(const fs::path& folder, const std::string& name, const std::string& label) {
  const fs::path rel(name);
  if (name.empty() || format_detail::name_problem(name) != "") {
    throw Error(ErrorCode::kInvalidIndex, label + ": shard name " + quote_name(name) + " is not a file name");
  }
  if (rel.is_absolute() || rel.has_root_name() || rel.has_root_directory()) {
    throw Error(ErrorCode::kShardEscapes, label + ": shard " + quote_name(name) + " is an absolute path");
  }
  for (const auto& part : rel) {
    if (part == "..") throw Error(ErrorCode::kShardEscapes, label + ": shard " + quote_name(name) + " leaves the folder with '..'");
  }
  std::error_code ec;
  const fs::path root = fs::canonical(folder, ec);
  if (ec) throw Error(ErrorCode::kIo, folder.string() + ": cannot resolve: " + ec.message());
  fs::path candidate = root / rel;
  // Follow the symlink chain by hand so a dangling link that points outside is still caught.
  for (int hops = 0; hops < 40; ++hops) {
    const fs::path resolved = fs::weakly_canonical(candidate, ec);
    if (ec || !inside(root, resolved)) {
      throw Error(ErrorCode::kShardEscapes, label + ": shard " + quote_name(name) + " resolves outside " + root.string());
    }
    const auto st = fs::symlink_status(resolved, ec);
    if (ec || !fs::is_symlink(st)) {
      candidate = resolved;
      break;
    }
    const fs::path target = fs::read_symlink(resolved, ec);
    if (ec) break;
    candidate = target.is_absolute() ? target : resolved.parent_path() / target;
  }
  if (!fs::exists(candidate, ec)) {
    throw Error(ErrorCode::kShardMissing, label + ": shard " + quote_name(name) + " does not exist in " + folder.string());
  }
  return folder / rel;
}

bool is_auxiliary_name(const std::string& n) {
  const auto starts = [&n](std::string_view p) { return n.starts_with(p); };
  return n == "config.json" || n == "generation_config.json" || starts("tokenizer") || n == "special_tokens_map.json" ||
         starts("vocab") || n == "merges.txt" || fs::path(n).extension() == ".model" || starts("chat_template") ||
         n == "preprocessor_config.json" || n == "processor_config.json" || n == "added_tokens.json";
}

// Checks one file taskvec would copy from `folder`: inside the folder (symlinks resolved), regular,
// at most kMaxFolderFileSize bytes. Throws Error naming the file.
void check_auxiliary(const fs::path& folder, const fs::path& file) {
  (void)format_detail::resolve_inside(folder, file, "this auxiliary file");
  std::error_code ec;
  const auto st = fs::status(file, ec);
  if (ec || !fs::is_regular_file(st)) {
    throw Error(ErrorCode::kIo, fmt::format("{}: not a regular file (a FIFO, device or socket in a model folder is "
                                            "refused, never copied); remove it or replace it by the file itself",
                                            file.string()));
  }
  const auto size = fs::file_size(file, ec);
  if (ec || size > kMaxFolderFileSize) {
    throw Error(ErrorCode::kIo, fmt::format("{}: {} bytes, over the limit of {} for an auxiliary file of a model folder",
                                            file.string(), ec ? 0 : size, kMaxFolderFileSize));
  }
}

// The module files named by the "auto_map" of a config (remote code): "modeling_foo.FooModel" ->
// modeling_foo.py; "org/repo--modeling_foo.FooModel" is another repository: a note, nothing copied.
void auto_map_files(const fs::path& folder, const fs::path& config, std::set<std::string>& names,
                    std::vector<std::string>& notes) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(config, ec))) return;
  check_auxiliary(folder, config);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(format_detail::read_folder_file(folder, config, kMaxFolderFileSize, ErrorCode::kIo));
  } catch (const nlohmann::json::exception&) {
    return;  // copied as is; transformers will say what is wrong with it
  }
  if (!j.is_object()) return;
  const auto it = j.find("auto_map");
  if (it == j.end() || !it->is_object()) return;
  const auto take = [&](const std::string& ref) {
    if (ref.find("--") != std::string::npos) {
      notes.push_back(fmt::format("{}: auto_map names code of another repository, {}: it is not copied; the output "
                                  "loads only where that repository can be fetched",
                                  config.string(), quote_name(ref)));
      return;
    }
    const auto dot = ref.rfind('.');
    if (dot == std::string::npos || dot == 0) return;
    const std::string file = ref.substr(0, dot) + ".py";
    if (file.find('/') != std::string::npos || format_detail::name_problem(file) != "" || file.starts_with(".")) {
      notes.push_back(fmt::format("{}: auto_map entry {} is not a module of the folder: not copied", config.string(),
                                  quote_name(ref)));
      return;
    }
    if (!fs::exists(fs::symlink_status(folder / file, ec))) {
      notes.push_back(fmt::format("{}: auto_map names {}, which the folder lacks: the output will not load without it",
                                  config.string(), quote_name(file)));
      return;
    }
    names.insert(file);
  };
  for (const auto& [key, value] : it->items()) {
    if (value.is_string()) take(value.get<std::string>());
    if (value.is_array()) {
      for (const auto& v : value) {
        if (v.is_string()) take(v.get<std::string>());
      }
    }
  }
}

std::vector<fs::path> scan_auxiliary_files(const fs::path& folder, std::vector<std::string>& notes) {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(folder, ec)) {
    const std::string n = entry.path().filename().string();
    if (!is_auxiliary_name(n)) continue;
    std::error_code dir_ec;
    if (fs::is_directory(fs::symlink_status(entry.path(), dir_ec))) continue;  // e.g. a tokenizer/ folder
    names.insert(n);
  }
  for (const char* config : {"config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"}) {
    auto_map_files(folder, folder / config, names, notes);
  }
  std::vector<fs::path> out;
  for (const auto& n : names) {
    check_auxiliary(folder, folder / n);
    out.push_back(folder / n);
  }
  return out;
}

}  // namespace

namespace {

// The format of a tensor file, from its first bytes (never from its name).
enum class FileFormat { kSafetensors, kPytorch, kGguf };

FileFormat sniff_format(const fs::path& path) {
  // O_NONBLOCK: a FIFO in place of a model never blocks here; SafetensorsFile::open refuses it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return FileFormat::kSafetensors;  // the safetensors reader reports the error
  std::array<std::byte, format_detail::kPytorchSniffBytes> head{};
  struct stat st {};
  ssize_t n = 0;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) n = ::pread(fd, head.data(), head.size(), 0);
  ::close(fd);
  const std::span<const std::byte> bytes(head.data(), n > 0 ? static_cast<std::size_t>(n) : 0);
  // Any zip (torch.save since 1.6) or a legacy torch.save pickle goes to the PyTorch reader, which says
  // what is wrong with a zip that is not a PyTorch checkpoint and how to convert a legacy file.
  if (format_detail::looks_like_zip(bytes) || format_detail::looks_like_legacy_pytorch(bytes)) return FileFormat::kPytorch;
  if (bytes.size() >= 4 && std::memcmp(bytes.data(), "GGUF", 4) == 0) return FileFormat::kGguf;
  return FileFormat::kSafetensors;
}

// Keeps an opened PyTorch file (which owns the TensorInfos) alive and serves its tensors.
class PytorchSource final : public TensorSource {
 public:
  explicit PytorchSource(format_detail::PytorchFile file) : file_(std::move(file)) {}
  const fs::path& path() const noexcept override { return file_.source->path(); }
  std::string_view format() const noexcept override { return "pytorch"; }
  void read(const TensorInfo& info, std::uint64_t byte_offset, std::span<std::byte> dst) const override {
    file_.source->read(info, byte_offset, dst);
  }
  const format_detail::PytorchFile& file() const noexcept { return file_; }

 private:
  format_detail::PytorchFile file_;
};

TensorFile open_tensor_file(const fs::path& path) {
  TensorFile out;
  switch (sniff_format(path)) {
    case FileFormat::kPytorch: {
      auto source = std::make_shared<PytorchSource>(format_detail::open_pytorch_file(path));
      for (const auto& t : source->file().tensors) out.tensors.push_back(&t);
      out.notes = source->file().notes;
      out.source = std::move(source);
      return out;
    }
    case FileFormat::kGguf:
      throw Error(ErrorCode::kUnsupported,
                  fmt::format("{}: a GGUF file: not supported yet; convert it to safetensors", path.string()));
    case FileFormat::kSafetensors:
      break;
  }
  auto file = SafetensorsFile::open(path);
  for (const auto& t : file->header().tensors) out.tensors.push_back(&t);
  out.metadata = file->header().metadata;
  out.source = std::make_shared<format_detail::SafetensorsFileSource>(std::move(file));
  return out;
}

// The names of the files a folder checkpoint may hold, in the order they are looked for.
constexpr const char* kPytorchIndexFileName = "pytorch_model.bin.index.json";

bool is_pytorch_name(const fs::path& p) {
  const auto e = p.extension();
  return e == ".bin" || e == ".pt" || e == ".pth";
}

// What a folder holds: the index or single tensor file to open.
struct FolderLayout {
  fs::path index;
  fs::path file;
};

FolderLayout folder_layout(const fs::path& folder) {
  std::error_code ec;
  const auto present = [&](const char* name) { return fs::exists(fs::symlink_status(folder / name, ec)); };
  if (present(kIndexFileName)) return {folder / kIndexFileName, {}};
  if (present("model.safetensors")) return {{}, folder / "model.safetensors"};
  if (present(kPytorchIndexFileName)) return {folder / kPytorchIndexFileName, {}};
  if (present("pytorch_model.bin")) return {{}, folder / "pytorch_model.bin"};
  std::vector<fs::path> safetensors, pytorch;
  for (const auto& entry : fs::directory_iterator(folder, ec)) {
    std::error_code type_ec;
    if (!entry.is_regular_file(type_ec)) continue;
    if (is_safetensors_name(entry.path())) safetensors.push_back(entry.path());
    if (is_pytorch_name(entry.path())) pytorch.push_back(entry.path());
  }
  if (ec) throw Error(ErrorCode::kIo, folder.string() + ": cannot list the folder: " + ec.message());
  std::sort(safetensors.begin(), safetensors.end());
  std::sort(pytorch.begin(), pytorch.end());
  const auto one_of = [&](const std::vector<fs::path>& found, const char* kind, const char* index) {
    if (found.size() > 1) {
      throw Error(ErrorCode::kInvalidIndex,
                  fmt::format("{}: {} {} files ({}, {}, ...) but no {} saying how they fit together", folder.string(),
                              found.size(), kind, found[0].filename().string(), found[1].filename().string(), index));
    }
    return found.front();
  };
  if (!safetensors.empty()) return {{}, one_of(safetensors, ".safetensors", kIndexFileName)};
  if (!pytorch.empty()) return {{}, one_of(pytorch, "PyTorch (.bin/.pt/.pth)", kPytorchIndexFileName)};
  throw Error(ErrorCode::kIo,
              fmt::format("{}: no model in the folder: looked for {}, model.safetensors, {}, pytorch_model.bin, "
                          "one .safetensors file, one .bin/.pt/.pth file",
                          folder.string(), kIndexFileName, kPytorchIndexFileName));
}

}  // namespace

void Checkpoint::add_file(format_detail::TensorFile&& file, const std::string& label) {
  const TensorSource* source = file.source.get();
  for (const TensorInfo* t : file.tensors) {
    if (const auto it = tensors_.find(t->name); it != tensors_.end()) {
      throw Error(ErrorCode::kInvalidIndex, fmt::format("{}: tensor {} is in two files: {} and {}", label,
                                                        quote_name(t->name), quote_name(it->second.file().filename().string()),
                                                        quote_name(source->path().filename().string())));
    }
    tensors_.emplace(t->name, CheckpointTensor{t, source});
  }
  if (sources_.empty()) {
    metadata_ = file.metadata;
    format_ = std::string(source->format());
  }
  for (auto& n : file.notes) notes_.push_back(std::move(n));
  files_.push_back(source->path());
  sources_.push_back(std::move(file.source));
}

Checkpoint Checkpoint::open(const fs::path& path) {
  if (peft::is_adapter_folder(path)) return open_adapter(path);
  Checkpoint ck;
  ck.path_ = path;
  std::error_code ec;
  fs::path file;   // single tensor file to open, if any
  fs::path index;  // index json to open, if any
  if (fs::is_directory(path, ec)) {
    ck.folder_ = path;
    const FolderLayout layout = folder_layout(path);
    index = layout.index;
    file = layout.file;
  } else if (path.extension() == ".json") {
    index = path;
    ck.folder_ = path.has_parent_path() ? path.parent_path() : fs::path(".");
  } else {
    file = path;
  }

  if (!file.empty()) {
    ck.add_file(open_tensor_file(file), file.string());
  } else {
    const std::string label = index.string();
    const nlohmann::json doc = format_detail::parse_json_strict(
        format_detail::read_folder_file(*ck.folder_, index, kMaxFolderFileSize, ErrorCode::kInvalidIndex), label, ErrorCode::kInvalidIndex, ErrorCode::kInvalidIndex);
    if (!doc.is_object()) throw Error(ErrorCode::kInvalidIndex, label + ": the index is not a JSON object");
    if (const auto meta = doc.find("metadata"); meta != doc.end()) {
      if (!meta->is_object()) throw Error(ErrorCode::kInvalidIndex, label + ": \"metadata\" is not an object");
      for (const auto& [k, v] : meta->items()) ck.index_metadata_[k] = v.is_string() ? v.get<std::string>() : v.dump();
    }
    const auto wm = doc.find("weight_map");
    if (wm == doc.end() || !wm->is_object()) {
      throw Error(ErrorCode::kInvalidIndex, label + ": \"weight_map\" is missing or not an object");
    }
    std::map<std::string, std::string> weight_map;
    std::set<std::string> shard_names;
    for (const auto& [name, shard] : wm->items()) {
      if (!shard.is_string()) {
        throw Error(ErrorCode::kInvalidIndex, label + ": weight_map entry " + quote_name(name) + " is not a string");
      }
      weight_map.emplace(name, shard.get<std::string>());
      shard_names.insert(shard.get<std::string>());
    }
    // Every path is checked before any shard is opened.
    std::vector<std::pair<std::string, fs::path>> shard_paths;
    for (const auto& s : shard_names) shard_paths.emplace_back(s, resolve_shard(*ck.folder_, s, label));
    for (const auto& [shard_name, shard_path] : shard_paths) {
      TensorFile shard = open_tensor_file(shard_path);
      for (const TensorInfo* t : shard.tensors) {
        if (const auto it = ck.tensors_.find(t->name); it != ck.tensors_.end()) {
          throw Error(ErrorCode::kInvalidIndex, label + ": tensor " + quote_name(t->name) + " is in two shards: " +
                                                    quote_name(it->second.file().filename().string()) + " and " +
                                                    quote_name(shard_name));
        }
        const auto it = weight_map.find(t->name);
        if (it == weight_map.end()) {
          throw Error(ErrorCode::kInvalidIndex,
                      label + ": tensor " + quote_name(t->name) + " of shard " + quote_name(shard_name) + " is not in the weight_map");
        }
        if (it->second != shard_name) {
          throw Error(ErrorCode::kInvalidIndex, label + ": tensor " + quote_name(t->name) + " is in shard " + quote_name(shard_name) +
                                                    " but the weight_map says " + quote_name(it->second));
        }
      }
      ck.add_file(std::move(shard), label);
    }
    // Files an index folder holds but the index does not name are ignored: say so.
    if (fs::is_directory(*ck.folder_, ec)) {
      const bool pytorch_index = index.filename() == kPytorchIndexFileName;
      std::vector<std::string> stray;
      for (const auto& entry : fs::directory_iterator(*ck.folder_, ec)) {
        const std::string n = entry.path().filename().string();
        const bool model_file = pytorch_index ? is_pytorch_name(entry.path()) : is_safetensors_name(entry.path());
        if (model_file && !shard_names.contains(n)) stray.push_back(n);
      }
      std::sort(stray.begin(), stray.end());
      for (const auto& n : stray) {
        ck.notes_.push_back(fmt::format("{}: {} is not named by {} and is ignored{}", ck.folder_->string(), quote_name(n),
                                        index.filename().string(),
                                        n == "model.safetensors" || n == "pytorch_model.bin"
                                            ? " (the index takes precedence over a single model file)"
                                            : ""));
      }
    }
    for (const auto& [name, shard] : weight_map) {
      if (!ck.tensors_.contains(name)) {
        throw Error(ErrorCode::kInvalidIndex,
                    label + ": the weight_map puts tensor " + quote_name(name) + " in " + quote_name(shard) + ", which lacks it");
      }
    }
  }
  std::sort(ck.files_.begin(), ck.files_.end());
  ck.names_.reserve(ck.tensors_.size());
  for (const auto& [name, t] : ck.tensors_) ck.names_.push_back(name);
  if (ck.folder_) ck.auxiliary_ = scan_auxiliary_files(*ck.folder_, ck.notes_);
  return ck;
}

const CheckpointTensor* Checkpoint::find(std::string_view name) const noexcept {
  const auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const CheckpointTensor& Checkpoint::at(std::string_view name) const {
  if (const auto* t = find(name)) return *t;
  throw Error(ErrorCode::kTensorMissing, path_.string() + ": no tensor " + quote_name(name));
}

void Checkpoint::add_alias(const std::string& alias, const std::string& target) {
  const CheckpointTensor& t = at(target);
  if (find(alias) != nullptr) {
    throw Error(ErrorCode::kInvalidArgument, path_.string() + ": tensor " + quote_name(alias) + " already exists");
  }
  if (!aliases_) aliases_ = std::make_shared<std::vector<std::unique_ptr<TensorInfo>>>();
  auto info = std::make_unique<TensorInfo>(*t.info);
  info->name = alias;
  tensors_.emplace(alias, CheckpointTensor{info.get(), t.source});
  aliases_->push_back(std::move(info));
  names_.insert(std::lower_bound(names_.begin(), names_.end(), alias), alias);
}

void Checkpoint::replace_tensor(const std::string& name, TensorInfo info, std::shared_ptr<const TensorSource> source) {
  const auto it = tensors_.find(name);
  if (it == tensors_.end()) throw Error(ErrorCode::kTensorMissing, path_.string() + ": no tensor " + quote_name(name));
  info.name = name;
  auto owned = std::make_shared<const TensorInfo>(std::move(info));
  it->second = CheckpointTensor{owned.get(), source.get()};
  owned_infos_.push_back(std::move(owned));
  sources_.push_back(std::move(source));
}

std::optional<bool> Checkpoint::tied_word_embeddings() const {
  if (!folder_) return std::nullopt;
  const fs::path config = *folder_ / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return std::nullopt;
  try {
    auto j = nlohmann::json::parse(format_detail::read_folder_file(*folder_, config, kMaxFolderFileSize, ErrorCode::kIo));
    auto it = j.find("tie_word_embeddings");
    if (it == j.end() || !it->is_boolean()) return std::nullopt;
    return it->get<bool>();
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  } catch (const Error&) {
    return std::nullopt;
  }
}

std::uint64_t Checkpoint::total_bytes() const noexcept {
  std::uint64_t sum = 0;
  for (const auto& [name, t] : tensors_) sum += t.info->num_bytes();
  return sum;
}

std::uint64_t Checkpoint::total_elements() const noexcept {
  std::uint64_t sum = 0;
  for (const auto& [name, t] : tensors_) sum += t.info->num_elements();
  return sum;
}

namespace {

struct Fnv1a {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  void add(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (std::size_t i = 0; i < n; ++i) {
      h ^= p[i];
      h *= 0x100000001b3ULL;
    }
  }
  void add_u64(std::uint64_t v) {
    unsigned char b[8];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>(v >> (8 * i));
    add(b, 8);
  }
  void add_str(std::string_view s) {
    add_u64(s.size());
    add(s.data(), s.size());
  }
};

}  // namespace

std::string Checkpoint::fingerprint() const {
  // Lengths precede strings and shapes so different splits of the same bytes hash differently.
  constexpr std::uint64_t kSamples = 64;
  constexpr std::uint64_t kSampleBytes = 64;
  Fnv1a f;
  std::vector<std::byte> sample;
  f.add_u64(tensors_.size());
  for (const auto& [name, t] : tensors_) {
    f.add_str(name);
    f.add_str(dtype_name(t.info->dtype));
    f.add_u64(t.info->shape.size());
    for (const auto d : t.info->shape) f.add_u64(d);
    // The samples are read with pread: through the mapping, each would fault in (and map) the 64 KiB
    // around it.
    const std::uint64_t n = t.info->num_bytes();
    if (n <= kSamples * kSampleBytes) {
      sample.resize(n);
      t.read(0, sample);
      f.add(sample.data(), n);
    } else {
      sample.resize(kSampleBytes);
      for (std::uint64_t i = 0; i < kSamples; ++i) {
        // floor((n - 64) * i / 63) without overflow: split n - 64 = q * 63 + r.
        const std::uint64_t q = (n - kSampleBytes) / (kSamples - 1);
        const std::uint64_t r = (n - kSampleBytes) % (kSamples - 1);
        const std::uint64_t off = q * i + r * i / (kSamples - 1);
        t.read(off, sample);
        f.add(sample.data(), kSampleBytes);
      }
    }
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out(16, '0');
  for (int i = 0; i < 16; ++i) out[static_cast<std::size_t>(i)] = kHex[(f.h >> (60 - 4 * i)) & 0xF];
  return out;
}

void validate_checkpoint(const fs::path& path) { (void)Checkpoint::open(path); }

void CheckpointTensor::read(std::uint64_t byte_offset, std::span<std::byte> dst) const {
  const std::uint64_t size = info->num_bytes();
  if (byte_offset > size || dst.size() > size - byte_offset) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("tensor '{}' in {}: bytes [{}, {}) are outside its {} bytes", info->name,
                            file().string(), byte_offset, byte_offset + dst.size(), size));
  }
  source->read(*info, byte_offset, dst);
}

}  // namespace taskvec
