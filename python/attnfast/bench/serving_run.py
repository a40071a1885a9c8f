"""Runs ``python -m attnfast bench --serving``: the serving cases' variants side by side, and their goals.

The report is a JSON-ready dict with the forward and backward suites' layout (``machine``, ``config``,
``probes``, ``implementations``, ``missing``; :func:`attnfast.bench.runner.report`), schema
:data:`SCHEMA`. Each result holds one row per variant and one entry per goal of its case.

A variant is measured only when its first call ran and its result matched the float64 reference
within :data:`FEATURE_TOLERANCE`: a missing function or argument (AttributeError, TypeError), a call
that fails, or a build that accepts an argument without honouring it leaves the row "not measured" with
the reason, and the goals that need it unjudged. :func:`run_serving_benchmark` counts those rows in the
report's ``not_measured``; the command then exits with status 1.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from . import machine, peers, probes, runner
from .peers import numpy_attention
from .serving import Goal, ServingCase, Variant, default_serving_cases
from .timing import TimingPolicy, time_after_first_call

__all__ = ["ServingConfig", "OutputCheck", "run_serving_benchmark", "not_measured_rows", "SCHEMA",
           "FEATURE_TOLERANCE", "default_serving_cases"]

SCHEMA = "attnfast-bench-serving/1"

#: Largest max|out - ref| / max|ref| of a variant that counts as computing its function. float32 kernels
#: are ~1e-6 here; an ignored modifier, page table or scale is off by 1e-2 or more.
FEATURE_TOLERANCE = 1e-4


@dataclasses.dataclass
class ServingConfig:
    cases: Sequence[ServingCase]
    threads: int = 1
    quick: bool = False
    progress: bool = True
    only: Optional[Sequence[str]] = None
    dtype: str = "float32"  # every case computes in float32 (int8 K / V are widened to it)

    @property
    def policy(self) -> TimingPolicy:
        return TimingPolicy.quick() if self.quick else TimingPolicy.full()

    def to_dict(self) -> Dict[str, Any]:
        return {"dtype": self.dtype, "threads": self.threads, "causal": False, "quick": self.quick,
                "serving": True, "feature_tolerance": FEATURE_TOLERANCE,
                "timing": dataclasses.asdict(self.policy)}


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    if got.shape != want.shape:
        raise ValueError(f"result part has shape {got.shape}, the reference {want.shape}")
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want))) / (scale or 1.0) if want.size else 0.0


class OutputCheck:
    """Float64 results of ``attnfast.reference`` on each case's checked part, computed once per key."""

    def __init__(self, case: ServingCase, inputs: Dict[str, Any]):
        self.case, self.inputs = case, inputs
        self._expected: Dict[str, np.ndarray] = {}

    def error(self, variant: Variant, got: np.ndarray) -> float:
        key = self.case.reference_key(variant)
        if key not in self._expected:
            self._expected[key] = self.case.reference(self.inputs, key)
        return _relative_error(np.asarray(got, dtype=np.float64), self._expected[key])

    def naive_float32_error(self) -> Optional[float]:
        """The error of NumPy's unfused float32 attention on the same part (the int8 goal's unit)."""
        qkv = self.case.naive_error_inputs(self.inputs)
        if qkv is None:
            return None
        expected = self.case.reference(self.inputs, "")
        return _relative_error(numpy_attention(*qkv).astype(np.float64), expected)


# ----------------------------------------------------------------------------------------------------
def _new_row(variant: Variant) -> Dict[str, Any]:
    return {"variant": variant.name, "impl": variant.impl, "label": variant.label, "needs": variant.needs,
            "skipped": None, "optional": variant.impl != "attnfast"}


def _not_measured(variant: Variant, what: str) -> str:
    need = f" (needs {variant.needs})" if variant.needs else ""
    return f"not measured{need}: {what}"


def _prepare_variant(case: ServingCase, variant: Variant, inputs: Dict[str, Any], impl: Optional[peers.Impl],
                     check: OutputCheck, row: Dict[str, Any]) -> Optional[Callable[[], object]]:
    """Run ``variant`` once and check it; its runner, or None with the reason in ``row["skipped"]``."""
    if impl is None or not impl.available():
        reason = "not selected (--impl)" if impl is None else f"{impl.label} not available ({impl.error})"
        row["skipped"] = _not_measured(variant, reason)
        return None
    try:
        run, to_checked = case.prepare(variant, inputs, impl)
        err = check.error(variant, to_checked(run()))  # the first call is also the first warm-up
    except Exception as exc:  # noqa: BLE001 - a missing feature or a failing call: say which, measure the rest
        row["skipped"] = _not_measured(variant, peers.error_summary(exc))
        return None
    row["max_rel_err"] = err
    if not err <= FEATURE_TOLERANCE:
        row["skipped"] = _not_measured(
            variant, f"its result differs from the float64 reference by {err:.2e} (max|out - ref| / max|ref|"
                     f" > {FEATURE_TOLERANCE:g}): this build does not compute it")
        return None
    runner: Callable[[], object] = run
    return runner


def _run_case(case: ServingCase, impls: Dict[str, peers.Impl], cfg: ServingConfig) -> Dict[str, Any]:
    result = case.to_dict()
    result["load_average_at_start"] = machine.load_average()
    rows = {v.name: _new_row(v) for v in case.variants()}
    result["rows"] = list(rows.values())
    try:
        inputs = case.make_inputs()
    except Exception as exc:  # noqa: BLE001 - e.g. no quantize_kv: every variant of the case fails alike
        for variant in case.variants():
            rows[variant.name]["skipped"] = _not_measured(variant, f"making the inputs failed: "
                                                                   f"{peers.error_summary(exc)}")
        return result
    check = OutputCheck(case, inputs)
    runners: Dict[str, Callable[[], object]] = {}
    for variant in case.variants():
        run = _prepare_variant(case, variant, inputs, impls.get(variant.impl), check, rows[variant.name])
        if run is not None:
            runners[variant.name] = run
    result["naive_float32_error"] = check.naive_float32_error()
    for name, stats in time_after_first_call(runners, cfg.policy).items():
        rows[name].update(stats)
    del runners, inputs, check
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------------
def _goal_result(goal: Goal, rows: Dict[str, Dict[str, Any]], naive_error: Optional[float]) -> Dict[str, Any]:
    """The goal's value from the rows; a speed ratio also gets its range over the paired rounds."""
    subject = rows.get(goal.subject, {})
    out = {**dataclasses.asdict(goal), "text": goal.text(), "value": None, "min": None, "max": None}
    if goal.metric == "error_ratio":
        err = subject.get("max_rel_err") if subject.get("median_s") else None
        if err is not None and naive_error:
            out["value"] = err / naive_error
        out["naive_float32_error"] = naive_error
    else:
        base = rows.get(goal.baseline, {})
        if subject.get("median_s") and base.get("median_s"):
            out["value"] = base["median_s"] / subject["median_s"]
            # Round i of both lists ran in the same round: the spread of the per-round ratios.
            per_round = np.asarray(base["times_s"]) / np.asarray(subject["times_s"])
            out["min"], out["max"] = float(per_round.min()), float(per_round.max())
    out["met"] = goal.met(out["value"])
    return out


def _derive(result: Dict[str, Any], case: ServingCase, bw: probes.BandwidthCache) -> None:
    """GFLOP/s (compute-bound cases), GB/s and % of the read bandwidth (decode), and the goals."""
    flops = case.flops()
    variants = {v.name: v for v in case.variants()}
    rows = {r["variant"]: r for r in result["rows"]}
    for name, r in rows.items():
        t = r.get("median_s")
        if not t:
            continue
        r["gflops"] = flops / t / 1e9 if flops else None
        nbytes = case.bytes_moved(variants[name])
        if nbytes:
            rate = bw.rate(nbytes)
            r.update({"bytes": nbytes, "gbps": nbytes / t / 1e9, "read_bandwidth_bytes_per_s": rate,
                      "pct_of_read_bandwidth": 100.0 * nbytes / t / rate if rate else None})
    result["goals"] = [_goal_result(g, rows, result.get("naive_float32_error")) for g in case.goals()]


def not_measured_rows(report: Dict[str, Any]) -> List[str]:
    """'case: variant (reason)' for every attnfast row that has no time (optional peers left out)."""
    return [f"{res['name']}: {r['variant']} — {r['skipped']}" for res in report["results"]
            for r in res["rows"] if not r.get("median_s") and not r["optional"]
            and not (r["skipped"] or "").endswith("not selected (--impl)")]


def run_serving_benchmark(cfg: ServingConfig) -> Dict[str, Any]:
    """Run the serving cases ``cfg`` lists and return the report dict (schema :data:`SCHEMA`)."""
    from .progress import Progress

    t_start = time.perf_counter()
    impls = peers.select([peers.AttnfastImpl(), peers.TorchImpl()], cfg.only)
    detected = runner._detect(impls)
    facts = machine.machine_facts(cfg.threads)
    facts["threads_per_impl"] = peers.pin_threads(impls, cfg.threads)
    facts["load_average"] = machine.load_average()
    by_name = {i.name: i for i in impls}

    results: List[Dict[str, Any]] = []
    with Progress(len(cfg.cases) + 2, enabled=cfg.progress, desc="attnfast bench --serving") as progress:
        progress.start("probing FMA peak")
        fma_samples = [runner._probe_fma(cfg)]
        progress.step()
        for case in cfg.cases:
            progress.start(case.name)
            results.append(_run_case(case, by_name, cfg))
            progress.step()
        progress.start("probing the read bandwidth")
        peaks = runner._summarise_peaks(cfg, facts, fma_samples)
        bw = probes.BandwidthCache(0.1 if cfg.quick else 0.3, cfg.threads)
        for res, case in zip(results, cfg.cases):
            _derive(res, case, bw)
        peaks["read_bandwidth"] = list(bw.results.values())
        progress.step()
    facts["load_average_end"] = machine.load_average()
    report = runner.report(SCHEMA, cfg, t_start, facts, peaks, detected, None, results)
    report["not_measured"] = not_measured_rows(report)
    return report

