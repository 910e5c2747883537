// mergekit's tokenizer merge (`tokenizer_source`, `tokenizer:`) and `chat_template`, learned from
// mergekit/tokenizer/build.py, embed.py and merge.py (docs/MERGEKIT.md, "Tokenizers"):
//  1. each input's vocabulary (token -> id) is read from its tokenizer.json (model.vocab and
//     added_tokens), tokenizer_config.json (added_tokens_decoder) and added_tokens.json; ids >= the
//     config's vocab_size are unused padding and left out;
//  2. the output vocabulary: the base's (base_model, else the first model) without such ids (`base`), plus
//     every other input's tokens appended after it (`union`), or one model's tokenizer as it is (MODEL);
//     then the `tokens:` it lacks. New ids follow the largest, in input order (base, then models as
//     listed; mergekit's order follows a Python set);
//  3. each input's embedding and lm_head are seen with one row per output token (PermutedRowsSource, read
//     on demand): its own row of that token, or for a token it lacks (or a forced one) the token's
//     default row: the `tokens:` source, else the base's row, else the row of the one input that has
//     it, else the mean of the inputs that have it (zero when none has); rows past the vocabulary
//     (pad_to_multiple_of) are the mean row of that input. The merge method then merges these rows;
//  4. the output gets the tokenizer files of that vocabulary and config.json vocab_size = the row count.
#include <algorithm>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "engine/internal.hpp"
#include "taskvec/dtype.hpp"
#include "taskvec/error.hpp"
#include "taskvec/merge.hpp"

namespace taskvec::detail {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;                 // tokenizer.json: fast to parse, key order is not meaning
using OrderedJson = nlohmann::ordered_json;  // small files whose key order a reader sees

// One input's vocabulary, as Hugging Face's get_vocab() gives it.
struct Vocab {
  std::unordered_map<std::string, std::int64_t> ids;  // token -> id
  std::map<std::int64_t, Json> added;                 // added tokens by id: {content, special, lstrip, ...}
  std::int64_t vocab_size = 0;                        // config.json vocab_size, else the number of tokens
  bool found = false;                                 // the folder has a tokenizer.json
  std::string where;                                  // the folder, for messages
};

const fs::path* find_file(const std::vector<fs::path>& files, const std::string& name) {
  for (const auto& f : files)
    if (f.filename() == name) return &f;
  return nullptr;
}

template <typename J>
J parse_json(const fs::path& file, const std::string& text) {
  try {
    return J::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorCode::kIo, fmt::format("{}: cannot parse it to read the vocabulary: {}", file.string(), e.what()));
  }
}

// The file of `files` named `name` and its JSON, or nullopt when there is none.
template <typename J = Json>
std::optional<std::pair<fs::path, J>> parse_named(const std::vector<fs::path>& files, const std::string& name) {
  const fs::path* f = find_file(files, name);
  if (f == nullptr) return std::nullopt;
  return std::pair<fs::path, J>{*f, parse_json<J>(*f, *read_auxiliary({*f}, name))};
}

// The id an added_tokens_decoder key names: its whole text an integer >= 0; -1 otherwise.
std::int64_t decoder_id(const std::string& key) {
  try {
    std::size_t used = 0;
    const long long id = std::stoll(key, &used);
    return used == key.size() && id >= 0 ? id : -1;
  } catch (const std::exception&) {
    return -1;
  }
}

std::optional<std::int64_t> as_id(const Json& v) {
  if (v.is_number_unsigned()) return static_cast<std::int64_t>(v.get<std::uint64_t>());
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return v.get<std::int64_t>();
  return std::nullopt;
}

// The added-token entry fields Hugging Face keeps (tokenizer.json's added_tokens[] and
// tokenizer_config.json's added_tokens_decoder values), with the defaults of a plain add_tokens(TEXT).
Json added_entry(const std::string& content, const Json* from) {
  Json e = {{"content", content}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
            {"normalized", true},  {"special", false}};
  if (from != nullptr && from->is_object())
    for (const char* k : {"single_word", "lstrip", "rstrip", "normalized", "special"})
      if (const auto it = from->find(k); it != from->end() && it->is_boolean()) e[k] = *it;
  return e;
}

// Adds token -> id to `v`, refusing what would make rows ambiguous: one token at two ids, two tokens at
// one id (the tokenizer files disagree with each other or with themselves).
void add_token(Vocab& v, std::unordered_map<std::int64_t, std::string>& by_id, const std::string& token, std::int64_t id,
               const fs::path& file) {
  if (const auto it = v.ids.find(token); it != v.ids.end() && it->second != id)
    throw Error(ErrorCode::kIo, fmt::format("{}: token '{}' has id {} here but id {} in {}'s other tokenizer entries; fix "
                                            "the tokenizer files", file.string(), escape_control(token), id, it->second,
                                            v.where));
  if (const auto it = by_id.find(id); it != by_id.end() && it->second != token)
    throw Error(ErrorCode::kIo, fmt::format("{}: id {} is given to two tokens, '{}' and '{}': its embedding row would mean "
                                            "both; fix the tokenizer files", file.string(), id, escape_control(it->second),
                                            escape_control(token)));
  v.ids[token] = id;
  by_id[id] = token;
}

std::int64_t entry_id(const Json& id, const fs::path& file, const std::string& token) {
  const auto v = as_id(id);
  if (!v)
    throw Error(ErrorCode::kIo, fmt::format("{}: token '{}' has id {}, not an integer >= 0; fix the file", file.string(),
                                            escape_control(token), id.dump()));
  return *v;
}

Vocab read_vocab(const Checkpoint& c) {
  Vocab v;
  v.where = c.folder() ? c.folder()->string() : c.path().string();
  std::unordered_map<std::int64_t, std::string> by_id;
  const std::vector<fs::path> files = c.auxiliary_files();
  if (const auto named = parse_named(files, "tokenizer.json")) {
    v.found = true;
    const fs::path* tj = &named->first;
    const Json& j = named->second;
    const auto model = j.is_object() ? j.find("model") : j.end();
    const auto vocab = model != j.end() && model->is_object() ? model->find("vocab") : j.end();
    if (model == j.end() || !model->is_object() || vocab == model->end() || !(vocab->is_object() || vocab->is_array()))
      throw Error(ErrorCode::kIo, fmt::format("{}: has no model.vocab (a token -> id object, or a Unigram list), so its "
                                              "rows cannot be matched to tokens; fix the file", tj->string()));
    if (vocab->is_object()) {
      for (const auto& [token, id] : vocab->items()) add_token(v, by_id, token, entry_id(id, *tj, token), *tj);
    } else {  // Unigram: [piece, score], the id is the index
      std::int64_t i = 0;
      for (const auto& piece : *vocab) {
        if (!piece.is_array() || piece.empty() || !piece[0].is_string())
          throw Error(ErrorCode::kIo, fmt::format("{}: model.vocab[{}] is not a [piece, score] pair; fix the file",
                                                  tj->string(), i));
        add_token(v, by_id, piece[0].get<std::string>(), i, *tj);
        ++i;
      }
    }
    if (const auto added = j.find("added_tokens"); added != j.end() && added->is_array()) {
      for (const auto& e : *added) {
        if (!e.is_object() || !e.contains("content") || !e["content"].is_string() || !e.contains("id"))
          throw Error(ErrorCode::kIo, fmt::format("{}: an added_tokens entry without content and id: {}; fix the file",
                                                  tj->string(), e.dump()));
        const std::string content = e["content"].get<std::string>();
        const std::int64_t id = entry_id(e["id"], *tj, content);
        add_token(v, by_id, content, id, *tj);
        v.added[id] = added_entry(content, &e);
      }
    }
  }
  if (const auto named = parse_named(files, "tokenizer_config.json")) {
    const fs::path* tc = &named->first;
    const Json& j = named->second;
    if (const auto dec = j.is_object() ? j.find("added_tokens_decoder") : j.end(); j.is_object() && dec != j.end() && dec->is_object()) {
      for (const auto& [key, e] : dec->items()) {
        const std::int64_t id = decoder_id(key);
        if (id < 0 || !e.is_object() || !e.contains("content") || !e["content"].is_string())
          throw Error(ErrorCode::kIo, fmt::format("{}: added_tokens_decoder entry '{}' is not an id with a content; fix "
                                                  "the file", tc->string(), escape_control(key)));
        const std::string content = e["content"].get<std::string>();
        add_token(v, by_id, content, id, *tc);
        if (!v.added.count(id)) v.added[id] = added_entry(content, &e);
      }
    }
  }
  if (const auto named = parse_named(files, "added_tokens.json")) {
    const fs::path* at = &named->first;
    const Json& j = named->second;
    if (j.is_object())
      for (const auto& [content, id] : j.items()) {
        const std::int64_t i = entry_id(id, *at, content);
        add_token(v, by_id, content, i, *at);
        if (!v.added.count(i)) v.added[i] = added_entry(content, nullptr);
      }
  }
  if (!v.ids.empty()) v.found = true;
  v.vocab_size = config_vocab_size(c).value_or(static_cast<std::int64_t>(v.ids.size()));
  return v;
}

// Tokens of `v` in id order (ties by text), for a deterministic union.
std::vector<std::pair<std::int64_t, std::string>> by_id(const Vocab& v) {
  std::vector<std::pair<std::int64_t, std::string>> out;
  out.reserve(v.ids.size());
  for (const auto& [t, id] : v.ids) out.emplace_back(id, t);
  std::sort(out.begin(), out.end());
  return out;
}

// The embedding-shaped tensors of a checkpoint whose rows are taken by token.
std::vector<std::string> embedding_tensor_names(const Checkpoint& c) {
  std::vector<std::string> names;
  for (const char* n : kEmbeddingNames)
    if (const auto* t = c.find(n); t != nullptr && t->info->shape.size() == 2) names.emplace_back(n);
  if (const auto* t = c.find(kHeadName); t != nullptr && t->info->shape.size() == 2) names.emplace_back(kHeadName);
  return names;
}

// One input's embedding with one row per output row: row r is source row map[r] when map[r] >= 0, else
// the encoded row defaults[-map[r] - 1]. Reads on demand; holds no tensor data but the default rows.
class PermutedRowsSource final : public TensorSource {
 public:
  PermutedRowsSource(CheckpointTensor src, std::vector<std::int64_t> map, std::vector<std::vector<std::byte>> defaults)
      : src_(src), map_(std::move(map)), defaults_(std::move(defaults)) {
    row_bytes_ = src_.info->shape[1] * (dtype_bits(src_.info->dtype) / 8);
  }
  const fs::path& path() const noexcept override { return src_.file(); }
  std::string_view format() const noexcept override { return src_.source->format(); }
  void read(const TensorInfo&, std::uint64_t offset, std::span<std::byte> dst) const override {
    std::size_t done = 0;
    while (done < dst.size()) {
      const std::uint64_t at = offset + done;
      const std::uint64_t r = at / row_bytes_, in = at % row_bytes_;
      const std::int64_t m = map_[r];
      if (m < 0) {
        const std::size_t n = std::min<std::uint64_t>(row_bytes_ - in, dst.size() - done);
        std::memcpy(dst.data() + done, defaults_[static_cast<std::size_t>(-m - 1)].data() + in, n);
        done += n;
        continue;
      }
      // A run of consecutive source rows is one read.
      std::uint64_t rows = 1;
      while (r + rows < map_.size() && map_[r + rows] == m + static_cast<std::int64_t>(rows) &&
             rows * row_bytes_ - in < dst.size() - done)
        ++rows;
      const std::size_t n = std::min<std::uint64_t>(rows * row_bytes_ - in, dst.size() - done);
      src_.read(static_cast<std::uint64_t>(m) * row_bytes_ + in, dst.subspan(done, n));
      done += n;
    }
  }

 private:
  CheckpointTensor src_;
  std::vector<std::int64_t> map_;
  std::vector<std::vector<std::byte>> defaults_;
  std::uint64_t row_bytes_ = 0;
};

std::string quoted(const std::string& token) { return "'" + escape_control(token) + "'"; }

std::vector<float> decode_range_f32(const CheckpointTensor& t, std::uint64_t begin, std::uint64_t count) {
  std::vector<float> v(count);
  std::vector<std::byte> staging;
  read_decoded(t, begin, count, v.data(), staging);
  return v;
}

}  // namespace

VocabMerge merge_vocabularies(const Recipe& recipe, const std::vector<Checkpoint*>& inputs,
                              const std::vector<RecipeModelRef>& refs, const std::vector<std::string>& labels,
                              std::optional<std::size_t> base_index) {
  VocabMerge out;
  const RecipeTokenizer& spec = *recipe.tokenizer;
  const std::string& file = recipe.file.string();
  std::vector<Vocab> vocabs;
  for (Checkpoint* c : inputs) vocabs.push_back(read_vocab(*c));
  const std::size_t donor = base_index.value_or(0);  // mergekit: base_model, else the first model
  if (!vocabs[donor].found)
    throw Error(ErrorCode::kRecipe, fmt::format("{}: a tokenizer merge needs the tokenizer of {} ({}), but its folder has "
                                                "no tokenizer.json, tokenizer_config.json added tokens or added_tokens.json",
                                                file, labels[donor], vocabs[donor].where));
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    if (vocabs[i].found) continue;
    // mergekit assumes the base's tokenizer for a model without one: taskvec too, when the rows agree.
    const auto rows = embedding_rows(*inputs[i]);
    const auto base_rows = embedding_rows(*inputs[donor]);
    if (!rows || !base_rows || rows->rows != base_rows->rows)
      throw Error(ErrorCode::kRecipe,
                  fmt::format("{}: {} ({}) has no tokenizer files and its embedding has {} rows, not the {} of {}: "
                              "its rows cannot be matched to tokens; add its tokenizer.json",
                              file, labels[i], vocabs[i].where, rows ? rows->rows : 0, base_rows ? base_rows->rows : 0,
                              labels[donor]));
    out.warnings.push_back(fmt::format("{} ({}) has no tokenizer files: its rows are read as {}'s tokens (as mergekit)",
                                       labels[i], vocabs[i].where, labels[donor]));
    const std::int64_t vs = vocabs[i].vocab_size ? vocabs[i].vocab_size : vocabs[donor].vocab_size;
    vocabs[i] = vocabs[donor];
    vocabs[i].vocab_size = vs;
  }
  // Every id a vocabulary uses must be a row of that input's embedding.
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    for (const auto& name : embedding_tensor_names(*inputs[i])) {
      const std::uint64_t rows = inputs[i]->find(name)->info->shape[0];
      for (const auto& [token, id] : vocabs[i].ids)
        if (id < vocabs[i].vocab_size && static_cast<std::uint64_t>(id) >= rows)
          throw Error(ErrorCode::kShapeMismatch,
                      fmt::format("{}: token {} has id {} in the tokenizer of {}, but its tensor '{}' has {} rows (its "
                                  "config.json says vocab_size {}); fix the tokenizer or the config",
                                  vocabs[i].where, quoted(token), id, labels[i], name, rows, vocabs[i].vocab_size));
    }
  }

  // ---- the output vocabulary ----
  std::unordered_map<std::string, std::int64_t> vocab;  // token -> output id
  std::map<std::int64_t, Json> added;                   // output added tokens by id
  std::int64_t next = 0;
  const auto add = [&](const std::string& token, const Json* entry) {
    if (vocab.count(token)) return;
    vocab[token] = next;
    added[next] = added_entry(token, entry);
    ++next;
  };
  // The input a reference of the recipe names (the last, when the base is also listed among the models).
  const auto input_of = [&](const RecipeModelRef& ref) {
    std::optional<std::size_t> found;
    for (std::size_t i = 0; i < inputs.size(); ++i)
      if (same_recipe_model(ref, refs[i].path, refs[i].adapter)) found = i;
    return found;
  };
  std::optional<std::size_t> source_input;  // the input whose tokenizer files the output gets
  std::optional<Checkpoint> outside;        // a tokenizer source that is not an input
  const Vocab* source_vocab = nullptr;
  std::int64_t strip_at = -1;               // ids >= this are left out of the source's files
  if (spec.source == RecipeTokenizer::Source::kModel) {
    source_input = input_of(spec.model);
    if (!source_input) {
      try {
        outside.emplace(Checkpoint::open(spec.model.path));
      } catch (const Error& e) {
        throw Error(ErrorCode::kRecipe, fmt::format("{}: tokenizer source '{}' is not a model of the recipe and cannot be "
                                                    "opened: {}", file, spec.model.path.string(), e.what()));
      }
      vocabs.push_back(read_vocab(*outside));
      if (!vocabs.back().found)
        throw Error(ErrorCode::kRecipe, fmt::format("{}: tokenizer source '{}' has no tokenizer.json", file,
                                                    spec.model.path.string()));
      source_vocab = &vocabs.back();
    } else {
      source_vocab = &vocabs[*source_input];
    }
    vocab = source_vocab->ids;  // mergekit loads that tokenizer as it is
    for (const auto& [id, e] : source_vocab->added) added[id] = e;
    for (const auto& [t, id] : vocab) next = std::max(next, id + 1);
  } else {
    source_input = donor;
    source_vocab = &vocabs[donor];
    strip_at = source_vocab->vocab_size;
    for (const auto& [id, t] : by_id(*source_vocab)) {
      if (id >= strip_at) continue;
      vocab[t] = id;
      next = std::max(next, id + 1);
    }
    for (const auto& [id, e] : source_vocab->added)
      if (id < strip_at) added[id] = e;
    if (spec.source == RecipeTokenizer::Source::kUnion) {
      // Plain tokens first (as added tokens, non-special), then the added tokens with their settings;
      // an added token with different settings in two inputs keeps the first's.
      std::vector<std::string> plain;
      std::unordered_set<std::string> plain_seen;
      std::vector<std::pair<std::string, Json>> new_added;
      std::unordered_map<std::string, std::size_t> added_at;
      std::vector<std::size_t> order;
      order.push_back(donor);
      for (std::size_t i = 0; i < inputs.size(); ++i)
        if (i != donor) order.push_back(i);
      for (std::size_t i : order) {
        const Vocab& v = vocabs[i];
        for (const auto& [id, t] : by_id(v)) {
          if (id >= v.vocab_size || v.added.count(id)) continue;
          if (!vocab.count(t) && plain_seen.insert(t).second) plain.push_back(t);
        }
        for (const auto& [id, e] : v.added) {
          if (id >= v.vocab_size) continue;
          const std::string t = e["content"].get<std::string>();
          if (const auto it = added_at.find(t); it != added_at.end()) {
            if (new_added[it->second].second != e)
              out.warnings.push_back(fmt::format("token {} is added with different settings by two inputs; the "
                                                 "first's are kept (as mergekit)", quoted(t)));
            continue;
          }
          added_at[t] = new_added.size();
          new_added.emplace_back(t, e);
        }
      }
      for (const auto& t : plain)
        if (!added_at.count(t)) add(t, nullptr);
      for (const auto& [t, e] : new_added) add(t, &e);
    }
  }
  for (const auto& [token, e] : spec.tokens) add(token, nullptr);  // mergekit's add_tokens(token)
  const std::int64_t tokens_end = next;
  std::uint64_t rows = static_cast<std::uint64_t>(tokens_end);
  if (spec.pad_to_multiple_of > 1 && rows % spec.pad_to_multiple_of)
    rows += spec.pad_to_multiple_of - rows % spec.pad_to_multiple_of;
  out.rows = rows;
  std::vector<const std::string*> token_of(static_cast<std::size_t>(tokens_end), nullptr);
  for (const auto& [t, id] : vocab) token_of[static_cast<std::size_t>(id)] = &t;

  // ---- per input: output row -> its own row (or -1) ----
  const std::size_t n = inputs.size();
  std::vector<std::vector<std::int64_t>> perm(n, std::vector<std::int64_t>(rows, -1));
  for (std::size_t i = 0; i < n; ++i)
    for (std::int64_t r = 0; r < tokens_end; ++r) {
      if (!token_of[r]) continue;
      const auto it = vocabs[i].ids.find(*token_of[r]);
      if (it != vocabs[i].ids.end() && it->second < vocabs[i].vocab_size) perm[i][r] = it->second;
    }

  // The `tokens:` entries by output row, with the input they name.
  struct TokenRule {
    const RecipeTokenEmbedding* spec;
    std::size_t input = 0;
    std::int64_t row = -1;  // kModelToken: the source row
  };
  std::map<std::int64_t, TokenRule> rules;
  for (const auto& [token, e] : spec.tokens) {
    TokenRule rule{&e};
    const std::int64_t r = vocab.at(token);
    const std::string at = fmt::format("{}: tokenizer.tokens.{}", file, escape_control(token));
    if (e.kind == RecipeTokenEmbedding::Kind::kModel || e.kind == RecipeTokenEmbedding::Kind::kModelToken) {
      const std::optional<std::size_t> which = input_of(e.model);
      if (!which)
        throw Error(ErrorCode::kRecipe, fmt::format("{}: source '{}' is not a model of the recipe (base_model or models)",
                                                    at, e.model.path.string()));
      rule.input = *which;
      if (e.kind == RecipeTokenEmbedding::Kind::kModel && perm[*which][r] < 0)
        throw Error(ErrorCode::kRecipe, fmt::format("{}: {} has no token {} to take its row from", at, labels[*which],
                                                    quoted(token)));
      if (e.kind == RecipeTokenEmbedding::Kind::kModelToken) {
        if (e.token) {
          const auto it = vocabs[*which].ids.find(*e.token);
          if (it == vocabs[*which].ids.end())
            throw Error(ErrorCode::kRecipe, fmt::format("{}: {} has no token {}", at, labels[*which], quoted(*e.token)));
          rule.row = it->second;
        } else {
          rule.row = *e.token_id;
        }
        for (const auto& name : embedding_tensor_names(*inputs[*which]))
          if (static_cast<std::uint64_t>(rule.row) >= inputs[*which]->find(name)->info->shape[0])
            throw Error(ErrorCode::kRecipe, fmt::format("{}: row {} is outside tensor '{}' of {} ({} rows)", at, rule.row,
                                                        name, labels[*which], inputs[*which]->find(name)->info->shape[0]));
      }
    }
    rules[r] = rule;
  }
  std::vector<std::string> absent;  // tokens no input has (zero rows)
  for (std::int64_t r = 0; r < tokens_end; ++r) {
    if (!token_of[r] || rules.count(r)) continue;
    bool any = false;
    for (std::size_t i = 0; i < n; ++i) any = any || perm[i][r] >= 0;
    if (!any) absent.push_back(quoted(*token_of[r]));
  }
  if (!absent.empty())
    out.warnings.push_back(fmt::format("{} token{} of the output vocabulary {} in no input ({}{}): {} rows are zero (as "
                                       "mergekit)", absent.size(), absent.size() == 1 ? "" : "s",
                                       absent.size() == 1 ? "is" : "are",
                                       fmt::format("{}", fmt::join(absent.begin(), absent.begin() + std::min<std::size_t>(absent.size(), 5), ", ")),
                                       absent.size() > 5 ? ", ..." : "", absent.size() == 1 ? "its" : "their"));

  // ---- per embedding tensor: default rows, then each input's permuted view ----
  std::set<std::string> names;
  for (Checkpoint* c : inputs)
    for (const auto& name : embedding_tensor_names(*c)) names.insert(name);
  for (const std::string& name : names) {
    std::uint64_t cols = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const CheckpointTensor* t = inputs[i]->find(name);
      if (t == nullptr) continue;  // the shape checks of the merge name what is missing
      if (!dtype_is_editable(t->info->dtype) || dtype_bits(t->info->dtype) % 8 != 0)
        throw Error(ErrorCode::kDtypeMismatch, fmt::format("{}: tensor '{}' is {}: a tokenizer merge takes float rows",
                                                           inputs[i]->path().string(), name, dtype_name(t->info->dtype)));
      if (cols == 0) cols = t->info->shape[1];
      if (t->info->shape[1] != cols)
        throw Error(ErrorCode::kShapeMismatch, fmt::format("tensor '{}' has rows of {} in {} but {} in {}", name,
                                                           t->info->shape[1], inputs[i]->path().string(), cols,
                                                           inputs[0]->path().string()));
    }
    const auto row_of = [&](std::size_t i, std::int64_t src_row) {
      return decode_range_f32(*inputs[i]->find(name), static_cast<std::uint64_t>(src_row) * cols, cols);
    };
    // The default row of output row r, computed once, when some input needs it.
    std::map<std::int64_t, std::vector<float>> defaults;
    const auto default_row = [&](std::int64_t r) -> const std::vector<float>& {
      if (const auto it = defaults.find(r); it != defaults.end()) return it->second;
      std::vector<float> row(cols, 0.0f);
      const auto have = [&](std::size_t i) { return perm[i][r] >= 0 && inputs[i]->find(name) != nullptr; };
      if (const auto rule = rules.find(r); rule != rules.end() && rule->second.spec->kind != RecipeTokenEmbedding::Kind::kDefault) {
        const TokenRule& tr = rule->second;
        if (tr.spec->kind == RecipeTokenEmbedding::Kind::kModel && inputs[tr.input]->find(name)) row = row_of(tr.input, perm[tr.input][r]);
        if (tr.spec->kind == RecipeTokenEmbedding::Kind::kModelToken && inputs[tr.input]->find(name)) row = row_of(tr.input, tr.row);
      } else {
        std::vector<std::size_t> present;
        for (std::size_t i = 0; i < n; ++i)
          if (have(i)) present.push_back(i);
        if (present.size() == 1) {
          row = row_of(present[0], perm[present[0]][r]);
        } else if (!present.empty() && base_index && have(*base_index)) {
          row = row_of(*base_index, perm[*base_index][r]);
        } else if (!present.empty()) {
          std::vector<double> sum(cols, 0.0);
          for (std::size_t i : present) {
            const auto v = row_of(i, perm[i][r]);
            for (std::uint64_t k = 0; k < cols; ++k) sum[k] += v[k];
          }
          for (std::uint64_t k = 0; k < cols; ++k) row[k] = static_cast<float>(sum[k] / static_cast<double>(present.size()));
        }
      }
      return defaults.emplace(r, std::move(row)).first->second;
    };
    for (std::size_t i = 0; i < n; ++i) {
      const CheckpointTensor* t = inputs[i]->find(name);
      if (t == nullptr) continue;
      const DType dt = t->info->dtype;
      const std::uint64_t esize = dtype_bits(dt) / 8;
      std::vector<std::int64_t> map(rows, -1);
      std::vector<std::vector<std::byte>> encoded;
      const auto push = [&](const std::vector<float>& row) {
        std::vector<std::byte> bytes(cols * esize);
        encode_from_f32(dt, row.data(), bytes.data(), cols);
        encoded.push_back(std::move(bytes));
        return -static_cast<std::int64_t>(encoded.size());
      };
      std::vector<double> mean(cols, 0.0);
      std::uint64_t counted = 0;
      for (std::int64_t r = 0; r < tokens_end; ++r) {
        if (!token_of[r]) continue;
        const auto rule = rules.find(r);
        const bool force = rule != rules.end() && rule->second.spec->force;
        if (perm[i][r] >= 0 && !force) {
          map[r] = perm[i][r];
        } else {
          map[r] = push(default_row(r));
        }
        if (spec.pad_to_multiple_of > 1 && rows > static_cast<std::uint64_t>(tokens_end)) {
          std::vector<float> v = map[r] >= 0 ? row_of(i, map[r]) : std::vector<float>();
          if (map[r] < 0) {
            v.resize(cols);
            decode_to_f32(dt, encoded[static_cast<std::size_t>(-map[r] - 1)].data(), v.data(), cols);
          }
          for (std::uint64_t k = 0; k < cols; ++k) mean[k] += v[k];
          ++counted;
        }
      }
      // Rows past the vocabulary (pad_to_multiple_of) and ids no token has: the mean row (mergekit's
      // padding rule, https://nlp.stanford.edu/~johnhew/vocab-expansion.html); zero without padding.
      std::vector<float> fill(cols, 0.0f);
      if (counted)
        for (std::uint64_t k = 0; k < cols; ++k) fill[k] = static_cast<float>(mean[k] / static_cast<double>(counted));
      std::int64_t fill_at = 0;
      for (std::uint64_t r = 0; r < rows; ++r) {
        if (map[r] != -1 || (r < static_cast<std::uint64_t>(tokens_end) && token_of[r])) continue;
        if (fill_at == 0) fill_at = push(fill);
        map[r] = fill_at;
      }
      TensorInfo info;
      info.dtype = dt;
      info.shape = {rows, cols};
      info.data_begin = 0;
      info.data_end = rows * cols * esize;
      inputs[i]->replace_tensor(name, std::move(info),
                                std::make_shared<PermutedRowsSource>(*t, std::move(map), std::move(encoded)));
    }
  }

  // ---- the output's tokenizer files ----
  const Checkpoint& src = source_input ? *inputs[*source_input] : *outside;
  const std::vector<fs::path> files = src.auxiliary_files();
  for (const auto& f : files)
    if (is_tokenizer_file(f)) out.copies.push_back(f);
  // Added tokens the source's files lack (new ids), and ids the source names that the output leaves out.
  std::map<std::int64_t, Json> fresh;
  for (const auto& [id, e] : added)
    if (!source_vocab->added.count(id) || source_vocab->added.at(id)["content"] != e["content"]) fresh[id] = e;
  const auto dropped = [&](std::int64_t id) { return strip_at >= 0 && id >= strip_at; };
  bool strips = false;
  for (const auto& [t, id] : source_vocab->ids) strips = strips || dropped(id);
  if (fresh.empty() && !strips) return out;  // the source's files describe the output as they are
  if (auto named = parse_named(files, "tokenizer.json")) {
    Json& j = named->second;
    std::unordered_set<std::string> removed;
    if (strips) {
      if (auto model = j.find("model"); model != j.end() && model->is_object()) {
        if (auto v = model->find("vocab"); v != model->end() && v->is_object()) {
          for (auto it = v->begin(); it != v->end();) {
            const auto id = as_id(it.value());
            if (id && dropped(*id)) {
              removed.insert(it.key());
              it = v->erase(it);
            } else {
              ++it;
            }
          }
        } else if (v != model->end() && v->is_array() && static_cast<std::int64_t>(v->size()) > strip_at) {
          for (std::size_t k = static_cast<std::size_t>(strip_at); k < v->size(); ++k)
            if ((*v)[k].is_array() && !(*v)[k].empty() && (*v)[k][0].is_string()) removed.insert((*v)[k][0].get<std::string>());
          v->erase(v->begin() + strip_at, v->end());
        }
        if (auto merges = model->find("merges"); merges != model->end() && merges->is_array() && !removed.empty()) {
          Json kept = Json::array();
          for (const auto& m : *merges) {
            bool keep = true;
            // A merge goes when a part or its result (the parts joined) is a removed token.
            if (m.is_string()) {
              const std::string s = m.get<std::string>();
              const auto sp = s.find(' ');
              if (sp != std::string::npos) {
                const std::string x = s.substr(0, sp), y = s.substr(sp + 1);
                keep = !removed.count(x) && !removed.count(y) && !removed.count(x + y);
              }
            } else if (m.is_array()) {
              std::string joined;
              for (const auto& part : m) {
                if (!part.is_string()) continue;
                keep = keep && !removed.count(part.get<std::string>());
                joined += part.get<std::string>();
              }
              keep = keep && !removed.count(joined);
            }
            if (keep) kept.push_back(m);
          }
          *merges = std::move(kept);
        }
      }
    }
    Json list = Json::array();
    if (auto a = j.find("added_tokens"); a != j.end() && a->is_array())
      for (const auto& e : *a)
        if (!(e.is_object() && e.contains("id") && as_id(e["id"]) && dropped(*as_id(e["id"])))) list.push_back(e);
    for (const auto& [id, e] : fresh) {
      Json entry = {{"id", id}};
      for (const auto& [k, v] : e.items()) entry[k] = v;
      list.push_back(std::move(entry));
    }
    j["added_tokens"] = std::move(list);
    out.generated["tokenizer.json"] = j.dump(2) + "\n";
  } else {
    throw Error(ErrorCode::kRecipe, fmt::format("{}: the output vocabulary has tokens that {} has not, but its folder ({}) "
                                                "has no tokenizer.json to add them to (taskvec, like mergekit, writes "
                                                "fast tokenizers)", file, source_input ? labels[*source_input] : spec.model.path.string(),
                                                src.folder() ? src.folder()->string() : src.path().string()));
  }
  if (auto named = parse_named<OrderedJson>(files, "tokenizer_config.json")) {
    OrderedJson& j = named->second;
    if (j.is_object()) {
      if (auto dec = j.find("added_tokens_decoder"); dec != j.end() && dec->is_object()) {
        OrderedJson kept = OrderedJson::object();
        for (const auto& [key, e] : dec->items())
          if (!dropped(decoder_id(key))) kept[key] = e;
        for (const auto& [id, e] : fresh) kept[std::to_string(id)] = OrderedJson::parse(e.dump());
        *dec = std::move(kept);
      }
      out.generated["tokenizer_config.json"] = j.dump(2) + "\n";
    }
  }
  if (auto named = parse_named<OrderedJson>(files, "added_tokens.json")) {
    const OrderedJson& j = named->second;
    OrderedJson kept = OrderedJson::object();
    if (j.is_object())
      for (const auto& [k, v] : j.items())
        if (!(v.is_number_integer() && dropped(v.get<std::int64_t>()))) kept[k] = v;
    for (const auto& [id, e] : fresh) kept[e["content"].get<std::string>()] = id;
    out.generated["added_tokens.json"] = kept.dump(2) + "\n";
  }
  return out;
}

namespace {

// taskvec's own texts of the prompt formats mergekit's chat_template names (not mergekit's files).
const std::map<std::string, std::string>& builtin_chat_templates() {
  static const std::map<std::string, std::string> k = {
      {"chatml",
       "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
       "'\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"},
      {"llama3",
       "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
       "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt "
       "%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"},
      {"mistral",
       "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] "
       "+ ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% elif "
       "message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"},
      {"alpaca",
       "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% elif "
       "message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] "
       "== 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}{% "
       "if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"},
      {"exaone",
       "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + "
       "'[|endofturn|]\n' }}{% elif message['role'] == 'system' %}{{ '[|system|]' + message['content'] + "
       "'[|endofturn|]\n' }}{% else %}{{ '[|' + message['role'] + '|]' + message['content'] + '\n' }}{% endif %}{% "
       "endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"},
  };
  return k;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// An input's chat template: chat_template.jinja (newer transformers) or tokenizer_config.json's.
std::optional<std::string> input_chat_template(const Checkpoint& c) {
  const std::vector<fs::path> files = c.auxiliary_files();
  if (auto jinja = read_auxiliary(files, "chat_template.jinja")) return trim(*jinja);
  const std::optional<std::string> text = read_auxiliary(files, "tokenizer_config.json");
  if (!text) return std::nullopt;
  Json j;
  try {
    j = Json::parse(*text);
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
  if (!j.is_object()) return std::nullopt;
  const auto t = j.find("chat_template");
  if (t == j.end()) return std::nullopt;
  if (t->is_string()) return trim(t->get<std::string>());
  if (t->is_array())
    for (const auto& e : *t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        return trim(e["template"].get<std::string>());
  return std::nullopt;
}

}  // namespace

std::vector<std::string> builtin_chat_template_names() {
  std::vector<std::string> names;
  for (const auto& [name, text] : builtin_chat_templates()) names.push_back(name);
  return names;
}

std::optional<std::string> chat_template_text(const std::string& chat_template, const std::vector<const Checkpoint*>& inputs) {
  if (chat_template == "auto") {
    std::vector<std::pair<std::string, std::size_t>> counts;  // template -> count, in first-seen order
    std::vector<fs::path> seen;  // one vote per model, as mergekit's set of referenced models
    for (const Checkpoint* c : inputs) {
      std::error_code ec;
      const fs::path where = fs::weakly_canonical(c->folder() ? *c->folder() : c->path(), ec);
      if (std::find(seen.begin(), seen.end(), where) != seen.end()) continue;
      seen.push_back(where);
      const auto t = input_chat_template(*c);
      if (!t || t->empty()) continue;
      auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& p) { return p.first == *t; });
      if (it == counts.end()) counts.emplace_back(*t, 1);
      else ++it->second;
    }
    if (counts.empty()) return std::nullopt;
    const auto best = std::max_element(counts.begin(), counts.end(),
                                       [](const auto& a, const auto& b) { return a.second < b.second; });
    return best->first;
  }
  const auto& builtin = builtin_chat_templates();
  if (const auto it = builtin.find(chat_template); it != builtin.end()) return it->second;
  return chat_template;
}

}  // namespace taskvec::detail
