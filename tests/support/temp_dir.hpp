// taskvec tests: a temporary folder that removes itself.
#pragma once

#include <filesystem>
#include <string_view>

namespace taskvec::test {

/// A fresh folder under $TMPDIR (or /tmp), named "taskvec-test-XXXXXX", removed recursively (with
/// everything in it) when the TempDir is destroyed. Move-only. Throws std::runtime_error if the folder
/// cannot be created.
class TempDir {
 public:
  TempDir();
  TempDir(TempDir&& other) noexcept;
  TempDir& operator=(TempDir&&) = delete;
  TempDir(const TempDir&) = delete;
  ~TempDir();

  const std::filesystem::path& path() const noexcept { return path_; }
  /// path() / name, e.g. dir / "model.safetensors".
  std::filesystem::path operator/(std::string_view name) const { return path_ / name; }
  /// Creates (if needed) and returns the sub-folder path() / name.
  std::filesystem::path subdir(std::string_view name) const;

 private:
  std::filesystem::path path_;
};

}  // namespace taskvec::test
