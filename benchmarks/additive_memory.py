"""Peak memory of fused additive attention vs. the (B, Lq, Lk, A) tensor the broadcasting code builds.

For the seq2seq training batch of issue 5 (float32, B=64, Lq=40, Lk=50, D=256, A=256) that tensor alone is
131 MB; attnfast's largest temporaries are the projected queries and keys (2.6 + 3.3 MB) and one tile per
thread.  The claim checked here: one fused call grows the process's peak resident set by less than a
quarter of the tensor, everything included (projections, output, scratch).

``tracemalloc`` does not see allocations made in C++ (or by BLAS, or by PyTorch), so this measures what the
operating system sees, VmHWM, around each call in a fresh interpreter, with the helpers of
:mod:`attnfast.bench.memory` (the same ones ``benchmarks/bench_memory.py`` and ``python -m attnfast bench``
use): the peak is reset through ``/proc/self/clear_refs`` and glibc is told to unmap freed blocks, so a
block freed by one call and reused by the next is not hidden.  NumPy and PyTorch (when installed) are
measured in the same child for the ratios.

    python benchmarks/additive_memory.py            # print the table; exit status 1 if the claim fails
    pytest benchmarks/bench_additive_memory.py      # the same, as a test
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # bench_additive (the shapes and the three implementations) lives next to us

from bench_additive import IMPLS, TRAINING, make_inputs, prepare  # noqa: E402

from attnfast.bench.machine import usable_cores  # noqa: E402

LIMIT_FRACTION = 0.25
# As conftest.py: one thread count for every library, default all usable cores.
THREADS = int(os.environ.get("ATTNFAST_BENCH_THREADS", "0")) or usable_cores()


def _child() -> None:
    """Runs in the fresh interpreter: measure each implementation's peak RSS growth, print JSON."""
    from attnfast.bench.memory import measure_call, reset_peak_rss, tune_malloc_for_measurement
    from attnfast.bench.peers import all_impls, pin_threads

    tuned = tune_malloc_for_measurement()  # before the inputs exist, so they are mapped the same way
    impls = {i.name: i for i in all_impls(THREADS) if i.name in IMPLS}
    pin_threads(impls.values(), THREADS)
    inputs = make_inputs(TRAINING)
    growth: Dict[str, Optional[int]] = {}
    for name in IMPLS:  # attnfast first: the peers' imports must not run before its measurement
        if not impls[name].available() or not reset_peak_rss():
            growth[name] = None
            continue
        fn = prepare(name, inputs)
        fn()  # thread pools and one-time buffers are not per-call memory
        growth[name] = measure_call(fn)
        del fn
    out_bytes = TRAINING.B * TRAINING.Lq * TRAINING.D * 4
    print(json.dumps({"growth": growth, "out_bytes": out_bytes, "tuned_malloc": tuned, "threads": THREADS}))


def _package_parent() -> str:
    """Directory holding the ``attnfast`` package this process imports, so the child uses the same copy."""
    import attnfast

    return os.path.dirname(os.path.dirname(os.path.abspath(attnfast.__file__)))


def measure(timeout_s: float = 600) -> dict:
    """Run :func:`_child` in a fresh interpreter and return its JSON, plus the temporary's size."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_parent(), env.get("PYTHONPATH")) if p)
    env.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as conftest.py: no busy-waiting BLAS threads
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed (exit {proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["temporary_bytes"] = TRAINING.temporary_bytes
    return result


def report(result: dict) -> str:
    """The measured growth of each implementation, in MB and as a fraction of the (B, Lq, Lk, A) tensor."""
    temp = result["temporary_bytes"]
    lines = [f"{TRAINING.name}, float32, {result['threads']} threads",
             f"(B, Lq, Lk, A) float32 temporary: {temp / 1e6:.1f} MB; output: {result['out_bytes'] / 1e6:.1f} MB; "
             f"limit for attnfast: {LIMIT_FRACTION * temp / 1e6:.1f} MB"]
    for name, grew in result["growth"].items():
        if grew is None:
            lines.append(f"  {name:9s} not measured (not installed, or /proc/self/clear_refs not writable)")
        else:
            lines.append(f"  {name:9s} peak RSS growth {grew / 1e6:7.1f} MB = {grew / temp:5.2f} x the temporary")
    if not result.get("tuned_malloc", True):
        lines.append("  note: malloc could not be tuned (not glibc?): growth may be under-estimated")
    return "\n".join(lines)


def claim_holds(result: dict) -> bool:
    grew = result["growth"].get("attnfast")
    return grew is not None and grew < LIMIT_FRACTION * result["temporary_bytes"]


def main() -> int:
    result = measure()
    print(report(result))
    ok = claim_holds(result)
    print("claim holds: attnfast < 1/4 of the temporary" if ok else "claim FAILS (or could not be measured)")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        _child()
    else:
        sys.exit(main())
