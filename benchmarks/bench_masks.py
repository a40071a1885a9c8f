"""What masking costs the fused attention: the encoder shape (8, 8, 512, 512, 64), float32, with each kind
of mask against none.

Causal, ``kv_lengths`` and key tiles that a bool mask hides from every row of a query block are skipped,
so they cost less than no mask. A bool mask or a float bias is read in place, tile by tile: a key-padding
mask or a per-key bias (broadcast over the queries) is one vector operation per key, a full
(B, 1, Lq, Lk) mask or bias is transposed to the scores' layout by 8 x 8 blocks first. One
``benchmark.group``; ``extra_info`` records the time relative to no mask.

    pytest benchmarks/bench_masks.py --benchmark-enable
"""

from __future__ import annotations

import numpy as np
import pytest

import attnfast

B, H, L, D = 8, 8, 512, 64


def _masks():
    rng = np.random.default_rng(0)
    lengths = rng.integers(L // 2, L + 1, size=(B, 1))
    padding = np.arange(L)[None, :] < lengths  # (B, L): the first kv_lengths keys of each item
    return {
        "none": {},
        "causal": {"causal": True},
        "kv_lengths": {"kv_lengths": lengths},
        "key padding mask (B,1,1,L)": {"mask": padding[:, None, None, :]},
        "random mask (B,1,L,L)": {"mask": rng.random((B, 1, L, L)) < 0.9},
        "per-key bias (B,1,1,L)": {"bias": rng.standard_normal((B, 1, 1, L)).astype(np.float32)},
        "full bias (B,1,L,L)": {"bias": rng.standard_normal((B, 1, L, L)).astype(np.float32)},
    }


MASKS = _masks()
_baseline = {}


@pytest.mark.parametrize("kind", list(MASKS))
def test_attention_mask_cost(benchmark, implementations, kind):
    # `implementations` (conftest.py) pins every library's thread count, as for the other suites.
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, H, L, D), dtype=np.float32) for _ in range(3))
    out = np.empty_like(q)
    kw = MASKS[kind]
    attnfast.attention(q, k, v, out=out, **kw)  # first call outside the timings
    benchmark.group = f"attention ({B},{H},{L},{L},{D}) float32 with masks"
    benchmark(attnfast.attention, q, k, v, out=out, **kw)
    median = benchmark.stats.stats.median
    if kind == "none":
        _baseline["none"] = median
    if "none" in _baseline:
        benchmark.extra_info["relative_to_none"] = round(median / _baseline["none"], 3)
