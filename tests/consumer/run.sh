#!/usr/bin/env bash
# Builds and runs tests/consumer (a project that uses taskvec as a library) one way:
#   run.sh package      SOURCE_DIR BUILD_DIR WORK   cmake --install BUILD_DIR, then find_package(taskvec)
#   run.sh subdirectory SOURCE_DIR BUILD_DIR WORK   add_subdirectory(SOURCE_DIR)
#   run.sh pkg-config   SOURCE_DIR BUILD_DIR WORK   cmake --install, then g++ $(pkg-config --cflags --libs taskvec)
# Registered as CTest tests by tests/CMakeLists.txt (Consumer.*). WORK is emptied first.
set -euo pipefail
mode=$1 src=$2 build=$3 work=$4
rm -rf "$work"
mkdir -p "$work/data"
consumer=$src/tests/consumer
install_prefix() {
  cmake --install "$build" --prefix "$work/prefix" >/dev/null
}
case $mode in
  package)
    install_prefix
    cmake -S "$consumer" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
    cmake --build "$work/build" >/dev/null
    ;;
  subdirectory)
    # No optimization: this builds every taskvec source once more, and only the build is tested here.
    cmake -S "$consumer" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE= -DTASKVEC_CONSUMER_MODE=subdirectory \
      -DTASKVEC_SOURCE_DIR="$src" >/dev/null
    cmake --build "$work/build" -j "$(nproc)" >/dev/null
    ;;
  pkg-config)
    install_prefix
    pc=$(find "$work/prefix" -name taskvec.pc)
    PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --exists taskvec
    mkdir -p "$work/build"
    # shellcheck disable=SC2046
    g++ -std=c++20 -O1 "$consumer/main.cpp" -o "$work/build/consumer" $(PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --cflags --libs taskvec)
    ;;
  *)
    echo "run.sh: unknown mode $mode (package, subdirectory, pkg-config)" >&2
    exit 2
    ;;
esac
"$work/build/consumer" "$work/data"
