// Runs the taskvec binary under test (TASKVEC_BIN, set by tests/CMakeLists.txt for the cli module)
// through /bin/sh and captures its exit status, stdout and stderr. One helper for every CLI test.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "support/temp_dir.hpp"

namespace taskvec::test {

/// What one run of the binary produced. `status` is the exit code, or -1 if it was killed by a signal.
struct Result {
  int status = -1;
  std::string out, err;
};

/// Runs `prefix taskvec args` (prefix: environment or ulimit settings, ending in a space) in the folder
/// `dir`, as a user would run it beside their models (recipe paths are relative to the working directory);
/// stderr goes through `dir`/stderr.txt. `args` is shell text: quote paths that need it.
inline Result run(const std::string& args, const TempDir& dir, const std::string& prefix = "") {
  const auto err_path = dir / "stderr.txt";
  const std::string command = "cd '" + dir.path().string() + "' && " + prefix + std::string(TASKVEC_BIN) + " " + args +
                              " 2>" + err_path.string();
  Result r;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return r;
  std::array<char, 4096> buf;
  std::size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) r.out.append(buf.data(), n);
  const int raw = pclose(pipe);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
  std::ifstream in(err_path);
  r.err.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return r;
}

}  // namespace taskvec::test
