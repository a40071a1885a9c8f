"""Short probes of the machine's limits, measured in the same run as the benchmark.

* FMA peak: what the cores can do when they do nothing but fused multiply-adds.  The compiled module's
  ``attnfast._attnfast.probe_fma_peak(seconds)`` runs a register-only FMA loop on every attnfast thread;
  when it is absent, a NumPy/BLAS matrix product stands in (a lower bound: BLAS reaches 90-97% of peak).
* Read bandwidth: how fast a plain vectorized loop reads a buffer of a given size, i.e. the ceiling of a
  memory-bound decode step whose K and V are that size.  ``attnfast._attnfast.probe_read_bandwidth(nbytes,
  seconds)`` when present, else a threaded ``np.max`` over the buffer (NumPy's max is SIMD and streams).

Every probe returns SI units (FLOP/s, bytes/s) and names its source, so the report can say what the
percentages are relative to.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["fma_peak", "read_bandwidth", "native_probes", "BandwidthCache", "memory_level"]


def native_probes() -> Optional[Any]:
    """The compiled module if it has the probes, else None."""
    try:
        from attnfast import _attnfast  # the pybind11 extension
    except Exception:  # noqa: BLE001 - not built yet, or built without probes
        return None
    if hasattr(_attnfast, "probe_fma_peak") and hasattr(_attnfast, "probe_read_bandwidth"):
        return _attnfast
    return None


def _as_rate(value: Any, giga_key: str, unit_key: str) -> float:
    """Normalise a probe result to per-second SI units.

    Accepts a number in G-units (GFLOP/s, GB/s) or already in units per second, or a dict with one of
    the two keys.  Values below 1e6 cannot be per-second rates of a modern CPU, so they are G-units.
    """
    if isinstance(value, dict):
        if unit_key in value:
            return float(value[unit_key])
        return float(value[giga_key]) * 1e9
    rate = float(value)
    return rate * 1e9 if rate < 1e6 else rate


def _numpy_fma_estimate(seconds: float, dtype: Any, threads: int) -> float:
    """Best rate of a square BLAS matmul (n=1536: big enough for full-width kernels, small to repeat)."""
    n = 1536
    a = np.ones((n, n), dtype=dtype)
    b = np.ones((n, n), dtype=dtype)
    out = np.empty((n, n), dtype=dtype)
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        limiter = None
    try:
        np.matmul(a, b, out=out)  # warm up the BLAS thread pool
        best = float("inf")
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - t0)
            if time.perf_counter() > end:
                break
    finally:
        if limiter is not None:
            limiter.restore_original_limits()
    return 2.0 * n ** 3 / best


def _numpy_read_estimate(nbytes: int, seconds: float, threads: int) -> float:
    """Best rate of a threaded max-reduction over a buffer of ``nbytes``.

    NumPy releases the GIL in reductions, so each thread streams its own part.  Each task reduces its
    part several times so that thread dispatch (~50 µs) does not count against a buffer that reads in
    ~100 µs from L3.
    """
    buf = np.ones(max(nbytes // 4, 1024), dtype=np.float32)
    parts = np.array_split(buf, threads)
    inner = max(1, int(2e6 // buf.nbytes) + 4)  # enough repeats to make each task ~≥ 1 ms

    def task(part: np.ndarray) -> None:
        for _ in range(inner):
            np.max(part)

    rates = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(task, parts))  # touch every page and start the threads
        end = time.perf_counter() + seconds
        while True:
            t0 = time.perf_counter()
            list(pool.map(task, parts))
            rates.append(inner * buf.nbytes / (time.perf_counter() - t0))
            if time.perf_counter() > end and len(rates) >= 3:
                break
    return float(max(rates))


#: A probe is split into this many samples and the best one kept: a peak is a maximum, and on a shared
#: machine any sample may lose its cores to another process for part of the time.
_SAMPLES = 3


def fma_peak(seconds: float = 0.3, dtype: Any = np.float32, threads: int = 1) -> Dict[str, Any]:
    """Peak FMA throughput in FLOP/s on ``threads`` threads, and where the number comes from."""
    dtype = np.dtype(dtype)
    native = native_probes()
    if native is not None:
        rate = max(_as_rate(native.probe_fma_peak(seconds / _SAMPLES), "gflops", "flops_per_s")
                   for _ in range(_SAMPLES))
        if dtype == np.float64:
            rate /= 2.0  # the probe runs float32 lanes; float64 lanes are half as many
        return {"flops_per_s": rate, "source": "attnfast._attnfast.probe_fma_peak"}
    rate = _numpy_fma_estimate(seconds, dtype, threads)
    return {"flops_per_s": rate, "source": "numpy.matmul (BLAS) estimate"}


def read_bandwidth(nbytes: int, seconds: float = 0.1, threads: int = 1) -> Dict[str, Any]:
    """Read bandwidth in bytes/s for a buffer of ``nbytes`` (its cache level decides the answer)."""
    nbytes = int(nbytes)
    native = native_probes()
    if native is not None:
        rate = max(_as_rate(native.probe_read_bandwidth(nbytes, seconds / _SAMPLES), "gbps", "bytes_per_s")
                   for _ in range(_SAMPLES))
        return {"bytes_per_s": rate, "nbytes": nbytes, "source": "attnfast._attnfast.probe_read_bandwidth"}
    rate = _numpy_read_estimate(nbytes, seconds, threads)
    return {"bytes_per_s": rate, "nbytes": nbytes, "source": "numpy.max (threaded) estimate"}


#: Buffers within this relative size of an already probed one share its probe: the two near-134 MB
#: buffers of a run (KV-cache decode, softmax) measure the same memory level, and one probe per level
#: keeps the header readable and the run shorter.
_SAME_SIZE = 0.1


class BandwidthCache:
    """Read-bandwidth probes keyed by buffer size, so each size is probed once per run.

    Each probe records what it measures (:func:`memory_level`) and the cases whose limit it is.
    """

    def __init__(self, seconds: float, threads: int, caches: Optional[List[Dict[str, Any]]] = None):
        self.seconds = seconds
        self.threads = threads
        self.caches = caches
        self.results: Dict[int, Dict[str, Any]] = {}

    def get(self, nbytes: float, user: Optional[str] = None) -> Dict[str, Any]:
        key = int(nbytes)
        near = [k for k in self.results if abs(k - key) <= _SAME_SIZE * key]
        if near:
            key = near[0]
        elif key not in self.results:
            self.results[key] = read_bandwidth(key, self.seconds, self.threads)
            self.results[key]["measures"] = memory_level(key, self.threads, self.caches)
            self.results[key]["used_by"] = []
        probe = self.results[key]
        if user is not None and user not in probe["used_by"]:
            probe["used_by"].append(user)
        return probe

    def rate(self, nbytes: float, user: Optional[str] = None) -> Optional[float]:
        rate: Optional[float] = self.get(nbytes, user)["bytes_per_s"]
        return rate


def memory_level(nbytes: int, threads: int, caches: Optional[List[Dict[str, Any]]]) -> str:
    """Which level of the memory hierarchy a ``threads``-way read of ``nbytes`` streams from.

    Each thread reads its own ``nbytes / threads`` share; a share that fits one core's L1 or L2 is
    read from there, a whole buffer that fits the (shared) L3 from the L3, anything larger from DRAM.
    ``caches`` is :func:`attnfast.bench.machine.cache_levels`'s answer (None: unknown).
    """
    if not caches:
        return "unknown cache sizes"
    share = nbytes / max(1, threads)
    for c in sorted(caches, key=lambda c: c["level"]):
        size = c["bytes"]
        per_core = c["shared_cpus"] <= 1
        if (share if per_core else nbytes) <= size:
            where = "per core" if per_core else "shared"
            return f"L{c['level']} cache ({_size(size)} {where})"
    largest = max(caches, key=lambda c: c["level"])
    return f"main memory (DRAM; beyond the {_size(largest['bytes'])} L{largest['level']})"


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
