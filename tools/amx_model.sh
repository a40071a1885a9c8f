#!/usr/bin/env bash
# Tests the AMX-BF16 tile kernels (cpp/src/kernels/amx_tiles.h) on any x86-64 CPU:
#   1. the standalone tile test (cpp/tests/amx_tiles_test.cpp) against the scalar model of the tile
#      operations (kernels/amx_model.h), under AddressSanitizer + UndefinedBehaviorSanitizer (portable,
#      and with AVX-512 where the CPU has it), and, where the CPU has AMX-BF16 and the OS grants the tile
#      state, against the hardware as well;
#   2. the extension built with ATTNFAST_AMX_MODEL=ON, whose amx target then runs its tile kernels on the
#      model (usable wherever the avx512bf16 target is), and the given tests against it (default: the
#      bfloat16 tests of the tiled-path, 16-bit, attention and hidden-key test files; the `isa` fixture
#      runs each on every usable target, the amx one included).
# Without AVX-512 the extension is built on SIMDe's emulated AVX-512 as well (tools/emulated_avx512.sh).
# AMX_MODEL_SANITIZE=1 builds the extension with ASan + UBSan too (tools/sanitize.sh): the model moves
# tile rows with memcpy, so every byte a tile load or store would touch is checked.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
py=$(python3 -c 'import sys; print(sys.executable)')
cxx=${CXX:-g++}
# -Wno-maybe-uninitialized: GCC 12's AVX-512 unpack intrinsics pass a self-initialised "undefined"
# vector, which -Wall reports inside its own headers.
flags=(-std=c++17 -O1 -g -Wall -Wextra -Wno-maybe-uninitialized -I"$repo/cpp/include" -I"$repo/cpp/src")
avx512=(-mavx512f -mavx512bw -mavx512vl)
has_avx512bw() { grep -qw avx512bw /proc/cpuinfo 2>/dev/null && grep -qw avx512vl /proc/cpuinfo 2>/dev/null; }

echo "== AMX tile kernels on the scalar model (ASan + UBSan)"
"$cxx" "${flags[@]}" -DATTNFAST_AMX_MODEL=1 -fsanitize=address,undefined -fno-sanitize-recover=undefined \
  "$repo/cpp/tests/amx_tiles_test.cpp" -o "$work/amx_tiles_model"
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 "$work/amx_tiles_model"
if has_avx512bw; then
  echo "== the same with AVX-512 (the vectorised V^T packing the amx target uses)"
  "$cxx" "${flags[@]}" "${avx512[@]}" -DATTNFAST_AMX_MODEL=1 -fsanitize=address,undefined \
    -fno-sanitize-recover=undefined "$repo/cpp/tests/amx_tiles_test.cpp" -o "$work/amx_tiles_model_avx512"
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 "$work/amx_tiles_model_avx512"
fi

if grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null; then
  echo "== AMX tile kernels on the hardware"
  "$cxx" "${flags[@]}" "${avx512[@]}" -mamx-tile -mamx-bf16 "$repo/cpp/tests/amx_tiles_test.cpp" \
    -o "$work/amx_tiles_hardware"
  "$work/amx_tiles_hardware"
else
  echo "no AMX-BF16 on this CPU: the tile kernels ran on the model only"
fi

if [ "${AMX_MODEL_STANDALONE_ONLY:-0}" = 1 ]; then exit 0; fi

echo "== the extension's amx target on the model"
"$py" -m pip install --quiet pybind11 cmake ninja
extra=()
if ! grep -qw avx512bw /proc/cpuinfo 2>/dev/null || ! grep -qw avx512_bf16 /proc/cpuinfo 2>/dev/null; then
  "$py" -m pip install --quiet simde-py
  extra=(-DATTNFAST_EMULATE_AVX512=ON -DSIMDE_INCLUDE_DIR="$("$py" -c 'import simde_py; print(simde_py.get_include())')")
fi
build_type=Release
if [ "${AMX_MODEL_SANITIZE:-0}" = 1 ]; then
  build_type=Debug
  extra+=(-DATTNFAST_SANITIZE=ON)
fi
cmake -S "$repo" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=$build_type -DATTNFAST_AMX_MODEL=ON "${extra[@]}" \
  -DSKBUILD_PROJECT_VERSION=0.0.0+amx-model -DPython_EXECUTABLE="$py" \
  -Dpybind11_DIR="$("$py" -c 'import pybind11; print(pybind11.get_cmake_dir())')" >/dev/null
cmake --build "$work/build" >/dev/null
mkdir -p "$work/site"
cp -r "$repo/python/attnfast" "$work/site/"
rm -f "$work"/site/attnfast/_attnfast*.so
cp "$work"/build/_attnfast*.so "$work/site/attnfast/"

export PYTHONPATH="$work/site"
if [ "${AMX_MODEL_SANITIZE:-0}" = 1 ]; then
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi
"$py" -c 'import attnfast, sys; isas = attnfast.capabilities()["isas"]
print("usable targets:", isas)
sys.exit(0 if "amx" in isas else "the model build does not offer the amx target")'
cd "$repo"
if [ "$#" -eq 0 ]; then
  tests=()
  for f in tests/test_bf16_tiled.py tests/test_attention_bf16_pairs.py tests/test_dtypes16.py tests/test_attention.py \
    tests/test_hidden_keys.py; do
    [ -e "$f" ] && tests+=("$f")
  done
  set -- -k "bfloat16 or bf16" "${tests[@]}"
fi
"$py" -m pytest -q -p no:cacheprovider "$@"
