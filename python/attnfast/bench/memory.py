"""Peak extra memory of one call, as the operating system sees it (resident set high-water mark).

``tracemalloc`` sees only Python-level allocations; the C++ kernels, BLAS, PyTorch and ONNX Runtime
allocate with ``malloc`` directly.  The kernel's view is the process's peak RSS (``VmHWM`` in
``/proc/self/status``), which Linux lets a process reset by writing ``5`` to ``/proc/self/clear_refs``.
So a measurement is: reset the peak, note the current RSS, make the call, read the peak.

That is only honest in a process whose allocator gives memory back: glibc keeps freed blocks below its
(dynamic, up to 32 MiB) mmap threshold for reuse, which would hide a second call's allocations.  The
measurement therefore runs in a child process with a fixed, low mmap threshold, so every large block is
a fresh mapping that is unmapped on free, and with ONNX Runtime's memory arena turned off.  The timing
runs stay in the parent, with the allocator untouched.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Callable, Dict, List, Optional

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss", "tune_malloc_for_measurement",
           "measure_call", "MemoryChild", "measure_in_child"]

_CHILD_TIMEOUT_S = 1800
#: Pause before measuring a library that frees buffers on its own threads (JAX).
_SETTLE_S = 0.05


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    """Current resident set size (VmRSS)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size since start or since the last :func:`reset_peak_rss` (VmHWM)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        try:
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        except (ImportError, OSError):
            return None
    return kib * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tune_malloc_for_measurement(threshold_bytes: int = 64 * 1024) -> bool:
    """Make glibc map every block above ``threshold_bytes`` afresh and return it to the OS on free."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, threshold_bytes) == 1
        ok &= libc.mallopt(m_trim_threshold, threshold_bytes) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def measure_call(fn: Callable[[], object], settle_s: float = 0.0) -> Optional[int]:
    """Peak RSS growth in bytes while ``fn()`` runs (including whatever it returns).

    ``settle_s``: a pause before the baseline is read, for libraries that free a previous call's
    buffers on a thread of their own (see :func:`_child_main`).
    """
    gc.collect()
    if settle_s:
        time.sleep(settle_s)
    if not reset_peak_rss():
        return None
    before = rss_bytes()
    result = fn()
    peak = peak_rss_bytes()
    del result
    if before is None or peak is None:
        return None
    return max(0, peak - before)


# ---------------------------------------------------------------------------------------------------
def _package_parent() -> str:
    """Directory that holds the ``attnfast`` package, so the child imports the same copy."""
    here = os.path.dirname(os.path.abspath(__file__))  # .../attnfast/bench
    return os.path.dirname(os.path.dirname(here))


class MemoryChild:
    """The measuring interpreter, started early so that its imports overlap the parent's.

    :meth:`start` launches it with the implementations, dtype and thread count; it imports them, tunes
    malloc, pins the threads and then waits (blocked on a pipe, using no CPU) for :meth:`measure`.  In
    --quick, importing PyTorch, JAX and ONNX Runtime took the child 2-6 s of the run's wall time, now
    spent while the parent imports the same libraries.  :meth:`ready` waits until the imports are done,
    so they never compete with a probe or a timed call.
    """

    def __init__(self, proc: Optional["subprocess.Popen[str]"], tmp: "tempfile.TemporaryDirectory[str]",
                 err: Optional[IO[str]], note: Optional[str]):
        self._proc, self._tmp, self._err, self._note = proc, tmp, err, note
        self._ready = False

    def _stderr_tail(self) -> str:
        if self._err is None:
            return ""
        self._err.flush()
        self._err.seek(0)
        return " | ".join(self._err.read().strip().splitlines()[-3:])

    @classmethod
    def start(cls, impls: List[str], dtype: str, causal: bool, threads: int) -> "MemoryChild":
        tmp = tempfile.TemporaryDirectory(prefix="attnfast-mem-")
        setup = os.path.join(tmp.name, "setup.json")
        with open(setup, "w") as f:
            json.dump({"impls": impls, "dtype": dtype, "causal": causal, "threads": threads}, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_parent(), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "attnfast.bench.memory", setup]
        # stderr to a file, not a pipe: nobody reads it while the child waits, and a full pipe would
        # block the child.
        err = open(os.path.join(tmp.name, "stderr.txt"), "w+")
        try:
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, text=True)
        except OSError as exc:
            err.close()
            return cls(None, tmp, None, f"memory measurement could not start: {exc}")
        return cls(proc, tmp, err, None)

    def ready(self, timeout_s: float = 600) -> None:
        """Wait until the child has imported everything (it prints one line then)."""
        if self._proc is None or self._ready:
            return
        line = self._readline(timeout_s)
        self._ready = True
        if line != "ready":
            self._fail(f"memory child did not start ({line or 'no answer'})")

    def _readline(self, timeout_s: float) -> str:
        import selectors

        assert self._proc is not None and self._proc.stdout is not None  # started with a stdout pipe
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                return ""
        return self._proc.stdout.readline().strip()

    def _fail(self, note: str) -> None:
        if self._proc is not None:
            self._reap()
            tail = self._stderr_tail()
            self._note = note + (f" (exit {self._proc.returncode}): {tail}" if tail else "")
            self._proc = None

    def _reap(self) -> None:
        """Kill the child if it still runs, wait for it and close its pipes."""
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None and not pipe.closed:
                try:
                    pipe.close()
                except OSError:
                    pass  # stdin of a dead child: nothing left to flush

    def measure(self, jobs: List[Dict[str, Any]], warm_all: bool = True,
                timeout_s: float = _CHILD_TIMEOUT_S) -> Dict[str, Any]:
        """Measure ``jobs`` (``{"case": case.to_dict(), "impls": [names]}``), then let the child exit.

        Each call is measured after a first, unmeasured call; with ``warm_all=False`` (``--quick``) only
        implementations whose first call does one-time work (ONNX Runtime; JAX compiles ahead of time in
        its ``prepare``) get that extra call.

        Returns ``{"results": {case_name: {impl: bytes or None}}, "note": str or None, "seconds": ...}``.
        Any failure of the child (crash, timeout) becomes a note, never an exception: memory is one
        column of the report.
        """
        try:
            self.ready()
            if self._proc is None:
                return {"results": {}, "note": self._note}
            request = os.path.join(self._tmp.name, "request.json")
            answer = os.path.join(self._tmp.name, "answer.json")
            with open(request, "w") as f:
                json.dump({"jobs": jobs, "warm_all": warm_all, "answer": answer}, f)
            assert self._proc.stdin is not None  # started with a stdin pipe
            try:
                self._proc.stdin.write(request + "\n")
                self._proc.stdin.close()
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._fail(f"memory measurement timed out after {timeout_s:.0f} s")
                return {"results": {}, "note": self._note}
            except OSError:
                self._proc.wait()  # the child is gone: its exit status and stderr say why, below
            if self._proc.returncode != 0 or not os.path.exists(answer):
                return {"results": {}, "note": f"memory measurement failed (exit {self._proc.returncode}): "
                                               + self._stderr_tail()}
            with open(answer) as f:
                measured: Dict[str, Any] = json.load(f)
                return measured
        finally:
            self.close()

    def close(self) -> None:
        """Stop the child if it still runs (a run without a memory step, an exception) and clean up."""
        if self._proc is not None:
            self._reap()
        if self._err is not None:
            self._err.close()
            self._err = None
        self._tmp.cleanup()


def measure_in_child(jobs: List[Dict[str, Any]], dtype: str, causal: bool, threads: int,
                     timeout_s: float = _CHILD_TIMEOUT_S, warm_all: bool = True) -> Dict[str, Any]:
    """Start a :class:`MemoryChild` for the implementations of ``jobs`` and measure them."""
    names = sorted({name for job in jobs for name in job["impls"]})
    return MemoryChild.start(names, dtype, causal, threads).measure(jobs, warm_all, timeout_s)


def _child_main(setup_path: str) -> None:
    """Child side of :class:`MemoryChild`: import and set up, say "ready", measure what stdin names."""
    t_start = time.perf_counter()
    from . import peers
    from .cases import AttentionCase, case_from_dict, make_attention_inputs, make_stage_inputs, storage_dtype

    with open(setup_path) as f:
        setup = json.load(f)
    tuned = tune_malloc_for_measurement()
    dtype = storage_dtype(setup["dtype"])
    impls = {i.name: i for i in peers.all_impls(setup["threads"], setup["dtype"])}
    for name in list(impls):
        if name not in setup["impls"] or not impls[name].available():
            del impls[name]
    ort = impls.get("onnxruntime")
    if isinstance(ort, peers.OnnxRuntimeImpl):
        ort.arena = False
    peers.pin_threads(list(impls.values()), setup["threads"])
    # With PyTorch and JAX imported the heap holds millions of objects: each full collection in
    # measure_call took ~0.15 s, half of the child's time in a --quick run (98 collections, 14 s).
    # Frozen objects are skipped by the collector; what the calls below create is still collected.
    gc.collect()
    gc.freeze()
    startup_s = time.perf_counter() - t_start
    print("ready", flush=True)
    request_path = sys.stdin.readline().strip()
    if not request_path:
        return  # the parent needs no measurement after all
    t_measure = time.perf_counter()
    with open(request_path) as f:
        req = json.load(f)

    results: Dict[str, Dict[str, Optional[int]]] = {}
    case_seconds: Dict[str, float] = {}
    can_reset = reset_peak_rss()
    for job in req["jobs"]:
        t_case = time.perf_counter()
        case = case_from_dict(job["case"])
        inputs = (make_attention_inputs(case, dtype) if isinstance(case, AttentionCase)
                  else make_stage_inputs(case, dtype))
        row = results.setdefault(case.name, {})
        for name in job["impls"]:
            if name not in impls or not can_reset:
                row[name] = None
                continue
            run, _ = impls[name].prepare(case, inputs, setup["causal"])
            if req.get("warm_all", True) or impls[name].first_call_allocates:
                run()  # first call: compilation, thread pools, one-time buffers are not per-call memory
            # Collects first: the previous runner's garbage is gone.  XLA (JAX) releases a finished
            # call's buffers asynchronously: read at once, the baseline still held the warm-up call's
            # buffers and the measured call, reusing them, showed 0-10% of its real growth (1024^2
            # case: 8 MB in one run, 72 MB in another; 72 MB every time after a pause).
            row[name] = measure_call(run, _SETTLE_S if impls[name].frees_asynchronously else 0.0)
            del run
        del inputs
        case_seconds[case.name] = time.perf_counter() - t_case
    note = None
    if not can_reset:
        note = "the kernel does not allow resetting the peak RSS (/proc/self/clear_refs); memory not measured"
    elif not tuned:
        note = "could not tune malloc (not glibc?): memory deltas may be under-estimated"
    with open(req["answer"], "w") as f:
        json.dump({"results": results, "note": note,
                   "seconds": {"startup": startup_s, "cases": case_seconds,
                               "measuring": time.perf_counter() - t_measure}}, f)


if __name__ == "__main__":
    _child_main(sys.argv[1])
