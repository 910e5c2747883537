// Writes the fuzz seed corpora and dictionaries: valid inputs, one corrupt input per broken rule, and
// the regression inputs of bugs the fuzzers found. Generated at build/run time so no binary blob is
// committed. Usage: taskvec_fuzz_seeds OUT_DIR  ->  OUT_DIR/<target>/*, OUT_DIR/<target>.dict
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <iterator>
#include <stdexcept>
#include <utility>
#include <vector>

#include <unistd.h>

#include "taskvec/safetensors.hpp"

namespace {

namespace fs = std::filesystem;
using Seeds = std::vector<std::pair<std::string, std::string>>;  // (file name, bytes)

std::string le64(std::uint64_t n) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out;
}

// 8-byte N + header + data; `n` overrides N.
std::string st(const std::string& header, const std::string& data = {}, std::int64_t n = -1) {
  return le64(n < 0 ? header.size() : static_cast<std::uint64_t>(n)) + header + data;
}

std::string f32_entry(const std::string& name, const std::string& shape, std::uint64_t begin, std::uint64_t end,
                      const std::string& dtype = "F32") {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
         std::to_string(begin) + "," + std::to_string(end) + "]}";
}

Seeds safetensors_seeds() {
  Seeds s;
  const std::string w = f32_entry("w", "[2,2]", 0, 16);
  const std::string b = f32_entry("b", "[2]", 16, 24);
  const std::string d16(16, '\x01'), d24(24, '\x02');
  // valid
  s.emplace_back("valid_one", st("{" + w + "}", d16));
  s.emplace_back("valid_two_meta", st("{\"__metadata__\":{\"format\":\"pt\"}," + w + "," + b + "}", d24));
  s.emplace_back("valid_padded", st("{" + w + "}    ", d16));
  s.emplace_back("valid_empty", st("{}"));
  s.emplace_back("valid_scalar_and_zero", st("{" + f32_entry("s", "[]", 0, 4) + "," + f32_entry("z", "[0,3]", 4, 4) + "}",
                                             std::string(4, '\0')));
  s.emplace_back("valid_dtypes",
                 st("{" + f32_entry("h", "[2]", 0, 4, "F16") + "," + f32_entry("bf", "[2]", 4, 8, "BF16") + "," +
                        f32_entry("i", "[1]", 8, 16, "I64") + "," + f32_entry("q", "[2]", 16, 18, "F8_E4M3") + "," +
                        f32_entry("t", "[2]", 18, 20, "BOOL") + "," + f32_entry("d", "[1]", 20, 28, "F64") + "}",
                    std::string(28, '\0')));
  // one broken rule each
  s.emplace_back("short_file", std::string(5, '\0'));
  s.emplace_back("n_zero", st("", "", 0));
  s.emplace_back("n_seven", st("{\"a\":1}", "", 7));
  s.emplace_back("n_past_file", st("{}", "", 100));
  s.emplace_back("n_over_limit", st("{}", "", 100'000'001));
  s.emplace_back("n_huge", st("{}", "", INT64_MAX));
  s.emplace_back("not_utf8", st("{\"\xff\xfe\":{}}"));
  s.emplace_back("not_object", st("[1,2,3]"));
  s.emplace_back("truncated_json", st("{\"w\":{\"dtype\":\"F32\",\"sha"));
  s.emplace_back("nul_in_header", st(std::string("{}\0{\"x\":1}", 10)));
  s.emplace_back("duplicate_name", st("{" + w + "," + w + "}", d16));
  s.emplace_back("metadata_tensor", st("{" + f32_entry("__metadata__", "[2,2]", 0, 16) + "}", d16));
  s.emplace_back("metadata_nonstring", st("{\"__metadata__\":{\"k\":1}," + w + "}", d16));
  s.emplace_back("unknown_dtype", st("{" + f32_entry("w", "[2,2]", 0, 16, "F31") + "}", d16));
  s.emplace_back("negative_shape", st("{" + f32_entry("w", "[-2,2]", 0, 16) + "}", d16));
  s.emplace_back("float_shape", st("{" + f32_entry("w", "[2.5,2]", 0, 16) + "}", d16));
  s.emplace_back("shape_overflow", st("{" + f32_entry("w", "[9007199254740992,9007199254740992,4]", 0, 16) + "}", d16));
  s.emplace_back("shape_over_2_53", st("{" + f32_entry("w", "[18446744073709551615]", 0, 16) + "}", d16));
  s.emplace_back("begin_after_end", st("{" + f32_entry("w", "[2,2]", 16, 0) + "}", d16));
  s.emplace_back("gap", st("{" + f32_entry("w", "[2,2]", 0, 16) + "," + f32_entry("b", "[2]", 20, 28) + "}", d24 + "xxxx"));
  s.emplace_back("overlap", st("{" + f32_entry("w", "[2,2]", 0, 16) + "," + f32_entry("b", "[2]", 8, 16) + "}", d16));
  s.emplace_back("past_end", st("{" + f32_entry("w", "[2,2]", 0, 16) + "}", std::string(8, '\0')));
  s.emplace_back("trailing", st("{" + w + "}", d24));
  s.emplace_back("size_mismatch", st("{" + f32_entry("w", "[2,3]", 0, 16) + "}", d16));
  s.emplace_back("subbyte_dtype", st("{" + f32_entry("w", "[3]", 0, 2, "F4") + "}", "ab"));
  s.emplace_back("control_in_name", st("{" + f32_entry("a\\u0001b", "[2,2]", 0, 16) + "}", d16));
  s.emplace_back("nul_in_name", st("{" + f32_entry("a\\u0000b", "[2,2]", 0, 16) + "}", d16));
  s.emplace_back("offsets_not_array", st("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":16}}", d16));
  s.emplace_back("deep_nesting", st("{\"w\":" + std::string(200, '[') + std::string(200, ']') + "}"));
  s.emplace_back("unknown_field", st("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16],\"x\":[]}}", d16));
  // A file from the real writer (sorted keys, padded header, alignment order).
  {
    const fs::path tmp = fs::temp_directory_path() / ("taskvec-seed-" + std::to_string(::getpid()) + ".safetensors");
    std::vector<std::pair<taskvec::TensorSpec, std::vector<std::byte>>> tensors;
    tensors.push_back({{"model.layers.0.w", taskvec::DType::kBF16, {2, 3}}, std::vector<std::byte>(12, std::byte{7})});
    tensors.push_back({{"model.embed.weight", taskvec::DType::kF32, {4}}, std::vector<std::byte>(16, std::byte{1})});
    tensors.push_back({{"pos", taskvec::DType::kI64, {2}}, std::vector<std::byte>(16, std::byte{0})});
    taskvec::write_safetensors(tmp, tensors, {{"format", "pt"}});
    std::ifstream in(tmp, std::ios::binary);
    s.emplace_back("valid_writer", std::string(std::istreambuf_iterator<char>(in), {}));
    fs::remove(tmp);
  }
  return s;
}

Seeds index_seeds() {
  Seeds s;
  const std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors";
  s.emplace_back("valid", R"({"metadata":{"total_size":16},"weight_map":{"a.weight":")" + s1 + R"(","b.weight":")" + s2 + "\"}}");
  s.emplace_back("valid_sub", R"({"weight_map":{"c.weight":"sub/model.safetensors"}})");
  s.emplace_back("valid_meta_types", R"({"metadata":{"total_size":16,"x":[1,{"y":null}]},"weight_map":{"a.weight":")" + s1 +
                                         R"(","b.weight":")" + s2 + "\"}}");
  s.emplace_back("shard_missing", R"({"weight_map":{"a.weight":"model-00001-of-00003.safetensors"}})");
  s.emplace_back("tensor_in_two", R"({"weight_map":{"a.weight":")" + s1 + R"(","b.weight":")" + s1 + "\"}}");
  s.emplace_back("tensor_lacking", R"({"weight_map":{"a.weight":")" + s1 + R"(","z.weight":")" + s1 + "\"}}");
  s.emplace_back("tensor_unlisted", R"({"weight_map":{"a.weight":")" + s1 + "\"}, \"x\": 1}");
  s.emplace_back("dotdot", R"({"weight_map":{"x.weight":"../outside.safetensors"}})");
  s.emplace_back("dotdot_inner", R"({"weight_map":{"c.weight":"sub/../../outside.safetensors"}})");
  s.emplace_back("absolute", R"({"weight_map":{"x.weight":"/etc/passwd"}})");
  s.emplace_back("dot", R"({"weight_map":{"x.weight":"."}})");
  s.emplace_back("index_itself", R"({"weight_map":{"x.weight":"model.safetensors.index.json"}})");
  s.emplace_back("empty_name", R"({"weight_map":{"x.weight":""}})");
  s.emplace_back("control_name", R"({"weight_map":{"x.weight":"a\u0001b"}})");
  s.emplace_back("not_string", R"({"weight_map":{"a.weight":1}})");
  s.emplace_back("no_weight_map", R"({"metadata":{}})");
  s.emplace_back("weight_map_array", R"({"weight_map":[]})");
  s.emplace_back("metadata_array", R"({"metadata":[],"weight_map":{}})");
  s.emplace_back("empty_map", R"({"weight_map":{}})");
  s.emplace_back("not_object", R"([])");
  s.emplace_back("truncated", R"({"weight_map":{"a.weight":"model-0)");
  s.emplace_back("duplicate_key", R"({"weight_map":{"a.weight":")" + s1 + R"(","a.weight":")" + s1 + "\"}}");
  s.emplace_back("not_utf8", "{\"weight_map\":{\"\xc3\x28\":\"x\"}}");
  return s;
}

Seeds expression_seeds() {
  const std::vector<std::string> texts = {
      "pre + 0.4*(tau(a) + tau(b))", "pre - 0.7*tau(toxic)", "pre + tau(a) + (tau(b) - tau(toxic))",
      "0.5*a + 0.5*b", "pre", "-(-pre)", "pre + a*b", "pre/a", "pre + 1", "pre + 1e308*1e308*tau(a)",
      "2*(pre - 0.5*(a+b))/2 + a", "tau(", "tau(a", "tau()", "pre + 0x10*tau(a)", "pre + .5e-3*tau(m2)",
      "pre + tau(tau_x)", "(((pre)))", "pre - pre", "pre/0", "pre + nope", "pre + 1e-320*tau(a)/1e-320",
  };
  Seeds s;
  for (std::size_t i = 0; i < texts.size(); ++i) s.emplace_back("expr_" + std::to_string(i), texts[i]);
  // Regressions found by fuzz_expression: coefficients overflowing to Inf/NaN; stack overflow on deep
  // nesting of parentheses and signs (now kExpression past 256 levels).
  s.emplace_back("regress_inf_coefficient", "2*(pre - 01e308*(a+b) )- 0.+ a");
  s.emplace_back("regress_nan_coefficient", "pre + 1e308*1e308*tau(a) - 1e308*1e308*tau(a)");
  s.emplace_back("regress_deep_parens", std::string(30000, '(') + "pre" + std::string(30000, ')'));
  s.emplace_back("regress_deep_minus", std::string(60000, '-') + "pre");
  s.emplace_back("ok_nesting_200", std::string(200, '(') + "pre" + std::string(200, ')'));
  return s;
}

Seeds recipe_seeds() {
  const std::vector<std::string> texts = {
      "merge_method: ties\nbase_model: base.safetensors\nmodels:\n  - model: a.safetensors\n    parameters: {weight: 0.7, "
      "density: 0.4}\n  - model: /abs/b.safetensors\nparameters:\n  lambda: 0.9\n  density: 0.3\n  disjoint: sum\n"
      "dtype: bfloat16\nout_dtype: float16\nseed: 17\n",
      "merge_method: linear\nmodels: [a.safetensors, b.safetensors]\nparameters: {normalize: true}\n",
      "merge_method: slerp\nmodels:\n  - a\n  - b\nparameters:\n  t: [0, 0.5, 1]\n",
      "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: a\n    parameters:\n      weight:\n        - filter: "
      "mlp\n          value: [0.2, 0.8]\n        - value: 0.5\n      density: 0.5\n",
      "merge_method: della\nbase_model: b\nmodels: [{model: a, parameters: {epsilon: 0.2, density: 0.5}}]\n",
      "merge_method: consensus\nbase_model: b\nmodels: [x, y, z]\nparameters: {k: 2, lambda: 1.5}\n",
      "merge_method: breadcrumbs_ties\nbase_model: b\nmodels: [x]\nparameters: {gamma: 0.01, density: 0.9}\n",
      "merge_method: model_stock\nbase_model: b\nmodels: [x, y]\n",
      "merge_method: tsv_merge\nbase_model: b\nmodels: [x, y]\nparameters: {lambda: 1}\n",
      "merge_method: iso_c\nbase_model: b\nmodels: [x, y]\n",
      "merge_method: magnitude_prune\nbase_model: b\nmodels: [x]\nparameters: {rescale: true}\n",
      "merge_method: task_arithmetic\nbase_model: &b base\nmodels: [*b]\n",
      "merge_method: ties\nbase_model: b\nmodels: [x]\nparameters: {trim: model, density: 1.5}\n",
      "merge_method: ties\nbase_model: b\nmodels:\n  - model: x\n    parameters:\n      weight: [{filter: '(', value: 1}]\n",
      "merge_method: nope\nmodels: [x]\n",
      "merge_method: linear\nmodels: [x]\nparameters: {normalize: true, weight: 0}\n",
      "? [complex, key]\n: value\nmerge_method: linear\nmodels: [x]\n",
      "merge_method: linear\nmodels:\n  - {? [k]: v, model: x}\n",
      "[1, 2",
      "{",
      "merge_method: linear\nmodels: [x]\nseed: -1\n",
      "merge_method: linear\nmodels: [x]\nseed: 1e99\n",
  };
  Seeds s;
  for (std::size_t i = 0; i < texts.size(); ++i) s.emplace_back("recipe_" + std::to_string(i), texts[i]);
  // Regressions found by fuzz_recipe: a non-scalar mapping key (recipe_16, recipe_17 above) escaped as
  // YAML::TypedBadConversion; a filter nested thousands of groups deep overflows the stack in the
  // std::regex compiler.
  s.emplace_back("regress_deep_filter", "merge_method: ties\nbase_model: b\nmodels: [x]\nparameters:\n  lambda: [{filter: \"" +
                                            std::string(20000, '(') + "a" + std::string(20000, ')') + "\", value: 1}]\n");
  return s;
}

// ---- fuzz_pickle: torch data.pkl streams and zip archives, built by hand like the tests do ----

std::string le(std::uint64_t v, int n) {
  std::string out;
  for (int i = 0; i < n; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return out;
}
std::string uni(const std::string& s) { return "X" + le(s.size(), 4) + s; }
std::string glob(const std::string& m, const std::string& n) { return "c" + m + "\n" + n + "\n"; }
std::string k1(int v) { return std::string("K") + static_cast<char>(v); }
std::string odict() { return glob("collections", "OrderedDict") + ")R"; }

// "name": _rebuild_tensor_v2(('storage', torch.<cls>, key, 'cpu', numel), offset, shape, stride, False, OrderedDict())
std::string pkl_tensor(const std::string& name, const std::string& cls, const std::string& key, int numel, int offset,
                       const std::string& shape, const std::string& stride) {
  return uni(name) + glob("torch._utils", "_rebuild_tensor_v2") + "((" + uni("storage") + glob("torch", cls) + uni(key) +
         uni("cpu") + k1(numel) + "tQ" + k1(offset) + shape + stride + "\x89" + odict() + "tR";
}

std::string zip_of(const std::vector<std::pair<std::string, std::string>>& entries, std::uint16_t method = 0) {
  std::string out, cd;
  for (const auto& [name, data] : entries) {
    const std::uint64_t off = out.size();
    out += "PK\x03\x04" + le(20, 2) + le(0x0808, 2) + le(method, 2) + le(0, 8) + le(0, 8) + le(name.size(), 2) + le(0, 2) + name + data;
    out += "PK\x07\x08" + le(0, 4) + le(data.size(), 4) + le(data.size(), 4);
    cd += "PK\x01\x02" + le(20, 2) + le(20, 2) + le(0x0808, 2) + le(method, 2) + le(0, 8) + le(data.size(), 4) + le(data.size(), 4) +
          le(name.size(), 2) + le(0, 8) + le(0, 4) + le(off, 4) + name;
  }
  const std::uint64_t cd_off = out.size(), n = entries.size();
  out += cd;
  const std::uint64_t rec = out.size();
  out += "PK\x06\x06" + le(44, 8) + le(45, 2) + le(45, 2) + le(0, 8) + le(n, 8) + le(n, 8) + le(cd.size(), 8) + le(cd_off, 8);
  out += "PK\x06\x07" + le(0, 4) + le(rec, 8) + le(1, 4);
  out += "PK\x05\x06" + le(0, 4) + le(n, 2) + le(n, 2) + le(cd.size(), 4) + le(cd_off, 4) + le(0, 2);
  return out;
}

Seeds pickle_seeds() {
  const std::string P = "\x80\x02";
  const std::string w = pkl_tensor("w", "FloatStorage", "0", 12, 0, "(K\x03K\x04t", "(K\x04K\x01t");
  const std::string wt = pkl_tensor("w_t", "FloatStorage", "0", 12, 0, "(K\x04K\x03t", "(K\x01K\x04t");
  const std::string h = pkl_tensor("h", "HalfStorage", "1", 2, 0, "(K\x02t", "(K\x01t");
  const std::string sd = P + odict() + "(" + w + wt + h + "u.";
  Seeds s;
  s.emplace_back("valid_state_dict", sd);
  s.emplace_back("valid_module_metadata", P + odict() + "(" + w + "u}(" + uni("_metadata") + odict() + "ub.");
  s.emplace_back("valid_nested", P + "}(" + uni("state_dict") + odict() + "(" + w + "u" + uni("epoch") + k1(3) + "u.");
  s.emplace_back("valid_parameter", P + "}(" + uni("p") + glob("torch._utils", "_rebuild_parameter") + "(" +
                                        pkl_tensor("", "FloatStorage", "0", 4, 0, "(K\x04t", "(K\x01t").substr(5) + "\x88" + odict() + "tRu.");
  s.emplace_back("valid_memo", P + "}(" + w + "q\x07" + uni("v") + "h\x07u.");
  s.emplace_back("proto4_no_tensors", "\x80\x04\x95" + le(9, 8) + "}\x94(\x8c\x01\x61K\x01u.");
  s.emplace_back("no_tensors_long_float", P + "}(" + uni("x") + "\x8a\x05\x01\x02\x03\x04\x85" + uni("f") + "G?\xf0" + le(0, 6) + "u.");
  s.emplace_back("evil_os_system", P + glob("os", "system") + uni("id") + "\x85R.");
  s.emplace_back("evil_stack_global", "\x80\x04\x8c\x02os\x8c\x06system\x93" + uni("id") + "\x85R.");
  s.emplace_back("evil_reduce_storage", P + glob("torch", "FloatStorage") + ")R.");
  s.emplace_back("evil_inst", P + "ios\nsystem\n(S'id'\n.");
  s.emplace_back("huge_memo", P + "}r\xff\xff\xff\xff.");
  s.emplace_back("self_list", P + "}(" + uni("l") + "]q\x01h\x01" + "au.");
  s.emplace_back("deep_marks", P + std::string(2000, '(') + ".");
  s.emplace_back("truncated", sd.substr(0, sd.size() / 2));
  s.emplace_back("long_string", P + "X\xff\xff\xff\x7f" + "abc.");
  const std::string f12(48, '\x01'), f2(4, '\x02');
  s.emplace_back("zip_valid", zip_of({{"m/data.pkl", sd}, {"m/data/0", f12}, {"m/data/1", f2}, {"m/version", "3\n"}}));
  s.emplace_back("zip_dotdot", zip_of({{"../evil", "x"}}));
  s.emplace_back("zip_deflated", zip_of({{"m/data.pkl", "x"}}, 8));
  const std::string z = zip_of({{"m/data.pkl", sd}});
  s.emplace_back("zip_truncated", z.substr(0, z.size() - 5));
  return s;
}

const char* kJsonDict = R"D("{"
"}"
"["
"]"
":"
","
"\"dtype\""
"\"shape\""
"\"data_offsets\""
"\"__metadata__\""
"\"F32\""
"\"F16\""
"\"BF16\""
"\"F64\""
"\"I64\""
"\"BOOL\""
"\"F8_E4M3\""
"\"F4\""
"\"weight_map\""
"\"metadata\""
"\"total_size\""
"\"model-00001-of-00002.safetensors\""
"\"model-00002-of-00002.safetensors\""
"\"sub/model.safetensors\""
"\"../\""
"\"a.weight\""
"\"b.weight\""
"\"c.weight\""
"9007199254740992"
"18446744073709551615"
"-1"
"\"\\u0000\""
)D";

const char* kExpressionDict = R"D("tau("
"pre"
"toxic"
"tau_x"
"m2"
"*"
"/"
"+"
"-"
"("
")"
"1e308"
"0.5"
)D";

const char* kRecipeDict = R"D("merge_method: "
"base_model: "
"models:"
"parameters:"
"dtype: "
"out_dtype: "
"seed: "
"model: "
"filter: "
"value: "
"weight"
"density"
"gamma"
"epsilon"
"lambda"
"normalize"
"rescale"
"disjoint"
"trim"
"tall_lambda"
"ties"
"dare_ties"
"della"
"slerp"
"linear"
"consensus"
"- "
"{"
"["
"&a"
"*a"
"? "
)D";

const char* kPickleDict = R"D("\x80\x02"
"\x80\x04"
"ccollections\x0aOrderedDict\x0a"
"ctorch._utils\x0a_rebuild_tensor_v2\x0a"
"ctorch._utils\x0a_rebuild_parameter\x0a"
"ctorch\x0aFloatStorage\x0a"
"ctorch\x0aHalfStorage\x0a"
"ctorch\x0aBFloat16Storage\x0a"
"ctorch\x0aLongStorage\x0a"
"X\x07\x00\x00\x00storage"
"X\x03\x00\x00\x00cpu"
"X\x01\x00\x00\x000"
"\x8c\x01a"
"\x8a\x08"
"r\xff\xff\xff\xff"
"j\x00\x00\x00\x00"
"q\x00"
"h\x00"
")R"
"tQ"
"tR"
"\x89"
"\x88"
"\x85"
"\x86"
"\x87"
"\x93"
"\x94"
"\x95"
"PK\x03\x04"
"PK\x01\x02"
"PK\x05\x06"
"PK\x06\x06"
"PK\x06\x07"
"PK\x07\x08"
"/data.pkl"
"/data/0"
"\xff\xff\xff\xff"
)D";

void write(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path.string());
}

void write_corpus(const fs::path& out, const std::string& target, const Seeds& seeds, const char* dict) {
  fs::create_directories(out / target);
  for (const auto& [name, bytes] : seeds) write(out / target / name, bytes);
  write(out / (target + ".dict"), dict);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const fs::path out = argv[1];
  write_corpus(out, "fuzz_safetensors_header", safetensors_seeds(), kJsonDict);
  write_corpus(out, "fuzz_index", index_seeds(), kJsonDict);
  write_corpus(out, "fuzz_expression", expression_seeds(), kExpressionDict);
  write_corpus(out, "fuzz_recipe", recipe_seeds(), kRecipeDict);
  write_corpus(out, "fuzz_pickle", pickle_seeds(), kPickleDict);
  return 0;
}
