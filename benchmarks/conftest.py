"""pytest-benchmark fixtures shared by the attnfast benchmark suites.

Every library is pinned to the same thread count once per session (``ATTNFAST_BENCH_THREADS``, default:
all usable cores).  Implementations come from :mod:`attnfast.bench.peers`, the same code the
``python -m attnfast bench`` command times, so both report comparable figures; a peer that is not
installed is skipped with the reason and the command that installs it.

Run with ``pytest benchmarks/ --benchmark-enable`` (the project's pytest options disable benchmarks
in the normal test session).
"""

from __future__ import annotations

import os

# OpenBLAS threads otherwise busy-wait ~0.1 s after each call and slow down whichever library runs next;
# it must be set before NumPy loads OpenBLAS (run pytest from a fresh process for it to apply).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402,F401 - loads OpenBLAS after the setting above
import pytest

from attnfast.bench import peers
from attnfast.bench.cases import AttentionCase, make_attention_inputs, make_stage_inputs, storage_dtype
from attnfast.bench.machine import available_memory_bytes, usable_cores
from attnfast.bench.runner import memory_need



def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` here: the project's python_files pattern only covers test_*.py."""
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest collects it already
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


DTYPE = storage_dtype(os.environ.get("ATTNFAST_BENCH_DTYPE", "float32"))  # also bfloat16, float16
THREADS = int(os.environ.get("ATTNFAST_BENCH_THREADS", "0")) or usable_cores()


@pytest.fixture(scope="session")
def implementations():
    """Every known implementation by name, all pinned to THREADS threads."""
    impls = peers.all_impls(THREADS)
    peers.pin_threads(impls, THREADS)
    return {impl.name: impl for impl in impls}


@pytest.fixture
def run_case(benchmark, implementations):
    """``run_case(impl_name, case, causal=False)``: benchmark one implementation on one case.

    Sets ``benchmark.group`` to the case (one comparison table per shape) and records GFLOP/s, GB/s,
    threads and dtype in ``extra_info``.
    """

    def run(name: str, case, causal: bool = False):
        impl = implementations[name]
        if not impl.available():
            pytest.skip(f"{impl.label} not available ({impl.error}); install: "
                        f"{peers.INSTALL_HINTS.get(name, '-')}")
        reason = impl.skip_reason(case, DTYPE, causal)
        if reason:
            pytest.skip(f"{impl.label}: {reason}")
        available = available_memory_bytes()
        need = memory_need(impl, case, DTYPE.itemsize)
        if available is not None and need > 0.8 * available:
            pytest.skip(f"{impl.label} needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")
        inputs = (make_attention_inputs(case, DTYPE) if isinstance(case, AttentionCase)
                  else make_stage_inputs(case, DTYPE))
        try:
            fn, _ = impl.prepare(case, inputs, causal)
            fn()  # first call outside the timings: compilation, thread pools, one-time buffers
        except TypeError as exc:  # this library does not take the dtype: say so, as the bench command does
            pytest.skip(f"{impl.label}: unsupported in {DTYPE.name}: {exc}")

        benchmark.group = case.name + (" causal" if causal else "")
        benchmark.extra_info.update({"impl": impl.label_for(case), "threads": THREADS, "dtype": DTYPE.name,
                                     "flops": case.flops(causal), "bytes": case.bytes_moved(DTYPE.itemsize),
                                     "bound": "memory" if case.memory_bound else "compute"})
        benchmark(fn)
        stats = getattr(benchmark, "stats", None)
        if stats is not None:  # None when benchmarks are disabled: fn ran once, unmeasured
            median = stats.stats.median
            benchmark.extra_info["gflops"] = case.flops(causal) / median / 1e9
            benchmark.extra_info["gbps"] = case.bytes_moved(DTYPE.itemsize) / median / 1e9

    return run
