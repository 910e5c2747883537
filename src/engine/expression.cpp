// Parser of linear edit expressions: a recursive-descent parser whose values are linear forms
// (constant + sum of coefficient x model), so "non-linear" is a type error found while parsing.
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>

#include <fmt/format.h>

#include "taskvec/engine.hpp"
#include "taskvec/error.hpp"

namespace taskvec {
namespace {

struct Linear {
  double constant = 0;
  std::map<std::string, double> terms;  // model name -> coefficient
  bool is_constant() const { return terms.empty(); }
};

Linear add(Linear a, const Linear& b, double sign) {
  a.constant += sign * b.constant;
  for (const auto& [name, c] : b.terms) a.terms[name] += sign * c;
  return a;
}

Linear scale(Linear a, double factor) {
  a.constant *= factor;
  for (auto& [name, c] : a.terms) c *= factor;
  return a;
}

class Parser {
 public:
  Parser(const std::string& text, const std::vector<std::string>& names, const std::string& pretrained)
      : text_(text), names_(names), pretrained_(pretrained) {}

  Linear parse() {
    Linear value = expression();
    skip_space();
    if (pos_ != text_.size()) fail(fmt::format("unexpected '{}'", text_[pos_]));
    return value;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(ErrorCode::kExpression,
                fmt::format("expression '{}', column {}: {}", text_, pos_ + 1, what));
  }

  void skip_space() {
    while (pos_ < text_.size() && std::isspace(static_cast<unsigned char>(text_[pos_]))) ++pos_;
  }

  bool accept(char c) {
    skip_space();
    if (pos_ < text_.size() && text_[pos_] == c) {
      ++pos_;
      return true;
    }
    return false;
  }

  void expect(char c) {
    if (!accept(c)) fail(pos_ < text_.size() ? fmt::format("expected '{}' but found '{}'", c, text_[pos_])
                                             : fmt::format("expected '{}' at the end", c));
  }

  // expression := term (('+' | '-') term)*
  Linear expression() {
    Linear value = term();
    for (;;) {
      if (accept('+')) {
        value = add(std::move(value), term(), 1);
      } else if (accept('-')) {
        value = add(std::move(value), term(), -1);
      } else {
        return value;
      }
    }
  }

  // term := factor (('*' | '/') factor)*
  Linear term() {
    Linear value = factor();
    for (;;) {
      if (accept('*')) {
        std::size_t at = pos_;
        Linear rhs = factor();
        if (!value.is_constant() && !rhs.is_constant()) {
          pos_ = at;
          fail("a product of two models is not linear: task arithmetic only scales models by numbers");
        }
        value = value.is_constant() ? scale(std::move(rhs), value.constant) : scale(std::move(value), rhs.constant);
      } else if (accept('/')) {
        std::size_t at = pos_;
        Linear rhs = factor();
        if (!rhs.is_constant()) {
          pos_ = at;
          fail("dividing by a model is not linear");
        }
        if (rhs.constant == 0) {
          pos_ = at;
          fail("division by zero");
        }
        value = scale(std::move(value), 1.0 / rhs.constant);
      } else {
        return value;
      }
    }
  }

  // factor := ('+' | '-') factor | number | name | 'tau' '(' name ')' | '(' expression ')'
  Linear factor() {
    skip_space();
    if (pos_ >= text_.size()) fail("unexpected end of the expression");
    // Signs and parentheses recurse: bound the depth so a hostile expression cannot overflow the stack.
    struct Nest {
      explicit Nest(Parser& p) : p_(p) {
        if (++p_.depth_ > kMaxDepth) p_.fail("nested deeper than " + std::to_string(kMaxDepth) + " levels");
      }
      ~Nest() { --p_.depth_; }
      Parser& p_;
    } nest(*this);
    if (accept('-')) return scale(factor(), -1);
    if (accept('+')) return factor();
    if (accept('(')) {
      Linear value = expression();
      expect(')');
      return value;
    }
    char c = text_[pos_];
    if (std::isdigit(static_cast<unsigned char>(c)) || c == '.') return number();
    if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
      std::size_t start = pos_;
      std::string name = identifier();
      skip_space();
      if (name == "tau" && pos_ < text_.size() && text_[pos_] == '(') {
        expect('(');
        skip_space();
        std::size_t name_at = pos_;
        std::string model = identifier();
        if (model.empty()) fail("tau( must be followed by a model name");
        check_name(model, name_at);
        expect(')');
        Linear value;
        value.terms[model] += 1;
        value.terms[pretrained_] -= 1;
        return value;
      }
      check_name(name, start);
      Linear value;
      value.terms[name] = 1;
      return value;
    }
    fail(fmt::format("unexpected '{}'", c));
  }

  std::string identifier() {
    std::size_t start = pos_;
    while (pos_ < text_.size() &&
           (std::isalnum(static_cast<unsigned char>(text_[pos_])) || text_[pos_] == '_')) {
      ++pos_;
    }
    return text_.substr(start, pos_ - start);
  }

  void check_name(const std::string& name, std::size_t at) {
    for (const auto& known : names_) {
      if (known == name) return;
    }
    pos_ = at;
    std::string list;
    for (const auto& known : names_) list += (list.empty() ? "" : ", ") + known;
    fail(fmt::format("unknown model '{}' (models: {})", name, list));
  }

  Linear number() {
    const char* begin = text_.c_str() + pos_;
    char* end = nullptr;
    double value = std::strtod(begin, &end);
    if (end == begin || !std::isfinite(value)) fail("malformed number");
    pos_ += static_cast<std::size_t>(end - begin);
    Linear result;
    result.constant = value;
    return result;
  }

  static constexpr int kMaxDepth = 256;
  const std::string& text_;
  const std::vector<std::string>& names_;
  const std::string& pretrained_;
  std::size_t pos_ = 0;
  int depth_ = 0;
};

}  // namespace

double LinearExpression::total() const {
  double sum = 0;
  for (const auto& [name, c] : coefficients) sum += c;
  return sum;
}

LinearExpression parse_expression(const std::string& text, const std::vector<std::string>& model_names,
                                  const std::string& pretrained_name) {
  bool known = false;
  for (const auto& name : model_names) known = known || name == pretrained_name;
  if (!known) {
    throw Error(ErrorCode::kInvalidArgument,
                fmt::format("the pretrained model '{}' is not among the --model names", pretrained_name));
  }
  Linear value = Parser(text, model_names, pretrained_name).parse();
  if (value.constant != 0) {
    throw Error(ErrorCode::kExpression,
                fmt::format("expression '{}': adds the plain number {} to the weights; "
                            "numbers may only scale models (e.g. 0.5*tau(a))",
                            text, value.constant));
  }
  LinearExpression result;
  for (const auto& [name, c] : value.terms) {
    // Huge numbers (1e308*1e308, x/1e-320) overflow to Inf or NaN: never hand those to the kernel.
    if (!std::isfinite(c)) {
      throw Error(ErrorCode::kExpression,
                  fmt::format("expression '{}': the coefficient of '{}' is not a finite number ({})", text, name, c));
    }
    if (c != 0) result.coefficients[name] = c;
  }
  if (result.coefficients.empty()) {
    throw Error(ErrorCode::kExpression, fmt::format("expression '{}' is zero: every model cancels out", text));
  }
  return result;
}

}  // namespace taskvec
