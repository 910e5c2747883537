// Checkpoint::open: one safetensors file, or a Hugging Face folder (single file or index + shards).
#include <algorithm>
#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "format/internal.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

namespace fs = std::filesystem;
using format_detail::quote_name;

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

Checkpoint Checkpoint::open(const fs::path& path) {
  Checkpoint ck;
  ck.path_ = path;
  std::error_code ec;
  fs::path file;   // single safetensors file to open, if any
  fs::path index;  // index json to open, if any
  if (fs::is_directory(path, ec)) {
    ck.folder_ = path;
    if (fs::exists(path / kIndexFileName, ec)) {
      index = path / kIndexFileName;
    } else if (fs::exists(path / "model.safetensors", ec)) {
      file = path / "model.safetensors";
    } else {
      std::vector<fs::path> found;
      for (const auto& entry : fs::directory_iterator(path, ec)) {
        if (is_safetensors_name(entry.path()) && entry.is_regular_file()) found.push_back(entry.path());
      }
      if (ec) throw Error(ErrorCode::kIo, path.string() + ": cannot list the folder: " + ec.message());
      std::sort(found.begin(), found.end());
      if (found.empty()) {
        throw Error(ErrorCode::kIo, path.string() + ": no " + kIndexFileName + " and no .safetensors file in the folder");
      }
      if (found.size() > 1) {
        throw Error(ErrorCode::kInvalidIndex, path.string() + ": " + std::to_string(found.size()) +
                                                  " .safetensors files (" + found[0].filename().string() + ", " +
                                                  found[1].filename().string() + ", ...) but no " + kIndexFileName +
                                                  " saying how they fit together");
      }
      file = found.front();
    }
  } else if (path.extension() == ".json") {
    index = path;
    ck.folder_ = path.has_parent_path() ? path.parent_path() : fs::path(".");
  } else {
    file = path;
  }

  if (!file.empty()) {
    ck.shards_.push_back(SafetensorsFile::open(file));
    for (const auto& t : ck.shards_.front()->header().tensors) {
      ck.tensors_.emplace(t.name, CheckpointTensor{&t, ck.shards_.front().get()});
    }
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
      ck.shards_.push_back(SafetensorsFile::open(shard_path));
      const SafetensorsFile* shard = ck.shards_.back().get();
      for (const auto& t : shard->header().tensors) {
        if (ck.tensors_.contains(t.name)) {
          throw Error(ErrorCode::kInvalidIndex, label + ": tensor " + quote_name(t.name) + " is in two shards: " +
                                                    quote_name(ck.tensors_.at(t.name).shard->path().filename().string()) +
                                                    " and " + quote_name(shard_name));
        }
        const auto it = weight_map.find(t.name);
        if (it == weight_map.end()) {
          throw Error(ErrorCode::kInvalidIndex,
                      label + ": tensor " + quote_name(t.name) + " of shard " + quote_name(shard_name) + " is not in the weight_map");
        }
        if (it->second != shard_name) {
          throw Error(ErrorCode::kInvalidIndex, label + ": tensor " + quote_name(t.name) + " is in shard " + quote_name(shard_name) +
                                                    " but the weight_map says " + quote_name(it->second));
        }
        ck.tensors_.emplace(t.name, CheckpointTensor{&t, shard});
      }
    }
    // Files an index folder holds but the index does not name are ignored: say so.
    if (fs::is_directory(*ck.folder_, ec)) {
      std::vector<std::string> stray;
      for (const auto& entry : fs::directory_iterator(*ck.folder_, ec)) {
        const std::string n = entry.path().filename().string();
        if (is_safetensors_name(entry.path()) && !shard_names.contains(n)) stray.push_back(n);
      }
      std::sort(stray.begin(), stray.end());
      for (const auto& n : stray) {
        ck.notes_.push_back(fmt::format("{}: {} is not named by {} and is ignored{}", ck.folder_->string(), quote_name(n),
                                        kIndexFileName,
                                        n == "model.safetensors" ? " (the index takes precedence over a single model file)" : ""));
      }
    }
    for (const auto& [name, shard] : weight_map) {
      if (!ck.tensors_.contains(name)) {
        throw Error(ErrorCode::kInvalidIndex,
                    label + ": the weight_map puts tensor " + quote_name(name) + " in " + quote_name(shard) + ", which lacks it");
      }
    }
  }
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
  tensors_.emplace(alias, CheckpointTensor{info.get(), t.shard});
  aliases_->push_back(std::move(info));
  names_.insert(std::lower_bound(names_.begin(), names_.end(), alias), alias);
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

const std::map<std::string, std::string>& Checkpoint::metadata() const noexcept {
  static const std::map<std::string, std::string> kEmpty;
  return shards_.empty() ? kEmpty : shards_.front()->header().metadata;
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
                            shard->path().string(), byte_offset, byte_offset + dst.size(), size));
  }
  shard->mapped().read_at(shard->tensor_file_offset(*info) + byte_offset, dst);
}

}  // namespace taskvec
