#!/usr/bin/env bash
# Usage: bash tools/test_wheel.sh WHEEL
#
# Installs WHEEL with its test extra into a fresh virtual environment (no system site-packages, so
# nothing built from this source tree can be imported) and runs the whole test suite against it from a
# directory that holds copies of tests/, examples/ (tests/test_examples.py runs them) and pyproject.toml
# (the project's pytest options) but no python/. Before the tests it checks that `import attnfast`
# resolves to the venv and that the compiled module is byte for byte the one in WHEEL.
set -euo pipefail
if [ $# -ne 1 ] || [ ! -f "$1" ]; then
  echo "usage: bash tools/test_wheel.sh WHEEL" >&2
  exit 2
fi
wheel=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset PYTHONPATH

"$py" -m venv "$work/venv"
vpy="$work/venv/bin/python"
start=$(date +%s)
"$vpy" -m pip install --quiet "$wheel[test]"
echo "installed $(basename "$wheel") with the test extra in $(( $(date +%s) - start )) s"

mkdir "$work/run"
cp -r "$repo/tests" "$repo/examples" "$repo/pyproject.toml" "$work/run/"
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
