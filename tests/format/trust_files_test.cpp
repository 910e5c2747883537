// Issue 10, files read from a model folder: the checks of Checkpoint::open on auxiliary files and notes.
#include <gtest/gtest.h>

#include <filesystem>

#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;

ErrorCode open_code(const fs::path& p) {
  try {
    (void)Checkpoint::open(p);
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;  // no error: never what a test expects
}

TEST(TrustFilesFormat, EscapeControlEscapesEscAndNul) {
  EXPECT_EQ(escape_control(std::string("a\x1b[2Jb\0c", 8)), "a\\x1b[2Jb\\x00c");
  EXPECT_EQ(escape_control("plain é"), "plain é");
}

TEST(TrustFilesFormat, AuxiliaryChecks) {
  test::TempDir dir;
  fs::create_directories(dir / "m");
  test::write_model(dir / "m" / "model.safetensors", {{"w", DType::kF32, {1}, {1}}});
  test::write_file(dir / "m" / "vocab.txt", "a\nb\n");
  const auto aux = Checkpoint::open(dir / "m").auxiliary_files();
  ASSERT_EQ(aux.size(), 1u);
  EXPECT_EQ(aux[0].filename(), "vocab.txt");
  // A link leaving the folder, even a dangling one.
  fs::create_symlink("/etc/passwd", dir / "m" / "tokenizer.model");
  EXPECT_EQ(open_code(dir / "m"), ErrorCode::kShardEscapes);
  fs::remove(dir / "m" / "tokenizer.model");
  fs::create_symlink(dir / "nowhere", dir / "m" / "tokenizer.json");
  EXPECT_EQ(open_code(dir / "m"), ErrorCode::kShardEscapes);
  fs::remove(dir / "m" / "tokenizer.json");
  // A sparse file over the size limit.
  fs::resize_file(test::write_file(dir / "m" / "tokenizer.json", ""), kMaxFolderFileSize + 1);
  EXPECT_EQ(open_code(dir / "m"), ErrorCode::kIo);
  fs::remove(dir / "m" / "tokenizer.json");
  // A link inside the folder is fine.
  fs::create_symlink("vocab.txt", dir / "m" / "merges.txt");
  EXPECT_EQ(Checkpoint::open(dir / "m").auxiliary_files().size(), 2u);
}

TEST(TrustFilesFormat, OversizedOrNonRegularIndexIsRefusedBeforeReading) {
  test::TempDir dir;
  fs::create_directories(dir / "m");
  fs::resize_file(test::write_file(dir / "m" / "model.safetensors.index.json", ""), kMaxFolderFileSize + 1);
  EXPECT_EQ(open_code(dir / "m"), ErrorCode::kInvalidIndex);
  fs::remove(dir / "m" / "model.safetensors.index.json");
  fs::create_symlink("/dev/zero", dir / "m" / "model.safetensors.index.json");
  EXPECT_EQ(open_code(dir / "m"), ErrorCode::kShardEscapes);
}

TEST(TrustFilesFormat, StrayShardsAreNotes) {
  test::TempDir dir;
  fs::create_directories(dir / "m");
  test::write_model(dir / "m" / "a.safetensors", {{"w", DType::kF32, {1}, {1}}});
  test::write_model(dir / "m" / "old.safetensors", {{"w", DType::kF32, {1}, {2}}});
  test::write_file(dir / "m" / "model.safetensors.index.json", R"({"weight_map":{"w":"a.safetensors"}})");
  const Checkpoint c = Checkpoint::open(dir / "m");
  ASSERT_EQ(c.notes().size(), 1u);
  EXPECT_NE(c.notes()[0].find("'old.safetensors' is not named by model.safetensors.index.json"), std::string::npos)
      << c.notes()[0];
}

}  // namespace
}  // namespace taskvec
