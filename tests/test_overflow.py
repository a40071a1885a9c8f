"""Overflowing scores, +inf scores and merge_states with NaN, inf and underflowing parts.

The contract (reference module docstring, README Numerics): scores are s = (scale * q) . k (+ bias) in
the computation dtype, scale applied to q first; a score past the dtype's finite range is +-inf. A
row whose maximum is +inf splits its weight evenly over its +inf scores (the limit of the softmax as
they grow together), every other key weighs exactly 0 and lse is +inf; a -inf score is a hidden key.
Every path of the fused kernel (tiled, row-wise, key split) and every SIMD target must agree with the
reference, NaN and inf patterns included.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import attnfast
from attnfast import reference

from conftest import assert_close_fixed

# (q batch, kv batch, Lq, Lk): tiled (no split), row-wise (GQA, 6 rows per kv item), tiled with the keys
# in 5 chunks, row-wise with the keys in 3 chunks (see test_hidden_keys.py).
PATHS = {
    "tiled": ((2, 1), (2, 1), 97, 130),
    "rowwise": ((2, 2), (2, 1), 3, 200),
    "split": ((1, 1), (1, 1), 40, 2100),
    "rowwise_split": ((1, 2), (1, 1), 1, 2500),
}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _qkv(path, d, dtype, rng):
    qb, kvb, lq, lk = PATHS[path]
    q = rng.standard_normal(qb + (lq, d)).astype(dtype)
    k = rng.standard_normal(kvb + (lk, d)).astype(dtype)
    v = rng.standard_normal(kvb + (lk, d)).astype(dtype)
    return q, k, v


def _both(q, k, v, **kw):
    got = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    ref = reference.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    return got, ref


def _expected_saturated(v, inf_keys, group=1):
    """out, lse, weights of rows whose +inf keys are inf_keys (batch..., Lq, Lk) bool; rows without any
    +inf key are left NaN (the caller checks those against the reference)."""
    count = inf_keys.sum(axis=-1, keepdims=True)
    w = np.where(count > 0, inf_keys / np.maximum(count, 1), np.nan)
    vv = np.repeat(v.astype(np.float64), group, axis=-3) if v.shape[-3] > 1 else v.astype(np.float64)
    out = w @ vv
    lse = np.where(count[..., 0] > 0, np.inf, np.nan)
    return out, lse, w


def _assert_agree(got, ref, dtype, what):
    for name, g, r in zip(("out", "lse", "weights"), got, ref):
        assert_close_fixed(g, r, dtype, scale=1.0 if name == "weights" else None, what=f"{what}: {name}")


@pytest.mark.parametrize("path", list(PATHS))
def test_float32_scores_that_overflow_saturate(isa, path):
    # q . k ~ 1e40 does not fit float32: the scores are +-inf. All terms of a score share its sign here
    # (q >= 0, each key row of one sign), so every summation order overflows the same way. Rows with a
    # positive key split their weight evenly over those keys (lse +inf); rows whose keys are all
    # negative (or hidden) see no key at all (out 0, lse -inf). Some rows have ordinary q: finite scores.
    rng = _rng("f32", path)
    q, k, v = _qkv(path, 16, np.float32, rng)
    qb, kvb, lq, lk = PATHS[path]
    q = np.abs(q)
    huge_rows = rng.random(qb + (lq, 1)) < 0.7
    q = np.where(huge_rows, q * np.float32(1e20), q).astype(np.float32)
    sign = np.where(rng.random(kvb + (lk, 1)) < 0.1, 1.0, -1.0)
    k = (np.abs(k) * sign * np.float32(1e20)).astype(np.float32)
    for kw in ({}, {"causal": True}, {"mask": rng.random(qb + (lq, lk)) < 0.5}):
        got, ref = _both(q, k, v, **kw)
        _assert_agree(got, ref, np.float32, f"{path} {list(kw)}")
        out, lse, w = got
        assert np.all(np.isfinite(out)), "overflowing scores must not make a row NaN"
        assert np.all(np.isin(lse[huge_rows[..., 0]], [np.inf, -np.inf]))
        group = qb[1] // kvb[1]
        vis = np.ones(qb + (lq, lk), bool)
        if kw.get("causal"):
            vis &= np.tri(lq, lk, dtype=bool)
        if "mask" in kw:
            vis &= kw["mask"]
        kpos = np.repeat(sign[..., 0] > 0, group, axis=-2) if kvb[1] > 1 else np.broadcast_to(
            sign[..., 0] > 0, qb + (lk,))
        inf_keys = vis & kpos[..., None, :] & huge_rows
        e_out, e_lse, e_w = _expected_saturated(v, inf_keys, group)
        sat = inf_keys.any(axis=-1)
        assert_close_fixed(out[sat], e_out[sat], np.float32, what="out = mean of the +inf keys' values")
        np.testing.assert_array_equal(lse[sat], e_lse[sat])
        np.testing.assert_array_equal(w[sat], e_w[sat].astype(np.float32))


@pytest.mark.parametrize("path", list(PATHS))
def test_float64_huge_query_row_is_finite(isa, path):
    # A q row of 4.5e307 against keys in [0.25, 0.5]: q . k ~ 2.7e308 overflows float64 before the
    # scale, (scale * q) . k ~ 6.8e307 does not. The kernels fold scale into q, and so must the
    # reference: finite scores, a finite row.
    rng = _rng("f64", path)
    q, k, v = _qkv(path, 16, np.float64, rng)
    q[..., 0, :] = 4.5e307
    k = rng.uniform(0.25, 0.5, k.shape)
    got, ref = _both(q, k, v)
    assert np.all(np.isfinite(ref[1])) and np.all(np.isfinite(got[1]))
    _assert_agree(got, ref, np.float64, path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", list(PATHS))
def test_positive_infinite_bias(isa, path, dtype):
    # +inf bias on one key, on several, on every key, on none (per row), and on a key the mask hides
    # (hidden wins): the weights by hand are 1/c on the row's c visible +inf keys.
    rng = _rng("bias", path, np.dtype(dtype).name)
    q, k, v = _qkv(path, 8, dtype, rng)
    qb, kvb, lq, lk = PATHS[path]
    bias = rng.standard_normal(qb + (lq, lk)).astype(dtype)
    kind = np.arange(np.prod(qb) * lq).reshape(qb + (lq,)) % 4  # rows: none, one key, several, all
    inf_keys = np.zeros(qb + (lq, lk), bool)
    inf_keys[kind == 1, lk - 1] = True
    several = rng.random(qb + (lq, lk)) < 0.05
    several[..., 0] = True
    inf_keys[kind == 2] = several[kind == 2]
    inf_keys[kind == 3] = True
    bias[inf_keys] = np.inf
    mask = np.ones(qb + (lq, lk), bool)
    mask[..., 1::5] = False  # some of the +inf keys are hidden anyway
    got, ref = _both(q, k, v, bias=bias, mask=mask)
    _assert_agree(got, ref, dtype, path)
    group = qb[1] // kvb[1]
    e_out, e_lse, e_w = _expected_saturated(v, inf_keys & mask, group)
    sat = (inf_keys & mask).any(axis=-1)
    assert sat.any() and (~sat).any()
    out, lse, w = got
    assert_close_fixed(out[sat], e_out[sat], dtype, what="out")
    np.testing.assert_array_equal(lse[sat], e_lse[sat])
    np.testing.assert_array_equal(w[sat], e_w[sat].astype(dtype))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[~sat]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", list(PATHS))
def test_positive_infinite_score_in_a_nan_row(isa, path, dtype):
    # A row with both a +inf score (+inf bias) and a NaN score (a NaN in a visible key's K) is a NaN
    # row: every visible key's weight is NaN, the +inf key's included, and hidden keys weigh 0. Rows
    # with only the +inf key split their weight over it; rows with only the NaN key are NaN.
    rng = _rng("inf-in-nan-row", path, np.dtype(dtype).name)
    q, k, v = _qkv(path, 8, dtype, rng)
    qb, kvb, lq, lk = PATHS[path]
    k[..., 3, 0] = np.nan
    bias = rng.standard_normal(qb + (lq, lk)).astype(dtype)
    bias[..., 0::2, lk - 1] = np.inf  # even rows: +inf and NaN; odd rows: NaN only
    mask = np.ones(qb + (lq, lk), bool)
    mask[..., 1::4, 3] = False  # and some rows have only the +inf key
    mask[..., :, 5] = False
    got, ref = _both(q, k, v, bias=bias, mask=mask)
    _assert_agree(got, ref, dtype, path)
    w = got[2]
    both = np.zeros(qb + (lq,), bool)
    both[..., 0::2] = True
    both &= mask[..., 3]
    assert both.any()
    assert np.all(np.isnan(w[both][:, lk - 1])) and np.all(np.isnan(w[both][:, 3]))
    assert np.all(w[both][:, 5] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_softmax_positive_infinity(dtype):
    x = np.array([[1.0, np.inf, 2.0, np.inf], [1.0, 2.0, 3.0, np.inf], [np.inf, np.nan, 0, 0],
                  [-np.inf, -np.inf, -np.inf, -np.inf]], dtype)
    w = reference.softmax(x)
    np.testing.assert_array_equal(w[0], [0, 0.5, 0, 0.5])
    np.testing.assert_array_equal(w[1], [0, 0, 0, 1])
    assert np.all(np.isnan(w[2]))
    np.testing.assert_array_equal(w[3], [0, 0, 0, 0])
    np.testing.assert_array_equal(reference.softmax(x, mask=np.array([True, False, True, True]))[0],
                                  [0, 0, 0, 1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reference_saturates_float32_scores(dtype):
    # The float64 reference of a float32 problem saturates at float32's range; of a float64 one, not.
    q = np.full((1, 2), 2e19, dtype)
    k = np.array([[1e19, 1e19], [-1e19, -1e19], [1.0, 1.0]], dtype)
    v = np.array([[1.0], [2.0], [4.0]], dtype)
    out, lse = reference.attention(q, k, v, scale=1.0, return_lse=True)
    if dtype == np.float32:  # 4e38 > float32 max: +inf for key 0, -inf (hidden) for key 1
        np.testing.assert_array_equal(out, [[1.0]])
        np.testing.assert_array_equal(lse, [np.inf])
    else:
        np.testing.assert_array_equal(out, [[1.0]])
        assert lse[0] == pytest.approx(4e38)


# --------------------------------------------------------------------------
# merge_states
# --------------------------------------------------------------------------

MERGES = [attnfast.merge_states, reference.merge_states]


@pytest.mark.parametrize("merge", MERGES, ids=["fast", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_merge_states_keeps_a_nonfinite_part_whose_weight_underflows(merge, dtype, bad):
    # exp(-200 - 0) underflows to 0 in float32 (and exp(-2000) in float64), but the part is not empty: its
    # NaN or inf reaches the result (0 * NaN, 0 * inf are NaN), as in one pass over all keys.
    o1 = np.array([[1.0, 2.0], [3.0, 4.0]], dtype)
    o2 = np.array([[bad, 0.0], [5.0, 6.0]], dtype)
    lse1 = np.array([0.0, 0.0], dtype)
    lse2 = np.array([-2000.0, -2000.0], dtype)
    out, lse = merge([o1, o2], [lse1, lse2])
    assert out.dtype == dtype and lse.dtype == dtype
    assert np.isnan(out[0, 0])
    np.testing.assert_array_equal(out[0, 1], 2.0)
    np.testing.assert_array_equal(out[1], o1[1])
    np.testing.assert_array_equal(lse, [0.0, 0.0])


@pytest.mark.parametrize("merge", MERGES, ids=["fast", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_states_empty_part_contributes_nothing(merge, dtype):
    o1 = np.array([[1.0, 2.0]], dtype)
    junk = np.array([[np.nan, np.inf]], dtype)
    out, lse = merge([o1, junk], [np.array([0.5], dtype), np.array([-np.inf], dtype)])
    np.testing.assert_array_equal(out, o1)
    np.testing.assert_array_equal(lse, [0.5])
    out, lse = merge([junk, junk], [np.array([-np.inf], dtype), np.array([-np.inf], dtype)])
    np.testing.assert_array_equal(out, [[0.0, 0.0]])
    np.testing.assert_array_equal(lse, [-np.inf])


@pytest.mark.parametrize("merge", MERGES, ids=["fast", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_states_positive_infinite_lse(merge, dtype):
    # Parts with lse +inf share the row evenly, finite parts weigh 0 and the merged lse is +inf; a NaN
    # lse makes the row NaN.
    o = [np.array([[1.0], [1.0], [1.0]], dtype), np.array([[3.0], [3.0], [3.0]], dtype),
         np.array([[8.0], [8.0], [8.0]], dtype)]
    lses = [np.array([np.inf, 0.0, np.nan], dtype), np.array([np.inf, np.inf, 0.0], dtype),
            np.array([5.0, -np.inf, 0.0], dtype)]
    out, lse = merge(o, lses)
    np.testing.assert_array_equal(out[:2, 0], [2.0, 3.0])
    np.testing.assert_array_equal(lse[:2], [np.inf, np.inf])
    assert np.isnan(out[2, 0]) and np.isnan(lse[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_states_of_saturated_attention_parts(isa, dtype):
    # Attention over two key halves, one with +inf bias entries: merging gives the one-pass result.
    rng = _rng("merge", np.dtype(dtype).name)
    q, k, v = (rng.standard_normal((2, 7, 8)).astype(dtype) for _ in range(3))
    bias = rng.standard_normal((2, 7, 7)).astype(dtype)
    bias[0, :3, 5] = np.inf
    bias[0, 1, 6] = np.inf
    full = attnfast.attention(q, k, v, bias=bias, return_lse=True)
    parts = [attnfast.attention(q, k[:, s], v[:, s], bias=bias[..., s], return_lse=True)
             for s in (slice(0, 4), slice(4, 7))]
    for merge in MERGES:
        out, lse = merge([p[0] for p in parts], [p[1] for p in parts])
        assert_close_fixed(out, full[0], dtype, what="out")
        assert_close_fixed(lse, full[1], dtype, what="lse")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general"])
def test_scores_scale_after_the_dot_product_as_the_reference(isa, method, dtype):
    # scores() computes (q . k) * scale, and so does reference.scores: a q . k past the dtype's range is
    # +-inf in both even when the scaled score would fit (attention() folds scale into q instead: README).
    rng = _rng("scores-scale-after", method, np.dtype(dtype).name)
    huge, scale = (1e20, 1e-10) if dtype == np.float32 else (1e160, 1e-20)
    d = 17
    q = (rng.uniform(0.5, 1.0, (2, 5, d)) * huge).astype(dtype)
    k = (rng.uniform(0.5, 1.0, (2, 7, d)) * huge * np.where(rng.random((2, 7, 1)) < 0.5, 1, -1)).astype(dtype)
    kw = {"method": method, "scale": scale}
    if method == "general":
        kw["w"] = np.eye(d, dtype=dtype)
    got, ref = attnfast.scores(q, k, **kw), reference.scores(q, k, **kw)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(np.abs(ref), np.inf)
    # Inside the range both give the same finite scores.
    small = (q / huge).astype(dtype), (k / huge).astype(dtype)
    assert_close_fixed(attnfast.scores(*small, **kw), reference.scores(*small, **kw), dtype,
                       scale=scale * d, what="scores")
