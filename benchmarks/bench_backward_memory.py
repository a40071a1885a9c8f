"""Issue 17's memory claim: the fused backward's scratch is bounded, independent of the sequence length.

One forward+backward (``attention(..., return_lse=True)`` then ``attention_backward``) on B=1, H=2,
L=32768, D=64 float32 must grow the process's peak resident set by at most the gradients' size (dq, dk,
dv: 48 MiB) + 64 MiB; the growth includes ``out`` and ``lse``. An unfused backward would hold (B, H, L, L)
matrices of 8 GiB each. Measured in a fresh interpreter by the same code as ``python -m attnfast bench
--backward`` (:func:`attnfast.bench.backward_run.measure_memory_in_child`: malloc tuned to unmap freed
blocks, VmHWM reset through ``/proc/self/clear_refs``, a small call first to start the thread pool).

    pytest benchmarks/bench_backward_memory.py -s
"""

import os

import pytest

from attnfast.bench.backward import MEMORY_CASE, AttnfastBackward
from attnfast.bench.backward_run import MEMORY_SLACK_BYTES, measure_memory_in_child
from attnfast.bench.machine import usable_cores
from attnfast.bench.memory import reset_peak_rss

# As conftest.py: one thread count for every library, default all usable cores.
THREADS = int(os.environ.get("ATTNFAST_BENCH_THREADS", "0")) or usable_cores()


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_forward_backward_peak_memory_is_gradients_plus_64_mib(record_property):
    impl = AttnfastBackward()
    if not impl.available():
        pytest.skip(f"attnfast has no backward here: {impl.error}")
    got = measure_memory_in_child(MEMORY_CASE, "attnfast", THREADS)
    delta = got["peak_rss_delta_bytes"]
    assert delta is not None, got["note"]
    grads = MEMORY_CASE.gradient_bytes()
    record_property("peak_rss_delta_mib", delta / 2**20)
    record_property("beyond_gradients_mib", (delta - grads) / 2**20)
    print(f"\n{MEMORY_CASE.name}, {got.get('threads')} threads: peak RSS grew {delta / 2**20:.1f} MiB, "
          f"{(delta - grads) / 2**20:.1f} MiB beyond the {grads / 2**20:.0f} MiB of gradients "
          f"(limit {MEMORY_SLACK_BYTES / 2**20:.0f} MiB beyond them; one call took {got['seconds']:.1f} s)")
    assert delta <= grads + MEMORY_SLACK_BYTES
