"""Runs the benchmark: probes, every case on every implementation, accuracy and memory; builds the report.

The report is a plain dict (JSON-ready) so that the text tables, the ``--json`` file and the plot are
three views of one object.  Its layout is described by :data:`SCHEMA`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional, Protocol, Sequence, Union

import numpy as np

from . import machine, memory, peers, probes
from .cases import (AttentionCase, StageCase, compute_dtype, make_attention_inputs, make_stage_inputs,
                    storage_dtype)

Case = Union[AttentionCase, StageCase]


class RunConfig(Protocol):
    """What the probes read of a suite's configuration (BenchConfig, and the backward and serving ones)."""

    @property
    def dtype(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def quick(self) -> bool: ...
from .progress import Progress
from .reference_check import ReferenceCheck
from .timing import TimingPolicy, spread, time_interleaved

__all__ = ["BenchConfig", "run_benchmark", "memory_need", "SCHEMA"]

#: The layout of the report (benchmarks/README.md documents every field).  The number changes when a
#: field changes meaning or goes; 2 added the spread (min_s, max_s, q1_s, q3_s), steps, memory_seconds,
#: machine.caches, probes.fma_implied_mhz and each read-bandwidth probe's measures / used_by.
SCHEMA = "attnfast-bench/2"

#: Never plan to use more than this share of the available memory for one case.
_MEMORY_HEADROOM = 0.8


@dataclasses.dataclass
class BenchConfig:
    cases: Sequence[Case]
    dtype: str = "float32"
    threads: int = 1
    causal: bool = False
    quick: bool = False
    measure_memory: bool = True
    progress: bool = True
    only: Optional[Sequence[str]] = None  # restrict to these implementation names (tests, debugging)

    @property
    def policy(self) -> TimingPolicy:
        return TimingPolicy.quick() if self.quick else TimingPolicy.full()

    def to_dict(self) -> Dict[str, Any]:
        return {"dtype": self.dtype, "threads": self.threads, "causal": self.causal, "quick": self.quick,
                "measure_memory": self.measure_memory, "timing": dataclasses.asdict(self.policy)}


def _input_bytes(case: Case, itemsize: int) -> int:
    if isinstance(case, AttentionCase):
        return (case.B * case.H * (case.Lq + 2 * case.Lk) * case.D) * itemsize
    return int(case.bytes_moved(itemsize))


def memory_need(impl: peers.Impl, case: Case, itemsize: int) -> int:
    """Rough bytes an implementation needs for a case: inputs, output, and the score matrix if unfused.

    Unfused attention holds the scores plus a same-sized temporary at its peak (2×).
    """
    need: int = _input_bytes(case, itemsize) + case.output_bytes(itemsize)
    if impl.quadratic_memory and isinstance(case, AttentionCase):
        need += 2 * case.score_matrix_bytes(itemsize)
    return need


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _detect(impls: Sequence[peers.Impl]) -> Dict[str, Dict[str, Any]]:
    """Availability, version and (when missing) the reason and install hint of every implementation."""
    out = {}
    for impl in impls:
        if impl.available():
            out[impl.name] = {"label": impl.label, "available": True, "version": impl.version()}
        else:
            out[impl.name] = {"label": impl.label, "available": False, "error": impl.error,
                              "install": peers.INSTALL_HINTS.get(impl.name)}
    return out


def _probe_fma(cfg: RunConfig) -> Dict[str, Any]:
    # 16-bit data is computed in float32: the float32 FMA peak is the limit its kernels are measured by.
    return probes.fma_peak(0.3 if cfg.quick else 1.0, compute_dtype(cfg.dtype), cfg.threads)


def _summarise_peaks(cfg: RunConfig, facts: Dict[str, Any], samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    """FMA peak (measured at the start and the end of the run, and from the CPU's specs).

    The best sample counts: on a shared machine either probe may have lost its cores for a while.
    """
    itemsize = compute_dtype(cfg.dtype).itemsize
    best = max(samples, key=lambda m: m["flops_per_s"])
    info = {**machine.cpu_info(), "mhz": facts["mhz"], "max_mhz": facts["max_mhz"]}
    theory = machine.theoretical_fma_peak(cfg.threads, itemsize, info)
    # A BLAS estimate is a lower bound of the peak, the spec sheet an upper bound unless the clock
    # boosts above the reported MHz: take the larger so "% of peak" is never flattering.
    used = best["flops_per_s"]
    note = None
    if best["source"].startswith("numpy") and theory["flops_per_s"]:
        used = max(used, theory["flops_per_s"])
    elif theory["flops_per_s"] and used < theory["flops_per_s"]:
        # The register-only loop reaches the spec figure or more (turbo) on idle cores; below it, other
        # processes took cores from both probes (measured: 259 of 332 GFLOP/s at load 4, which put
        # attnfast at "108% of peak"). The spec figure keeps '% peak' from flattering.
        used = theory["flops_per_s"]
        note = ("FMA probe below the spec figure (other processes busy?): '% peak' uses the spec figure; "
                "timings of this run may be disturbed too")
    if theory["flops_per_s"] and best["flops_per_s"] < 0.5 * theory["flops_per_s"]:
        # Under half the spec sheet: other processes had the cores during both probes.
        used = theory["flops_per_s"]
        note = ("FMA probe disturbed (other processes busy?): using the spec-sheet peak; "
                "timings of this run are likely disturbed too")
    # A measured peak above the spec figure: the cores ran faster than the clock the OS reports
    # (turbo / boost; /proc/cpuinfo shows the base clock in VMs). The clock that explains the measurement:
    implied_mhz = None
    if theory["flops_per_s"] and best["flops_per_s"] > theory["flops_per_s"]:
        implied_mhz = best["flops_per_s"] / (theory["cores"] * theory["flops_per_cycle_per_core"]) / 1e6
    return {"fma_peak_flops_per_s": used, "fma_measured": best, "fma_samples": samples,
            "fma_theoretical": theory, "fma_note": note, "fma_implied_mhz": implied_mhz, "fma_dtype": compute_dtype(cfg.dtype).name,
            "read_bandwidth": []}


def _row_bytes(case: Case, row: Dict[str, Any], itemsize: int) -> float:
    """Least bytes the row's call moves: the baseline reads and writes float32, the rest the run's dtype."""
    if row["impl"] != peers.BASELINE_NAME:
        return float(case.bytes_moved(itemsize))
    if isinstance(case, AttentionCase):
        return float(case.bytes_moved(4, q_itemsize=4))
    return float(case.bytes_moved(4))


def _derive(result: Dict[str, Any], case: Case, peaks: Dict[str, Any], bw: probes.BandwidthCache, itemsize: int,
            causal: bool) -> None:
    """Fill GFLOP/s, GB/s, % of the limit and the speed-ups into each row of ``result``.

    "× NumPy" and "× best peer" compare rows of the run's dtype only; the float32 baseline of a 16-bit
    run has its own column, ``speedup_vs_attnfast_float32``, filled for every row.
    """
    flops = case.flops(causal)
    nbytes = case.bytes_moved(itemsize)
    user = case.label if case.label not in ("", "--shape") else case.name
    result["read_bandwidth_bytes_per_s"] = bw.rate(nbytes, user) if case.memory_bound else None
    rows = result["rows"]
    times = {r["impl"]: r["median_s"] for r in rows if r.get("median_s")}
    numpy_t = times.get("numpy")
    baseline_t = times.get(peers.BASELINE_NAME)
    peer_times = [t for name, t in times.items() if name in peers.PEER_NAMES]
    best_peer = min(peer_times) if peer_times else None
    best_peer_name = next((n for n, t in times.items() if t == best_peer and n in peers.PEER_NAMES), None)
    result["best_peer"] = best_peer_name
    for r in rows:
        t = r.get("median_s")
        if not t:
            continue
        row_bytes = _row_bytes(case, r, itemsize)
        r["bytes"] = row_bytes
        r["gflops"] = flops / t / 1e9
        r["gbps"] = row_bytes / t / 1e9
        if case.memory_bound:
            limit_bw = bw.rate(row_bytes, user)
            r["pct_of_limit"] = 100.0 * (row_bytes / t) / limit_bw if limit_bw else None
            r["limit"] = "read_bandwidth"
        else:
            peak = peaks["fma_peak_flops_per_s"]
            r["pct_of_limit"] = 100.0 * (flops / t) / peak if peak else None
            r["limit"] = "fma_peak"
        same_dtype = r["impl"] != peers.BASELINE_NAME
        r["speedup_vs_numpy"] = numpy_t / t if numpy_t and same_dtype else None
        r["speedup_vs_best_peer"] = best_peer / t if best_peer and same_dtype else None
        r["speedup_vs_attnfast_float32"] = baseline_t / t if baseline_t else None


_MATERIALISING = ("numpy", "jax")


def _run_case(case: Case, impls: List[peers.Impl], cfg: BenchConfig, available_mem: Optional[int]) -> Dict[str, Any]:
    """Time one case on every implementation, interleaved; check accuracy on the first call's output.

    An implementation that raises TypeError on its first call does not take this dtype: its row says
    "unsupported" with the message, and the others are measured as usual.
    """
    dtype = storage_dtype(cfg.dtype)
    inputs = (make_attention_inputs(case, dtype) if isinstance(case, AttentionCase)
              else make_stage_inputs(case, dtype))
    check = ReferenceCheck(case, inputs, cfg.causal)
    rows: Dict[str, Dict[str, Any]] = {}
    runners = {}
    for impl in impls:
        row = rows.setdefault(impl.name, {"impl": impl.name, "label": impl.label_for(case, dtype),
                                          "skipped": None, "unsupported": False,
                                          "note": impl.input_note(case, inputs)})
        unsupported = impl.dtype_unsupported(dtype) if impl.runs(case) else None
        if unsupported:
            row["skipped"], row["unsupported"] = unsupported, True
            continue
        reason = impl.skip_reason(case, dtype, cfg.causal)
        need = memory_need(impl, case, dtype.itemsize)
        if reason is None and available_mem is not None and need > _MEMORY_HEADROOM * available_mem:
            reason = f"needs ~{_gib(need)} for the score matrix, {_gib(available_mem)} available"
        if reason:
            row["skipped"] = reason
            continue
        try:
            run, to_numpy = impl.prepare(case, inputs, cfg.causal)
            out = run()  # first call: also the first warm-up
            got = np.asarray(to_numpy(out))
            row["output_dtype"] = got.dtype.name
            row["max_abs_err"] = check.max_abs_error(got, np.asarray)
            del out, got
        except TypeError as exc:
            row["skipped"] = f"unsupported: {peers.error_summary(exc)}"
            row["unsupported"] = True
            continue
        except Exception as exc:  # noqa: BLE001 - one failing peer must not stop the benchmark
            row["skipped"] = f"failed: {peers.error_summary(exc)}"
            continue
        runners[impl.name] = run
    policy = dataclasses.replace(cfg.policy, warmup=max(0, cfg.policy.warmup - 1))
    # Implementations that build the Lq x Lk score matrix (NumPy, JAX) are timed in a phase of their
    # own: freeing hundreds of MB makes the kernel reclaim memory for up to a second afterwards, which
    # slowed whichever fused implementation ran next by up to 40% (with a rotating order, always the
    # same one). Within each phase the order still rotates.
    fused = {n: r for n, r in runners.items() if n not in _MATERIALISING}
    materialising = {n: r for n, r in runners.items() if n in _MATERIALISING}
    times = time_interleaved(fused, policy)
    times.update(time_interleaved(materialising, policy))
    for name, ts in times.items():
        rows[name].update(spread(ts))
    result = case.to_dict()
    result.update({"dtype": dtype.name, "flops": case.flops(cfg.causal),
                   "bytes": case.bytes_moved(dtype.itemsize),
                   "bound": "memory" if case.memory_bound else "compute",
                   "output_bytes": case.output_bytes(dtype.itemsize),
                   "output_bytes_float32": case.output_bytes(4),
                   "reference_note": check.error, "rows": list(rows.values())})
    return result


#: --quick leaves the stages out of the memory child: each stage's output is its whole working set
#: (every implementation measured 0-2 MiB beyond it), and they cost ~10% of the child's time.
QUICK_MEMORY_NOTE = "--quick: the stages' peak memory is not measured (run without --quick for it)"


def _memory_jobs(results: List[Dict[str, Any]], cases: Sequence[Case], quick: bool = False) -> List[Dict[str, Any]]:
    jobs = []
    for res, case in zip(results, cases):
        if quick and res.get("kind") == "stage":
            continue
        names = [r["impl"] for r in res["rows"] if not r.get("skipped")]
        if names:
            jobs.append({"case": case.to_dict(), "impls": names})
    return jobs


def run_benchmark(cfg: BenchConfig) -> Dict[str, Any]:
    """Run everything ``cfg`` asks for and return the report dict (schema :data:`SCHEMA`)."""
    t_start = time.perf_counter()
    impls = peers.select(peers.all_impls(cfg.threads, cfg.dtype), cfg.only)
    child = None
    if cfg.measure_memory:
        # Its imports overlap the parent's (below); it waits for the jobs once they are done.
        child = memory.MemoryChild.start([i.name for i in impls], cfg.dtype, cfg.causal, cfg.threads)
    try:
        return _run(cfg, t_start, impls, child)
    finally:
        if child is not None:
            child.close()


def _run(cfg: BenchConfig, t_start: float, impls: List[peers.Impl], child: Optional[memory.MemoryChild]
         ) -> Dict[str, Any]:
    detected = _detect(impls)
    thread_counts = peers.pin_threads(impls, cfg.threads)
    active = [i for i in impls if i.available()]
    facts = machine.machine_facts(cfg.threads)
    facts["threads_per_impl"] = thread_counts

    if child is not None:
        child.ready()  # no import of the child's competes with the probes and the timed calls
    t_setup = time.perf_counter()
    steps = 2 + len(cfg.cases) + (1 if cfg.measure_memory else 0)
    results: List[Dict[str, Any]] = []
    with Progress(steps, enabled=cfg.progress) as progress:
        progress.start("probing FMA peak")
        fma_samples = [_probe_fma(cfg)]
        progress.step()
        for case in cfg.cases:
            progress.start(case.name)
            results.append(_run_case(case, active, cfg, facts["memory_available_bytes"]))
            progress.step()
        mem_note = mem_seconds = None
        if cfg.measure_memory:
            progress.start("peak memory (child process)")
            jobs = _memory_jobs(results, cfg.cases, cfg.quick)
            assert child is not None  # started when measure_memory is set
            mem = child.measure(jobs, warm_all=not cfg.quick)
            mem_note = mem.get("note")
            if len(jobs) < len(_memory_jobs(results, cfg.cases)):
                mem_note = "; ".join(n for n in (mem_note, QUICK_MEMORY_NOTE) if n)
            mem_seconds = mem.get("seconds")
            for res in results:
                per_impl = mem.get("results", {}).get(res["name"], {})
                for r in res["rows"]:
                    peak = per_impl.get(r["impl"])
                    baseline = r["impl"] == peers.BASELINE_NAME
                    output = res["output_bytes_float32" if baseline else "output_bytes"]
                    r["peak_rss_delta_bytes"] = peak
                    r["peak_extra_bytes"] = None if peak is None else max(0, peak - output)
            progress.step()
        progress.start("probes: FMA peak again, read bandwidth")
        fma_samples.append(_probe_fma(cfg))
        peaks = _summarise_peaks(cfg, facts, fma_samples)
        bw = probes.BandwidthCache(0.1 if cfg.quick else 0.3, cfg.threads, facts.get("caches"))
        itemsize = storage_dtype(cfg.dtype).itemsize
        for res, case in zip(results, cfg.cases):
            _derive(res, case, peaks, bw, itemsize, cfg.causal)
        peaks["read_bandwidth"] = list(bw.results.values())
        progress.step()

    timings = [{"step": "start-up: import the peers (and, meanwhile, the memory child), machine facts",
                "seconds": t_setup - t_start}]
    timings += [{"step": label, "seconds": seconds} for label, seconds in progress.durations]
    return report(SCHEMA, cfg, t_start, facts, peaks, detected, mem_note, results, steps=timings,
                  memory_seconds=mem_seconds)


def report(schema: str, cfg: Any, t_start: float, facts: Dict[str, Any], peaks: Dict[str, Any],
           detected: Dict[str, Dict[str, Any]], memory_note: Optional[str], results: List[Dict[str, Any]],
           **extra: Any) -> Dict[str, Any]:
    """The JSON report of a run (the forward suite's and, with ``extra`` fields, the backward suite's):
    one layout for both, which the text report, the plot and the README table read."""
    return {
        "schema": schema,
        "created_unix": time.time(),
        "elapsed_s": time.perf_counter() - t_start,
        "machine": facts,
        "config": cfg.to_dict(),
        "probes": peaks,
        "implementations": detected,
        "missing": {n: d for n, d in detected.items() if not d["available"]},
        "memory_note": memory_note,
        "results": results,
        **extra,
    }

