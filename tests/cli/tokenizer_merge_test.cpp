// mergekit's tokenizer merge end to end (`tokenizer_source`, `tokenizer:`, `chat_template`), on
// generated Llama-shaped folders with Hugging Face tokenizer files: a ChatML fine-tune (two added tokens,
// 18 rows against the base's 16) merges with `tokenizer_source: union` and the output loads in PyTorch
// with load_state_dict(strict=True) from its own config.json; rows are taken by token, not by row index;
// `base`, a model as source, forced / model_token / zero rows and pad_to_multiple_of give the rows
// mergekit's rules give (computed here from the inputs); the recipe snippets of mergekit's README with
// these keys run as written (model paths replaced).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "cli/cli_run.hpp"
#include "support/model_files.hpp"
#include "support/temp_dir.hpp"
#include "taskvec/checkpoint.hpp"
#include "taskvec/dtype.hpp"

namespace taskvec {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;
using test::read_text;
using test::read_values;
using test::Result;
using test::run;
using test::TempDir;
using test::TensorValues;

constexpr int kLayers = 2, kHidden = 8, kInter = 12;
constexpr const char* kEmbed = "model.embed_tokens.weight";
constexpr const char* kHead = "lm_head.weight";
constexpr const char* kPython = "/usr/bin/python3";

// The 16 tokens every model has (ids 0-15): <unk>, <s>, </s> as Llama's added special tokens, then
// plain BPE tokens.
std::vector<std::string> base_tokens() {
  std::vector<std::string> t = {"<unk>", "<s>", "</s>"};
  for (char c = 'a'; t.size() < 16; ++c) t.push_back(std::string(1, c));
  return t;
}

struct Vocabulary {
  std::vector<std::string> tokens;  // by id
  std::vector<std::string> added;   // the added tokens among them (special)
  int vocab_size = 0;               // config.json vocab_size = embedding rows
};

// Reference values of a checkpoint, by tensor name (as written: bf16 on a grid it holds exactly).
using Values = std::map<std::string, std::vector<double>>;

class TokenizerMerge : public ::testing::Test {
 protected:
  TempDir dir;
  std::map<std::string, Values> values;      // model -> tensor -> values
  std::map<std::string, Vocabulary> vocabs;  // model -> its vocabulary

  void make_model(const std::string& name, const Vocabulary& v, unsigned seed,
                  const std::string& chat_template = "") {
    std::mt19937 gen(seed);
    std::uniform_int_distribution<int> q(-64, 64);
    std::vector<TensorValues> tensors;
    auto tensor = [&](const std::string& n, std::vector<std::uint64_t> shape) {
      std::uint64_t count = 1;
      for (auto d : shape) count *= d;
      std::vector<double> x(count);
      for (auto& e : x) e = q(gen) / 64.0;
      values[name][n] = x;
      tensors.push_back(TensorValues{n, DType::kBF16, std::move(shape), std::move(x)});
    };
    const std::uint64_t h = kHidden, m = kInter, rows = static_cast<std::uint64_t>(v.vocab_size);
    tensor(kEmbed, {rows, h});
    for (int l = 0; l < kLayers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) tensor(p + "self_attn." + proj + ".weight", {h, h});
      tensor(p + "mlp.gate_proj.weight", {m, h});
      tensor(p + "mlp.up_proj.weight", {m, h});
      tensor(p + "mlp.down_proj.weight", {h, m});
      tensor(p + "input_layernorm.weight", {h});
      tensor(p + "post_attention_layernorm.weight", {h});
    }
    tensor("model.norm.weight", {h});
    tensor(kHead, {rows, h});
    fs::create_directories(dir / name);
    test::write_model(dir / name / "model.safetensors", tensors);
    Json config = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", kHidden},
                   {"intermediate_size", kInter}, {"num_hidden_layers", kLayers}, {"num_attention_heads", 2},
                   {"num_key_value_heads", 2}, {"vocab_size", v.vocab_size}, {"torch_dtype", "bfloat16"},
                   {"tie_word_embeddings", false}, {"rms_norm_eps", 1e-5}};
    std::ofstream(dir / name / "config.json") << config.dump(2);
    Json vocab = Json::object(), added = Json::array(), decoder = Json::object();
    for (std::size_t id = 0; id < v.tokens.size(); ++id) {
      const std::string& t = v.tokens[id];
      if (std::find(v.added.begin(), v.added.end(), t) == v.added.end()) {
        vocab[t] = id;
        continue;
      }
      const Json e = {{"content", t}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
                      {"normalized", false}, {"special", true}};
      Json with_id = e;
      with_id["id"] = id;
      added.push_back(with_id);
      decoder[std::to_string(id)] = e;
    }
    const Json tokenizer = {{"version", "1.0"}, {"added_tokens", added},
                            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", Json::array()}}}};
    std::ofstream(dir / name / "tokenizer.json") << tokenizer.dump(2);
    Json tc = {{"added_tokens_decoder", decoder}, {"bos_token", "<s>"}, {"eos_token", "</s>"},
               {"tokenizer_class", "LlamaTokenizer"}};
    if (!chat_template.empty()) tc["chat_template"] = chat_template;
    std::ofstream(dir / name / "tokenizer_config.json") << tc.dump(2);
    std::ofstream(dir / name / "special_tokens_map.json") << R"({"bos_token": "<s>", "eos_token": "</s>"})";
    vocabs[name] = v;
  }

  void SetUp() override {
    const std::vector<std::string> llama_added = {"<unk>", "<s>", "</s>"};
    Vocabulary base{base_tokens(), llama_added, 16};
    make_model("base", base, 1, "{{ base template }}");
    make_model("math", base, 2, "{% for m in messages %}{{ m['content'] }}{% endfor %}");
    Vocabulary chatml = base;
    for (const char* t : {"<|im_start|>", "<|im_end|>"}) {
      chatml.tokens.push_back(t);
      chatml.added.push_back(t);
    }
    chatml.vocab_size = 18;
    make_model("chatml", chatml, 3, "{% for m in messages %}{{ m['content'] }}{% endfor %}");
    Vocabulary swapped = base;  // the same tokens, "a" and "b" at each other's ids
    std::swap(swapped.tokens[3], swapped.tokens[4]);
    make_model("swapped", swapped, 4);
    Vocabulary padded = base;  // four tokens past vocab_size: unused padding, not part of the vocabulary
    for (int i = 0; i < 4; ++i) {
      padded.tokens.push_back("<UNUSED_" + std::to_string(i) + ">");
      padded.added.push_back(padded.tokens.back());
    }
    padded.vocab_size = 16;
    make_model("padded", padded, 5);
    Vocabulary llama3 = base;
    for (const char* t : {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}) {
      llama3.tokens.push_back(t);
      llama3.added.push_back(t);
    }
    llama3.vocab_size = 19;
    make_model("llama3", llama3, 6);
    Vocabulary special = base;
    for (const char* t : {"<|special|>", "<|original_token|>"}) {
      special.tokens.push_back(t);
      special.added.push_back(t);
    }
    special.vocab_size = 18;
    make_model("special", special, 7);
  }

  Result merge(const std::string& yaml, const std::string& out, const std::string& flags = "") {
    std::ofstream(dir / "recipe.yml") << yaml;
    return run("merge -q recipe.yml " + out + " " + flags, dir);
  }

  // Row `row` of tensor `t` of a model's reference values.
  std::vector<double> row(const std::string& model, const std::string& t, int r) const {
    const auto& v = values.at(model).at(t);
    return {v.begin() + r * kHidden, v.begin() + (r + 1) * kHidden};
  }
  int id(const std::string& model, const std::string& token) const {
    const auto& t = vocabs.at(model).tokens;
    return static_cast<int>(std::find(t.begin(), t.end(), token) - t.begin());
  }
  static std::vector<double> out_row(const fs::path& out, const std::string& t, int r) {
    const auto v = read_values(out, t);
    return {v.begin() + r * kHidden, v.begin() + (r + 1) * kHidden};
  }
  // The output's vocabulary from its tokenizer.json: token -> id (model.vocab and added_tokens).
  static std::map<std::string, int> out_vocab(const fs::path& out) {
    const Json j = Json::parse(read_text(out / "tokenizer.json"));
    std::map<std::string, int> v;
    for (const auto& [t, i] : j["model"]["vocab"].items()) v[t] = i.get<int>();
    for (const auto& e : j["added_tokens"]) v[e["content"].get<std::string>()] = e["id"].get<int>();
    return v;
  }
};

// The element-wise mean of rows (what linear with equal weights gives), in f64.
std::vector<double> mean_of(const std::vector<std::vector<double>>& rows) {
  std::vector<double> m(rows.front().size(), 0.0);
  for (const auto& r : rows)
    for (std::size_t k = 0; k < m.size(); ++k) m[k] += r[k] / static_cast<double>(rows.size());
  return m;
}

void expect_near(const std::vector<double>& got, const std::vector<double>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-6) << what << " element " << i;
}

// The strict-loading check: a torch module built from the output's config.json (a Llama of its
// vocab_size, hidden_size, layers and heads) takes the output's tensors with load_state_dict(strict=True),
// and every token id of its tokenizer files is a row of the embedding.
constexpr const char* kStrictLoad = R"PY(
import json, os, struct, sys
import torch
from torch import nn
out = sys.argv[1]
cfg = json.load(open(os.path.join(out, 'config.json')))
V, H, I, L = cfg['vocab_size'], cfg['hidden_size'], cfg['intermediate_size'], cfg['num_hidden_layers']
heads, kv = cfg['num_attention_heads'], cfg['num_key_value_heads']
hd = H // heads
class Norm(nn.Module):
    def __init__(self): super().__init__(); self.weight = nn.Parameter(torch.ones(H))
class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(H, heads * hd, bias=False); self.k_proj = nn.Linear(H, kv * hd, bias=False)
        self.v_proj = nn.Linear(H, kv * hd, bias=False); self.o_proj = nn.Linear(heads * hd, H, bias=False)
class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=False); self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn(); self.mlp = Mlp(); self.input_layernorm = Norm(); self.post_attention_layernorm = Norm()
class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H); self.layers = nn.ModuleList([Layer() for _ in range(L)]); self.norm = Norm()
class Llama(nn.Module):
    def __init__(self):
        super().__init__(); self.model = Inner(); self.lm_head = nn.Linear(H, V, bias=False)
dtypes = {'BF16': torch.bfloat16, 'F16': torch.float16, 'F32': torch.float32}
state = {}
files = [f for f in os.listdir(out) if f.endswith('.safetensors')]
for f in files:
    data = open(os.path.join(out, f), 'rb').read()
    n = struct.unpack('<Q', data[:8])[0]
    header = json.loads(data[8:8 + n])
    for name, e in header.items():
        if name == '__metadata__': continue
        b, end = e['data_offsets']
        t = torch.frombuffer(bytearray(data[8 + n + b:8 + n + end]), dtype=dtypes[e['dtype']]).reshape(e['shape'])
        state[name] = t
model = Llama()
model.load_state_dict(state, strict=True)
ids = []
tok = json.load(open(os.path.join(out, 'tokenizer.json')))
ids += list(tok['model']['vocab'].values()) + [e['id'] for e in tok['added_tokens']]
tc = json.load(open(os.path.join(out, 'tokenizer_config.json')))
ids += [int(k) for k in tc.get('added_tokens_decoder', {})]
assert max(ids) < V, (max(ids), V)
assert len(set(tok['model']['vocab'].values()) | {e['id'] for e in tok['added_tokens']}) == V, 'ids are not 0..V-1'
logits = model.lm_head(model.model.embed_tokens(torch.tensor([V - 1])).float())
print('strict load ok', V, tuple(logits.shape))
)PY";

bool have_torch() {
  return fs::exists(kPython) && std::system((std::string(kPython) + " -c 'import torch' >/dev/null 2>&1").c_str()) == 0;
}

// The issue's case: a ChatML fine-tune (vocab 18) and a fine-tune of the base's vocabulary (16) merge
// onto the base with task_arithmetic. The output has 18 rows; rows 0-15 are base + sum w (ft - base) of
// the same token; the ChatML tokens' rows are the ChatML model's (the base and the other fine-tune lack
// them and get that row as their default, so their task vectors are zero there).
TEST_F(TokenizerMerge, ChatmlFineTuneMergesWithUnionAndLoadsStrictInTorch) {
  const std::string recipe = R"(merge_method: task_arithmetic
base_model: base
models:
  - model: chatml
    parameters: {weight: 0.5}
  - model: math
    parameters: {weight: 0.5}
tokenizer_source: union
out_dtype: float32
)";
  // Without a tokenizer merge, the shapes differ and the merge is refused.
  {
    std::string plain = recipe;
    plain.erase(plain.find("tokenizer_source"), std::string("tokenizer_source: union\n").size());
    const Result r = merge(plain, "refused");
    EXPECT_NE(r.status, 0);
    EXPECT_FALSE(fs::exists(dir / "refused" / "model.safetensors"));
  }
  const Result r = merge(recipe, "out");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "out";
  const auto config = Json::parse(read_text(out / "config.json"));
  EXPECT_EQ(config["vocab_size"], 18);
  EXPECT_EQ(config["torch_dtype"], "float32");
  const auto vocab = out_vocab(out);
  EXPECT_EQ(vocab.size(), 18u);
  EXPECT_EQ(vocab.at("<|im_start|>"), 16);
  EXPECT_EQ(vocab.at("<|im_end|>"), 17);
  const Json tj = Json::parse(read_text(out / "tokenizer.json"));
  bool special = false;
  for (const auto& e : tj["added_tokens"])
    if (e["content"] == "<|im_end|>") special = e["special"].get<bool>() && e["id"] == 17;
  EXPECT_TRUE(special) << tj["added_tokens"].dump();
  const Json tc = Json::parse(read_text(out / "tokenizer_config.json"));
  EXPECT_EQ(tc["added_tokens_decoder"]["16"]["content"], "<|im_start|>");
  EXPECT_EQ(tc["added_tokens_decoder"]["17"]["content"], "<|im_end|>");
  EXPECT_EQ(tc["bos_token"], "<s>");
  for (const char* t : {kEmbed, kHead}) {
    EXPECT_EQ(Checkpoint::open(out).at(t).info->shape, (std::vector<std::uint64_t>{18, kHidden}));
    for (int r0 = 0; r0 < 16; ++r0) {
      std::vector<double> want(kHidden);
      for (int k = 0; k < kHidden; ++k) {
        const double b = row("base", t, r0)[k];
        want[k] = b + 0.5 * (row("chatml", t, r0)[k] - b) + 0.5 * (row("math", t, r0)[k] - b);
      }
      expect_near(out_row(out, t, r0), want, std::string(t) + " row " + std::to_string(r0));
    }
    for (int r0 : {16, 17}) expect_near(out_row(out, t, r0), row("chatml", t, r0), std::string(t) + " ChatML row");
  }
  // A tensor outside the vocabulary is merged as always.
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  std::vector<double> want(values["base"][q].size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double b = values["base"][q][i];
    want[i] = b + 0.5 * (values["chatml"][q][i] - b) + 0.5 * (values["math"][q][i] - b);
  }
  expect_near(read_values(out, q), want, q);

  if (!have_torch()) GTEST_SKIP() << kPython << " with torch is not installed (apt-get install python3-torch)";
  std::ofstream(dir / "strict.py") << kStrictLoad;
  const std::string cmd = std::string(kPython) + " " + (dir / "strict.py").string() + " " + out.string() + " > " +
                          (dir / "strict.txt").string() + " 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << read_text(dir / "strict.txt");
  EXPECT_NE(read_text(dir / "strict.txt").find("strict load ok 18"), std::string::npos) << read_text(dir / "strict.txt");
}

// A row means a token, not a row index: "a" and "b" sit at each other's ids in `swapped`, and linear
// averages the rows of the same token.
TEST_F(TokenizerMerge, RowsAreTakenByTokenNotByIndex) {
  const Result r = merge(R"(merge_method: linear
models:
  - model: base
    parameters: {weight: 1}
  - model: swapped
    parameters: {weight: 1}
tokenizer_source: union
out_dtype: float32
)", "out");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "out";
  EXPECT_EQ(Json::parse(read_text(out / "config.json"))["vocab_size"], 16);
  for (const std::string token : {"a", "b", "c", "<s>"}) {
    const int o = out_vocab(out).at(token);
    EXPECT_EQ(o, id("base", token)) << token;  // the base's ids come first
    expect_near(out_row(out, kEmbed, o), mean_of({row("base", kEmbed, id("base", token)), row("swapped", kEmbed, id("swapped", token))}),
                token);
  }
  EXPECT_NE(id("base", "a"), id("swapped", "a"));
}

// `base`: the base's vocabulary; the ChatML model's extra rows are left out, and the tokenizer files are
// the base's, byte for byte. Tokens past a model's vocab_size (padding) are not part of the union.
TEST_F(TokenizerMerge, SourceBaseKeepsTheBaseVocabularyAndUnionSkipsPadding) {
  Result r = merge(R"(merge_method: task_arithmetic
base_model: base
models:
  - model: chatml
tokenizer_source: base
out_dtype: float32
)", "out");
  ASSERT_EQ(r.status, 0) << r.err;
  fs::path out = dir / "out";
  EXPECT_EQ(Json::parse(read_text(out / "config.json"))["vocab_size"], 16);
  EXPECT_EQ(read_text(out / "tokenizer.json"), read_text(dir / "base" / "tokenizer.json"));
  EXPECT_EQ(Checkpoint::open(out).at(kHead).info->shape[0], 16u);
  expect_near(out_row(out, kHead, 15), row("chatml", kHead, 15), "task vector of weight 1");

  r = merge(R"(merge_method: linear
base_model: base
models:
  - model: base
    parameters: {weight: 1}
  - model: padded
    parameters: {weight: 1}
  - model: chatml
    parameters: {weight: 1}
tokenizer:
  source: union
out_dtype: float32
)", "union");
  ASSERT_EQ(r.status, 0) << r.err;
  // padded's tokens past its vocab_size are padding the merge leaves out, not a finding.
  EXPECT_EQ(r.err.find("past the embedding"), std::string::npos) << r.err;
  out = dir / "union";
  const auto vocab = out_vocab(out);
  EXPECT_EQ(vocab.size(), 18u);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(vocab.count("<UNUSED_" + std::to_string(i) + ">"), 0u);
  // <|im_start|>: the base lacks it, so the one model that has it gives its row to every model: the mean
  // is the ChatML row.
  expect_near(out_row(out, kEmbed, 16), row("chatml", kEmbed, 16), "<|im_start|>");
  expect_near(out_row(out, kEmbed, 5), mean_of({row("base", kEmbed, 5), row("padded", kEmbed, 5), row("chatml", kEmbed, 5)}),
              "a token all three have");
}

// A model as tokenizer source: its tokenizer files as they are; the models without its tokens get the
// base's row, else the one model's that has it.
TEST_F(TokenizerMerge, SourceModelTakesThatTokenizerAsItIs) {
  const Result r = merge(R"(merge_method: task_arithmetic
base_model: base
models:
  - model: chatml
    parameters: {weight: 1}
  - model: math
    parameters: {weight: 1}
tokenizer_source: chatml
out_dtype: float32
)", "out");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "out";
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_EQ(read_text(out / f), read_text(dir / "chatml" / f)) << f;
  EXPECT_EQ(Json::parse(read_text(out / "config.json"))["vocab_size"], 18);
  expect_near(out_row(out, kEmbed, 17), row("chatml", kEmbed, 17), "<|im_end|>");
}

// mergekit's README, "Tokenizer Configuration": `tokens` with a forced row, a row of another token
// (model_token, by text and by id), a zero row for a new token, and pad_to_multiple_of.
TEST_F(TokenizerMerge, TokenSourcesForceModelTokenZeroAndPadding) {
  const Result r = merge(R"(merge_method: linear
base_model: base
models:
  - model: base
    parameters: {weight: 1}
  - model: chatml
    parameters: {weight: 1}
dtype: float32
tokenizer:
  source: union
  tokens:
    # Force a specific embedding for all models
    a:
      source: "chatml"
      force: true
    # Map a token to another model's token embedding
    b:
      source:
        kind: "model_token"
        model: "base"
        token: "<s>"
      force: true
    c:
      source:
        kind: "model_token"
        model: "chatml"
        token_id: 17
      force: true
    # Use a zero embedding
    <|unused|>:
      source:
        kind: "zero"
  pad_to_multiple_of: 8
)", "out");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "out";
  // 16 + 2 ChatML tokens + <|unused|> = 19 tokens, padded to 24 rows.
  EXPECT_EQ(Json::parse(read_text(out / "config.json"))["vocab_size"], 24);
  const auto vocab = out_vocab(out);
  EXPECT_EQ(vocab.size(), 19u);
  EXPECT_EQ(vocab.at("<|unused|>"), 18);
  EXPECT_EQ(Checkpoint::open(out).at(kEmbed).info->shape[0], 24u);
  const auto embed = [&](int r0) { return out_row(out, kEmbed, r0); };
  expect_near(embed(id("base", "a")), row("chatml", kEmbed, id("chatml", "a")), "a: forced from chatml");
  expect_near(embed(id("base", "b")), row("base", kEmbed, id("base", "<s>")), "b: base's <s>");
  expect_near(embed(id("base", "c")), row("chatml", kEmbed, 17), "c: chatml's row 17");
  expect_near(embed(18), std::vector<double>(kHidden, 0.0), "<|unused|>: zero");
  // Each model's padding rows are the mean of its 19 token rows; linear averages the two models.
  std::vector<double> mean(kHidden, 0.0);
  for (const std::string m : {"base", "chatml"}) {
    for (int r0 = 0; r0 < 19; ++r0) {
      std::vector<double> v;
      const int own = r0 < 16 || m == "chatml" ? r0 : -1;
      if (r0 == id("base", "a")) v = row("chatml", kEmbed, id("chatml", "a"));
      else if (r0 == id("base", "b")) v = row("base", kEmbed, 1);
      else if (r0 == id("base", "c")) v = row("chatml", kEmbed, 17);
      else if (r0 == 18) v = std::vector<double>(kHidden, 0.0);
      else if (own >= 0) v = row(m, kEmbed, own);
      else v = row("chatml", kEmbed, r0);  // the ChatML tokens, which the base lacks
      // Default rows are stored in the input's dtype (bf16), and these are on its grid already.
      for (int k = 0; k < kHidden; ++k) mean[k] += v[k] / 19.0 / 2.0;
    }
  }
  for (int r0 = 19; r0 < 24; ++r0) {
    const auto got = embed(r0);
    for (int k = 0; k < kHidden; ++k) EXPECT_NEAR(got[k], mean[k], 4e-3) << "padding row " << r0 << " " << k;
  }
  const Json tj = Json::parse(read_text(out / "tokenizer.json"));
  bool plain = false;
  for (const auto& e : tj["added_tokens"])
    if (e["content"] == "<|unused|>") plain = !e["special"].get<bool>() && e["id"] == 18;
  EXPECT_TRUE(plain);
}

// mergekit's README, "Tokenizer Configuration": its first two snippets as written, with the model paths
// (and the first one's `...` placeholder) replaced by models that have the tokens they name.
TEST_F(TokenizerMerge, ReadmeTokenizerSnippetsRunAsWritten) {
  const std::string head = R"(merge_method: linear
models:
  - model: base
    parameters: {weight: 1.0}
  - model: chatml
    parameters: {weight: 1.0}
  - model: special
    parameters: {weight: 1.0}
dtype: float32
)";
  Result r = merge(head + R"(tokenizer:
  source: "union"  # or "base" or a specific model path
  tokens:          # Optional: configure specific tokens
    <|im_start|>:
      source: chatml  # Specify embedding source
      force: false # Optional: force this embedding for all models
  pad_to_multiple_of: null  # Optional: pad vocabulary size
)", "first");
  ASSERT_EQ(r.status, 0) << r.err;
  auto vocab = out_vocab(dir / "first");
  EXPECT_EQ(vocab.size(), 20u);  // 16 + 2 ChatML + 2 of `special`
  EXPECT_EQ(Json::parse(read_text(dir / "first" / "config.json"))["vocab_size"], 20);
  expect_near(out_row(dir / "first", kEmbed, vocab.at("<|im_start|>")), row("chatml", kEmbed, 16), "<|im_start|>");

  r = merge(head + R"(tokenizer:
  source: union
  tokens:
    # Use embedding from a specific model
    <|im_start|>:
      source: "chatml"

    # Force a specific embedding for all models
    <|special|>:
      source: "special"
      force: true

    # Map a token to another model's token embedding
    <|renamed_token|>:
      source:
        kind: "model_token"
        model: "special"
        token: "<|original_token|>"  # or use token_id: 1234

    # Use a zero embedding
    <|unused|>:
      source:
        kind: "zero"
)", "second");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "second";
  vocab = out_vocab(out);
  EXPECT_EQ(vocab.size(), 22u);  // and the two new tokens
  EXPECT_EQ(Json::parse(read_text(out / "config.json"))["vocab_size"], 22);
  expect_near(out_row(out, kEmbed, vocab.at("<|im_start|>")), row("chatml", kEmbed, 16), "<|im_start|>");
  expect_near(out_row(out, kEmbed, vocab.at("<|special|>")), row("special", kEmbed, 16), "<|special|>");
  expect_near(out_row(out, kHead, vocab.at("<|renamed_token|>")), row("special", kHead, 17), "<|renamed_token|>");
  expect_near(out_row(out, kEmbed, vocab.at("<|unused|>")), std::vector<double>(kHidden, 0.0), "<|unused|>");
  expect_near(out_row(out, kEmbed, 7), mean_of({row("base", kEmbed, 7), row("chatml", kEmbed, 7), row("special", kEmbed, 7)}),
              "a shared token: the mean");
}

// mergekit's README, "Practical Example": keep ChatML and Llama 3 prompt formats in one merge.
TEST_F(TokenizerMerge, ReadmePracticalExampleKeepsChatmlAndLlama3Tokens) {
  const Result r = merge(R"(merge_method: linear
models:
  - model: base
    parameters: {weight: 1.0}
  - model: chatml
    parameters: {weight: 1.0}
  - model: llama3
    parameters: {weight: 1.0}
dtype: float32
tokenizer:
  source: union
  tokens:
    # ChatML tokens
    <|im_start|>:
      source: "chatml"
    <|im_end|>:
      source: "chatml"

    # Llama 3 tokens - force original embeddings
    <|start_header_id|>:
      source: "llama3"
      force: true
    <|end_header_id|>:
      source: "llama3"
      force: true
    <|eot_id|>:
      source: "llama3"
      force: true
)", "out");
  ASSERT_EQ(r.status, 0) << r.err;
  const fs::path out = dir / "out";
  const auto vocab = out_vocab(out);
  EXPECT_EQ(vocab.size(), 21u);
  EXPECT_EQ(Json::parse(read_text(out / "config.json"))["vocab_size"], 21);
  for (const char* t : {"<|im_start|>", "<|im_end|>"})
    expect_near(out_row(out, kEmbed, vocab.at(t)), row("chatml", kEmbed, id("chatml", t)), t);
  for (const char* t : {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"})
    expect_near(out_row(out, kHead, vocab.at(t)), row("llama3", kHead, id("llama3", t)), t);
}

// mergekit's README: the legacy `tokenizer_source` line and `chat_template`, with each of its forms.
TEST_F(TokenizerMerge, ChatTemplateAutoBuiltinAndText) {
  const std::string models = R"(merge_method: linear
models:
  - model: base
    parameters: {weight: 1.0}
  - model: math
    parameters: {weight: 1.0}
  - model: chatml
    parameters: {weight: 1.0}
tokenizer_source: "union"  # or "base" or a model path
)";
  Result r = merge(models + "chat_template: \"auto\"\n", "auto");
  ASSERT_EQ(r.status, 0) << r.err;
  // math and chatml share a template, the base has another: the most common wins.
  EXPECT_EQ(Json::parse(read_text(dir / "auto" / "tokenizer_config.json"))["chat_template"],
            "{% for m in messages %}{{ m['content'] }}{% endfor %}");
  r = merge(models + "chat_template: chatml\n", "chatml-template");
  ASSERT_EQ(r.status, 0) << r.err;
  const std::string chatml = Json::parse(read_text(dir / "chatml-template" / "tokenizer_config.json"))["chat_template"];
  EXPECT_NE(chatml.find("<|im_start|>"), std::string::npos);
  EXPECT_NE(chatml.find("add_generation_prompt"), std::string::npos);
  // A template without a tokenizer merge goes into the copied tokenizer_config.json.
  const std::string text = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}";
  r = merge("merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 1}\n  - model: math\n"
            "    parameters: {weight: 1}\nchat_template: \"" + text + "\"\n", "text");
  ASSERT_EQ(r.status, 0) << r.err;
  const Json tc = Json::parse(read_text(dir / "text" / "tokenizer_config.json"));
  EXPECT_EQ(tc["chat_template"], text);
  EXPECT_EQ(tc["bos_token"], "<s>");
  r = merge(models + "chat_template: chatlm\n", "bad");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("did you mean 'chatml'"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "bad"));
}

// One vote per model for `chat_template: auto`, also for a base listed among the models (mergekit's set
// of referenced models).
TEST_F(TokenizerMerge, ChatTemplateAutoCountsEachModelOnce) {
  const Result r = merge(R"(merge_method: linear
base_model: base
models:
  - model: base
    parameters: {weight: 1}
  - model: math
    parameters: {weight: 1}
  - model: chatml
    parameters: {weight: 1}
tokenizer_source: union
chat_template: auto
)", "out");
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(Json::parse(read_text(dir / "out" / "tokenizer_config.json"))["chat_template"],
            "{% for m in messages %}{{ m['content'] }}{% endfor %}");
}

// Tokenizer files that would make a row mean two tokens, or no token, are refused with the file named;
// padding tokens the output leaves out take the BPE merges that make them along.
TEST_F(TokenizerMerge, MalformedTokenizerFilesAreRefusedAndStrippedMergesGo) {
  const std::string recipe = "merge_method: linear\nmodels:\n  - model: base\n    parameters: {weight: 1}\n"
                             "  - model: chatml\n    parameters: {weight: 1}\ntokenizer_source: union\n";
  const fs::path tj = dir / "chatml" / "tokenizer.json";
  const std::string good = read_text(tj);
  Json j = Json::parse(good);
  j["model"]["vocab"]["a"] = 4;  // "a" and "b" on one id
  std::ofstream(tj) << j.dump();
  Result r = merge(recipe, "o1");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("id 4 is given to two tokens"), std::string::npos) << r.err;
  j = Json::parse(good);
  j.erase("model");
  std::ofstream(tj) << j.dump();
  r = merge(recipe, "o2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("has no model.vocab"), std::string::npos) << r.err;
  j = Json::parse(good);
  j["added_tokens"][3]["id"] = "17";
  std::ofstream(tj) << j.dump();
  r = merge(recipe, "o3");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("not an integer >= 0"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "o1") || fs::exists(dir / "o2") || fs::exists(dir / "o3"));
  std::ofstream(tj) << good;

  // `padded` as the base, with a plain token "ab" past its vocab_size and the merge that makes it.
  j = Json::parse(read_text(dir / "padded" / "tokenizer.json"));
  for (auto& e : j["added_tokens"])
    if (e["id"].get<int>() >= 16) e["id"] = e["id"].get<int>() + 1;
  j["model"]["vocab"]["ab"] = 16;
  j["model"]["merges"] = {"a b", "c d"};
  std::ofstream(dir / "padded" / "tokenizer.json") << j.dump();
  Json tc = Json::parse(read_text(dir / "padded" / "tokenizer_config.json"));
  Json dec = Json::object();
  for (const auto& [k, e] : tc["added_tokens_decoder"].items()) dec[std::to_string(std::stoi(k) >= 16 ? std::stoi(k) + 1 : std::stoi(k))] = e;
  tc["added_tokens_decoder"] = dec;
  std::ofstream(dir / "padded" / "tokenizer_config.json") << tc.dump();
  r = merge("merge_method: linear\nbase_model: padded\nmodels:\n  - model: padded\n    parameters: {weight: 1}\n"
            "  - model: chatml\n    parameters: {weight: 1}\ntokenizer_source: union\n", "o4");
  ASSERT_EQ(r.status, 0) << r.err;
  const Json out = Json::parse(read_text(dir / "o4" / "tokenizer.json"));
  EXPECT_FALSE(out["model"]["vocab"].contains("ab"));
  EXPECT_EQ(out["model"]["merges"], Json({"c d"}));
  EXPECT_EQ(out_vocab(dir / "o4").at("<|im_start|>"), 16);
}

TEST_F(TokenizerMerge, RecipeErrorsNameTheKey) {
  Result r = merge("merge_method: linear\nmodels: [base, chatml]\ntokenizer_source: union\ntokenizer: {source: base}\n", "o");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("either tokenizer_source or tokenizer"), std::string::npos) << r.err;
  r = merge("merge_method: linear\nmodels: [base, chatml]\ntokenizer:\n  tokens:\n    x: {source: nowhere}\n", "o");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("'nowhere' is not a model of the recipe"), std::string::npos) << r.err;
  r = merge("merge_method: linear\nmodels: [base, chatml]\ntokenizer:\n  tokens:\n    <|im_end|>: {source: base}\n", "o");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("has no token '<|im_end|>'"), std::string::npos) << r.err;
  r = merge("merge_method: linear\nmodels: [base, chatml]\ntokenizer: {sorce: union}\n", "o");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("did you mean 'source'"), std::string::npos) << r.err;
  r = merge("merge_method: linear\nmodels: [base, chatml]\ntokenizer:\n  tokens:\n    x: {source: {kind: model_token, model: base}}\n", "o");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.err.find("give token"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "o"));
}

}  // namespace
}  // namespace taskvec
