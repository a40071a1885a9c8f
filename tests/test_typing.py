"""The public annotations as a type checker reads them: mypy (its API, in process) on snippets whose
revealed types are asserted, and on tests/typing/user_script.py, which must check clean under --strict.

The stub of the compiled module (python/attnfast/_attnfast.pyi) must name exactly what the module
defines, so that a new binding cannot go unannotated. Skipped when mypy is not installed. The mypy cache
lives in a temporary directory shared by the tests of this module, so only the first run analyses NumPy.
"""

from __future__ import annotations

import ast
import re
import sys
import sysconfig
from pathlib import Path

import pytest

import attnfast
from attnfast import _attnfast

mypy_api = pytest.importorskip("mypy.api", reason="mypy is not installed")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(attnfast.__file__).resolve().parent
USER_SCRIPT = ROOT / "tests" / "typing" / "user_script.py"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mypy_cache")


@pytest.fixture(autouse=True)
def find_attnfast(monkeypatch):
    """Let mypy find the attnfast these tests import: a source tree through MYPYPATH; an installed one
    as any PEP 561 package (mypy refuses site-packages in MYPYPATH)."""
    installed = {Path(p).resolve() for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    if PACKAGE.parent in installed:
        monkeypatch.delenv("MYPYPATH", raising=False)
    else:
        monkeypatch.setenv("MYPYPATH", str(PACKAGE.parent))


def run_mypy(cache_dir, *args):
    """mypy --strict on ``args``, attnfast found where the tests import it from; (exit status, report)."""
    stdout, stderr, status = mypy_api.run([
        "--strict", "--no-error-summary", "--show-error-codes", "--cache-dir", str(cache_dir),
        "--python-executable", sys.executable, "--config-file", "",
        *args,
    ])
    return status, stdout + stderr


def revealed_types(cache_dir, tmp_path, body):
    """The types mypy reveals for each ``reveal_type(...)`` line of ``body`` (a script using attnfast)."""
    snippet = tmp_path / "snippet.py"
    snippet.write_text("import numpy as np\nimport attnfast\n" + body)
    status, report = run_mypy(cache_dir, str(snippet))
    notes = re.findall(r'snippet\.py:\d+: note: Revealed type is "(.*)"', report)
    errors = [line for line in report.splitlines() if ": error:" in line]
    return notes, errors


NDARRAY = "numpy.ndarray[tuple[Any, ...], numpy.dtype[Any]]"
LSE = "numpy.ndarray[tuple[Any, ...], numpy.dtype[numpy.floating[Any]]]"


def test_attention_results_are_typed_by_the_flags(cache_dir, tmp_path):
    notes, errors = revealed_types(cache_dir, tmp_path, """
q = np.ones((2, 4, 8), np.float32)
reveal_type(attnfast.attention(q, q, q))
reveal_type(attnfast.attention(q, q, q, return_lse=True))
reveal_type(attnfast.attention(q, q, q, return_weights=True))
reveal_type(attnfast.attention(q, q, q, return_lse=True, return_weights=True))
reveal_type(attnfast.attention_varlen(q, q, q, [0, 4], [0, 4], return_lse=True))
reveal_type(attnfast.reference.attention(q, q, q, return_lse=True))
reveal_type(attnfast.merge_states([q], [q[..., 0]]))
reveal_type(attnfast.attention_backward(q, q, q, q, q, q[..., 0]).dq)
reveal_type(attnfast.quantize_kv(q))
reveal_type(attnfast.softmax(q, axis=-1))
""")
    assert errors == []
    assert notes == [
        NDARRAY,
        f"tuple[{NDARRAY}, {LSE}]",
        f"tuple[{NDARRAY}, {NDARRAY}]",
        f"tuple[{NDARRAY}, {LSE}, {NDARRAY}]",
        f"tuple[{NDARRAY}, {LSE}]",
        f"tuple[{NDARRAY}, {LSE}]",
        f"tuple[{NDARRAY}, {LSE}]",
        NDARRAY,
        "tuple[numpy.ndarray[tuple[Any, ...], numpy.dtype[numpy.signedinteger[numpy._typing._nbit_base._8Bit]]], "
        "numpy.ndarray[tuple[Any, ...], numpy.dtype[numpy.floating[numpy._typing._nbit_base._32Bit]]]]",
        NDARRAY,
    ]


def test_a_runtime_flag_gives_the_union(cache_dir, tmp_path):
    notes, errors = revealed_types(cache_dir, tmp_path, """
def f(flag: bool) -> None:
    reveal_type(attnfast.attention_varlen(np.ones((4, 8)), np.ones((4, 8)), np.ones((4, 8)), [0, 4], [0, 4],
                                          return_lse=flag))
""")
    assert errors == []
    assert notes == [f"{NDARRAY} | tuple[{NDARRAY}, {LSE}]"]


def test_checker_rejects_what_attnfast_rejects(cache_dir, tmp_path):
    """Wrong names and values are caught before run time: a PyTorch keyword, an unknown method, a
    tuple result used as an array."""
    _, errors = revealed_types(cache_dir, tmp_path, """
q = np.ones((2, 4, 8), np.float32)
attnfast.attention(q, q, q, is_causal=True)
attnfast.attention(q, q, q, method="dott")
out = attnfast.attention(q, q, q, return_lse=True)
out.shape
""")
    by_line = {}
    for error in errors:
        line, message = re.match(r".*snippet\.py:(\d+): error: (.*)", error).groups()
        by_line.setdefault(int(line), []).append(message)
    assert sorted(by_line) == [5, 6, 8], errors  # two import lines precede the body
    assert by_line[5][0] == ('Unexpected keyword argument "is_causal" for overloaded function "attention"; '
                             'did you mean "causal"?  [call-overload]')
    assert by_line[6][0].startswith('No overload variant of "attention" matches argument types')
    assert by_line[8] == ['"tuple[ndarray[tuple[Any, ...], dtype[Any]], ndarray[tuple[Any, ...], '
                          'dtype[floating[Any]]]]" has no attribute "shape"  [attr-defined]']


def test_user_script_is_strictly_clean(cache_dir):
    status, report = run_mypy(cache_dir, str(USER_SCRIPT))
    assert (status, report) == (0, "")


def test_stub_names_what_the_compiled_module_defines():
    tree = ast.parse((PACKAGE / "_attnfast.pyi").read_text())
    stubbed = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    stubbed |= {node.target.id for node in tree.body if isinstance(node, ast.AnnAssign)}
    defined = {name for name in dir(_attnfast) if not name.startswith("__")} | {"__version__"}
    assert stubbed - {"_Array"} == defined


def test_the_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()
