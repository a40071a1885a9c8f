#!/usr/bin/env bash
# Usage: bash tools/cross_aarch64.sh
#
# Proves the non-x86 build in principle: configures the project for aarch64 Linux with `zig c++`
# (the `ziglang` package from PyPI cross-compiles to any target) and compiles every object of the
# extension module. On aarch64 CMakeLists.txt builds the scalar target only (no -m flags), so this fails
# if an x86 intrinsic, header or builtin leaks into code the scalar target or the shared module uses.
# Objects only: linking would need zig to build libc++ for aarch64 first (minutes) and proves nothing
# more about the sources. First runs tools/check_portable.py, which also covers files this build does
# not include. The module is not run (no aarch64 machine or emulator here).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$py" "$repo/tools/check_portable.py"

# zig from the calling Python if it has it, else a throwaway venv (PyPI).
if "$py" -c 'import ziglang' 2>/dev/null; then
  zpy=$py
else
  "$py" -m venv "$work/tools"
  "$work/tools/bin/python" -m pip install --quiet "ziglang==0.17.1"
  zpy="$work/tools/bin/python"
fi
# -O0 last, so it overrides the build's -O3: every object is still compiled to aarch64 code (any x86
# intrinsic or builtin fails as at -O3), in a fraction of the optimiser's time.
cat > "$work/zig-c++" <<EOF
#!/bin/sh
exec "$zpy" -m ziglang c++ -target aarch64-linux-gnu "\$@" -O0
EOF
chmod +x "$work/zig-c++"
cat > "$work/aarch64.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER "$work/zig-c++")
# CMake's compiler check links a test program; objects are all this build needs.
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
EOF
export ZIG_GLOBAL_CACHE_DIR=${ZIG_GLOBAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/attnfast-zig}

# The host's Python headers stand in for the target's (the same CPython version; pyconfig.h differs
# between x86-64 and aarch64 Linux only in facts both share: LP64, little-endian).
cmake -S "$repo" -B "$work/build" -G Ninja -DCMAKE_TOOLCHAIN_FILE="$work/aarch64.cmake" \
  -DCMAKE_BUILD_TYPE=Release -DSKBUILD_PROJECT_VERSION=0.0.0+aarch64 \
  -DPython_EXECUTABLE="$("$py" -c 'import sys; print(sys.executable)')" \
  -DPython_INCLUDE_DIR="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" > "$work/configure.log" \
  || { cat "$work/configure.log"; exit 1; }
objects=$(ninja -C "$work/build" -t targets all | sed -n 's/^\(.*\.o\): .*/\1/p' | sort -u)
targets=$(echo "$objects" | grep -o 'attnfast_[a-z0-9]*\.dir' | sort -u | sed 's/\.dir//' | tr '\n' ' ')
echo "aarch64 targets: $targets"
if [ "$targets" != "attnfast_scalar " ]; then
  echo "expected the scalar target only on aarch64, CMake configured: $targets" >&2
  exit 1
fi
# shellcheck disable=SC2086
ninja -C "$work/build" $objects > "$work/build.log" || { cat "$work/build.log"; exit 1; }
for obj in $objects; do
  file -b "$work/build/$obj" | grep -q 'ARM aarch64' || { echo "$obj is not an aarch64 object" >&2; exit 1; }
done
echo "aarch64 scalar build: $(echo "$objects" | wc -l) objects compiled"
