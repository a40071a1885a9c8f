"""attnfast.attention_backward (the fused kernel plus the NumPy chain through the projections) against
the float64 reference, on every SIMD target: every method and dtype, masks and their combinations,
causal in both alignments with Lq < Lk and Lq > Lk, windows, kv_lengths including 0, GQA/MQA,
strided / broadcast / overlapping inputs, empty rows, hidden garbage and overflowed rows.

Accuracy: the tolerance table's rule (conftest.assert_close_to_reference) against a naive backward in
the input precision (conftest.naive_attention_backward); see BACKWARD in conftest for the scales.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import attnfast
from attnfast import _inputs, reference

from conftest import (SIXTEEN_BIT, assert_close_to_reference, backward_scales, method_weights,
                      naive_attention_backward, random_qkv, relayout, up, weights64)

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_DTYPES = [np.float32, np.float64, np.float16, BF16]
VARIANTS = ["dot", "scaled_dot", "general", "concat", "additive", "additive_projected"]
FIELD_INPUT = {"dq": "q", "dk": "k", "dv": "v", "dbias": "bias", "dw": "w", "dw_q": "w_q", "dw_k": "w_k",
               "dscore_bias": "score_bias", "dv_a": "v_a"}


def variant_options(rng, variant, d, dtype, hidden=7):
    """attention keyword arguments of a method variant (additive_projected: q and k already projected,
    so A = D)."""
    dtype = np.dtype(dtype).type
    if variant == "additive_projected":
        kw = method_weights(rng, "additive", d, d, dtype, hidden=d)
        del kw["w_q"], kw["w_k"]
        return {"method": "additive", **kw}
    return {"method": variant, **method_weights(rng, variant, d, d, dtype, hidden=hidden)}


def reference_options(kw):
    """The same keyword arguments with every float array (weights, bias) exactly up-cast to float64."""
    kw = dict(kw)
    if kw.get("bias") is not None:
        kw["bias"] = up(kw["bias"])
    weights = {name: kw.pop(name) for name in ("w", "w_q", "w_k", "v_a", "score_bias") if name in kw}
    return {**kw, **weights64(weights)}


def check_backward(rng, q, k, v, *, dtype, what="backward", dout=None, **kw):
    """attention_backward of attnfast against the float64 reference (on exactly up-cast inputs), field
    by field, with the naive backward in the input precision setting the tolerance. Returns the grads."""
    dtype = np.dtype(dtype)
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    if dout is None:
        dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    ref = reference.attention_backward(up(dout), up(q), up(k), up(v), up(out), up(lse), **reference_options(kw))
    naive = naive_attention_backward(dout, q, k, v, out, lse, rounded=dtype if dtype in SIXTEEN_BIT else None, **kw)
    scales = backward_scales(dout, q, k, v, out, **reference_options(kw))
    given = {"q": q, "k": k, "v": v, **kw}
    compute = _inputs.compute_dtype(dtype)
    for field in grads._fields:
        got, want = getattr(grads, field), getattr(ref, field)
        assert (got is None) == (want is None), f"{what}: {field} is {got!r}, reference {want!r}"
        if got is None:
            continue
        name = FIELD_INPUT[field]
        field_dtype = np.asarray(given[name]).dtype if isinstance(given[name], (np.ndarray, np.generic)) \
            else compute
        assert got.dtype == field_dtype, f"{what}: {field} dtype {got.dtype}, expected {field_dtype}"
        assert got.shape == np.shape(given[name]), f"{what}: {field} shape {got.shape}"
        if field_dtype.itemsize > compute.itemsize:
            # A float64 weight of a float32 computation: its gradient holds float32 values exactly.
            got, field_dtype = got.astype(compute), compute
        assert_close_to_reference(got, want, naive[name], field_dtype, scale=scales[field], what=f"{what}: {field}")
    return grads


# --------------------------------------------------------------------------
# Methods and dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_method_and_dtype(isa, rng, variant, dtype):
    q, k, v = random_qkv(rng, (dtype,) * 3, (2, 3), 5, 7, 5, dv=3)
    kw = variant_options(rng, variant, 5, dtype)
    check_backward(rng, q, k, v, dtype=dtype, what=f"{variant} {np.dtype(dtype).name}", **kw)


@pytest.mark.parametrize("dtypes", [(np.float32, BF16, BF16), (np.float32, np.float16, np.float16),
                                    (np.float64, np.float32, np.float32), (BF16, np.float16, np.float32)],
                         ids=lambda ds: "-".join(np.dtype(d).name for d in ds))
@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive"])
def test_mixed_dtypes(isa, rng, variant, dtypes):
    q, k, v = random_qkv(rng, dtypes, (2,), 6, 9, 4, dv=3)
    result = _inputs.result_dtype(*(np.dtype(d) for d in dtypes))
    kw = variant_options(rng, variant, 4, np.float32)
    grads = check_backward(rng, q, k, v, dtype=result, **kw)
    assert (grads.dq.dtype, grads.dk.dtype, grads.dv.dtype) == tuple(np.dtype(d) for d in dtypes)


@pytest.mark.parametrize("d", [1, 3, 17, 63, 65, 97])
def test_awkward_depths(isa, rng, d):
    q, k, v = random_qkv(rng, (np.float32,) * 3, (2,), 9, 13, d, dv=max(1, d - 2))
    check_backward(rng, q, k, v, dtype=np.float32, causal=True)


@pytest.mark.parametrize("lq, lk", [(1, 1), (2, 1), (1, 2), (97, 97), (2, 1025), (97, 1025)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_awkward_lengths(isa, rng, lq, lk, dtype):
    q, k, v = random_qkv(rng, (dtype,) * 3, (1, 2), lq, lk, 16)
    check_backward(rng, q, k, v, dtype=dtype, causal=True, causal_align="bottom_right")


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def mask_options(rng, kind, lq, lk, batch):
    if kind == "mask":
        m = rng.random(batch + (lq, lk)) < 0.7
        m[..., 0, :] = False  # a row with no visible key
        return {"mask": m}
    if kind == "bias":
        return {"bias": rng.standard_normal(batch + (lq, lk)).astype(np.float32)}
    if kind == "bias_broadcast":
        return {"bias": rng.standard_normal((lq, 1)).astype(np.float32)}
    if kind == "bias_minus_inf":
        b = rng.standard_normal((lq, lk)).astype(np.float32)
        b[:, 1] = -np.inf
        b[2] = -np.inf
        return {"bias": b}
    if kind == "kv_lengths":
        return {"kv_lengths": (np.arange(batch[0]) * lk // max(batch[0] - 1, 1))[:, None]}  # 0 ... Lk
    if kind == "window":
        return {"window": (2, 1)}
    if kind == "window_causal":
        return {"window": (3, None), "causal": True}
    if kind == "everything":
        m = rng.random((lq, lk)) < 0.8
        return {"mask": m, "bias": rng.standard_normal((1, lq, lk)).astype(np.float32), "causal": True,
                "window": (4, None), "kv_lengths": np.array([0, lk - 2, lk])[: batch[0], None]}
    raise AssertionError(kind)


MASK_KINDS = ["mask", "bias", "bias_broadcast", "bias_minus_inf", "kv_lengths", "window", "window_causal",
              "everything"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive"])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks(isa, rng, kind, variant, dtype):
    batch, lq, lk = (3, 2), 6, 9
    q, k, v = random_qkv(rng, (dtype,) * 3, batch, lq, lk, 5, dv=4)
    kw = {**variant_options(rng, variant, 5, dtype), **mask_options(rng, kind, lq, lk, batch)}
    grads = check_backward(rng, q, k, v, dtype=dtype, what=kind, **kw)
    if "bias" in kw:
        assert grads.dbias.shape == kw["bias"].shape and grads.dbias.dtype == np.float32


@pytest.mark.parametrize("lq, lk", [(5, 11), (11, 5), (8, 8)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("window", [None, (2, 0), (0, 3)])
def test_causal_alignments_and_windows(isa, rng, lq, lk, align, window):
    q, k, v = random_qkv(rng, (np.float32,) * 3, (2, 2), lq, lk, 8)
    check_backward(rng, q, k, v, dtype=np.float32, causal=True, causal_align=align, window=window)
    check_backward(rng, q, k, v, dtype=np.float32, causal_align=align, window=window or (1, 1))


def test_kv_lengths_zero_gives_zero_gradients(isa, rng):
    q, k, v = random_qkv(rng, (np.float32,) * 3, (3,), 4, 6, 5)
    kw = {"method": "general", "w": rng.standard_normal((5, 5)).astype(np.float32),
          "kv_lengths": np.array([0, 3, 0])}
    grads = check_backward(rng, q, k, v, dtype=np.float32, **kw)
    for field in ("dq", "dk", "dv"):
        assert np.all(getattr(grads, field)[[0, 2]] == 0), field
    assert np.all(grads.dk[1, 3:] == 0) and np.all(grads.dv[1, 3:] == 0)


# --------------------------------------------------------------------------
# Heads and layouts
# --------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (6, 3), (1, 3)], ids=["gqa", "mqa", "gqa3", "one_query_head"])
@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive"])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: np.dtype(d).name)
def test_grouped_heads(isa, rng, heads, variant, dtype):
    hq, hk = heads
    q, k, v = random_qkv(rng, (dtype,) * 3, (2, hq), 5, 7, 6, kv_batch=(2, hk))
    kw = {**variant_options(rng, variant, 6, dtype), "causal": True, "bias": rng.standard_normal((hq, 5, 7))}
    grads = check_backward(rng, q, k, v, dtype=dtype, **kw)
    assert grads.dk.shape == (2, hk, 7, 6)


@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive", "additive_projected"])
def test_broadcast_batch_axes(isa, rng, variant):
    """q shared over the leading axis (stride 0 and size 1), k over the heads, v over neither: each
    gradient is summed over its input's broadcast axes."""
    q = np.broadcast_to(rng.standard_normal((1, 3, 4, 6)).astype(np.float32), (2, 3, 4, 6))
    k = rng.standard_normal((2, 1, 5, 6)).astype(np.float32)
    v = rng.standard_normal((1, 3, 5, 2)).astype(np.float32)
    kw = variant_options(rng, variant, 6, np.float32)
    grads = check_backward(rng, q, k, v, dtype=np.float32, **kw)
    assert grads.dq.shape == (2, 3, 4, 6) and grads.dk.shape == (2, 1, 5, 6) and grads.dv.shape == (1, 3, 5, 2)
    q1 = np.ascontiguousarray(q[:1])
    grads1 = check_backward(rng, q1, k, v, dtype=np.float32, **kw)
    assert grads1.dq.shape == (1, 3, 4, 6)


@pytest.mark.parametrize("layout", ["F", "transposed", "negative", "every_other_row", "every_other_col"])
@pytest.mark.parametrize("variant", ["scaled_dot", "general", "additive"])
def test_strided_inputs(isa, rng, layout, variant):
    q, k, v = random_qkv(rng, (np.float32,) * 3, (2,), 6, 8, 5, dv=3)
    kw = variant_options(rng, variant, 5, np.float32)
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    expected = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    moved = [relayout(x, layout) for x in (dout, q, k, v, out)]
    got = attnfast.attention_backward(*moved[:5], relayout(np.ascontiguousarray(lse[..., None]), layout)[..., 0],
                                      **kw)
    for field in expected._fields:
        if getattr(expected, field) is not None:
            np.testing.assert_array_equal(getattr(got, field), getattr(expected, field), err_msg=field)
    check_backward(rng, *moved[1:4], dtype=np.float32, **kw)


def test_overlapping_inputs(isa, rng):
    """k and v the same array, q a view into it, dout a view of out: read-only inputs may share memory."""
    kv = rng.standard_normal((2, 7, 4)).astype(np.float32)
    q = kv[:, 2:5]
    grads = check_backward(rng, q, kv, kv, dtype=np.float32, causal=True)
    out, lse = attnfast.attention(q, kv, kv, return_lse=True, causal=True)
    again = attnfast.attention_backward(out, q, kv, kv, out, lse, causal=True)
    ref = attnfast.attention_backward(out.copy(), q.copy(), kv.copy(), kv.copy(), out.copy(), lse, causal=True)
    for field in ("dq", "dk", "dv"):
        np.testing.assert_array_equal(getattr(again, field), getattr(ref, field))
    assert grads.dk.shape == kv.shape


# --------------------------------------------------------------------------
# Visibility rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 3e38])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=lambda d: np.dtype(d).name)
def test_poisoned_hidden_keys(isa, rng, variant, garbage, dtype):
    """Garbage in every key a row cannot see (past kv_lengths, masked, and a whole kv_lengths = 0 item)
    changes no gradient bit; those keys' gradients and the empty rows' are exactly 0."""
    if dtype == BF16 and garbage == 3e38:
        garbage = float(ml_dtypes.finfo(BF16).max)
    q, k, v = random_qkv(rng, (dtype,) * 3, (3,), 4, 9, 5)
    lengths = np.array([0, 5, 9])
    mask = np.ones(9, bool)
    mask[6] = False
    kw = {**variant_options(rng, variant, 5, dtype), "kv_lengths": lengths, "mask": mask}
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    clean = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    dirty_k, dirty_v = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        dirty_k[b, n:], dirty_v[b, n:] = garbage, garbage
    dirty_k[:, 6], dirty_v[:, 6] = garbage, garbage
    grads = attnfast.attention_backward(dout, q, dirty_k, dirty_v, out, lse, **kw)
    for field in grads._fields:
        if getattr(grads, field) is not None:
            np.testing.assert_array_equal(getattr(grads, field), getattr(clean, field), err_msg=field)
    assert np.all(grads.dq[0] == 0) and np.all(grads.dk[0] == 0) and np.all(grads.dv[0] == 0)
    assert np.all(grads.dk[1, 5:] == 0) and np.all(grads.dv[:, 6] == 0)
    check_backward(rng, q, k, v, dtype=dtype, dout=dout, **kw)


def test_fully_masked_rows_with_garbage_queries(isa, rng):
    """A query row that sees no key gets dq 0 even when its query and its dout hold NaN, and adds
    nothing to the keys', values' and weights' gradients."""
    q, k, v = random_qkv(rng, (np.float32,) * 3, (2,), 5, 6, 4)
    mask = np.ones((5, 6), bool)
    mask[3] = False
    q[:, 3] = np.nan
    for variant in ("scaled_dot", "general", "concat", "additive"):
        kw = {**variant_options(rng, variant, 4, np.float32), "mask": mask}
        out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
        dout = np.ones_like(out)
        dout[:, 3] = np.nan
        grads = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
        for field in grads._fields:
            g = getattr(grads, field)
            assert g is None or np.all(np.isfinite(g)), f"{variant}: {field} not finite"
        assert np.all(grads.dq[:, 3] == 0)
        # The same as with a clean row 3 (up to the order of the sums: the garbage takes the careful path).
        clean_q, clean_dout = q.copy(), dout.copy()
        clean_q[:, 3] = 0
        clean_dout[:, 3] = 0
        clean_out, clean_lse = attnfast.attention(clean_q, k, v, return_lse=True, **kw)
        clean = attnfast.attention_backward(clean_dout, clean_q, k, v, clean_out, clean_lse, **kw)
        for field in ("dk", "dv"):
            np.testing.assert_allclose(getattr(grads, field), getattr(clean, field), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{variant}: {field}")


def test_overflowed_rows_match_the_reference(isa, rng):
    """Scores overflowing float32 give lse +inf: dq of the row 0, dv its even share of dout."""
    q, k, v = random_qkv(rng, (np.float32,) * 3, (1,), 3, 5, 2)
    q[0, 0] = [3e38, 0]
    k[0, :, 0] = [2, 3, -2, 1.5, 0.25]
    out, lse = attnfast.attention(q, k, v, method="dot", return_lse=True)
    assert lse[0, 0] == np.inf
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = attnfast.attention_backward(dout, q, k, v, out, lse, method="dot")
    ref = reference.attention_backward(dout, q, k, v, out, lse, method="dot")
    assert np.all(grads.dq[0, 0] == 0)
    for field in ("dq", "dk", "dv"):
        np.testing.assert_allclose(getattr(grads, field), getattr(ref, field), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["scaled_dot", "general", "additive"])
def test_bitwise_identical_for_any_thread_count(isa, rng, threads, variant):
    q, k, v = random_qkv(rng, (np.float32,) * 3, (2, 2), 97, 130, 17)
    kw = {**variant_options(rng, variant, 17, np.float32), "causal": True, "bias": rng.standard_normal((97, 130))}
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    attnfast.set_num_threads(1)
    one = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    attnfast.set_num_threads(2)
    two = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    for field in one._fields:
        if getattr(one, field) is not None:
            np.testing.assert_array_equal(getattr(one, field), getattr(two, field), err_msg=field)


# --------------------------------------------------------------------------
# Empty calls
# --------------------------------------------------------------------------


@pytest.mark.parametrize("shapes", [
    ((2, 3, 4), (2, 0, 4), (2, 0, 5)),  # no key
    ((2, 0, 4), (2, 6, 4), (2, 6, 5)),  # no query
    ((0, 3, 4), (0, 6, 4), (0, 6, 5)),  # empty batch
    ((2, 3, 4), (2, 6, 4), (2, 6, 0)),  # Dv = 0: the loss depends on nothing
], ids=["lk0", "lq0", "batch0", "dv0"])
@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive"])
def test_empty_calls_give_zero_gradients(isa, rng, shapes, variant):
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in shapes)
    kw = {**variant_options(rng, variant, 4, np.float32), "bias": np.zeros((1, shapes[0][-2], shapes[1][-2]))}
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    grads = attnfast.attention_backward(np.ones_like(out), q, k, v, out, lse, **kw)
    ref = reference.attention_backward(np.ones_like(out), q, k, v, out, lse, **kw)
    for field in grads._fields:
        got, want = getattr(grads, field), getattr(ref, field)
        assert (got is None) == (want is None), field
        if got is not None:
            assert got.shape == want.shape and got.dtype == want.dtype, field
            assert np.all(got == 0), field
