// Checkpoint::open over files, folders and sharded indexes; the index corruption catalogue.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;

// A valid two-shard folder: shard 1 holds a, b; shard 2 holds c.
struct ShardedFolder {
  test::TempDir tmp;
  fs::path dir;
  ShardedFolder() : dir(tmp.subdir("ckpt")) {
    test::write_float_safetensors(dir / "model-00001-of-00002.safetensors",
                                  {{"a", DType::kF32, {2}, {1, 2}}, {"b", DType::kF32, {1}, {3}}}, {{"format", "pt"}});
    test::write_float_safetensors(dir / "model-00002-of-00002.safetensors", {{"c", DType::kF32, {3}, {4, 5, 6}}},
                                  {{"format", "pt"}});
    write_index(R"({"metadata":{"total_size":24},"weight_map":{"a":"model-00001-of-00002.safetensors",)"
                R"("b":"model-00001-of-00002.safetensors","c":"model-00002-of-00002.safetensors"}})");
  }
  void write_index(const std::string& text) const { test::write_file(dir / kIndexFileName, text); }
  fs::path index() const { return dir / kIndexFileName; }
};

ErrorCode open_code(const fs::path& p) {
  try {
    Checkpoint::open(p);
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;
}

const std::string kS1 = "model-00001-of-00002.safetensors";
const std::string kS2 = "model-00002-of-00002.safetensors";

struct IndexCase {
  const char* name;
  std::function<void(ShardedFolder&)> corrupt;
  ErrorCode code;
};

void PrintTo(const IndexCase& c, std::ostream* os) { *os << c.name; }

std::string weight_map(const std::string& entries) { return R"({"metadata":{},"weight_map":{)" + entries + "}}"; }
std::string wm(const std::string& t, const std::string& s) { return "\"" + t + "\":\"" + s + "\""; }
std::string all_but(const std::string& extra) { return wm("a", kS1) + "," + wm("b", kS1) + "," + wm("c", kS2) + extra; }

std::vector<IndexCase> index_catalogue() {
  return {
      {"shard_missing", [](ShardedFolder& f) { fs::remove(f.dir / kS2); }, ErrorCode::kShardMissing},
      {"tensor_in_two_shards",
       [](ShardedFolder& f) {
         test::write_float_safetensors(f.dir / kS2, {{"b", DType::kF32, {1}, {3}}, {"c", DType::kF32, {3}, {4, 5, 6}}});
       },
       ErrorCode::kInvalidIndex},
      {"weight_map_names_tensor_the_shard_lacks", [](ShardedFolder& f) { f.write_index(weight_map(all_but("," + wm("d", kS2)))); },
       ErrorCode::kInvalidIndex},
      {"shard_tensor_absent_from_weight_map",
       [](ShardedFolder& f) { f.write_index(weight_map(wm("a", kS1) + "," + wm("c", kS2))); }, ErrorCode::kInvalidIndex},
      {"weight_map_points_at_the_wrong_shard",
       [](ShardedFolder& f) { f.write_index(weight_map(wm("a", kS1) + "," + wm("b", kS2) + "," + wm("c", kS2))); },
       ErrorCode::kInvalidIndex},
      {"shard_name_with_dotdot",
       [](ShardedFolder& f) {
         test::write_float_safetensors(f.tmp / "outside.safetensors", {{"d", DType::kF32, {1}, {1}}});
         f.write_index(weight_map(all_but("," + wm("d", "../outside.safetensors"))));
       },
       ErrorCode::kShardEscapes},
      {"shard_name_with_inner_dotdot",
       [](ShardedFolder& f) { f.write_index(weight_map(all_but("," + wm("d", "sub/../../x.safetensors")))); },
       ErrorCode::kShardEscapes},
      {"shard_absolute_path",
       [](ShardedFolder& f) {
         test::write_float_safetensors(f.tmp / "outside.safetensors", {{"d", DType::kF32, {1}, {1}}});
         f.write_index(weight_map(all_but("," + wm("d", (f.tmp / "outside.safetensors").string()))));
       },
       ErrorCode::kShardEscapes},
      {"shard_symlink_pointing_outside",
       [](ShardedFolder& f) {
         test::write_float_safetensors(f.tmp / "outside.safetensors", {{"d", DType::kF32, {1}, {1}}});
         fs::create_symlink(f.tmp / "outside.safetensors", f.dir / "link.safetensors");
         f.write_index(weight_map(all_but("," + wm("d", "link.safetensors"))));
       },
       ErrorCode::kShardEscapes},
      {"shard_relative_symlink_pointing_outside",
       [](ShardedFolder& f) {
         test::write_float_safetensors(f.tmp / "outside.safetensors", {{"d", DType::kF32, {1}, {1}}});
         fs::create_symlink("../outside.safetensors", f.dir / "link.safetensors");
         f.write_index(weight_map(all_but("," + wm("d", "link.safetensors"))));
       },
       ErrorCode::kShardEscapes},
      {"shard_dangling_symlink_pointing_outside",
       [](ShardedFolder& f) {
         fs::create_symlink(f.tmp / "gone.safetensors", f.dir / "link.safetensors");
         f.write_index(weight_map(all_but("," + wm("d", "link.safetensors"))));
       },
       ErrorCode::kShardEscapes},
      {"shard_in_symlinked_folder_outside",
       [](ShardedFolder& f) {
         const auto out = f.tmp.subdir("elsewhere");
         test::write_float_safetensors(out / "s.safetensors", {{"d", DType::kF32, {1}, {1}}});
         fs::create_directory_symlink(out, f.dir / "sub");
         f.write_index(weight_map(all_but("," + wm("d", "sub/s.safetensors"))));
       },
       ErrorCode::kShardEscapes},
      {"index_not_json", [](ShardedFolder& f) { f.write_index("{\"weight_map\": {"); }, ErrorCode::kInvalidIndex},
      {"index_is_array", [](ShardedFolder& f) { f.write_index("[]"); }, ErrorCode::kInvalidIndex},
      {"index_empty_file", [](ShardedFolder& f) { f.write_index(""); }, ErrorCode::kInvalidIndex},
      {"weight_map_missing", [](ShardedFolder& f) { f.write_index(R"({"metadata":{}})"); }, ErrorCode::kInvalidIndex},
      {"weight_map_not_object", [](ShardedFolder& f) { f.write_index(R"({"weight_map":["a"]})"); }, ErrorCode::kInvalidIndex},
      {"weight_map_value_not_string", [](ShardedFolder& f) { f.write_index(weight_map(all_but(",\"d\":1"))); },
       ErrorCode::kInvalidIndex},
      {"weight_map_duplicate_key", [](ShardedFolder& f) { f.write_index(weight_map(all_but("," + wm("a", kS1)))); },
       ErrorCode::kInvalidIndex},
      {"index_metadata_not_object",
       [](ShardedFolder& f) { f.write_index(R"({"metadata":3,"weight_map":{)" + all_but("") + "}}"); },
       ErrorCode::kInvalidIndex},
      {"shard_itself_corrupt",
       [](ShardedFolder& f) {
         auto bytes = test::read_file(f.dir / kS2);
         bytes.pop_back();
         test::write_file(f.dir / kS2, bytes);
       },
       ErrorCode::kIncompleteBuffer},
  };
}

class IndexCatalogue : public testing::TestWithParam<IndexCase> {};

TEST_P(IndexCatalogue, OpenRaisesExactCode) {
  ShardedFolder f;
  ASSERT_NO_THROW(Checkpoint::open(f.dir));
  GetParam().corrupt(f);
  EXPECT_EQ(open_code(f.dir), GetParam().code) << error_code_name(open_code(f.dir));
  EXPECT_EQ(open_code(f.index()), GetParam().code);
}

INSTANTIATE_TEST_SUITE_P(Format, IndexCatalogue, testing::ValuesIn(index_catalogue()),
                         [](const testing::TestParamInfo<IndexCase>& info) { return std::string(info.param.name); });

TEST(Checkpoint, OpensShardedFolderAndIndex) {
  ShardedFolder f;
  for (const auto& p : {f.dir, f.index()}) {
    const auto ck = Checkpoint::open(p);
    EXPECT_EQ(ck.tensor_names(), (std::vector<std::string>{"a", "b", "c"}));
    EXPECT_EQ(ck.files().size(), 2u);
    ASSERT_TRUE(ck.folder().has_value());
    EXPECT_EQ(ck.total_bytes(), 24u);
    EXPECT_EQ(ck.total_elements(), 6u);
    EXPECT_EQ(ck.metadata().at("format"), "pt");
    EXPECT_EQ(ck.index_metadata().at("total_size"), "24");
    const auto& c = ck.at("c");
    EXPECT_EQ(c.file().filename(), kS2);
    EXPECT_EQ(c.source->format(), "safetensors");
    EXPECT_EQ(ck.format(), "safetensors");
    float v[3];
    std::memcpy(v, test::read_all_bytes(c).data(), 12);
    EXPECT_EQ(v[2], 6.0f);
    EXPECT_EQ(ck.find("zzz"), nullptr);
    try {
      ck.at("zzz");
      FAIL();
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kTensorMissing);
    }
  }
}

TEST(Checkpoint, TensorReadCopiesARangeAndRefusesOthers) {
  test::TempDir dir;
  const auto path = test::write_file(dir / "m.safetensors", test::make_safetensors_bytes(
      R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[6],"data_offsets":[2,8]}})",
      "hiabcdef"));
  const auto ck = Checkpoint::open(path);
  const CheckpointTensor& b = ck.at("b");
  std::vector<std::byte> got(3);
  b.read(2, got);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.data()), 3), "cde");
  b.read(3, got);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.data()), 3), "def");
  try {
    b.read(4, got);  // bytes 4..7 of a 6-byte tensor
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("'b'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("m.safetensors"), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, SymlinkInsideTheFolderIsFine) {
  ShardedFolder f;
  fs::rename(f.dir / kS2, f.dir / "real.safetensors");
  fs::create_symlink("real.safetensors", f.dir / kS2);
  EXPECT_EQ(Checkpoint::open(f.dir).tensor_names().size(), 3u);
}

TEST(Checkpoint, SingleFileAndFolders) {
  test::TempDir tmp;
  const auto file = test::write_f32_tensor(tmp / "x.safetensors", "w", {2}, {1, 2});
  const auto one = Checkpoint::open(file);
  EXPECT_FALSE(one.folder().has_value());
  EXPECT_EQ(one.files().size(), 1u);
  EXPECT_TRUE(one.auxiliary_files().empty());
  EXPECT_TRUE(one.index_metadata().empty());

  // A folder with a single file of any name.
  const auto d1 = tmp.subdir("d1");
  test::write_f32_tensor(d1 / "weights.safetensors", "w", {1}, {1});
  EXPECT_EQ(Checkpoint::open(d1).tensor_names(), std::vector<std::string>{"w"});

  // model.safetensors is preferred over other files.
  const auto d2 = tmp.subdir("d2");
  test::write_f32_tensor(d2 / "model.safetensors", "m", {1}, {1});
  test::write_f32_tensor(d2 / "other.safetensors", "o", {1}, {1});
  EXPECT_EQ(Checkpoint::open(d2).tensor_names(), std::vector<std::string>{"m"});

  // Several files and no index: ambiguous.
  const auto d3 = tmp.subdir("d3");
  test::write_f32_tensor(d3 / "a.safetensors", "a", {1}, {1});
  test::write_f32_tensor(d3 / "b.safetensors", "b", {1}, {1});
  EXPECT_EQ(open_code(d3), ErrorCode::kInvalidIndex);

  EXPECT_EQ(open_code(tmp.subdir("empty")), ErrorCode::kIo);
  EXPECT_EQ(open_code(tmp / "missing.safetensors"), ErrorCode::kIo);
  EXPECT_EQ(open_code(tmp / "missing.json"), ErrorCode::kIo);
  EXPECT_NO_THROW(validate_checkpoint(file));
}

TEST(Checkpoint, AuxiliaryFiles) {
  test::TempDir tmp;
  const auto d = tmp.subdir("m");
  test::write_f32_tensor(d / "model.safetensors", "w", {1}, {1});
  for (const char* n : {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "vocab.txt", "merges.txt", "spiece.model", "chat_template.jinja",
                        "preprocessor_config.json", "README.md", "training_args.bin"}) {
    test::write_file(d / n, "x");
  }
  std::vector<std::string> names;
  for (const auto& p : Checkpoint::open(d).auxiliary_files()) names.push_back(p.filename().string());
  EXPECT_EQ(names, (std::vector<std::string>{"chat_template.jinja", "config.json", "generation_config.json", "merges.txt",
                                             "preprocessor_config.json", "special_tokens_map.json", "spiece.model",
                                             "tokenizer.json", "tokenizer_config.json", "vocab.txt"}));
}

TEST(Checkpoint, FingerprintIsStableAndSensitive) {
  test::TempDir tmp;
  std::vector<float> big(100000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i);
  const auto a = test::write_float_safetensors(tmp / "a.safetensors", {{"w", DType::kF32, {100000}, big}, {"s", DType::kF32, {}, {1}}});
  const auto fa = Checkpoint::open(a).fingerprint();
  EXPECT_EQ(fa.size(), 16u);
  EXPECT_EQ(fa.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ(Checkpoint::open(a).fingerprint(), fa);
  // Same content written again (another path): same fingerprint.
  const auto a2 = test::write_float_safetensors(tmp / "a2.safetensors", {{"s", DType::kF32, {}, {1}}, {"w", DType::kF32, {100000}, big}});
  EXPECT_EQ(Checkpoint::open(a2).fingerprint(), fa);
  // The last element is always sampled.
  big.back() = -1;
  const auto b = test::write_float_safetensors(tmp / "b.safetensors", {{"w", DType::kF32, {100000}, big}, {"s", DType::kF32, {}, {1}}});
  EXPECT_NE(Checkpoint::open(b).fingerprint(), fa);
  // Shape matters even with the same bytes.
  const auto c = test::write_float_safetensors(tmp / "c.safetensors", {{"w", DType::kF32, {2}, {1, 2}}});
  const auto d = test::write_float_safetensors(tmp / "d.safetensors", {{"w", DType::kF32, {1, 2}, {1, 2}}});
  EXPECT_NE(Checkpoint::open(c).fingerprint(), Checkpoint::open(d).fingerprint());
}

}  // namespace
}  // namespace taskvec
