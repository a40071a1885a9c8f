"""attnfast.dask.attention against attnfast.attention, on real Dask schedulers.

Tolerance: the Dask result is attnfast.attention's computation split over key chunks and recombined
with merge_states, so it differs from the one-call result only by the merges' rounding (each merge
rescales by exp(lse_i - lse) and adds: a few ulps of the computation dtype per tree level). That is the
FIXED entry of tests/conftest.py's table ("the fused kernel with itself over a different split"),
relative to max |v| for out (out is a convex combination of v's rows) and to the values for lse; for
16-bit results both sides are rounded once from float32, so they lie at most one ulp apart (FIXED's
16-bit rows).
"""

import operator
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

import attnfast  # noqa: E402
from attnfast import reference  # noqa: E402
import attnfast.dask as ad  # noqa: E402
from attnfast.dask import _forward  # noqa: E402

from conftest import assert_close_fixed, method_weights  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


def lazy(x, chunks):
    """x as a Dask array of ``chunks``, its data inlined into the slicing tasks (no task holds x)."""
    return da.from_array(x, chunks=chunks, inline_array=True)


def block_tasks(result) -> int:
    """The number of block (kernel) tasks in a result's graph."""
    return sum(1 for key in dict(result.__dask_graph__()) if isinstance(key, tuple)
               and str(key[0]).startswith("attnfast-block-"))


def assert_matches(result, expected, v, what="out"):
    dtype = np.dtype(expected.dtype)
    assert result.dtype == dtype, f"{what}: dtype {result.dtype}, expected {dtype}"
    scale = None if dtype in (BF16, np.dtype(np.float16)) else float(np.max(np.abs(np.asarray(v, np.float64)), initial=1))
    assert_close_fixed(result, expected, dtype, scale=scale, what=what)


def compare(q, k, v, chunks_q, chunks_kv, *, lse=True, scheduler="sync", **kw):
    """ad.attention on Dask copies of q, k, v (other keyword arrays as given) vs attnfast.attention."""
    dq, dk, dv = lazy(q, chunks_q), lazy(k, chunks_kv), lazy(v, chunks_kv)
    got = ad.attention(dq, dk, dv, return_lse=lse, **kw)
    plain = {name: (val.compute() if isinstance(val, da.Array) else val) for name, val in kw.items()}
    ref = attnfast.attention(q, k, v, return_lse=lse, **plain)
    if lse:
        out, l = dask.compute(*got, scheduler=scheduler)
        assert got[0].chunks[-2] == dq.chunks[-2] and got[1].shape == ref[1].shape
        assert_matches(out, ref[0], v)
        assert_matches(l, ref[1], v, what="lse")
        return got, (out, l), ref
    out = got.compute(scheduler=scheduler)
    assert_matches(out, ref, v)
    return got, out, ref


def qkv(rng, batch=(2, 4), lq=48, lk=40, d=16, dv=None, kv_batch=None, dtype=np.float32):
    kv_batch = batch if kv_batch is None else kv_batch
    q = rng.standard_normal(batch + (lq, d)).astype(dtype)
    k = rng.standard_normal(kv_batch + (lk, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (lk, d if dv is None else dv)).astype(dtype)
    return q, k, v


# --------------------------------------------------------------------------
# Chunkings
# --------------------------------------------------------------------------

CHUNKINGS = {
    "one-chunk": ((2, 4, 48, 16), (2, 4, 40, 16)),
    "batch": ((1, 4, 48, 16), (1, 4, 40, 16)),
    "heads": ((2, (1, 3), 48, 16), (2, (1, 3), 40, 16)),
    "queries": ((2, 4, (7, 20, 21), 16), (2, 4, 40, 16)),
    "keys": ((2, 4, 48, 16), (2, 4, (9, 16, 15), 16)),
    "queries-keys": ((2, 4, 16, 16), (2, 4, 8, 16)),
    "everything": ((1, 2, (30, 18), 16), (1, 2, (13, 13, 14), 16)),
    "mismatched-batch": ((1, 2, 16, 16), (2, (3, 1), 8, (8, 8))),  # k, v rechunked to q's batch chunks
    "features": ((1, 4, 24, (8, 8)), (2, 2, 20, (4, 12))),  # D and Dv: one chunk in every task
}


@pytest.mark.parametrize("chunking", list(CHUNKINGS), ids=list(CHUNKINGS))
@pytest.mark.parametrize("causal", [False, True])
def test_chunkings_along_every_axis(rng, chunking, causal):
    q, k, v = qkv(rng)
    cq, ckv = CHUNKINGS[chunking]
    got, _, _ = compare(q, k, v, cq, ckv, causal=causal, causal_align="bottom_right")
    out = got[0]
    assert out.chunks[:3] == lazy(q, cq).chunks[:3] and out.chunks[3] == (16,)


def _chunks(draw, n):
    """Random Dask chunk sizes of an axis of length n."""
    if n == 0:
        return (0,)
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=3)) if n > 1 else set()
    edges = [0, *sorted(cuts), n]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


@st.composite
def chunked_calls(draw):
    b, hk = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 2))
    lq, lk = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    kw = {"causal": draw(st.booleans()), "causal_align": draw(st.sampled_from(["top_left", "bottom_right"]))}
    if draw(st.booleans()):
        kw["window"] = (draw(st.none() | st.integers(0, 6)), draw(st.none() | st.integers(0, 6)))
    if draw(st.booleans()):
        kw["kv_lengths"] = np.array(draw(st.lists(st.integers(0, lk), min_size=b, max_size=b)))[:, None]
    chunks_q = (_chunks(draw, b), _chunks(draw, h), _chunks(draw, lq), 8)
    chunks_kv = (_chunks(draw, b), _chunks(draw, hk), _chunks(draw, lk), 8)
    return (b, h, hk, lq, lk), chunks_q, chunks_kv, kw, draw(st.integers(0, 2**32 - 1))


@given(chunked_calls())
def test_any_chunking_and_visibility_matches_attention(call):
    (b, h, hk, lq, lk), chunks_q, chunks_kv, kw, seed = call
    q, k, v = qkv(np.random.default_rng(seed), batch=(b, h), kv_batch=(b, hk), lq=lq, lk=lk, d=8)
    got, _, _ = compare(q, k, v, chunks_q, chunks_kv, **kw)
    # One block task per (output block, key chunk) pair in which some key is visible to some query.
    vis = reference._visibility(attnfast._inputs.check_attention(q, k, v, **kw))
    vis = np.broadcast_to(vis, (b, h, lq, lk))
    ob, oh, oq = (np.cumsum((0,) + c) for c in got[0].chunks[:3])
    ok = np.cumsum((0,) + lazy(k, chunks_kv).chunks[2])
    expected = sum(bool(vis[ob[i]:ob[i + 1], oh[j]:oh[j + 1], oq[m]:oq[m + 1], ok[n]:ok[n + 1]].any())
                   for i in range(len(ob) - 1) for j in range(len(oh) - 1) for m in range(len(oq) - 1)
                   for n in range(len(ok) - 1))
    assert block_tasks(got[0]) == expected


@pytest.mark.parametrize("dtype", [np.float64, np.float16, BF16], ids=["float64", "float16", "bfloat16"])
def test_storage_dtypes(rng, dtype):
    q, k, v = qkv(rng, dtype=dtype)
    _, (out, lse), _ = compare(q, k, v, (1, 2, 16, 16), (1, 2, 16, 16), causal=True)
    assert out.dtype == np.dtype(dtype) and lse.dtype == (np.float64 if dtype == np.float64 else np.float32)


def test_mixed_dtypes_promote_as_attention_does(rng):
    q, k, v = qkv(rng)
    compare(q.astype(BF16), k, v.astype(np.float16), (1, 2, 16, 16), (1, 2, 16, 16), window=(9, 2))
    compare(q.astype(np.float64), k, v, (1, 2, 16, 16), (1, 2, 16, 16))


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq, lk", [(48, 40), (24, 64)])
def test_causal_both_alignments(rng, align, lq, lk):
    q, k, v = qkv(rng, lq=lq, lk=lk)
    compare(q, k, v, (1, 2, 8, 16), (1, 2, 8, 16), causal=True, causal_align=align)


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True])
def test_kv_lengths_per_item(rng, align, causal):
    q, k, v = qkv(rng, lq=24, lk=64)
    lengths = np.array([[0, 5, 64, 33], [17, 8, 1, 40]])
    compare(q, k, v, (1, 2, 8, 16), (1, 2, 16, 16), causal=causal, causal_align=align, kv_lengths=lengths)
    # As a Dask array too, broadcast from one length per batch item.
    compare(q, k, v, (1, 2, 8, 16), (1, 2, 16, 16), causal=causal, causal_align=align,
            kv_lengths=da.from_array(np.array([[30], [9]]), chunks=1))


def test_graphs_of_different_calls_do_not_share_keys(rng):
    """Lq == Lk: both alignments have diagonal offset 0, but with kv_lengths bottom_right aligns each
    item to its length; computed together, each result must still be its own."""
    q, k, v = qkv(rng, lq=32, lk=32)
    lengths = np.array([[20], [9]])
    dq, dk, dv = lazy(q, (1, 2, 8, 16)), lazy(k, (1, 2, 8, 16)), lazy(v, (1, 2, 8, 16))
    results = dask.compute(*(ad.attention(dq, dk, dv, causal=True, causal_align=align, kv_lengths=lengths)
                             for align in ("top_left", "bottom_right")), scheduler="sync")
    for align, got in zip(("top_left", "bottom_right"), results):
        assert_matches(got, attnfast.attention(q, k, v, causal=True, causal_align=align, kv_lengths=lengths), v)


@pytest.mark.parametrize("window", [(5, 3), (0, 0), (None, 2), (7, None), (10**9, 10**9)])
def test_window(rng, window):
    q, k, v = qkv(rng)
    compare(q, k, v, (1, 2, 8, 16), (1, 2, 8, 16), window=window)
    compare(q, k, v, (1, 2, 8, 16), (1, 2, 8, 16), window=window, causal=True, causal_align="bottom_right",
            kv_lengths=np.array([[40], [13]]))


@pytest.mark.parametrize("shape", [(2, 4, 48, 40), (48, 40), (2, 1, 1, 40)], ids=["full", "2d", "per-key"])
@pytest.mark.parametrize("as_dask", [False, True])
def test_bool_mask(rng, shape, as_dask):
    q, k, v = qkv(rng)
    mask = rng.random(shape) < 0.7
    if as_dask:
        mask = da.from_array(mask, chunks=tuple(max(1, n // 3) for n in shape))
    compare(q, k, v, (1, 2, 16, 16), (1, 2, 8, 16), mask=mask, causal=True)


@pytest.mark.parametrize("shape", [(4, 48, 40), (40,)], ids=["per-head", "per-key"])
@pytest.mark.parametrize("as_dask", [False, True])
def test_bias(rng, as_dask, shape):
    q, k, v = qkv(rng)
    bias = rng.standard_normal(shape).astype(np.float64)
    bias[..., 7] = -np.inf
    if as_dask:
        bias = da.from_array(bias, chunks=tuple(max(1, n // 3) for n in shape))
    compare(q, k, v, (1, 2, 16, 16), (1, 2, 8, 16), bias=bias, window=(12, 12))


# --------------------------------------------------------------------------
# Heads, methods, modifiers, int8, NumPy inputs
# --------------------------------------------------------------------------


def test_gqa_widens_head_chunks_to_whole_groups(rng):
    q, k, v = qkv(rng, batch=(2, 6), kv_batch=(2, 3))
    got, _, _ = compare(q, k, v, (1, 1, 16, 16), (1, 1, 8, 16), causal=True)
    assert got[0].chunks[1] == (2, 2, 2)
    # The output follows q's head chunks; k and v are rechunked to them.
    got, _, _ = compare(q, k, v, (1, (4, 2), 16, 16), (1, (1, 2), 8, 16))
    assert got[0].chunks[1] == (4, 2)
    # A NumPy q (one chunk) with chunked kv heads: the query heads follow the kv heads' groups.
    out = ad.attention(q, lazy(k, (1, (1, 2), 8, 16)), lazy(v, (1, (1, 2), 8, 16)))
    assert out.chunks[1] == (2, 4)
    assert_matches(out.compute(), attnfast.attention(q, k, v), v)


def test_mqa_and_broadcast_heads(rng):
    q, k, v = qkv(rng, batch=(2, 4), kv_batch=(2, 1))
    got, _, _ = compare(q, k, v, (1, 1, 16, 16), (1, 1, 8, 16), causal=True)
    assert got[0].chunks[1] == (1, 1, 1, 1)
    # One query head broadcast over 4 kv heads (plain NumPy broadcasting): k's head chunks.
    q1, k4, v4 = qkv(rng, batch=(2, 1), kv_batch=(2, 4))
    got, _, _ = compare(q1, k4, v4, (1, 1, 16, 16), (1, 2, 8, 16))
    assert got[0].chunks[1] == (2, 2)


@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "concat", "additive"])
def test_score_methods(rng, method):
    q, k, v = qkv(rng, d=8)
    kw = method_weights(rng, method, 8, 8, np.float32)
    compare(q, k, v, (1, 2, 16, 8), (1, 2, 8, 8), method=method, causal=True, scale=0.7, **kw)


def test_softcap_alibi_sinks(rng):
    q, k, v = qkv(rng, batch=(2, 4), kv_batch=(2, 2))
    slopes = np.float32(2.0) ** -np.arange(1, 5, dtype=np.float32)
    sinks = rng.standard_normal((2, 4)).astype(np.float32)
    compare(q * 3, k, v, (1, 2, 8, 16), (1, 1, 8, 16), softcap=5.0, alibi_slopes=slopes, sinks=sinks,
            causal=True, causal_align="bottom_right", kv_lengths=np.array([[0], [29]]))
    # Per-item arguments as Dask arrays are made concrete at once.
    compare(q, k, v, (1, 2, 8, 16), (1, 1, 8, 16), alibi_slopes=da.from_array(slopes, chunks=2),
            sinks=da.from_array(sinks, chunks=1), window=(4, 4))
    # ALiBi without causal or window: nothing is pruned, but every block sees the global diagonal.
    got, _, _ = compare(q, k, v, (1, 2, 8, 16), (1, 1, 8, 16), alibi_slopes=slopes)
    assert block_tasks(got[0]) == 2 * 2 * 6 * 5


def test_a_block_without_visible_keys_gives_zero_and_the_sink(rng):
    q, k, v = qkv(rng, lq=16, lk=16)
    lengths = np.array([[0], [16]])
    got, (out, lse), _ = compare(q, k, v, (1, 4, 8, 16), (1, 4, 8, 16), kv_lengths=lengths)
    assert block_tasks(got[0]) == 2 * 2  # item 0: no task at all; item 1: 2 query x 2 key chunks
    assert np.all(out[0] == 0) and np.all(lse[0] == -np.inf)
    sinks = rng.standard_normal(4).astype(np.float32)
    _, (out, lse), _ = compare(q, k, v, (1, 4, 8, 16), (1, 4, 8, 16), kv_lengths=lengths, sinks=sinks)
    assert np.all(out[0] == 0) and np.array_equal(lse[0], np.broadcast_to(sinks[:, None], (4, 16)))


def test_int8_cache_with_scales(rng):
    q, k, v = qkv(rng, lq=16, lk=48)
    (k8, ks), (v8, vs) = attnfast.quantize_kv(k), attnfast.quantize_kv(v)
    dq = lazy(q.astype(BF16), (1, 4, 8, 16))
    got = ad.attention(dq, lazy(k8, (1, 2, 16, 16)), lazy(v8, (1, 2, 16, 16)), k_scale=lazy(ks, (1, 2, 24)),
                       v_scale=vs, causal=True, causal_align="bottom_right", return_lse=True)
    out, lse = dask.compute(*got, scheduler="threads")
    ref = attnfast.attention(q.astype(BF16), k8, v8, k_scale=ks, v_scale=vs, causal=True,
                             causal_align="bottom_right", return_lse=True)
    assert out.dtype == np.float32
    assert_matches(out, ref[0], v)
    assert_matches(lse, ref[1], v, what="lse")


def test_numpy_inputs(rng):
    q, k, v = qkv(rng)
    got = ad.attention(q, k, v, causal=True)
    assert isinstance(got, da.Array) and got.numblocks == (1, 1, 1, 1)
    mask = rng.random((48, 40)) < 0.8
    assert_matches(ad.attention(q, k, v, causal=True, mask=mask).compute(),
                   attnfast.attention(q, k, v, causal=True, mask=mask), v)
    # NumPy k and v with Dask q: the key axis is one chunk, the query chunks are q's.
    out = ad.attention(lazy(q, (1, 4, 16, 16)), k, v, window=(3, 3))
    assert out.chunks[2] == (16, 16, 16)
    assert_matches(out.compute(), attnfast.attention(q, k, v, window=(3, 3)), v)


def test_results_compose_with_other_dask_operations(rng):
    q, k, v = qkv(rng)
    out, lse = ad.attention(lazy(q, (1, 2, 16, 16)), lazy(k, (1, 2, 8, 16)), lazy(v, (1, 2, 8, 16)),
                            causal=True, return_lse=True)
    ref_out, ref_lse = attnfast.attention(q, k, v, causal=True, return_lse=True)
    total, first, both = dask.compute((out * 2).sum(axis=-1), lse[1, 2:], da.concatenate([out, out], 0),
                                      scheduler="sync")
    assert_close_fixed(total, (ref_out * 2).sum(axis=-1), np.float32, scale=float(np.abs(v).max()) * 32)
    assert_matches(first, ref_lse[1, 2:], v, what="lse")
    assert_matches(both[2:], ref_out, v)
    persisted_out, persisted_lse = dask.persist(out, lse, scheduler="sync")
    assert block_tasks(persisted_out) == 0  # persisted: the graph holds the results, not the tasks
    assert_matches(persisted_lse.compute(), ref_lse, v, what="lse")


@pytest.mark.parametrize("lq, lk", [(0, 8), (8, 0)])
def test_empty_axes(rng, lq, lk):
    q, k, v = qkv(rng, lq=lq, lk=lk)
    sinks = np.zeros(4, np.float32)
    out, lse = dask.compute(*ad.attention(lazy(q, (1, 2, 4, 16)), lazy(k, (1, 2, 4, 16)), lazy(v, (1, 2, 4, 16)),
                                          return_lse=True, sinks=sinks), scheduler="sync")
    ref = attnfast.attention(q, k, v, return_lse=True, sinks=sinks)
    assert np.array_equal(out, ref[0]) and np.array_equal(lse, ref[1])


@pytest.mark.parametrize("batch, dv", [((0, 4), 16), ((2, 4), 0)], ids=["empty-batch", "no-value-features"])
def test_empty_batch_and_value_features(rng, batch, dv):
    q, k, v = qkv(rng, batch=batch, lq=8, lk=8, dv=dv)
    chunks = (1, 2, 4, 16)
    out, lse = dask.compute(*ad.attention(lazy(q, chunks), lazy(k, chunks), lazy(v, chunks[:3] + (max(dv, 1),)),
                                          return_lse=True, causal=True), scheduler="sync")
    ref = attnfast.attention(q, k, v, return_lse=True, causal=True)
    assert out.shape == ref[0].shape and lse.shape == ref[1].shape
    assert_matches(lse, ref[1], v, what="lse")


# --------------------------------------------------------------------------
# The graph: pruning and task sizes
# --------------------------------------------------------------------------


def test_task_counts_prove_pruning(rng):
    q, k, v = qkv(rng, batch=(1, 2), lq=64, lk=64)
    dq, dk, dv = lazy(q, (1, 2, 16, 16)), lazy(k, (1, 2, 16, 16)), lazy(v, (1, 2, 16, 16))
    assert block_tasks(ad.attention(dq, dk, dv)) == 16
    assert block_tasks(ad.attention(dq, dk, dv, causal=True)) == 10  # the strictly upper chunks: no task
    assert block_tasks(ad.attention(dq, dk, dv, window=(16, 0))) == 4 + 3  # diagonal + the one below
    assert block_tasks(ad.attention(dq, dk, dv, window=(0, 0))) == 4
    # bottom_right with per-item kv_lengths: head 0 sees 20 keys, head 1 all 64, aligned to its end.
    lengths = np.array([20, 64])
    dq1, dk1, dv1 = lazy(q, (1, 1, 16, 16)), lazy(k, (1, 1, 16, 16)), lazy(v, (1, 1, 16, 16))
    # head 0: diagonal at i - 44, so query chunk 3 (48..63) sees keys 4..19 (chunks 0, 1), chunk 2
    # (32..47) keys up to 3 (chunk 0), chunks 0 and 1 nothing; head 1: the plain causal 10.
    got = ad.attention(dq1, dk1, dv1, causal=True, causal_align="bottom_right", kv_lengths=lengths)
    assert block_tasks(got) == 3 + 10
    assert_matches(got.compute(), attnfast.attention(q, k, v, causal=True, causal_align="bottom_right",
                                                     kv_lengths=lengths), v)


def test_partials_are_in_the_computation_dtype_and_rounded_once_at_the_root(rng):
    q, k, v = qkv(rng, batch=(1, 2), lq=16, lk=48, dtype=BF16)
    sinks = np.array([0.5, -1.0], np.float32)
    out = ad.attention(lazy(q, (1, 2, 16, 16)), lazy(k, (1, 2, 16, 16)), lazy(v, (1, 2, 16, 16)), sinks=sinks)
    graph = dict(out.__dask_graph__())
    keys = sorted((key for key in graph if str(key[0]).startswith("attnfast-block-")), key=lambda key: key[-1])
    assert len(keys) == 3
    parts = dask.get(graph, keys)
    assert all(o.dtype == np.float32 and l.dtype == np.float32 for o, l in parts)
    # The tree of 3 parts: (0, 1) first, then with 2; then the sink state; one rounding to bfloat16.
    o01, l01 = attnfast.merge_states([parts[0][0], parts[1][0]], [parts[0][1], parts[1][1]])
    o, l = attnfast.merge_states([o01, parts[2][0]], [l01, parts[2][1]])
    sink_lse = np.broadcast_to(sinks[:, None], l.shape[1:])[None]
    o, _ = attnfast.merge_states([o, np.zeros_like(o)], [l, sink_lse])
    expected = attnfast._inputs.round_to(o, BF16)
    assert out.compute(scheduler="sync").tobytes() == expected.tobytes()


def test_no_task_holds_more_than_a_chunk(rng):
    from dask.callbacks import Callback

    q, k, v = qkv(rng, batch=(1, 2), lq=128, lk=256, d=16)
    bias = rng.standard_normal((2, 128, 256)).astype(np.float32)
    dq, dk, dv = lazy(q, (1, 1, 32, 16)), lazy(k, (1, 1, 32, 16)), lazy(v, (1, 1, 32, 16))
    dbias = lazy(bias, (1, 32, 32))
    out, lse = ad.attention(dq, dk, dv, bias=dbias, causal=True, causal_align="bottom_right", return_lse=True)
    sizes = {}

    def posttask(key, result, dsk, state, worker_id):
        parts = result if isinstance(result, tuple) else (result,)
        if not str(key[0] if isinstance(key, tuple) else key).startswith("finalize-"):  # dask.compute's gather
            sizes[key] = sum(np.asarray(p).nbytes for p in parts)

    with Callback(posttask=posttask):
        got = dask.compute(out, lse, scheduler="sync")
    # The largest chunk any task produces (and so any task reads): a 32 x 32 float32 bias chunk, or a
    # block's (out, lse) in float32 (32 x 16 + 32 values); the whole K is 16 KiB x 2 heads.
    largest_chunk = max(32 * 32 * 4, 32 * 16 * 4 + 32 * 4)
    assert max(sizes.values()) <= largest_chunk < k.nbytes
    # Query chunk i (of 4) sees key chunks 0..i + 4 (of 8) bottom_right: 5 + 6 + 7 + 8 per head.
    assert sum(1 for key in sizes if str(key[0]).startswith("attnfast-block-")) == 2 * 26 == block_tasks(out)
    ref = attnfast.attention(q, k, v, bias=bias, causal=True, causal_align="bottom_right", return_lse=True)
    assert_matches(got[0], ref[0], v)
    assert_matches(got[1], ref[1], v, what="lse")


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _bad_calls(rng):
    q, k, v = qkv(rng, lq=8, lk=8)
    return [
        ((q.astype(np.int32), k, v), {}),
        ((q, k[..., :5, :], v), {}),
        ((q[:, :3], k[:, :2], v[:, :2]), {}),
        ((q, k, v), {"mask": np.ones((8, 8), np.float32)}),
        ((q, k, v), {"mask": np.ones((3, 8, 8), bool)}),
        ((q, k, v), {"bias": np.ones((8, 7))}),
        ((q, k, v), {"kv_lengths": np.array([9, 1])[:, None]}),
        ((q, k, v), {"kv_lengths": np.array([1.5, 2])}),
        ((q, k, v), {"causal_align": "middle"}),
        ((q, k, v), {"causal": 1}),
        ((q, k, v), {"window": (-1, 3)}),
        ((q, k, v), {"softcap": -2.0}),
        ((q, k, v), {"sinks": np.array([np.nan, 0, 0, 0], np.float32)}),
        ((q, k, v), {"scale": np.inf}),
        ((q, k, v), {"method": "cosine"}),
        ((q, k, v), {"method": "general"}),
        ((q, k.astype(np.int8), v.astype(np.int8)), {}),
        ((q, k, v), {"k_scale": np.ones((2, 4, 8), np.float32)}),
        ((q, k, v), {"return_lse": "yes"}),
        ((q, k, v), {"return_weights": 1}),
    ]


def test_validation_errors_equal_attentions(rng):
    for (q, k, v), kw in _bad_calls(rng):
        with pytest.raises((ValueError, TypeError)) as expected:
            attnfast.attention(q, k, v, **kw)
        lazy_kw = {name: (da.from_array(x) if isinstance(x, np.ndarray) and name in ("mask", "bias") else x)
                   for name, x in kw.items()}
        with pytest.raises(type(expected.value)) as got:
            ad.attention(da.from_array(q), da.from_array(k), da.from_array(v), **lazy_kw)
        assert str(got.value) == str(expected.value), kw


def test_validation_does_not_touch_the_data():
    """A lazy 2**40-element q of the wrong dtype is refused at once, with attention's message, and a
    valid one builds its graph without computing anything (kv_lengths aside)."""
    q = da.zeros((64, 64, 2**14, 16), dtype=np.float64, chunks=(1, 1, 2**12, 16))
    k = da.zeros((64, 64, 2**14, 16), dtype=np.float32, chunks=(1, 1, 2**12, 16))
    with pytest.raises(ValueError, match=r"must have the same number of keys Lk"):
        ad.attention(q, k, k[..., :5, :])
    # A float64 bias of 2**40 elements for float32 scores: converting even its stand-in would take 4 TiB.
    huge_bias = da.zeros((64, 64, 2**14, 2**14), dtype=np.float64, chunks=(1, 1, 2**12, 2**12))
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk\] = \[0, 16384\]; got 16385"):
        ad.attention(k, k, k, bias=huge_bias, kv_lengths=np.array(2**14 + 1))
    bias = da.zeros((2**14, 2**14), dtype=np.float64, chunks=2**12)
    start = time.perf_counter()
    out = ad.attention(q[:1, :1], k[:1, :1], k[:1, :1], bias=bias, causal=True)
    assert out.dtype == np.float64 and out.shape == (1, 1, 2**14, 16)
    assert block_tasks(out) == 10 and time.perf_counter() - start < 5


@pytest.mark.parametrize("kw, match", [
    ({"out": np.empty((2, 4, 8, 16), np.float32)}, r"out= is not available on Dask: .* da\.store"),
    ({"return_weights": True}, r"return_weights=True is not available on Dask: .*Lq x Lk"),
    ({"block_table": np.zeros((2, 1), np.int32)}, r"block_table is not available on Dask: .*dense k and v"),
])
def test_dask_rejects_what_has_no_meaning_there(rng, kw, match):
    q, k, v = qkv(rng, lq=8, lk=8)
    with pytest.raises(ValueError, match=match):
        ad.attention(da.from_array(q), da.from_array(k), da.from_array(v), **kw)


def test_unknown_chunk_sizes_are_refused(rng):
    q, k, v = qkv(rng, lq=8, lk=8)
    dk = da.from_array(k)
    dk = dk[dk[:, 0, 0, 0] > -10]  # boolean indexing: unknown chunk sizes along the batch
    with pytest.raises(ValueError, match=r"k has unknown chunk sizes .*k\.compute_chunk_sizes\(\)"):
        ad.attention(da.from_array(q), dk, da.from_array(v))


def test_docstring_example_runs():
    import doctest

    result = doctest.testmod(_forward, raise_on_error=False)
    assert result.attempted >= 5 and result.failed == 0


def test_import_attnfast_does_not_import_dask():
    code = "import sys, attnfast; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')); " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=dict(os.environ))


def test_missing_dask_names_the_extra():
    code = textwrap.dedent("""
        import sys
        sys.modules["dask"] = None  # as if dask were not installed
        import attnfast
        try:
            import attnfast.dask
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("no ImportError")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ), check=True)
    assert 'pip install "attnfast[dask]"' in done.stdout


# --------------------------------------------------------------------------
# Real schedulers: synchronous, threaded, a LocalCluster of 2 processes
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    # No dashboard; the scheduler's HTTP routes (always served) on a free loopback port, not on 8787,
    # which another cluster on the machine may hold (distributed then warns, and warnings are errors).
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       host="127.0.0.1", timeout="60s",
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    c = distributed.Client(cluster, timeout="60s")
    try:
        c.wait_for_workers(2, timeout=60)
        yield c
    finally:
        c.close(timeout=30)
        cluster.close(timeout=30)


def _scheduler_case(rng, case):
    if case == "bf16-gqa-masks-sinks":
        q, k, v = qkv(rng, batch=(2, 4), kv_batch=(2, 2), lq=40, lk=72)
        q = q.astype(BF16)
        mask = rng.random((40, 72)) < 0.9
        kw = dict(causal=True, causal_align="bottom_right", kv_lengths=np.array([[70], [33]]), window=(30, None),
                  sinks=rng.standard_normal(4).astype(np.float32), mask=lazy(mask, (20, 36)))
        chunks = (1, 2, (16, 24), 16), (1, 1, (24, 24, 24), 16)
        plain = dict(kw, mask=mask)
    else:  # float64, general scores, a bias
        q, k, v = qkv(rng, batch=(3,), lq=33, lk=50, dtype=np.float64)
        bias = rng.standard_normal((33, 50))
        kw = dict(method="general", w=rng.standard_normal((16, 16)) / 4, bias=lazy(bias, (11, 10)), causal=True)
        chunks = (1, 11, 16), ((2, 1), (10, 20, 20), 16)
        plain = dict(kw, bias=bias)
    return (q, k, v), chunks, kw, plain


@pytest.mark.parametrize("case", ["bf16-gqa-masks-sinks", "f64-general-bias"])
def test_sync_threads_and_cluster_are_bitwise_identical(rng, client, case):
    (q, k, v), (cq, ckv), kw, plain = _scheduler_case(rng, case)
    out, lse = ad.attention(lazy(q, cq), lazy(k, ckv), lazy(v, ckv), return_lse=True, **kw)
    sync = dask.compute(out, lse, scheduler="sync")
    threads = dask.compute(out, lse, scheduler="threads")
    cluster = client.compute([out, lse], sync=True)
    for name, a, b, c in zip(("out", "lse"), sync, threads, cluster):
        assert a.dtype == b.dtype == c.dtype
        assert a.tobytes() == b.tobytes() == np.asarray(c).tobytes(), name
    ref = attnfast.attention(q, k, v, return_lse=True, **plain)
    assert_matches(sync[0], ref[0], v)
    assert_matches(sync[1], ref[1], v, what="lse")


def _slow(x, seconds):
    """x, through a task that first sleeps (to keep the cluster busy while a worker is killed)."""
    blocks = x.to_delayed().ravel()
    pause = [dask.delayed(time.sleep)(seconds, dask_key_name=f"pause-{x.name}-{i}") for i in range(len(blocks))]
    slowed = [da.from_delayed(dask.delayed(operator.getitem)((b, p), 0), shape=s, dtype=x.dtype)
              for b, p, s in zip(blocks, pause, _block_shapes(x))]
    return da.concatenate(slowed, axis=-2)


def _block_shapes(x):
    assert all(len(c) == 1 for c in x.chunks[:-2] + x.chunks[-1:]), "slowed only along the key axis"
    return [x.shape[:-2] + (n, x.shape[-1]) for n in x.chunks[-2]]


def test_killed_worker_is_recovered_from(rng, client):
    distributed = pytest.importorskip("distributed")
    q, k, v = qkv(rng, batch=(1, 2), lq=64, lk=96)
    dq = lazy(q, (1, 2, 16, 16))
    dk, dv = _slow(lazy(k, (1, 2, 8, 16)), 0.25), _slow(lazy(v, (1, 2, 8, 16)), 0.25)
    out, lse = ad.attention(dq, dk, dv, causal=True, causal_align="bottom_right", return_lse=True)
    pids = client.run(os.getpid)
    future = client.compute([out, lse])
    # Wait until the victim holds results (mid-computation), then kill its process outright.
    victim = sorted(pids)[0]
    deadline = time.monotonic() + 30
    while not client.has_what().get(victim) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.has_what().get(victim), "the worker never got a task"
    assert not all(f.done() for f in future), "the computation finished before the kill"
    os.kill(pids[victim], signal.SIGKILL)
    got = client.gather(future)
    ref = attnfast.attention(q, k, v, causal=True, causal_align="bottom_right", return_lse=True)
    assert_matches(np.asarray(got[0]), ref[0], v)
    assert_matches(np.asarray(got[1]), ref[1], v, what="lse")
    # The worker really died (its nanny started a new process) and the cluster is whole again.
    client.wait_for_workers(2, timeout=60)
    assert pids[victim] not in client.run(os.getpid).values()
    assert isinstance(client, distributed.Client)
