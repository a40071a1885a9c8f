"""attnfast's thread count without OpenMP, and threadpoolctl's control of it.

* The default count: ``OMP_NUM_THREADS`` parsed as OpenMP does (valid values, lists, invalid values that
  are ignored with a warning), else the CPUs of the affinity mask (taskset, os.sched_setaffinity).
  Each case runs in a fresh interpreter, since the default is read when attnfast is imported.
* threadpoolctl (python/attnfast/_threadpool.py): ``threadpool_info()`` lists attnfast whichever of the
  two is imported first; ``threadpool_limits`` limits attnfast process-wide, from the main thread and
  from any other, nests, and restores the state before it exactly, without touching
  ``set_num_threads``' choice; results are bitwise identical under any limit.
* The module links no OpenMP runtime.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import attnfast
from attnfast import _attnfast as _core
from attnfast import _threadpool

threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl is in the test extra")

PACKAGE_DIR = str(Path(attnfast.__file__).resolve().parent.parent)
MODULE_FILE = os.path.realpath(_core.__file__)
AFFINITY = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def run_json(code: str, env: dict | None = None, argv: list | None = None):
    """Runs code in a fresh interpreter and returns (the JSON its last stdout line holds, stderr)."""
    full_env = {**os.environ, "PYTHONPATH": PACKAGE_DIR, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    result = subprocess.run(
        argv or [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def attnfast_info(controller=None):
    infos = [i for i in (controller or threadpoolctl.ThreadpoolController()).info() if i["user_api"] == "attnfast"]
    assert len(infos) == 1, infos
    return infos[0]


@pytest.fixture(autouse=True)
def default_settings():
    # Code run earlier in this process may have left a limit on purpose (a plain threadpool_limits(n)
    # call, as the benchmark's thread pinning makes): set it aside, and put it back afterwards.
    controller = threadpoolctl.ThreadpoolController().select(user_api="attnfast").lib_controllers[0]
    saved = controller.get_num_threads()
    controller.set_num_threads(_threadpool.ThreadCount(0, limit=0))
    attnfast.set_num_threads(0)
    yield
    attnfast.set_num_threads(0)
    assert _core.thread_limit() == 0, "the test left a threadpoolctl limit"
    controller.set_num_threads(saved)
    assert _core.thread_limit() == saved.limit


# --------------------------------------------------------------------------
# No OpenMP runtime
# --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs readelf (binutils)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF module")
def test_module_needs_no_openmp_runtime():
    dynamic = subprocess.run(["readelf", "-d", MODULE_FILE], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    # The parse found the NEEDED entries (every build needs the C library; the release wheel links its
    # C++ library statically, so libstdc++ is not always among them).
    assert needed and "libc.so.6" in needed, dynamic
    assert not [lib for lib in needed if lib.startswith(("libgomp", "libomp", "libiomp"))], needed
    # And the symbols threadpoolctl's controller calls are exported.
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", MODULE_FILE], capture_output=True, text=True,
                             check=True).stdout.split()
    for name in ("attnfast_threadpool_num_threads", "attnfast_threadpool_get_limit",
                 "attnfast_threadpool_set_limit", "attnfast_threadpool_version"):
        assert name in symbols, name


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux /proc")
def test_importing_and_running_loads_no_openmp_runtime():
    r, _ = run_json(
        """
        import json
        import numpy as np
        import attnfast
        q = np.ones((2, 4, 64, 32), np.float32)
        attnfast.attention(q, q, q, causal=True)
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1].rsplit("/", 1)[-1] for line in f if ".so" in line})
        print(json.dumps(libs))
        """
    )
    assert any(lib.startswith("_attnfast") for lib in r), r
    assert not [lib for lib in r if lib.startswith(("libgomp", "libomp", "libiomp"))], r


# --------------------------------------------------------------------------
# The default count: OMP_NUM_THREADS, then the affinity mask
# --------------------------------------------------------------------------

DEFAULT_PROBE = """
import json, warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import attnfast
from attnfast import _attnfast as core
caps = attnfast.capabilities() if core.default_num_threads() <= 64 else {}
print(json.dumps(dict(default=core.default_num_threads(), source=core.default_threads_source(),
                      threads=caps.get("threads"),
                      warnings=[(w.category.__name__, str(w.message)) for w in caught])))
"""


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1", 1),
        ("3", 3),
        (" 2\t", 2),  # white space around the value
        ("+2", 2),  # as strtoul (libgomp) accepts
        ("3,2", 3),  # one count per nesting level: attnfast uses the first
        ("1, 4 ,8", 1),
        ("100000", 65536),  # above the cap: the cap (only the default is read here, no thread started)
        ("99999999999999999999999", 65536),
    ],
)
def test_valid_omp_num_threads_sets_the_default(value, expected):
    r, _ = run_json(DEFAULT_PROBE, env={"OMP_NUM_THREADS": value})
    assert r["default"] == expected and r["source"] == "OMP_NUM_THREADS" and r["warnings"] == []
    if expected <= 64:
        assert r["threads"] == expected


@pytest.mark.skipif(AFFINITY is None, reason="needs os.sched_getaffinity")
@pytest.mark.parametrize("value", ["0", "-2", "abc", "2.5", "2,", ",2", "2,x", "2 3"])
def test_invalid_omp_num_threads_is_ignored_with_a_warning(value):
    r, _ = run_json(DEFAULT_PROBE, env={"OMP_NUM_THREADS": value})
    assert r["default"] == AFFINITY and r["source"] == "CPU affinity" and r["threads"] == AFFINITY
    assert r["warnings"] == [[
        "RuntimeWarning",
        f"OMP_NUM_THREADS='{value}' is not a positive integer (or a comma-separated list of them), so "
        f"attnfast ignores it and uses {AFFINITY} threads (CPU affinity); set it to a count such as "
        "OMP_NUM_THREADS=1, or unset it",
    ]]


@pytest.mark.skipif(AFFINITY is None, reason="needs os.sched_getaffinity")
@pytest.mark.parametrize("value", [None, "", "   "])
def test_unset_or_empty_omp_num_threads_uses_the_affinity_mask(value):
    r, _ = run_json(DEFAULT_PROBE, env={"OMP_NUM_THREADS": value})
    assert r == dict(default=AFFINITY, source="CPU affinity", threads=AFFINITY, warnings=[])


AFFINITY_PROBE = """
import json, os, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before attnfast is imported
import attnfast
from attnfast import _attnfast as core
print(json.dumps([attnfast.get_num_threads(), core.default_threads_source()]))
"""


@pytest.mark.skipif(AFFINITY is None or AFFINITY < 2, reason="needs os.sched_setaffinity and 2 or more CPUs")
def test_default_is_the_cpus_of_the_affinity_mask():
    r, _ = run_json(AFFINITY_PROBE, env={"OMP_NUM_THREADS": None})
    assert r == [1, "CPU affinity"]
    # OMP_NUM_THREADS wins over the mask, as in OpenMP runtimes.
    r, _ = run_json(AFFINITY_PROBE, env={"OMP_NUM_THREADS": "3"})
    assert r == [3, "OMP_NUM_THREADS"]


@pytest.mark.skipif(AFFINITY is None or AFFINITY < 2 or shutil.which("taskset") is None,
                    reason="needs taskset and 2 or more CPUs")
def test_taskset_limits_the_default():
    cpus = sorted(os.sched_getaffinity(0))
    code = "import json, attnfast; print(json.dumps(attnfast.get_num_threads()))"
    one, _ = run_json("", env={"OMP_NUM_THREADS": None},
                      argv=["taskset", "-c", str(cpus[0]), sys.executable, "-c", code])
    two, _ = run_json("", env={"OMP_NUM_THREADS": None},
                      argv=["taskset", "-c", f"{cpus[0]},{cpus[1]}", sys.executable, "-c", code])
    assert (one, two) == (1, 2)


# --------------------------------------------------------------------------
# threadpool_info lists attnfast, whichever is imported first
# --------------------------------------------------------------------------


def test_threadpool_info_lists_attnfast():
    info = attnfast_info()
    assert info["internal_api"] == "attnfast" and info["prefix"] == "_attnfast"
    assert info["version"] == attnfast.__version__
    assert os.path.realpath(info["filepath"]) == MODULE_FILE
    assert info["num_threads"] == attnfast.get_num_threads()
    attnfast.set_num_threads(1)
    assert attnfast_info()["num_threads"] == 1
    # Listed by the module-level function too, and serialisable as threadpoolctl's own entries are.
    listed = [i for i in threadpoolctl.threadpool_info() if i["user_api"] == "attnfast"]
    assert json.loads(json.dumps(listed))[0]["num_threads"] == 1
    assert pickle.loads(pickle.dumps(listed))[0]["num_threads"] == 1


def test_threadpool_info_reports_a_process_wide_limit_scope():
    info = [i for i in threadpoolctl.threadpool_info(debugging_info=True) if i["user_api"] == "attnfast"]
    assert info[0]["thread_limit_scope"] == "process"


ORDER_PROBE = """
import json, sys
{imports}
import threadpoolctl, attnfast
before = attnfast.get_num_threads()
listed = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "attnfast"]
with threadpoolctl.threadpool_limits(1):
    inside = attnfast.get_num_threads()
with threadpoolctl.threadpool_limits(limits=1, user_api="attnfast"):
    inside_api = attnfast.get_num_threads()
print(json.dumps(dict(listed=listed, inside=inside, inside_api=inside_api, after=attnfast.get_num_threads(),
                      before=before, hook_left=[type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_Finder"])))
"""


@pytest.mark.parametrize(
    "imports",
    [
        "import threadpoolctl\nimport attnfast",  # threadpoolctl first: registered at attnfast's import
        "import attnfast\nimport threadpoolctl",  # attnfast first: registered by the import hook
        "import attnfast\nimport importlib.util\nassert importlib.util.find_spec('threadpoolctl')",
    ],
)
def test_threadpool_limits_works_whichever_is_imported_first(imports):
    r, _ = run_json(ORDER_PROBE.format(imports=imports), env={"OMP_NUM_THREADS": "3"})
    assert r == dict(listed=[3], inside=1, inside_api=1, after=3, before=3, hook_left=[])


def test_import_attnfast_does_not_import_threadpoolctl():
    r, _ = run_json(
        """
        import json, sys
        import attnfast
        hooks = [type(f).__name__ for f in sys.meta_path]
        print(json.dumps(dict(imported="threadpoolctl" in sys.modules, hooked="_Finder" in hooks)))
        """
    )
    assert r == dict(imported=False, hooked=True)


def test_attnfast_works_when_threadpoolctl_cannot_be_imported():
    r, _ = run_json(
        """
        import json, sys
        sys.modules["threadpoolctl"] = None  # as if not installed: `import threadpoolctl` raises
        import numpy as np
        import attnfast
        try:
            import threadpoolctl
            found = True
        except ImportError:
            found = False
        q = np.ones((1, 2, 8, 16))
        print(json.dumps(dict(found=found, ok=bool(np.allclose(attnfast.attention(q, q, q), 1.0)))))
        """
    )
    assert r == dict(found=False, ok=True)


def test_python_m_threadpoolctl_lists_attnfast():
    # threadpoolctl's command line runs it as __main__, then imports attnfast.
    result = subprocess.run([sys.executable, "-m", "threadpoolctl", "-i", "attnfast"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": PACKAGE_DIR, "OMP_NUM_THREADS": "3"})
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)  # indented JSON over several lines
    assert [(i["internal_api"], i["num_threads"]) for i in r if i["user_api"] == "attnfast"] == [("attnfast", 3)]


# --------------------------------------------------------------------------
# threadpool_limits: process-wide, from any thread, nested, restored exactly
# --------------------------------------------------------------------------


def in_other_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]


@pytest.mark.parametrize("user_api", [None, "attnfast"])
def test_limit_from_the_main_thread_applies_to_every_thread(user_api):
    default = attnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api=user_api):
        assert attnfast.get_num_threads() == 1
        assert in_other_thread(attnfast.get_num_threads) == 1
        assert attnfast.capabilities()["thread_limit"] == 1
    assert attnfast.get_num_threads() == default == in_other_thread(attnfast.get_num_threads)
    assert attnfast.capabilities()["thread_limit"] is None


def test_limit_from_another_thread_applies_to_the_main_thread_while_it_lasts():
    default = attnfast.get_num_threads()
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def limited():
        with threadpoolctl.threadpool_limits(1):
            seen["there"] = attnfast.get_num_threads()
            entered.set()
            assert release.wait(30)

    t = threading.Thread(target=limited)
    t.start()
    try:
        assert entered.wait(30)
        seen["here"] = attnfast.get_num_threads()
    finally:
        release.set()
        t.join()
    assert seen == {"there": 1, "here": 1}
    assert attnfast.get_num_threads() == default


def test_blas_only_limit_leaves_attnfast_alone():
    attnfast.set_num_threads(0)
    default = attnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        assert attnfast.get_num_threads() == default


def test_zero_or_non_int_limit_is_rejected():
    with pytest.raises(ValueError, match=r"^threadpoolctl's limit for attnfast must be at least 1 thread, got 0; "
                       r"call attnfast\.set_num_threads\(0\) to restore attnfast's default count$"):
        threadpoolctl.threadpool_limits(limits={"attnfast": 0})
    controller = threadpoolctl.ThreadpoolController().select(user_api="attnfast").lib_controllers[0]
    with pytest.raises(TypeError, match=r"^threadpoolctl's limit for attnfast must be an int, got float$"):
        controller.set_num_threads(1.5)
    assert _core.thread_limit() == 0


# OMP_NUM_THREADS=4: a default above the machine's 2 CPUs, so that every setting below is visible.
SEMANTICS = """
import json, threading
import threadpoolctl, attnfast
from attnfast import _attnfast as core
n = attnfast.get_num_threads
seen = {"default": n()}
with threadpoolctl.threadpool_limits(2):
    seen["limit 2"] = n()
    with threadpoolctl.threadpool_limits(1):
        seen["limit 1 inside limit 2"] = n()
        with threadpoolctl.threadpool_limits(3):
            seen["limit 3 inside limit 1"] = n()
        seen["back in limit 1"] = n()
    seen["back in limit 2"] = n()
    attnfast.set_num_threads(1)
    seen["set_num_threads(1) inside limit 2"] = n()
    attnfast.set_num_threads(3)
    seen["set_num_threads(3) inside limit 2"] = n()
seen["after: set_num_threads(3) kept, no limit"] = [n(), core.thread_limit()]

# Exact restore: a limit equal to the count in force must not stay behind as a limit.
attnfast.set_num_threads(2)
with threadpoolctl.threadpool_limits(1):
    pass
attnfast.set_num_threads(0)
seen["set_num_threads(0) after a block at 2"] = [n(), core.thread_limit()]

# A limit that outlives the block: set by a plain call, then restored by the object threadpoolctl returns.
limiter = threadpoolctl.threadpool_limits(2)
attnfast.set_num_threads(0)
seen["plain call"] = n()
limiter.restore_original_limits()
seen["restored"] = [n(), core.thread_limit()]

# The decorator form, ThreadpoolController.limit and threadpool_limits(limits=threadpool_info()).
@threadpoolctl.threadpool_limits.wrap(limits=1, user_api="attnfast")
def decorated():
    return n()
seen["decorated"] = [decorated(), n()]
controller = threadpoolctl.ThreadpoolController()
with controller.limit(limits=1, user_api="attnfast"):
    snapshot = threadpoolctl.threadpool_info()
    seen["controller.limit"] = n()
with threadpoolctl.threadpool_limits(limits=snapshot):
    seen["limits=info() taken under limit 1"] = n()
seen["end"] = [n(), core.thread_limit()]

# Blocks in two threads that overlap without nesting: each restores what it found when it entered, in
# the order they leave, as threadpoolctl does for every process-wide pool (OpenBLAS' pthreads build).
a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
def a():
    with threadpoolctl.threadpool_limits(3):
        a_in.set(); b_in.wait()
    a_out.set()
def b():
    a_in.wait()
    with threadpoolctl.threadpool_limits(1):
        b_in.set(); a_out.wait()
        seen["b, after a left"] = n()
threads = [threading.Thread(target=a), threading.Thread(target=b)]
for t in threads: t.start()
for t in threads: t.join()
seen["after both"] = [n(), core.thread_limit()]
print(json.dumps(seen))
"""


def test_limits_nest_cap_set_num_threads_and_restore_exactly():
    r, _ = run_json(SEMANTICS, env={"OMP_NUM_THREADS": "4"})
    assert r == {
        "default": 4,
        "limit 2": 2,
        "limit 1 inside limit 2": 1,
        "limit 3 inside limit 1": 3,  # an inner block sets its own limit, as threadpoolctl does for all libraries
        "back in limit 1": 1,
        "back in limit 2": 2,
        "set_num_threads(1) inside limit 2": 1,
        "set_num_threads(3) inside limit 2": 2,  # the limit caps the user's choice...
        "after: set_num_threads(3) kept, no limit": [3, 0],  # ...which is untouched when it goes
        "set_num_threads(0) after a block at 2": [4, 0],
        "plain call": 2,
        "restored": [4, 0],
        "decorated": [1, 4],
        "controller.limit": 1,
        "limits=info() taken under limit 1": 1,
        "end": [4, 0],
        # a leaves first and restores "no limit" (what it found); b, which entered under a's limit 3,
        # restores that when it leaves.
        "b, after a left": 4,
        "after both": [3, 3],
    }


def test_results_are_bitwise_identical_under_any_limit(rng):
    q = rng.standard_normal((2, 4, 300, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 700, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 700, 64)).astype(np.float32)
    dout = rng.standard_normal((2, 4, 300, 64)).astype(np.float32)
    decode = q[:, :, :1]

    def run():
        out, lse = attnfast.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
        grads = attnfast.attention_backward(dout, q, k, v, out, lse, causal=True, causal_align="bottom_right")
        return [out, lse, attnfast.attention(decode, k, v), grads.dq, grads.dk, grads.dv]

    results = {"default": (attnfast.get_num_threads(), run())}
    for limit in (1, 2):
        with threadpoolctl.threadpool_limits(limit):
            results[f"limit {limit}"] = (attnfast.get_num_threads(), run())
    with threadpoolctl.threadpool_limits(1):
        results["limit 1, other thread"] = in_other_thread(lambda: (attnfast.get_num_threads(), run()))
    assert results["limit 1"][0] == 1 and results["limit 1, other thread"][0] == 1
    reference = results["default"][1]
    for name, (_, arrays) in results.items():
        for a, b in zip(arrays, reference):
            assert a.tobytes() == b.tobytes(), name


def test_a_library_that_only_shares_the_prefix_is_not_taken_for_attnfast(tmp_path):
    # A shared library named _attnfast... without attnfast's symbols: threadpoolctl must list it under
    # no controller, and still list the real module.
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux")
    source = tmp_path / "other.c"
    source.write_text("int other_function(void) { return 1; }\n")
    library = tmp_path / "_attnfast_other.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    r, _ = run_json(
        f"""
        import ctypes, json
        import threadpoolctl, attnfast
        ctypes.CDLL({str(library)!r})
        print(json.dumps([i["filepath"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "attnfast"]))
        """
    )
    assert [os.path.realpath(p) for p in r] == [MODULE_FILE]
