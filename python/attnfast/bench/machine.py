"""Facts about the machine the benchmark runs on: CPU, SIMD width, clock, memory, library versions.

Everything here is read from the operating system (``/proc``, ``/sys``, ``os``) so that it works without
any optional package.  The theoretical FMA peak derived here is a cross-check for the measured probe.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, Iterable, List, Optional

__all__ = ["cpu_info", "cache_levels", "usable_cores", "available_memory_bytes", "flops_per_cycle_per_core",
           "theoretical_fma_peak", "versions", "attnfast_capabilities", "machine_facts"]


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_info() -> Dict[str, Any]:
    """CPU model, vendor, SIMD flags and clock in MHz from /proc/cpuinfo and cpufreq (Linux)."""
    info: Dict[str, Any] = {"model": platform.processor() or platform.machine(), "vendor": None,
                               "family": None, "flags": [], "mhz": None, "max_mhz": None}
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and info["model"] in (None, "", platform.machine(), platform.processor()):
            info["model"] = value
        elif key == "vendor_id" and info["vendor"] is None:
            info["vendor"] = value
        elif key == "cpu family" and info["family"] is None and value.isdigit():
            info["family"] = int(value)
        elif key == "flags" and not info["flags"]:
            info["flags"] = value.split()
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(value)
    # cpufreq gives the rated maximum when the hypervisor exposes it; "cpu MHz" above is a snapshot.
    max_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz and max_khz.strip().isdigit():
        info["max_mhz"] = int(max_khz) / 1000.0
    return info


def cache_levels() -> List[Dict[str, int]]:
    """Data and unified caches of CPU 0 from sysfs: level, size in bytes, how many CPUs share it.

    Empty when sysfs does not say (not Linux, some containers).
    """
    out: List[Dict[str, int]] = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(e for e in os.listdir(base) if e.startswith("index"))
    except OSError:
        return out
    for entry in entries:
        kind = (_read(f"{base}/{entry}/type") or "").strip()
        level = (_read(f"{base}/{entry}/level") or "").strip()
        size = (_read(f"{base}/{entry}/size") or "").strip().upper()
        if kind == "Instruction" or not level.isdigit() or not size:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1], 1)
        digits = size.rstrip("KMG")
        if not digits.isdigit():
            continue
        out.append({"level": int(level), "bytes": int(digits) * scale,
                    "shared_cpus": _count_cpus((_read(f"{base}/{entry}/shared_cpu_list") or "0").strip())})
    return out


def _count_cpus(cpu_list: str) -> int:
    """Number of CPUs in a sysfs list such as ``0-3,8``."""
    n = 0
    for part in cpu_list.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            n += (int(hi) - int(lo) + 1) if hi.isdigit() else 1
    return max(n, 1)


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory_bytes() -> Optional[int]:
    """Memory that can be allocated without swapping: MemAvailable, else free physical pages."""
    text = _read("/proc/meminfo")
    if text:
        for line in text.splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def flops_per_cycle_per_core(flags: Optional[Iterable[str]], itemsize: int, vendor: Optional[str] = None,
                             family: Optional[int] = None) -> int:
    """Peak FLOPs per cycle of one core from its widest FMA unit.

    Assumes two FMA pipes, true for every x86 core with AVX2 since Haswell/Zen and for server
    AVX-512 parts; an FMA counts as 2 FLOPs.  float64 lanes are half as many as float32 lanes.
    AMD's Zen 4 (family 25, the first Zen with AVX-512) runs a 512-bit FMA as two halves on its
    256-bit pipes, so it peaks at the AVX2 rate; Zen 5 (family 26) has full 512-bit pipes.
    """
    flags = set(flags or ())
    lanes32 = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    if lanes32 == 16 and vendor == "AuthenticAMD" and family is not None and family < 26:
        lanes32 = 8
    per_fma = 2 if ("fma" in flags or "avx512f" in flags) else 1  # without FMA: separate mul and add pipes
    fma_pipes = 2
    lanes = lanes32 * 4 // itemsize
    return lanes * per_fma * fma_pipes


def theoretical_fma_peak(threads: int, itemsize: int = 4, info: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """cores × FLOP/cycle × clock, in FLOP/s, with the inputs that went into it."""
    info = info or cpu_info()
    mhz = max(x for x in (info.get("mhz"), info.get("max_mhz"), 0.0) if x is not None)
    per_cycle = flops_per_cycle_per_core(info.get("flags"), itemsize, info.get("vendor"), info.get("family"))
    cores = min(threads, usable_cores())
    return {"flops_per_s": cores * per_cycle * mhz * 1e6 if mhz else None, "cores": cores,
            "flops_per_cycle_per_core": per_cycle, "mhz": mhz or None}


def _version(module_name: str) -> Optional[str]:
    """Version of an already importable package without importing it (importing torch costs seconds)."""
    try:
        from importlib import metadata
        return metadata.version(module_name)
    except Exception:  # noqa: BLE001 - any failure means "not installed" here
        return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of Python, NumPy, attnfast and every peer the benchmark may use."""
    import numpy as np

    out: Dict[str, Optional[str]] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("attnfast", "torch", "onnxruntime", "onnx", "jax", "jaxlib", "threadpoolctl", "tqdm",
                 "matplotlib"):
        out[name] = _version(name)
    try:
        from threadpoolctl import threadpool_info
        out["blas"] = ", ".join(sorted({f"{i.get('internal_api')} {i.get('version')}"
                                        f" ({i.get('architecture')})" for i in threadpool_info()
                                        if i.get("user_api") == "blas"})) or None
    except ImportError:
        out["blas"] = None
    return out


def attnfast_capabilities() -> Dict[str, Any]:
    """``attnfast.capabilities()`` when the compiled package imports, else the import error."""
    try:
        import attnfast
        caps = dict(attnfast.capabilities())
        return {k: (list(v) if isinstance(v, (tuple, set)) else v) for k, v in caps.items()}
    except Exception as exc:  # noqa: BLE001 - report, don't crash: the peers can still be measured
        return {"error": f"{type(exc).__name__}: {exc}"}


def load_average() -> Optional[List[float]]:
    """The 1, 5 and 15 minute load averages: how busy the shared machine was while measuring."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_facts(threads: int) -> Dict[str, Any]:
    """Everything printed at the top of the report and stored in the JSON."""
    info = cpu_info()
    flags = set(info["flags"])
    return {
        "cpu": info["model"],
        "vendor": info["vendor"],
        "mhz": info["mhz"],
        "max_mhz": info["max_mhz"],
        "cpu_simd": [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16",
                                 "avx512_fp16", "amx_bf16")
                     if f in flags],
        "cores": usable_cores(),
        "threads": threads,
        "memory_available_bytes": available_memory_bytes(),
        "caches": cache_levels(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "attnfast": attnfast_capabilities(),
        # Settings that change the threads' behaviour, recorded so two runs can be compared fairly.
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "XLA_FLAGS", "ATTNFAST_ISA")},
        "versions": versions(),
    }
