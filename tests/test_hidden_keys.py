"""Hidden keys contribute nothing to a row, whatever their K and V hold.

A key is hidden from a row by the bool mask, causal, window, kv_lengths, a -inf bias or a -inf score.
The K and V rows of some hidden keys are filled with NaN, infinities or random bit patterns (what a KV
cache allocated with np.empty holds past kv_lengths); every row that sees none of them must give
bitwise the out, lse and weights of the same call with the original finite values there, on every
path of the fused kernel (tiled, row-wise, and both with the keys split into chunks) and on every
SIMD target; the reference must behave alike. Rows that do see a poisoned key turn NaN (or +-inf)
exactly as the reference's do.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

import attnfast
from attnfast import _inputs, reference

from conftest import assert_close_fixed, check_attention

HIDINGS = ["causal_top_left", "causal_bottom_right", "window", "kv_lengths", "mask_full", "mask_keys",
           "mask_strided", "bias_neg_inf", "combined"]
POISONS = ["nan", "inf", "garbage"]

# (q batch, kv batch, Lq, D) per path; Lk comes from the test (L) or is fixed (the split paths).
# tiled: 2 items x ceil(L / 48) blocks, never split below Lk = 1024, and for L = 1025 44 tasks >= 32;
# rowwise: GQA group 2 x 3 query rows = 6 rows per kv item (<= 16); split: GQA, two 40-row blocks over
# 2100 keys (5 chunks of 448, key_chunks); rowwise_split: one kv item, 2500 keys (3 chunks of 1024).
PATHS = {
    "tiled": ((2, 1), (2, 1), None, 17),
    "rowwise": ((2, 2), (2, 1), 3, 65),
    "split": ((1, 2), (1, 1), 40, 64),
    "rowwise_split": ((1, 2), (1, 1), 1, 33),
}
SPLIT_LK = {"split": 2100, "rowwise_split": 2500}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _hiding_kwargs(hiding, rng, batch, lq, lk, dtype):
    full = batch + (lq, lk)
    lengths = np.array([max(1, lk - 2), max(1, lk // 2)][: batch[0]]).reshape(batch[0], 1)
    if hiding == "causal_top_left":
        return {"causal": True}
    if hiding == "causal_bottom_right":
        return {"causal": True, "causal_align": "bottom_right"}
    if hiding == "window":
        return {"window": (3, 2), "causal_align": "bottom_right"}
    if hiding == "kv_lengths":
        return {"kv_lengths": lengths}
    if hiding == "mask_full":
        return {"mask": rng.random(full) < 0.6}
    if hiding == "mask_keys":
        return {"mask": rng.random(batch[:1] + (1, 1, lk)) < 0.6}
    if hiding == "mask_strided":
        return {"mask": (rng.random(batch + (lq, 2 * lk)) < 0.6)[..., ::2]}
    if hiding == "bias_neg_inf":
        bias = rng.standard_normal(full).astype(dtype)
        bias[rng.random(full) < 0.4] = -np.inf
        return {"bias": bias}
    assert hiding == "combined"
    bias = rng.standard_normal(full).astype(dtype)
    bias[rng.random(full) < 0.2] = -np.inf
    return {"causal": True, "causal_align": "bottom_right", "kv_lengths": lengths,
            "mask": rng.random(batch[:1] + (1, 1, lk)) < 0.8, "bias": bias}


def _visible(q, k, v, kw):
    """(batch..., Lq, Lk): key visible to the row (the reference's rule, -inf bias included)."""
    a = _inputs.check_attention(q, k, v, **kw)
    vis = reference._visibility(a)
    if a.bias is not None:
        vis = vis & (np.broadcast_to(a.bias, vis.shape) != -np.inf)
    return vis


def _make_case(path, hiding, lk_or_l, dtype):
    """q, k, v, kwargs and the (kv batch..., Lk) keys to poison: hidden from at least one row."""
    qb, kvb, lq, d = PATHS[path]
    lk = SPLIT_LK.get(path, lk_or_l)
    lq = lk if lq is None else lq
    rng = _rng(path, hiding, lk, np.dtype(dtype).name)
    q = rng.standard_normal(qb + (lq, d)).astype(dtype)
    k = rng.standard_normal(kvb + (lk, d)).astype(dtype)
    v = rng.standard_normal(kvb + (lk, d)).astype(dtype)
    kw = _hiding_kwargs(hiding, rng, qb, lq, lk, dtype)
    group = qb[1] // kvb[1]
    vis = _visible(q, k, v, kw).reshape(kvb + (group, lq, lk))  # query heads of each kv head together
    hidden_somewhere = ~np.all(vis, axis=(-3, -2))  # (kv batch..., Lk)
    if hiding == "kv_lengths":
        poison = ~np.any(vis, axis=(-3, -2))  # all the garbage past each item's length
    else:
        # The last key, keys at tile edges (row-wise 128, tiled 64, blocks of 48) and a random one, where
        # hidden from some row: rows that see none of them stay finite.
        poison = np.zeros_like(hidden_somewhere)
        picks = [lk - 1, 47, 48, 63, 64, 127, 128, int(rng.integers(lk))]
        for j in picks:
            if j < lk:
                poison[..., j] = hidden_somewhere[..., j]
        if "mask" in kw or "bias" in kw:
            # Keep the poisoned keys mostly hidden, so that most rows see none of them.
            cols = np.flatnonzero(np.any(poison, axis=tuple(range(poison.ndim - 1))))
            if "mask" in kw:
                m = np.array(kw["mask"], copy=True)
                m[..., cols] &= rng.random(m[..., cols].shape) < 0.15
                kw["mask"] = m if hiding != "mask_strided" else np.repeat(m, 2, axis=-1)[..., ::2]
            if "bias" in kw:
                b = kw["bias"]
                b[..., cols] = np.where(rng.random(b[..., cols].shape) < 0.85, -np.inf, b[..., cols])
    return q, k, v, kw, poison


def _poisoned(x, poison, kind, rng, sign):
    y = np.array(x, copy=True)
    sel = np.broadcast_to(poison[..., None], y.shape)
    if kind == "nan":
        y[sel] = np.nan
    elif kind == "inf":
        y[sel] = sign * np.inf
    else:  # what np.empty may hold: any bit pattern (NaN, inf, huge, subnormal)
        uint = np.uint32 if y.itemsize == 4 else np.uint64
        y[sel] = rng.integers(0, 1 << (8 * y.itemsize), size=int(sel.sum()), dtype=uint).view(y.dtype)
    return y


def _affected_rows(q, k, v, kw, poison):
    """(batch..., Lq): the row sees a poisoned key."""
    qb = q.shape[:-2]
    group = qb[1] // k.shape[-3]
    vis = _visible(q, k, v, kw)
    per_head = np.repeat(poison, group, axis=-2) if poison.shape[-2] > 1 else np.broadcast_to(
        poison, qb + poison.shape[-1:])
    return np.any(vis & per_head[..., None, :], axis=-1)


_REFERENCE_CACHE = {}


def _reference(key, q, k, v, kw):
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = reference.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    return _REFERENCE_CACHE[key]


def _check_hidden_poison(path, hiding, l, poison_kind, dtype):
    q, k, v, kw, poison = _make_case(path, hiding, l, dtype)
    rng = _rng("poison", path, hiding, l, poison_kind)
    kp = _poisoned(k, poison, poison_kind, rng, +1.0)
    vp = _poisoned(v, poison, poison_kind, rng, -1.0)
    clean = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    dirty = attnfast.attention(q, kp, vp, return_lse=True, return_weights=True, **kw)
    key = (path, hiding, l, np.dtype(dtype).name)
    ref_clean = _reference(key + ("clean",), q, k, v, kw)
    ref_dirty = _reference(key + (poison_kind,), q, kp, vp, kw)
    ok = ~_affected_rows(q, k, v, kw, poison)
    what = f"{path}/{hiding}/L={l}/{poison_kind}"
    for name, c, d, rc, rd in zip(("out", "lse", "weights"), clean, dirty, ref_clean, ref_dirty):
        # Rows that see no poisoned key: bitwise the clean call, in the kernel and in the reference.
        np.testing.assert_array_equal(d[ok], c[ok], err_msg=f"{what}: {name} of a row that sees no poisoned key")
        np.testing.assert_array_equal(rd[ok], rc[ok], err_msg=f"{what}: reference {name}")
        if poison_kind != "garbage":
            # Rows that see one: a NaN K row makes the score NaN (K = inf too, through products of both
            # signs), so those rows are NaN wherever the reference's are.
            np.testing.assert_array_equal(np.isnan(d[~ok]), np.isnan(rd[~ok]), err_msg=f"{what}: {name} NaNs")
    if poison_kind == "nan":
        assert np.all(np.isnan(dirty[0][~ok])), f"{what}: a row that sees a NaN key must be NaN"
    # Hidden entries weigh exactly 0 in the poisoned call too, in every row that a visible NaN score did
    # not make NaN as a whole.
    hidden = ~_visible(q, k, v, kw) & ~np.isnan(dirty[1])[..., None]
    assert np.all(dirty[2][hidden] == 0), f"{what}: hidden keys must weigh exactly 0"
    return q, k, v, kw


@pytest.mark.parametrize("poison_kind", POISONS)
@pytest.mark.parametrize("l", [1, 2, 63, 64, 65, 97, 1025])
@pytest.mark.parametrize("hiding", HIDINGS)
def test_hidden_keys_tiled(isa, hiding, l, poison_kind):
    _check_hidden_poison("tiled", hiding, l, poison_kind, np.float32)


@pytest.mark.parametrize("poison_kind", POISONS)
@pytest.mark.parametrize("l", [63, 97])
@pytest.mark.parametrize("hiding", HIDINGS)
def test_hidden_keys_tiled_float64(isa, hiding, l, poison_kind):
    _check_hidden_poison("tiled", hiding, l, poison_kind, np.float64)


@pytest.mark.parametrize("poison_kind", POISONS)
@pytest.mark.parametrize("l", [1, 2, 97, 1025])
@pytest.mark.parametrize("hiding", HIDINGS)
def test_hidden_keys_rowwise(isa, hiding, l, poison_kind):
    _check_hidden_poison("rowwise", hiding, l, poison_kind, np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("poison_kind", POISONS)
@pytest.mark.parametrize("hiding", HIDINGS)
@pytest.mark.parametrize("path", ["split", "rowwise_split"])
def test_hidden_keys_key_split(isa, path, hiding, poison_kind, dtype):
    _check_hidden_poison(path, hiding, None, poison_kind, dtype)


@pytest.mark.parametrize("path, l, hidings", [("tiled", 97, HIDINGS), ("rowwise", 97, HIDINGS),
                                              ("rowwise_split", None, HIDINGS),
                                              ("split", None, ["mask_strided", "bias_neg_inf", "combined"])])
def test_clean_cases_match_reference(isa, path, l, hidings):
    # The clean calls the poisoned ones are compared with are right (the tolerance table).
    for hiding in hidings:
        q, k, v, kw, _ = _make_case(path, hiding, l, np.float32)
        check_attention(q, k, v, dtype=np.float32, what=f"{path}/{hiding}", **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path, lq, lk", [("tiled", 97, 97), ("rowwise", 2, 300), ("split", 40, 2100),
                                          ("rowwise_split", 1, 2500)])
def test_garbage_past_kv_lengths_is_as_if_removed(isa, dtype, path, lq, lk):
    # A KV cache from np.empty: everything past n is garbage. The result is that of the first n keys.
    rng = _rng("removed", path, lk, np.dtype(dtype).name)
    q = rng.standard_normal((1, 2, lq, 24)).astype(dtype)
    k = rng.standard_normal((1, 1, lk, 24)).astype(dtype)
    v = rng.standard_normal((1, 1, lk, 24)).astype(dtype)
    n = lk - lk // 3
    for x in (k, v):
        x[..., n:, :] = np.nan
        x[..., n + 1::3, :] = np.inf
    # Causal only where its alignment does not depend on Lk (top left, Lq = Lk).
    kw = {"causal": True} if lq == lk else {}
    got = attnfast.attention(q, k, v, kv_lengths=n, return_lse=True, return_weights=True, **kw)
    want = attnfast.attention(q, k[..., :n, :], v[..., :n, :], return_lse=True, return_weights=True, **kw)
    ref = reference.attention(q, k, v, kv_lengths=n, return_lse=True, **kw)
    assert_close_fixed(got[0], want[0], dtype, what="out")
    assert_close_fixed(got[1], want[1], dtype, what="lse")
    assert_close_fixed(got[2][..., :n], want[2], dtype, scale=1.0, what="weights")
    assert np.all(got[2][..., n:] == 0)
    assert_close_fixed(ref[0], want[0], dtype, what="reference out")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path, lq, lk", [("tiled", 64, 64), ("tiled", 97, 1025), ("rowwise", 3, 200),
                                          ("split", 40, 2100), ("rowwise_split", 1, 2500)])
def test_visible_nan_value_reaches_exactly_the_rows_that_see_it(isa, dtype, path, lq, lk):
    # The example: v[L-1] = NaN under a causal mask must reach the rows that see key L-1 (only
    # the last row, top-left aligned, Lq = Lk), in the columns that hold the NaN, and no other row; lse
    # and weights stay those of finite V.
    rng = _rng("visible", path, lq, lk)
    q = rng.standard_normal((1, 1, lq, 16)).astype(dtype)
    k = rng.standard_normal((1, 1, lk, 16)).astype(dtype)
    v = rng.standard_normal((1, 1, lk, 16)).astype(dtype)
    vp = v.copy()
    vp[0, 0, lk - 1, 3] = np.nan
    align = "top_left" if lq == lk else "bottom_right"
    for kw in ({"causal": True, "causal_align": align}, {"mask": np.tri(lq, lk, lk - lq if lq != lk else 0, dtype=bool)}):
        out, lse, w = attnfast.attention(q, k, vp, return_lse=True, return_weights=True, **kw)
        c_out, c_lse, c_w = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
        r_out = reference.attention(q, k, vp, **kw)
        sees = np.tri(lq, lk, lk - lq if lq != lk else 0, dtype=bool)[:, lk - 1]
        expected_nan = np.zeros(out.shape, bool)
        expected_nan[0, 0, sees, 3] = True
        np.testing.assert_array_equal(np.isnan(out), expected_nan)
        np.testing.assert_array_equal(np.isnan(r_out), expected_nan)
        np.testing.assert_array_equal(out[~expected_nan], c_out[~expected_nan])
        np.testing.assert_array_equal(lse, c_lse)
        np.testing.assert_array_equal(w, c_w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lq, lk", [(1, 70), (3, 130), (97, 150), (40, 2100)])
def test_neg_inf_bias_hides_a_nan_key_row(isa, dtype, lq, lk):
    # NaN + -inf is NaN: a -inf bias must hide the key all the same (a select, not an add), for every
    # bias layout: per key (row stride 0), full and contiguous, and strided.
    rng = _rng("bias", lq, lk)
    q = rng.standard_normal((2, lq, 8)).astype(dtype)
    k = rng.standard_normal((2, lk, 8)).astype(dtype)
    v = rng.standard_normal((2, lk, 8)).astype(dtype)
    kp, vp = k.copy(), v.copy()
    kp[:, 5] = np.nan
    vp[:, 5] = np.nan
    kp[:, lk - 1] = np.inf
    vp[:, lk - 1] = -np.inf
    full = rng.standard_normal((2, lq, lk)).astype(dtype)
    full[..., [5, lk - 1]] = -np.inf
    per_key = np.zeros((1, lk), dtype)
    per_key[..., [5, lk - 1]] = -np.inf
    strided = np.repeat(full, 2, axis=-1)[..., ::2]
    for bias in (full, per_key, strided):
        got = attnfast.attention(q, kp, vp, bias=bias, return_lse=True, return_weights=True)
        want = attnfast.attention(q, k, v, bias=bias, return_lse=True, return_weights=True)
        ref = reference.attention(q, kp, vp, bias=bias, return_lse=True, return_weights=True)
        for g, w_, r in zip(got, want, ref):
            np.testing.assert_array_equal(g, w_)
            assert_close_fixed(r, w_, dtype, scale=1.0 if r.ndim == 3 and r.shape[-1] == lk else None)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path, lq, lk", [("split", 40, 2100), ("rowwise_split", 1, 2500)])
def test_visible_nan_in_a_chunk_whose_weight_underflows(isa, dtype, path, lq, lk):
    # The key-split merges weigh a chunk by exp(m_chunk - m); where that underflows to 0 the chunk's
    # accumulator is still multiplied, never selected away, so a NaN V there reaches the row as it does
    # in one pass (and in the reference, where 0 * NaN is NaN too).
    rng = _rng("underflow", path, np.dtype(dtype).name)
    q = rng.standard_normal((1, 1, lq, 8)).astype(dtype)
    k = rng.standard_normal((1, 1, lk, 8)).astype(dtype)
    v = rng.standard_normal((1, 1, lk, 8)).astype(dtype)
    bias = np.zeros((1, lk), dtype)
    bias[:, :1024] = -1e4  # the first chunk(s): exp(-1e4) is 0 in both dtypes
    v[..., 7, 2] = np.nan
    out = attnfast.attention(q, k, v, bias=bias)
    ref = reference.attention(q, k, v, bias=bias)
    expected = np.zeros(out.shape, bool)
    expected[..., 2] = True
    np.testing.assert_array_equal(np.isnan(out), expected)
    np.testing.assert_array_equal(np.isnan(ref), expected)
