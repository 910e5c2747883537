// taskvec fuzz targets: the one rule they share. A parser given hostile bytes may only fail by
// throwing taskvec::Error; this helper swallows exactly that, so any other exception escapes the
// target and libFuzzer reports it (uncaught exception -> abort -> crash report with the input).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>

#include "taskvec/error.hpp"

namespace taskvec::fuzz {

/// Runs `body`; returns normally when it succeeds or throws taskvec::Error. Any other exception is
/// printed and aborts, so the fuzzer keeps the input as a crash.
template <typename Body>
void expect_only_taskvec_errors(Body&& body) {
  try {
    body();
  } catch (const Error& e) {
    // The one accepted failure. error_code_name must know every code a parser throws.
    if (error_code_name(e.code()).empty()) {
      std::fprintf(stderr, "taskvec::Error with an unnamed code %d: %s\n", static_cast<int>(e.code()), e.what());
      std::abort();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception (not taskvec::Error): %s\n", e.what());
    std::abort();
  } catch (...) {
    std::fprintf(stderr, "unexpected exception of an unknown type\n");
    std::abort();
  }
}

/// Fails the run (abort) when an invariant of a successful parse does not hold.
inline void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "invariant broken: %s\n", what);
    std::abort();
  }
}

}  // namespace taskvec::fuzz
