"""Outputs too large to allocate raise MemoryError (never a crash), without touching a caller's out=.

Broadcast (stride-0) views make inputs of any nominal size cost nothing, so the only allocation that
can fail is the result's.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnfast

HUGE_BATCH = (1 << 20, 1 << 12)  # with the row axes below, results of ~10^13 elements


def _huge(shape_tail, dtype=np.float32):
    return np.broadcast_to(np.ones(shape_tail, dtype), HUGE_BATCH + shape_tail)


def test_attention_output_too_large_is_memory_error():
    q, k, v = _huge((512, 16)), _huge((512, 16)), _huge((512, 16))
    with pytest.raises(MemoryError):
        attnfast.attention(q, k, v)


def test_scores_output_too_large_is_memory_error():
    with pytest.raises(MemoryError):
        attnfast.scores(_huge((512, 16)), _huge((512, 16)))


def test_softmax_output_too_large_is_memory_error():
    with pytest.raises(MemoryError):
        attnfast.softmax(_huge((4096, 4096)))


def test_weights_too_large_leave_out_untouched():
    # The output fits (2^17 x 1), but return_weights asks for a 2^17 x 2^17 matrix (64 GiB) that does not.
    n = 1 << 17
    q = np.broadcast_to(np.ones(8, np.float32), (n, 8))
    kv = np.broadcast_to(np.ones(8, np.float32), (n, 8))
    out = np.full((n, 8), 7.0, np.float32)
    with pytest.raises(MemoryError):
        attnfast.attention(q, kv, kv, out=out, return_weights=True)
    assert np.all(out == 7.0)
