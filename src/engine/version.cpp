// taskvec's version string, from CMake's project(VERSION) (CMakeLists.txt).
#include "taskvec/engine.hpp"

#ifndef TASKVEC_VERSION
#define TASKVEC_VERSION "unknown"
#endif

namespace taskvec {
const char* taskvec_version() noexcept { return TASKVEC_VERSION; }
}  // namespace taskvec
