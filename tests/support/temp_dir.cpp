#include "support/temp_dir.hpp"

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <system_error>

namespace taskvec::test {

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base && *base ? base : "/tmp") + "/taskvec-test-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("cannot create a temporary folder from " + templ);
  path_ = templ;
}

TempDir::TempDir(TempDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

std::filesystem::path TempDir::subdir(std::string_view name) const {
  const auto p = path_ / name;
  std::filesystem::create_directories(p);
  return p;
}

}  // namespace taskvec::test
