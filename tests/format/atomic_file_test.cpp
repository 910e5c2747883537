// AtomicFile: temp file then rename; nothing left behind when not committed; disk full is kDiskFull.
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <string>
#include <vector>

#include "support/builders.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;

std::size_t count_entries(const fs::path& dir) {
  return static_cast<std::size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator{}));
}

std::span<const std::byte> bytes_of(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

TEST(AtomicFile, UncommittedLeavesNothing) {
  test::TempDir dir;
  {
    AtomicFile f(dir / "out.bin", 1000);
    f.write_at(0, bytes_of("hello"));
    EXPECT_TRUE(fs::exists(f.temp_path()));
    EXPECT_EQ(f.temp_path().parent_path(), dir.path());
    EXPECT_EQ(f.temp_path().filename().string().rfind(".out.bin.tmp-", 0), 0u);
    EXPECT_EQ(fs::file_size(f.temp_path()), 1000u);  // reserved up front
    EXPECT_FALSE(fs::exists(dir / "out.bin"));
  }
  EXPECT_EQ(count_entries(dir.path()), 0u);
}

TEST(AtomicFile, CommitPublishesAndRemovesTemp) {
  test::TempDir dir;
  fs::path temp;
  {
    AtomicFile f(dir / "out.bin", 10);
    temp = f.temp_path();
    f.write_at(5, bytes_of("world"));
    f.write_at(0, bytes_of("hello"));
    f.commit();
    EXPECT_EQ(static_cast<ErrorCode>([&] {
                try {
                  f.commit();
                } catch (const Error& e) {
                  return e.code();
                }
                return ErrorCode::kIo;
              }()),
              ErrorCode::kInternal);
  }
  EXPECT_EQ(test::read_file(dir / "out.bin"), "helloworld");
  EXPECT_FALSE(fs::exists(temp));
  EXPECT_EQ(count_entries(dir.path()), 1u);
  struct stat st {};
  ASSERT_EQ(::stat((dir / "out.bin").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
}

TEST(AtomicFile, CommitReplacesAnExistingFile) {
  test::TempDir dir;
  test::write_file(dir / "out.bin", "old contents that are longer");
  AtomicFile f(dir / "out.bin", 3);
  f.write_at(0, bytes_of("new"));
  EXPECT_EQ(test::read_file(dir / "out.bin"), "old contents that are longer");
  f.commit();
  EXPECT_EQ(test::read_file(dir / "out.bin"), "new");
}

TEST(AtomicFile, MovedFromDoesNotDeleteTheTemp) {
  test::TempDir dir;
  AtomicFile a(dir / "m.bin", 4);
  const fs::path temp = a.temp_path();
  {
    AtomicFile b(std::move(a));
    EXPECT_EQ(b.temp_path(), temp);
    b.write_at(0, bytes_of("abcd"));
    b.commit();
  }
  EXPECT_EQ(test::read_file(dir / "m.bin"), "abcd");
}

TEST(AtomicFile, MissingFolderIsIo) {
  test::TempDir dir;
  try {
    AtomicFile f(dir / "no" / "such" / "x.bin", 4);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
  }
}

// Child exit codes of the disk-full test.
enum : int { kChildOk = 0, kChildNoError = 10, kChildWrongCode = 11, kChildLeftFiles = 12, kChildOther = 13 };

// Runs `body` in a forked child whose file size limit is 64 KiB (so writes past it fail with EFBIG,
// as on a full disk), and returns the child's exit code.
template <typename F>
int run_with_small_fsize_limit(F&& body) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    rlimit lim{64 * 1024, 64 * 1024};
    if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(kChildOther);
    int code = kChildOther;
    try {
      code = body();
    } catch (...) {
      code = kChildOther;
    }
    ::_exit(code);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

// In a child limited to 64 KiB files: reserving 1 MiB in `dir` must fail with kDiskFull and leave `dir`
// empty. Returns the child's exit code (kChildOk when so).
int reserve_past_the_limit(const std::filesystem::path& dir) {
  return run_with_small_fsize_limit([&] {
    try {
      AtomicFile f(dir / "big.bin", 1 << 20);
      return static_cast<int>(kChildNoError);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDiskFull) return static_cast<int>(kChildWrongCode);
    }
    return count_entries(dir) == 0 ? static_cast<int>(kChildOk) : static_cast<int>(kChildLeftFiles);
  });
}

TEST(AtomicFile, DiskFullOnReserveIsDiskFull) {
  test::TempDir dir;
  EXPECT_EQ(reserve_past_the_limit(dir.path()), kChildOk);
}

// On tmpfs the reservation is a free-space check and ftruncate (fallocate would zero every page):
// a file larger than the limit still fails before any data is written.
TEST(AtomicFile, DiskFullOnReserveIsDiskFullOnTmpfs) {
  struct statfs fs {};
  if (::statfs("/dev/shm", &fs) != 0 || fs.f_type != TMPFS_MAGIC) GTEST_SKIP() << "no tmpfs at /dev/shm";
  std::string templ = "/dev/shm/taskvec-test-XXXXXX";
  ASSERT_NE(::mkdtemp(templ.data()), nullptr);
  const std::filesystem::path dir = templ;
  EXPECT_EQ(reserve_past_the_limit(dir), kChildOk);
  // And without the limit the reserved file has its full size before anything is written.
  {
    AtomicFile f(dir / "ok.bin", 1 << 20);
    EXPECT_EQ(std::filesystem::file_size(f.temp_path()), 1u << 20);
  }
  std::filesystem::remove_all(dir);
}

TEST(AtomicFile, DiskFullOnWriteIsDiskFull) {
  test::TempDir dir;
  const int rc = run_with_small_fsize_limit([&] {
    try {
      AtomicFile f(dir / "big.bin", 0);  // nothing reserved: the pwrite itself must fail
      const std::vector<std::byte> chunk(256 * 1024);
      f.write_at(0, chunk);
      return static_cast<int>(kChildNoError);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDiskFull) return static_cast<int>(kChildWrongCode);
    }
    return count_entries(dir.path()) == 0 ? static_cast<int>(kChildOk) : static_cast<int>(kChildLeftFiles);
  });
  EXPECT_EQ(rc, kChildOk);
}

TEST(SafetensorsWriter, DiskFullLeavesNoFinalAndNoTempFile) {
  test::TempDir dir;
  const int rc = run_with_small_fsize_limit([&] {
    try {
      std::vector<std::pair<TensorSpec, std::vector<std::byte>>> t;
      t.emplace_back(TensorSpec{"w", DType::kF32, {1 << 16}}, std::vector<std::byte>(1 << 18));
      write_safetensors(dir / "model.safetensors", t);
      return static_cast<int>(kChildNoError);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDiskFull) return static_cast<int>(kChildWrongCode);
    }
    return count_entries(dir.path()) == 0 ? static_cast<int>(kChildOk) : static_cast<int>(kChildLeftFiles);
  });
  EXPECT_EQ(rc, kChildOk);
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
}

}  // namespace
}  // namespace taskvec
