// CheckpointPlan and CheckpointWriter: sharding, HF names, index last, refusals, atomicity.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "support/builders.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;

template <typename F>
ErrorCode code_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;
}

std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

// Five F32 tensors of 4 elements (16 bytes): t0..t4, element k of tensor i = 10*i + k.
// "t0" .. "t4".
std::string tensor_name(int i) { return fmt::format("t{}", i); }

std::vector<TensorSpec> five_specs() {
  std::vector<TensorSpec> s;
  for (int i = 4; i >= 0; --i) s.push_back({tensor_name(i), DType::kF32, {4}});
  return s;
}

std::vector<std::byte> values_of(int i) {
  std::vector<float> v{10.f * i, 10.f * i + 1, 10.f * i + 2, 10.f * i + 3};
  std::vector<std::byte> out(16);
  std::memcpy(out.data(), v.data(), 16);
  return out;
}

void write_all(CheckpointWriter& w) {
  for (int i = 0; i < 5; ++i) w.write(tensor_name(i), 0, values_of(i));
}

void expect_all(const Checkpoint& ck) {
  ASSERT_EQ(ck.tensor_names().size(), 5u);
  for (int i = 0; i < 5; ++i) {
    const auto b = test::read_all_bytes(ck.at(tensor_name(i)));
    const auto want = values_of(i);
    EXPECT_TRUE(std::equal(b.begin(), b.end(), want.begin(), want.end())) << i;
  }
}

TEST(CheckpointPlan, ShardsGreedilyInNameOrderWithHfNames) {
  const auto plan = CheckpointPlan::build("out", five_specs(), {}, {.max_shard_size = 40});
  EXPECT_TRUE(plan.is_folder);
  ASSERT_EQ(plan.shards.size(), 3u);
  EXPECT_EQ(plan.shards[0].path, fs::path("out") / "model-00001-of-00003.safetensors");
  EXPECT_EQ(plan.shards[2].path, fs::path("out") / "model-00003-of-00003.safetensors");
  EXPECT_EQ(plan.shards[0].layout.tensors.size(), 2u);
  EXPECT_EQ(plan.shards[1].layout.tensors[0].name, "t2");
  EXPECT_EQ(plan.shards[2].layout.tensors.size(), 1u);
  EXPECT_EQ(plan.location.at("t3"), std::make_pair(std::size_t{1}, std::size_t{1}));
  EXPECT_EQ(plan.total_bytes, 80u);
}

TEST(CheckpointPlan, TensorLargerThanMaxGetsItsOwnShard) {
  const auto plan = CheckpointPlan::build(
      "out", {{"a", DType::kU8, {10}}, {"b", DType::kU8, {100}}, {"c", DType::kU8, {10}}}, {}, {.max_shard_size = 50});
  ASSERT_EQ(plan.shards.size(), 3u);
  EXPECT_EQ(plan.shards[1].layout.tensors[0].name, "b");
}

TEST(CheckpointPlan, FileOutputAndOneShardFolder) {
  const auto file = CheckpointPlan::build("x.safetensors", five_specs(), {}, {.max_shard_size = 1});
  EXPECT_FALSE(file.is_folder);
  ASSERT_EQ(file.shards.size(), 1u);
  EXPECT_EQ(file.shards[0].path, fs::path("x.safetensors"));
  const auto folder = CheckpointPlan::build("dir", five_specs(), {}, {});
  ASSERT_EQ(folder.shards.size(), 1u);
  EXPECT_EQ(folder.shards[0].path, fs::path("dir") / "model.safetensors");
}

TEST(CheckpointPlan, Refusals) {
  EXPECT_EQ(code_of([] { CheckpointPlan::build("d", five_specs(), {}, {.max_shard_size = 0}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { CheckpointPlan::build("", five_specs(), {}, {}); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { CheckpointPlan::build("d", {{"a", DType::kU8, {1}}, {"a", DType::kU8, {1}}}, {}, {}); }),
            ErrorCode::kInvalidName);
}

TEST(CheckpointWriter, ShardedFolderRoundTripWithIndexAndAuxFiles) {
  test::TempDir tmp;
  const auto out = tmp / "out";
  const auto cfg = test::write_file(tmp / "config.json", "{\"model_type\":\"x\"}");
  const CheckpointWriteOptions opts{.max_shard_size = 40};
  CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {{"format", "pt"}}, opts), opts);
  write_all(w);
  w.commit({cfg});
  EXPECT_EQ(listing(out), (std::vector<std::string>{"config.json", "model-00001-of-00003.safetensors",
                                                    "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                                                    "model.safetensors.index.json"}));
  const auto index = nlohmann::json::parse(test::read_file(out / kIndexFileName));
  EXPECT_EQ(index["metadata"]["total_size"], 80);
  EXPECT_EQ(index["weight_map"]["t0"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["t4"], "model-00003-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"].size(), 5u);
  EXPECT_EQ(test::read_file(out / "config.json"), test::read_file(cfg));
  const auto ck = Checkpoint::open(out);
  expect_all(ck);
  EXPECT_EQ(ck.metadata().at("format"), "pt");
  EXPECT_EQ(ck.files().size(), 3u);
}

TEST(CheckpointWriter, OneShardFolderHasModelSafetensorsAndNoIndex) {
  test::TempDir tmp;
  const auto out = tmp / "a" / "b";
  CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, {}), {});
  write_all(w);
  w.commit();
  EXPECT_EQ(listing(out), std::vector<std::string>{"model.safetensors"});
  expect_all(Checkpoint::open(out));
}

TEST(CheckpointWriter, SingleFileOutput) {
  test::TempDir tmp;
  CheckpointWriter w(CheckpointPlan::build(tmp / "m.safetensors", five_specs(), {}, {}), {});
  write_all(w);
  w.commit({test::write_file(tmp / "config.json", "{}")});  // ignored for a file output
  expect_all(Checkpoint::open(tmp / "m.safetensors"));
  EXPECT_EQ(listing(tmp.path()), (std::vector<std::string>{"config.json", "m.safetensors"}));
}

TEST(CheckpointWriter, RefusesExistingOutputWithoutForce) {
  test::TempDir tmp;
  const auto file = test::write_file(tmp / "m.safetensors", "old");
  EXPECT_EQ(code_of([&] { CheckpointWriter(CheckpointPlan::build(file, five_specs(), {}, {}), {}); }),
            ErrorCode::kOutputExists);
  EXPECT_EQ(test::read_file(file), "old");
  {
    const CheckpointWriteOptions force{.force = true};
    CheckpointWriter w(CheckpointPlan::build(file, five_specs(), {}, force), force);
    write_all(w);
    w.commit();
  }
  expect_all(Checkpoint::open(file));

  const auto dir = tmp.subdir("d");
  test::write_file(dir / "model.safetensors", "old");
  EXPECT_EQ(code_of([&] { CheckpointWriter(CheckpointPlan::build(dir, five_specs(), {}, {}), {}); }),
            ErrorCode::kOutputExists);
  const auto dir2 = tmp.subdir("d2");
  test::write_file(dir2 / kIndexFileName, "{}");
  EXPECT_EQ(code_of([&] { CheckpointWriter(CheckpointPlan::build(dir2, five_specs(), {}, {}), {}); }),
            ErrorCode::kOutputExists);
  // An existing auxiliary file is refused at commit, before anything is published.
  const auto dir3 = tmp.subdir("d3");
  test::write_file(dir3 / "config.json", "mine");
  const auto cfg = test::write_file(tmp / "config.json", "theirs");
  {
    CheckpointWriter w3(CheckpointPlan::build(dir3, five_specs(), {}, {}), {});
    write_all(w3);
    EXPECT_EQ(code_of([&] { w3.commit({cfg}); }), ErrorCode::kOutputExists);
    EXPECT_FALSE(fs::exists(dir3 / "model.safetensors"));
  }
  EXPECT_EQ(listing(dir3), std::vector<std::string>{"config.json"});
  EXPECT_EQ(test::read_file(dir3 / "config.json"), "mine");
}

TEST(CheckpointWriter, ForceOverShardedOutputRemovesTheStaleIndex) {
  test::TempDir tmp;
  const auto out = tmp / "o";
  {
    const CheckpointWriteOptions opts{.max_shard_size = 40};
    CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, opts), opts);
    write_all(w);
    w.commit();
  }
  ASSERT_TRUE(fs::exists(out / kIndexFileName));
  const CheckpointWriteOptions force{.force = true};
  CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, force), force);
  write_all(w);
  w.commit();
  EXPECT_FALSE(fs::exists(out / kIndexFileName));
  expect_all(Checkpoint::open(out));
}

TEST(CheckpointWriter, RefusesToOverwriteAnInputEvenWithForce) {
  test::TempDir tmp;
  const CheckpointWriteOptions force{.force = true};
  const auto in = test::write_f32_tensor(tmp / "in.safetensors", "w", {1}, {1});
  const auto same = tmp.path() / "sub" / ".." / "in.safetensors";
  fs::create_directory(tmp / "sub");
  for (const auto& out : {in, same}) {
    EXPECT_EQ(code_of([&] { CheckpointWriter(CheckpointPlan::build(out, five_specs(), {}, force), force, {in}); }),
              ErrorCode::kOutputExists);
  }
  // A hard link to the input is the same file too.
  fs::create_hard_link(in, tmp / "hard.safetensors");
  EXPECT_EQ(code_of([&] {
              CheckpointWriter(CheckpointPlan::build(tmp / "hard.safetensors", five_specs(), {}, force), force, {in});
            }),
            ErrorCode::kOutputExists);
  // Output folder == input folder (given as folder or as its index).
  const auto folder = tmp.subdir("model");
  test::write_f32_tensor(folder / "model.safetensors", "w", {1}, {1});
  EXPECT_EQ(code_of([&] { CheckpointWriter(CheckpointPlan::build(folder, five_specs(), {}, force), force, {folder}); }),
            ErrorCode::kOutputExists);
  EXPECT_EQ(code_of([&] {
              CheckpointWriter(CheckpointPlan::build(folder / "model.safetensors", five_specs(), {}, force), force, {folder});
            }),
            ErrorCode::kOutputExists);
  test::write_file(folder / kIndexFileName, "{}");
  EXPECT_EQ(code_of([&] {
              CheckpointWriter(CheckpointPlan::build(folder, five_specs(), {}, force), force, {folder / kIndexFileName});
            }),
            ErrorCode::kOutputExists);
  EXPECT_EQ(test::read_file(folder / kIndexFileName), "{}");
  // A different output next to the input is fine.
  CheckpointWriter ok(CheckpointPlan::build(tmp / "new.safetensors", five_specs(), {}, {}), {}, {in, folder});
}

TEST(CheckpointWriter, UncommittedLeavesNoFinalAndNoTempFiles) {
  test::TempDir tmp;
  const auto out = tmp / "o";
  {
    const CheckpointWriteOptions opts{.max_shard_size = 40};
    CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, opts), opts);
    write_all(w);
    EXPECT_EQ(listing(out).size(), 3u);  // three temp files while writing
    for (const auto& n : listing(out)) EXPECT_EQ(n[0], '.');
  }
  EXPECT_FALSE(std::filesystem::exists(out));  // the folder it created, now empty, is removed too
  {
    CheckpointWriter w(CheckpointPlan::build(tmp / "f.safetensors", five_specs(), {}, {}), {});
    write_all(w);
  }
  EXPECT_TRUE(listing(tmp.path()).empty());
  // A folder that existed before is left in place.
  std::filesystem::create_directory(out);
  {
    const CheckpointWriteOptions opts{.max_shard_size = 40};
    CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, opts), opts);
    write_all(w);
  }
  EXPECT_EQ(listing(tmp.path()), std::vector<std::string>{"o"});
  EXPECT_TRUE(listing(out).empty());
}

// An auxiliary file that cannot be copied (here one that changes size while read: /proc reports 0
// bytes) fails the commit before any file has its final name, and the writer then leaves nothing.
TEST(CheckpointWriter, FailedAuxiliaryCopyPublishesNothing) {
  test::TempDir tmp;
  const auto out = tmp / "o";
  for (const std::uint64_t max_shard : {std::uint64_t{1} << 20, std::uint64_t{40}}) {  // one shard, three
    {
      const CheckpointWriteOptions opts{.max_shard_size = max_shard};
      CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, opts), opts);
      write_all(w);
      EXPECT_EQ(code_of([&] { w.commit({"/proc/self/status"}); }), ErrorCode::kIo);
      for (const auto& n : listing(out)) EXPECT_EQ(n[0], '.') << n << " has a final name";
    }
    EXPECT_FALSE(fs::exists(out));
  }
}

// --force over an earlier output of another shard count: the earlier model files go, other files stay.
TEST(CheckpointWriter, ForceRemovesTheModelFilesOfAnEarlierOutput) {
  test::TempDir tmp;
  const auto out = tmp / "o";
  auto write = [&](std::uint64_t max_shard) {
    const CheckpointWriteOptions opts{.max_shard_size = max_shard, .force = true};
    CheckpointWriter w(CheckpointPlan::build(out, five_specs(), {}, opts), opts);
    write_all(w);
    w.commit();
  };
  write(40);
  test::write_file(out / "notes.txt", "mine");
  EXPECT_EQ(listing(out), (std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                                    "model-00003-of-00003.safetensors", "model.safetensors.index.json",
                                                    "notes.txt"}));
  write(1 << 20);
  EXPECT_EQ(listing(out), (std::vector<std::string>{"model.safetensors", "notes.txt"}));
  write(40);
  EXPECT_EQ(listing(out), (std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                                    "model-00003-of-00003.safetensors", "model.safetensors.index.json",
                                                    "notes.txt"}));
}

TEST(CheckpointWriter, WriteByUnknownNameAndDoubleCommit) {
  test::TempDir tmp;
  CheckpointWriter w(CheckpointPlan::build(tmp / "f.safetensors", five_specs(), {}, {}), {});
  EXPECT_EQ(code_of([&] { w.write("nope", 0, values_of(0)); }), ErrorCode::kTensorMissing);
  EXPECT_EQ(code_of([&] { w.write(7, 0, 0, values_of(0)); }), ErrorCode::kInternal);
  const auto [s, i] = w.plan().location.at("t1");
  w.write(s, i, 0, values_of(1));
  w.commit();
  EXPECT_EQ(code_of([&] { w.commit(); }), ErrorCode::kInternal);
}

}  // namespace
}  // namespace taskvec
