// Fuzz target: parse_expression (the `taskvec edit` expression language) on arbitrary text over a
// fixed set of model names. A parsed expression must have finite, non-zero coefficients over known
// names only.
#include <cmath>
#include <string>
#include <vector>

#include "fuzz_common.hpp"
#include "taskvec/engine.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using namespace taskvec;
  static const std::vector<std::string> kNames = {"pre", "a", "b", "toxic", "tau_x", "m2"};
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_only_taskvec_errors([&] {
    const LinearExpression e = parse_expression(text, kNames, "pre");
    fuzz::check(!e.coefficients.empty(), "a parsed expression names a model");
    for (const auto& [name, c] : e.coefficients) {
      bool known = false;
      for (const auto& n : kNames) known = known || n == name;
      fuzz::check(known, "coefficients only name known models");
      fuzz::check(std::isfinite(c) && c != 0, "coefficients are finite and non-zero");
    }
  });
  return 0;
}
