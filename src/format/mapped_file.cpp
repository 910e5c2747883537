// Read-only memory maps of input files.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

#include <fmt/format.h>

#include "format/internal.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {

MappedFile MappedFile::open(const std::filesystem::path& path) {
  // O_NONBLOCK: opening a FIFO (or a tty) planted in a model folder would otherwise block forever
  // before fstat can refuse it; it changes nothing for regular files.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) {
    const int err = errno;
    throw Error(ErrorCode::kIo, path.string() + ": cannot open: " + format_detail::errno_text(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw Error(ErrorCode::kIo, path.string() + ": cannot stat: " + format_detail::errno_text(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::kIo, path.string() + ": not a regular file");
  }
  MappedFile out;
  out.path_ = path;
  out.size_ = static_cast<std::uint64_t>(st.st_size);
  if (out.size_ > 0) {
    // MAP_PRIVATE + PROT_READ: the input can never be modified through the mapping.
    void* p = ::mmap(nullptr, static_cast<std::size_t>(out.size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      out.size_ = 0;
      throw Error(ErrorCode::kIo, path.string() + ": cannot map: " + format_detail::errno_text(err));
    }
    out.data_ = static_cast<const std::byte*>(p);
  }
  out.fd_ = fd;  // kept for read_at
  return out;
}

MappedFile::MappedFile(MappedFile&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      fd_(std::exchange(other.fd_, -1)),
      path_(std::move(other.path_)) {}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), static_cast<std::size_t>(size_));
    if (fd_ >= 0) ::close(fd_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    fd_ = std::exchange(other.fd_, -1);
    path_ = std::move(other.path_);
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), static_cast<std::size_t>(size_));
  if (fd_ >= 0) ::close(fd_);
}

void MappedFile::read_at(std::uint64_t offset, std::span<std::byte> dst) const {
  std::uint64_t done = 0;
  while (done < dst.size()) {
    const ssize_t got = ::pread(fd_, dst.data() + done, dst.size() - done, static_cast<off_t>(offset + done));
    if (got > 0) {
      done += static_cast<std::uint64_t>(got);
      continue;
    }
    if (got < 0 && errno == EINTR) continue;
    if (got == 0) {
      throw Error(ErrorCode::kIo, fmt::format("{}: unexpected end of file at byte {} (did it shrink after it was opened?)",
                                              path_.string(), offset + done));
    }
    const int err = errno;
    throw Error(ErrorCode::kIo,
                fmt::format("{}: read failed at byte {}: {}", path_.string(), offset + done, format_detail::errno_text(err)));
  }
}

namespace {

void advise(const std::byte* data, std::uint64_t size, std::uint64_t offset, std::uint64_t length, int advice) noexcept {
  if (data == nullptr || offset >= size || length == 0) return;
  if (length > size - offset) length = size - offset;
  // madvise wants a page-aligned start; widen down to the page, never past the mapping.
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t start = offset / page * page;
  const std::uint64_t len = offset + length - start;
  ::madvise(const_cast<std::byte*>(data) + start, static_cast<std::size_t>(len), advice);
}

}  // namespace

void MappedFile::advise_willneed(std::uint64_t offset, std::uint64_t length) const noexcept {
  advise(data_, size_, offset, length, MADV_WILLNEED);
}

void MappedFile::advise_dontneed(std::uint64_t offset, std::uint64_t length) const noexcept {
  // Only whole pages inside the range may be dropped: a partial page may hold bytes still in use.
  if (data_ == nullptr || offset >= size_ || length == 0) return;
  if (length > size_ - offset) length = size_ - offset;
  const auto page = static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
  const std::uint64_t start = (offset + page - 1) / page * page;
  std::uint64_t end = offset + length;
  if (end != size_) end = end / page * page;  // the mapping's last page may be partial
  if (end <= start) return;
  ::madvise(const_cast<std::byte*>(data_) + start, static_cast<std::size_t>(end - start), MADV_DONTNEED);
}

}  // namespace taskvec
