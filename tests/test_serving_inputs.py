"""Exact errors for the serving arguments of attention / attention_backward (issue 18): softcap,
alibi_slopes, sinks, block_table, int8 caches with k_scale / v_scale. The fast path and the reference
validate through the same function, so each case is checked on both."""

from __future__ import annotations

import numpy as np
import pytest

import attnfast
from attnfast import reference

BOTH = pytest.mark.parametrize("attention", [attnfast.attention, reference.attention], ids=["fast", "reference"])


def dense():
    return (np.ones((2, 4, 3, 8), np.float32), np.ones((2, 2, 5, 8), np.float32),
            np.ones((2, 2, 5, 4), np.float32))


def paged():
    return (np.ones((2, 4, 3, 8), np.float32), np.ones((6, 2, 4, 8), np.float32),
            np.ones((6, 2, 4, 4), np.float32))


def int8_cache():
    q = np.ones((2, 4, 3, 8), np.float32)
    k, v = np.ones((2, 2, 5, 8), np.int8), np.ones((2, 2, 5, 4), np.int8)
    return q, k, v, np.ones((2, 2, 5), np.float32)


SOFTCAP = "softcap must be a positive finite number"


@BOTH
@pytest.mark.parametrize("value, error", [(0.0, ValueError), (-1.0, ValueError), (np.inf, ValueError),
                                          (np.nan, ValueError), (1e39, ValueError), ("50", TypeError),
                                          (True, TypeError), ([50.0], TypeError)])
def test_bad_softcap(attention, value, error):
    with pytest.raises(error, match=SOFTCAP):
        attention(*dense(), softcap=value)


@BOTH
@pytest.mark.parametrize("name", ["alibi_slopes", "sinks"])
def test_per_head_arrays_wrong_shape_value_or_type(attention, name):
    q, k, v = dense()
    with pytest.raises(ValueError, match=rf"{name} has shape \(3,\), which does not broadcast to the batch "
                                         r"shape \(\.\.\., Hq\) \(e\.g\. \(Hq,\) or \(B, Hq\)\) \(2, 4\)"):
        attention(q, k, v, **{name: np.ones(3)})
    with pytest.raises(ValueError, match=rf"{name} has shape \(3, 4\)"):
        attention(q, k, v, **{name: np.ones((3, 4))})
    for bad in (np.nan, np.inf, -np.inf, 1e39):
        with pytest.raises(ValueError, match=rf"{name} must be finite in float32 \(the computation dtype\); got"):
            attention(q, k, v, **{name: np.array([1.0, bad, 1.0, 1.0])})
    for bad in (np.array(["a"] * 4), np.ones(4, complex), np.ones(4, bool)):
        with pytest.raises(TypeError, match=rf"{name} must be a real floating-point array .*got dtype {bad.dtype}"):
            attention(q, k, v, **{name: bad})


@BOTH
def test_per_head_arrays_accept_every_broadcastable_shape(attention):
    q, k, v = dense()
    for shape in ((), (4,), (1, 4), (2, 1), (2, 4)):
        attention(q, k, v, alibi_slopes=np.full(shape, 0.5), sinks=np.zeros(shape))


@BOTH
def test_block_table_errors(attention):
    q, k, v = paged()
    table = np.zeros((2, 3), np.int32)
    with pytest.raises(TypeError, match=r"block_table must be an integer array .*got dtype float64"):
        attention(q, k, v, block_table=table.astype(np.float64))
    with pytest.raises(ValueError, match=r"block_table must be 2-D \(B, max_blocks\).*got shape \(3,\)"):
        attention(q, k, v, block_table=table[0])
    with pytest.raises(ValueError, match=r"block_table has 3 rows but q has B = 2 batch items"):
        attention(q, k, v, block_table=np.zeros((3, 3), np.int32))
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] = 6 is not a block of the cache \(num_blocks = 6\), "
                                         r"but batch item 0 reads it \(its first 12 keys, block_size 4\)"):
        attention(q, k, v, block_table=np.array([[0, 1, 6], [0, 0, 0]]))
    with pytest.raises(ValueError, match=r"block_table\[1, 2\] = -1 is not a block of the cache"):
        attention(q, k, v, block_table=np.array([[0, 1, 6], [0, 0, -1]]), kv_lengths=np.array([8, 9]))
    # Entries past an item's kv_lengths are never read, so never checked (whatever they hold).
    attention(q, k, v, block_table=np.array([[0, 1, 2**40], [0, 0, -7]]), kv_lengths=np.array([8, 8]))
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk\] = \[0, 12\]; got 13"):
        attention(q, k, v, block_table=table, kv_lengths=np.array([8, 13]))


@BOTH
def test_block_table_layout_errors(attention):
    q, k, v = paged()
    table = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"with block_table, k must be a 4-D cache \(num_blocks, Hk, block_size, D\); "
                                         r"got shape \(2, 4, 8\)"):
        attention(q, k[0], v, block_table=table)
    with pytest.raises(ValueError, match=r"with block_table, v must be a 4-D cache"):
        attention(q, k, v[0], block_table=table)
    with pytest.raises(ValueError, match=r"with block_table, k and v must be caches of the same \(num_blocks, Hk, "
                                         r"block_size\)"):
        attention(q, k, v[:5], block_table=table)
    with pytest.raises(ValueError, match=r"with block_table, q must be 4-D \(B, Hq, Lq, D\); got shape \(4, 3, 8\)"):
        attention(q[0], k, v, block_table=table)
    with pytest.raises(ValueError, match=r"q has 3 heads \(axis 1\) but the k/v cache has Hk = 2 \(axis 1\)"):
        attention(q[:, :3], k, v, block_table=table)
    with pytest.raises(ValueError, match=r"a paged KV cache \(block_table\) takes method 'dot', 'scaled_dot' or "
                                         r"'general'; got method='concat'"):
        attention(q, k, v, block_table=table, method="concat", w_q=np.ones(8), w_k=np.ones(8))


@BOTH
def test_int8_cache_errors(attention):
    q, k, v, s = int8_cache()
    with pytest.raises(TypeError, match=r"k is int8 but k_scale is None: an int8 cache needs its per-row scales"):
        attention(q, k, v)
    with pytest.raises(TypeError, match=r"v is int8 but v_scale is None"):
        attention(q, k, v, k_scale=s)
    with pytest.raises(TypeError, match=r"k_scale is given but k has dtype float32: the scales apply to an int8 "
                                        r"cache only"):
        attention(*dense(), k_scale=s)
    with pytest.raises(TypeError, match=r"v_scale is given but v has dtype float32"):
        attention(*dense(), v_scale=s)
    with pytest.raises(TypeError, match=r"k and v must both be int8 \(a quantised cache\) or both floating; got k "
                                        r"of dtype int8 and v of dtype float32"):
        attention(q, k, v.astype(np.float32), k_scale=s, v_scale=s)
    with pytest.raises(ValueError, match=r"v_scale has shape \(2, 2, 4\), which does not broadcast to the shape of "
                                         r"v.shape\[:-1\] \(2, 2, 5\)"):
        attention(q, k, v, k_scale=s, v_scale=np.ones((2, 2, 4), np.float32))
    # Scales are cache data: not scanned (see test_int8_scales_of_hidden_keys_are_never_read).
    with pytest.raises(TypeError, match=r"v_scale must be a float32 array .*got dtype float64"):
        attention(q, k, v, k_scale=s, v_scale=s.astype(np.float64))
    with pytest.raises(TypeError, match=r"q has dtype float64 but an int8 KV cache is computed in float32"):
        attention(q.astype(np.float64), k, v, k_scale=s, v_scale=s)
    with pytest.raises(ValueError, match=r"an int8 KV cache takes method 'dot', 'scaled_dot' or 'general'"):
        attention(q, k, v, k_scale=s, v_scale=s, method="additive", w_q=np.ones((3, 8)), w_k=np.ones((3, 8)))


@BOTH
def test_int8_scales_of_hidden_keys_are_never_read(attention):
    # The slots of a preallocated int8 cache past kv_lengths may hold any scale: NaN, inf or negative
    # garbage there leaves the result exactly as with clean scales.
    q, k, v, s = int8_cache()
    lengths = np.array([3, 4])
    clean = attention(q, k, v, k_scale=s, v_scale=s, kv_lengths=lengths[:, None])
    for garbage in (np.nan, np.inf, -1.0):
        ks, vs = s.copy(), s.copy()
        for b, n in enumerate(lengths):
            ks[b, :, n:] = garbage
            vs[b, :, n:] = garbage
        np.testing.assert_array_equal(attention(q, k, v, k_scale=ks, v_scale=vs, kv_lengths=lengths[:, None]), clean)


def test_int8_scales_broadcast():
    # The kernels' side of this is tests/test_serving_api.py's.
    q, k, v, s = int8_cache()
    for shape in ((), (5,), (2, 1, 1), (1, 2, 5)):
        out = reference.attention(q, k, v, k_scale=np.full(shape, 0.01, np.float32),
                                  v_scale=np.full(shape, 0.02, np.float32))
        np.testing.assert_allclose(out, 0.02, rtol=1e-6)


BACKWARD = pytest.mark.parametrize("backward", [attnfast.attention_backward, reference.attention_backward],
                                   ids=["fast", "reference"])


@BACKWARD
def test_backward_rejects_paged_and_int8(backward):
    q, k, v = dense()
    out, lse = reference.attention(q, k, v, return_lse=True)
    for name, value in (("block_table", np.zeros((2, 3), np.int32)), ("k_scale", np.ones((2, 2, 5), np.float32)),
                        ("v_scale", np.ones((2, 2, 5), np.float32))):
        with pytest.raises(ValueError, match=rf"attention_backward does not take {name}: .*Densify the cache first"):
            backward(out, q, k, v, out, lse, **{name: value})
    with pytest.raises(ValueError, match=r"attention_backward got an int8 k: .*Densify the cache first"):
        backward(out, q, k.astype(np.int8), v.astype(np.int8), out, lse)


@BACKWARD
def test_backward_validates_modifiers(backward):
    q, k, v = dense()
    out, lse = reference.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=SOFTCAP):
        backward(out, q, k, v, out, lse, softcap=-2.0)
    with pytest.raises(ValueError, match=r"sinks has shape \(3,\)"):
        backward(out, q, k, v, out, lse, sinks=np.ones(3))


@BOTH
def test_softcap_that_rounds_to_zero(attention):
    # A cap of 0 would mean "no cap" to the kernels: one that underflows float32 is refused.
    with pytest.raises(ValueError, match=SOFTCAP + r".*which rounds to 0 in float32 \(the computation dtype\)"):
        attention(*dense(), softcap=1e-46)
    q, k, v = (x.astype(np.float64) for x in dense())
    assert np.all(np.isfinite(attention(q, k, v, softcap=1e-300)))
