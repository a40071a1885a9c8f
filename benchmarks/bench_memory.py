"""Issue 3's memory claim: fused attention's scratch is bounded and independent of the sequence length.

attention on B=1, H=2, L=32768, D=64 float32 (the unfused way would need 8 GiB for the scores) must grow
the process's peak memory by at most 64 MiB beyond the output array.  ``tracemalloc`` does not see the
C++ allocations, so this measures the peak resident set (VmHWM) of a fresh interpreter around the call;
see :mod:`attnfast.bench.memory` for why the child tunes malloc first.
"""

import json
import subprocess
import sys

import pytest

from attnfast.bench.memory import reset_peak_rss

LIMIT_BYTES = 64 * 2**20
B, H, L, D = 1, 2, 32768, 64

CHILD = f"""
import json, numpy as np, attnfast
from attnfast.bench.memory import tune_malloc_for_measurement, measure_call
tune_malloc_for_measurement()
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal(({B}, {H}, {L}, {D}), dtype=np.float32) for _ in range(3))
small = q[..., :64, :]
attnfast.attention(small, small, small)  # start the thread pool: not per-call memory
out_bytes = q.nbytes  # output has q's shape and dtype
delta = measure_call(lambda: attnfast.attention(q, k, v))
print(json.dumps({{"delta": delta, "out_bytes": out_bytes, "threads": attnfast.get_num_threads()}}))
"""


@pytest.mark.skipif(not reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset the peak RSS")
def test_fused_attention_scratch_is_bounded(record_property):
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["delta"] is not None, "peak RSS could not be measured"
    extra = result["delta"] - result["out_bytes"]
    record_property("peak_rss_delta_mib", result["delta"] / 2**20)
    record_property("beyond_output_mib", extra / 2**20)
    print(f"\nB={B} H={H} L={L} D={D} float32, {result['threads']} threads: peak RSS grew "
          f"{result['delta'] / 2**20:.1f} MiB, {extra / 2**20:.1f} MiB beyond the "
          f"{result['out_bytes'] / 2**20:.0f} MiB output (limit {LIMIT_BYTES / 2**20:.0f} MiB; "
          f"unfused scores: {B * H * L * L * 4 / 2**30:.0f} GiB)")
    assert extra <= LIMIT_BYTES
