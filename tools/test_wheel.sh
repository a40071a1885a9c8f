#!/usr/bin/env bash
# Usage: bash tools/test_wheel.sh WHEEL [REQUIREMENT...]
#
# Installs WHEEL with its test and plot extras (and any REQUIREMENTs: CI adds the optional peers
# PyTorch and JAX, as for the source build) into a fresh virtual environment (no system site-packages, so
# nothing built from this source tree can be imported) and runs the whole test suite against it from a
# directory that holds copies of tests/, examples/ (tests/test_examples.py runs them), benchmarks/
# (tests/test_bench_dask.py imports its harness) and pyproject.toml
# (the project's pytest options) but no python/. Before the tests it checks that `import attnfast`
# resolves to the venv and that the compiled module is byte for byte the one in WHEEL.
set -euo pipefail
if [ $# -lt 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash tools/test_wheel.sh WHEEL [REQUIREMENT...]" >&2
  exit 2
fi
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

"$py" -m venv "$work/venv"
vpy="$work/venv/bin/python"
start=$(date +%s)
"$vpy" -m pip install --quiet "$wheel[test,plot]" "$@"
echo "installed $(basename "$wheel")[test,plot] $* in $(( $(date +%s) - start )) s"

mkdir "$work/run"
cp -r "$repo/tests" "$repo/examples" "$repo/benchmarks" "$repo/pyproject.toml" "$work/run/"
cd "$work/run"
"$vpy" - "$wheel" "$work/venv" <<'PY'
import hashlib
import pathlib
import sys
import zipfile

import attnfast
from attnfast import _attnfast

wheel, venv = sys.argv[1], pathlib.Path(sys.argv[2]).resolve()
module = pathlib.Path(_attnfast.__file__).resolve()
print("attnfast:", attnfast.__file__)
print("compiled module:", module, "| compiler:", attnfast.capabilities()["compiler"])
if venv not in module.parents or venv not in pathlib.Path(attnfast.__file__).resolve().parents:
    sys.exit(f"attnfast was imported from outside the venv {venv}")
with zipfile.ZipFile(wheel) as z:
    shipped = z.read(f"attnfast/{module.name}")
if hashlib.sha256(shipped).digest() != hashlib.sha256(module.read_bytes()).digest():
    sys.exit("the imported module differs from the one in the wheel")
PY
"$vpy" -m pytest -p no:cacheprovider tests

# The wheel's own target choice on older CPUs (qemu-user, as .ci/run does for the source build): the
# release toolchain differs from the development one, and so could its CPU detection.
if command -v qemu-x86_64 >/dev/null 2>&1; then
  interpreter=$("$vpy" -c 'import sys; print(sys.executable)')
  for pair in Nehalem:scalar Haswell:avx2; do
    cpu=${pair%%:*}
    OPENBLAS_CORETYPE=$cpu qemu-x86_64 -cpu "$cpu" "$interpreter" "$repo/tools/portable_smoke.py" \
      --expect-isa "${pair##*:}" 2>&1 | { grep -v "TCG doesn't support requested feature" || true; }
    [ "${PIPESTATUS[0]}" = 0 ] || { echo "the wheel on an emulated $cpu failed" >&2; exit 1; }
  done
else
  echo "qemu-user is not available here: skipping the wheel on emulated older CPUs"
fi
