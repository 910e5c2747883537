// Issue 10, files read and written, through the taskvec binary: an input folder is never an output
// (whatever the flags), files that leave a model folder are refused, stray shards are reported.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "cli/cli_run.hpp"
#include "support/temp_dir.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using test::TempDir;
using test::write_model;

using test::Result;
using test::run;

class TrustFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(dir / "base");
    write_model(dir / "base" / "model.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
    test::write_file(dir / "base" / "config.json", "{\"base\": true}");
    // ft: a sharded folder (index + one shard) with its own config and tokenizer.
    fs::create_directories(dir / "ft");
    write_model(dir / "ft" / "model-00001-of-00001.safetensors", {{"w", DType::kF32, {2}, {3, 5}}});
    test::write_file(dir / "ft" / "model.safetensors.index.json",
                     R"({"metadata":{},"weight_map":{"w":"model-00001-of-00001.safetensors"}})");
    test::write_file(dir / "ft" / "config.json", "{\"ft\": true}");
    test::write_file(dir / "ft" / "tokenizer.json", "{\"tok\": 1}");
  }
  std::string p(const std::string& rel) const { return (dir / rel).string(); }
  TempDir dir;
};

TEST_F(TrustFiles, OutputIntoAnInputFolderIsRefusedEvenWithForce) {
  const std::string before_index = test::read_file(dir / "ft" / "model.safetensors.index.json");
  Result r = run("edit -q --force -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("ft"), dir);
  EXPECT_EQ(r.status, 6) << r.err;
  EXPECT_NE(r.err.find("output_exists"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("--force does not change this"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("use --force"), std::string::npos) << r.err;
  EXPECT_EQ(test::read_file(dir / "ft" / "model.safetensors.index.json"), before_index);
  EXPECT_EQ(test::read_file(dir / "ft" / "config.json"), "{\"ft\": true}");
  EXPECT_FALSE(fs::exists(dir / "ft" / "model.safetensors"));
  // Without --force: the same refusal, not a hint to use --force.
  Result r2 = run("edit -q -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("ft"), dir);
  EXPECT_EQ(r2.status, 6);
  EXPECT_EQ(r2.err.find("use --force"), std::string::npos) << r2.err;
}

TEST_F(TrustFiles, OutputInsideAnInputFolderOrThroughASymlinkIsRefused) {
  Result r = run("edit -q --force -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("ft/sub"), dir);
  EXPECT_EQ(r.status, 6) << r.err;
  EXPECT_FALSE(fs::exists(dir / "ft" / "sub"));
  fs::create_directory_symlink(dir / "ft", dir / "link");
  Result r2 = run("edit -q --force -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("link"), dir);
  EXPECT_EQ(r2.status, 6) << r2.err;
  // Through the index file as the input, too.
  Result r3 = run("edit -q --force -m pre=" + p("base") + " -m a=" + p("ft/model.safetensors.index.json") +
                      " 'pre+tau(a)' -o " + p("ft"),
                  dir);
  EXPECT_EQ(r3.status, 6) << r3.err;
}

TEST_F(TrustFiles, SingleFileInputAllowsAnOutputBesideIt) {
  write_model(dir / "pre.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
  write_model(dir / "a.safetensors", {{"w", DType::kF32, {2}, {2, 4}}});
  Result r = run("edit -q -m pre=" + p("pre.safetensors") + " -m a=" + p("a.safetensors") + " 'pre+tau(a)' -o " +
                     p("out.safetensors"),
                 dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(test::read_values(dir / "out.safetensors", "w"), (std::vector<double>{2, 4}));
  // A folder output beside a single-file input is fine too.
  Result r2 = run("edit -q -m pre=" + p("pre.safetensors") + " -m a=" + p("a.safetensors") + " 'pre+tau(a)' -o " +
                      p("outdir"),
                  dir);
  EXPECT_EQ(r2.status, 0) << r2.err;
}

TEST_F(TrustFiles, AuxiliarySymlinkOutOfTheFolderIsRefused) {
  test::write_file(dir / "secret.txt", "PRIVATE KEY");
  fs::create_symlink(dir / "secret.txt", dir / "base" / "tokenizer.model");
  Result r = run("edit -q -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("out"), dir);
  EXPECT_EQ(r.status, 4) << r.err;
  EXPECT_NE(r.err.find("shard_escapes"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("tokenizer.model"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST_F(TrustFiles, FifoIndexIsRefusedWithoutHanging) {
  fs::create_directories(dir / "fifo");
  ASSERT_EQ(::mkfifo((dir / "fifo" / "model.safetensors.index.json").c_str(), 0600), 0);
  Result r = run("validate " + p("fifo"), dir);
  EXPECT_EQ(r.status, 3) << r.err;
  EXPECT_NE(r.err.find("not a regular file"), std::string::npos) << r.err;
}

TEST_F(TrustFiles, RemoteCodeAndProcessorFilesAreCopied) {
  test::write_file(dir / "base" / "config.json",
                   R"({"auto_map":{"AutoModel":"modeling_foo.FooModel","AutoConfig":"other/repo--configuration_bar.Bar"}})");
  test::write_file(dir / "base" / "modeling_foo.py", "# code\n");
  test::write_file(dir / "base" / "unrelated.py", "# not referenced\n");
  test::write_file(dir / "base" / "processor_config.json", "{}");
  test::write_file(dir / "base" / "added_tokens.json", "{}");
  Result r = run("edit -q -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(test::read_file(dir / "out" / "modeling_foo.py"), "# code\n");
  EXPECT_TRUE(fs::exists(dir / "out" / "processor_config.json"));
  EXPECT_TRUE(fs::exists(dir / "out" / "added_tokens.json"));
  EXPECT_FALSE(fs::exists(dir / "out" / "unrelated.py"));
  EXPECT_NE(r.err.find("another repository"), std::string::npos) << r.err;
}

TEST_F(TrustFiles, CopiedFilesAreNamedInTheSummaryAndJson) {
  test::write_file(dir / "base" / "config.json", R"({"auto_map":{"AutoModel":"modeling_foo.FooModel"}})");
  test::write_file(dir / "base" / "modeling_foo.py", "# code\n");
  test::write_file(dir / "base" / "added_tokens.json", "{}");
  Result r = run("edit -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.out.find("  with added_tokens.json, config.json, modeling_foo.py\n"), std::string::npos) << r.out;
  Result j = run("--json edit -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("out2"), dir);
  ASSERT_EQ(j.status, 0) << j.err;
  const auto doc = nlohmann::json::parse(j.out);
  EXPECT_EQ(doc.at("auxiliary_files"), nlohmann::json::array({"added_tokens.json", "config.json", "modeling_foo.py"}));
}

TEST_F(TrustFiles, StrayShardBesideAnIndexIsReported) {
  write_model(dir / "ft" / "model.safetensors", {{"w", DType::kF32, {2}, {9, 9}}});
  Result r = run("edit -q -m pre=" + p("base") + " -m a=" + p("ft") + " 'pre+tau(a)' -o " + p("out"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_NE(r.err.find("taskvec: warning:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("'model.safetensors' is not named by"), std::string::npos) << r.err;
}

TEST_F(TrustFiles, InspectEscapesControlBytesOfMetadataAndNames) {
  test::write_file(dir / "evil.safetensors",
                   test::make_safetensors_bytes(
                       R"({"__metadata__":{"k\u001b[2J":"a\u001b[2Jb\u0000c"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                       test::bytes_of<float>({1})));
  Result r = run("inspect " + p("evil.safetensors"), dir);
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(r.out.find('\x1b'), std::string::npos);
  EXPECT_EQ(r.out.find('\0'), std::string::npos);
  EXPECT_NE(r.out.find("metadata k\\x1b[2J = a\\x1b[2Jb\\x00c"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace taskvec
