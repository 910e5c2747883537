// The safetensors writer: exact bytes, round trips, determinism, padding and refusals.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>
#include <string>
#include <vector>

#include "support/builders.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {
namespace {

template <typename F>
ErrorCode code_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return ErrorCode::kInternal;  // "no error" is reported as a code no test expects here
}

std::vector<std::byte> to_bytes(const std::string& s) {
  std::vector<std::byte> out(s.size());
  std::transform(s.begin(), s.end(), out.begin(), [](char c) { return static_cast<std::byte>(c); });
  return out;
}

TEST(SafetensorsWriter, ExactBytesOfATinyFile) {
  test::TempDir dir;
  const auto path = dir / "tiny.safetensors";
  write_safetensors(path,
                    {{TensorSpec{"b", DType::kF32, {1}}, to_bytes(std::string("\x00\x00\x80\x3f", 4))},
                     {TensorSpec{"a", DType::kU8, {2}}, to_bytes("\x01\x02")}},
                    {{"k", "v"}});
  // JSON: sorted keys, compact; data: F32 "b" (larger element) first at [0,4], then U8 "a" at [4,6].
  const std::string json =
      "{\"__metadata__\":{\"k\":\"v\"},"
      "\"a\":{\"data_offsets\":[4,6],\"dtype\":\"U8\",\"shape\":[2]},"
      "\"b\":{\"data_offsets\":[0,4],\"dtype\":\"F32\",\"shape\":[1]}}";
  ASSERT_EQ(json.size(), 131u);
  const std::string expected = std::string("\x88\0\0\0\0\0\0\0", 8)  // N = 136 = 131 + 5 spaces
                               + json + "     "                       // padded so N % 8 == 0
                               + std::string("\x00\x00\x80\x3f", 4)   // b = 1.0f
                               + "\x01\x02";                          // a
  EXPECT_EQ(test::read_file(path), expected);
}

TEST(SafetensorsWriter, EmptyFileIsBracesPaddedToEight) {
  test::TempDir dir;
  write_safetensors(dir / "e.safetensors", {});
  EXPECT_EQ(test::read_file(dir / "e.safetensors"), std::string("\x08\0\0\0\0\0\0\0{}      ", 16));
  EXPECT_TRUE(SafetensorsFile::open(dir / "e.safetensors")->header().tensors.empty());
}

TEST(SafetensorsWriter, RoundTripEveryByte) {
  test::TempDir dir;
  std::mt19937 rng(7);
  std::vector<std::pair<TensorSpec, std::vector<std::byte>>> tensors;
  const std::vector<std::pair<DType, std::vector<std::uint64_t>>> kinds = {
      {DType::kF32, {3, 5}}, {DType::kBF16, {7}},    {DType::kF16, {2, 2, 2}}, {DType::kF64, {}},
      {DType::kU8, {13}},    {DType::kI64, {4, 1}},  {DType::kF32, {0, 9}},    {DType::kF8E4M3, {11}},
      {DType::kBool, {5}},   {DType::kF4, {6}},      {DType::kC64, {2}},       {DType::kI16, {3}}};
  for (std::size_t i = 0; i < kinds.size(); ++i) {
    TensorSpec spec{"layer." + std::to_string(i) + ".weight", kinds[i].first, kinds[i].second};
    std::vector<std::byte> data(spec.num_bytes());
    for (auto& b : data) b = static_cast<std::byte>(rng());
    tensors.emplace_back(spec, data);
  }
  write_safetensors(dir / "r.safetensors", tensors, {{"format", "pt"}, {"base", "abc"}});
  const auto f = SafetensorsFile::open(dir / "r.safetensors");
  EXPECT_EQ(f->header().metadata.at("format"), "pt");
  EXPECT_EQ(f->header().header_size % 8, 0u);
  ASSERT_EQ(f->header().tensors.size(), tensors.size());
  for (const auto& [spec, data] : tensors) {
    const auto* info = f->header().find(spec.name);
    ASSERT_NE(info, nullptr) << spec.name;
    EXPECT_EQ(info->dtype, spec.dtype);
    EXPECT_EQ(info->shape, spec.shape);
    const auto got = f->tensor_bytes(*info);
    EXPECT_TRUE(std::equal(got.begin(), got.end(), data.begin(), data.end())) << spec.name;
  }
}

TEST(SafetensorsWriter, SameSpecsInAnyOrderGiveIdenticalBytes) {
  test::TempDir dir;
  std::vector<std::pair<TensorSpec, std::vector<std::byte>>> tensors;
  for (int i = 0; i < 9; ++i) {
    const DType d = i % 3 == 0 ? DType::kF32 : (i % 3 == 1 ? DType::kBF16 : DType::kU8);
    TensorSpec spec{"t" + std::to_string((i * 5) % 9), d, {static_cast<std::uint64_t>(i + 1)}};
    tensors.emplace_back(spec, std::vector<std::byte>(spec.num_bytes(), static_cast<std::byte>(i)));
  }
  write_safetensors(dir / "a.safetensors", tensors, {{"x", "1"}, {"a", "2"}});
  std::reverse(tensors.begin(), tensors.end());
  write_safetensors(dir / "b.safetensors", tensors, {{"a", "2"}, {"x", "1"}});
  std::shuffle(tensors.begin(), tensors.end(), std::mt19937(3));
  write_safetensors(dir / "c.safetensors", tensors, {{"x", "1"}, {"a", "2"}});
  const auto a = test::read_file(dir / "a.safetensors");
  EXPECT_EQ(a, test::read_file(dir / "b.safetensors"));
  EXPECT_EQ(a, test::read_file(dir / "c.safetensors"));
}

TEST(SafetensorsLayout, HeaderLengthIsAMultipleOfEightAndOrderIsBySizeThenName) {
  for (std::size_t len = 1; len <= 16; ++len) {
    const auto layout = SafetensorsLayout::build(
        {{std::string(len, 'n'), DType::kU8, {1}}, {"w", DType::kF64, {1}}, {"v", DType::kF64, {2}}, {"h", DType::kF16, {3}}},
        {});
    const std::uint64_t n = layout.header_bytes.size() - 8;
    EXPECT_EQ(n % 8, 0u) << len;
    EXPECT_EQ(layout.header_bytes.back() == ' ' || layout.header_bytes.back() == '}', true);
    ASSERT_EQ(layout.tensors.size(), 4u);
    EXPECT_EQ(layout.tensors[0].name, "v");
    EXPECT_EQ(layout.tensors[1].name, "w");
    EXPECT_EQ(layout.tensors[2].name, "h");
    EXPECT_EQ(layout.file_offsets[0], 8 + n);
    EXPECT_EQ(layout.file_offsets[1], 8 + n + 16);
    EXPECT_EQ(layout.file_offsets[2], 8 + n + 24);
    EXPECT_EQ(layout.file_size, 8 + n + 24 + 6 + 1);
    EXPECT_EQ(layout.index_of("h"), 2u);
    EXPECT_EQ(layout.index_of(std::string(len, 'n')), 3u);
  }
}

TEST(SafetensorsLayout, Refusals) {
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"a", DType::kF32, {1}}, {"a", DType::kU8, {1}}}, {}); }),
            ErrorCode::kInvalidName);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"__metadata__", DType::kF32, {1}}}, {}); }), ErrorCode::kInvalidName);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"", DType::kF32, {1}}}, {}); }), ErrorCode::kInvalidName);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{std::string("a\0b", 3), DType::kF32, {1}}}, {}); }),
            ErrorCode::kInvalidName);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"a\x1f", DType::kF32, {1}}}, {}); }), ErrorCode::kInvalidName);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"\xff", DType::kF32, {1}}}, {}); }), ErrorCode::kInvalidName);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"a", DType::kF32, {1ull << 40, 1ull << 40}}}, {}); }),
            ErrorCode::kShapeOverflow);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"a", DType::kU8, {1ull << 54}}}, {}); }), ErrorCode::kShapeOverflow);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"a", DType::kF4, {3}}}, {}); }), ErrorCode::kTensorSizeMismatch);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({}, {{"k", "\xc3"}}); }), ErrorCode::kInvalidMetadata);
  EXPECT_EQ(code_of([] { SafetensorsLayout::build({{"a", DType::kF32, {1}}}, {}).index_of("b"); }),
            ErrorCode::kTensorMissing);
}

TEST(SafetensorsWriter, RefusesWrongByteCountAndWritesOutsideATensor) {
  test::TempDir dir;
  EXPECT_EQ(code_of([&] {
              write_safetensors(dir / "x.safetensors", {{TensorSpec{"a", DType::kF32, {2}}, std::vector<std::byte>(7)}});
            }),
            ErrorCode::kInvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir / "x.safetensors"));
  SafetensorsWriter w(dir / "y.safetensors", SafetensorsLayout::build({{"a", DType::kF32, {2}}}, {}));
  const std::vector<std::byte> four(4);
  EXPECT_EQ(code_of([&] { w.write_tensor(0, 5, four); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { w.write_tensor(1, 0, four); }), ErrorCode::kInternal);
  EXPECT_EQ(code_of([&] { w.write_tensor(0, UINT64_MAX, four); }), ErrorCode::kInternal);
  w.write_tensor(0, 4, four);
  w.write_tensor(0, 0, four);
  w.commit();
  EXPECT_EQ(SafetensorsFile::open(dir / "y.safetensors")->header().tensors[0].num_bytes(), 8u);
}

TEST(SafetensorsWriter, ChunkedWritesFromSeveralThreadsAreByteExact) {
  test::TempDir dir;
  auto layout = SafetensorsLayout::build({{"big", DType::kF32, {4096}}, {"small", DType::kU8, {100}}}, {});
  std::vector<std::byte> big(4096 * 4);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<std::byte>(i * 31);
  SafetensorsWriter w(dir / "t.safetensors", std::move(layout));
  const std::size_t bi = w.layout().index_of("big");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      const std::size_t part = big.size() / 4;
      w.write_tensor(bi, t * part, std::span(big).subspan(t * part, part));
    });
  }
  for (auto& t : threads) t.join();
  w.write_tensor(w.layout().index_of("small"), 0, std::vector<std::byte>(100, std::byte{9}));
  w.commit();
  const auto f = SafetensorsFile::open(dir / "t.safetensors");
  const auto got = f->tensor_bytes(*f->header().find("big"));
  EXPECT_TRUE(std::equal(got.begin(), got.end(), big.begin(), big.end()));
}

TEST(TestSupport, FloatBuilderWritesReadableFiles) {
  test::TempDir dir;
  test::write_float_safetensors(dir / "f.safetensors",
                                {{"w", DType::kF32, {2, 2}, {1, 2, 3, 4}}, {"d", DType::kF64, {1}, {0.5f}}},
                                {{"format", "pt"}});
  const auto f = SafetensorsFile::open(dir / "f.safetensors");
  const auto w = f->tensor_bytes(*f->header().find("w"));
  float v[4];
  std::memcpy(v, w.data(), 16);
  EXPECT_EQ(v[3], 4.0f);
  const auto d = f->tensor_bytes(*f->header().find("d"));
  double dv;
  std::memcpy(&dv, d.data(), 8);
  EXPECT_EQ(dv, 0.5);
  test::write_f32_tensor(dir / "g.safetensors", "x", {}, {7});
  EXPECT_EQ(SafetensorsFile::open(dir / "g.safetensors")->header().tensors[0].num_bytes(), 4u);
}

}  // namespace
}  // namespace taskvec
