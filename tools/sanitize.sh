#!/usr/bin/env bash
# Builds the extension with AddressSanitizer + UndefinedBehaviorSanitizer and runs the kernel tests
# against it (the installed package's Python files, the sanitized .so). Any ASan report or UBSan
# finding aborts the run. Leak checking is off: CPython itself does not free everything at exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=$(python3 -c 'import sys; print(sys.executable)')

cmake -S "$repo" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DATTNFAST_SANITIZE=ON \
  -DSKBUILD_PROJECT_VERSION=0.0.0+asan -DPython_EXECUTABLE="$py" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$work/build" >/dev/null
mkdir -p "$work/site"
cp -r "$repo/python/attnfast" "$work/site/"
cp "$work"/build/_attnfast*.so "$work/site/attnfast/"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYTHONPATH="$work/site"
cd "$repo"
"$py" -m pytest -q -p no:cacheprovider "$@"
