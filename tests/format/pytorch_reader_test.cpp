// PyTorch checkpoints: the zip directory reader, the restricted unpickler and the reader.
//
// Two kinds of inputs:
//  - real files written at test time by torch.save (/usr/bin/python3 with torch; skipped without it),
//    each tensor's row-major bytes also written by the script (t.contiguous()) to a side file that the
//    reader's output is compared with;
//  - hand-made zips and pickles built here byte by byte, valid and hostile (the hostile catalogue): each
//    must fail with its exact ErrorCode and a message naming the offending thing, and nothing in them is
//    ever executed (the reader has no way to).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "format/pytorch_reader.hpp"
#include "format/torch_pickle.hpp"
#include "format/zip_archive.hpp"
#include "support/builders.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/error.hpp"

// The ZipSpec / PklTensor / ZipOptions rows below name only the fields that differ from the defaults.
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using format_detail::open_pytorch_file;
using format_detail::parse_torch_pickle;
using format_detail::PytorchFile;
using format_detail::read_zip_directory;
using format_detail::TorchStateDict;
using ::testing::HasSubstr;

std::span<const std::byte> as_span(const std::string& s) { return std::as_bytes(std::span(s.data(), s.size())); }

std::string le(std::uint64_t v, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return out;
}

// ---- a zip writer for tests: STORED entries, optional corruptions ----

struct ZipSpec {
  std::string name;
  std::string data;
  std::uint16_t method = 0;
  bool descriptor = true;                       // flag bit 3 (as torch): local sizes 0, a data descriptor follows
  std::optional<std::uint64_t> central_csize;   // default data.size()
  std::optional<std::uint64_t> central_usize;   // default data.size()
  std::optional<std::string> local_name;        // default name
  std::optional<std::uint64_t> local_size;      // local header sizes (needs descriptor = false)
};

struct ZipOptions {
  bool zip64_sentinels = false;                 // EOCD fields 0xFFFF / 0xFFFFFFFF: the zip64 record rules
  std::optional<std::uint64_t> zip64_count;     // entry count written in the zip64 record
  std::optional<std::uint64_t> eocd_count;      // entry count written in the EOCD
  bool zip64 = true;                            // write the zip64 record and locator (torch always does)
};

std::string make_zip(const std::vector<ZipSpec>& specs, const ZipOptions& opt = {}) {
  std::string out, cd;
  for (const ZipSpec& s : specs) {
    const std::uint64_t offset = out.size();
    const std::string lname = s.local_name.value_or(s.name);
    const std::uint64_t lsize = s.descriptor ? 0 : s.local_size.value_or(s.data.size());
    out += "PK\x03\x04" + le(20, 2) + le(s.descriptor ? 0x0808 : 0x0800, 2) + le(s.method, 2) + le(0, 4) + le(0, 4) +
           le(lsize, 4) + le(lsize, 4) + le(lname.size(), 2) + le(0, 2) + lname + s.data;
    if (s.descriptor) out += "PK\x07\x08" + le(0, 4) + le(s.data.size(), 4) + le(s.data.size(), 4);
    cd += "PK\x01\x02" + le(20, 2) + le(20, 2) + le(s.descriptor ? 0x0808 : 0x0800, 2) + le(s.method, 2) + le(0, 4) + le(0, 4) +
          le(s.central_csize.value_or(s.data.size()), 4) + le(s.central_usize.value_or(s.data.size()), 4) + le(s.name.size(), 2) +
          le(0, 2) + le(0, 2) + le(0, 2) + le(0, 2) + le(0, 4) + le(offset, 4) + s.name;
  }
  const std::uint64_t cd_offset = out.size();
  out += cd;
  const std::uint64_t n = specs.size();
  if (opt.zip64) {
    const std::uint64_t rec = out.size();
    const std::uint64_t zn = opt.zip64_count.value_or(n);
    out += "PK\x06\x06" + le(44, 8) + le(45, 2) + le(45, 2) + le(0, 4) + le(0, 4) + le(zn, 8) + le(zn, 8) + le(cd.size(), 8) +
           le(cd_offset, 8);
    out += "PK\x06\x07" + le(0, 4) + le(rec, 8) + le(1, 4);
  }
  const std::uint64_t en = opt.eocd_count.value_or(n);
  if (opt.zip64_sentinels) {
    out += "PK\x05\x06" + le(0, 2) + le(0, 2) + le(0xFFFF, 2) + le(0xFFFF, 2) + le(0xFFFFFFFF, 4) + le(0xFFFFFFFF, 4) + le(0, 2);
  } else {
    out += "PK\x05\x06" + le(0, 2) + le(0, 2) + le(en, 2) + le(en, 2) + le(cd.size(), 4) + le(cd_offset, 4) + le(0, 2);
  }
  return out;
}

format_detail::ZipDirectory read_zip(const std::string& bytes) {
  return read_zip_directory(
      bytes.size(),
      [&](std::uint64_t off, std::span<std::byte> dst) {
        if (off > bytes.size() || dst.size() > bytes.size() - off) throw Error(ErrorCode::kIo, "read past the end");
        std::memcpy(dst.data(), bytes.data() + off, dst.size());
      },
      "t.zip");
}

// ---- a pickle writer for tests: the opcodes torch.save uses ----

std::string uni(const std::string& s) { return "X" + le(s.size(), 4) + s; }
std::string glob(const std::string& module, const std::string& name) { return "c" + module + "\n" + name + "\n"; }
std::string k1(std::uint8_t v) { return std::string("K") + static_cast<char>(v); }
std::string k4(std::uint32_t v) { return "J" + le(v, 4); }
std::string ordered_dict() { return glob("collections", "OrderedDict") + ")R"; }
std::string ints(const std::vector<std::uint32_t>& v) {
  std::string s = "(";
  for (const std::uint32_t x : v) s += k4(x);
  return s + "t";
}

struct PklTensor {
  std::string name;
  std::string storage_class = "FloatStorage";
  std::string key = "0";
  std::uint32_t numel = 0;
  std::uint32_t offset = 0;
  std::vector<std::uint32_t> shape, stride;
};

// "name": _rebuild_tensor_v2(pid, offset, shape, stride, False, OrderedDict())
std::string tensor_item(const PklTensor& t) {
  return uni(t.name) + glob("torch._utils", "_rebuild_tensor_v2") + "((" + uni("storage") + glob("torch", t.storage_class) + uni(t.key) +
         uni("cpu") + k4(t.numel) + "tQ" + k4(t.offset) + ints(t.shape) + ints(t.stride) + "\x89" + ordered_dict() + "tR";
}

// A whole state-dict pickle; `extra_items` are appended inside the SETITEMS mark.
std::string state_dict_pickle(const std::vector<PklTensor>& tensors, const std::string& extra_items = {}) {
  std::string p = "\x80\x02" + ordered_dict() + "(";
  for (const PklTensor& t : tensors) p += tensor_item(t);
  return p + extra_items + "u.";
}

std::string f32_bytes(std::uint32_t n, float scale = 1.0f) {
  std::vector<float> v(n);
  for (std::uint32_t i = 0; i < n; ++i) v[i] = static_cast<float>(i) * scale;
  return test::bytes_of(v);
}

TorchStateDict parse_pkl(const std::string& p) { return parse_torch_pickle(as_span(p), "t.pt"); }

std::vector<std::byte> read_all(const PytorchFile& f, const TensorInfo& info) {
  std::vector<std::byte> out(static_cast<std::size_t>(info.num_bytes()));
  f.source->read(info, 0, out);
  return out;
}

// Reads in pieces of `piece` bytes (crossing element boundaries) and checks it equals one whole read.
std::vector<std::byte> read_in_pieces(const PytorchFile& f, const TensorInfo& info, std::size_t piece) {
  std::vector<std::byte> out(static_cast<std::size_t>(info.num_bytes()));
  for (std::size_t at = 0; at < out.size(); at += piece) {
    f.source->read(info, at, std::span(out).subspan(at, std::min(piece, out.size() - at)));
  }
  return out;
}

std::vector<std::byte> bytes(const std::string& s) {
  const auto sp = as_span(s);
  return {sp.begin(), sp.end()};
}

template <typename F>
Error expect_error(ErrorCode code, F&& f) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e;
  }
  ADD_FAILURE() << "no error thrown";
  return Error(ErrorCode::kInternal, "");
}

// ======================= zip directory =======================

TEST(ZipDirectory, ReadsStoredEntriesAndTheirDataOffsets) {
  const std::string z = make_zip({{"a/data.pkl", "hello"}, {"a/data/0", "0123456789"}});
  const auto dir = read_zip(z);
  ASSERT_EQ(dir.entries.size(), 2u);
  EXPECT_TRUE(dir.zip64);
  const auto* e = dir.find("a/data/0");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->size, 10u);
  EXPECT_EQ(z.substr(static_cast<std::size_t>(e->data_offset), 10), "0123456789");
  EXPECT_EQ(z.substr(static_cast<std::size_t>(dir.find("a/data.pkl")->data_offset), 5), "hello");
}

TEST(ZipDirectory, Zip64SentinelsTakeTheZip64RecordAndPlainZipsWork) {
  const std::string z = make_zip({{"a/x", "abc"}}, {.zip64_sentinels = true});
  EXPECT_EQ(read_zip(z).find("a/x")->size, 3u);
  const std::string plain = make_zip({{"a/x", "abc", 0, false}}, {.zip64 = false});
  const auto dir = read_zip(plain);
  EXPECT_FALSE(dir.zip64);
  EXPECT_EQ(plain.substr(static_cast<std::size_t>(dir.find("a/x")->data_offset), 3), "abc");
}

struct ZipCase {
  const char* name;
  std::string bytes;
  const char* message_part;  // the message must name this
};

std::vector<ZipCase> zip_cases() {
  std::vector<ZipCase> c;
  const std::string good = make_zip({{"a/data.pkl", "xyz"}, {"a/data/0", std::string(64, 'd')}});
  c.push_back({"empty_file", "", "too short"});
  c.push_back({"truncated_half", good.substr(0, good.size() / 2), "End Of Central Directory"});
  c.push_back({"truncated_last_byte", good.substr(0, good.size() - 1), "End Of Central Directory"});
  c.push_back({"not_a_zip", std::string(100, 'x'), "End Of Central Directory"});
  c.push_back({"dotdot_entry", make_zip({{"../evil", "x"}}), "'../evil'"});
  c.push_back({"inner_dotdot_entry", make_zip({{"a/../../evil", "x"}}), "'a/../../evil'"});
  c.push_back({"absolute_entry", make_zip({{"/etc/passwd", "x"}}), "'/etc/passwd'"});
  c.push_back({"backslash_entry", make_zip({{"a\\..\\evil", "x"}}), "backslash"});
  c.push_back({"control_char_entry", make_zip({{"a\x1b[2J", "x"}}), "'a\\x1b[2J'"});
  c.push_back({"compressed_entry", make_zip({{"a/data/0", "xxxx", 8}}), "'a/data/0': is compressed (method 8"});
  c.push_back({"bomb_ratio_1000x", make_zip({{"a/data/0", std::string(100, 'x'), 8, true, 100, 100000}}), "declaring 100000 bytes from 100 (a zip-bomb ratio)"});
  c.push_back({"stored_bomb_ratio_1000x", make_zip({{"a/data/0", std::string(100, 'x'), 0, true, 100, 100000}}), "declares 100000 uncompressed bytes for 100 stored"});
  c.push_back({"stored_sizes_differ", make_zip({{"a/data/0", std::string(100, 'x'), 0, true, 100, 50}}), "sizes differ"});
  c.push_back({"local_name_differs", make_zip({{"a/data/0", "x", 0, true, {}, {}, std::string("a/data/1")}}), "'a/data/1'"});
  c.push_back({"local_sizes_differ", make_zip({{"a/data/0", "abcd", 0, false, {}, {}, {}, 3}}), "local header sizes"});
  c.push_back({"data_past_directory", make_zip({{"a/data/0", "abcd", 0, true, 4000, 4000}}), "runs past the central directory"});
  c.push_back({"duplicate_entry", make_zip({{"a/x", "1"}, {"a/x", "2"}}), "occurs twice"});
  // a/x claims 70 bytes, covering the local header and data of a/y (30 + 3 + 1 bytes + 16 descriptor... ).
  c.push_back({"overlapping_entries", make_zip({{"a/x", "1234", 0, true, 60, 60}, {"a/y", "5"}}), "overlaps"});
  c.push_back({"too_many_entries", make_zip({{"a/x", "1"}}, {.zip64_sentinels = true, .zip64_count = 1'000'001}), "1000001 entries"});
  c.push_back({"eocd_disagrees_with_zip64", make_zip({{"a/x", "1"}, {"a/y", "2"}}, {.zip64_count = 3}), "zip64 EOCD record says 3"});
  c.push_back({"count_larger_than_directory", make_zip({{"a/x", "1"}}, {.eocd_count = 500, .zip64 = false}), "cannot hold 500"});
  return c;
}

TEST(ZipDirectory, HostileCatalogue) {
  for (const ZipCase& c : zip_cases()) {
    SCOPED_TRACE(c.name);
    const Error e = expect_error(ErrorCode::kInvalidArchive, [&] { read_zip(c.bytes); });
    EXPECT_THAT(e.what(), HasSubstr(c.message_part));
    EXPECT_THAT(e.what(), HasSubstr("t.zip"));
  }
}

// ======================= unpickler on hand-made pickles =======================

TEST(TorchPickle, HandMadeStateDictGivesRecordsInOrder) {
  const std::string p = state_dict_pickle({{"w", "HalfStorage", "0", 6, 0, {2, 3}, {3, 1}},
                                           {"w_t", "HalfStorage", "0", 6, 0, {3, 2}, {1, 3}},
                                           {"b", "LongStorage", "1", 4, 1, {3}, {1}}},
                                          uni("step") + k1(7));
  const TorchStateDict sd = parse_pkl(p);
  ASSERT_EQ(sd.tensors.size(), 3u);
  EXPECT_EQ(sd.tensors[0].name, "w");
  EXPECT_EQ(sd.tensors[0].dtype, DType::kF16);
  EXPECT_EQ(sd.tensors[0].storage_numel, 6u);
  EXPECT_EQ(sd.tensors[1].stride, (std::vector<std::uint64_t>{1, 3}));
  EXPECT_EQ(sd.tensors[2].name, "b");
  EXPECT_EQ(sd.tensors[2].dtype, DType::kI64);
  EXPECT_EQ(sd.tensors[2].storage_key, "1");
  EXPECT_EQ(sd.tensors[2].storage_offset, 1u);
  EXPECT_EQ(sd.tensors[2].shape, (std::vector<std::uint64_t>{3}));
  EXPECT_EQ(sd.nested_key, "");
  ASSERT_EQ(sd.notes.size(), 1u);
  EXPECT_THAT(sd.notes[0], HasSubstr("'step'"));
}

TEST(TorchPickle, RepeatedKeyKeepsTheLastValueAndMemoSharesObjects) {
  // d = {}; d['a'] = 1; d['a'] = tensor -> one entry 'a' (the tensor). The tensor is memoized and stored
  // again under 'b' by BINGET.
  const PklTensor t{"a", "FloatStorage", "0", 2, 0, {2}, {1}};
  std::string p = "\x80\x02}(" + uni("a") + k1(1) + "u(" + tensor_item(t) + "q\x05" + "u(" + uni("b") + "h\x05" + "u.";
  const TorchStateDict sd = parse_pkl(p);
  ASSERT_EQ(sd.tensors.size(), 2u);
  EXPECT_EQ(sd.tensors[0].name, "a");
  EXPECT_EQ(sd.tensors[1].name, "b");
  EXPECT_EQ(sd.tensors[1].storage_key, "0");
  EXPECT_TRUE(sd.notes.empty());
}

TEST(TorchPickle, EmptyDictIsAnEmptyStateDict) { EXPECT_TRUE(parse_pkl("\x80\x02}.").tensors.empty()); }

struct PickleCase {
  const char* name;
  std::string bytes;
  ErrorCode code;
  const char* message_part;
};

std::vector<PickleCase> pickle_cases() {
  const std::string P = "\x80\x02";
  const std::string valid = state_dict_pickle({{"w", "FloatStorage", "0", 4, 0, {4}, {1}}});
  std::vector<PickleCase> c;
  // Globals outside the allow-list: refused at GLOBAL (importing is already running code), with offset.
  c.push_back({"os_system_reduce", P + glob("os", "system") + uni("touch /tmp/pwned") + "\x85R.", ErrorCode::kUnsafePickle, "'os.system' is not allowed"});
  c.push_back({"os_system_offset", P + glob("os", "system") + uni("id") + "\x85R.", ErrorCode::kUnsafePickle, "byte 2:"});
  c.push_back({"builtins_eval", P + glob("builtins", "eval") + uni("1+1") + "\x85R.", ErrorCode::kUnsafePickle, "'builtins.eval'"});
  c.push_back({"posix_system", P + glob("posix", "system") + uni("id") + "\x85R.", ErrorCode::kUnsafePickle, "'posix.system'"});
  c.push_back({"subprocess_popen", P + glob("subprocess", "Popen") + "(" + uni("id") + "l\x85R.", ErrorCode::kUnsafePickle, "'subprocess.Popen'"});
  c.push_back({"builtins_getattr", P + glob("builtins", "getattr") + ".", ErrorCode::kUnsafePickle, "'builtins.getattr'"});
  c.push_back({"torch_load_from_bytes", P + glob("torch.storage", "_load_from_bytes") + "C\x01x\x85R.", ErrorCode::kUnsafePickle,
               "'torch.storage._load_from_bytes'"});
  c.push_back({"stack_global_os_system", "\x80\x04\x8c\x02os\x8c\x06system\x93" + uni("id") + "\x85R.", ErrorCode::kUnsafePickle, "'os.system'"});
  c.push_back({"evil_global_after_tensors", valid.substr(0, valid.size() - 2) + uni("x") + glob("os", "system") + "u.",
               ErrorCode::kUnsafePickle, "'os.system'"});
  // REDUCE of something that is not an allowed callable.
  c.push_back({"reduce_of_storage_class", P + glob("torch", "FloatStorage") + ")R.", ErrorCode::kUnsafePickle, "'torch.FloatStorage'"});
  c.push_back({"reduce_of_a_string", P + uni("os.system") + ")R.", ErrorCode::kUnsafePickle, "REDUCE calls a str"});
  c.push_back({"build_on_a_string", P + uni("x") + "}b.", ErrorCode::kUnsafePickle, "BUILD sets the state of a str"});
  // Opcodes torch never writes.
  c.push_back({"inst_opcode", P + "ios\nsystem\n(S'id'\n.", ErrorCode::kUnsafePickle, "opcode 0x69 ('i')"});
  c.push_back({"obj_opcode", P + "(o.", ErrorCode::kUnsafePickle, "opcode 0x6f ('o')"});
  c.push_back({"ext1_opcode", P + "\x82\x01.", ErrorCode::kUnsafePickle, "opcode 0x82"});
  c.push_back({"unsupported_storage", P + glob("torch", "ComplexFloatStorage") + ".", ErrorCode::kUnsupported, "'torch.ComplexFloatStorage'"});
  // Bounds.
  c.push_back({"huge_memo_index", P + "}r" + le(0xFFFFFFFF, 4) + ".", ErrorCode::kInvalidPickle, "memo index 4294967295"});
  c.push_back({"memo_get_unset", P + "}j" + le(77, 4) + ".", ErrorCode::kInvalidPickle, "memo index 77, which was never set"});
  c.push_back({"truncated_pickle", valid.substr(0, valid.size() / 2), ErrorCode::kInvalidPickle, "truncated"});
  c.push_back({"no_stop", P + "}", ErrorCode::kInvalidPickle, "without STOP"});
  c.push_back({"string_longer_than_file", P + "X" + le(0x7FFFFFFF, 4) + "abc.", ErrorCode::kInvalidPickle, "only 4 are left"});
  c.push_back({"long1_too_wide", P + "\x8a\x09" + std::string(9, '\x01') + ".", ErrorCode::kInvalidPickle, "LONG1 of 9 bytes"});
  c.push_back({"marks_too_deep", P + std::string(10001, '(') + ".", ErrorCode::kInvalidPickle, "MARKs"});
  c.push_back({"stack_underflow", P + "s.", ErrorCode::kInvalidPickle, "empty stack"});
  c.push_back({"tuple_without_mark", P + "t.", ErrorCode::kInvalidPickle, "without a MARK"});
  c.push_back({"bytes_after_stop", P + "}.junk", ErrorCode::kInvalidPickle, "4 bytes after STOP"});
  c.push_back({"protocol_9", "\x80\x09}.", ErrorCode::kInvalidPickle, "protocol 9"});
  // Not a state dict.
  c.push_back({"top_level_list", P + "].", ErrorCode::kInvalidPickle, "a list, not a state dict"});
  c.push_back({"dict_without_tensors", P + "}(" + uni("epoch") + k1(3) + "u.", ErrorCode::kInvalidPickle, "'epoch'"});
  c.push_back({"bad_persistent_id", P + glob("torch._utils", "_rebuild_tensor_v2") + "(" + uni("junk") + "Q.", ErrorCode::kInvalidPickle,
               "persistent id is a str"});
  c.push_back({"storage_key_with_slash", state_dict_pickle({{"w", "FloatStorage", "../0", 4, 0, {4}, {1}}}), ErrorCode::kInvalidPickle,
               "'../0'"});
  c.push_back({"storage_key_two_sizes", state_dict_pickle({{"w", "FloatStorage", "0", 4, 0, {4}, {1}}, {"v", "FloatStorage", "0", 5, 0, {4}, {1}}}),
               ErrorCode::kInvalidPickle, "storage '0' is 5 x F32 here but 4 x F32 earlier"});
  c.push_back({"shape_stride_rank_differ", state_dict_pickle({{"w", "FloatStorage", "0", 4, 0, {4}, {1, 1}}}), ErrorCode::kInvalidPickle,
               "stride 2"});
  c.push_back({"control_char_name", state_dict_pickle({{"a\nb", "FloatStorage", "0", 4, 0, {4}, {1}}}), ErrorCode::kInvalidName, "'a\\x0ab'"});
  return c;
}

TEST(TorchPickle, HostileCatalogue) {
  for (const PickleCase& c : pickle_cases()) {
    SCOPED_TRACE(c.name);
    const Error e = expect_error(c.code, [&] { parse_pkl(c.bytes); });
    EXPECT_THAT(e.what(), HasSubstr(c.message_part));
    EXPECT_THAT(e.what(), HasSubstr("t.pt"));
  }
}

TEST(TorchPickle, SelfReferencingListIsHarmless) {
  // l = []; l.append(l) (through the memo), inside a dict value: skipped, no recursion anywhere.
  const std::string p = "\x80\x02}(" + uni("w") + glob("torch._utils", "_rebuild_tensor_v2") + "((" + uni("storage") +
                        glob("torch", "FloatStorage") + uni("0") + uni("cpu") + k1(1) + "tQ" + k1(0) + ")" + ")" + "\x89}tR" +
                        uni("loop") + "]q\x01h\x01" + "a" + "u.";
  const TorchStateDict sd = parse_pkl(p);
  ASSERT_EQ(sd.tensors.size(), 1u);
  EXPECT_TRUE(sd.tensors[0].shape.empty());
  ASSERT_EQ(sd.notes.size(), 1u);
  EXPECT_THAT(sd.notes[0], HasSubstr("'loop': a list"));
}

TEST(TorchPickle, OneLongKeyInManyDictsIsNotCopiedPerDict) {
  // A 4 MiB string memoized once, then used (BINGET) as the key of 20,000 dicts: keys are indexed by
  // hash, so this costs no 80 GB of key copies. The result is a list, so it is not a state dict.
  std::string p = "\x80\x02X" + le(4 << 20, 4) + std::string(4 << 20, 'k') + "q" + le(0, 1) + "]";
  for (int i = 0; i < 20000; ++i) p += "}h" + le(0, 1) + "K\x01sa";
  p += ".";
  EXPECT_THROW(
      {
        try {
          parse_pkl(p);
        } catch (const Error& e) {
          EXPECT_EQ(e.code(), ErrorCode::kInvalidPickle);
          EXPECT_THAT(e.what(), HasSubstr("STOP with 2 objects"));
          throw;
        }
      },
      Error);
}

TEST(TorchPickle, NumericKeysFollowPythonEquality) {
  // {1: 'x', True: tensor} is one entry in Python (True == 1); a tensor under a non-string key is refused.
  const std::string t = tensor_item({"", "FloatStorage", "0", 1, 0, {1}, {1}}).substr(5);
  const Error e = expect_error(ErrorCode::kInvalidPickle, [&] { parse_pkl("\x80\x02}(" + k1(1) + uni("x") + "\x88" + t + "u."); });
  EXPECT_THAT(e.what(), HasSubstr("a tensor's key is an int"));
}

// ======================= the reader on hand-made files =======================

class HandMadeFile : public ::testing::Test {
 protected:
  fs::path write(const std::string& name, const std::string& bytes) { return test::write_file(dir_ / name, bytes); }
  test::TempDir dir_;
};

TEST_F(HandMadeFile, ContiguousStridedSharedAndExpandedViews) {
  // Storage 0: 12 floats 0..11 seen as w [3, 4]; w_t = w.t() [4, 3]; tail = w[1:] [2, 4] (offset 4);
  // col = w[:, 2] [3] (offset 2, stride 4); rep = arange(3).expand(2, 3) from storage 1 (stride 0).
  const std::string pkl = state_dict_pickle({{"w", "FloatStorage", "0", 12, 0, {3, 4}, {4, 1}},
                                             {"w_t", "FloatStorage", "0", 12, 0, {4, 3}, {1, 4}},
                                             {"tail", "FloatStorage", "0", 12, 4, {2, 4}, {4, 1}},
                                             {"col", "FloatStorage", "0", 12, 2, {3}, {4}},
                                             {"rep", "FloatStorage", "1", 3, 0, {2, 3}, {0, 1}}});
  const fs::path p = write("m.pt", make_zip({{"m/data.pkl", pkl}, {"m/data/0", f32_bytes(12)}, {"m/data/1", f32_bytes(3, 10.0f)}}));
  const PytorchFile f = open_pytorch_file(p);
  EXPECT_EQ(f.archive_prefix, "m");
  EXPECT_EQ(f.source->format(), "pytorch");
  ASSERT_EQ(f.tensors.size(), 5u);
  std::vector<std::string> names;
  for (const TensorInfo& t : f.tensors) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"col", "rep", "tail", "w", "w_t"}));  // sorted
  auto values = [&](const char* name) {
    const TensorInfo* t = f.find(name);
    EXPECT_NE(t, nullptr);
    EXPECT_EQ(t->num_bytes(), t->num_elements() * 4);
    const auto b = read_in_pieces(f, *t, 3);  // pieces that cut elements
    EXPECT_EQ(b, read_all(f, *t));
    std::vector<float> v(b.size() / 4);
    std::memcpy(v.data(), b.data(), b.size());
    return v;
  };
  EXPECT_EQ(values("w"), (std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(values("w_t"), (std::vector<float>{0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}));
  EXPECT_EQ(values("tail"), (std::vector<float>{4, 5, 6, 7, 8, 9, 10, 11}));
  EXPECT_EQ(values("col"), (std::vector<float>{2, 6, 10}));
  EXPECT_EQ(values("rep"), (std::vector<float>{0, 10, 20, 0, 10, 20}));
  // A renamed copy of a TensorInfo (Checkpoint aliases) reads the same bytes.
  TensorInfo alias = *f.find("w_t");
  alias.name = "lm_head.weight";
  EXPECT_EQ(read_all(f, alias), read_all(f, *f.find("w_t")));
}

TEST_F(HandMadeFile, Refusals) {
  const std::string ok_pkl = state_dict_pickle({{"w", "FloatStorage", "0", 4, 0, {4}, {1}}});
  struct Case {
    const char* name;
    std::string file;
    ErrorCode code;
    const char* message_part;
  };
  const std::vector<Case> cases = {
      {"view_past_storage", make_zip({{"m/data.pkl", state_dict_pickle({{"w", "FloatStorage", "0", 4, 1, {4}, {1}}})}, {"m/data/0", f32_bytes(4)}}),
       ErrorCode::kInvalidPickle, "tensor 'w': view (offset 1, size [4], stride [1]) reaches element 4"},
      {"transposed_past_storage", make_zip({{"m/data.pkl", state_dict_pickle({{"w", "FloatStorage", "0", 5, 0, {3, 2}, {1, 3}}})}, {"m/data/0", f32_bytes(5)}}),
       ErrorCode::kInvalidPickle, "tensor 'w': view (offset 0, size [3, 2], stride [1, 3]) reaches element 5 of storage '0', which has 5"},
      {"storage_entry_too_short", make_zip({{"m/data.pkl", state_dict_pickle({{"w", "FloatStorage", "0", 6, 0, {3, 2}, {1, 3}}})}, {"m/data/0", f32_bytes(5)}}),
       ErrorCode::kInvalidPickle, "tensor 'w': storage '0' holds 6 x F32 (24 bytes) but entry 'm/data/0' has 20 bytes"},
      {"storage_entry_missing", make_zip({{"m/data.pkl", ok_pkl}}), ErrorCode::kInvalidArchive, "tensor 'w': its storage entry 'm/data/0' is missing"},
      // The whole pickle is checked first: an evil global after a tensor whose storage is missing.
      {"unsafe_before_any_data", make_zip({{"m/data.pkl", ok_pkl.substr(0, ok_pkl.size() - 2) + uni("x") + glob("posix", "system") + "u."}}),
       ErrorCode::kUnsafePickle, "'posix.system'"},
      {"no_data_pkl", make_zip({{"m/other.pkl", ok_pkl}}), ErrorCode::kInvalidArchive, "without a PREFIX/data.pkl"},
      {"two_data_pkl", make_zip({{"m/data.pkl", ok_pkl}, {"n/data.pkl", ok_pkl}}), ErrorCode::kInvalidArchive, "two data.pkl entries"},
      {"not_a_zip", "\x89PNG\r\n\x1a\n" + std::string(100, '\0'), ErrorCode::kInvalidArchive, "does not start with a zip header"},
      {"legacy_format", std::string("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15) + "\x80\x02}q" + le(0, 1) + ".", ErrorCode::kUnsupported,
       "torch.save(torch.load('old.bin'), 'new.bin')"},
      {"big_endian", make_zip({{"m/data.pkl", ok_pkl}, {"m/byteorder", "big"}, {"m/data/0", f32_bytes(4)}}), ErrorCode::kUnsupported, "big-endian"},
      {"compressed_storage", make_zip({{"m/data.pkl", ok_pkl}, {"m/data/0", f32_bytes(4), 8}}), ErrorCode::kInvalidArchive, "'m/data/0': is compressed"},
      {"dotdot_storage_entry", make_zip({{"m/data.pkl", ok_pkl}, {"m/../evil", "x"}}), ErrorCode::kInvalidArchive, "'m/../evil'"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const fs::path p = write(std::string(c.name) + ".pt", c.file);
    const Error e = expect_error(c.code, [&] { open_pytorch_file(p); });
    EXPECT_THAT(e.what(), HasSubstr(c.message_part));
    EXPECT_THAT(e.what(), HasSubstr(p.string()));
  }
}

TEST_F(HandMadeFile, Detection) {
  const std::string zip = make_zip({{"archive/data.pkl", "x"}, {"archive/data/0", "y"}});
  EXPECT_TRUE(format_detail::looks_like_zip(as_span(zip)));
  EXPECT_TRUE(format_detail::looks_like_pytorch_zip(as_span(zip)));
  EXPECT_FALSE(format_detail::looks_like_legacy_pytorch(as_span(zip)));
  const std::string other = make_zip({{"word/document.xml", "x"}});
  EXPECT_TRUE(format_detail::looks_like_zip(as_span(other)));
  EXPECT_FALSE(format_detail::looks_like_pytorch_zip(as_span(other)));
  EXPECT_FALSE(format_detail::looks_like_pytorch_zip(as_span(zip.substr(0, 20))));
  const std::string legacy("\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.", 15);
  EXPECT_TRUE(format_detail::looks_like_legacy_pytorch(as_span(legacy)));
  EXPECT_FALSE(format_detail::looks_like_legacy_pytorch(as_span(legacy.substr(0, 13))));
  const std::string st = test::make_safetensors_bytes("{}");
  EXPECT_FALSE(format_detail::looks_like_zip(as_span(st)));
  EXPECT_FALSE(format_detail::looks_like_legacy_pytorch(as_span(st)));
}

// ======================= real torch.save files =======================

constexpr const char* kPython = "/usr/bin/python3";

// Writes the checkpoints and, per tensor, NAME.bin = the raw little-endian bytes of t.contiguous().
constexpr const char* kScript = R"PY(
import collections, os, sys, zipfile
import torch
out = sys.argv[1]
def side(prefix, sd):
    for k, t in sd.items():
        if isinstance(t, torch.Tensor):
            with open(os.path.join(out, prefix + '.' + k + '.bin'), 'wb') as f:
                f.write(t.detach().contiguous().flatten().view(torch.uint8).numpy().tobytes())
def save(name, obj, sd=None, **kw):
    torch.save(obj, os.path.join(out, name + '.pt'), **kw)
    side(name, obj if sd is None else sd)
b = torch.arange(-3, 3).reshape(2, 3)
sd = collections.OrderedDict()
sd['f32'] = b.float() * 0.25
sd['f16'] = (b * 0.5).half()
sd['bf16'] = (b * 1.5).bfloat16()
sd['f64'] = b.double() / 3
sd['i64'] = b * 1000000007
sd['i32'] = b.int() * 7
sd['i16'] = b.short() * 300
sd['i8'] = b.char()
sd['u8'] = (b + 250).to(torch.uint8)
sd['bool'] = b > 0
sd['scalar'] = torch.tensor(2.5)
sd['empty'] = torch.zeros(0, 4)
save('dtypes', sd)
t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
save('shared', {'full': t, 'tail': t[1:], 'col': t[:, 1], 'tt': t.t(), 'exp': torch.arange(3.).expand(4, 3)})
g = torch.Generator().manual_seed(7)
save('big_t', {'m': torch.randn(300, 500, generator=g).t(), 'h': torch.randn(70, 40, generator=g).half().t()[::2]})
lin = torch.nn.Linear(3, 2)
save('nested_sd', {'state_dict': lin.state_dict(), 'epoch': 3, 'optimizer': {'lr': 0.1}}, lin.state_dict())
inner = {'a.weight': torch.arange(6.).reshape(2, 3), 'a.bias': torch.ones(2, dtype=torch.float64)}
save('nested_model', {'model': inner, 'step': 1}, inner)
save('mixed', {'w': torch.ones(2), 'step': 5, 'tag': 'x'})
save('param', {'p': torch.nn.Parameter(torch.arange(4.))})
save('proto4', {'w': torch.arange(5.), 'v': t.t()}, pickle_protocol=4)
save('empty_sd', {})
torch.save({'w': torch.ones(2)}, os.path.join(out, 'legacy.pt'), _use_new_zipfile_serialization=False)
with zipfile.ZipFile(os.path.join(out, 'dtypes.pt')) as src, zipfile.ZipFile(os.path.join(out, 'deflated.pt'), 'w', zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        dst.writestr(info.filename, src.read(info.filename))
)PY";

class TorchFiles : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!fs::exists(kPython) || std::system((std::string(kPython) + " -c 'import torch' >/dev/null 2>&1").c_str()) != 0) {
      skip_reason_ = new std::string(std::string(kPython) + " with torch is not installed (apt-get install python3-torch)");
      return;
    }
    dir_ = new test::TempDir();
    test::write_file(*dir_ / "make.py", kScript);
    const std::string cmd = std::string(kPython) + " " + (*dir_ / "make.py").string() + " " + dir_->path().string();
    script_status_ = std::system(cmd.c_str());
  }
  static void TearDownTestSuite() {
    delete dir_;
    dir_ = nullptr;
    delete skip_reason_;
    skip_reason_ = nullptr;
  }
  void SetUp() override {
    if (skip_reason_ != nullptr) GTEST_SKIP() << *skip_reason_;
    ASSERT_EQ(script_status_, 0) << "the torch.save script failed";
  }
  static fs::path file(const std::string& name) { return *dir_ / name; }
  // Every tensor of `f` equals its side file PREFIX.NAME.bin, read whole and in `piece`-byte pieces.
  static void expect_side_files(const PytorchFile& f, const std::string& prefix, std::size_t piece = 5) {
    for (const TensorInfo& t : f.tensors) {
      SCOPED_TRACE(t.name);
      const std::vector<std::byte> expected = bytes(test::read_file(file(prefix + "." + t.name + ".bin")));
      EXPECT_EQ(read_all(f, t), expected);
      EXPECT_EQ(read_in_pieces(f, t, piece), expected);
    }
  }
  static test::TempDir* dir_;
  static std::string* skip_reason_;
  static int script_status_;
};
test::TempDir* TorchFiles::dir_ = nullptr;
std::string* TorchFiles::skip_reason_ = nullptr;
int TorchFiles::script_status_ = -1;

TEST_F(TorchFiles, EveryDtypeWithValues) {
  const PytorchFile f = open_pytorch_file(file("dtypes.pt"));
  ASSERT_EQ(f.tensors.size(), 12u);
  const std::vector<std::pair<const char*, DType>> want = {
      {"bf16", DType::kBF16}, {"bool", DType::kBool}, {"empty", DType::kF32}, {"f16", DType::kF16},
      {"f32", DType::kF32},   {"f64", DType::kF64},   {"i16", DType::kI16},   {"i32", DType::kI32},
      {"i64", DType::kI64},   {"i8", DType::kI8},     {"scalar", DType::kF32}, {"u8", DType::kU8}};
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(f.tensors[i].name, want[i].first);
    EXPECT_EQ(f.tensors[i].dtype, want[i].second) << want[i].first;
  }
  EXPECT_EQ(f.find("f32")->shape, (std::vector<std::uint64_t>{2, 3}));
  EXPECT_TRUE(f.find("scalar")->shape.empty());
  EXPECT_EQ(f.find("empty")->shape, (std::vector<std::uint64_t>{0, 4}));
  EXPECT_EQ(f.find("empty")->num_bytes(), 0u);
  expect_side_files(f, "dtypes");
  // And by formula, independently of the script's side files: f32 = (i - 3) * 0.25, i64 = (i - 3) * 1000000007.
  std::vector<float> f32(6);
  std::vector<std::int64_t> i64(6);
  const auto b1 = read_all(f, *f.find("f32")), b2 = read_all(f, *f.find("i64"));
  std::memcpy(f32.data(), b1.data(), 24);
  std::memcpy(i64.data(), b2.data(), 48);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(f32[i], static_cast<float>(i - 3) * 0.25f);
    EXPECT_EQ(i64[i], std::int64_t{i - 3} * 1000000007);
  }
  EXPECT_TRUE(f.notes.empty());
}

TEST_F(TorchFiles, SharedStorageTransposedAndExpandedViews) {
  const PytorchFile f = open_pytorch_file(file("shared.pt"));
  ASSERT_EQ(f.tensors.size(), 5u);
  EXPECT_EQ(f.find("tt")->shape, (std::vector<std::uint64_t>{4, 3}));
  EXPECT_EQ(f.find("col")->shape, (std::vector<std::uint64_t>{3}));
  expect_side_files(f, "shared");
  const auto b = read_all(f, *f.find("tt"));
  std::vector<float> v(12);
  std::memcpy(v.data(), b.data(), 48);
  EXPECT_EQ(v, (std::vector<float>{0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11}));
}

TEST_F(TorchFiles, LargeTransposedViewsReadInBlocksAndOddPieces) {
  const PytorchFile f = open_pytorch_file(file("big_t.pt"));
  EXPECT_EQ(f.find("m")->shape, (std::vector<std::uint64_t>{500, 300}));  // 150,000 elements: several gather blocks
  EXPECT_EQ(f.find("h")->shape, (std::vector<std::uint64_t>{20, 70}));
  expect_side_files(f, "big_t", 100'003);
  expect_side_files(f, "big_t", 7);
}

TEST_F(TorchFiles, NestedStateDictAndModelKeys) {
  const PytorchFile a = open_pytorch_file(file("nested_sd.pt"));
  EXPECT_EQ(a.nested_key, "state_dict");
  ASSERT_EQ(a.tensors.size(), 2u);
  EXPECT_EQ(a.tensors[0].name, "bias");
  EXPECT_EQ(a.tensors[1].name, "weight");
  EXPECT_EQ(a.tensors[1].shape, (std::vector<std::uint64_t>{2, 3}));
  ASSERT_FALSE(a.notes.empty());
  EXPECT_THAT(a.notes[0], HasSubstr("'state_dict'"));
  expect_side_files(a, "nested_sd");
  const PytorchFile b = open_pytorch_file(file("nested_model.pt"));
  EXPECT_EQ(b.nested_key, "model");
  ASSERT_EQ(b.tensors.size(), 2u);
  EXPECT_EQ(b.find("a.bias")->dtype, DType::kF64);
  expect_side_files(b, "nested_model");
}

TEST_F(TorchFiles, NonTensorEntriesAreSkippedWithNotes) {
  const PytorchFile f = open_pytorch_file(file("mixed.pt"));
  ASSERT_EQ(f.tensors.size(), 1u);
  EXPECT_EQ(f.nested_key, "");
  ASSERT_EQ(f.notes.size(), 2u);
  EXPECT_THAT(f.notes[0], HasSubstr("'step': an int"));
  EXPECT_THAT(f.notes[1], HasSubstr("'tag': a str"));
  expect_side_files(f, "mixed");
}

TEST_F(TorchFiles, ParametersProtocol4AndEmpty) {
  const PytorchFile p = open_pytorch_file(file("param.pt"));
  ASSERT_EQ(p.tensors.size(), 1u);
  expect_side_files(p, "param");
  const PytorchFile q = open_pytorch_file(file("proto4.pt"));
  ASSERT_EQ(q.tensors.size(), 2u);
  expect_side_files(q, "proto4");
  EXPECT_TRUE(open_pytorch_file(file("empty_sd.pt")).tensors.empty());
}

TEST_F(TorchFiles, RealFilesAreDetected) {
  const std::string head = test::read_file(file("dtypes.pt")).substr(0, format_detail::kPytorchSniffBytes);
  EXPECT_TRUE(format_detail::looks_like_pytorch_zip(as_span(head)));
  const std::string legacy = test::read_file(file("legacy.pt")).substr(0, format_detail::kPytorchSniffBytes);
  EXPECT_TRUE(format_detail::looks_like_legacy_pytorch(as_span(legacy)));
  EXPECT_FALSE(format_detail::looks_like_zip(as_span(legacy)));
}

TEST_F(TorchFiles, LegacyDeflatedAndTruncatedFilesAreRefused) {
  const Error legacy = expect_error(ErrorCode::kUnsupported, [&] { open_pytorch_file(file("legacy.pt")); });
  EXPECT_THAT(legacy.what(), HasSubstr("legacy format"));
  EXPECT_THAT(legacy.what(), HasSubstr("torch.save(torch.load("));
  const Error deflated = expect_error(ErrorCode::kInvalidArchive, [&] { open_pytorch_file(file("deflated.pt")); });
  EXPECT_THAT(deflated.what(), HasSubstr("is compressed (method 8, deflate)"));
  const std::string whole = test::read_file(file("dtypes.pt"));
  const fs::path cut = test::write_file(file("cut.pt"), whole.substr(0, whole.size() * 2 / 3));
  const Error truncated = expect_error(ErrorCode::kInvalidArchive, [&] { open_pytorch_file(cut); });
  EXPECT_THAT(truncated.what(), HasSubstr("truncated"));
}

}  // namespace
}  // namespace taskvec
