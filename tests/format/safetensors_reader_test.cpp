// The corruption catalogue: one deliberately broken safetensors file per row, each with the exact
// ErrorCode the reader must raise (never the message text), plus valid edge cases that must pass.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>
#include <string>
#include <vector>

#include "support/builders.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec {
namespace {

using test::make_safetensors_bytes;

std::span<const std::byte> as_span(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

SafetensorsHeader parse(const std::string& file) { return parse_safetensors_header(as_span(file), file.size(), "t.safetensors"); }

// One tensor entry as JSON text.
std::string entry(const std::string& name, const std::string& dtype, const std::string& shape, const std::string& offsets) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":" + offsets + "}";
}

// A header of entries plus `data_len` zero bytes of data.
std::string file_of(const std::vector<std::string>& entries, std::size_t data_len) {
  std::string h = "{";
  for (std::size_t i = 0; i < entries.size(); ++i) h += (i ? "," : "") + entries[i];
  h += "}";
  return make_safetensors_bytes(h, std::string(data_len, '\0'));
}

std::string n_only(std::uint64_t n, const std::string& rest = {}) { return make_safetensors_bytes(rest, {}, n); }

struct CorruptCase {
  const char* name;
  std::string bytes;
  ErrorCode code;
};

std::vector<CorruptCase> catalogue() {
  const std::string a8 = entry("a", "F32", "[2]", "[0,8]");
  return {
      // B1
      {"empty_file", "", ErrorCode::kHeaderTooSmall},
      {"file_of_7_bytes", std::string("\x02\0\0\0\0\0\0", 7), ErrorCode::kHeaderTooSmall},
      {"n_zero", n_only(0), ErrorCode::kHeaderTooSmall},
      {"n_one", n_only(1, "{"), ErrorCode::kHeaderTooSmall},
      // B2
      {"n_over_limit", n_only(100'000'001, "{}"), ErrorCode::kHeaderTooLarge},
      {"n_max_u64", n_only(UINT64_MAX, "{}"), ErrorCode::kHeaderTooLarge},
      // B3
      {"n_past_end_of_file", n_only(100, "{}"), ErrorCode::kInvalidHeaderLength},
      {"n_seven_past_end_of_file", n_only(7, "{} "), ErrorCode::kInvalidHeaderLength},
      // B4
      {"non_utf8_byte", make_safetensors_bytes("{\"\xff\":1}"), ErrorCode::kInvalidUtf8},
      {"overlong_utf8", make_safetensors_bytes("{\"\xc0\xaf\":1}"), ErrorCode::kInvalidUtf8},
      {"utf8_surrogate", make_safetensors_bytes("{\"\xed\xa0\x80\":1}"), ErrorCode::kInvalidUtf8},
      {"utf8_cut_sequence", make_safetensors_bytes("{} \xe2\x82"), ErrorCode::kInvalidUtf8},
      // B5, B6
      {"not_json", make_safetensors_bytes("hello world"), ErrorCode::kInvalidJson},
      {"json_array", make_safetensors_bytes("[]"), ErrorCode::kInvalidJson},
      {"json_string", make_safetensors_bytes("\"abc\""), ErrorCode::kInvalidJson},
      {"json_number", make_safetensors_bytes("42"), ErrorCode::kInvalidJson},
      {"json_null", make_safetensors_bytes("null"), ErrorCode::kInvalidJson},
      {"truncated_json", make_safetensors_bytes("{\"a\":{\"dtype\":\"F32\""), ErrorCode::kInvalidJson},
      {"two_json_values", make_safetensors_bytes("{}{}"), ErrorCode::kInvalidJson},
      {"nul_padding", make_safetensors_bytes(std::string("{}\0\0\0\0\0\0", 8)), ErrorCode::kInvalidJson},
      {"nul_then_garbage", make_safetensors_bytes(std::string("{}\0garbage", 10)), ErrorCode::kInvalidJson},
      {"raw_control_char_in_string", make_safetensors_bytes("{\"a\x01\":1}"), ErrorCode::kInvalidJson},
      {"lone_surrogate_escape", make_safetensors_bytes("{\"\\ud800\":1}"), ErrorCode::kInvalidJson},
      {"nesting_too_deep", make_safetensors_bytes("{\"__metadata__\":" + std::string(100, '[') + std::string(100, ']') + "}"),
       ErrorCode::kInvalidJson},
      // B18
      {"duplicate_tensor_names", file_of({a8, entry("a", "F32", "[2]", "[8,16]")}, 16), ErrorCode::kDuplicateKey},
      {"duplicate_key_in_entry",
       make_safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
                              std::string(8, '\0')),
       ErrorCode::kDuplicateKey},
      {"duplicate_metadata_key", make_safetensors_bytes("{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}"),
       ErrorCode::kDuplicateKey},
      {"duplicate_metadata_section", make_safetensors_bytes("{\"__metadata__\":{},\"__metadata__\":{}}"),
       ErrorCode::kDuplicateKey},
      // B7, B8
      {"metadata_named_tensor", file_of({entry("__metadata__", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
      {"metadata_number_value", make_safetensors_bytes("{\"__metadata__\":{\"k\":1}}"), ErrorCode::kInvalidMetadata},
      {"metadata_null_value", make_safetensors_bytes("{\"__metadata__\":{\"k\":null}}"), ErrorCode::kInvalidMetadata},
      {"metadata_object_value", make_safetensors_bytes("{\"__metadata__\":{\"k\":{}}}"), ErrorCode::kInvalidMetadata},
      {"metadata_not_object", make_safetensors_bytes("{\"__metadata__\":\"pt\"}"), ErrorCode::kInvalidMetadata},
      {"metadata_array", make_safetensors_bytes("{\"__metadata__\":[\"pt\"]}"), ErrorCode::kInvalidMetadata},
      {"entry_not_object", make_safetensors_bytes("{\"a\":[1,2]}"), ErrorCode::kInvalidTensorEntry},
      {"missing_dtype", make_safetensors_bytes("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", std::string(8, '\0')),
       ErrorCode::kInvalidTensorEntry},
      {"missing_shape", make_safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", std::string(8, '\0')),
       ErrorCode::kInvalidTensorEntry},
      {"missing_data_offsets", make_safetensors_bytes("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", std::string(8, '\0')),
       ErrorCode::kInvalidTensorEntry},
      {"dtype_not_string",
       make_safetensors_bytes("{\"a\":{\"dtype\":32,\"shape\":[2],\"data_offsets\":[0,8]}}", std::string(8, '\0')),
       ErrorCode::kInvalidTensorEntry},
      {"shape_not_array", file_of({entry("a", "F32", "8", "[0,32]")}, 32), ErrorCode::kInvalidTensorEntry},
      // B9
      {"unknown_dtype", file_of({entry("a", "F24", "[2]", "[0,6]")}, 6), ErrorCode::kUnknownDtype},
      {"lowercase_dtype", file_of({entry("a", "f32", "[2]", "[0,8]")}, 8), ErrorCode::kUnknownDtype},
      // B10, B23
      {"negative_shape_entry", file_of({entry("a", "F32", "[-2]", "[0,8]")}, 8), ErrorCode::kInvalidShape},
      {"float_shape_entry", file_of({entry("a", "F32", "[2.0]", "[0,8]")}, 8), ErrorCode::kInvalidShape},
      {"string_shape_entry", file_of({entry("a", "F32", "[\"2\"]", "[0,8]")}, 8), ErrorCode::kInvalidShape},
      {"shape_entry_above_2_53", file_of({entry("a", "U8", "[9007199254740993]", "[0,8]")}, 8), ErrorCode::kInvalidShape},
      // B14
      {"shape_product_overflow", file_of({entry("a", "U8", "[4294967296,4294967296]", "[0,0]")}, 0),
       ErrorCode::kShapeOverflow},
      {"shape_bits_overflow", file_of({entry("a", "F32", "[2147483648,2147483648]", "[0,0]")}, 0),
       ErrorCode::kShapeOverflow},
      // B12, B13
      {"offsets_begin_after_end", file_of({entry("a", "F32", "[2]", "[8,0]")}, 8), ErrorCode::kInvalidOffsets},
      {"offsets_first_not_zero", file_of({entry("a", "F32", "[2]", "[4,12]")}, 12), ErrorCode::kInvalidOffsets},
      {"offsets_gap", file_of({a8, entry("b", "F32", "[2]", "[12,20]")}, 20), ErrorCode::kInvalidOffsets},
      {"offsets_overlap", file_of({a8, entry("b", "F32", "[2]", "[4,12]")}, 12), ErrorCode::kInvalidOffsets},
      {"offsets_aliased", file_of({a8, entry("b", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidOffsets},
      {"zero_size_inside_tensor", file_of({a8, entry("z", "F32", "[0]", "[4,4]")}, 8), ErrorCode::kInvalidOffsets},
      {"offsets_past_2_53", file_of({entry("a", "U8", "[1]", "[0,1152921504606846976]")}, 1), ErrorCode::kInvalidOffsets},
      {"offsets_one_entry", file_of({entry("a", "F32", "[2]", "[0]")}, 8), ErrorCode::kInvalidOffsets},
      {"offsets_three_entries", file_of({entry("a", "F32", "[2]", "[0,8,8]")}, 8), ErrorCode::kInvalidOffsets},
      {"offsets_not_array", file_of({entry("a", "F32", "[2]", "\"0,8\"")}, 8), ErrorCode::kInvalidOffsets},
      {"offsets_negative", file_of({entry("a", "F32", "[0]", "[-8,0]")}, 0), ErrorCode::kInvalidOffsets},
      {"offsets_float", file_of({entry("a", "F32", "[2]", "[0,8.0]")}, 8), ErrorCode::kInvalidOffsets},
      // B15, B16
      {"span_not_shape_times_dtype", file_of({entry("a", "F32", "[2,2]", "[0,12]")}, 12), ErrorCode::kTensorSizeMismatch},
      {"span_too_long", file_of({entry("a", "BF16", "[2]", "[0,8]")}, 8), ErrorCode::kTensorSizeMismatch},
      {"sub_byte_not_whole_bytes", file_of({entry("a", "F4", "[3]", "[0,2]")}, 2), ErrorCode::kTensorSizeMismatch},
      // B17
      {"trailing_bytes", file_of({a8}, 9), ErrorCode::kIncompleteBuffer},
      {"empty_header_trailing_bytes", make_safetensors_bytes("{}", "x"), ErrorCode::kIncompleteBuffer},
      {"truncated_file", file_of({a8}, 4), ErrorCode::kIncompleteBuffer},
      {"last_tensor_past_end", file_of({a8, entry("b", "F32", "[2]", "[8,16]")}, 8), ErrorCode::kIncompleteBuffer},
      // B25
      {"nul_in_name", file_of({entry("a\\u0000b", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
      {"control_char_in_name", file_of({entry("a\\u0001", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
      {"newline_in_name", file_of({entry("a\\n", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
      {"del_in_name", file_of({entry("a\\u007f", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
      {"empty_name", file_of({entry("", "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
      {"name_over_1024_bytes", file_of({entry(std::string(1025, 'n'), "F32", "[2]", "[0,8]")}, 8), ErrorCode::kInvalidName},
  };
}

void PrintTo(const CorruptCase& c, std::ostream* os) { *os << c.name; }

class CorruptionCatalogue : public testing::TestWithParam<CorruptCase> {};

TEST_P(CorruptionCatalogue, ParseRaisesExactCode) {
  const auto& c = GetParam();
  try {
    parse(c.bytes);
    FAIL() << c.name << ": parsed without error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), c.code) << c.name << ": got " << error_code_name(e.code()) << " (" << e.what() << ")";
  }
}

TEST_P(CorruptionCatalogue, OpenFileRaisesSameCode) {
  const auto& c = GetParam();
  test::TempDir dir;
  const auto path = test::write_file(dir / "corrupt.safetensors", c.bytes);
  try {
    SafetensorsFile::open(path);
    FAIL() << c.name << ": opened without error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), c.code) << c.name << ": " << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Format, CorruptionCatalogue, testing::ValuesIn(catalogue()),
                         [](const testing::TestParamInfo<CorruptCase>& info) { return std::string(info.param.name); });

TEST(CorruptionCatalogueSize, AtLeastFortyDistinctCases) {
  const auto rows = catalogue();
  EXPECT_GE(rows.size(), 40u);
  std::set<std::string> distinct;
  for (const auto& r : rows) distinct.insert(r.bytes);
  EXPECT_EQ(distinct.size(), rows.size()) << "two catalogue rows have identical bytes";
}

TEST(SafetensorsMessages, NameFileTensorAndProblem) {
  const std::string bytes = file_of({entry("a.weight", "F32", "[2,2]", "[0,12]")}, 12);
  try {
    parse_safetensors_header(as_span(bytes), bytes.size(), "model.safetensors");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "model.safetensors: tensor 'a.weight': data_offsets [0, 12] but shape [2, 2] x F32 needs 16 bytes");
  }
}

// ---- valid edge cases ----

TEST(SafetensorsValid, EmptyObject) {
  const auto h = parse(make_safetensors_bytes("{}"));
  EXPECT_TRUE(h.tensors.empty());
  EXPECT_TRUE(h.metadata.empty());
  EXPECT_EQ(h.header_size, 2u);
}

TEST(SafetensorsValid, EmptyObjectPaddedToEight) {
  const auto h = parse(make_safetensors_bytes("{}      "));
  EXPECT_EQ(h.header_size, 8u);
  EXPECT_EQ(h.data_start(), 16u);
}

TEST(SafetensorsValid, HeaderLengthSevenIsAccepted) {
  // Readers must not require N % 8 == 0 (B20).
  EXPECT_EQ(parse(make_safetensors_bytes("{}     ")).header_size, 7u);
}

TEST(SafetensorsValid, MetadataOnly) {
  const auto h = parse(make_safetensors_bytes("{\"__metadata__\":{\"format\":\"pt\",\"x\":\"\"}}"));
  EXPECT_TRUE(h.tensors.empty());
  EXPECT_EQ(h.metadata.at("format"), "pt");
  EXPECT_EQ(h.metadata.at("x"), "");
}

TEST(SafetensorsValid, ZeroElementTensorsShareOffsets) {
  const auto h = parse(file_of({entry("z1", "F32", "[0]", "[0,0]"), entry("z2", "BF16", "[3,0]", "[0,0]"),
                                entry("a", "F32", "[2]", "[0,8]"), entry("z3", "F64", "[0,5]", "[8,8]"),
                                entry("z4", "U8", "[0]", "[8,8]")},
                               8));
  ASSERT_EQ(h.tensors.size(), 5u);
  EXPECT_EQ(h.find("z2")->num_elements(), 0u);
  EXPECT_EQ(h.find("z3")->num_bytes(), 0u);
}

TEST(SafetensorsValid, ZeroElementTensorsOnly) {
  const auto h = parse(file_of({entry("z1", "F32", "[0]", "[0,0]"), entry("z2", "F32", "[0,7]", "[0,0]")}, 0));
  EXPECT_EQ(h.tensors.size(), 2u);
}

TEST(SafetensorsValid, ScalarShape) {
  const auto h = parse(file_of({entry("s", "F32", "[]", "[0,4]")}, 4));
  ASSERT_EQ(h.tensors.size(), 1u);
  EXPECT_TRUE(h.tensors[0].shape.empty());
  EXPECT_EQ(h.tensors[0].num_elements(), 1u);
}

TEST(SafetensorsValid, SpacePaddedHeader) {
  EXPECT_EQ(parse(make_safetensors_bytes("{" + entry("a", "F32", "[2]", "[0,8]") + "}      ", std::string(8, 'x')))
                .tensors.size(),
            1u);
}

TEST(SafetensorsValid, LeadingAndTrailingJsonWhitespace) {
  EXPECT_EQ(parse(make_safetensors_bytes(" \n\t\r{" + entry("a", "F32", "[2]", "[0,8]") + "}\r\n\t ", std::string(8, 'x')))
                .tensors.size(),
            1u);
}

TEST(SafetensorsValid, UnalignedOffsetsAccepted) {
  const auto h = parse(file_of({entry("b", "U8", "[3]", "[0,3]"), entry("a", "F32", "[1]", "[3,7]")}, 7));
  EXPECT_EQ(h.find("a")->data_begin, 3u);
}

TEST(SafetensorsValid, EveryDtypeParses) {
  const std::vector<std::pair<std::string, int>> dtypes = {
      {"BOOL", 4}, {"F4", 2}, {"F6_E2M3", 3}, {"F6_E3M2", 3}, {"U8", 4}, {"I8", 4}, {"F8_E5M2", 4},
      {"F8_E4M3", 4}, {"F8_E8M0", 4}, {"F8_E4M3FNUZ", 4}, {"F8_E5M2FNUZ", 4}, {"I16", 8}, {"U16", 8},
      {"F16", 8}, {"BF16", 8}, {"I32", 16}, {"U32", 16}, {"F32", 16}, {"C64", 32}, {"F64", 32},
      {"I64", 32}, {"U64", 32}};
  std::vector<std::string> entries;
  std::size_t offset = 0;
  for (const auto& [d, bytes] : dtypes) {
    entries.push_back(entry("t_" + d, d, "[4]", "[" + std::to_string(offset) + "," + std::to_string(offset + bytes) + "]"));
    offset += bytes;
  }
  const auto h = parse(file_of(entries, offset));
  EXPECT_EQ(h.tensors.size(), dtypes.size());
  EXPECT_EQ(h.find("t_F6_E2M3")->dtype, DType::kF6E2M3);
}

TEST(SafetensorsValid, UnicodeAndEscapedNames) {
  const auto h = parse(file_of({entry("caf\\u00e9", "U8", "[1]", "[0,1]"), entry("\xe6\x97\xa5", "U8", "[1]", "[1,2]")}, 2));
  EXPECT_NE(h.find("caf\xc3\xa9"), nullptr);
  EXPECT_NE(h.find("\xe6\x97\xa5"), nullptr);
}

TEST(SafetensorsValid, UnknownFieldIsAWarning) {
  const auto h = parse(make_safetensors_bytes(
      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"extra\":true}}", "x"));
  ASSERT_EQ(h.warnings.size(), 1u);
  EXPECT_THAT(h.warnings[0], testing::HasSubstr("extra"));
}

TEST(SafetensorsValid, TensorsSortedByNameAndFindable) {
  const auto h = parse(file_of({entry("c", "U8", "[1]", "[0,1]"), entry("a", "U8", "[1]", "[1,2]"),
                                entry("b", "U8", "[1]", "[2,3]")},
                               3));
  ASSERT_EQ(h.tensors.size(), 3u);
  EXPECT_EQ(h.tensors[0].name, "a");
  EXPECT_EQ(h.tensors[2].name, "c");
  EXPECT_EQ(h.find("b")->data_begin, 2u);
  EXPECT_EQ(h.find("nope"), nullptr);
}

TEST(SafetensorsValid, ParseNeedsOnlyThePrefix) {
  const std::string bytes = file_of({entry("a", "F32", "[1024]", "[0,4096]")}, 4096);
  const std::uint64_t n = bytes.size() - 4096 - 8;
  const auto h = parse_safetensors_header(as_span(bytes).first(8 + n), bytes.size(), "prefix");
  EXPECT_EQ(h.tensors[0].num_bytes(), 4096u);
}

TEST(SafetensorsFileOpen, TensorBytesPointIntoTheMapping) {
  test::TempDir dir;
  const auto path = test::write_file(dir / "m.safetensors", make_safetensors_bytes(
      "{" + entry("a", "U8", "[2]", "[0,2]") + "," + entry("b", "U8", "[3]", "[2,5]") + "}", "hello"));
  const auto f = SafetensorsFile::open(path);
  const auto b = f->tensor_bytes(*f->header().find("b"));
  ASSERT_EQ(b.size(), 3u);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(b.data()), 3), "llo");
  EXPECT_EQ(f->tensor_file_offset(*f->header().find("b")), f->header().data_start() + 2);
  EXPECT_EQ(f->path(), path);
}

TEST(MappedFile, ReadAtCopiesTheFileBytes) {
  test::TempDir dir;
  std::string content(300000, '\0');
  for (std::size_t i = 0; i < content.size(); ++i) content[i] = static_cast<char>((i * 131) % 251);
  const auto path = test::write_file(dir / "data.bin", content);
  const auto f = MappedFile::open(path);
  for (const auto& [offset, length] : std::vector<std::pair<std::size_t, std::size_t>>{
           {0, 1}, {0, content.size()}, {4095, 2}, {123457, 70001}, {content.size() - 3, 3}, {content.size(), 0}}) {
    std::vector<std::byte> got(length);
    f.read_at(offset, got);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(got.data()), length), content.substr(offset, length)) << offset;
  }
}

TEST(MappedFile, ReadPastTheEndNamesTheFile) {
  test::TempDir dir;
  const auto path = test::write_file(dir / "short.bin", "0123456789");
  const auto f = MappedFile::open(path);
  std::vector<std::byte> got(4);
  try {
    f.read_at(8, got);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
    EXPECT_NE(std::string(e.what()).find("short.bin"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("end of file at byte 10"), std::string::npos) << e.what();
  }
  // A file that shrinks after it was opened is an error too, not a short read.
  std::filesystem::resize_file(path, 5);
  try {
    f.read_at(2, got);
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
  }
}

TEST(MappedFile, MissingFileIsIo) {
  test::TempDir dir;
  try {
    MappedFile::open(dir / "nope");
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
  }
}

TEST(MappedFile, FolderIsIo) {
  test::TempDir dir;
  try {
    MappedFile::open(dir.path());
    FAIL();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kIo);
  }
}

TEST(MappedFile, EmptyFileMapsToEmptySpan) {
  test::TempDir dir;
  const auto m = MappedFile::open(test::write_file(dir / "empty", ""));
  EXPECT_EQ(m.size(), 0u);
  EXPECT_TRUE(m.bytes().empty());
  m.advise_willneed(0, 10);
  m.advise_dontneed(0, 10);
}

TEST(MappedFile, MoveKeepsBytesAndAdviceIsHarmless) {
  test::TempDir dir;
  const std::string content(10000, 'q');
  MappedFile a = MappedFile::open(test::write_file(dir / "f", content));
  MappedFile b = std::move(a);
  EXPECT_EQ(b.size(), content.size());
  b.advise_willneed(100, 5000);
  b.advise_dontneed(0, 10000);
  b.advise_dontneed(9999, 100);
  EXPECT_EQ(static_cast<char>(b.bytes()[9999]), 'q');  // pages come back from the page cache
  MappedFile c;
  c = std::move(b);
  EXPECT_EQ(c.size(), content.size());
}

}  // namespace
}  // namespace taskvec

namespace taskvec {
namespace {

// A small deterministic mutation sweep: whatever the bytes, the parser either accepts them or throws
// taskvec::Error with a format code, never anything else (and never crashes under the sanitizers).
TEST(SafetensorsRobustness, MutatedFilesOnlyThrowTaskvecErrors) {
  const std::string base =
      file_of({entry("a", "F32", "[2]", "[0,8]"), entry("b", "BF16", "[1,3]", "[8,14]"), entry("z", "U8", "[0]", "[14,14]")}, 14);
  std::uint64_t state = 12345;
  auto next = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<std::size_t>(state >> 33);
  };
  int accepted = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    std::string m = base;
    const int edits = 1 + static_cast<int>(next() % 3);
    for (int e = 0; e < edits && !m.empty(); ++e) {
      const std::size_t pos = next() % m.size();
      switch (next() % 4) {
        case 0: m[pos] = static_cast<char>(next()); break;
        case 1: m.erase(pos, 1); break;
        case 2: m.insert(pos, 1, "{}[],:\"0123456789-.e \\"[next() % 22]); break;
        default: m.resize(pos); break;
      }
    }
    try {
      parse(m);
      ++accepted;
    } catch (const Error& e) {
      EXPECT_NE(e.code(), ErrorCode::kInternal) << iter;
    }
  }
  EXPECT_LT(accepted, 3000);
}

}  // namespace
}  // namespace taskvec
