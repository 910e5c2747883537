// Output files written in place and published by rename, so no reader sees a partial file.
#include <fcntl.h>
#include <linux/magic.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <utility>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {

namespace {

[[noreturn]] void fail_errno(int err, const std::filesystem::path& path, const std::string& doing) {
  const ErrorCode code = (err == ENOSPC || err == EFBIG || err == EDQUOT) ? ErrorCode::kDiskFull : ErrorCode::kIo;
  throw Error(code, path.string() + ": cannot " + doing + ": " + format_detail::errno_text(err));
}

std::filesystem::path folder_of(const std::filesystem::path& path) {
  auto parent = path.parent_path();
  return parent.empty() ? std::filesystem::path(".") : parent;
}

// The temp files alive now, for the signal handler: a fixed table (no allocation, no lock) whose slots
// are claimed and released with atomics, which are lock-free and so async-signal-safe. A run with more
// temp files than slots leaves the rest to the destructors (and to chance, on a signal).
constexpr std::size_t kTempSlots = 256;
constexpr std::size_t kTempPathMax = 4096;
struct TempSlot {
  std::atomic<int> state{0};  // 0 free, 1 being filled, 2 names a live temp file
  char path[kTempPathMax];
};
TempSlot g_temp_slots[kTempSlots];
static_assert(std::atomic<int>::is_always_lock_free);
// The handler sets g_terminating, then waits (bounded) until no thread is between claiming a temp name
// and registering it (g_creating), so no temp file appears after it has emptied the table.
std::atomic<int> g_terminating{0};
std::atomic<int> g_creating{0};

// Claims a free slot of `slots` for `path` (lock-free); its index, or -1 when none is free or the path
// is too long.
int claim_slot(TempSlot* slots, std::size_t count, const std::string& path) noexcept {
  if (path.size() >= kTempPathMax) return -1;
  for (std::size_t i = 0; i < count; ++i) {
    int expected = 0;
    if (!slots[i].state.compare_exchange_strong(expected, 1, std::memory_order_acq_rel)) continue;
    std::memcpy(slots[i].path, path.c_str(), path.size() + 1);
    slots[i].state.store(2, std::memory_order_release);
    return static_cast<int>(i);
  }
  return -1;
}

int register_temp(const std::string& path) noexcept { return claim_slot(g_temp_slots, kTempSlots, path); }

void release_temp(int slot) noexcept {
  if (slot >= 0) g_temp_slots[slot].state.store(0, std::memory_order_release);
}

// Folders the handler removes whole (a command's temporary folder of intermediate outputs).
constexpr std::size_t kFolderSlots = 16;
TempSlot g_folder_slots[kFolderSlots];

// Removes what `dir_fd` holds, then nothing else: only syscalls (getdents64, unlinkat, openat), which are
// async-signal-safe. Bounded depth and rounds; what it cannot remove stays.
void remove_contents_at(int dir_fd, int depth) noexcept {
  alignas(8) char buf[4096];
  for (int round = 0; round < 64; ++round) {
    bool removed = false, left = false;
    ::lseek(dir_fd, 0, SEEK_SET);
    for (;;) {
      const long n = ::syscall(SYS_getdents64, dir_fd, buf, sizeof buf);
      if (n <= 0) break;
      for (long at = 0; at < n;) {
        struct Dirent64 {
          unsigned long long ino;
          long long off;
          unsigned short reclen;
          unsigned char type;
          char name[1];
        };
        const auto* e = reinterpret_cast<const Dirent64*>(buf + at);
        at += e->reclen;
        const char* name = e->name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0'))) continue;
        if (::unlinkat(dir_fd, name, 0) == 0) {
          removed = true;
          continue;
        }
        if (depth < 6) {
          const int sub = ::openat(dir_fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
          if (sub >= 0) {
            remove_contents_at(sub, depth + 1);
            ::close(sub);
          }
        }
        if (::unlinkat(dir_fd, name, AT_REMOVEDIR) == 0) removed = true;
        else left = true;
      }
    }
    if (!left || !removed) return;
  }
}

extern "C" void remove_temps_and_reraise(int sig) {
  g_terminating.store(1);
  // A thread interrupted in the middle of creating its temp file cannot finish while this runs on it:
  // the wait is bounded (its file is registered before it exists, so nothing is missed either way).
  for (int i = 0; i < 200 && g_creating.load() > 0; ++i) {
    struct timespec pause {0, 1000000};
    ::nanosleep(&pause, nullptr);
  }
  for (auto& slot : g_temp_slots)
    if (slot.state.load(std::memory_order_acquire) == 2) ::unlink(slot.path);
  for (auto& slot : g_folder_slots) {
    if (slot.state.load(std::memory_order_acquire) != 2) continue;
    const int fd = ::open(slot.path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) continue;
    remove_contents_at(fd, 0);
    ::close(fd);
    ::rmdir(slot.path);
  }
  ::signal(sig, SIG_DFL);
  ::raise(sig);
}

}  // namespace

int register_interrupt_folder(const std::filesystem::path& folder) noexcept {
  return claim_slot(g_folder_slots, kFolderSlots, folder.string());
}

void release_interrupt_folder(int slot) noexcept {
  if (slot >= 0 && static_cast<std::size_t>(slot) < kFolderSlots) g_folder_slots[slot].state.store(0, std::memory_order_release);
}

void install_interrupt_cleanup() noexcept {
  struct sigaction action {};
  action.sa_handler = remove_temps_and_reraise;
  sigemptyset(&action.sa_mask);
  for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
    struct sigaction old {};
    // A signal the parent chose to ignore (nohup, a shell's background job) stays ignored.
    if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    ::sigaction(sig, &action, nullptr);
  }
}

AtomicFile::AtomicFile(std::filesystem::path path, std::uint64_t size) : path_(std::move(path)) {
  if (path_.filename().empty()) throw Error(ErrorCode::kInvalidArgument, path_.string() + ": not a file path");
  const std::string prefix = (folder_of(path_) / fmt::format(".{}.tmp-", path_.filename().string())).string();
  {
    // The name is registered for the signal handler before the file exists (O_EXCL, as mkstemp).
    g_creating.fetch_add(1);
    struct Done {
      ~Done() { g_creating.fetch_sub(1); }
    } done;
    if (g_terminating.load()) throw Error(ErrorCode::kIo, path_.string() + ": not created: the process is being stopped");
    thread_local std::mt19937_64 gen(std::random_device{}() ^ (static_cast<std::uint64_t>(::getpid()) << 32));
    static constexpr char kChars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    int err = EEXIST;
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
      std::string candidate = prefix;
      for (int i = 0; i < 6; ++i) candidate += kChars[gen() % (sizeof(kChars) - 1)];
      slot_ = register_temp(candidate);
      fd_ = ::open(candidate.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
      if (fd_ >= 0) {
        temp_path_ = candidate;
        break;
      }
      err = errno;
      release_temp(std::exchange(slot_, -1));
      if (err != EEXIST) break;
    }
    if (fd_ < 0) fail_errno(err, path_, "create a temporary file in " + folder_of(path_).string());
  }
  try {
    // mkstemp creates 0600; outputs are ordinary model files.
    ::fchmod(fd_, 0644);
    if (size > 0) {
      if (size > static_cast<std::uint64_t>(INT64_MAX)) {
        throw Error(ErrorCode::kDiskFull, path_.string() + ": size " + std::to_string(size) + " is too large");
      }
      // Reserve the space now so a full disk fails before any work is done. tmpfs is the exception:
      // there fallocate allocates and zeroes every page in memory, about as costly as writing the file
      // once more, so its free space is checked instead (a full tmpfs later still fails the write).
      int err = 0;
      struct statfs fs {};
      if (::fstatfs(fd_, &fs) == 0 && fs.f_type == TMPFS_MAGIC) {
        const auto free_bytes = static_cast<std::uint64_t>(fs.f_bavail) * static_cast<std::uint64_t>(fs.f_bsize);
        if (fs.f_blocks != 0 && free_bytes < size) {
          err = ENOSPC;
        } else {
          err = ::ftruncate(fd_, static_cast<off_t>(size)) == 0 ? 0 : errno;
        }
      } else {
        err = ::posix_fallocate(fd_, 0, static_cast<off_t>(size));
      }
      if (err == EINVAL || err == EOPNOTSUPP) {
        err = ::ftruncate(fd_, static_cast<off_t>(size)) == 0 ? 0 : errno;  // filesystem without fallocate
      }
      if (err != 0) fail_errno(err, path_, "reserve " + std::to_string(size) + " bytes");
    }
  } catch (...) {
    // The destructor does not run for a failed constructor: clean up here.
    ::close(fd_);
    ::unlink(temp_path_.c_str());
    release_temp(slot_);
    throw;
  }
}

AtomicFile::AtomicFile(AtomicFile&& other) noexcept
    : path_(std::move(other.path_)),
      temp_path_(std::exchange(other.temp_path_, {})),
      fd_(std::exchange(other.fd_, -1)),
      slot_(std::exchange(other.slot_, -1)),
      committed_(std::exchange(other.committed_, true)),
      synced_(other.synced_),
      unsynced_(other.unsynced_.load()) {}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
  release_temp(slot_);
}

void AtomicFile::write_at(std::uint64_t offset, std::span<const std::byte> bytes) const {
  if (fd_ < 0 || committed_) throw Error(ErrorCode::kInternal, path_.string() + ": write after commit");
  const std::byte* p = bytes.data();
  std::size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::pwrite(fd_, p, left, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      fail_errno(errno, path_, "write");
    }
    if (n == 0) fail_errno(ENOSPC, path_, "write (no progress)");
    p += n;
    left -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
  if (unsynced_.fetch_add(bytes.size(), std::memory_order_relaxed) + bytes.size() >= kWritebackBytes) {
    unsynced_.store(0, std::memory_order_relaxed);
    // Whole file, start only: a hint, so its failure is left to the fsync of commit() to report.
    ::sync_file_range(fd_, 0, 0, SYNC_FILE_RANGE_WRITE);
  }
}

void AtomicFile::sync() {
  if (fd_ < 0 || committed_) throw Error(ErrorCode::kInternal, path_.string() + ": sync after commit");
  if (::fsync(fd_) != 0) fail_errno(errno, path_, "sync");
  synced_ = true;
}

void AtomicFile::commit() {
  if (fd_ < 0 || committed_) throw Error(ErrorCode::kInternal, path_.string() + ": committed twice");
  if (!synced_) sync();
  const int fd = std::exchange(fd_, -1);
  if (::close(fd) != 0) fail_errno(errno, path_, "close");
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) fail_errno(errno, path_, "rename the temporary file onto");
  committed_ = true;
  release_temp(std::exchange(slot_, -1));  // a signal now finds no temp file under that name: harmless
  // The rename is only durable once the folder's entry is on disk.
  const int dir = ::open(folder_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    const int rc = ::fsync(dir);
    const int err = errno;
    ::close(dir);
    if (rc != 0 && err != EINVAL) fail_errno(err, folder_of(path_), "sync the folder");
  }
}

}  // namespace taskvec
