// YAML merge recipes (in the spirit of mergekit's): parsing, validation against the method registry,
// and per-tensor resolution of scalar / layer-interpolated / filtered parameters. docs/METHODS.md.
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "engine/internal.hpp"
#include "merge_internal.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"  // escape_control

namespace taskvec {

namespace {

constexpr std::size_t kMaxFilterLength = 1000;  // characters of a filter regex
constexpr int kMaxFilterQuantifiers = 4;

// std::regex backtracks: a quantifier on something already quantified ("a**", "(a+)*"), or on a group
// with an alternation ("(a|a)*"), takes time exponential in the name's length, and many quantifiers
// in a row (".*.*.*.*.*x") a high power of it. Recipes may come from others, so such filters are
// refused; real ones ("layers\.(1[0-9]|2[0-3])\.", "self_attn", "^model\.embed") have none of it.
// Returns why a pattern is refused, or "" when it is fine.
std::string backtracking_risk(const std::string& p) {
  struct Group {
    bool quantified_inside = false;
    bool alternation = false;
  };
  std::vector<Group> groups(1);
  int quantifiers = 0;
  bool after_quantifier = false;  // the previous token was a quantifier (a '?' right after one is lazy)
  bool lazy_taken = false;
  bool after_risky_group = false;  // the previous token closed a group with a quantifier or '|' inside
  for (std::size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    const bool brace = c == '{' && i + 1 < p.size() && std::isdigit(static_cast<unsigned char>(p[i + 1]));
    if (c == '*' || c == '+' || c == '?' || brace) {
      if (c == '?' && after_quantifier && !lazy_taken) {
        lazy_taken = true;  // "*?", "+?", "??", "{n}?": the lazy form of the same quantifier
        continue;
      }
      if (after_quantifier) return "repeats a quantifier (e.g. 'a**'), which can take exponential time";
      if (after_risky_group) {
        return "repeats a group that holds a quantifier or an alternation (e.g. '(a+)*', '(a|b)*'), which can take "
               "exponential time";
      }
      if (++quantifiers > kMaxFilterQuantifiers) {
        return "has more than " + std::to_string(kMaxFilterQuantifiers) +
               " quantifiers (*, +, ?, {n,m}), which can take a very long time";
      }
      groups.back().quantified_inside = true;
      if (brace) i = std::min(p.size() - 1, p.find('}', i) == std::string::npos ? p.size() - 1 : p.find('}', i));
      after_quantifier = true;
      lazy_taken = false;
      after_risky_group = false;
      continue;
    }
    after_quantifier = false;
    after_risky_group = false;
    if (c == '\\') {
      ++i;  // an escaped character is one atom
    } else if (c == '[') {
      // A character class is one atom: skip to its closing ']' (a ']' first in the class is literal).
      std::size_t j = i + 1;
      if (j < p.size() && p[j] == '^') ++j;
      if (j < p.size() && p[j] == ']') ++j;
      while (j < p.size() && p[j] != ']') j += p[j] == '\\' ? 2 : 1;
      i = j;
    } else if (c == '(') {
      groups.emplace_back();
    } else if (c == ')' && groups.size() > 1) {
      const Group g = groups.back();
      groups.pop_back();
      groups.back().quantified_inside = groups.back().quantified_inside || g.quantified_inside;
      after_risky_group = g.quantified_inside || g.alternation;
    } else if (c == '|') {
      groups.back().alternation = true;
    }
  }
  return "";
}


struct Ctx {
  std::string file;
  std::vector<std::string>* warnings = nullptr;
  void warn(const YAML::Node& node, const std::string& key, const std::string& what) const {
    std::string where = file;
    if (node.IsDefined() && node.Mark().line >= 0) where += ":" + std::to_string(node.Mark().line + 1);
    if (warnings) warnings->push_back(where + ": '" + key + "': " + what);
  }
  [[noreturn]] void fail(const YAML::Node& node, const std::string& key, const std::string& what) const {
    std::string where = file;
    if (node.IsDefined() && node.Mark().line >= 0) where += ":" + std::to_string(node.Mark().line + 1);
    throw Error(ErrorCode::kRecipe, where + ": '" + key + "': " + what);
  }
  [[noreturn]] void fail_plain(const std::string& key, const std::string& what) const {
    throw Error(ErrorCode::kRecipe, file + ": '" + key + "': " + what);
  }
};

std::string join_params(const MergeMethod& method, bool model_only) {
  std::string out;
  for (const auto& p : method.params) {
    if (model_only && p.scope != MergeParamScope::kModel) continue;
    if (!out.empty()) out += ", ";
    out += p.name;
  }
  return out.empty() ? "none" : out;
}

std::string format_range(const MergeParamSpec& spec) {
  std::ostringstream s;
  s << (spec.min_open ? "(" : "[") << spec.min << ", " << spec.max << (spec.max_open ? ")" : "]");
  return s.str();
}

void check_range(const Ctx& ctx, const YAML::Node& node, const std::string& key, const MergeParamSpec& spec, double v) {
  if (spec.type != MergeParamType::kFloat && spec.type != MergeParamType::kInt) return;
  const bool low_ok = spec.min_open ? v > spec.min : v >= spec.min;
  const bool high_ok = spec.max_open ? v < spec.max : v <= spec.max;
  if (!std::isfinite(v) || !low_ok || !high_ok) {
    std::ostringstream s;
    s << v << " is outside " << format_range(spec);
    ctx.fail(node, key, s.str());
  }
}

double parse_scalar(const Ctx& ctx, const YAML::Node& node, const std::string& key, const MergeParamSpec& spec) {
  if (!node.IsScalar()) ctx.fail(node, key, "expected a scalar");
  const std::string text = node.Scalar();
  double v = 0;
  switch (spec.type) {
    case MergeParamType::kFloat:
      try {
        v = node.as<double>();
      } catch (const YAML::Exception&) {
        ctx.fail(node, key, "expected a number, got '" + text + "'");
      }
      break;
    case MergeParamType::kInt: {
      try {
        v = static_cast<double>(node.as<long long>());
      } catch (const YAML::Exception&) {
        ctx.fail(node, key, "expected an integer, got '" + text + "'");
      }
      break;
    }
    case MergeParamType::kBool:
      try {
        v = node.as<bool>() ? 1.0 : 0.0;
      } catch (const YAML::Exception&) {
        ctx.fail(node, key, "expected true or false, got '" + text + "'");
      }
      break;
    case MergeParamType::kChoice: {
      bool found = false;
      // rescale: false | true | inverse_density takes YAML's booleans (true, True, yes, ...) too.
      if (spec.choices.size() >= 2 && spec.choices[0] == "false" && spec.choices[1] == "true") {
        bool b = false;
        if (YAML::convert<bool>::decode(node, b)) {
          v = b ? 1.0 : 0.0;
          found = true;
          break;
        }
      }
      std::string allowed;
      for (std::size_t i = 0; i < spec.choices.size(); ++i) {
        if (spec.choices[i] == text) {
          v = static_cast<double>(i);
          found = true;
        }
        allowed += (i ? ", " : "") + std::string(spec.choices[i]);
      }
      if (!found) ctx.fail(node, key, "expected one of " + allowed + ", got '" + text + "'");
      break;
    }
  }
  check_range(ctx, node, key, spec, v);
  return v;
}

std::vector<double> parse_scalar_or_list(const Ctx& ctx, const YAML::Node& node, const std::string& key,
                                         const MergeParamSpec& spec) {
  if (node.IsScalar()) return {parse_scalar(ctx, node, key, spec)};
  if (!node.IsSequence() || node.size() == 0) ctx.fail(node, key, "expected a scalar or a non-empty list");
  if (spec.type != MergeParamType::kFloat)
    ctx.fail(node, key, "a list is interpolated over layers and needs a number parameter");
  std::vector<double> values;
  for (const auto& item : node) values.push_back(parse_scalar(ctx, item, key, spec));
  return values;
}

RecipeValue parse_value(const Ctx& ctx, const YAML::Node& node, const std::string& key, const MergeParamSpec& spec) {
  RecipeValue value;
  if (node.IsScalar()) {
    value.values = {parse_scalar(ctx, node, key, spec)};
    return value;
  }
  if (!node.IsSequence() || node.size() == 0) ctx.fail(node, key, "expected a scalar, a list or a list of {filter, value}");
  bool maps = false, scalars = false;
  for (const auto& item : node) (item.IsMap() ? maps : scalars) = true;
  if (maps && scalars) ctx.fail(node, key, "mixes scalars and {filter, value} entries");
  if (scalars) {
    value.kind = RecipeValue::Kind::kLayers;
    value.values = parse_scalar_or_list(ctx, node, key, spec);
    return value;
  }
  value.kind = RecipeValue::Kind::kFilters;
  for (const auto& item : node) {
    RecipeValue::FilterEntry entry;
    bool has_value = false;
    for (const auto& kv : item) {
      const std::string k = kv.first.as<std::string>();
      if (k == "filter") {
        // mergekit: a substring of the tensor name ("*" = every tensor).
        if (entry.pattern) ctx.fail(kv.first, key + ".filter", "give either filter (substring) or filter_regex, not both");
        if (!kv.second.IsScalar()) ctx.fail(kv.second, key + ".filter", "expected a string (a substring of tensor names)");
        entry.pattern = kv.second.Scalar();
      } else if (k == "filter_regex") {
        if (entry.pattern) ctx.fail(kv.first, key + ".filter_regex", "give either filter (substring) or filter_regex, not both");
        if (!kv.second.IsScalar()) ctx.fail(kv.second, key + ".filter_regex", "expected a regular expression string");
        entry.pattern = kv.second.Scalar();
        entry.is_regex = true;
        // std::regex compiles and matches recursively: a huge pattern can overflow the stack.
        if (entry.pattern->size() > kMaxFilterLength) {
          ctx.fail(kv.second, key + ".filter_regex",
                   "the regular expression is " + std::to_string(entry.pattern->size()) + " characters long; at most " +
                       std::to_string(kMaxFilterLength) + " are allowed");
        }
        if (const std::string why = backtracking_risk(*entry.pattern); !why.empty()) {
          ctx.fail(kv.second, key + ".filter_regex", "the regular expression '" + *entry.pattern + "' " + why);
        }
        try {
          entry.regex = std::regex(*entry.pattern, std::regex::ECMAScript);
        } catch (const std::regex_error& e) {
          ctx.fail(kv.second, key + ".filter_regex", "invalid regular expression '" + *entry.pattern + "': " + e.what());
        }
      } else if (k == "value") {
        entry.values = parse_scalar_or_list(ctx, kv.second, key, spec);
        has_value = true;
      } else {
        ctx.fail(kv.first, key, "unknown key '" + k + "' in a filter entry (expected filter or filter_regex, and value)");
      }
    }
    if (!has_value) ctx.fail(item, key, "a filter entry needs a 'value'");
    value.filters.push_back(std::move(entry));
  }
  return value;
}

// Parameter names mergekit's methods take (mergekit/merge_methods/*.py), for "has no effect" warnings.
const std::set<std::string, std::less<>>& mergekit_param_names() {
  static const std::set<std::string, std::less<>> names = {
      "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "filter_wise",
      "scale", "nuslerp_row_wise", "nuslerp_flatten", "normalize_weights", "eps", "max_iter", "tol", "select_topk",
      "r", "alpha"};
  return names;
}

std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diag = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

// " (did you mean 'density'?)" for the closest known name within 2 edits (or a third of its length).
std::string did_you_mean(const std::string& name, const std::vector<std::string>& known) {
  std::string best;
  std::size_t best_d = static_cast<std::size_t>(-1);
  for (const auto& k : known) {
    const std::size_t d = edit_distance(name, k);
    if (d < best_d) {
      best_d = d;
      best = k;
    }
  }
  if (best.empty() || best_d > std::max<std::size_t>(2, best.size() / 3)) return "";
  return " (did you mean '" + best + "'?)";
}

// A name some method accepts, taskvec's or mergekit's: under another method it has no effect (mergekit
// ignores such a parameter), so it gets a warning; any other name is a misspelling and an error.
bool known_elsewhere(const std::string& name) {
  if (mergekit_param_names().count(name)) return true;
  for (const auto& m : merge_methods())
    if (m.find_param(name)) return true;
  return false;
}

std::map<std::string, RecipeValue> parse_params(const Ctx& ctx, const YAML::Node& node, const std::string& where,
                                                const MergeMethod& method, bool model_scope) {
  std::map<std::string, RecipeValue> out;
  if (!node.IsMap()) ctx.fail(node, where, "expected a mapping of parameter names to values");
  for (const auto& kv : node) {
    const std::string name = kv.first.as<std::string>();
    const MergeParamSpec* spec = method.find_param(name);
    const std::string key = where + "." + name;
    if (!spec) {
      if (known_elsewhere(name)) {
        ctx.warn(kv.first, key, "has no effect on " + std::string(method.name) + " (ignored, as mergekit ignores it)");
        continue;
      }
      std::vector<std::string> known;
      for (const auto& p : method.params) known.emplace_back(p.name);
      std::string hint = did_you_mean(name, known);
      if (hint.empty()) {
        for (const auto& m : merge_methods())
          for (const auto& p : m.params) known.emplace_back(p.name);
        known.insert(known.end(), mergekit_param_names().begin(), mergekit_param_names().end());
        hint = did_you_mean(name, known);
      }
      ctx.fail(kv.first, key,
               "unknown parameter" + hint + "; " + std::string(method.name) + " accepts " + join_params(method, model_scope));
    }
    if (model_scope && spec->scope != MergeParamScope::kModel) {
      ctx.warn(kv.first, key,
               "is a global parameter: under a model it has no effect (ignored, as mergekit ignores it); put it under the "
               "top-level 'parameters'");
      continue;
    }
    if (out.count(name)) ctx.fail(kv.first, key, "given twice");
    out.emplace(name, parse_value(ctx, kv.second, key, *spec));
  }
  return out;
}

// A path as written: relative ones resolve against the working directory, as in mergekit.
std::filesystem::path parse_path(const Ctx& ctx, const YAML::Node& node, const std::string& key) {
  if (!node.IsScalar() || node.Scalar().empty()) ctx.fail(node, key, "expected a path");
  return node.Scalar();
}

// A model reference as mergekit writes it: PATH, or PATH+ADAPTER (a PEFT LoRA adapter applied to PATH;
// mergekit splits at '+', so a '+' always separates the two).
std::pair<std::filesystem::path, std::optional<std::filesystem::path>> parse_model_ref(
    const Ctx& ctx, const YAML::Node& node, const std::string& key) {
  if (!node.IsScalar() || node.Scalar().empty()) ctx.fail(node, key, "expected a path");
  const std::string text = node.Scalar();
  const auto plus = text.find('+');
  if (plus == std::string::npos) return {parse_path(ctx, node, key), std::nullopt};
  if (text.find('+', plus + 1) != std::string::npos || plus == 0 || plus + 1 == text.size()) {
    ctx.fail(node, key, "expected MODEL or MODEL+ADAPTER (one '+', as mergekit reads it), got '" + escape_control(text) + "'");
  }
  return {std::filesystem::path(text.substr(0, plus)), std::filesystem::path(text.substr(plus + 1))};
}

DType parse_dtype_key(const Ctx& ctx, const YAML::Node& node, const std::string& key) {
  if (!node.IsScalar()) ctx.fail(node, key, "expected a dtype name");
  const auto d = parse_dtype_user(node.Scalar());
  if (!d || !dtype_is_writable_float(*d))
    ctx.fail(node, key, "unknown or non-float dtype '" + node.Scalar() + "' (float32, float16, bfloat16, float64, fp8_e4m3, fp8_e5m2)");
  return *d;
}

// Limits on the YAML tree a recipe may expand to. Aliases (*name) share the anchored node, so a short
// file can expand to billions of nodes ("billion laughs") or, with an alias inside its own anchor, to a
// cycle that recursion never leaves. Real recipes have a few thousand nodes and a nesting depth under ten.
constexpr std::size_t kMaxRecipeNodes = 100000;
constexpr std::size_t kMaxRecipeDepth = 64;

struct TreeWalk {
  const Ctx& ctx;
  std::vector<YAML::Node> ancestors;  // the collections enclosing the node being checked
  std::size_t nodes = 0;
};

// One walk over the whole tree, before anything reads it:
// - a collection that contains itself through an alias, a tree nested deeper than kMaxRecipeDepth, or
//   one that expands (aliases followed) to more than kMaxRecipeNodes nodes is refused;
// - yaml-cpp keeps every pair of a mapping when iterating, but node["key"] finds only the first: a key
//   given twice would silently keep one of the values. One rule for every mapping of the recipe (top
//   level, models entries, parameters, filter entries, anything nested): a key given twice is refused.
// `used_at` is the 1-based line where the node is used (its key's line; an alias shares the anchored
// node, whose own mark is the anchor's).
void check_tree(TreeWalk& w, const YAML::Node& node, const std::string& where, int used_at) {
  const auto line_of = [](const YAML::Node& n) { return n.Mark().line >= 0 ? n.Mark().line + 1 : 0; };
  if (++w.nodes > kMaxRecipeNodes)
    throw Error(ErrorCode::kRecipe,
                fmt::format("{}:{}: the recipe expands to more than {} YAML nodes (aliases '*name' are expanded "
                            "where they are used); a recipe this large is refused",
                            w.ctx.file, used_at, kMaxRecipeNodes));
  if (!node.IsSequence() && !node.IsMap()) return;
  for (const YAML::Node& a : w.ancestors) {
    if (a.is(node))
      throw Error(ErrorCode::kRecipe,
                  fmt::format("{}:{}: '{}': an alias refers to a collection that contains it (anchored on line {}): "
                              "the recipe would be infinitely deep",
                              w.ctx.file, used_at, where.empty() ? "(top level)" : where, line_of(a)));
  }
  if (w.ancestors.size() >= kMaxRecipeDepth)
    throw Error(ErrorCode::kRecipe, fmt::format("{}:{}: '{}': nested more than {} levels deep", w.ctx.file,
                                                used_at, where, kMaxRecipeDepth));
  w.ancestors.push_back(node);
  if (node.IsSequence()) {
    std::size_t i = 0;
    for (const auto& item : node) check_tree(w, item, fmt::format("{}[{}]", where, i++), used_at);
  } else {
    std::map<std::string, int> seen;  // key -> 1-based line of its first occurrence
    for (const auto& kv : node) {
      if (kv.first.IsScalar()) {
        const std::string k = kv.first.Scalar();
        const std::string key = where.empty() ? k : where + "." + k;
        const int line = kv.first.Mark().line + 1;
        const auto [it, fresh] = seen.emplace(k, line);
        if (!fresh) {
          throw Error(ErrorCode::kRecipe,
                      fmt::format("{}:{}: '{}': given twice (lines {} and {}); keep one of them", w.ctx.file, line,
                                  key, it->second, line));
        }
        check_tree(w, kv.second, key, line);
      } else {
        check_tree(w, kv.first, where, used_at);
        check_tree(w, kv.second, where, used_at);
      }
    }
  }
  w.ancestors.pop_back();
}

// Whether two recipe paths name the same file (symlinks resolved where the path exists).
bool same_path(const std::filesystem::path& a, const std::filesystem::path& b) {
  const auto norm = [](const std::filesystem::path& p) {
    std::error_code ec;
    const auto abs = std::filesystem::absolute(p, ec).lexically_normal();
    const auto c = std::filesystem::weakly_canonical(abs, ec);
    return ec ? abs : c.lexically_normal();
  };
  return norm(a) == norm(b);
}

// Whether two model references (PATH or PATH+ADAPTER) name the same model.
bool same_model(const std::filesystem::path& path_a, const std::optional<std::filesystem::path>& adapter_a,
                const std::filesystem::path& path_b, const std::optional<std::filesystem::path>& adapter_b) {
  if (!same_path(path_a, path_b) || adapter_a.has_value() != adapter_b.has_value()) return false;
  return !adapter_a || same_path(*adapter_a, *adapter_b);
}

// The keys of mapping `node` must be among `known` (a misspelled one is an error, with a suggestion).
void check_keys(const Ctx& ctx, const YAML::Node& node, const std::string& where, const std::vector<std::string>& known) {
  for (const auto& kv : node) {
    const std::string k = kv.first.Scalar();
    if (std::find(known.begin(), known.end(), k) == known.end())
      ctx.fail(kv.first, where + "." + k, "unknown key" + did_you_mean(k, known) + " (accepted: " + fmt::format("{}", fmt::join(known, ", ")) + ")");
  }
}

RecipeModelRef parse_ref(const Ctx& ctx, const YAML::Node& node, const std::string& key) {
  RecipeModelRef ref;
  std::tie(ref.path, ref.adapter) = parse_model_ref(ctx, node, key);
  return ref;
}

// `tokenizer_source:` (mergekit's legacy form), `tokenizer:` and `chat_template:`.
void parse_tokenizer(const Ctx& ctx, const YAML::Node& root, Recipe& r) {
  const YAML::Node legacy = root["tokenizer_source"], modern = root["tokenizer"];
  if (legacy && modern && !legacy.IsNull() && !modern.IsNull())
    ctx.fail(modern, "tokenizer", "give either tokenizer_source or tokenizer, not both (mergekit refuses both too)");
  const auto source = [&](const YAML::Node& n, const std::string& key, RecipeTokenizer& t) {
    if (!n.IsScalar() || n.Scalar().empty()) ctx.fail(n, key, "expected union, base or a model path");
    if (n.Scalar() == "union") {
      t.source = RecipeTokenizer::Source::kUnion;
    } else if (n.Scalar() == "base") {
      t.source = RecipeTokenizer::Source::kBase;
    } else {
      t.source = RecipeTokenizer::Source::kModel;
      t.model = parse_ref(ctx, n, key);
    }
  };
  if (legacy && !legacy.IsNull()) {
    RecipeTokenizer t;
    source(legacy, "tokenizer_source", t);
    r.tokenizer = std::move(t);
  }
  if (modern && !modern.IsNull()) {
    if (!modern.IsMap()) ctx.fail(modern, "tokenizer", "expected {source: union | base | MODEL, tokens: {...}, pad_to_multiple_of: N}");
    check_keys(ctx, modern, "tokenizer", {"source", "tokens", "pad_to_multiple_of"});
    RecipeTokenizer t;
    if (const auto s = modern["source"]; s && !s.IsNull()) source(s, "tokenizer.source", t);
    if (const auto p = modern["pad_to_multiple_of"]; p && !p.IsNull()) {
      long long v = 0;
      try {
        v = p.as<long long>();
      } catch (const YAML::Exception&) {
        ctx.fail(p, "tokenizer.pad_to_multiple_of", "expected a positive integer, e.g. 64");
      }
      if (v < 1 || v > (1LL << 20)) ctx.fail(p, "tokenizer.pad_to_multiple_of", "expected an integer in [1, 1048576], e.g. 64");
      t.pad_to_multiple_of = static_cast<std::uint64_t>(v);
    }
    if (const auto toks = modern["tokens"]; toks && !toks.IsNull()) {
      if (!toks.IsMap()) ctx.fail(toks, "tokenizer.tokens", "expected a mapping TOKEN: {source: ..., force: BOOL}");
      for (const auto& kv : toks) {
        if (!kv.first.IsScalar() || kv.first.Scalar().empty()) ctx.fail(kv.first, "tokenizer.tokens", "expected a token text as key");
        const std::string token = kv.first.Scalar();
        const std::string at = "tokenizer.tokens." + escape_control(token);
        RecipeTokenEmbedding e;
        const YAML::Node cfg = kv.second;
        if (!cfg.IsNull()) {
          if (!cfg.IsMap()) ctx.fail(cfg, at, "expected {source: MODEL | {kind: zero} | {kind: model_token, ...}, force: BOOL}");
          check_keys(ctx, cfg, at, {"source", "force"});
          if (const auto f = cfg["force"]; f && !f.IsNull()) {
            try {
              e.force = f.as<bool>();
            } catch (const YAML::Exception&) {
              ctx.fail(f, at + ".force", "expected true or false");
            }
          }
          if (const auto s = cfg["source"]; s && !s.IsNull()) {
            if (s.IsScalar()) {
              e.kind = RecipeTokenEmbedding::Kind::kModel;
              e.model = parse_ref(ctx, s, at + ".source");
            } else if (s.IsMap()) {
              const YAML::Node kind = s["kind"];
              if (!kind || !kind.IsScalar()) ctx.fail(s, at + ".source.kind", "missing: zero or model_token");
              if (kind.Scalar() == "zero") {
                check_keys(ctx, s, at + ".source", {"kind"});
                e.kind = RecipeTokenEmbedding::Kind::kZero;
              } else if (kind.Scalar() == "model_token") {
                check_keys(ctx, s, at + ".source", {"kind", "model", "token", "token_id"});
                e.kind = RecipeTokenEmbedding::Kind::kModelToken;
                if (!s["model"]) ctx.fail(s, at + ".source.model", "missing: the model whose token row is taken");
                e.model = parse_ref(ctx, s["model"], at + ".source.model");
                const YAML::Node tok = s["token"], id = s["token_id"];
                if (tok && id) ctx.fail(s, at + ".source", "give token or token_id, not both (as mergekit)");
                if (!tok && !id) ctx.fail(s, at + ".source", "give token (a token text) or token_id (a row index)");
                if (tok) {
                  if (!tok.IsScalar() || tok.Scalar().empty()) ctx.fail(tok, at + ".source.token", "expected a token text");
                  e.token = tok.Scalar();
                } else {
                  try {
                    e.token_id = id.as<long long>();
                  } catch (const YAML::Exception&) {
                    ctx.fail(id, at + ".source.token_id", "expected a row index (an integer >= 0)");
                  }
                  if (*e.token_id < 0) ctx.fail(id, at + ".source.token_id", "expected a row index (an integer >= 0)");
                }
              } else {
                ctx.fail(kind, at + ".source.kind", "unknown kind '" + escape_control(kind.Scalar()) + "'" +
                                                        did_you_mean(kind.Scalar(), {"zero", "model_token"}) +
                                                        " (zero or model_token)");
              }
            } else {
              ctx.fail(s, at + ".source", "expected a model path or {kind: zero} or {kind: model_token, model, token}");
            }
          }
        }
        if (e.kind == RecipeTokenEmbedding::Kind::kDefault) {
          if (e.force) ctx.fail(cfg, at + ".force", "force needs a source: the row every model gets");
          ctx.warn(cfg.IsNull() ? kv.first : cfg, at,
                   "has no source: the token is added if the vocabulary lacks it, and models without it get mergekit's "
                   "default row (the base's, else the one model that has it, else the mean); mergekit stops with an "
                   "error on a token without a source");
        }
        for (const auto& [other, unused] : t.tokens)
          if (other == token) ctx.fail(kv.first, at, "listed twice");
        t.tokens.emplace_back(token, std::move(e));
      }
    }
    r.tokenizer = std::move(t);
  }
  if (const auto c = root["chat_template"]; c && !c.IsNull()) {
    // mergekit's built-in chat templates, by the names its `chat_template:` accepts (vocab_merge.cpp).
    const std::vector<std::string> builtin = detail::builtin_chat_template_names();
    const std::string listed = fmt::format("auto, {}", fmt::join(builtin, ", "));
    if (!c.IsScalar() || c.Scalar().empty())
      ctx.fail(c, "chat_template", "expected auto, a built-in name (" + fmt::format("{}", fmt::join(builtin, ", ")) +
                                       ") or a Jinja template");
    const std::string& text = c.Scalar();
    const bool named = text == "auto" || std::find(builtin.begin(), builtin.end(), text) != builtin.end();
    if (!named && (text.size() < 20 || text.find('{') == std::string::npos)) {
      std::vector<std::string> names = builtin;
      names.push_back("auto");
      ctx.fail(c, "chat_template",
               "'" + escape_control(text) + "' is neither a built-in template name" + did_you_mean(text, names) + " (" +
                   listed + ") nor a Jinja template (mergekit's rule: at least 20 characters and a '{')");
    }
    r.chat_template = text;
  }
}

bool all_scalar(const std::map<std::string, RecipeValue>& params) {
  for (const auto& [k, v] : params)
    if (v.kind != RecipeValue::Kind::kScalar) return false;
  return true;
}

}  // namespace

int merge_layer_index(std::string_view name) {
  static const std::set<std::string_view> kPrefixes = {"layers", "layer", "h", "blocks", "block"};
  std::size_t start = 0;
  std::string_view prev;
  while (start <= name.size()) {
    const std::size_t dot = name.find('.', start);
    const std::string_view part = name.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start);
    if (!part.empty() && kPrefixes.count(prev) && part.size() <= 6 &&
        part.find_first_not_of("0123456789") == std::string_view::npos)
      return std::stoi(std::string(part));
    prev = part;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return -1;
}

std::string merge_with_layer_index(std::string_view name, int layer) {
  static const std::set<std::string_view> kPrefixes = {"layers", "layer", "h", "blocks", "block"};
  std::size_t start = 0;
  std::string_view prev;
  while (start <= name.size()) {
    const std::size_t dot = name.find('.', start);
    const std::size_t len = dot == std::string_view::npos ? name.size() - start : dot - start;
    const std::string_view part = name.substr(start, len);
    if (!part.empty() && kPrefixes.count(prev) && part.size() <= 6 &&
        part.find_first_not_of("0123456789") == std::string_view::npos)
      return std::string(name.substr(0, start)) + std::to_string(layer) + std::string(name.substr(start + len));
    prev = part;
    if (dot == std::string_view::npos) break;
    start = dot + 1;
  }
  return std::string(name);
}

namespace {
// mergekit's gradient: layer i of num_layers sits at t = i / (num_layers - 1), t = 1 for a single layer;
// a tensor outside the layers (embeddings, final norm, head) at t = 0.
double interpolate(const std::vector<double>& v, int layer, int num_layers) {
  if (v.size() == 1 || layer < 0) return v.front();
  if (num_layers <= 1) return v.back();
  double x = static_cast<double>(layer) / (num_layers - 1) * static_cast<double>(v.size() - 1);
  x = std::clamp(x, 0.0, static_cast<double>(v.size() - 1));
  const auto i = static_cast<std::size_t>(std::floor(x));
  if (i + 1 >= v.size()) return v.back();
  const double f = x - static_cast<double>(i);
  return v[i] + (v[i + 1] - v[i]) * f;
}
}  // namespace

bool RecipeValue::FilterEntry::matches(const std::string& tensor_name) const {
  if (!pattern) return true;
  if (is_regex) return std::regex_search(tensor_name, regex);
  return *pattern == "*" || tensor_name.find(*pattern) != std::string::npos;  // mergekit: `filter in name`
}

double RecipeValue::resolve(const std::string& tensor_name, int layer, int num_layers) const {
  if (kind != Kind::kFilters) return interpolate(values, layer, num_layers);
  for (const auto& f : filters)
    if (f.matches(tensor_name)) return interpolate(f.values, layer, num_layers);
  return std::nan("");  // no entry matched: the caller uses the default
}

void Recipe::resolve(const std::string& tensor_name, int num_layers, std::vector<MergeModelParams>& model_params,
                     MergeGlobalParams& global, ResolvedValues* values) const {
  std::vector<const std::map<std::string, RecipeValue>*> maps;
  for (const auto& m : models) maps.push_back(&m.params);
  resolve_at(tensor_name, merge_layer_index(tensor_name), num_layers, maps, nullptr, model_params, global, values);
}

void Recipe::resolve_at(const std::string& tensor_name, int layer, int num_layers,
                        const std::vector<const std::map<std::string, RecipeValue>*>& model_maps,
                        const std::map<std::string, RecipeValue>* scope, std::vector<MergeModelParams>& model_params,
                        MergeGlobalParams& global, ResolvedValues* values) const {
  model_params.assign(model_maps.size(), MergeModelParams{});
  if (values) {
    values->global.clear();
    values->models.assign(model_maps.size(), {});
  }
  global = MergeGlobalParams{};
  global.seed = seed;
  // mergekit's ConfigReader: the most specific place that gives a value for this tensor wins (a filter
  // list that matches nothing falls through to the next place).
  const auto find = [](const std::map<std::string, RecipeValue>* map, const std::string& name) -> const RecipeValue* {
    if (map == nullptr) return nullptr;
    const auto it = map->find(name);
    return it == map->end() ? nullptr : &it->second;
  };
  auto pick = [&](const RecipeValue* v, double def) {
    if (!v) return def;
    const double r = v->resolve(tensor_name, layer, num_layers);
    return std::isnan(r) ? def : r;
  };
  bool disjoint_given = false;
  for (const auto& spec : method->params) {
    const std::string name(spec.name);
    const RecipeValue* gv = find(&params, name);
    const RecipeValue* sv = find(scope, name);
    if (name == "disjoint") {
      if (!gv && !sv) continue;  // taskvec's explicit divisor; else normalize decides (below)
      disjoint_given = true;
    }
    const double outer = pick(sv, pick(gv, spec.default_value));
    if (spec.scope == MergeParamScope::kGlobal) {
      merge_detail::apply_param(name, outer, nullptr, &global);
      if (values) values->global.emplace_back(name, outer);
      continue;
    }
    for (std::size_t m = 0; m < model_maps.size(); ++m) {
      const double v = pick(find(model_maps[m], name), outer);
      merge_detail::apply_param(name, v, &model_params[m], nullptr);
      if (values) values->models[m].emplace_back(name, v);
    }
  }
  // TIES family: mergekit's normalize divides by the sum of the agreeing weights; taskvec's `disjoint`
  // (mean = / sum |w|, sum = no division) replaces it when given.
  if (method->find_param("disjoint") && !disjoint_given)
    global.divisor = global.normalize ? MergeDivisor::kSignedWeights : MergeDivisor::kNone;
  const std::string at = file.string() + ": tensor '" + tensor_name + "'";
  if (global.normalize && method->name == "linear") {  // mergekit divides by 0 here; taskvec refuses
    double sum = 0;
    for (const auto& p : model_params) sum += p.weight;
    if (sum == 0) throw Error(ErrorCode::kRecipe, at + ": 'normalize': the weights sum to 0");
  }
  if (method->find_param("epsilon")) {
    for (std::size_t m = 0; m < model_params.size(); ++m) {
      const auto& p = model_params[m];
      if (p.density < 1 && (p.density - p.epsilon <= 0 || p.density + p.epsilon >= 1))
        throw Error(ErrorCode::kRecipe, at + ": models[" + std::to_string(m) + "] 'epsilon': density " +
                                            fmt::format("{:g}", p.density) + " +- epsilon " + fmt::format("{:g}", p.epsilon) +
                                            " must lie inside (0, 1) (mergekit refuses it too)");
    }
  }
}

namespace {
Recipe parse_recipe_node(const std::string& yaml_text, const std::filesystem::path& file);
std::vector<Recipe> parse_recipe_documents(const std::string& yaml_text, const std::filesystem::path& file);
}  // namespace

std::vector<Recipe> parse_recipe_stages(const std::string& yaml_text, const std::filesystem::path& file) {
  try {
    return parse_recipe_documents(yaml_text, file);
  } catch (const YAML::Exception& e) {
    throw Error(ErrorCode::kRecipe, file.string() + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
}

std::vector<Recipe> load_recipe_stages(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(ErrorCode::kIo, file.string() + ": cannot read the recipe");
  std::stringstream s;
  s << in.rdbuf();
  return parse_recipe_stages(s.str(), file);
}

Recipe parse_recipe(const std::string& yaml_text, const std::filesystem::path& file) {
  try {
    return parse_recipe_node(yaml_text, file);
  } catch (const YAML::Exception& e) {  // e.g. a mapping used as a key: still a recipe error
    throw Error(ErrorCode::kRecipe, file.string() + ":" + std::to_string(e.mark.line + 1) + ": " + e.msg);
  }
}

namespace {
// The start marks of the first `limit` documents of `text`, read with a parser that builds nothing.
// yaml-cpp reports a token it cannot start a document with (a stray ',' at the top level) as an empty
// document that consumes nothing: a second start at the same position is `stuck_at`.
struct DocumentStarts {
  std::vector<YAML::Mark> marks;
  std::optional<YAML::Mark> stuck_at;
};

DocumentStarts count_documents(const std::string& text, std::size_t limit) {
  struct Starts final : YAML::EventHandler {
    std::vector<YAML::Mark> marks;
    void OnDocumentStart(const YAML::Mark& mark) override { marks.push_back(mark); }
    void OnDocumentEnd() override {}
    void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
    void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
    void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t, const std::string&) override {}
    void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnSequenceEnd() override {}
    void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t, YAML::EmitterStyle::value) override {}
    void OnMapEnd() override {}
  } handler;
  std::istringstream in(text);
  YAML::Parser parser(in);
  DocumentStarts out;
  while (handler.marks.size() < limit && parser.HandleNextDocument(handler)) {
    const auto& m = handler.marks;
    if (m.size() >= 2 && m[m.size() - 1].pos == m[m.size() - 2].pos) {
      out.stuck_at = m.back();
      break;
    }
  }
  out.marks = std::move(handler.marks);
  return out;
}

// mergekit's `slices:` form: each slice lists its sources (model + layer_range [begin, end)), with
// per-source and per-slice parameters and an optional slice base_model.
void parse_slices(const Ctx& ctx, const YAML::Node& root, Recipe& r) {
  const YAML::Node slices = root["slices"];
  if (!slices.IsSequence() || slices.size() == 0) ctx.fail(slices, "slices", "expected a non-empty list of {sources: [...]}");
  const std::string mname(r.method->name);
  const auto model_index = [&](const std::filesystem::path& path, const std::optional<std::filesystem::path>& adapter) {
    for (std::size_t i = 0; i < r.models.size(); ++i)
      if (same_model(r.models[i].path, r.models[i].adapter, path, adapter))
        return i;
    RecipeModel m;
    m.path = path;
    m.adapter = adapter;
    r.models.push_back(std::move(m));
    return r.models.size() - 1;
  };
  for (std::size_t s = 0; s < slices.size(); ++s) {
    const YAML::Node item = slices[s];
    const std::string where = fmt::format("slices[{}]", s);
    if (!item.IsMap()) ctx.fail(item, where, "expected {sources: [...], parameters: {...}}");
    for (const auto& kv : item) {
      const std::string k = kv.first.as<std::string>();
      if (k == "residual_weight")
        ctx.fail(kv.first, where + "." + k, "is a mergekit key taskvec does not support yet (docs/MERGEKIT.md)");
      if (k != "sources" && k != "parameters" && k != "base_model")
        ctx.fail(kv.first, where + "." + k,
                 "unknown key" + did_you_mean(k, {"sources", "parameters", "base_model"}) +
                     " (accepted: sources, parameters, base_model)");
    }
    RecipeSlice slice;
    std::optional<std::pair<std::filesystem::path, std::optional<std::filesystem::path>>> base;
    if (r.base_model) base.emplace(*r.base_model, r.base_model_adapter);
    if (const auto b = item["base_model"]) base = parse_model_ref(ctx, b, where + ".base_model");
    const YAML::Node sources = item["sources"];
    if (!sources || !sources.IsSequence() || sources.size() == 0)
      ctx.fail(sources ? sources : item, where + ".sources", "expected a non-empty list of {model, layer_range}");
    for (std::size_t j = 0; j < sources.size(); ++j) {
      const YAML::Node src = sources[j];
      const std::string at = fmt::format("{}.sources[{}]", where, j);
      if (!src.IsMap()) ctx.fail(src, at, "expected {model: PATH, layer_range: [BEGIN, END]}");
      for (const auto& kv : src) {
        const std::string k = kv.first.as<std::string>();
        if (k != "model" && k != "layer_range" && k != "parameters")
          ctx.fail(kv.first, at + "." + k,
                   "unknown key" + did_you_mean(k, {"model", "layer_range", "parameters"}) +
                       " (accepted: model, layer_range, parameters)");
      }
      if (!src["model"]) ctx.fail(src, at + ".model", "missing");
      if (!src["layer_range"]) ctx.fail(src, at + ".layer_range", "missing");
      const auto [path, adapter] = parse_model_ref(ctx, src["model"], at + ".model");
      RecipeSliceSource source;
      source.model = model_index(path, adapter);
      const YAML::Node range = src["layer_range"];
      try {
        if (!range.IsSequence() || range.size() != 2) throw YAML::Exception(range.Mark(), "");
        source.begin = range[0].as<int>();
        source.end = range[1].as<int>();
      } catch (const YAML::Exception&) {
        ctx.fail(range, at + ".layer_range", "expected [BEGIN, END], two layer indices (END excluded)");
      }
      if (source.begin < 0)
        ctx.fail(range, at + ".layer_range", fmt::format("[{}, {}] starts before layer 0", source.begin, source.end));
      if (source.end <= source.begin)
        ctx.fail(range, at + ".layer_range",
                 fmt::format("[{}, {}] holds no layer (the end is excluded: [{}, {}] is one layer)", source.begin,
                             source.end, source.begin, source.begin + 1));
      if (const auto p = src["parameters"]; p && !p.IsNull()) source.params = parse_params(ctx, p, at + ".parameters", *r.method, true);
      if (base && same_model(path, adapter, base->first, base->second)) {
        if (slice.base) ctx.fail(src, at, "the slice's base model is listed twice");
        slice.base = source.model;
      }
      if (!slice.sources.empty() && source.end - source.begin != slice.layers())
        ctx.fail(range, at + ".layer_range",
                 fmt::format("spans {} layers but the slice's first source {}: all sources of a slice span the same "
                             "number of layers (as mergekit requires)", source.end - source.begin, slice.layers()));
      slice.sources.push_back(std::move(source));
    }
    if (const auto p = item["parameters"]; p && !p.IsNull()) slice.params = parse_params(ctx, p, where + ".parameters", *r.method, false);
    // The models the method combines in this slice: the sources except the base (the base is w_0 / the t = 0 end).
    const std::size_t others = slice.sources.size() - (slice.base ? 1 : 0);
    if (mname == "slerp" && base && !slice.base)
      ctx.warn(sources, where + ".sources",
               "slerp with a base_model that is not one of this slice's sources: taskvec interpolates sources[0] (t = 0) "
               "to sources[1] and ignores the base; mergekit refuses this recipe");
    if (r.method->needs_base && !slice.base)
      ctx.fail(sources, where + ".sources",
               mname + " needs the base model among each slice's sources (mergekit reads the base's layers from there); "
                       "add it with the layer_range to use");
    const bool linear_like = mname == "linear" || mname == "passthrough";
    const std::size_t count = linear_like ? slice.sources.size() : (mname == "slerp" && slice.base ? others + 1 : others);
    if (count < r.method->min_models || count > r.method->max_models)
      ctx.fail(sources, where + ".sources",
               fmt::format("{} takes {}{} model{} per slice, got {}", mname, r.method->min_models,
                           r.method->max_models == r.method->min_models ? "" : " or more",
                           r.method->min_models == 1 && r.method->max_models == 1 ? "" : "s", count));
    r.slices.push_back(std::move(slice));
  }
}

constexpr std::size_t kMaxStages = 64;  // documents of a multi-stage recipe

Recipe parse_recipe_root(const YAML::Node& root, const std::string& yaml_text, const std::filesystem::path& file);

// The documents of `yaml_text`, loaded. Not with LoadAll alone: on a stray ',' or ']' yaml-cpp 0.7
// returns the same empty document for ever without consuming the token, and LoadAll never ends; the
// documents are counted first with a parser that detects that.
std::vector<YAML::Node> load_documents(const std::string& yaml_text, const std::string& file) {
  try {
    const DocumentStarts starts = count_documents(yaml_text, kMaxStages + 2);
    if (starts.stuck_at) {
      throw Error(ErrorCode::kRecipe, fmt::format("{}:{}: invalid YAML: unexpected '{}'", file, starts.stuck_at->line + 1,
                                                  escape_control(yaml_text.substr(std::min<std::size_t>(starts.stuck_at->pos, yaml_text.size()), 1))));
    }
    if (starts.marks.size() > kMaxStages)
      throw Error(ErrorCode::kRecipe, fmt::format("{}: more than {} YAML documents (stages)", file, kMaxStages));
    if (starts.marks.size() <= 1) return {YAML::Load(yaml_text)};
    return YAML::LoadAll(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw Error(ErrorCode::kRecipe, file + ":" + std::to_string(e.mark.line + 1) + ": invalid YAML: " + e.msg);
  }
}

Recipe parse_recipe_node(const std::string& yaml_text, const std::filesystem::path& file) {
  const std::vector<YAML::Node> docs = load_documents(yaml_text, file.string());
  if (docs.size() > 1) {
    throw Error(ErrorCode::kRecipe,
                fmt::format("{}: the file holds {} YAML documents (separated by '---'; the second starts near line {}): "
                            "a multi-stage recipe, which taskvec merge runs stage by stage (load_recipe_stages)",
                            file.string(), docs.size(), docs[1].Mark().line + 1));
  }
  return parse_recipe_root(docs.front(), yaml_text, file);
}

std::vector<Recipe> parse_recipe_documents(const std::string& yaml_text, const std::filesystem::path& file) {
  std::vector<Recipe> stages;
  for (const YAML::Node& doc : load_documents(yaml_text, file.string())) {
    if (doc.IsNull()) continue;  // an empty document (a trailing '---')
    stages.push_back(parse_recipe_root(doc, yaml_text, file));
  }
  if (stages.empty()) throw Error(ErrorCode::kRecipe, file.string() + ": the file holds no recipe");
  if (stages.size() > 1) {
    std::set<std::string> names;
    std::size_t unnamed = 0;
    for (const Recipe& r : stages) {
      if (!r.name) {
        ++unnamed;
        continue;
      }
      if (!names.insert(*r.name).second)
        throw Error(ErrorCode::kRecipe, fmt::format("{}: two stages are named '{}'", file.string(), *r.name));
    }
    if (unnamed > 1)
      throw Error(ErrorCode::kRecipe, fmt::format("{}: {} stages have no 'name'; at most one may (the final merge, "
                                                  "written to the output)", file.string(), unnamed));
  }
  return stages;
}

Recipe parse_recipe_root(const YAML::Node& root, const std::string& yaml_text, const std::filesystem::path& file) {
  Recipe r;
  Ctx ctx{file.string(), &r.warnings};
  if (!root.IsMap()) throw Error(ErrorCode::kRecipe, ctx.file + ": a recipe is a YAML mapping (merge_method, models, ...)");
  TreeWalk walk{ctx, {}, 0};
  check_tree(walk, root, "", 1);

  r.file = file;
  r.source_text = yaml_text;
  static const std::vector<std::string> kKeys = {"merge_method", "base_model", "models",    "slices",
                                                 "parameters",   "dtype",      "out_dtype", "seed",
                                                 "name",         "tokenizer_source", "tokenizer", "chat_template"};
  // mergekit's top-level keys taskvec does not read yet (docs/MERGEKIT.md).
  static const std::set<std::string> kMergekitKeys = {"modules"};
  for (const auto& kv : root) {
    const std::string k = kv.first.as<std::string>();
    if (std::find(kKeys.begin(), kKeys.end(), k) != kKeys.end()) continue;
    if (kMergekitKeys.count(k))
      ctx.fail(kv.first, k, "is a mergekit key taskvec does not support yet (docs/MERGEKIT.md)");
    ctx.fail(kv.first, k, "unknown key" + did_you_mean(k, kKeys) +
                              " (accepted: merge_method, base_model, models, slices, parameters, dtype, out_dtype, seed, name, "
                              "tokenizer_source, tokenizer, chat_template)");
  }
  if (const auto n = root["name"]) {
    if (!n.IsScalar() || n.Scalar().empty() || n.Scalar().find_first_of("/\\") != std::string::npos || n.Scalar() == "." ||
        n.Scalar() == "..")
      ctx.fail(n, "name", "expected a stage name (no '/' or '\\'), e.g. first-merge");
    r.name = n.Scalar();
  }
  const YAML::Node method = root["merge_method"];
  if (!method) ctx.fail_plain("merge_method", "missing");
  if (!method.IsScalar()) ctx.fail(method, "merge_method", "expected a method name");
  r.method = find_merge_method(method.Scalar());
  if (!r.method) {
    static const std::set<std::string> kMergekitMethods = {};  // every mergekit method is implemented
    if (kMergekitMethods.count(method.Scalar()))
      ctx.fail(method, "merge_method", "'" + method.Scalar() + "' is a mergekit method taskvec does not support yet (docs/MERGEKIT.md)");
    std::string names;
    std::vector<std::string> known;
    for (const auto& m : merge_methods()) {
      names += (names.empty() ? "" : ", ") + std::string(m.name);
      known.emplace_back(m.name);
    }
    ctx.fail(method, "merge_method",
             "unknown method '" + escape_control(method.Scalar()) + "'" + did_you_mean(method.Scalar(), known) + " (known: " + names + ")");
  }
  if (const auto base = root["base_model"]) std::tie(r.base_model, r.base_model_adapter) = parse_model_ref(ctx, base, "base_model");
  if (const auto seed = root["seed"]) {
    try {
      const auto s = seed.as<long long>();
      if (s < 0) ctx.fail(seed, "seed", "must be >= 0");
      r.seed = static_cast<std::uint64_t>(s);
    } catch (const YAML::Exception&) {
      ctx.fail(seed, "seed", "expected a non-negative integer");
    }
  }
  if (const auto d = root["dtype"]) r.dtype = parse_dtype_key(ctx, d, "dtype");
  if (const auto d = root["out_dtype"]) r.out_dtype = parse_dtype_key(ctx, d, "out_dtype");
  if (const auto p = root["parameters"]; p && !p.IsNull()) {
    r.params = parse_params(ctx, p, "parameters", *r.method, false);
    if (r.params.count("normalize") && r.params.count("disjoint"))
      ctx.fail(p, "parameters.normalize", "give either disjoint (mean | sum) or its mergekit alias normalize, not both");
  }

  parse_tokenizer(ctx, root, r);

  if (root["slices"]) {
    if (root["models"]) ctx.fail(root["slices"], "slices", "give either models or slices, not both (as mergekit)");
    parse_slices(ctx, root, r);
    return r;
  }
  const YAML::Node models = root["models"];
  if (!models) ctx.fail_plain("models", "missing (or slices)");
  if (!models.IsSequence() || models.size() == 0) ctx.fail(models, "models", "expected a non-empty list");
  for (std::size_t i = 0; i < models.size(); ++i) {
    const YAML::Node item = models[i];
    const std::string where = "models[" + std::to_string(i) + "]";
    RecipeModel m;
    if (item.IsScalar()) {
      std::tie(m.path, m.adapter) = parse_model_ref(ctx, item, where);
    } else {
      if (!item.IsMap()) ctx.fail(item, where, "expected {model: PATH, parameters: {...}}");
      for (const auto& kv : item) {
        const std::string k = kv.first.as<std::string>();
        if (k != "model" && k != "parameters" && k != "adapter")
          ctx.fail(kv.first, where + "." + k, "unknown key (accepted: model, adapter, parameters)");
      }
      if (!item["model"]) ctx.fail(item, where + ".model", "missing");
      std::tie(m.path, m.adapter) = parse_model_ref(ctx, item["model"], where + ".model");
      if (const auto a = item["adapter"]) {
        if (m.adapter) ctx.fail(a, where + ".adapter", "given twice: in 'model: MODEL+ADAPTER' and in 'adapter:'");
        m.adapter = parse_path(ctx, a, where + ".adapter");
      }
      if (const auto p = item["parameters"]; p && !p.IsNull())
        m.params = parse_params(ctx, p, where + ".parameters", *r.method, true);
    }
    r.models.push_back(std::move(m));
  }

  const std::string mname(r.method->name);
  if (r.method->needs_base && !r.base_model) ctx.fail_plain("base_model", "missing: " + mname + " needs a base model");
  // mergekit uses a models entry that is the base_model only as the base (generalized task arithmetic
  // skips it, model_stock and slerp take it as w_0 / the t = 0 end); linear averages it like any model.
  if (r.base_model && mname != "linear" && mname != "karcher") {
    const auto is_base = [&](const RecipeModel& m) {
      return same_model(m.path, m.adapter, *r.base_model, r.base_model_adapter);
    };
    std::vector<RecipeModel> kept;
    for (std::size_t i = 0; i < r.models.size(); ++i) {
      if (!is_base(r.models[i])) {
        kept.push_back(std::move(r.models[i]));
        continue;
      }
      ctx.warn(models[i], fmt::format("models[{}]", i),
               "is the base_model: used only as the base (" +
                   std::string(mname == "slerp" ? "the t = 0 end" : "its task vector would be zero") +
                   "), as mergekit does" + (r.models[i].params.empty() ? "" : "; its parameters are ignored"));
    }
    r.models = std::move(kept);
    if (r.models.empty())
      ctx.fail(models, "models", "every entry is the base_model: " + mname + " needs at least one other model");
  }
  if (mname == "model_stock" && r.models.size() < 2)
    ctx.warn(models, "models",
             "model_stock with one model besides the base gives that model (ratio 1); mergekit refuses fewer than two");
  if (mname == "slerp" && r.base_model && r.models.size() == 2)
    ctx.warn(models, "models",
             "slerp with a base_model that is not one of its two models: taskvec interpolates models[0] (t = 0) to "
             "models[1] and ignores the base; mergekit refuses this recipe");
  if (mname == "karcher" && r.base_model) {
    // mergekit appends a base_model that is not among the models to karcher's inputs: one more model.
    bool listed = false;
    for (const auto& m : r.models) listed = listed || same_model(m.path, m.adapter, *r.base_model, r.base_model_adapter);
    if (!listed) {
      RecipeModel b;
      b.path = *r.base_model;
      b.adapter = r.base_model_adapter;
      r.models.push_back(std::move(b));
      ctx.warn(root["base_model"], "base_model", "karcher averages the base_model too, as one more model (as mergekit)");
    }
  }
  if (mname == "linear" && r.base_model) {
    bool listed = false;
    for (const auto& m : r.models) listed = listed || same_model(m.path, m.adapter, *r.base_model, r.base_model_adapter);
    if (!listed && r.params.count("weight")) {
      // mergekit appends the base_model to the inputs; with a global weight it is averaged in.
      RecipeModel b;
      b.path = *r.base_model;
      b.adapter = r.base_model_adapter;
      r.models.push_back(std::move(b));
      ctx.warn(root["base_model"], "base_model",
               "linear averages the base_model too (it is not in models, and mergekit appends it with the global weight)");
    } else if (!listed) {
      ctx.warn(root["base_model"], "base_model",
               "linear ignores a base_model that is not in models (mergekit would append it and fail for want of a weight)");
    }
  }
  if (const auto it = r.params.find("t"); it != r.params.end() && mname == "slerp") {
    for (double v : it->second.values)
      if (v < 0 || v > 1) {
        ctx.warn(root["parameters"], "parameters.t", fmt::format("t = {:g} lies outside [0, 1]: slerp extrapolates", v));
        break;
      }
  }
  std::size_t endpoints = r.models.size();
  if (r.method->name == "slerp" && r.base_model && r.models.size() == 1) endpoints = 2;  // base is the t = 0 end
  if (endpoints < r.method->min_models || endpoints > r.method->max_models)
    ctx.fail(models, "models",
             mname + " takes " + std::to_string(r.method->min_models) +
                 (r.method->max_models == r.method->min_models ? "" : " or more") + " models, got " +
                 std::to_string(r.models.size()));

  // Cross-parameter checks that need no tensor name; per-tensor ones run again in merge_checkpoints.
  bool scalars = all_scalar(r.params);
  for (const auto& m : r.models) scalars = scalars && all_scalar(m.params);
  if (scalars) {
    std::vector<MergeModelParams> mp;
    MergeGlobalParams gp;
    r.resolve("", 1, mp, gp);
  }
  return r;
}
}  // namespace

Recipe load_recipe(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(ErrorCode::kIo, file.string() + ": cannot read the recipe");
  std::stringstream s;
  s << in.rdbuf();
  return parse_recipe(s.str(), file);
}

namespace detail {

bool same_recipe_model(const RecipeModelRef& ref, const std::filesystem::path& path,
                       const std::optional<std::filesystem::path>& adapter) {
  return same_model(ref.path, ref.adapter, path, adapter);
}

}  // namespace detail

}  // namespace taskvec
