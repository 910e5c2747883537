// taskvec sweep -m NAME=PATH ... 'EXPR in L' --values SPEC --eval 'CMD {model}' -o OUT: the paper's
// protocol for the scaling coefficient (Ilharco et al. 2023, sec. 2: lambda chosen on held-out validation
// data). Each candidate EXPR with L = v is written (as `taskvec edit` writes it) into a temporary folder
// beside OUT, the evaluation command runs with {model} replaced by its path and prints a score on its last
// line (a number, or a JSON object of named numbers), and the candidate is deleted unless --keep-all. The
// chosen one is written to OUT; the curve goes to sweep.json (and sweep.png with gnuplot) beside it.
// Selection: max:NAME / min:NAME, or the paper's negation rule negation:TARGET,CONTROL,RATIO (lowest
// TARGET among the candidates whose CONTROL is >= RATIO x CONTROL at L = 0). docs/CLI.md.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>

#include <fmt/format.h>

#include "cli.hpp"
#include "taskvec/error.hpp"
#include "taskvec/safetensors.hpp"

namespace taskvec::cli {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

// The parameter's values: "START:STOP:STEP" (STOP included when the steps reach it) or "V1,V2,...".
std::vector<double> parse_values(const std::string& spec) {
  const auto number = [&](const std::string& t) {
    char* end = nullptr;
    const double v = std::strtod(t.c_str(), &end);
    if (t.empty() || end != t.c_str() + t.size() || !std::isfinite(v))
      throw Error(ErrorCode::kInvalidArgument, fmt::format("--values '{}': '{}' is not a number", spec, t));
    return v;
  };
  std::vector<double> out;
  if (spec.find(':') != std::string::npos) {
    std::vector<std::string> parts;
    std::size_t at = 0;
    for (std::size_t c; (c = spec.find(':', at)) != std::string::npos; at = c + 1) parts.push_back(spec.substr(at, c - at));
    parts.push_back(spec.substr(at));
    if (parts.size() != 3) throw Error(ErrorCode::kInvalidArgument, fmt::format("--values '{}': expected START:STOP:STEP", spec));
    const double a = number(parts[0]), b = number(parts[1]), s = number(parts[2]);
    if (s <= 0 || b < a) throw Error(ErrorCode::kInvalidArgument, fmt::format("--values '{}': expected STEP > 0 and STOP >= START", spec));
    const double n = std::floor((b - a) / s + 1e-9);
    if (n > 1000) throw Error(ErrorCode::kInvalidArgument, fmt::format("--values '{}': {} candidates, more than 1000", spec, n + 1));
    for (int i = 0; i <= static_cast<int>(n); ++i) out.push_back(a + i * s);  // no accumulated rounding
  } else {
    std::size_t at = 0;
    for (std::size_t c; (c = spec.find(',', at)) != std::string::npos; at = c + 1) out.push_back(number(spec.substr(at, c - at)));
    out.push_back(number(spec.substr(at)));
  }
  return out;
}

std::string value_text(double v) {
  std::string t = fmt::format("{:.6g}", v);
  return t == "-0" ? "0" : t;
}

double no_negative_zero(double v) { return v == 0 ? 0.0 : v; }

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

struct Rule {
  enum class Kind { kMax, kMin, kNegation } kind = Kind::kMax;
  std::string score = "score", control;
  double ratio = 0.95;
};

Rule parse_rule(const std::string& text) {
  Rule r;
  const auto colon = text.find(':');
  const std::string kind = text.substr(0, colon), rest = colon == std::string::npos ? "" : text.substr(colon + 1);
  if (kind == "max" || kind == "min") {
    r.kind = kind == "max" ? Rule::Kind::kMax : Rule::Kind::kMin;
    if (!rest.empty()) r.score = rest;
    return r;
  }
  if (kind == "negation") {
    const auto c1 = rest.find(','), c2 = c1 == std::string::npos ? c1 : rest.find(',', c1 + 1);
    if (c1 == std::string::npos || c1 == 0 || c2 == c1 + 1)
      throw Error(ErrorCode::kInvalidArgument,
                  fmt::format("--select '{}': expected negation:TARGET,CONTROL[,RATIO], e.g. negation:target,control,0.95", text));
    r.kind = Rule::Kind::kNegation;
    r.score = rest.substr(0, c1);
    r.control = rest.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1);
    if (c2 != std::string::npos) {
      char* end = nullptr;
      const std::string t = rest.substr(c2 + 1);
      r.ratio = std::strtod(t.c_str(), &end);
      if (t.empty() || end != t.c_str() + t.size() || !(r.ratio > 0) || r.ratio > 1)
        throw Error(ErrorCode::kInvalidArgument, fmt::format("--select '{}': RATIO must be in (0, 1]", text));
    }
    return r;
  }
  throw Error(ErrorCode::kInvalidArgument,
              fmt::format("--select '{}': expected max:NAME, min:NAME or negation:TARGET,CONTROL,RATIO", text));
}

// The scores the evaluation printed: its last non-empty line, a number ("score") or a JSON object.
std::map<std::string, double> parse_scores(const std::string& out, const std::string& label) {
  std::string line;
  std::size_t end = out.find_last_not_of(" \t\r\n");
  if (end != std::string::npos) {
    const std::size_t begin = out.find_last_of('\n', end);
    line = out.substr(begin == std::string::npos ? 0 : begin + 1, end + 1 - (begin == std::string::npos ? 0 : begin + 1));
  }
  const std::size_t b = line.find_first_not_of(" \t\r");
  line = b == std::string::npos ? "" : line.substr(b);
  std::map<std::string, double> scores;
  if (!line.empty() && line.front() == '{') {
    try {
      const auto j = nlohmann::json::parse(line);
      for (const auto& [k, v] : j.items()) {
        if (!v.is_number())
          throw Error(ErrorCode::kInvalidArgument, fmt::format("{}: score '{}' is not a number in '{}'", label, k, line));
        scores[k] = v.get<double>();
      }
      if (!scores.empty()) return scores;
    } catch (const nlohmann::json::exception&) {
    }
  } else if (!line.empty()) {
    char* e = nullptr;
    const double v = std::strtod(line.c_str(), &e);
    if (e != line.c_str() && std::string_view(e).find_first_not_of(" \t\r") == std::string_view::npos && std::isfinite(v))
      return {{"score", v}};
  }
  throw Error(ErrorCode::kInvalidArgument,
              fmt::format("{} printed '{}' as its last line: expected a number or a JSON object of numbers, e.g. "
                          "{{\"target\": 0.12, \"control\": 0.91}}", label, escape_control(line)));
}

struct Candidate {
  double value = 0;
  std::map<std::string, double> scores;
};

// A temporary folder beside the output, removed at the end and on SIGINT / SIGTERM / SIGHUP.
struct TempFolder {
  fs::path path;
  int slot = -1;
  bool keep = false;
  ~TempFolder() {
    release_interrupt_folder(slot);
    std::error_code ec;
    if (!keep && !path.empty()) fs::remove_all(path, ec);
  }
};

}  // namespace

void add_sweep_command(CLI::App& app, const GlobalFlags& global, Action& action) {
  auto* cmd = app.add_subcommand(
      "sweep", "Choose a scaling coefficient on validation data: write EXPR for each value of L, run an evaluation "
               "command on it, keep the best (e.g. 'pre + L*(tau(a) + tau(b))' --values 0:1:0.05 --eval 'python3 eval.py {model}')");
  struct Args {
    std::vector<std::string> models;
    std::string pretrained = "pre", expression, values, eval, output, keep_all, select = "max:score", parameter = "L";
    EditFlags flags;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("-m,--model", args->models, "NAME=PATH of a checkpoint; repeat for each model")->required()->allow_extra_args(false);
  cmd->add_option("--pretrained", args->pretrained, "Name of the pretrained model, the base of tau() (default: pre)");
  cmd->add_option("expression", args->expression, "Expression as for `taskvec edit`, with the parameter L")->required();
  cmd->add_option("--values", args->values, "Values of L: START:STOP:STEP (STOP included) or V1,V2,...")->required();
  cmd->add_option("--eval", args->eval,
                  "Evaluation command run by /bin/sh, {model} replaced by a candidate's path; its last line of output "
                  "is a number or a JSON object of named numbers")->required();
  cmd->add_option("-o,--output", args->output, "Where the chosen candidate is written (.safetensors file or folder)")->required();
  cmd->add_option("--select", args->select,
                  "max:NAME (default max:score), min:NAME, or negation:TARGET,CONTROL,RATIO: the lowest TARGET among "
                  "the candidates whose CONTROL is >= RATIO x its value at L = 0 (the paper's rule, RATIO 0.95)");
  cmd->add_option("--keep-all", args->keep_all, "Keep every candidate in DIR (DIR/L_VALUE) instead of deleting it");
  cmd->add_option("--param", args->parameter, "Name of the parameter in the expression (default: L)");
  add_edit_flags(*cmd, args->flags);
  cmd->callback([&global, &action, args] {
    action = [&global, args]() -> int {
      finish_edit_options(args->flags, global);
      EditOptions options = args->flags.options;
      if (options.dry_run) throw Error(ErrorCode::kInvalidArgument, "--dry-run: a sweep evaluates real candidates; run `taskvec edit --dry-run` with a value instead");
      const std::vector<double> values = parse_values(args->values);
      const Rule rule = parse_rule(args->select);
      if (args->eval.find("{model}") == std::string::npos)
        throw Error(ErrorCode::kInvalidArgument, fmt::format("--eval '{}' has no {{model}} to replace by a candidate's path", args->eval));
      const std::regex ident("^[A-Za-z_][A-Za-z0-9_]*$");
      if (!std::regex_match(args->parameter, ident) || args->parameter == "tau")
        throw Error(ErrorCode::kInvalidArgument, fmt::format("--param '{}' is not a name", args->parameter));
      const std::regex param("(^|[^A-Za-z0-9_])" + args->parameter + "(?![A-Za-z0-9_])");
      if (!std::regex_search(args->expression, param))
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("expression '{}' has no parameter {} to sweep", args->expression, args->parameter));
      std::map<std::string, Checkpoint> opened = open_named_models(args->models, args->pretrained);
      if (opened.count(args->parameter))
        throw Error(ErrorCode::kInvalidArgument, fmt::format("--model name '{}' is also the parameter's name; use --param", args->parameter));
      std::map<std::string, const Checkpoint*> models;
      for (const auto& [name, ckpt] : opened) models[name] = &ckpt;
      const auto expression_at = [&](double v) {
        return std::regex_replace(args->expression, param, "$1(" + fmt::format("{:.17g}", v) + ")");
      };
      const fs::path output = args->output;
      const bool to_file = output.extension() == ".safetensors";
      std::error_code ec;
      if (!options.write.force && fs::exists(output, ec))
        throw Error(ErrorCode::kOutputExists, fmt::format("{} exists (use --force to replace it)", output.string()));
      // Candidates: in --keep-all DIR, or in a temporary folder beside the output (same file system).
      TempFolder folder;
      if (!args->keep_all.empty()) {
        folder.path = args->keep_all;
        folder.keep = true;
        fs::create_directories(folder.path);
      } else {
        const fs::path parent = output.parent_path().empty() ? fs::path(".") : output.parent_path();
        fs::create_directories(parent);
        std::string pattern = (parent / fmt::format(".taskvec-sweep-{}-XXXXXX", ::getpid())).string();
        if (::mkdtemp(pattern.data()) == nullptr)
          throw Error(ErrorCode::kIo, fmt::format("{}: cannot create a temporary folder for the candidates: {}",
                                                  parent.string(), std::strerror(errno)));
        folder.path = pattern;
        folder.slot = register_interrupt_folder(folder.path);
      }
      EditOptions quiet = options;
      quiet.on_progress = nullptr;
      quiet.write.force = false;
      std::vector<Candidate> curve;
      const auto evaluate = [&](double v) -> std::optional<int> {
        const std::string label = value_text(v);
        const fs::path cand = folder.path / (fmt::format("{}_{}", args->parameter, label) + (to_file ? ".safetensors" : ""));
        EditReport report = edit_expression(models, args->pretrained, expression_at(v), cand, quiet);
        if (!global.quiet)
          for (const auto& w : report.warnings) fmt::print(stderr, "taskvec: warning: {}={}: {}\n", args->parameter, label, w);
        std::string command = args->eval;
        for (std::size_t at; (at = command.find("{model}")) != std::string::npos;) command.replace(at, 7, shell_quote(cand.string()));
        std::fflush(stdout);
        FILE* pipe = ::popen(command.c_str(), "r");
        if (pipe == nullptr) throw Error(ErrorCode::kIo, fmt::format("cannot run the evaluation command: {}", std::strerror(errno)));
        std::string out;
        char buf[4096];
        for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, pipe)) > 0;) out.append(buf, n);
        const int status = ::pclose(pipe);
        const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
        if (code != 0) {
          fmt::print(stderr, "taskvec: sweep: the evaluation of {}={} exited with status {}: {}\n", args->parameter,
                     label, code, command);
          return code;
        }
        Candidate c{v, parse_scores(out, fmt::format("the evaluation of {}={}", args->parameter, label))};
        if (!global.quiet && !global.json) {
          std::string text;
          for (const auto& [k, s] : c.scores) text += fmt::format(" {}={:.6g}", k, no_negative_zero(s));
          fmt::print(stderr, "taskvec: sweep: {}={}:{}\n", args->parameter, label, text);
        }
        curve.push_back(std::move(c));
        if (args->keep_all.empty()) fs::remove_all(cand, ec);
        return std::nullopt;
      };
      // The negation rule compares with L = 0 (the pretrained model when EXPR is pre + L*...).
      if (rule.kind == Rule::Kind::kNegation && std::find(values.begin(), values.end(), 0.0) == values.end())
        if (auto code = evaluate(0.0)) return *code;
      for (double v : values)
        if (auto code = evaluate(v)) return *code;
      const auto score_of = [&](const Candidate& c, const std::string& name) {
        const auto it = c.scores.find(name);
        if (it == c.scores.end()) {
          std::string have;
          for (const auto& [k, s] : c.scores) have += (have.empty() ? "" : ", ") + k;
          throw Error(ErrorCode::kInvalidArgument, fmt::format("--select {}: the evaluation of {}={} printed no score "
                                                               "'{}' (it printed: {})", args->select, args->parameter,
                                                               value_text(c.value), name, have));
        }
        return it->second;
      };
      // The best score among the allowed candidates (for the negation rule, those whose control keeps the
      // threshold); ties go to the first value, as docs/CLI.md says.
      double threshold = 0;
      if (rule.kind == Rule::Kind::kNegation) {
        const auto zero = std::find_if(curve.begin(), curve.end(), [](const Candidate& c) { return c.value == 0.0; });
        threshold = rule.ratio * score_of(*zero, rule.control);
      }
      std::optional<std::size_t> chosen;
      for (std::size_t i = 0; i < curve.size(); ++i) {
        if (rule.kind == Rule::Kind::kNegation && score_of(curve[i], rule.control) < threshold) continue;
        const double a = score_of(curve[i], rule.score);
        if (!chosen || (rule.kind == Rule::Kind::kMax ? a > score_of(curve[*chosen], rule.score)
                                                      : a < score_of(curve[*chosen], rule.score)))
          chosen = i;
      }
      if (!chosen)
        throw Error(ErrorCode::kInvalidArgument,
                    fmt::format("--select {}: no candidate has {} >= {:.6g} ({} x its value at {} = 0)", args->select,
                                rule.control, threshold, rule.ratio, args->parameter));
      const std::size_t best = *chosen;
      // The chosen candidate, written through the one checked writer like every output.
      EditReport report = edit_expression(models, args->pretrained, expression_at(curve[best].value), output, options);
      Json doc;
      doc["expression"] = args->expression;
      doc["parameter"] = args->parameter;
      doc["select"] = args->select;
      if (rule.kind == Rule::Kind::kNegation) doc["control_threshold"] = threshold;
      auto points = Json::array();
      for (const auto& c : curve) points.push_back({{"value", c.value}, {"scores", c.scores}});
      doc["curve"] = std::move(points);
      doc["chosen"] = curve[best].value;
      doc["chosen_scores"] = curve[best].scores;
      doc["output"] = output.string();
      const fs::path json_path = to_file ? fs::path(output.string() + ".sweep.json") : output / "sweep.json";
      {
        const std::string text = doc.dump(2) + "\n";
        AtomicFile f(json_path, text.size());
        f.write_at(0, std::span<const std::byte>(reinterpret_cast<const std::byte*>(text.data()), text.size()));
        f.commit();
      }
      // The plot, where gnuplot is installed: score(s) against L, the chosen value marked.
      std::string plot;
      if (std::system("command -v gnuplot >/dev/null 2>&1") == 0) {
        const fs::path png = to_file ? fs::path(output.string() + ".sweep.png") : output / "sweep.png";
        const fs::path data = folder.path / "sweep.dat", tmp_png = folder.path / "sweep.png";
        std::ofstream d(data);
        std::vector<std::string> names;
        for (const auto& [k, s] : curve.front().scores) names.push_back(k);
        for (const auto& c : curve) {
          d << c.value;
          for (const auto& n : names) d << ' ' << (c.scores.count(n) ? c.scores.at(n) : NAN);
          d << '\n';
        }
        d.close();
        std::string script = fmt::format("set terminal png size 800,500\nset output '{}'\nset xlabel '{}'\nset ylabel 'score'\n"
                                         "set arrow from {:.17g}, graph 0 to {:.17g}, graph 1 nohead dt 2\nplot ",
                                         tmp_png.string(), args->parameter, curve[best].value, curve[best].value);
        for (std::size_t i = 0; i < names.size(); ++i)
          script += fmt::format("{}'{}' using 1:{} with linespoints title '{}'", i ? ", " : "", data.string(), i + 2, names[i]);
        const fs::path gp = folder.path / "sweep.gp";
        std::ofstream(gp) << script << "\n";
        if (std::system(("gnuplot " + shell_quote(gp.string()) + " 2>/dev/null").c_str()) == 0 && fs::exists(tmp_png)) {
          fs::rename(tmp_png, png, ec);
          if (!ec) plot = png.string();
        }
      }
      if (global.json) {
        doc["report"] = {{"tensors_edited", report.tensors_edited}, {"bytes_written", report.bytes_written},
                         {"seconds", report.seconds}, {"warnings", report.warnings}};
        if (!plot.empty()) doc["plot"] = plot;
        fmt::print("{}\n", doc.dump(2));
        return 0;
      }
      for (const auto& w : report.warnings) fmt::print(stderr, "taskvec: warning: {}\n", w);
      if (!global.quiet) {
        fmt::print("{:>10}", args->parameter);
        for (const auto& [k, s] : curve.front().scores) fmt::print("  {:>12}", k);
        fmt::print("\n");
        for (std::size_t i = 0; i < curve.size(); ++i) {
          fmt::print("{:>10}", value_text(curve[i].value));
          for (const auto& [k, s] : curve.front().scores) fmt::print("  {:>12.6g}", curve[i].scores.count(k) ? no_negative_zero(curve[i].scores.at(k)) : NAN);
          fmt::print("{}\n", i == best ? "  <- chosen" : "");
        }
        fmt::print("chose {}={} ({}); wrote {} and {}{}\n", args->parameter, value_text(curve[best].value), args->select,
                   output.string(), json_path.string(), plot.empty() ? "" : " and " + plot);
      }
      return 0;
    };
  });
}

}  // namespace taskvec::cli
