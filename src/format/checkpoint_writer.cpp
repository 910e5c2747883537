// CheckpointPlan (sharding, HF names) and CheckpointWriter (refusals, atomic publish, index last).
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <optional>
#include <set>
#include <string>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {

namespace fs = std::filesystem;
using format_detail::quote_name;

namespace {

std::string shard_file_name(std::size_t k, std::size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k, n);
  return buf;
}

// Paths an output must never replace for input `in`: the input itself and, for a checkpoint folder
// or index, the folder and every file in it.
std::vector<fs::path> protected_paths(const fs::path& in) {
  std::vector<fs::path> out{in};
  std::error_code ec;
  fs::path folder;
  if (fs::is_directory(in, ec)) {
    folder = in;
  } else if (in.extension() == ".json") {
    folder = in.has_parent_path() ? in.parent_path() : fs::path(".");
    out.push_back(folder);
  }
  if (!folder.empty()) {
    for (const auto& entry : fs::directory_iterator(folder, ec)) out.push_back(entry.path());
  }
  return out;
}

// Copies `from` into a temp file beside `to`, synced but not yet renamed (AtomicFile::commit publishes it).
AtomicFile prepare_copy(const fs::path& from, const fs::path& to) {
  const int fd = ::open(from.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO never blocks
  if (fd < 0) {
    const int err = errno;
    throw Error(ErrorCode::kIo, from.string() + ": cannot open: " + format_detail::errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || static_cast<std::uint64_t>(st.st_size) > kMaxFolderFileSize) {
    ::close(fd);
    throw Error(ErrorCode::kIo, fmt::format("{}: not a regular file of at most {} bytes: not copied", from.string(),
                                            kMaxFolderFileSize));
  }
  const auto size = static_cast<std::uint64_t>(st.st_size);
  try {
    AtomicFile out(to, size);
    std::vector<std::byte> buf(1 << 20);
    std::uint64_t done = 0;
    while (true) {
      const ssize_t n = ::read(fd, buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        const int err = errno;
        throw Error(ErrorCode::kIo, from.string() + ": cannot read: " + format_detail::errno_text(err));
      }
      if (n == 0) break;
      out.write_at(done, std::span(buf.data(), static_cast<std::size_t>(n)));
      done += static_cast<std::uint64_t>(n);
    }
    if (done != size) throw Error(ErrorCode::kIo, from.string() + ": changed size while being copied");
    out.sync();
    ::close(fd);
    return out;
  } catch (...) {
    ::close(fd);
    throw;
  }
}

// "model.safetensors" or "model-NNNNN-of-NNNNN.safetensors": the names a checkpoint writer gives.
bool is_model_file_name(const std::string& name) {
  if (name == "model.safetensors" || name == kIndexFileName) return true;
  return name.size() == std::string("model-00001-of-00002.safetensors").size() && name.rfind("model-", 0) == 0 &&
         name.find("-of-") == 11 && name.ends_with(".safetensors");
}

}  // namespace

CheckpointPlan CheckpointPlan::build(const fs::path& output, std::vector<TensorSpec> specs,
                                     const std::map<std::string, std::string>& metadata,
                                     const CheckpointWriteOptions& options) {
  if (options.max_shard_size == 0) throw Error(ErrorCode::kInvalidArgument, "max_shard_size must be positive");
  if (output.empty()) throw Error(ErrorCode::kInvalidArgument, "the output path is empty");
  CheckpointPlan plan;
  plan.output = output;
  plan.is_folder = output.extension() != ".safetensors";
  std::sort(specs.begin(), specs.end(), [](const TensorSpec& a, const TensorSpec& b) { return a.name < b.name; });
  for (std::size_t i = 1; i < specs.size(); ++i) {
    if (specs[i].name == specs[i - 1].name) {
      throw Error(ErrorCode::kInvalidName, output.string() + ": tensor " + quote_name(specs[i].name) + " occurs twice");
    }
  }
  // Greedy in name order: start a new shard when the next tensor would overflow the current one.
  std::vector<std::vector<TensorSpec>> groups(1);
  std::uint64_t current = 0;
  for (auto& s : specs) {
    const std::uint64_t bytes = s.num_bytes();
    if (__builtin_add_overflow(plan.total_bytes, bytes, &plan.total_bytes)) {
      throw Error(ErrorCode::kShapeOverflow, output.string() + ": total size overflows 64 bits");
    }
    if (plan.is_folder && !groups.back().empty() && (bytes > options.max_shard_size - std::min(current, options.max_shard_size))) {
      groups.emplace_back();
      current = 0;
    }
    current += bytes;
    groups.back().push_back(std::move(s));
  }
  const std::size_t n = groups.size();
  for (std::size_t k = 0; k < n; ++k) {
    Shard shard;
    if (!plan.is_folder) {
      shard.path = output;
    } else {
      shard.path = output / (n == 1 ? std::string("model.safetensors") : shard_file_name(k + 1, n));
    }
    shard.layout = SafetensorsLayout::build(std::move(groups[k]), metadata);
    for (std::size_t i = 0; i < shard.layout.tensors.size(); ++i) {
      plan.location.emplace(shard.layout.tensors[i].name, std::make_pair(k, i));
    }
    plan.shards.push_back(std::move(shard));
  }
  return plan;
}

CheckpointWriter::CheckpointWriter(CheckpointPlan plan, const CheckpointWriteOptions& options,
                                   const std::vector<fs::path>& inputs)
    : plan_(std::move(plan)), inputs_(inputs), force_(options.force) {
  std::error_code ec;
  const fs::path& out = plan_.output;
  std::vector<fs::path> targets;
  for (const auto& s : plan_.shards) targets.push_back(s.path);
  if (plan_.is_folder) {
    targets.push_back(out / kIndexFileName);
    targets.push_back(out / "model.safetensors");
  }
  // An output is never, and never inside, a checkpoint folder an input reads from (a folder input, the
  // folder of an index input, and every folder a shard of those lives in), symlinks resolved: even with
  // force, writing there would replace the input's index, configs and tokenizer. Checked before anything
  // is created. A single-file input protects only itself, so `-o out.safetensors` may sit beside it.
  {
    std::vector<fs::path> folders;
    for (const auto& in : inputs) {
      fs::path folder;
      if (fs::is_directory(in, ec)) folder = in;
      else if (in.extension() == ".json") folder = in.has_parent_path() ? in.parent_path() : fs::path(".");
      if (folder.empty()) continue;
      const fs::path root = fs::canonical(folder, ec);
      if (!ec) folders.push_back(root);
    }
    std::vector<fs::path> shard_folders;
    for (const auto& in : inputs) {
      if (fs::is_directory(in, ec)) continue;
      const fs::path parent = fs::canonical(in, ec).parent_path();
      if (ec) continue;
      for (const auto& f : folders) {
        if (format_detail::path_inside(f, parent)) shard_folders.push_back(parent);
      }
    }
    folders.insert(folders.end(), shard_folders.begin(), shard_folders.end());
    const fs::path out_resolved = fs::weakly_canonical(fs::absolute(out, ec), ec);
    for (const auto& f : folders) {
      if (!ec && format_detail::path_inside(f, out_resolved)) {
        throw Error(ErrorCode::kOutputExists,
                    fmt::format("{}: the output {} the input checkpoint folder {}; writing there would replace or "
                                "shadow that input's files, so it is refused whatever the flags (--force does not "
                                "change this): choose an output path outside it",
                                out.string(), out_resolved == f ? "is" : "is inside", f.string()));
      }
    }
  }
  // Inputs are never overwritten, not even with force.
  for (const auto& in : inputs) {
    for (const auto& p : protected_paths(in)) {
      bool hit = format_detail::same_path(out, p);
      for (const auto& t : targets) hit = hit || format_detail::same_path(t, p);
      if (hit) {
        throw Error(ErrorCode::kOutputExists,
                    out.string() + ": the output would overwrite the input " + in.string() + " (refused even with --force)");
      }
    }
  }
  if (plan_.is_folder) {
    if (fs::exists(out, ec) && !fs::is_directory(out, ec)) {
      throw Error(ErrorCode::kOutputExists, out.string() + ": exists and is not a folder");
    }
  } else if (fs::is_directory(out, ec)) {
    throw Error(ErrorCode::kOutputExists, out.string() + ": is a folder, expected a .safetensors file path");
  }
  if (!force_) {
    for (const auto& t : targets) {
      if (fs::exists(fs::symlink_status(t, ec))) {
        throw Error(ErrorCode::kOutputExists, t.string() + ": already exists (use --force to replace it)");
      }
    }
  }
  if (plan_.is_folder) {
    created_folder_ = fs::create_directories(out, ec);
    if (ec) {
      throw Error(ec.value() == ENOSPC || ec.value() == EDQUOT ? ErrorCode::kDiskFull : ErrorCode::kIo,
                  out.string() + ": cannot create the folder: " + ec.message());
    }
  }
  writers_.reserve(plan_.shards.size());
  try {
    for (const auto& s : plan_.shards) writers_.push_back(std::make_unique<SafetensorsWriter>(s.path, s.layout));
  } catch (...) {  // e.g. a full disk when reserving: the destructor does not run for a failed constructor
    writers_.clear();
    if (created_folder_) ::rmdir(out.c_str());
    throw;
  }
}

void CheckpointWriter::write(std::string_view name, std::uint64_t offset_in_tensor,
                             std::span<const std::byte> bytes) const {
  const auto it = plan_.location.find(name);
  if (it == plan_.location.end()) {
    throw Error(ErrorCode::kTensorMissing, plan_.output.string() + ": no tensor " + quote_name(name) + " in the plan");
  }
  write(it->second.first, it->second.second, offset_in_tensor, bytes);
}

void CheckpointWriter::write(std::size_t shard, std::size_t index, std::uint64_t offset_in_tensor,
                             std::span<const std::byte> bytes) const {
  if (shard >= writers_.size()) {
    throw Error(ErrorCode::kInternal, plan_.output.string() + ": shard " + std::to_string(shard) + " out of range");
  }
  writers_[shard]->write_tensor(index, offset_in_tensor, bytes);
}

void CheckpointWriter::commit(const std::vector<fs::path>& auxiliary_files,
                              const std::map<std::string, std::string>& generated_files) {
  if (committed_) throw Error(ErrorCode::kInternal, plan_.output.string() + ": committed twice");
  const fs::path& out = plan_.output;
  std::error_code ec;
  // Check the auxiliary files before publishing anything, so a refusal leaves no half output.
  std::vector<std::pair<fs::path, fs::path>> copies;
  std::vector<std::pair<const std::string*, fs::path>> generated;
  if (plan_.is_folder) {
    const auto refuse_existing = [&](const fs::path& dest) {
      if (!force_ && fs::exists(fs::symlink_status(dest, ec))) {
        throw Error(ErrorCode::kOutputExists, dest.string() + ": already exists (use --force to replace it)");
      }
    };
    const auto refuse_input = [&](const fs::path& dest) {
      for (const auto& in : inputs_) {
        if (format_detail::same_path(dest, in)) {
          throw Error(ErrorCode::kOutputExists,
                      fmt::format("{}: would replace the input {} (refused even with --force)", dest.string(), in.string()));
        }
      }
    };
    for (const auto& [name, content] : generated_files) {
      const fs::path rel(name);
      if (name.empty() || rel.has_parent_path() || name == "." || name == "..") {
        throw Error(ErrorCode::kInvalidArgument, plan_.output.string() + ": generated file " + quote_name(name) +
                                                     " is not a plain file name");
      }
      refuse_existing(out / rel);
      refuse_input(out / rel);
      generated.emplace_back(&content, out / rel);
    }
    for (const auto& aux : auxiliary_files) {
      const fs::path dest = out / aux.filename();
      if (generated_files.count(aux.filename().string()) != 0) continue;  // replaced by a generated file
      if (format_detail::same_path(aux, dest)) continue;
      refuse_existing(dest);
      refuse_input(dest);
      copies.emplace_back(aux, dest);
    }
  }
  // Everything that can fail for lack of space or a bad source happens before anything is published:
  // the shards are synced, the auxiliary files copied and synced, the index written and synced, all
  // under temp names. Then the renames: auxiliary files, shards, the index last (a reader sees a
  // complete model only once its last file has its final name).
  for (auto& w : writers_) w->sync();
  std::vector<AtomicFile> prepared;
  prepared.reserve(copies.size() + generated.size());
  for (const auto& [from, to] : copies) prepared.push_back(prepare_copy(from, to));
  for (const auto& [content, to] : generated) {
    AtomicFile file(to, content->size());
    file.write_at(0, std::as_bytes(std::span(content->data(), content->size())));
    file.sync();
    prepared.push_back(std::move(file));
  }
  std::optional<AtomicFile> index;
  const fs::path index_path = out / kIndexFileName;
  if (plan_.is_folder && plan_.shards.size() > 1) {
    nlohmann::json weight_map = nlohmann::json::object();
    for (const auto& s : plan_.shards) {
      const std::string file = s.path.filename().string();
      for (const auto& t : s.layout.tensors) weight_map[t.name] = file;
    }
    const nlohmann::json json = {{"metadata", {{"total_size", plan_.total_bytes}}}, {"weight_map", weight_map}};
    const std::string text = json.dump(2) + "\n";
    index.emplace(index_path, text.size());
    index->write_at(0, std::as_bytes(std::span(text.data(), text.size())));
    index->sync();
  }
  committed_ = true;
  for (auto& f : prepared) f.commit();
  for (auto& w : writers_) w->commit();
  if (index) index->commit();
  if (plan_.is_folder && force_) remove_stale_model_files();
}

void CheckpointWriter::remove_stale_model_files() const {
  // With --force over an earlier output: its model files that this output does not have would be
  // read in place of (or beside) the new ones (a stale model.safetensors before the new index, shards
  // of another count). Inputs are never removed.
  std::set<std::string> ours;
  for (const auto& s : plan_.shards) ours.insert(s.path.filename().string());
  if (plan_.shards.size() > 1) ours.insert(kIndexFileName);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(plan_.output, ec)) {
    const std::string name = entry.path().filename().string();
    if (ours.count(name) || !is_model_file_name(name)) continue;
    bool input = false;
    for (const auto& in : inputs_) input = input || format_detail::same_path(entry.path(), in);
    if (input) continue;
    if (::unlink(entry.path().c_str()) != 0) {
      const int err = errno;
      throw Error(ErrorCode::kIo, entry.path().string() + ": cannot remove the stale file of an earlier output: " +
                                      format_detail::errno_text(err));
    }
  }
}

CheckpointWriter::~CheckpointWriter() {
  // An output that was never committed leaves nothing: the writers remove their temp files, then an
  // output folder this writer created is removed if it is empty.
  writers_.clear();
  if (!committed_ && created_folder_) ::rmdir(plan_.output.c_str());
}

}  // namespace taskvec
