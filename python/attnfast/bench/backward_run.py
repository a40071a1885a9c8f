"""Runs ``python -m attnfast bench --backward``: probes, the backward cases side by side, peak memory.

The report is a JSON-ready dict like the forward suite's (same ``machine``, ``config``, ``probes``,
``implementations`` and ``missing`` keys, so the text header is shared), with schema
:data:`SCHEMA`: ``results`` holds one entry per timed case, ``memory`` the peak-RSS case.

Peak memory of a forward+backward at B=1, H=2, L=32768, D=64 is measured in a fresh interpreter per
implementation (the helpers of :mod:`attnfast.bench.memory`: malloc tuned to unmap freed blocks, VmHWM
reset through ``/proc/self/clear_refs``), after a small call that starts the thread pools, and is
compared with the issue's bound: the gradients' size + 64 MiB.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import machine, memory, peers, runner
from .backward import (MEMORY_CASE, BackwardCase, BackwardImpl, attnfast_kwargs, backward_impls, case_from_dict,
                       gradient_names, make_backward_inputs)
from .timing import TimingPolicy, time_after_first_call

__all__ = ["BackwardConfig", "GradientCheck", "run_backward_benchmark", "measure_memory_in_child",
           "SCHEMA", "MEMORY_SLACK_BYTES", "GOALS"]

SCHEMA = "attnfast-bench-backward/1"

#: The issue's memory bound: peak RSS growth <= the gradients' size + this.
MEMORY_SLACK_BYTES = 64 * 2**20

#: The issue's goals for attnfast's row: (metric of the row, least value). bfloat16 rows have none.
GOALS = {"fwdbwd": ("speedup_vs_torch", 1.5), "bwd": ("pct_of_peak", 60.0),
         "additive": ("speedup_vs_torch", 5.0)}

_MEMORY_TIMEOUT_S = 1800


@dataclasses.dataclass
class BackwardConfig:
    cases: Sequence[BackwardCase]
    threads: int = 1
    quick: bool = False
    memory_case: Optional[BackwardCase] = MEMORY_CASE  # None: no memory measurement
    progress: bool = True
    only: Optional[Sequence[str]] = None
    dtype: str = "float32"  # the FMA peak's dtype: every case computes in float32

    @property
    def policy(self) -> TimingPolicy:
        return TimingPolicy.quick() if self.quick else TimingPolicy.full()

    def to_dict(self) -> Dict[str, Any]:
        dtypes = sorted({c.dtype for c in self.cases}, key=lambda d: d != "float32")
        return {"dtype": ", ".join(dtypes) or self.dtype, "threads": self.threads, "causal": False,
                "quick": self.quick, "backward": True,
                "memory_case": None if self.memory_case is None else self.memory_case.to_dict(),
                "timing": dataclasses.asdict(self.policy)}


# ----------------------------------------------------------------------------------------------------
def _reference() -> Optional[ModuleType]:
    try:
        from attnfast import reference
    except Exception:  # noqa: BLE001 - attnfast not built: no accuracy column
        return None
    return reference if hasattr(reference, "attention_backward") else None


class GradientCheck:
    """Float64 gradients of ``attnfast.reference`` for part of a case, and each implementation's error.

    Dot-product cases are checked on their first (batch, head) pair: its dq, dk, dv depend on no other
    pair. Additive cases in full, in chunks of batch items (the weights' gradients sum over the batch);
    the reference's (chunk, Lk, A) tanh tensors stay small. The error of a row is the largest
    max|g - g_ref| / max|g_ref| over its gradients: a relative figure, comparable between dq and the
    weight gradients, which are sums over thousands of rows.
    """

    _ADDITIVE_CHUNK = 8

    def __init__(self, case: BackwardCase, inputs: Dict[str, np.ndarray]):
        self.case = case
        self.names = gradient_names(case)
        self.expected: Optional[Dict[str, np.ndarray]] = None
        self.error: Optional[str] = None
        ref = _reference()
        if ref is None:
            self.error = "attnfast.reference.attention_backward not available: gradients not checked"
            return
        try:
            self.expected = (self._additive(ref, inputs) if case.kind == "additive"
                             else self._dot(ref, inputs))
        except Exception as exc:  # noqa: BLE001 - keep benchmarking without the error column
            self.error = f"reference failed: {type(exc).__name__}: {exc}"

    def _grads64(self, ref: Any, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        x = {n: (a if a.dtype.kind in "iu" else a.astype(np.float64)) for n, a in inputs.items()}
        kw = attnfast_kwargs(self.case, x)
        out, lse = ref.attention(x["q"], x["k"], x["v"], return_lse=True, **kw)
        g = ref.attention_backward(x["dout"], x["q"], x["k"], x["v"], out, lse, **kw)
        return {n: np.asarray(getattr(g, n), dtype=np.float64) for n in self.names}

    def _dot(self, ref: Any, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self._grads64(ref, {n: a[:1, :1] for n, a in inputs.items()})

    def _additive(self, ref: Any, inputs: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        per_item = ("q", "k", "v", "dout", "kv_lengths")
        parts = []
        for start in range(0, self.case.B, self._ADDITIVE_CHUNK):
            rows = slice(start, start + self._ADDITIVE_CHUNK)
            parts.append(self._grads64(ref, {n: (a[rows] if n in per_item else a) for n, a in inputs.items()}))
        return {n: (np.concatenate([p[n] for p in parts]) if n in ("dq", "dk", "dv")
                    else np.sum([p[n] for p in parts], axis=0)) for n in self.names}

    def _part(self, name: str, grad: np.ndarray) -> np.ndarray:
        if self.case.kind != "additive":
            grad = grad[:1, :1]
        return np.asarray(grad).astype(np.float64)

    def max_rel_error(self, grads: Dict[str, np.ndarray]) -> Optional[float]:
        if self.expected is None:
            return None
        worst = 0.0
        for n in self.names:
            want = self.expected[n]
            got = self._part(n, grads[n])
            if got.shape != want.shape:
                raise ValueError(f"{n} has shape {got.shape}, the reference {want.shape}")
            scale = float(np.max(np.abs(want))) or 1.0
            worst = max(worst, float(np.max(np.abs(got - want))) / scale)
        return worst


# ----------------------------------------------------------------------------------------------------
def _prepare_rows(case: BackwardCase, impls: Sequence[BackwardImpl], inputs: Dict[str, np.ndarray],
                  check: GradientCheck) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Callable[[], object]]]:
    """Each implementation's row, and a runner for those that ran their first call and could be checked."""
    rows: Dict[str, Dict[str, Any]] = {}
    runners: Dict[str, Callable[[], object]] = {}
    for impl in impls:
        row = rows[impl.name] = {"impl": impl.name, "label": impl.label_for(case), "skipped": None,
                                 "unsupported": False}
        try:
            run, to_grads = impl.prepare_backward(case, inputs)
            result = run()  # first call: also the first warm-up
            grads = to_grads(result)
            row["output_dtype"] = grads["dq"].dtype.name
            row["max_rel_err"] = check.max_rel_error(grads)
            row["note"] = impl.backward_note(case)
            del result, grads
        except (TypeError, NotImplementedError) as exc:  # this dtype / score method is not implemented
            row["skipped"] = f"unsupported: {peers.error_summary(exc)}"
            row["unsupported"] = True
            continue
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not stop the run
            row["skipped"] = f"failed: {peers.error_summary(exc)}"
            continue
        runners[impl.name] = run
    return rows, runners


def _derive(result: Dict[str, Any], case: BackwardCase, peak: Optional[float]) -> None:
    """GFLOP/s, % of the FMA peak, attnfast's speed-up over PyTorch and whether the issue's goal is met."""
    flops = case.flops()
    times = {r["impl"]: r["median_s"] for r in result["rows"] if r.get("median_s")}
    torch_t = times.get("torch")
    for r in result["rows"]:
        t = r.get("median_s")
        if not t:
            continue
        r["gflops"] = flops / t / 1e9 if flops else None
        r["pct_of_peak"] = 100.0 * flops / t / peak if flops and peak else None
        r["speedup_vs_torch"] = torch_t / t if torch_t else None
    goal = GOALS.get(case.kind) if case.dtype == "float32" else None
    result["goal"] = None
    if goal:
        metric, least = goal
        own: Dict[str, Any] = next((r for r in result["rows"] if r["impl"] == "attnfast"), {})
        value = own.get(metric)
        result["goal"] = {"metric": metric, "least": least, "value": value,
                          "met": None if value is None else bool(value >= least)}


def _run_case(case: BackwardCase, impls: Sequence[BackwardImpl], cfg: BackwardConfig) -> Dict[str, Any]:
    inputs = make_backward_inputs(case)
    check = GradientCheck(case, inputs)
    rows, runners = _prepare_rows(case, impls, inputs, check)
    for name, stats in time_after_first_call(runners, cfg.policy).items():
        rows[name].update(stats)
    del runners, inputs
    gc.collect()
    result = case.to_dict()
    result.update({"reference_note": check.error, "rows": list(rows.values())})
    return result


# ----------------------------------------------------------------------------------------------------
def _package_parent() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure_memory_in_child(case: BackwardCase, impl_name: str, threads: int,
                            timeout_s: float = _MEMORY_TIMEOUT_S) -> Dict[str, Any]:
    """Peak RSS growth of one call of ``case`` by ``impl_name``, in a fresh interpreter.

    Returns ``{"peak_rss_delta_bytes": int or None, "seconds": float, "note": str or None}``; a failed
    child becomes a note, never an exception.
    """
    with tempfile.TemporaryDirectory(prefix="attnfast-bwd-mem-") as tmp:
        request, answer = os.path.join(tmp, "request.json"), os.path.join(tmp, "answer.json")
        with open(request, "w") as f:
            json.dump({"case": case.to_dict(), "impl": impl_name, "threads": threads}, f)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_parent(), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "attnfast.bench.backward_run", request, answer]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"peak_rss_delta_bytes": None, "note": f"timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not os.path.exists(answer):
            tail = (proc.stderr or "").strip().splitlines()[-2:]
            return {"peak_rss_delta_bytes": None, "note": f"failed (exit {proc.returncode}): " + " | ".join(tail)}
        with open(answer) as f:
            measured: Dict[str, Any] = json.load(f)
            return measured


def _memory_child(request_path: str, answer_path: str) -> None:
    """Child side of :func:`measure_memory_in_child`: warm up on a small case, then measure one call."""
    with open(request_path) as f:
        req = json.load(f)
    tuned = memory.tune_malloc_for_measurement()  # before any input exists, so all are mapped alike
    case = case_from_dict(req["case"])
    impl = next(i for i in backward_impls() if i.name == req["impl"])
    answer: Dict[str, Any] = {"peak_rss_delta_bytes": None, "seconds": None, "tuned_malloc": tuned, "note": None}
    if not impl.available():
        answer["note"] = f"not available: {impl.error}"
    elif not memory.reset_peak_rss():
        answer["note"] = "the kernel does not allow resetting the peak RSS (/proc/self/clear_refs)"
    else:
        peers.pin_threads([impl], req["threads"])
        small = dataclasses.replace(case, Lq=min(case.Lq, 64), Lk=min(case.Lk, 64))
        warm, _ = impl.prepare_backward(small, make_backward_inputs(small))
        warm()  # thread pools and one-time buffers are not per-call memory
        del warm
        run, _ = impl.prepare_backward(case, make_backward_inputs(case))
        t0 = time.perf_counter()
        answer["peak_rss_delta_bytes"] = memory.measure_call(run)
        answer["seconds"] = time.perf_counter() - t0
        answer["threads"] = impl.threads()
        if not tuned:
            answer["note"] = "could not tune malloc (not glibc?): growth may be under-estimated"
    with open(answer_path, "w") as f:
        json.dump(answer, f)


def _memory_result(case: BackwardCase, impls: Sequence[BackwardImpl], threads: int) -> Dict[str, Any]:
    limit = case.gradient_bytes() + MEMORY_SLACK_BYTES
    rows = []
    for impl in impls:
        got = measure_memory_in_child(case, impl.name, threads)
        delta = got.get("peak_rss_delta_bytes")
        rows.append({"impl": impl.name, "label": impl.label_for(case), **got,
                     "beyond_gradients_bytes": None if delta is None else delta - case.gradient_bytes(),
                     "within_limit": None if delta is None else bool(delta <= limit)})
    result = case.to_dict()
    result.update({"limit_bytes": limit, "slack_bytes": MEMORY_SLACK_BYTES, "rows": rows})
    return result


# ----------------------------------------------------------------------------------------------------
def run_backward_benchmark(cfg: BackwardConfig) -> Dict[str, Any]:
    """Run the backward suite ``cfg`` describes and return the report dict (schema :data:`SCHEMA`)."""
    from .progress import Progress

    t_start = time.perf_counter()
    impls = peers.select(backward_impls(), cfg.only)
    detected = runner._detect(impls)
    thread_counts = peers.pin_threads(impls, cfg.threads)
    active = [i for i in impls if i.available()]
    facts = machine.machine_facts(cfg.threads)
    facts["threads_per_impl"] = thread_counts
    facts["load_average"] = machine.load_average()

    results: List[Dict[str, Any]] = []
    mem_result = None
    steps = 1 + len(cfg.cases) + (1 if cfg.memory_case is not None else 0)
    with Progress(steps, enabled=cfg.progress, desc="attnfast bench --backward") as progress:
        progress.start("probing FMA peak")
        fma_samples = [runner._probe_fma(cfg)]
        progress.step()
        for case in cfg.cases:
            progress.start(case.name)
            load = machine.load_average()
            results.append(_run_case(case, active, cfg))
            results[-1]["load_average_at_start"] = load
            if not cfg.quick:
                # More samples of the peak: on a shared machine any one may have lost its cores, and
                # the best one is the least flattering denominator for "% peak".
                fma_samples.append(runner._probe_fma(cfg))
            progress.step()
        if cfg.memory_case is not None:
            progress.start("peak memory (child processes)")
            mem_result = _memory_result(cfg.memory_case, active, cfg.threads)
            progress.step()
        fma_samples.append(runner._probe_fma(cfg))
    peaks = runner._summarise_peaks(cfg, facts, fma_samples)
    for res, case in zip(results, cfg.cases):
        _derive(res, case, peaks["fma_peak_flops_per_s"])
    facts["load_average_end"] = machine.load_average()
    return runner.report(SCHEMA, cfg, t_start, facts, peaks, detected, None, results, memory=mem_result)


if __name__ == "__main__":
    _memory_child(sys.argv[1], sys.argv[2])
