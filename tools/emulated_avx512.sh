#!/usr/bin/env bash
# Builds the extension with its avx512 and avx512bf16 targets compiled against SIMDe's portable AVX-512
# intrinsics (implemented on AVX2, _mm512_dpbf16_ps included) and runs the given tests against them. On a
# CPU without AVX-512 (or AVX512_BF16) this is the only way to execute those kernels (16 float lanes,
# 8 x 3 attention tiles, k-mask tails, the bfloat16 pair products): the tests' `isa` fixture then covers
# scalar, avx2 and the emulated avx512 and avx512bf16. Needs an AVX2 CPU; skips otherwise.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=$(python3 -c 'import sys; print(sys.executable)')

if ! grep -q ' avx2 ' /proc/cpuinfo 2>/dev/null && ! grep -q ' avx2$' /proc/cpuinfo 2>/dev/null; then
  echo "no AVX2 on this CPU: skipping the emulated AVX-512 tests"
  exit 0
fi
"$py" -m pip install --quiet simde-py pybind11 cmake ninja
simde=$("$py" -c 'import simde_py; print(simde_py.get_include())')

cmake -S "$repo" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTNFAST_EMULATE_AVX512=ON \
  -DSIMDE_INCLUDE_DIR="$simde" -DSKBUILD_PROJECT_VERSION=0.0.0+emulated-avx512 -DPython_EXECUTABLE="$py" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$work/build" >/dev/null
mkdir -p "$work/site"
cp -r "$repo/python/attnfast" "$work/site/"
rm -f "$work"/site/attnfast/_attnfast*.so
cp "$work"/build/_attnfast*.so "$work/site/attnfast/"

export PYTHONPATH="$work/site"
"$py" -c 'import attnfast, sys; isas = attnfast.capabilities()["isas"]
print("usable targets:", isas)
missing = [t for t in ("avx512bf16", "avx512") if t not in isas]
sys.exit("the emulated build does not offer " + ", ".join(missing) if missing else 0)'
cd "$repo"
"$py" -m pytest -q -p no:cacheprovider "$@"
