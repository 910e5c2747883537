// config.json and tokenizer files of inputs and outputs: tie flags at every level of a config, the
// vocabulary size of a resized output, the ids a tokenizer names, and the config keys two inputs must
// agree on. Issue 10: an output folder whose config, tokenizer and tensors agree with each other.
#include <algorithm>
#include <array>
#include <charconv>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string_view>

#include <fmt/format.h>

#include "engine/internal.hpp"
#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec::detail {
namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;
using FastJson = nlohmann::json;

namespace {

// Sub-configs of multimodal / encoder-decoder configs that describe the language model.
constexpr std::array<const char*, 5> kTextConfigKeys{"text_config", "language_config", "llm_config", "decoder",
                                                     "text_model"};

// The keys two inputs' config.json must agree on (top level and inside the text sub-configs).
constexpr std::array<const char*, 8> kCompareKeys{"model_type",          "architectures",     "hidden_size",
                                                  "num_hidden_layers",   "num_attention_heads", "num_key_value_heads",
                                                  "intermediate_size",   "vocab_size"};

// Auxiliary files larger than this are not parsed (a tokenizer.json of 256k tokens is ~20 MB).
constexpr std::uintmax_t kMaxParsedBytes = std::uintmax_t{256} << 20;

std::string read_text(const fs::path& path) {
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) throw Error(ErrorCode::kIo, fmt::format("{}: cannot read it: {}", path.string(), ec.message()));
  if (size > kMaxParsedBytes) {
    throw Error(ErrorCode::kIo, fmt::format("{}: {} bytes is more than the {} a config or tokenizer file may have",
                                            path.string(), size, kMaxParsedBytes));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(ErrorCode::kIo, fmt::format("{}: cannot open it for reading", path.string()));
  std::ostringstream text;
  text << in.rdbuf();
  return std::move(text).str();
}

// ordered_json (a config, whose key order is kept when it is rewritten) or json (tokenizer files:
// ordered_json's linear key lookup makes a 150k-token vocabulary quadratic to parse).
template <typename J = Json>
J parse_file(const fs::path& path, std::string_view why) {
  try {
    return J::parse(read_text(path));
  } catch (const nlohmann::json::exception& e) {
    throw Error(ErrorCode::kIo, fmt::format("{}: cannot parse it {}: {}; fix or remove the file", path.string(), why,
                                            e.what()));
  }
}

// Every "tie_word_embeddings" boolean at any depth of `j`.
void collect_tie_flags(const Json& j, std::vector<bool>& flags) {
  if (j.is_object()) {
    for (const auto& [key, value] : j.items()) {
      if (key == "tie_word_embeddings" && value.is_boolean()) flags.push_back(value.get<bool>());
      collect_tie_flags(value, flags);
    }
  } else if (j.is_array()) {
    for (const auto& v : j) collect_tie_flags(v, flags);
  }
}

void untie_every_level(Json& j) {
  if (j.is_object()) {
    for (auto& [key, value] : j.items()) {
      if (key == "tie_word_embeddings") {
        value = false;
      } else {
        untie_every_level(value);
      }
    }
  } else if (j.is_array()) {
    for (auto& v : j) untie_every_level(v);
  }
}

std::optional<Json> input_config(const Checkpoint& ckpt) {
  if (!ckpt.folder()) return std::nullopt;
  const fs::path config = *ckpt.folder() / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return std::nullopt;
  return parse_file(config, "to compare it with the other inputs' config.json");
}

std::string value_text(const Json& v) { return v.dump(); }

void compare_level(const Json& a, const Json& b, const std::string& prefix, bool skip_vocab, const fs::path& file_a,
                   const fs::path& file_b, std::vector<std::string>& warnings,
                   std::vector<ConfigDifference>* differences) {
  if (!a.is_object() || !b.is_object()) return;
  for (const char* key : kCompareKeys) {
    if (skip_vocab && std::string_view(key) == "vocab_size") continue;
    const auto ia = a.find(key), ib = b.find(key);
    if (ia == a.end() || ib == b.end() || *ia == *ib) continue;
    if (differences) {
      differences->push_back({prefix + key, value_text(*ia), value_text(*ib), file_a, file_b});
      continue;
    }
    warnings.push_back(fmt::format("config.json differs on {}{}: {} in {} but {} in {}; the tensors are combined "
                                   "anyway because their shapes agree, check that these models belong together",
                                   prefix, key, value_text(*ia), file_a.string(), value_text(*ib), file_b.string()));
  }
}


void note_id(std::vector<TokenizerId>& ids, const fs::path& file, std::uint64_t id) {
  if (!ids.empty() && ids.back().file == file) {
    ids.back().max_id = std::max(ids.back().max_id, id);
  } else {
    ids.push_back({file, id});
  }
}

std::optional<std::uint64_t> id_of(const FastJson& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  return std::nullopt;
}

// The largest id each tokenizer file of `folder` names (files that name none are left out).
std::vector<TokenizerId> read_tokenizer_ids(const fs::path& tokenizer_json, const fs::path& added_tokens,
                                            const fs::path& tokenizer_config) {
  std::vector<TokenizerId> ids;
  std::error_code ec;
  if (fs::is_regular_file(tokenizer_json, ec)) {
    const FastJson j = parse_file<FastJson>(tokenizer_json, "to read its token ids");
    if (const auto model = j.find("model"); model != j.end() && model->is_object()) {
      if (const auto vocab = model->find("vocab"); vocab != model->end()) {
        if (vocab->is_object()) {  // BPE / WordPiece: token -> id
          for (const auto& [token, id] : vocab->items()) {
            if (auto v = id_of(id)) note_id(ids, tokenizer_json, *v);
          }
        } else if (vocab->is_array() && !vocab->empty()) {  // Unigram: [piece, score], id = index
          note_id(ids, tokenizer_json, vocab->size() - 1);
        }
      }
    }
    if (const auto added = j.find("added_tokens"); added != j.end() && added->is_array()) {
      for (const auto& t : *added) {
        if (!t.is_object()) continue;
        if (const auto id = t.find("id"); id != t.end()) {
          if (auto v = id_of(*id)) note_id(ids, tokenizer_json, *v);
        }
      }
    }
  }
  if (fs::is_regular_file(added_tokens, ec)) {
    const FastJson j = parse_file<FastJson>(added_tokens, "to read its token ids");
    if (j.is_object()) {
      for (const auto& [token, id] : j.items()) {
        if (auto v = id_of(id)) note_id(ids, added_tokens, *v);
      }
    }
  }
  if (fs::is_regular_file(tokenizer_config, ec)) {
    const FastJson j = parse_file<FastJson>(tokenizer_config, "to read its token ids");
    if (const auto decoder = j.find("added_tokens_decoder"); decoder != j.end() && decoder->is_object()) {
      for (const auto& [key, value] : decoder->items()) {
        std::uint64_t id = 0;
        const auto [end, err] = std::from_chars(key.data(), key.data() + key.size(), id);
        if (err == std::errc() && end == key.data() + key.size()) note_id(ids, tokenizer_config, id);
      }
    }
  }
  return ids;
}

void warn_ids_past(const std::vector<TokenizerId>& ids, std::uint64_t rows, const std::string& whose,
                   std::vector<std::string>& warnings) {
  for (const auto& t : ids) {
    if (t.max_id < rows) continue;
    warnings.push_back(fmt::format("{}: names token id {} but {} has {} embedding rows (ids 0..{}): that token would "
                                   "index past the embedding; use the tokenizer that belongs to these weights",
                                   t.file.string(), t.max_id, whose, rows, rows == 0 ? 0 : rows - 1));
  }
}

}  // namespace

bool is_tokenizer_file(const fs::path& path) {
  const std::string n = path.filename().string();
  return n.starts_with("tokenizer") || n == "special_tokens_map.json" || n == "added_tokens.json" ||
         n.starts_with("vocab") || n == "merges.txt" || path.extension() == ".model";
}

std::optional<std::int64_t> config_vocab_size(const Checkpoint& ckpt) {
  if (!ckpt.folder()) return std::nullopt;
  const fs::path config = *ckpt.folder() / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return std::nullopt;
  Json j;
  try {
    j = parse_file(config, "to read vocab_size");
  } catch (const Error&) {
    return std::nullopt;  // as config_ties_embeddings: an unreadable config says nothing
  }
  if (!j.is_object()) return std::nullopt;
  const auto of = [](const Json& level) -> std::optional<std::int64_t> {
    const auto it = level.find("vocab_size");
    if (it == level.end() || !it->is_number_integer()) return std::nullopt;
    return it->get<std::int64_t>();
  };
  if (auto v = of(j)) return v;
  for (const char* key : kTextConfigKeys)
    if (const auto it = j.find(key); it != j.end() && it->is_object())
      if (auto v = of(*it)) return v;
  return std::nullopt;
}

std::optional<bool> config_ties_embeddings(const Checkpoint& ckpt) {
  if (!ckpt.folder()) return std::nullopt;
  const fs::path config = *ckpt.folder() / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config, ec)) return std::nullopt;
  std::vector<bool> flags;
  try {
    collect_tie_flags(parse_file(config, "to read tie_word_embeddings"), flags);
  } catch (const Error&) {
    return std::nullopt;  // as Checkpoint::tied_word_embeddings: an unreadable config says nothing
  }
  if (flags.empty()) return std::nullopt;
  for (bool f : flags) {
    if (f) return true;
  }
  return false;
}

std::string rewrite_config(const fs::path& config, bool untie, std::optional<std::uint64_t> vocab_rows) {
  Json j = parse_file(config, untie ? "to set tie_word_embeddings" : "to set vocab_size");
  if (!j.is_object()) {
    throw Error(ErrorCode::kIo, fmt::format("{}: is not a JSON object, cannot set {}; fix the file", config.string(),
                                            untie ? "tie_word_embeddings" : "vocab_size"));
  }
  if (untie) {
    untie_every_level(j);
    j["tie_word_embeddings"] = false;
  }
  if (vocab_rows) {
    j["vocab_size"] = *vocab_rows;
    for (const char* key : kTextConfigKeys) {
      auto it = j.find(key);
      if (it != j.end() && it->is_object() && it->contains("vocab_size")) (*it)["vocab_size"] = *vocab_rows;
    }
  }
  return j.dump(2) + "\n";
}

std::optional<std::string> config_with_updates(const std::string& config_text, const std::optional<std::string>& torch_dtype,
                                               std::optional<std::uint64_t> num_hidden_layers,
                                               std::optional<std::uint64_t> vocab_size) {
  Json j;
  try {
    j = Json::parse(config_text);
  } catch (const nlohmann::json::exception&) {
    return std::nullopt;
  }
  if (!j.is_object()) return std::nullopt;
  bool changed = false;
  const auto set = [&](Json& obj, const char* key, const Json& value) {
    if (obj.contains(key) && obj[key] == value) return;
    obj[key] = value;
    changed = true;
  };
  if (torch_dtype) {
    set(j, "torch_dtype", *torch_dtype);
    if (j.contains("dtype")) set(j, "dtype", *torch_dtype);
  }
  if (num_hidden_layers) {
    set(j, "num_hidden_layers", *num_hidden_layers);
    for (const char* key : kTextConfigKeys) {
      auto it = j.find(key);
      if (it != j.end() && it->is_object() && it->contains("num_hidden_layers")) set(*it, "num_hidden_layers", *num_hidden_layers);
    }
  }
  if (vocab_size) {
    set(j, "vocab_size", *vocab_size);
    for (const char* key : kTextConfigKeys) {
      auto it = j.find(key);
      if (it != j.end() && it->is_object() && it->contains("vocab_size")) set(*it, "vocab_size", *vocab_size);
    }
  }
  if (!changed) return std::nullopt;
  return j.dump(2) + "\n";
}

std::optional<std::string> read_auxiliary(const std::vector<fs::path>& files, const std::string& name) {
  for (const auto& f : files)
    if (f.filename() == name) return read_text(f);
  return std::nullopt;
}

std::optional<EmbeddingRows> embedding_rows(const Checkpoint& ckpt) {
  for (const char* name : kEmbeddingNames) {
    if (const CheckpointTensor* t = ckpt.find(name); t != nullptr && !t->info->shape.empty()) {
      return EmbeddingRows{name, t->info->shape[0]};
    }
  }
  if (const CheckpointTensor* t = ckpt.find(kHeadName); t != nullptr && !t->info->shape.empty()) {
    return EmbeddingRows{kHeadName, t->info->shape[0]};
  }
  return std::nullopt;
}

std::vector<TokenizerId> tokenizer_ids(const fs::path& folder) {
  return read_tokenizer_ids(folder / "tokenizer.json", folder / "added_tokens.json", folder / "tokenizer_config.json");
}

void check_input_configs(const std::vector<const Checkpoint*>& inputs, bool merge_extra_rows,
                         std::vector<std::string>& warnings, std::vector<ConfigDifference>* differences,
                         bool tokenizer_merge) {
  merge_extra_rows = merge_extra_rows || tokenizer_merge;
  const Checkpoint* first = nullptr;
  std::optional<Json> first_config;
  std::vector<fs::path> seen;  // an input given twice is checked once
  for (const Checkpoint* ckpt : inputs) {
    if (ckpt == nullptr || !ckpt->folder()) continue;
    if (std::find(seen.begin(), seen.end(), *ckpt->folder()) != seen.end()) continue;
    seen.push_back(*ckpt->folder());
    // A file that cannot be parsed is not a reason to refuse the edit (it is copied as it is): say so.
    std::optional<Json> config;
    try {
      config = input_config(*ckpt);
      // An input's own tokenizer must fit its own embedding.
      if (auto rows = embedding_rows(*ckpt); rows && !tokenizer_merge) {
        warn_ids_past(tokenizer_ids(*ckpt->folder()), rows->rows,
                      fmt::format("{} ({})", ckpt->path().string(), rows->tensor), warnings);
      }
    } catch (const Error& e) {
      warnings.push_back(fmt::format("{} (not checked against the other inputs)", e.what()));
    }
    if (!config) continue;
    if (!first_config) {
      first = ckpt;
      first_config = std::move(config);
      continue;
    }
    const fs::path fa = *first->folder() / "config.json", fb = *ckpt->folder() / "config.json";
    compare_level(*first_config, *config, "", merge_extra_rows, fa, fb, warnings, differences);
    for (const char* key : kTextConfigKeys) {
      const auto ia = first_config->find(key), ib = config->find(key);
      if (ia == first_config->end() || ib == config->end()) continue;
      compare_level(*ia, *ib, fmt::format("{}.", key), merge_extra_rows, fa, fb, warnings, differences);
    }
  }
}

void check_input_configs(const std::vector<Checkpoint>& inputs, bool merge_extra_rows,
                         std::vector<std::string>& warnings) {
  std::vector<const Checkpoint*> pointers;
  for (const auto& c : inputs) pointers.push_back(&c);
  check_input_configs(pointers, merge_extra_rows, warnings);
}

OutputVocab output_vocab(const CheckpointPlan& plan, const std::vector<Checkpoint>& inputs) {
  OutputVocab vocab;
  if (inputs.empty()) return vocab;
  std::vector<const char*> names(kEmbeddingNames.begin(), kEmbeddingNames.end());
  names.push_back(kHeadName);
  for (const char* name : names) {
    const auto at = plan.location.find(name);
    const CheckpointTensor* base = inputs.front().find(name);
    if (at == plan.location.end() || base == nullptr || base->info->shape.empty()) continue;
    const auto& shape = plan.shards.at(at->second.first).layout.tensors.at(at->second.second).shape;
    if (shape.empty() || shape[0] <= base->info->shape[0]) continue;
    vocab.rows = shape[0];
    for (std::size_t i = 1; i < inputs.size(); ++i) {
      const CheckpointTensor* t = inputs[i].find(name);
      if (t != nullptr && !t->info->shape.empty() && t->info->shape[0] == vocab.rows) {
        vocab.donor = &inputs[i];
        break;
      }
    }
    return vocab;
  }
  return vocab;
}

OutputAuxiliary output_auxiliary_files(const Checkpoint& base, bool untied_base, const OutputVocab& vocab) {
  OutputAuxiliary out;
  out.copies = base.auxiliary_files();
  const bool resized = vocab.rows > 0;
  const Checkpoint* donor = resized && vocab.donor != nullptr && vocab.donor != &base ? vocab.donor : nullptr;
  if (donor != nullptr && donor->folder()) {
    // The output has the donor's extra embedding rows: its tokenizer must be the donor's too.
    std::erase_if(out.copies, is_tokenizer_file);
    std::vector<fs::path> from_donor = donor->auxiliary_files();
    std::erase_if(from_donor, [](const fs::path& p) { return !is_tokenizer_file(p); });
    const fs::path added = *donor->folder() / "added_tokens.json";
    std::error_code ec;
    if (fs::is_regular_file(added, ec) && std::find(from_donor.begin(), from_donor.end(), added) == from_donor.end()) {
      from_donor.push_back(added);
    }
    out.copies.insert(out.copies.end(), from_donor.begin(), from_donor.end());
    std::sort(out.copies.begin(), out.copies.end());
  }
  if (untied_base || resized) {
    for (const auto& file : out.copies) {
      if (file.filename() != "config.json") continue;
      // Written by CheckpointWriter::commit into the output folder, atomically and checked like the shards.
      out.generated["config.json"] =
          rewrite_config(file, untied_base, resized ? std::optional<std::uint64_t>(vocab.rows) : std::nullopt);
    }
  }
  if (resized) {
    const Checkpoint& source = donor != nullptr && donor->folder() ? *donor : base;
    if (source.folder()) {
      try {
        warn_ids_past(tokenizer_ids(*source.folder()), vocab.rows,
                      fmt::format("the output (tokenizer from {})", source.folder()->string()), out.warnings);
      } catch (const Error& e) {
        out.warnings.push_back(fmt::format("{} (its ids are not checked against the output's {} rows)", e.what(),
                                           vocab.rows));
      }
    }
  }
  return out;
}

}  // namespace taskvec::detail
