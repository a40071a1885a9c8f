"""Interleaved timing: every implementation runs in turn, round after round, in one process.

On a shared, noisy machine a burst of load hits whichever implementation runs at that moment.  Running
them one round at a time (A B C, then B C A, ...) spreads the noise over all of them alike, and the
median of the per-call times ignores the bursts.

Each turn is: a pause (the previous library's spinning workers go idle), untimed calls for
``rewarm_s``, one timed call.  The untimed calls matter for short calls: after the pause the CPUs of
this VM were idle, the host may have run other guests on them, and the first calls paid for waking
workers and refilling caches (measured here: a 1.4 ms seq2seq call took 2-4 ms after a 12 ms pause,
a 0.13 ms decoder step 0.45 ms, still 0.28 ms after one untimed call and 0.18 ms after three, for
PyTorch and attnfast alike; traced call by call, both threads ran slow for the first 2-3 ms of work,
as if the cores were clocking back up).  That is a property of the VM, not of the kernels; the timed
call sees what a loop of calls sees (a decoder, the layers of a model).  ``rewarm_s`` = 6 ms leaves
margin over those 2-3 ms (with 3 ms attnfast's decoder step still measured ~40% above its
back-to-back time; PyTorch's measured the same with 3 and with 6 ms).  Calls longer than
``rewarm_below_s`` skip the untimed calls: their cold start is a few percent and the suite stays short.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

__all__ = ["TimingPolicy", "time_interleaved", "time_after_first_call", "median", "spread"]


@dataclasses.dataclass(frozen=True)
class TimingPolicy:
    """How long to measure one case.

    Each implementation is called ``warmup`` times untimed (first-call costs: JIT compilation, thread
    pool start-up, page faults); calls shorter than ``rewarm_below_s`` are also preceded by untimed
    calls for ``rewarm_s`` in every round (see the module docstring). Then rounds run until every
    implementation has ``min_repeats`` timings and ``budget_s`` seconds have passed, or
    ``max_repeats`` rounds are done.  Slow cases (seconds per round, e.g. NumPy at L=8192) stop after
    ``floor_repeats`` rounds once ``cap_s`` has passed, so the full suite stays within minutes.
    """

    warmup: int = 1
    rewarm_s: float = 0.006
    rewarm_below_s: float = 0.05
    min_repeats: int = 5
    max_repeats: int = 200
    budget_s: float = 2.0
    floor_repeats: int = 3
    cap_s: float = 10.0

    @classmethod
    def quick(cls) -> "TimingPolicy":
        return cls(warmup=1, min_repeats=3, max_repeats=50, budget_s=0.25, floor_repeats=3, cap_s=2.0)

    @classmethod
    def full(cls) -> "TimingPolicy":
        return cls(warmup=1, min_repeats=7, max_repeats=300, budget_s=2.0, floor_repeats=3, cap_s=12.0)


SETTLE_S = 0.002  # pause between implementations (not timed): attnfast's workers poll for 1 ms
# Pools that poll longer: libgomp (PyTorch) spins GOMP_SPINCOUNT = 300000 pauses, several ms here;
# XLA:CPU's pool longer still. Without these pauses their workers held a core during the next
# library's call (attnfast at L=256 ran at half speed right after PyTorch).
SETTLE_AFTER_S = {"torch": 0.012, "jax": 0.06, "numpy": 0.15}
# OpenBLAS's workers (NumPy's matmul, and the float64 reference checked before timing starts) poll for
# 2^28 cycles, ~0.1 s: attnfast measured 30% slower 2-80 ms after a NumPy matmul, normal after 120 ms.
START_SETTLE_S = 0.15


def time_interleaved(runners: Dict[str, Callable[[], object]], policy: TimingPolicy,
                     tick: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Per-call wall times in seconds of each runner, measured round-robin.

    The rotation of the order each round keeps any "runs right after X" effect (cache contents, turbo
    state) from always favouring the same implementation.  ``tick`` is called once per round (progress).
    """
    names = list(runners)
    times: Dict[str, List[float]] = {n: [] for n in names}
    if not names:
        return times
    clock = time.perf_counter
    rewarm = {n: False for n in names}  # known after the first call; until then one cold sample at most
    time.sleep(START_SETTLE_S)  # whatever ran before (reference checks, the previous case) goes idle
    for _ in range(policy.warmup):
        for n in names:
            t0 = clock()
            runners[n]()
            rewarm[n] = clock() - t0 < policy.rewarm_below_s
    start = clock()
    for round_index in range(policy.max_repeats):
        shift = round_index % len(names)
        previous: Optional[str] = None
        for n in names[shift:] + names[:shift]:
            # Let the previous library's thread pool go idle first: OpenMP's and XLA's workers keep
            # spinning after a call and would steal cores from the next one.
            time.sleep(SETTLE_S if previous is None else SETTLE_AFTER_S.get(previous, SETTLE_S))
            if rewarm[n]:
                warm_until = clock() + policy.rewarm_s
                runners[n]()
                while clock() < warm_until:
                    runners[n]()
            t0 = clock()
            runners[n]()
            call_s = clock() - t0
            times[n].append(call_s)
            rewarm[n] = call_s < policy.rewarm_below_s
            previous = n
        tick()
        rounds, elapsed = round_index + 1, clock() - start
        if rounds >= policy.min_repeats and elapsed >= policy.budget_s:
            break
        if rounds >= policy.floor_repeats and elapsed >= policy.cap_s:
            break
    return times


def median(values: List[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def spread(times: List[float]) -> Dict[str, Any]:
    """A row's timing fields: the repeats in round order, their median, min, max and quartiles.

    Quartiles are NumPy's default (linear) percentiles; with 3 repeats they lie halfway between the
    median and the extremes, so the report shows min-max, which says more for the few repeats of --quick.
    """
    if not times:
        return {"times_s": [], "median_s": float("nan"), "min_s": None, "max_s": None, "q1_s": None,
                "q3_s": None, "repeats": 0}
    q1, q3 = (float(x) for x in np.percentile(times, [25, 75]))
    return {"times_s": list(times), "median_s": median(times), "min_s": float(min(times)),
            "max_s": float(max(times)), "q1_s": q1, "q3_s": q3, "repeats": len(times)}


def time_after_first_call(runners: Dict[str, Callable[[], object]], policy: TimingPolicy) -> Dict[str, Dict[str, Any]]:
    """:func:`time_interleaved` for runners whose first call (the result checked for accuracy) was the
    first warm-up; per runner its times in round order and their median, min, max and count."""
    policy = dataclasses.replace(policy, warmup=max(0, policy.warmup - 1))
    return {name: {"times_s": ts, "median_s": median(ts), "min_s": min(ts), "max_s": max(ts),
                   "repeats": len(ts)}
            for name, ts in time_interleaved(runners, policy).items()}
