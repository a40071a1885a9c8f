"""The compiled backward kernel, `_core.attention_backward`, called directly on every target.

The operands are exactly what the forward kernel got (`_api._kernel_operands`), and out / lse come
from the forward kernel itself, so these tests hold the backward kernel alone to its contract
(AttentionBackwardParams in cpp/include/attnfast/params.h):
  P = softmax weights, dV = P^T dO, dP = dO V^T, delta_i = dO_i . O_i, dS = P (dP - delta) (0 where
  hidden), dQ = scale dS K, dK = scale dS^T Q; dk / dv per kv item (the `group` query items summed).
The oracle below computes that in high precision (float64 for float32 data, long double for float64
data); the "naive" computation the tolerance table compares with is the same FlashAttention-2
formulas in the computation dtype (P = exp(s - lse) from the forward's lse), in plain NumPy.
"""

from __future__ import annotations

import numpy as np
import pytest

import attnfast
from attnfast import _api, _inputs
from attnfast import _attnfast as _core
from attnfast import reference
from conftest import BFLOAT16, FLOAT16, assert_close_to_reference, poisoned_kv, random_qkv

pytestmark = pytest.mark.usefixtures("isa")

HIGH = {np.dtype(np.float32): np.float64, np.dtype(np.float64): np.longdouble}


# --------------------------------------------------------------------------
# Calling the kernels
# --------------------------------------------------------------------------


def _operands(q, k, v, kw):
    """The validated call and the fused kernels' operands, as attnfast.attention builds them."""
    a = _inputs.check_attention(q, k, v, return_lse=True, **kw)
    qq, kk, vv, scale, v_a = _api._kernel_operands(a)
    full = a.batch_shape + (a.lq, a.lk)
    mask = None if a.mask is None else np.broadcast_to(a.mask, full)
    bias = None if a.bias is None else _api._kernel_layout(np.broadcast_to(a.bias, full))
    lengths = None
    if a.kv_lengths is not None:
        lengths = np.ascontiguousarray(np.broadcast_to(a.kv_lengths, a.batch_shape), dtype=np.int64)
    # bottom_right with kv_lengths: each item's diagonal aligned to its own length.
    offsets = None if a.diagonal_offsets is None else _api.per_item(a.diagonal_offsets, a.batch_shape, np.int64)
    return a, dict(q=qq, k=kk, v=vv, scale=scale, v_a=v_a, mask=mask, bias=bias, kv_lengths=lengths,
                   diagonal_offsets=offsets)


def _common(a, o):
    return dict(batch=list(a.batch_shape), kv_batch=list(a.kv_batch_shape), group=a.group, scale=o["scale"],
                mask=o["mask"], bias=o["bias"], kv_lengths=o["kv_lengths"], causal=a.causal,
                diagonal_offset=a.diagonal_offset, window_left=a.window_left, window_right=a.window_right)


def forward(a, o, out_dtype=None):
    """out (in the storage dtype of k and v, or out_dtype) and lse from the forward kernel."""
    t = a.compute
    out = np.empty(a.batch_shape + (a.lq, a.dv), out_dtype or o["k"].dtype)
    lse = np.empty(a.batch_shape + (a.lq,), t)
    c = _common(a, o)
    _core.attention(o["q"], o["k"], o["v"], out, c["batch"], c["kv_batch"], c["group"], c["scale"], c["mask"],
                    c["bias"], c["kv_lengths"], c["causal"], c["diagonal_offset"], c["window_left"],
                    c["window_right"], lse, None, o["v_a"], diagonal_offsets=o["diagonal_offsets"])
    return out, lse


def backward(a, o, out, lse, dout, dscores=False):
    """dq, dk, dv (and dscores) from the backward kernel."""
    t = a.compute
    d = o["q"].shape[-1]
    dq = np.full(a.batch_shape + (a.lq, d), np.nan, t)
    dk = np.full(a.kv_batch_shape + (a.lk, d), np.nan, t)
    dv = np.full(a.kv_batch_shape + (a.lk, a.dv), np.nan, t)
    ds = np.full(a.batch_shape + (a.lq, a.lk), np.nan, t) if dscores else None
    c = _common(a, o)
    _core.attention_backward(o["q"], o["k"], o["v"], out, dout, lse, dq, dk, dv, ds, None, c["batch"],
                             c["kv_batch"], c["group"], c["scale"], c["mask"], c["bias"], c["kv_lengths"],
                             c["causal"], c["diagonal_offset"], c["window_left"], c["window_right"], o["v_a"],
                             diagonal_offsets=o["diagonal_offsets"])
    return dq, dk, dv, ds


# --------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------


def _expanded(x, a, dtype):
    """k or v (kv batch) as one array per query item (batch), in dtype."""
    x = np.broadcast_to(x, a.kv_batch_shape + x.shape[-2:]).astype(dtype)
    if a.group > 1:
        x = np.repeat(x, a.group, axis=-3)
    return x


def oracle(a, o, out, lse, dout, dtype, from_lse, magnitudes=False):
    """(dq, dk, dv, ds) by the contract's formulas in `dtype`. from_lse: P = exp(s - lse) with the
    forward's lse (the naive FlashAttention-2 computation); else the exact softmax. magnitudes: the
    size of the summed terms of each instead (the tolerance's scale)."""
    visible = reference._visibility(a)
    if o["bias"] is not None:
        visible = visible & (o["bias"] != -np.inf)
    seen = visible.any(axis=-2)  # keys some row of the item sees; the others may hold garbage
    q = np.broadcast_to(o["q"], a.batch_shape + o["q"].shape[-2:]).astype(dtype)
    k = np.where(seen[..., None], _expanded(o["k"], a, dtype), 0)
    v = np.where(seen[..., None], _expanded(o["v"], a, dtype), 0)
    o_ = out.astype(dtype)
    do = dout.astype(dtype)
    scale = dtype(o["scale"])
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        s = (scale * q) @ np.swapaxes(k, -1, -2)
        if o["bias"] is not None:
            s = s + o["bias"].astype(dtype)
        s = np.where(visible, s, -np.inf)
        m = np.max(s, axis=-1, keepdims=True) if a.lk else np.full(s.shape[:-1] + (1,), -np.inf, dtype)
        top = m == np.inf
        count = np.sum(s == np.inf, axis=-1, keepdims=True)
        flat = np.where(top, (s == np.inf) / np.maximum(count, 1), 0).astype(dtype)
        if from_lse:
            ls = lse.astype(dtype)[..., None]
            e = np.exp(s - np.where(ls == -np.inf, 0, ls))
            p = np.where(visible, e, 0)
        else:
            e = np.where(visible, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
            total = np.sum(e, axis=-1, keepdims=True)
            p = e / np.where(total == 0, 1, total)
        p = np.where(top, flat, p)
        dp = do @ np.swapaxes(v, -1, -2)
        delta = np.sum(do * o_, axis=-1, keepdims=True)
        ds = np.where(visible & ~top, p * (dp - delta), 0)
    dq = scale * (ds @ k)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q)
    dv = np.swapaxes(p, -1, -2) @ do

    def per_kv_item(x):
        if a.group > 1:
            x = x.reshape(x.shape[:-3] + (-1, a.group) + x.shape[-2:]).sum(axis=-3)
        return np.broadcast_to(x, a.kv_batch_shape + x.shape[-2:])

    if magnitudes:
        # The size of the terms each gradient sums (conftest's policy for sums that may cancel): dS =
        # P (dP - delta) cancels to ~0 for a row with one key, but its rounding errors are those of dP.
        ap, ado = np.abs(p), np.abs(do)
        ads = ap * (ado @ np.swapaxes(np.abs(v), -1, -2) + np.sum(ado * np.abs(o_), axis=-1, keepdims=True))
        sizes = (abs(scale) * (ads @ np.abs(k)), abs(scale) * (np.swapaxes(ads, -1, -2) @ np.abs(q)),
                 np.swapaxes(ap, -1, -2) @ ado, ads)
        return tuple(float(np.max(x, initial=0.0)) or 1.0 for x in sizes)
    return dq, per_kv_item(dk), per_kv_item(dv), ds


def many_items(q, k, v, kw, copies=8):
    """The same call stacked `copies` times on a new leading batch axis: at least 8 kv items, so the
    kernel runs its whole-kv-item scheme (attention_backward.h: kMinKvItems) where the call itself may
    run the two-pass one."""
    a = _inputs.check_attention(q, k, v, **kw)
    full = a.batch_shape + (a.lq, a.lk)
    kw = dict(kw)
    for name in ("mask", "bias"):
        if kw.get(name) is not None:
            kw[name] = np.broadcast_to(np.broadcast_to(kw[name], full)[None], (copies,) + full)
    if kw.get("kv_lengths") is not None:
        kw["kv_lengths"] = np.broadcast_to(np.broadcast_to(kw["kv_lengths"], a.batch_shape)[None],
                                           (copies,) + a.batch_shape)
    stacked = [np.broadcast_to(x[None], (copies,) + x.shape) for x in (q, k, v)]
    return stacked, kw


def check_backward(q, k, v, rng, *, dscores=False, out_dtype=None, dout=None, what="backward",
                   both_schemes=False, **kw):
    """Run forward and backward kernels and hold dq, dk, dv (and dscores) to the oracle; with
    both_schemes, also the call stacked into many kv items (many_items)."""
    if both_schemes:
        (q8, k8, v8), kw8 = many_items(q, k, v, kw)
        dout8 = None if dout is None else np.broadcast_to(dout[None], (8,) + dout.shape)
        check_backward(q8, k8, v8, rng, dscores=dscores, out_dtype=out_dtype, dout=dout8,
                       what=f"{what} (many kv items)", **kw8)
    a, o = _operands(q, k, v, kw)
    out, lse = forward(a, o, out_dtype)
    if dout is None:
        dout = rng.standard_normal(out.shape).astype(out.dtype)
    got = backward(a, o, out, lse, dout, dscores)
    t = np.dtype(a.compute)
    ref = oracle(a, o, out, lse, dout, HIGH[t], from_lse=False)
    naive = oracle(a, o, out, lse, dout, t.type, from_lse=True)
    sizes = oracle(a, o, out, lse, dout, np.float64, from_lse=False, magnitudes=True)
    assert_gradients_close(got, ref, naive, sizes, t, what)
    return a, o, got, ref


def assert_gradients_close(got, ref, naive, sizes, t, what="backward"):
    for name, g, r, n, size in zip(("dq", "dk", "dv", "dscores"), got, ref, naive, sizes):
        if g is None:
            continue
        r64, n64 = np.asarray(r, np.float64), np.asarray(n, np.float64)
        assert_close_to_reference(g, r64, n64, t, scale=size, what=f"{what}: {name}")


def _qkv(rng, batch, lq, lk, d, dtype=np.float32, dv=None, kv_batch=None):
    return random_qkv(rng, (dtype, dtype, dtype), batch, lq, lk, d, dv=dv, kv_batch=kv_batch)


# --------------------------------------------------------------------------
# Values against the oracle
# --------------------------------------------------------------------------

SIZES = [(1, 1), (2, 97), (97, 2), (97, 97), (1025, 65), (65, 1025)]


@pytest.mark.parametrize("d", [1, 3, 17, 63, 65, 97])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_depths(rng, d, dtype):
    q, k, v = _qkv(rng, (2,), 97, 97, d, dtype)
    check_backward(q, k, v, rng, method="scaled_dot")


@pytest.mark.parametrize("lq,lk", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lengths(rng, lq, lk, dtype):
    q, k, v = _qkv(rng, (1,), lq, lk, 17, dtype, dv=33)
    check_backward(q, k, v, rng, method="dot", scale=0.3)


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq,lk", [(97, 130), (130, 97), (2, 97), (97, 2)])
def test_causal(rng, align, lq, lk):
    q, k, v = _qkv(rng, (2,), lq, lk, 16)
    check_backward(q, k, v, rng, both_schemes=True, causal=True, causal_align=align, dscores=True)


@pytest.mark.parametrize("window", [(0, 0), (5, 0), (3, 7), (None, 9), (40, None)])
def test_windows(rng, window):
    q, k, v = _qkv(rng, (2,), 97, 130, 24)
    check_backward(q, k, v, rng, both_schemes=True, window=window, causal=window[1] == 0, dscores=True)


def test_kv_lengths_including_zero(rng):
    q, k, v = _qkv(rng, (4,), 70, 130, 20)
    lengths = np.array([0, 1, 64, 130])
    a, o, (dq, dk, dv, ds), _ = check_backward(q, k, v, rng, both_schemes=True, kv_lengths=lengths, dscores=True)
    assert np.all(dq[0] == 0) and np.all(dk[0] == 0) and np.all(dv[0] == 0) and np.all(ds[0] == 0)
    assert np.all(dk[1, 1:] == 0) and np.all(dv[2, 64:] == 0)


def test_bool_mask_with_fully_masked_rows(rng):
    q, k, v = _qkv(rng, (2,), 97, 150, 33)
    mask = rng.random((2, 97, 150)) < 0.4
    mask[0, 5] = False
    mask[1, 50:60] = False
    mask[:, :, 70:140] = False  # whole key tiles hidden from every row: skipped
    a, o, (dq, dk, dv, ds), _ = check_backward(q, k, v, rng, both_schemes=True, mask=mask, dscores=True)
    assert np.all(dq[0, 5] == 0) and np.all(dq[1, 50:60] == 0)
    assert np.all(ds[~mask] == 0)


def test_key_padding_mask(rng):
    q, k, v = _qkv(rng, (3,), 40, 97, 8)
    mask = np.broadcast_to((rng.random((3, 1, 97)) < 0.7), (3, 40, 97))
    check_backward(q, k, v, rng, both_schemes=True, mask=mask[:, :1, :], dscores=True)


@pytest.mark.parametrize("shape", ["full", "per_key", "strided"])
def test_bias_and_dscores(rng, shape):
    q, k, v = _qkv(rng, (2,), 60, 97, 16)
    if shape == "full":
        bias = rng.standard_normal((2, 60, 97)).astype(np.float32)
        bias[0, 3, :50] = -np.inf
    elif shape == "per_key":
        bias = rng.standard_normal((2, 1, 97)).astype(np.float32)
        bias[1, 0, 10:30] = -np.inf
    else:
        bias = np.asfortranarray(rng.standard_normal((2, 60, 97)).astype(np.float32))
    check_backward(q, k, v, rng, both_schemes=True, bias=bias, dscores=True)


@pytest.mark.parametrize("hq,hk", [(4, 2), (6, 1), (8, 8)])
def test_gqa(rng, hq, hk):
    q = rng.standard_normal((2, hq, 50, 16)).astype(np.float32)
    k = rng.standard_normal((2, hk, 70, 16)).astype(np.float32)
    v = rng.standard_normal((2, hk, 70, 12)).astype(np.float32)
    check_backward(q, k, v, rng, causal=True, causal_align="bottom_right")


def test_broadcast_kv_items_get_their_own_rows(rng):
    q = rng.standard_normal((3, 2, 40, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 50, 8)).astype(np.float32)  # broadcast over the first axis: stride 0
    v = rng.standard_normal((1, 2, 50, 8)).astype(np.float32)
    a, o, (dq, dk, dv, _), _ = check_backward(q, k, v, rng)
    assert dk.shape == (3, 2, 50, 8) and not np.array_equal(dk[0], dk[1])


def test_strided_operands(rng):
    base = rng.standard_normal((2, 97, 80)).astype(np.float32)
    q = base[:, :, :20]  # row stride 80 elements
    kbase = rng.standard_normal((2, 3 * 130, 20)).astype(np.float32)
    k = kbase[:, ::3]  # every third row: row stride 60 elements
    v = rng.standard_normal((130, 2, 24)).astype(np.float32).transpose(1, 0, 2)  # batch stride 24
    check_backward(q, k, v, rng, both_schemes=True, causal=True)


def test_general_and_concat_operands(rng):
    q, k, v = _qkv(rng, (2,), 50, 70, 12)
    w = rng.standard_normal((12, 12)).astype(np.float32) / 4
    check_backward(q, k, v, rng, method="general", w=w)
    wq, wk = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    check_backward(q, k, v, rng, method="concat", w_q=wq, w_k=wk, score_bias=np.float32(0.5), scale=0.7)


# --------------------------------------------------------------------------
# Edge rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_poisoned_hidden_keys(rng, garbage, dtype):
    q, k, v = _qkv(rng, (3,), 60, 140, 20, dtype)
    lengths = np.array([140, 90, 3])
    mask = np.ones((3, 60, 140), bool)
    mask[:, :, 7] = False
    dirty_k, dirty_v = poisoned_kv(k, v, [140, 90, 3], 7, garbage)
    a, o, (dq, dk, dv, ds), _ = check_backward(q, dirty_k, dirty_v, rng, both_schemes=True, kv_lengths=lengths,
                                               mask=mask, dscores=True, causal=True,
                                               causal_align="bottom_right")
    for g in (dq, dk, dv, ds):
        assert np.all(np.isfinite(g))
    assert np.all(dk[:, 7] == 0) and np.all(dv[:, 7] == 0) and np.all(dk[1, 90:] == 0)


def test_rows_with_infinite_scores(rng):
    q, k, v = _qkv(rng, (2,), 50, 100, 16)
    bias = rng.standard_normal((2, 50, 100)).astype(np.float32)
    bias[0, 3, [5, 70, 71]] = np.inf  # a row with three +inf scores: weights 1/3, dS 0
    bias[1, 49, 99] = np.inf
    a, o, (dq, dk, dv, ds), _ = check_backward(q, k, v, rng, both_schemes=True, bias=bias, dscores=True)
    assert np.all(dq[0, 3] == 0) and np.all(ds[0, 3] == 0) and np.all(dq[1, 49] == 0)


def test_rows_with_no_visible_key_get_zero_even_for_huge_dout(rng):
    q, k, v = _qkv(rng, (1,), 30, 40, 8)
    mask = np.ones((1, 30, 40), bool)
    mask[0, :10] = False
    a, o = _operands(q, k, v, dict(mask=mask))
    out, lse = forward(a, o)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dout[0, :10] = 3e38
    dq, dk, dv, ds = backward(a, o, out, lse, dout, True)
    assert np.all(dq[0, :10] == 0) and np.all(ds[0, :10] == 0) and np.all(np.isfinite(dk))
    assert np.all(np.isfinite(dv))


def test_empty_shapes(rng):
    for lq, lk in [(0, 5), (5, 0), (0, 0)]:
        q, k, v = _qkv(rng, (2,), lq, lk, 4)
        a, o = _operands(q, k, v, {})
        out = np.zeros((2, lq, 4), np.float32)
        lse = np.full((2, lq), -np.inf, np.float32)
        dq, dk, dv, _ = backward(a, o, out, lse, np.ones_like(out))
        assert np.all(dq == 0) and np.all(dk == 0) and np.all(dv == 0)


@pytest.mark.parametrize("d,dv", [(0, 5), (5, 0)])
def test_zero_features(rng, d, dv):
    q, k, v = _qkv(rng, (2,), 30, 70, d, dv=dv)
    check_backward(q, k, v, rng, causal=True)


# --------------------------------------------------------------------------
# 16-bit storage
# --------------------------------------------------------------------------


@pytest.mark.parametrize("storage", [FLOAT16, BFLOAT16])
@pytest.mark.parametrize("queries", ["same", "float32"])
def test_sixteen_bit_storage(rng, storage, queries):
    q, k, v = random_qkv(rng, (storage if queries == "same" else np.float32, storage, storage), (2,), 97, 130, 24)
    check_backward(q, k, v, rng, both_schemes=True, causal=True, dscores=True, what=f"{storage} {queries}")


@pytest.mark.parametrize("storage", [FLOAT16, BFLOAT16])
def test_sixteen_bit_wide_out_and_dout_and_poison(rng, storage):
    q, k, v = random_qkv(rng, (storage, storage, storage), (2,), 60, 90, 17)
    dirty_k, dirty_v = poisoned_kv(k, v, [90, 40], 3, np.nan)
    mask = np.ones((2, 60, 90), bool)
    mask[:, :, 3] = False
    dout = rng.standard_normal((2, 60, 17)).astype(np.float32)
    a, o, got, _ = check_backward(q, dirty_k, dirty_v, rng, both_schemes=True, out_dtype=np.float32, dout=dout,
                                  mask=mask, kv_lengths=np.array([90, 40]))
    assert all(np.all(np.isfinite(g)) for g in got[:3])


# --------------------------------------------------------------------------
# Determinism: bitwise the same for any thread count, in both schemes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [1, 3, 8])  # 1 and 3 kv items: the two-pass scheme; 8: whole kv items
def test_thread_count_does_not_change_bits(rng, threads, heads):
    q, k, v = _qkv(rng, (heads,), 300, 1025, 32)
    a, o = _operands(q, k, v, dict(causal=True))
    out, lse = forward(a, o)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    results = []
    for n in (1, 2):
        attnfast.set_num_threads(n)
        results.append(backward(a, o, out, lse, dout, True))
    for one, two in zip(*results):
        assert np.array_equal(one, two)
    ref = oracle(a, o, out, lse, dout, np.float64, from_lse=False)
    naive = oracle(a, o, out, lse, dout, np.float32, from_lse=True)
    sizes = oracle(a, o, out, lse, dout, np.float64, from_lse=False, magnitudes=True)
    assert_gradients_close(results[1], ref, naive, sizes, np.dtype(np.float32))


# --------------------------------------------------------------------------
# Internal errors of the binding
# --------------------------------------------------------------------------


def _valid_call(rng):
    q, k, v = _qkv(rng, (2,), 5, 6, 4)
    a, o = _operands(q, k, v, {})
    out, lse = forward(a, o)
    args = dict(q=o["q"], k=o["k"], v=o["v"], out=out, dout=np.ones_like(out), lse=lse,
                dq=np.empty((2, 5, 4), np.float32), dk=np.empty((2, 6, 4), np.float32),
                dv=np.empty((2, 6, 4), np.float32), dscores=None, dv_a=None, batch=[2], kv_batch=[2], group=1,
                scale=0.5, mask=None, bias=None, kv_lengths=None, causal=False, diagonal_offset=0,
                window_left=-1, window_right=-1, v_a=None)
    return args


def test_internal_dtype_mismatch(rng):
    args = _valid_call(rng)
    args["dq"] = np.empty((2, 5, 4), np.float64)
    with pytest.raises(TypeError, match="dq: internal dtype mismatch"):
        _core.attention_backward(**args)
    args = _valid_call(rng)
    args["v"] = args["v"].astype(np.float64)
    with pytest.raises(TypeError, match="v: internal dtype mismatch"):
        _core.attention_backward(**args)
    args = _valid_call(rng)
    args["lse"] = args["lse"].astype(np.float64)
    with pytest.raises(TypeError, match="lse: internal dtype mismatch"):
        _core.attention_backward(**args)


def test_internal_shape_mismatch(rng):
    args = _valid_call(rng)
    args["dk"] = np.empty((2, 5, 4), np.float32)
    with pytest.raises(ValueError, match="dk: internal shape mismatch"):
        _core.attention_backward(**args)
    args = _valid_call(rng)
    args["dq"] = np.empty((2, 4, 5), np.float32).transpose(0, 2, 1)
    with pytest.raises(ValueError, match="dq: must be a writeable C-contiguous array"):
        _core.attention_backward(**args)
    args = _valid_call(rng)
    args["group"] = 2
    with pytest.raises(ValueError, match=r"internal shape mismatch \(batch != kv_batch x group\)"):
        _core.attention_backward(**args)


def test_additive_scores_need_dv_a(rng):
    # The additive kernel itself is tested in test_backward_additive.py.
    args = _valid_call(rng)
    args["v_a"] = np.ones(4, np.float32)
    args["dv_a"] = None
    with pytest.raises(ValueError, match="dv_a: internal mismatch"):
        _core.attention_backward(**args)
