"""Threads as a resource: what attnfast does when the OS refuses a thread, when the interpreter exits
while a daemon thread is inside a call, and which thread limits apply to which Python thread.

Thread-limit semantics (README, "Threads"): the default (``OMP_NUM_THREADS``, else the affinity mask),
``attnfast.set_num_threads(n)`` and ``threadpoolctl.threadpool_limits`` are all process-wide: a limit
set in one Python thread applies to calls from every thread (tests/test_threadpool.py has the rest).

Scenarios that change the process (resource limits, interpreter exit, environment) run in a fresh
interpreter; no test measures speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import attnfast

PACKAGE_DIR = str(Path(attnfast.__file__).resolve().parent.parent)


def run_python(code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": PACKAGE_DIR, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def run_json(code: str, env: dict | None = None) -> dict:
    result = run_python(code, env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_limited(tmp_path: Path, code: str) -> dict:
    # A script file rather than -c, so that LIMITED_PROCESS can re-execute it.
    script = tmp_path / "limited.py"
    script.write_text(LIMITED_PROCESS + textwrap.dedent(code))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PACKAGE_DIR, "OMP_NUM_THREADS": "2000"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def default_threads():
    attnfast.set_num_threads(0)
    yield
    attnfast.set_num_threads(0)


# --------------------------------------------------------------------------
# A thread the OS refuses to start
# --------------------------------------------------------------------------

under_address_space_limit = pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="AddressSanitizer's allocator cannot run under an address-space limit",
)

# Makes thread starts fail reproducibly: worker stacks of 64 MiB (the default thread stack is
# RLIMIT_STACK, read when the interpreter starts, hence the re-exec) and an address-space limit that
# leaves room for about two of them, with OMP_NUM_THREADS=2000 asking for far more.
LIMITED_PROCESS = """
import json, os, re, resource, sys, warnings
HARD_STACK = resource.getrlimit(resource.RLIMIT_STACK)[1]
STACK = 64 << 20 if HARD_STACK == resource.RLIM_INFINITY else min(64 << 20, HARD_STACK)
if os.environ.get("ATTNFAST_TEST_STAGE") != "limited":
    resource.setrlimit(resource.RLIMIT_STACK, (STACK, HARD_STACK))
    os.environ["ATTNFAST_TEST_STAGE"] = "limited"
    os.execv(sys.executable, [sys.executable, *sys.argv])
import numpy as np
import attnfast

rng = np.random.default_rng(0)
q = rng.standard_normal((2, 4, 300, 64)).astype(np.float32)
k = rng.standard_normal((2, 4, 400, 64)).astype(np.float32)
v = rng.standard_normal((2, 4, 400, 64)).astype(np.float32)
calls = {
    "attention": lambda: attnfast.attention(q, k, v, causal=True),
    "decode": lambda: attnfast.attention(q[:, :, :1], k, v),
    "scores": lambda: attnfast.scores(q, k),
    "softmax": lambda: attnfast.softmax(attnfast.scores(q, k)),
    "aggregate": lambda: attnfast.aggregate(attnfast.softmax(attnfast.scores(q, k)), v),
}
attnfast.set_num_threads(1)  # the expected values, before any worker exists
expected = {name: call() for name, call in calls.items()}
attnfast.set_num_threads(0)

def vm_size():
    with open("/proc/self/status") as f:
        return int(re.search(r"VmSize:\\s+(\\d+) kB", f.read()).group(1)) << 10

def thread_count():
    return len(os.listdir("/proc/self/task"))

def same(name):
    return bool(np.array_equal(calls[name](), expected[name]))

threads_before = thread_count()  # the interpreter's and those of NumPy's BLAS
resource.setrlimit(resource.RLIMIT_AS, (vm_size() + int(2.5 * STACK), resource.RLIM_INFINITY))
"""


@under_address_space_limit
def test_refused_thread_start_runs_on_the_threads_that_started_and_warns_once(tmp_path):
    code = """
with warnings.catch_warnings(record=True) as first:
    warnings.simplefilter("always")
    ok_first = same("attention")
threads_after_first = thread_count()
running = attnfast.get_num_threads()
with warnings.catch_warnings():
    warnings.simplefilter("error")  # any further warning (a new attempt) would raise here
    ok_all = all(same(name) for name in calls for _ in range(3))
    vm_before = vm_size()
    for _ in range(30):
        ok_all &= same("attention") and same("softmax")
    vm_after = vm_size()
threads_after_all = thread_count()
attnfast.set_num_threads(0)  # lets the pool try again: refused again, reported again
with warnings.catch_warnings(record=True) as retried:
    warnings.simplefilter("always")
    ok_retry = same("attention")
print(json.dumps(dict(
    warnings=[(w.category.__name__, str(w.message)) for w in first],
    retried=[(w.category.__name__, str(w.message)) for w in retried],
    ok_first=ok_first, ok_all=ok_all, ok_retry=ok_retry, running=running,
    workers=[threads_after_first - threads_before, threads_after_all - threads_before],
    vm_growth=vm_after - vm_before)))
"""
    r = run_limited(tmp_path, code)
    assert r["ok_first"] and r["ok_all"] and r["ok_retry"]
    assert len(r["warnings"]) == 1, r["warnings"]
    category, message = r["warnings"][0]
    assert category == "RuntimeWarning"
    m = re.fullmatch(
        r"attnfast could not start a thread \((.+)\): running on (\d+) of the 2000 threads requested\. "
        r"Lower OMP_NUM_THREADS or call attnfast\.set_num_threads\(n\) with a smaller n; "
        r"attnfast\.set_num_threads\(\) also lets it try again\.",
        message,
    )
    assert m, message
    assert 1 <= int(m.group(2)) < 2000 and int(m.group(2)) == r["running"]
    # The caller (this thread) and running - 1 workers; no thread started or lost by later calls.
    assert r["workers"][0] == r["workers"][1] == r["running"] - 1
    assert r["vm_growth"] < 8 << 20  # nothing kept per call: no scratch buffer or thread leaks
    assert len(r["retried"]) == 1 and r["retried"][0][0] == "RuntimeWarning"


@under_address_space_limit
def test_refused_thread_start_as_an_error_fails_one_call_before_it_writes(tmp_path):
    # With warnings as errors (as pytest's filterwarnings = error does), the warning is the call's
    # exception, raised before anything is computed into out=; the next call runs normally.
    code = """
out = np.full((2, 4, 300, 64), np.nan, np.float32)
warnings.simplefilter("error")
try:
    attnfast.attention(q, k, v, causal=True, out=out)
    raised = None
except RuntimeWarning as e:
    raised = str(e)
untouched = bool(np.isnan(out).all())
attnfast.attention(q, k, v, causal=True, out=out)
print(json.dumps(dict(raised=raised, untouched=untouched,
                      ok=bool(np.array_equal(out, expected["attention"])))))
"""
    r = run_limited(tmp_path, code)
    assert r["raised"] and r["raised"].startswith("attnfast could not start a thread (")
    assert r["untouched"] and r["ok"]


# --------------------------------------------------------------------------
# Interpreter exit while a daemon thread is inside a call
# --------------------------------------------------------------------------

DAEMON_EXIT = """
import threading, time
import numpy as np
import attnfast
rng = np.random.default_rng(0)
q = rng.standard_normal((8, 8, 512, 64)).astype(np.float32)
inside = threading.Event()
def loop():
    while True:
        inside.set()
        {call}
for _ in range(2):
    threading.Thread(target=loop, daemon=True).start()
inside.wait()
time.sleep({delay})
"""


@pytest.mark.parametrize(
    "call",
    [
        "attnfast.attention(q, q, q)",
        "attnfast.attention(q[:, :, :1], q, q)",
        "attnfast.softmax(q)",
        "attnfast.softmax(q[0, 0, :4])",  # tiny calls: the GIL changes hands most often
    ],
)
def test_interpreter_exit_with_daemon_threads_inside_calls_is_clean(call):
    for delay in (0.0, 0.01, 0.03):
        r = run_python(DAEMON_EXIT.format(call=call, delay=delay))
        assert r.returncode == 0 and "terminate" not in r.stderr, (delay, r.returncode, r.stderr)


def test_main_thread_can_still_call_from_a_late_atexit_handler():
    # atexit runs handlers last-registered first, so this one runs after attnfast's own exit hook has
    # closed its gate: the exiting thread itself must still get its results.
    r = run_python(
        """
        import atexit
        import numpy as np
        def late():
            import attnfast
            x = np.ones((4, 8, 64, 32), np.float32)
            print("late", float(attnfast.attention(x, x, x).sum()))
        atexit.register(late)
        import attnfast
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"late {4 * 8 * 64 * 32:.1f}"


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="AddressSanitizer's allocator is not fork-safe: a child forked while other threads allocate "
    "can wait forever on a lock one of them held",
)
def test_forked_child_calls_and_exits_while_parent_threads_are_inside_calls():
    # The child has only the forking thread: the pool and the exit gate start afresh there, so the
    # child's calls run and its exit does not wait for threads that exist only in the parent.
    r = run_json(
        """
        import json, os, sys, threading, warnings
        import numpy as np
        import attnfast
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads running
        q = np.random.default_rng(0).standard_normal((4, 2, 64, 32)).astype(np.float32)
        expected = attnfast.attention(q, q, q)
        stop = False
        def loop():
            while not stop:
                attnfast.attention(q, q, q)
        threads = [threading.Thread(target=loop) for _ in range(3)]
        for t in threads:
            t.start()
        codes = []
        for _ in range(10):
            pid = os.fork()
            if pid == 0:
                sys.exit(0 if np.array_equal(attnfast.attention(q, q, q), expected) else 3)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        stop = True
        for t in threads:
            t.join()
        print(json.dumps(codes))
        """
    )
    assert r == [0] * 10


# --------------------------------------------------------------------------
# Which limits apply to which Python thread
# --------------------------------------------------------------------------


# In a fresh interpreter with OMP_NUM_THREADS=3, so that the default is a known value other than 1.
THREAD_LIMITS = """
import json, threading
import attnfast
import threadpoolctl

def in_other_thread(fn):
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.join()
    return box[0]

def limited_in_that_thread():
    with threadpoolctl.threadpool_limits(1):
        return attnfast.get_num_threads()

seen = {"default": [attnfast.get_num_threads(), in_other_thread(attnfast.get_num_threads)]}
attnfast.set_num_threads(2)
seen["set_num_threads(2)"] = [attnfast.get_num_threads(), in_other_thread(attnfast.get_num_threads)]
attnfast.set_num_threads(0)
in_other_thread(lambda: attnfast.set_num_threads(1))
seen["set_num_threads(1) in the other thread"] = [attnfast.get_num_threads(), in_other_thread(attnfast.get_num_threads)]
attnfast.set_num_threads(0)
with threadpoolctl.threadpool_limits(1):
    seen["threadpool_limits(1)"] = [attnfast.get_num_threads(), in_other_thread(attnfast.get_num_threads)]
seen["threadpool_limits(1) in the other thread"] = [attnfast.get_num_threads(), in_other_thread(limited_in_that_thread)]
with threadpoolctl.threadpool_limits(2):
    attnfast.set_num_threads(1)
    seen["both"] = [attnfast.get_num_threads(), in_other_thread(attnfast.get_num_threads)]
print(json.dumps(seen))
"""


def test_which_thread_limits_apply_to_which_thread():
    pytest.importorskip("threadpoolctl", reason="installed by the test extra")
    seen = run_json(THREAD_LIMITS, env={"OMP_NUM_THREADS": "3"})
    # [this thread, another thread]: set_num_threads and threadpoolctl's limit are process-wide,
    # whichever thread sets them. (In "in the other thread", this thread's value is read before the other
    # thread enters its block.)
    assert seen == {
        "default": [3, 3],
        "set_num_threads(2)": [2, 2],
        "set_num_threads(1) in the other thread": [1, 1],
        "threadpool_limits(1)": [1, 1],
        "threadpool_limits(1) in the other thread": [3, 1],
        "both": [1, 1],
    }


def test_omp_num_threads_applies_to_every_thread():
    r = run_json(
        """
        import json, threading
        import attnfast
        seen = []
        t = threading.Thread(target=lambda: seen.append(attnfast.get_num_threads()))
        t.start(); t.join()
        print(json.dumps([attnfast.get_num_threads(), seen[0]]))
        """,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r == [1, 1]


# --------------------------------------------------------------------------
# set_num_threads' argument
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, error, message",
    [
        (1.5, TypeError, "set_num_threads expects an int, got float"),
        ("2", TypeError, "set_num_threads expects an int, got str"),
        (None, TypeError, "set_num_threads expects an int, got NoneType"),
        (True, TypeError, "set_num_threads expects an int, got bool"),
        (np.array([2], np.int64), TypeError, r"set_num_threads expects an int, got ndarray of shape \(1,\) and dtype int64"),
        (np.array([[2]], np.int32), TypeError,
         r"set_num_threads expects an int, got ndarray of shape \(1, 1\) and dtype int32"),
        (np.array(2.0), TypeError, r"set_num_threads expects an int, got ndarray of shape \(\) and dtype float64"),
        (-1, ValueError, r"set_num_threads: n must be >= 0 \(0 restores the default\), got -1"),
        (2**31, ValueError, "set_num_threads: n must be at most 65536, got 2147483648"),
        (65537, ValueError, "set_num_threads: n must be at most 65536, got 65537"),
    ],
)
def test_set_num_threads_rejects_bad_values(default_threads, value, error, message):
    before = attnfast.get_num_threads()
    with pytest.raises(error, match=f"^{message}$"):
        attnfast.set_num_threads(value)
    assert attnfast.get_num_threads() == before


def test_set_num_threads_accepts_integer_types_and_the_cap(default_threads):
    default = attnfast.get_num_threads()
    attnfast.set_num_threads(np.int64(1))
    assert attnfast.get_num_threads() == 1
    attnfast.set_num_threads(65536)  # only lowers the default, never raises it
    assert attnfast.get_num_threads() == default
