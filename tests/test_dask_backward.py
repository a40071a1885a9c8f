"""attnfast.dask.attention_backward against attnfast.attention_backward on the whole arrays.

Each test builds the gradients over Dask arrays chunked along one or more axes, computes them on a
real scheduler and compares them, field by field, with attnfast.attention_backward on the NumPy
arrays: chunkings along every axis, causal in both alignments with key chunks hidden from whole
blocks (whose pruning the task count shows), windows, kv_lengths, bool masks, bias (dbias), GQA,
broadcast batch axes, every score method with its weights, softcap / ALiBi / sinks, 16-bit dtypes;
the synchronous, threaded and distributed (two worker processes) schedulers agree bitwise; errors are
attention_backward's.

Tolerance: conftest's FIXED table (the fused kernel compared with itself over a different split):
both sides run the same kernel on the same exact weights (the global lse), and differ only in the
order of the sums over key chunks (dq), query chunks (dk, dv) and blocks (dbias, the weights), so
the difference is a few roundings of the summed terms, whose magnitude conftest.backward_scales
gives per field (the FIXED atol is relative to it; rtol to the value). 16-bit gradients are each a
float32 value rounded once, so they lie at most one ulp apart (FIXED's 16-bit row).
"""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import attnfast  # noqa: E402
from attnfast import _inputs, reference  # noqa: E402
from attnfast._grads import sum_to_shape  # noqa: E402
import attnfast.dask as ad  # noqa: E402
from attnfast.dask import _backward  # noqa: E402
from attnfast.dask._plan import boundaries  # noqa: E402

from conftest import assert_close_fixed, backward_scales, method_weights, up, weights64  # noqa: E402

dask_backward = ad.attention_backward
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.float32


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def chunked(x, chunks):
    """``x`` as a dask array of ``chunks`` (None: the NumPy array itself, one chunk)."""
    return x if chunks is None else da.from_array(x, chunks=chunks)


def reference_options(kw):
    """The keyword arguments with bias and the method weights exactly up-cast to float64."""
    kw = dict(kw)
    if kw.get("bias") is not None:
        kw["bias"] = up(kw["bias"])
    weights = {n: kw.pop(n) for n in ("w", "w_q", "w_k", "v_a", "score_bias") if n in kw}
    return {**kw, **weights64(weights)}


def sink_scale(dout, out, lse, sinks, batch):
    """The magnitude of dsinks' summed terms e^(sink - lse_i) |dO_i . O_i| (see backward_scales)."""
    delta = np.abs(np.einsum("...d,...d->...", up(dout), up(out)))
    terms = np.exp(np.broadcast_to(up(sinks), batch)[..., None] - up(lse)) * delta
    return float(np.max(sum_to_shape(terms.sum(axis=-1), np.shape(sinks)), initial=0.0)) or 1.0


def forward(rng, q, k, v, kw):
    """out, lse of attnfast.attention and a random dout (the backward's NumPy inputs)."""
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    return dout, out, lse


def compare(grads, dout, q, k, v, out, lse, kw, what=""):
    """Every field of the dask gradients against attention_backward's (see the module docstring)."""
    whole = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    scales = backward_scales(dout, q, k, v, out, **reference_options(kw))
    if kw.get("sinks") is not None:
        batch = _inputs.check_attention(q, k, v, **kw).batch_shape
        scales["dsinks"] = sink_scale(dout, out, lse, kw["sinks"], batch)
    computed = dask.compute(*[g for g in grads if g is not None], scheduler="sync")
    computed = iter(computed)
    compute = _inputs.compute_dtype(_inputs.result_dtype(q.dtype, k.dtype, v.dtype))
    for field, got, want in zip(grads._fields, grads, whole):
        assert (got is None) == (want is None), f"{what}{field}: {got!r} vs {want!r}"
        if got is None:
            continue
        value = next(computed)
        assert isinstance(got, da.Array), f"{what}{field} is {type(got)}"
        assert value.dtype == want.dtype and got.dtype == want.dtype, f"{what}{field}: {value.dtype} vs {want.dtype}"
        assert value.shape == want.shape, f"{what}{field}: {value.shape} vs {want.shape}"
        dtype = value.dtype
        if dtype.itemsize > compute.itemsize:  # a float64 weight of a float32 computation
            value, want, dtype = value.astype(compute), want.astype(compute), compute
        assert_close_fixed(value, want, dtype, scale=scales[field], what=f"{what}{field}")
    return whole


def block_tasks(grads):
    """The number of (output block, key chunk) tasks in the graph of ``grads``."""
    graph = grads.dq.__dask_graph__()
    return sum(1 for key in graph if key[0].startswith("attention_backward-block-"))


def expected_tasks(q, k, v, q_chunks, k_chunks, batch_chunks, kw):
    """(visible pairs, all pairs) of (output block, key chunk), from the reference's visibility
    matrix: a pair is visible when any query of the block sees any key of the chunk (causal, window,
    kv_lengths; the mask is data and never prunes)."""
    kw = {n: x for n, x in kw.items() if n != "mask"}
    vis = reference._visibility(_inputs.check_attention(q, k, v, **kw))
    visible = total = 0
    for bsl in itertools.product(*[[slice(*b) for b in boundaries(c)] for c in batch_chunks]):
        for (q0, q1), (k0, k1) in itertools.product(boundaries(q_chunks), boundaries(k_chunks)):
            total += 1
            visible += bool(vis[bsl][..., q0:q1, k0:k1].any())
    return visible, total


# --------------------------------------------------------------------------
# The claim: per block, the global out and lse make the fused backward exact
# --------------------------------------------------------------------------


def test_global_lse_makes_block_shares_exact(rng):
    # Two key chunks by hand, through the block function the graph runs: with the global out and lse
    # the shares sum to the whole call's gradients; with each chunk's own forward (local out, lse)
    # they do not (each chunk's P would be normalised over its keys alone).
    q, k, v = (rng.standard_normal((2, 12, 8)).astype(F32) for _ in range(3))
    dout, out, lse = forward(rng, q, k, v, {})
    whole = attnfast.attention_backward(dout, q, k, v, out, lse)
    call = {"method": "scaled_dot", "scale": None, "causal": False, "softcap": None}
    spec = lambda k0: _backward._BlockSpec(call, -k0, None, (-1, -1), None, None)  # noqa: E731
    glob = [_backward._block_gradients(spec(k0), dout, q, k[:, k0:k0 + 6], v[:, k0:k0 + 6], out, lse, None, None)
            for k0 in (0, 6)]
    scales = backward_scales(dout, q, k, v, out)
    assert_close_fixed(glob[0]["dq"] + glob[1]["dq"], whole.dq, F32, scale=scales["dq"])
    assert_close_fixed(np.concatenate([g["dk"] for g in glob], axis=-2), whole.dk, F32, scale=scales["dk"])
    assert_close_fixed(np.concatenate([g["dv"] for g in glob], axis=-2), whole.dv, F32, scale=scales["dv"])
    local = []
    for k0 in (0, 6):
        lo, ll = attnfast.attention(q, k[:, k0:k0 + 6], v[:, k0:k0 + 6], return_lse=True)
        local.append(_backward._block_gradients(spec(k0), dout, q, k[:, k0:k0 + 6], v[:, k0:k0 + 6], lo, ll,
                                                None, None))
    assert np.max(np.abs(local[0]["dq"] + local[1]["dq"] - whole.dq)) > 1e-2
    assert np.max(np.abs(np.concatenate([g["dv"] for g in local], axis=-2) - whole.dv)) > 1e-2


# --------------------------------------------------------------------------
# Chunkings
# --------------------------------------------------------------------------

CHUNKINGS = {
    # name: (q chunks, k chunks, v chunks, chunks of dout / out / lse's leading axes or None)
    "numpy": (None, None, None, None),
    "batch": ((1, 3, 20, 8), None, None, None),
    "heads": ((2, 1, 20, 8), (2, 2, 28, 8), None, None),
    "queries": ((2, 3, 7, 8), None, None, None),
    "keys": (None, (2, 3, 9, 8), (1, 3, 14, 6), None),
    "every axis": ((1, 2, 6, 3), (2, 1, 10, 5), (1, 3, 7, 2), (1, 1, 9)),
}


@pytest.mark.parametrize("name", list(CHUNKINGS))
def test_chunkings(rng, name):
    qc, kc, vc, oc = CHUNKINGS[name]
    q = rng.standard_normal((2, 3, 20, 8)).astype(F32)
    k = rng.standard_normal((2, 3, 28, 8)).astype(F32)
    v = rng.standard_normal((2, 3, 28, 6)).astype(F32)
    kw = {"causal": True, "causal_align": "bottom_right"}
    dout, out, lse = forward(rng, q, k, v, kw)
    rows = None if oc is None else oc + (6,)
    grads = dask_backward(chunked(dout, rows), chunked(q, qc), chunked(k, kc), chunked(v, vc),
                          chunked(out, rows), chunked(lse, oc), **kw)
    compare(grads, dout, q, k, v, out, lse, kw, what=f"{name}: ")
    # The gradients are chunked like the blocks: q's batch and query chunks, k's key chunks.
    q_chunks = (2, 3, 20, 8) if qc is None else qc
    k_chunks = (2, 3, 28, 8) if kc is None else kc
    assert grads.dq.chunks[-2] == da.core.normalize_chunks(q_chunks, q.shape)[-2]
    assert grads.dk.chunks[-2] == grads.dv.chunks[-2] == da.core.normalize_chunks(k_chunks, k.shape)[-2]
    assert grads.dq.chunks[:2] == grads.dk.chunks[:2] == grads.dv.chunks[:2]


# --------------------------------------------------------------------------
# Visibility: causal, window, kv_lengths, and the pruning of hidden key chunks
# --------------------------------------------------------------------------

VISIBILITY = {
    "causal top_left, Lq < Lk": (16, 40, {"causal": True}),
    "causal top_left, Lq > Lk": (40, 16, {"causal": True}),
    "causal bottom_right, Lq < Lk": (16, 40, {"causal": True, "causal_align": "bottom_right"}),
    "causal bottom_right, Lq > Lk": (40, 16, {"causal": True, "causal_align": "bottom_right"}),
    "window": (32, 32, {"window": (5, 2)}),
    "causal window": (32, 32, {"causal": True, "window": (6, None)}),
    "kv_lengths": (24, 32, {"kv_lengths": np.array([[5], [19]])}),
    "kv_lengths 0": (24, 32, {"kv_lengths": np.array([[0], [32]])}),
    "bottom_right kv_lengths": (8, 32, {"causal": True, "causal_align": "bottom_right",
                                        "kv_lengths": np.array([[13], [30]])}),
}


@pytest.mark.parametrize("name", list(VISIBILITY))
def test_visibility_and_pruning(rng, name):
    lq, lk, kw = VISIBILITY[name]
    q = rng.standard_normal((2, 2, lq, 8)).astype(F32)
    k = rng.standard_normal((2, 2, lk, 8)).astype(F32)
    v = rng.standard_normal((2, 2, lk, 4)).astype(F32)
    dout, out, lse = forward(rng, q, k, v, kw)
    q_chunks, k_chunks = (1, 2, 8, 8), (2, 2, 8, 8)
    grads = dask_backward(dout, chunked(q, q_chunks), chunked(k, k_chunks), v, out, lse, **kw)
    compare(grads, dout, q, k, v, out, lse, kw, what=f"{name}: ")
    visible, total = expected_tasks(q, k, v, grads.dq.chunks[-2], grads.dk.chunks[-2], grads.dq.chunks[:2], kw)
    assert block_tasks(grads) == visible
    assert visible < total, "the case was meant to hide some key chunks"


def test_hidden_key_chunks_get_zero_gradients_and_no_task(rng):
    # kv_lengths hides the keys from 16 on from every item: their chunks get no task, and dk, dv
    # there are exact zeros even where k and v hold NaN.
    q, k, v = (rng.standard_normal((2, n, 8)).astype(F32) for n in (12, 32, 32))
    kw = {"kv_lengths": np.array([16, 9])}
    dout, out, lse = forward(rng, q, k, v, kw)
    k[:, 16:], v[:, 16:] = np.nan, np.nan
    grads = dask_backward(dout, q, chunked(k, (2, 4, 8)), v, out, lse, **kw)
    assert block_tasks(grads) == 4
    dk, dv = dask.compute(grads.dk, grads.dv, scheduler="sync")
    assert np.all(dk[:, 16:] == 0) and np.all(dv[:, 16:] == 0)
    compare(grads, dout, q, k, v, out, lse, kw)


# --------------------------------------------------------------------------
# Mask and bias
# --------------------------------------------------------------------------

MASK_BIAS = {
    "bool mask (Lq, Lk)": lambda rng, s: {"mask": rng.random(s[-2:]) < 0.7},
    "bool mask full, dask": lambda rng, s: {"mask": da.from_array(rng.random(s) < 0.7, chunks=(1, 2, 5, 7))},
    "bias full, dask": lambda rng, s: {"bias": da.from_array(rng.standard_normal(s).astype(F32), chunks=(1, 1, 6, 9))},
    "bias per head (H, 1, Lk)": lambda rng, s: {"bias": rng.standard_normal((s[1], 1, s[3])).astype(F32)},
    "bias (Lq, Lk) float64, dask": lambda rng, s: {"bias": da.from_array(rng.standard_normal(s[-2:]), chunks=(10, 5))},
    "bias and mask, causal": lambda rng, s: {"bias": rng.standard_normal((1,) + s[1:]).astype(F32),
                                             "mask": rng.random(s) < 0.8, "causal": True},
}


@pytest.mark.parametrize("name", list(MASK_BIAS))
def test_mask_and_bias(rng, name):
    shape = (2, 2, 15, 21)
    q = rng.standard_normal((2, 2, 15, 8)).astype(F32)
    k = rng.standard_normal((2, 2, 21, 8)).astype(F32)
    v = rng.standard_normal((2, 2, 21, 5)).astype(F32)
    kw = MASK_BIAS[name](rng, shape)
    numpy_kw = {n: (x.compute() if isinstance(x, da.Array) else x) for n, x in kw.items()}
    dout, out, lse = forward(rng, q, k, v, numpy_kw)
    grads = dask_backward(dout, chunked(q, (1, 2, 6, 8)), chunked(k, (2, 1, 9, 8)), v, out, lse, **kw)
    compare(grads, dout, q, k, v, out, lse, numpy_kw, what=f"{name}: ")
    if "bias" in kw:
        assert grads.dbias.shape == np.shape(kw["bias"])


# --------------------------------------------------------------------------
# Heads and batch axes
# --------------------------------------------------------------------------

HEADS = {
    # name: (q shape, k/v batch shape, q chunks)
    "GQA 6 over 2, head chunks across groups": ((2, 6, 10, 8), (2, 2), (1, (2, 2, 2), 5, 8)),
    "MQA": ((2, 4, 10, 8), (2, 1), (2, 1, 10, 8)),
    "one query head over 3 kv heads": ((2, 1, 10, 8), (2, 3), (1, 1, 4, 8)),
    "k/v broadcast over the batch": ((3, 2, 10, 8), (1, 2), (1, 1, 5, 8)),
    "k/v without a batch axis": ((3, 2, 10, 8), (2,), (2, 2, 5, 8)),
    "q broadcast over the batch": ((1, 2, 10, 8), (3, 2), (1, 1, 5, 8)),
}


@pytest.mark.parametrize("name", list(HEADS))
def test_heads_and_batch_broadcast(rng, name):
    q_shape, kv_batch, q_chunks = HEADS[name]
    q = rng.standard_normal(q_shape).astype(F32)
    k = rng.standard_normal(kv_batch + (14, 8)).astype(F32)
    v = rng.standard_normal(kv_batch + (14, 3)).astype(F32)
    kw = {"causal": True, "causal_align": "bottom_right"}
    dout, out, lse = forward(rng, q, k, v, kw)
    k_chunks = tuple(1 for _ in kv_batch) + (5, 8)
    grads = dask_backward(dout, chunked(q, q_chunks), chunked(k, k_chunks), chunked(v, k_chunks[:-1] + (3,)),
                          out, lse, **kw)
    compare(grads, dout, q, k, v, out, lse, kw, what=f"{name}: ")


def test_gqa_head_chunks_are_widened_to_whole_groups(rng):
    q = rng.standard_normal((1, 6, 8, 4)).astype(F32)
    k, v = (rng.standard_normal((1, 2, 8, 4)).astype(F32) for _ in range(2))
    dout, out, lse = forward(rng, q, k, v, {})
    grads = dask_backward(dout, chunked(q, (1, (1, 4, 1), 8, 4)), k, v, out, lse)
    assert grads.dq.chunks[1] == (3, 3) and grads.dk.chunks[1] == (1, 1)
    compare(grads, dout, q, k, v, out, lse, {})


# --------------------------------------------------------------------------
# Score methods, modifiers, dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["dot", "general", "concat", "additive", "additive projected"])
def test_score_methods_with_weights(rng, method):
    q = rng.standard_normal((2, 2, 12, 6)).astype(F32)
    k = rng.standard_normal((2, 2, 18, 6)).astype(F32)
    v = rng.standard_normal((2, 2, 18, 4)).astype(F32)
    if method == "additive projected":
        kw = {"method": "additive", **method_weights(rng, "additive", 6, 6, F32, hidden=6)}
        del kw["w_q"], kw["w_k"]
    else:
        kw = {"method": method, **method_weights(rng, method, 6, 6, F32, hidden=5)}
    kw["causal"] = True
    dout, out, lse = forward(rng, q, k, v, kw)
    grads = dask_backward(chunked(dout, (1, 2, 5, 4)), chunked(q, (1, 2, 5, 6)), chunked(k, (2, 1, 7, 6)),
                          v, out, lse, **kw)
    compare(grads, dout, q, k, v, out, lse, kw, what=f"{method}: ")


MODIFIERS = {
    "softcap": lambda rng: {"softcap": 2.5},
    "alibi causal": lambda rng: {"alibi_slopes": np.array([0.5, 0.25, 0.125], F32), "causal": True},
    "alibi bottom_right window": lambda rng: {"alibi_slopes": np.array([0.5, 0.25, 0.125], F32),
                                              "causal_align": "bottom_right", "window": (4, 3)},
    "sinks per head": lambda rng: {"sinks": rng.standard_normal(3).astype(F32), "causal": True},
    "sinks per item, dask": lambda rng: {"sinks": da.from_array(rng.standard_normal((2, 3)).astype(F32))},
    "all three, kv_lengths": lambda rng: {"softcap": 4.0, "alibi_slopes": np.array([0.3, 0.2, 0.1], F32),
                                          "sinks": rng.standard_normal(3).astype(F32), "kv_lengths": np.array([[9], [20]])},
}


@pytest.mark.parametrize("name", list(MODIFIERS))
def test_score_modifiers(rng, name):
    q = rng.standard_normal((2, 3, 14, 8)).astype(F32)
    k = rng.standard_normal((2, 3, 20, 8)).astype(F32)
    v = rng.standard_normal((2, 3, 20, 4)).astype(F32)
    kw = MODIFIERS[name](rng)
    numpy_kw = {n: (x.compute() if isinstance(x, da.Array) else x) for n, x in kw.items()}
    dout, out, lse = forward(rng, q, k, v, numpy_kw)
    grads = dask_backward(dout, chunked(q, (1, 2, 5, 8)), chunked(k, (2, 3, 6, 8)), v, out, lse, **kw)
    compare(grads, dout, q, k, v, out, lse, numpy_kw, what=f"{name}: ")


@pytest.mark.parametrize("dtypes", [(BF16,) * 3, (np.float16,) * 3, (np.float64,) * 3, (F32, BF16, np.float16)],
                         ids=lambda d: "-".join(np.dtype(x).name for x in d))
def test_dtypes(rng, dtypes):
    q = rng.standard_normal((2, 2, 12, 8)).astype(dtypes[0])
    k = rng.standard_normal((2, 2, 16, 8)).astype(dtypes[1])
    v = rng.standard_normal((2, 2, 16, 4)).astype(dtypes[2])
    kw = {"causal": True, "bias": rng.standard_normal((12, 16)).astype(dtypes[0])}
    dout, out, lse = forward(rng, q, k, v, kw)
    grads = dask_backward(chunked(dout, (1, 2, 5, 4)), chunked(q, (1, 2, 5, 8)), chunked(k, (2, 1, 6, 8)),
                          chunked(v, (2, 2, 6, 4)), out, chunked(lse, (2, 1, 4)), **kw)
    compare(grads, dout, q, k, v, out, lse, kw)


# --------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------


def scheduler_case(rng):
    q = rng.standard_normal((2, 4, 24, 8)).astype(F32)
    k = rng.standard_normal((2, 2, 40, 8)).astype(F32)
    v = rng.standard_normal((2, 2, 40, 8)).astype(F32)
    kw = {"causal": True, "causal_align": "bottom_right", "bias": rng.standard_normal((24, 40)).astype(F32),
          "sinks": rng.standard_normal(4).astype(F32), "method": "general",
          **method_weights(rng, "general", 8, 8, F32)}
    dout, out, lse = forward(rng, q, k, v, kw)
    grads = dask_backward(dout, chunked(q, (1, 2, 8, 8)), chunked(k, (2, 1, 10, 8)), v, out, lse, **kw)
    return grads, (dout, q, k, v, out, lse, kw)


def assert_bitwise(a, b):
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8))


def test_sync_and_threaded_schedulers_bitwise(rng):
    grads, case = scheduler_case(rng)
    fields = [g for g in grads if g is not None]
    sync = dask.compute(*fields, scheduler="sync")
    threads = dask.compute(*fields, scheduler="threads", num_workers=4)
    assert_bitwise(sync, threads)
    compare(grads, *case[:6], case[6])


@pytest.fixture(scope="module")
def cluster_client():
    """A LocalCluster of two single-threaded worker processes on the loopback, for this module."""
    distributed = pytest.importorskip("distributed")
    # The scheduler serves its HTTP routes (health, metrics) even without a dashboard, by default on
    # port 8787, which another cluster on the machine may hold: an ephemeral loopback port instead.
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None, host="127.0.0.1", timeout="60s",
                                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
    client = distributed.Client(cluster, timeout="60s")
    try:
        yield client
    finally:
        client.close(timeout=30)
        cluster.close(timeout=30)


def test_distributed_cluster_bitwise(rng, cluster_client):
    grads, _ = scheduler_case(rng)
    fields = [g for g in grads if g is not None]
    sync = dask.compute(*fields, scheduler="sync")
    on_cluster = cluster_client.compute(fields, sync=True)
    assert_bitwise(sync, on_cluster)


# --------------------------------------------------------------------------
# Errors and edge cases
# --------------------------------------------------------------------------


def small_case(rng, lk=6):
    q, k, v = (rng.standard_normal((2, n, 4)).astype(F32) for n in (5, lk, lk))
    dout, out, lse = forward(rng, q, k, v, {})
    return dout, q, k, v, out, lse


def same_error(rng, exc, match, *, args=None, **kw):
    """dask_backward raises what attention_backward raises on the same (NumPy) call."""
    args = small_case(rng) if args is None else args
    with pytest.raises(exc, match=match) as whole:
        attnfast.attention_backward(*args, **kw)
    dask_args = [chunked(x, tuple(max(1, n // 2) for n in x.shape)) for x in args]
    with pytest.raises(exc) as got:
        dask_backward(*dask_args, **kw)
    assert str(got.value) == str(whole.value)


def test_int8_cache_has_no_gradients(rng):
    dout, q, k, v, out, lse = small_case(rng)
    k8 = np.zeros(k.shape, np.int8)
    same_error(rng, ValueError, "int8 k: it has no gradients of an int8 cache", args=(dout, q, k8, v, out, lse))


@pytest.mark.parametrize("name, value, exc, match", [
    ("block_table", np.zeros((2, 1), np.int32), ValueError, "does not take block_table: it has no gradients"),
    ("k_scale", np.ones((2, 6), F32), ValueError, "does not take k_scale"),
    ("return_lse", True, TypeError, "unexpected keyword argument"),
    ("return_weights", False, TypeError, "unexpected keyword argument"),
])
def test_keywords_attention_backward_rejects(rng, name, value, exc, match):
    same_error(rng, exc, match, **{name: value})


def test_validation_errors_are_attention_backwards(rng):
    dout, q, k, v, out, lse = small_case(rng)
    same_error(rng, ValueError, "dout has shape", args=(dout[:, :4], q, k, v, out, lse))
    same_error(rng, TypeError, "lse has dtype", args=(dout, q, k, v, out, lse.astype(np.float64)))
    same_error(rng, ValueError, "kv_lengths must lie in", kv_lengths=np.array([7, 2]))
    same_error(rng, ValueError, "unknown causal_align", causal=True, causal_align="middle")


def test_validation_allocates_no_broadcast_stand_in(rng):
    # A float32 q with float64 k and v, and a float64 bias of a float32 call (cast by validation):
    # 2^40-element dask stand-ins validate without allocating them.
    big = 2 ** 20
    q = da.zeros((1, big, 4), dtype=np.float32, chunks=(1, 2 ** 18, 4))
    k = da.zeros((1, big, 4), dtype=np.float64, chunks=(1, 2 ** 18, 4))
    dout = da.zeros((1, big, 4), dtype=np.float64, chunks=(1, 2 ** 18, 4))
    lse = da.zeros((1, big), dtype=np.float64, chunks=(1, 2 ** 18))
    bias = da.zeros((big, big), dtype=np.float64, chunks=(2 ** 18, 2 ** 18))
    grads = dask_backward(dout, q, k, k, dout, lse, bias=bias, causal=True)
    assert grads.dq.dtype == np.float32 and grads.dk.dtype == np.float64 and grads.dbias.dtype == np.float64
    assert block_tasks(grads) == 10  # 4 query chunks x 4 key chunks, causal: the lower triangle


@pytest.mark.parametrize("batch, lk, dv", [(2, 0, 3), (0, 6, 3), (2, 6, 0)], ids=["no keys", "empty batch", "Dv = 0"])
def test_nothing_to_compute_gives_zeros(rng, batch, lk, dv):
    q = rng.standard_normal((batch, 5, 4)).astype(F32)
    k = rng.standard_normal((batch, lk, 4)).astype(F32)
    v = rng.standard_normal((batch, lk, dv)).astype(F32)
    kw = {"method": "general", "w": rng.standard_normal((4, 4)).astype(F32)}
    dout, out, lse = forward(rng, q, k, v, kw)
    grads = dask_backward(dout, chunked(q, (1, 2, 4)), k, v, out, lse, **kw)
    whole = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    for got, want in zip(dask.compute(*grads[:3], grads.dw, scheduler="sync"), (*whole[:3], whole.dw)):
        assert got.shape == want.shape and got.dtype == want.dtype and not got.any() and not want.any()


def test_dask_kv_lengths_and_weights_are_computed_eagerly(rng):
    q, k, v = (rng.standard_normal((2, 10, 4)).astype(F32) for _ in range(3))
    kw = {"method": "general", "w": rng.standard_normal((4, 4)).astype(F32), "kv_lengths": np.array([3, 5])}
    dout, out, lse = forward(rng, q, k, v, kw)
    dask_kw = {"method": "general", "w": da.from_array(kw["w"]), "kv_lengths": da.from_array(kw["kv_lengths"])}
    grads = dask_backward(dout, q, chunked(k, (2, 3, 4)), v, out, lse, **dask_kw)
    assert block_tasks(grads) == 2  # key chunks [0, 3) and [3, 6): kv_lengths hides the rest
    compare(grads, dout, q, k, v, out, lse, kw)


def test_dask_forward_outputs_as_inputs(rng):
    # out and lse themselves dask arrays (as attnfast.dask.attention returns them) of another chunking.
    q, k, v = (rng.standard_normal((2, 16, 8)).astype(F32) for _ in range(3))
    kw = {"causal": True}
    dout, out, lse = forward(rng, q, k, v, kw)
    grads = dask_backward(chunked(dout, (1, 3, 8)), chunked(q, (2, 8, 8)), chunked(k, (2, 4, 8)), v,
                          chunked(out, (2, 16, 2)), chunked(lse, (1, 5)), **kw)
    compare(grads, dout, q, k, v, out, lse, kw)


@pytest.mark.parametrize("kw", [{"causal": True}, {"causal": True, "causal_align": "bottom_right", "window": (7, None)}],
                         ids=["causal", "bottom_right window"])
def test_after_the_dask_forward(rng, kw):
    # The whole training step on Dask: out and lse from attnfast.dask.attention (chunked as the
    # backward's blocks), the backward over them; compared with attention_backward on the same out, lse.
    q = rng.standard_normal((2, 4, 32, 8)).astype(F32)
    k = rng.standard_normal((2, 2, 48, 8)).astype(F32)
    v = rng.standard_normal((2, 2, 48, 8)).astype(F32)
    dq, dk, dv = chunked(q, (1, 2, 8, 8)), chunked(k, (2, 1, 16, 8)), chunked(v, (1, 2, 16, 8))
    out, lse = ad.attention(dq, dk, dv, return_lse=True, **kw)
    dout = da.from_array(rng.standard_normal(out.shape).astype(F32), chunks=out.chunks)
    grads = ad.attention_backward(dout, dq, dk, dv, out, lse, **kw)
    assert grads.dq.chunks == out.chunks[:-1] + ((8,),)
    o, l, d = dask.compute(out, lse, dout, scheduler="sync")
    compare(grads, d, q, k, v, o, l, kw)
    # The gradients are ordinary dask arrays: they combine with others in one graph (what is checked
    # here; their values were compared above, so the tolerance only absorbs the float32 sums).
    step = (dq - 0.5 * grads.dq).sum() + da.stack([grads.dk, grads.dv]).sum()
    want = attnfast.attention_backward(d, q, k, v, o, l, **kw)
    assert np.isclose(step.compute(scheduler="sync"), (q - 0.5 * want.dq).sum() + want.dk.sum() + want.dv.sum(),
                      rtol=1e-5, atol=1e-3)


def test_unknown_chunk_sizes_are_refused(rng):
    dout, q, k, v, out, lse = small_case(rng)
    lazy = da.from_array(q)
    unknown = lazy[lazy[:, 0, 0] > -np.inf]  # boolean indexing: chunk sizes known only once computed
    with pytest.raises(ValueError, match=r"q has unknown chunk sizes .* Call q.compute_chunk_sizes\(\) first"):
        dask_backward(dout, unknown, k, v, out, lse)


def random_chunks(rng, n):
    """Random chunk sizes summing to ``n`` (1 to 4 chunks)."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 4))), replace=False))
    return tuple(int(c) for c in np.diff(np.concatenate([[0], cuts, [n]])))


@pytest.mark.parametrize("seed", range(4))
def test_random_chunkings_of_everything_at_once(seed):
    # GQA, a broadcast batch axis of k and v, a bool mask, a bias per head, kv_lengths, a causal
    # bottom_right window, ALiBi and sinks, with random chunks along every axis of every input.
    rng = np.random.default_rng(1000 + seed)
    q = rng.standard_normal((2, 4, 18, 8)).astype(F32)
    k = rng.standard_normal((1, 2, 26, 8)).astype(F32)
    v = rng.standard_normal((1, 2, 26, 5)).astype(F32)
    kw = {"causal": True, "causal_align": "bottom_right", "window": (int(rng.integers(3, 12)), None),
          "kv_lengths": rng.integers(0, 27, size=(2, 1)), "mask": rng.random((18, 26)) < 0.9,
          "bias": rng.standard_normal((4, 1, 26)).astype(F32), "alibi_slopes": np.float32(0.5) ** np.arange(1, 5),
          "sinks": rng.standard_normal(4).astype(F32)}
    dout, out, lse = forward(rng, q, k, v, kw)
    rc = lambda x: da.from_array(x, chunks=tuple(random_chunks(rng, n) if n > 1 else (n,) for n in x.shape))  # noqa: E731
    dask_kw = {**kw, "mask": rc(kw["mask"]), "bias": rc(kw["bias"])}
    grads = dask_backward(rc(dout), rc(q), rc(k), rc(v), rc(out), rc(lse), **dask_kw)
    compare(grads, dout, q, k, v, out, lse, kw, what=f"seed {seed}: ")
    visible, _ = expected_tasks(q, k, v, grads.dq.chunks[-2], grads.dk.chunks[-2], grads.dq.chunks[:2], kw)
    assert block_tasks(grads) == visible


@pytest.mark.parametrize("q_chunks, k_chunks", [
    (None, (1, 1, 5, 8)),          # NumPy q: the batch and head chunks come from k
    ((2, (3, 3), 4, 8), None),     # q's head chunks, whole GQA groups already
    ((1, (1, 5), 4, 8), None),     # widened to whole groups
    (None, (2, (1, 1), 7, 8)),     # only the kv heads chunked: the query heads follow, by group
], ids=["numpy q", "q heads", "q heads widened", "kv heads"])
def test_blocks_are_the_forwards(rng, q_chunks, k_chunks):
    # dq is chunked like the forward's out (and dk, dv like k as rechunked by the forward), so that a
    # training step's arrays line up chunk for chunk.
    q = rng.standard_normal((2, 6, 12, 8)).astype(F32)
    k, v = (rng.standard_normal((2, 2, 14, 8)).astype(F32) for _ in range(2))
    qd, kd = chunked(q, q_chunks), chunked(k, k_chunks)
    out, lse = ad.attention(qd, kd, v, return_lse=True, causal=True)
    grads = ad.attention_backward(da.ones_like(out), qd, kd, v, out, lse, causal=True)
    assert grads.dq.chunks[:-1] == out.chunks[:-1]
    assert grads.dk.chunks[1] == tuple(c // 3 for c in out.chunks[1])
    assert grads.dk.chunks[2] == ((14,) if k_chunks is None else da.core.normalize_chunks(k_chunks, k.shape)[2])
