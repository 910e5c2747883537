// Faults through the taskvec binary: a process killed mid-write, a full disk (RLIMIT_FSIZE), outputs
// refused before any work. After every test the input files must be byte-identical to what they were
// before it (checked in TearDown, failing tests included): taskvec never writes to an input.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/engine.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::read_values;
using test::TempDir;

// FNV-1a 64 of a whole file, read in 1 MiB blocks.
std::uint64_t checksum(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path.string());
  std::uint64_t h = 0xcbf29ce484222325ULL;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    for (std::streamsize i = 0; i < in.gcount(); ++i) {
      h ^= static_cast<unsigned char>(buf[static_cast<std::size_t>(i)]);
      h *= 0x100000001b3ULL;
    }
  }
  return h;
}

// Names in `folder` that look like taskvec's hidden temp files (".NAME.tmp-XXXXXX").
std::vector<std::string> temp_files(const fs::path& folder) {
  std::vector<std::string> out;
  DIR* d = ::opendir(folder.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string n = e->d_name;
    if (n.size() > 1 && n[0] == '.' && n.find(".tmp-") != std::string::npos) out.push_back(n);
  }
  ::closedir(d);
  return out;
}

struct ChildOptions {
  rlim_t file_size_limit = RLIM_INFINITY;  ///< RLIMIT_FSIZE in the child; SIGXFSZ is ignored there
  rlim_t open_files_soft = RLIM_INFINITY;  ///< RLIMIT_NOFILE soft limit in the child (unchanged if infinite)
  rlim_t open_files_hard = RLIM_INFINITY;  ///< and its hard limit (unchanged if infinite)
};

// Starts TASKVEC_BIN with `args` (stdout and stderr to files in `logs`); returns the child's pid.
pid_t spawn(const std::vector<std::string>& args, const fs::path& logs, const ChildOptions& options = {}) {
  std::vector<std::string> argv_s{TASKVEC_BIN};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string out = (logs / "stdout.txt").string(), err = (logs / "stderr.txt").string();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    // Child: only async-signal-safe calls until exec.
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || ::dup2(o, 1) < 0 || ::dup2(e, 2) < 0) ::_exit(126);
    if (options.file_size_limit != RLIM_INFINITY) {
      ::signal(SIGXFSZ, SIG_IGN);  // so a write past the limit fails with EFBIG instead of killing us
      const rlimit lim{options.file_size_limit, options.file_size_limit};
      if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(126);
    }
    if (options.open_files_soft != RLIM_INFINITY || options.open_files_hard != RLIM_INFINITY) {
      rlimit lim{};
      if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(126);
      if (options.open_files_hard != RLIM_INFINITY) lim.rlim_max = options.open_files_hard;
      if (options.open_files_soft != RLIM_INFINITY) lim.rlim_cur = options.open_files_soft;
      if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) ::_exit(126);
    }
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

// Waits for `pid`; the exit status, or 128 + signal.
int wait_status(pid_t pid) {
  int raw = 0;
  while (::waitpid(pid, &raw, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return WIFEXITED(raw) ? WEXITSTATUS(raw) : WIFSIGNALED(raw) ? 128 + WTERMSIG(raw) : -1;
}

using test::read_text;

// A raw F32 safetensors file of `tensors` tensors of `elements` floats each, every value `value`,
// written directly (fast for big files) with `metadata` (already JSON text, or empty).
void write_big_f32(const fs::path& path, int tensors, std::uint64_t elements, float value, const std::string& metadata) {
  std::string header = "{";
  if (!metadata.empty()) header += "\"__metadata__\":" + metadata + ",";
  for (int i = 0; i < tensors; ++i) {
    const std::uint64_t b = i * elements * 4, e = (i + 1) * elements * 4;
    header += (i ? "," : "") + std::string("\"layers.") + std::to_string(i) + ".weight\":{\"dtype\":\"F32\",\"shape\":[" +
              std::to_string(elements) + "],\"data_offsets\":[" + std::to_string(b) + "," + std::to_string(e) + "]}";
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  const std::uint64_t n = header.size();
  char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  out.write(len, 8);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  std::vector<float> block(1 << 20, value);
  for (int i = 0; i < tensors; ++i) {
    for (std::uint64_t done = 0; done < elements;) {
      const std::uint64_t n_now = std::min<std::uint64_t>(block.size(), elements - done);
      out.write(reinterpret_cast<const char*>(block.data()), static_cast<std::streamsize>(n_now * 4));
      done += n_now;
    }
  }
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

// Every test: a pretrained model and two task vectors made from it (recorded fingerprint), in `in/`,
// outputs go to `out/`. TearDown checks the inputs did not change by a single byte.
class Fault : public ::testing::Test {
 protected:
  void make_inputs(int tensors, std::uint64_t elements) {
    write_big_f32(in / "pre.safetensors", tensors, elements, 0.5f, "");
    const std::string fp = Checkpoint::open(in / "pre.safetensors").fingerprint();
    const std::string meta = std::string("{\"") + kMetaKind + "\":\"task_vector\",\"" + kMetaPretrainedFingerprint +
                             "\":\"" + fp + "\"}";
    write_big_f32(in / "tau_a.safetensors", tensors, elements, 0.25f, meta);
    write_big_f32(in / "tau_b.safetensors", tensors, elements, -0.125f, meta);
    for (const auto& e : fs::directory_iterator(in)) sums[e.path()] = checksum(e.path());
  }
  std::vector<std::string> apply_args(const fs::path& output) const {
    return {"apply", "-q", (in / "pre.safetensors").string(), "-t", (in / "tau_a.safetensors").string() + ":0.5",
            "-t", (in / "tau_b.safetensors").string() + ":-1", "-o", output.string()};
  }
  void TearDown() override {
    ASSERT_FALSE(sums.empty());
    for (const auto& [path, sum] : sums) EXPECT_EQ(checksum(path), sum) << path << " changed";
    std::size_t files = 0;
    for ([[maybe_unused]] const auto& e : fs::directory_iterator(in)) ++files;
    EXPECT_EQ(files, sums.size()) << "a file appeared in the input folder";
  }

  TempDir dir;
  fs::path in = dir.subdir("in");
  fs::path out = dir.subdir("out");
  fs::path logs = dir.subdir("logs");
  std::map<fs::path, std::uint64_t> sums;
};

// Runs taskvec with `args` and SIGKILLs it as soon as a hidden temp file appears in `folder` (the
// writer creates it, space reserved, right before streaming data into it). Returns false if the run
// finished before that could happen (a loaded machine): the caller retries.
bool kill_while_writing(const std::vector<std::string>& args, const fs::path& folder, const fs::path& logs,
                        int signal = SIGKILL) {
  const pid_t pid = spawn(args, logs);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    if (fs::is_directory(folder) && !temp_files(folder).empty()) {
      if (::kill(pid, signal) != 0) break;
      return wait_status(pid) == 128 + signal;
    }
    int raw = 0;
    if (::waitpid(pid, &raw, WNOHANG) == pid) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  ::kill(pid, SIGKILL);
  wait_status(pid);
  return false;
}

// Every entry of `folder` is a hidden temp file: nothing under a final name.
void expect_only_temp_files(const fs::path& folder) {
  if (!fs::is_directory(folder)) return;
  for (const auto& e : fs::directory_iterator(folder)) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n[0] == '.' && n.find(".tmp-") != std::string::npos) << "final-named file " << n << " after SIGKILL";
  }
}

// SIGKILL while the output is being written: no file under the final name. The hidden temp file
// (".model.safetensors.tmp-XXXXXX") stays behind: nothing can remove it after SIGKILL, and no reader
// takes it for a model (hidden, not *.safetensors).
TEST_F(Fault, KilledMidWriteLeavesNoFinalFile) {
  make_inputs(4, std::uint64_t{4} << 20);  // 3 files x 4 tensors x 16 MiB = 3 x 64 MiB of F32
  const fs::path target = out / "model.safetensors";
  auto args = apply_args(target);
  args.insert(args.end(), {"--threads", "1"});
  bool killed = false;
  for (int attempt = 0; attempt < 5 && !killed; ++attempt) {
    fs::remove(target);
    killed = kill_while_writing(args, out, logs);
  }
  ASSERT_TRUE(killed) << "taskvec always finished before its temp file was seen: " << read_text(logs / "stderr.txt");
  EXPECT_FALSE(fs::exists(target)) << "a final-named file survived SIGKILL";
  EXPECT_FALSE(temp_files(out).empty());
  expect_only_temp_files(out);
}

// Same for a sharded folder output: no shard under its final name and no index.
TEST_F(Fault, KilledMidWriteLeavesNoFinalFolderFiles) {
  make_inputs(4, std::uint64_t{4} << 20);
  const fs::path target = out / "model";
  auto args = apply_args(target);
  args.insert(args.end(), {"--threads", "1", "--max-shard-size", "40MB"});
  bool killed = false;
  for (int attempt = 0; attempt < 5 && !killed; ++attempt) {
    fs::remove_all(target);
    killed = kill_while_writing(args, target, logs);
  }
  ASSERT_TRUE(killed) << "taskvec always finished before its temp file was seen: " << read_text(logs / "stderr.txt");
  expect_only_temp_files(target);
}

// Ctrl-C, SIGTERM (a job scheduler's stop) or SIGHUP while the output is written: the process ends by that
// signal, as it would have, and its handler has removed the hidden temp files: nothing at all is left.
TEST_F(Fault, InterruptedMidWriteLeavesNothing) {
  make_inputs(4, std::uint64_t{4} << 20);
  const fs::path target = out / "model";
  auto args = apply_args(target);
  args.insert(args.end(), {"--threads", "1", "--max-shard-size", "40MB"});
  for (int signal : {SIGINT, SIGTERM, SIGHUP}) {
    bool stopped = false;
    for (int attempt = 0; attempt < 5 && !stopped; ++attempt) {
      fs::remove_all(target);
      stopped = kill_while_writing(args, target, logs, signal);
    }
    ASSERT_TRUE(stopped) << "taskvec always finished before its temp file was seen (signal " << signal << ")";
    EXPECT_TRUE(!fs::exists(target) || fs::is_empty(target)) << "signal " << signal << " left files in " << target;
    if (fs::is_directory(target)) {
      EXPECT_TRUE(temp_files(target).empty()) << "signal " << signal;
    }
  }
}

// A full disk, simulated by RLIMIT_FSIZE below the output size: exit 7 (disk_full), a message saying
// so, and neither the final file nor a temp file left behind.
TEST_F(Fault, FullDiskIsExitSevenAndLeavesNothing) {
  make_inputs(2, std::uint64_t{256} << 10);  // 2 MiB per file
  const fs::path target = out / "model.safetensors";
  const pid_t pid = spawn(apply_args(target), logs, {.file_size_limit = 512 << 10});
  EXPECT_EQ(wait_status(pid), 7) << read_text(logs / "stderr.txt");
  EXPECT_NE(read_text(logs / "stderr.txt").find("disk_full"), std::string::npos) << read_text(logs / "stderr.txt");
  EXPECT_FALSE(fs::exists(target));
  EXPECT_TRUE(temp_files(out).empty());
  // The same for a sharded folder (two 1 MiB shards): no shard, no index.
  const fs::path folder = out / "sharded";
  const pid_t pid2 = spawn([&] {
    auto a = apply_args(folder);
    a.insert(a.end(), {"--max-shard-size", "1MB"});
    return a;
  }(), logs, {.file_size_limit = 512 << 10});
  EXPECT_EQ(wait_status(pid2), 7) << read_text(logs / "stderr.txt");
  if (fs::is_directory(folder)) {
    for (const auto& e : fs::directory_iterator(folder)) ADD_FAILURE() << "left behind: " << e.path();
  }
}

// The output path is one of the inputs: refused (exit 6) before any work, even with --force, for the
// pretrained file and for a task vector, given by the same or another spelling of the path.
TEST_F(Fault, OutputEqualToAnInputIsRefused) {
  make_inputs(2, 1024);
  for (const fs::path& target : {in / "pre.safetensors", in / "tau_b.safetensors", in / "." / "tau_a.safetensors",
                                 out / ".." / "in" / "pre.safetensors"}) {
    for (const bool force : {false, true}) {
      auto args = apply_args(target);
      if (force) args.push_back("--force");
      const int status = wait_status(spawn(args, logs));
      EXPECT_EQ(status, 6) << target << (force ? " --force" : "") << ": " << read_text(logs / "stderr.txt");
      EXPECT_TRUE(temp_files(in).empty()) << "work started for " << target;
    }
  }
  // edit: the output is the fine-tuned model named in the expression.
  const int status = wait_status(spawn({"edit", "-q", "--force", "-m", "pre=" + (in / "pre.safetensors").string(), "-m",
                                        "a=" + (in / "tau_a.safetensors").string(), "pre + tau(a)", "-o",
                                        (in / "tau_a.safetensors").string()},
                                       logs));
  EXPECT_EQ(status, 6) << read_text(logs / "stderr.txt");
}

// An existing output without --force: refused (exit 6) before any work, the existing file untouched;
// with --force it is replaced.
TEST_F(Fault, ExistingOutputWithoutForceIsRefused) {
  make_inputs(2, 1024);
  const fs::path target = out / "model.safetensors";
  test::write_file(target, "not a model, but someone's file");
  const std::uint64_t before = checksum(target);
  EXPECT_EQ(wait_status(spawn(apply_args(target), logs)), 6) << read_text(logs / "stderr.txt");
  EXPECT_NE(read_text(logs / "stderr.txt").find("output_exists"), std::string::npos);
  EXPECT_EQ(checksum(target), before);
  EXPECT_TRUE(temp_files(out).empty());
  // The same for a folder output holding a model.
  const fs::path folder = out / "folder";
  fs::create_directories(folder);
  test::write_file(folder / "model.safetensors", "x");
  EXPECT_EQ(wait_status(spawn(apply_args(folder), logs)), 6) << read_text(logs / "stderr.txt");
  EXPECT_EQ(read_text(folder / "model.safetensors"), "x");
  // --force replaces it with a valid model.
  auto forced = apply_args(target);
  forced.push_back("--force");
  EXPECT_EQ(wait_status(spawn(forced, logs)), 0) << read_text(logs / "stderr.txt");
  EXPECT_NO_THROW(validate_checkpoint(target));
  EXPECT_TRUE(temp_files(out).empty());
}

// Failing runs of every kind leave the inputs untouched (TearDown) and no output: a corrupt input, a
// task vector from another base, a bad expression, a missing input.
TEST_F(Fault, FailedRunsLeaveInputsAndNoOutput) {
  make_inputs(2, 1024);
  const auto bytes = read_text(in / "pre.safetensors");
  test::write_file(in / "cut.safetensors", bytes.substr(0, bytes.size() - 5));
  write_big_f32(in / "other.safetensors", 2, 1024, 2.0f, "");
  sums[in / "cut.safetensors"] = checksum(in / "cut.safetensors");
  sums[in / "other.safetensors"] = checksum(in / "other.safetensors");
  const std::string target = (out / "model.safetensors").string();
  struct Case {
    std::vector<std::string> args;
    int status;
  };
  const std::vector<Case> cases = {
      {{"apply", (in / "cut.safetensors").string(), "-t", (in / "tau_a.safetensors").string(), "-o", target}, 4},
      {{"apply", (in / "other.safetensors").string(), "-t", (in / "tau_a.safetensors").string(), "-o", target}, 5},
      {{"edit", "-m", "pre=" + (in / "pre.safetensors").string(), "-m", "a=" + (in / "other.safetensors").string(),
        "pre * a", "-o", target},
       2},
      {{"diff", (in / "pre.safetensors").string(), (in / "missing.safetensors").string(), "-o", target}, 3},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(wait_status(spawn(c.args, logs)), c.status) << c.args[0] << ": " << read_text(logs / "stderr.txt");
    EXPECT_FALSE(fs::exists(target));
    EXPECT_TRUE(temp_files(out).empty());
  }
}

// An index file over the 100 MB limit (sparse here, so it costs no disk) is refused as an invalid
// file (exit 4) without being read into memory.
TEST_F(Fault, OversizedIndexIsRefused) {
  make_inputs(1, 16);
  const fs::path folder = dir.subdir("sharded");
  fs::copy_file(in / "pre.safetensors", folder / "model-00001-of-00001.safetensors");
  test::write_file(folder / kIndexFileName, R"({"weight_map":{}})");
  fs::resize_file(folder / kIndexFileName, std::uint64_t{200} << 20);
  const pid_t pid = spawn({"validate", folder.string()}, logs);
  EXPECT_EQ(wait_status(pid), 4) << read_text(logs / "stderr.txt");
  EXPECT_NE(read_text(logs / "stderr.txt").find("invalid_index"), std::string::npos) << read_text(logs / "stderr.txt");
}

// Every input shard keeps a descriptor open for the run: two 48-shard models need ~100. The CLI raises
// the soft RLIMIT_NOFILE to the hard limit, so a soft limit of 64 does not stop it; with the hard limit
// at 64 too it fails cleanly (exit 3, io) naming the file, and writes nothing.
TEST_F(Fault, ManyShardsPassALowSoftOpenFileLimit) {
  make_inputs(48, 1024);  // 48 tensors of 4 KiB
  const fs::path a = out / "a", b = out / "b", edited = out / "edited";
  const pid_t split = spawn({"edit", "-q", "pre", "-m", "pre=" + (in / "pre.safetensors").string(), "--max-shard-size",
                             "4KB", "-o", a.string()},
                            logs);
  ASSERT_EQ(wait_status(split), 0) << read_text(logs / "stderr.txt");
  std::size_t shards = 0;
  for (const auto& e : fs::directory_iterator(a)) shards += e.path().extension() == ".safetensors";
  ASSERT_EQ(shards, 48u);
  fs::copy(a, b);
  const std::vector<std::string> args{"edit", "-q", "pre + 0.5*(ft - pre)", "-m", "pre=" + a.string(),
                                      "-m", "ft=" + b.string(), "-o", edited.string()};
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
  // Not under the sanitizers: their runtimes need descriptors of their own (UBSan's type check reads
  // the module list) and report a false "invalid vptr" when the process has none left.
  const pid_t low_hard = spawn(args, logs, {.open_files_soft = 64, .open_files_hard = 64});
  EXPECT_EQ(wait_status(low_hard), 3) << read_text(logs / "stderr.txt");
  EXPECT_NE(read_text(logs / "stderr.txt").find("Too many open files"), std::string::npos) << read_text(logs / "stderr.txt");
  EXPECT_FALSE(fs::exists(edited));
#endif
  const pid_t low_soft = spawn(args, logs, {.open_files_soft = 64});
  EXPECT_EQ(wait_status(low_soft), 0) << read_text(logs / "stderr.txt");
  EXPECT_EQ(read_values(edited, "layers.47.weight"), std::vector<double>(1024, 0.5));
}

// A FIFO planted in a model folder in place of the model is refused (exit 3, not a regular file)
// instead of blocking forever in open().
TEST_F(Fault, FifoInsteadOfAModelDoesNotHang) {
  make_inputs(1, 16);
  const fs::path folder = dir.subdir("fifo");
  ASSERT_EQ(::mkfifo((folder / "model.safetensors").c_str(), 0644), 0);
  for (const fs::path& target : {folder / "model.safetensors", folder}) {
    const pid_t pid = spawn({"validate", target.string()}, logs);
    int status = -1;
    for (int i = 0; i < 600 && status < 0; ++i) {  // up to 60 s
      int raw = 0;
      if (::waitpid(pid, &raw, WNOHANG) == pid) {
        status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    }
    if (status < 0) {
      ::kill(pid, SIGKILL);
      wait_status(pid);
      ADD_FAILURE() << "taskvec validate " << target << " hung on a FIFO";
    } else {
      EXPECT_EQ(status, 3) << target << ": " << read_text(logs / "stderr.txt");
    }
  }
}

}  // namespace
}  // namespace taskvec
