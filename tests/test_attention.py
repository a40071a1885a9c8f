"""The fused attention kernel against the float64 reference, on every SIMD target.

Each comparison goes through ``conftest.check_attention``: out, lse and weights are all
held to the 2x-naive tolerance, rows with no visible key must give out 0, weights 0 and
lse -inf exactly, and masked keys must get weight exactly 0.

Paths exercised (see cpp/src/kernels/attention*.h): the row-wise path (group * Lq <= 16),
its split-KV variant (B * Hk < 8 and Lk >= 2048), and the tiled path (more rows).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import attnfast
from attnfast import reference as ref
from conftest import (
    attention_parts,
    DTYPES,
    ISAS,
    METHODS,
    assert_close_fixed,
    check_attention,
    method_weights,
    ref_attention64,
    relayout,
    up,
)

# (Lq, Lk): row-wise with Lq < Lk, tiled with Lq > Lk, tiled with Lq < Lk.
SHAPES = [(5, 23), (37, 11), (40, 70)]


def qkv(rng, batch, lq, lk, d, dtype, kv_batch=None, dv=None):
    kv_batch = batch if kv_batch is None else kv_batch
    dv = d if dv is None else dv
    q = rng.standard_normal(batch + (lq, d)).astype(dtype)
    k = rng.standard_normal(kv_batch + (lk, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (lk, dv)).astype(dtype)
    return q, k, v


def mask_kwargs(rng, kind, batch, lq, lk, dtype):
    """Keyword arguments for one kind (or combination) of masking."""
    b, h = batch
    kinds = kind.split("+")
    kw = {}
    for part in kinds:
        if part == "none":
            pass
        elif part == "mask":
            kw["mask"] = rng.random((h, 1, lk)) < 0.6  # broadcast over batch and queries
        elif part == "mask_full":
            m = rng.random((b, h, lq, lk)) < 0.5
            m[0, 0, 0] = False  # a row with no visible key
            m[-1, -1, -1] = False
            kw["mask"] = m
        elif part == "bias":
            kw["bias"] = rng.standard_normal((h, 1, lk)).astype(dtype)  # stride-0 over b and queries
        elif part == "bias_inf":
            bias = rng.standard_normal((lq, lk)).astype(dtype)
            bias[:, 1] = -np.inf
            bias[min(1, lq - 1), :] = -np.inf  # a whole row hidden by -inf bias
            bias[:, 0] = 40.0  # a spread of ~40 logits
            kw["bias"] = bias
        elif part == "lengths":
            kw["kv_lengths"] = np.resize(np.array([0, lk, lk // 2, 1]), (b, h))  # incl. 0 and Lk
        elif part == "lengths_b":
            kw["kv_lengths"] = np.resize(np.array([lk, 0, min(3, lk)]), (b, 1))  # broadcast over heads
        elif part.startswith("causal_"):
            kw["causal"] = True
            kw["causal_align"] = part[len("causal_"):]
        elif part.startswith("align_"):
            kw["causal_align"] = part[len("align_"):]
        elif part.startswith("window"):
            spec = {"window": (3, 2), "windowL": (4, None), "windowR": (None, 1), "window0": (0, 0)}[part]
            kw["window"] = spec
        else:
            raise AssertionError(part)
    return kw


MASK_KINDS = [
    "none",
    "mask",
    "mask_full",
    "bias",
    "bias_inf",
    "lengths",
    "lengths_b",
    "causal_top_left",
    "causal_bottom_right",
    "window",
    "windowL",
    "windowR",
    "window0",
    "window+align_bottom_right",
    "causal_bottom_right+window",
    "causal_top_left+windowL",
    "mask+bias",
    "mask+bias+lengths+causal_bottom_right+window",
    "mask_full+bias_inf+lengths_b+causal_top_left+windowR",
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq, lk", SHAPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_attention_mask_kinds(isa, rng, dtype, lq, lk, kind):
    batch = (3, 2)
    q, k, v = qkv(rng, batch, lq, lk, 24, dtype)
    kw = mask_kwargs(rng, kind, batch, lq, lk, dtype)
    check_attention(q, k, v, dtype=dtype, what=kind, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("lq, lk", [(1, 19), (6, 33), (33, 65)])
@pytest.mark.parametrize("masks", ["none", "causal_bottom_right+mask+bias"])
def test_attention_every_method(isa, rng, dtype, method, lq, lk, masks):
    batch = (2, 2)
    d, dk = 20, (20 if method in ("dot", "scaled_dot") else 13)
    q = rng.standard_normal(batch + (lq, d)).astype(dtype)
    k = rng.standard_normal(batch + (lk, dk)).astype(dtype)
    v = rng.standard_normal(batch + (lk, 17)).astype(dtype)
    kw = method_weights(rng, method, d, dk, dtype, hidden=7)
    kw.update(mask_kwargs(rng, masks, batch, lq, lk, dtype))
    check_attention(q, k, v, dtype=dtype, method=method, what=method, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 3, 16, 17, 65, 111])
@pytest.mark.parametrize("lq, lk", [(1, 97), (17, 2), (97, 1), (2, 1025)])
def test_attention_awkward_sizes(isa, rng, dtype, d, lq, lk):
    q, k, v = qkv(rng, (2,), lq, lk, d, dtype, dv=max(1, (d * 3) % 70))
    check_attention(q, k, v, dtype=dtype, causal=True, causal_align="bottom_right")
    check_attention(q, k, v, dtype=dtype)


MASK_LAYOUTS = ["C", "transposed", "negative", "every_other_col", "same_for_all_queries", "same_for_all_keys"]


def mask_layout(a, layout):
    """The (Lq, Lk) array a in one of conftest's memory layouts, or broadcast over queries or keys."""
    if layout == "same_for_all_queries":
        return np.broadcast_to(a[:1], a.shape)
    if layout == "same_for_all_keys":
        return np.broadcast_to(a[:, :1], a.shape)
    return relayout(a, layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("lq, lk, hk", [(40, 1500, 2), (50, 1100, 1)])
def test_attention_key_split_of_few_long_query_blocks(isa, rng, dtype, kind, lq, lk, hk):
    # Few query blocks (1 batch item, 2 heads, 1-2 blocks of rows) and >= 1024 keys: the tiled kernel
    # splits the keys into chunks of 512 and merges them by log-sum-exp; every mask kind, GQA (hk = 1),
    # lse and weights against the reference.
    q = rng.standard_normal((1, 2, lq, 24)).astype(dtype)
    k = rng.standard_normal((1, hk, lk, 24)).astype(dtype) * 2
    v = rng.standard_normal((1, hk, lk, 20)).astype(dtype)
    kw = mask_kwargs(rng, kind, (1, 2), lq, lk, dtype)
    check_attention(q, k, v, dtype=dtype, what=f"split {kind}", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("lq, lk", [(1, 300), (3, 70), (97, 150)])
def test_attention_mask_and_bias_layouts(isa, rng, dtype, layout, lq, lk):
    # Every memory layout of a bool mask and a float bias, on the row-wise (Lq <= 16) and tiled paths:
    # the tiled kernel has vector paths for query-broadcast and contiguous rows, element loops otherwise.
    q, k, v = qkv(rng, (2,), lq, lk, 16, dtype)
    mask = mask_layout(rng.random((lq, lk)) < 0.7, layout)
    bias = mask_layout(rng.standard_normal((lq, lk)).astype(dtype) * 3, layout)
    check_attention(q, k, v, dtype=dtype, mask=mask, what=f"mask {layout}")
    check_attention(q, k, v, dtype=dtype, bias=bias, what=f"bias {layout}")
    check_attention(q, k, v, dtype=dtype, mask=mask, bias=bias, causal=True, what=f"both {layout}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq, lk, hq, hk", [(97, 300, 2, 2), (1, 600, 4, 2), (3, 4097, 1, 1)])
def test_attention_skips_key_tiles_the_bool_mask_hides(isa, rng, dtype, lq, lk, hq, hk):
    # Key tiles that a bool mask hides from every row are skipped: the first tile, middle tiles, the
    # last one, every tile of one batch item (out 0, lse -inf), a whole split-KV chunk (Lk = 4097), and
    # the upper half of a triangular mask. The tiled path (Lq = 97), row-wise GQA (Lq = 1, group 2).
    q = rng.standard_normal((3, hq, lq, 16)).astype(dtype)
    k = rng.standard_normal((3, hk, lk, 16)).astype(dtype)
    v = rng.standard_normal((3, hk, lk, 8)).astype(dtype)
    keys = np.ones((3, 1, 1, lk), bool)
    keys[0, ..., : lk // 3] = False  # leading tiles
    keys[0, ..., lk // 2: lk - 5] = False  # middle and trailing tiles, a few keys left at the end
    keys[1] = False  # nothing visible for this item
    check_attention(q, k, v, dtype=dtype, mask=keys, what="key padding mask")
    tri = np.broadcast_to(np.tri(lq, lk, lk - lq, dtype=bool), (3, 1, lq, lk))
    check_attention(q, k, v, dtype=dtype, mask=tri, what="triangular bool mask")
    check_attention(q, k, v, dtype=dtype, mask=tri & keys, bias=np.zeros((lq, lk), dtype), what="both + bias")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq, lk", [(1, 70), (5, 70), (97, 150)])
def test_attention_infinite_bias_on_masked_keys_stays_masked(isa, rng, dtype, lq, lk):
    # A key hidden by the causal range, kv_lengths or the bool mask is hidden whatever its bias: +inf
    # there must not turn the row into NaN (-inf + inf), and -inf on a visible key just hides it.
    q, k, v = qkv(rng, (2,), lq, lk, 16, dtype)
    mask = rng.random((lq, lk)) < 0.8
    bias = rng.standard_normal((lq, lk)).astype(dtype)
    bias[~mask] = np.inf
    bias[np.triu_indices(lq, 1, lk)] = np.inf  # above the (top-left) causal diagonal
    bias[:, lk - 3:] = np.inf  # past the kv_lengths below
    bias[:, 0] = -np.inf
    out, _, _ = check_attention(q, k, v, dtype=dtype, mask=mask, bias=bias, causal=True,
                                kv_lengths=np.array([lk - 3, lk - 3]), what="inf bias on masked keys")
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dv", [129, 200, 257, 300])
@pytest.mark.parametrize("hq, lq", [(1, 1), (2, 3)])
def test_attention_rowwise_wide_value_rows(isa, rng, dtype, dv, hq, lq):
    # Decode-shaped calls with value rows wider than the row-wise kernel's register block (128 float32
    # lanes with AVX2) accumulate in several passes, the last one partial; 300 keys span three key
    # tiles, so the accumulator is rescaled between them, and the lengths cut one item's keys mid-tile.
    q = rng.standard_normal((2, hq, lq, 24)).astype(dtype)
    k = rng.standard_normal((2, 1, 300, 24)).astype(dtype) * 3
    v = rng.standard_normal((2, 1, 300, dv)).astype(dtype)
    check_attention(q, k, v, dtype=dtype, what=f"dv {dv}")
    check_attention(q, k, v, dtype=dtype, kv_lengths=np.array([[300], [170]]), what=f"dv {dv} lengths")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hk", [(8, 2), (6, 3), (4, 1), (8, 1), (1, 4)])
@pytest.mark.parametrize("lq", [1, 3, 33])
@pytest.mark.parametrize("masks", ["none", "causal_bottom_right+lengths_b", "mask+window"])
def test_attention_gqa_mqa(isa, rng, dtype, hq, hk, lq, masks):
    lk = 41
    q = rng.standard_normal((2, hq, lq, 16)).astype(dtype)
    k = rng.standard_normal((2, hk, lk, 16)).astype(dtype)
    v = rng.standard_normal((2, hk, lk, 12)).astype(dtype)
    kw = mask_kwargs(rng, masks, (2, max(hq, hk)), lq, lk, dtype)
    out, _, _ = check_attention(q, k, v, dtype=dtype, what=f"gqa {hq}/{hk}", **kw)
    assert out.shape == (2, max(hq, hk), lq, 12)
    if hk > 1 and hq % hk == 0 and masks == "none":
        # Query head h reads kv head h // (Hq / Hk): same as repeating the kv heads.
        g = hq // hk
        rep = attnfast.attention(q, np.repeat(k, g, axis=1), np.repeat(v, g, axis=1))
        assert_close_fixed(out, rep.astype(np.float64), dtype, what="gqa vs repeated heads")


ATTENTION_LAYOUTS = ["C", "F", "transposed", "negative", "every_other_row"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ATTENTION_LAYOUTS)
@pytest.mark.parametrize("lq", [3, 29])
def test_attention_strided_inputs(isa, rng, dtype, layout, lq):
    q, k, v = qkv(rng, (2, 2), lq, 37, 24, dtype, dv=19)
    expected = attnfast.attention(q, k, v, causal=True, causal_align="bottom_right")
    qs, ks, vs = relayout(q, layout), relayout(k, layout), relayout(v, layout)
    assert np.array_equal(qs, q) and np.array_equal(ks, k) and np.array_equal(vs, v)
    if layout != "C" and lq > 3:
        assert not (qs.flags.c_contiguous and ks.flags.c_contiguous and vs.flags.c_contiguous)
    out, _, _ = check_attention(qs, ks, vs, dtype=dtype, causal=True, causal_align="bottom_right")
    # The layout must not change the numbers at all (a copy, if any, is exact).
    assert np.array_equal(out, expected)


PLAIN_CALLS = [
    ((), 1, 50, 16, {}),
    ((3, 2), 1, 50, 24, {}),
    ((2,), 37, 70, 17, {"causal": True}),
    ((2, 1), 6, 9, 8, {"causal": True, "causal_align": "bottom_right"}),
    ((1,), 5, 3, 4, {"method": "dot"}),
    ((2,), 4, 6, 5, {"method": "dot", "scale": 0.3}),
    ((4, 1), 1, 33, 8, {"out": "fresh"}),
    ((2,), 30, 20, 8, {"out": "fresh", "causal": True}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, lq, lk, d, kwargs", PLAIN_CALLS)
def test_attention_plain_call_path_matches_general_path(isa, rng, monkeypatch, dtype, batch, lq, lk, d, kwargs):
    # Plain calls (same-dtype ndarrays, one batch shape, dot scores, no mask/out/lse) skip the general
    # validation; they must give bitwise what the general path gives, which is held to the reference.
    q, k, v = qkv(rng, batch, lq, lk, d, dtype, dv=d + 3)
    out = None
    if kwargs.get("out") == "fresh":
        out = np.full(batch + (lq, d + 3), np.nan, dtype)
        kwargs = dict(kwargs, out=out)
    general, _, _ = check_attention(q, k, v, dtype=dtype, **kwargs)
    general = general.copy()
    with monkeypatch.context() as m:
        m.setattr(attnfast._api._inputs, "check_attention", None)  # the plain path must not need it
        plain = attnfast.attention(q, k, v, **kwargs)
    assert plain.dtype == general.dtype and plain.shape == general.shape
    assert np.array_equal(plain, general)
    if out is not None:
        assert plain is out


def test_attention_plain_call_path_leaves_unusual_calls_to_validation(rng):
    # Mixed dtypes, lists, batch broadcasting and bad shapes are not plain: they are promoted,
    # converted, broadcast or rejected with the general path's message.
    q, k, v = qkv(rng, (2,), 3, 5, 4, np.float32)
    assert attnfast.attention(q, k.astype(np.float64), v).dtype == np.float64
    assert np.array_equal(attnfast.attention(q.tolist(), k, v), attnfast.attention(q.astype(np.float64), k, v))
    assert attnfast.attention(q[None], k, v).shape == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="same number of keys"):
        attnfast.attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="scale must be finite"):
        attnfast.attention(q, k, v, scale=float("inf"))
    # out= that is strided, of another dtype or shape, or overlapping an input: general path.
    expected = attnfast.attention(q, k, v)
    strided = np.zeros((2, 3, 8), np.float32)[..., ::2]
    assert attnfast.attention(q, k, v, out=strided) is strided and np.array_equal(strided, expected)
    wide = np.zeros((2, 3, 4))  # another storage dtype: the float32 result, converted exactly
    assert attnfast.attention(q, k, v, out=wide) is wide and np.array_equal(wide, expected)
    with pytest.raises(TypeError, match="out has dtype int32"):
        attnfast.attention(q, k, v, out=np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ValueError, match="out has shape"):
        attnfast.attention(q, k, v, out=np.zeros((2, 4, 4), np.float32))
    q2 = q.copy()
    assert np.array_equal(attnfast.attention(q2, k, v, out=q2), expected)  # out is q itself
    readonly = np.zeros((2, 3, 4), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        attnfast.attention(q, k, v, out=readonly)
    with pytest.raises(TypeError, match="out must be a NumPy ndarray"):
        attnfast.attention(q, k, v, out=[[0.0] * 4] * 3)
    # Inputs whose rows are not unit-stride, a subclass, an integer scale, a non-bool causal: general path.
    qt = np.ascontiguousarray(np.swapaxes(q, -1, -2)).swapaxes(-1, -2)
    assert np.array_equal(attnfast.attention(qt, k, v), expected)
    class Sub(np.ndarray):
        pass

    assert np.array_equal(attnfast.attention(q.view(Sub), k, v), expected)
    assert np.array_equal(attnfast.attention(q, k, v, method="dot", scale=1),
                          attnfast.attention(q, k, v, method="dot", scale=1.0))
    assert np.array_equal(attnfast.attention(q, k, v, causal=np.True_), attnfast.attention(q, k, v, causal=True))
    with pytest.raises(ValueError, match="unknown causal_align"):
        attnfast.attention(q, k, v, causal=True, causal_align="top-left")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [2, 21])
def test_attention_broadcast_inputs(isa, rng, dtype, lq):
    lk, d = 30, 16
    # k/v with a stride-0 batch axis; q with fewer batch axes; mask and bias as broadcast views.
    k = np.broadcast_to(rng.standard_normal((1, 3, lk, d)).astype(dtype), (4, 3, lk, d))
    v = np.broadcast_to(rng.standard_normal((1, 3, lk, d)).astype(dtype), (4, 3, lk, d))
    q = rng.standard_normal((3, lq, d)).astype(dtype)
    mask = np.broadcast_to(rng.random((1, 1, 1, lk)) < 0.7, (4, 3, lq, lk))
    bias = np.broadcast_to(rng.standard_normal((lk,)).astype(dtype), (4, 3, lq, lk))
    assert k.strides[0] == 0 and mask.strides[2] == 0 and bias.strides[0] == 0
    out, _, _ = check_attention(q, k, v, dtype=dtype, mask=mask, bias=bias)
    assert out.shape == (4, 3, lq, d)
    # k/v with fewer batch axes than q; q broadcast (stride 0) over the leading batch axis.
    q_b = np.broadcast_to(rng.standard_normal((1, 3, lq, d)).astype(dtype), (2, 3, lq, d))
    k2, v2 = k[0], v[0]
    out2, _, _ = check_attention(q_b, k2, v2, dtype=dtype, causal=True)
    assert np.array_equal(out2[0], out2[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_mixed_precision_promotes(isa, rng, dtype):
    q, k, v = qkv(rng, (2,), 5, 9, 8, np.float32)
    out = attnfast.attention(q, k.astype(np.float64), v)
    assert out.dtype == np.float64
    check_attention(q, k.astype(np.float64), v, dtype=np.float64)


# --------------------------------------------------------------------------
# return_lse / return_weights / empty rows
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [4, 30])
def test_attention_return_flags_and_order(isa, rng, dtype, lq):
    q, k, v = qkv(rng, (2, 2), lq, 19, 16, dtype)
    kw = {"causal": True, "causal_align": "bottom_right", "kv_lengths": np.array([[19, 0], [7, 19]])}
    full_out, full_lse, full_w = check_attention(q, k, v, dtype=dtype, **kw)
    plain = attnfast.attention(q, k, v, **kw)
    assert isinstance(plain, np.ndarray)
    o1, lse1 = attnfast.attention(q, k, v, return_lse=True, **kw)
    o2, w2 = attnfast.attention(q, k, v, return_weights=True, **kw)
    for o in (plain, o1, o2):
        assert o.shape == (2, 2, lq, 16) and o.dtype == np.dtype(dtype)
        assert_close_fixed(o, full_out.astype(np.float64), dtype, what="out across return flags")
    assert lse1.shape == (2, 2, lq) and w2.shape == (2, 2, lq, 19)
    assert_close_fixed(lse1, full_lse.astype(np.float64), dtype, what="lse")
    assert_close_fixed(w2, full_w.astype(np.float64), dtype, scale=1.0, what="weights")
    # The lse is the log-sum-exp of the scores and the weights are exp(s - lse).
    assert np.all(full_lse[0, 1] == -np.inf) and np.all(plain[0, 1] == 0) and np.all(full_w[0, 1] == 0)
    sums = full_w.sum(-1)
    visible = np.isfinite(full_lse)
    np.testing.assert_allclose(sums[visible], 1.0, atol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [3, 20])
def test_attention_rows_without_visible_keys(isa, rng, dtype, lq):
    q, k, v = qkv(rng, (2, 2), lq, 12, 8, dtype)
    mask = np.ones((2, 2, lq, 12), bool)
    mask[0, 1, 1] = False
    bias = np.zeros((lq, 12), dtype)
    bias[2] = -np.inf
    kw = {"mask": mask, "bias": bias, "kv_lengths": np.array([12, 0])[:, None]}
    out, lse, w = check_attention(q, k, v, dtype=dtype, **kw)
    empty = np.zeros((2, 2, lq), bool)
    empty[0, 1, 1] = True
    empty[:, :, 2] = True
    empty[1] = True
    assert np.array_equal(lse == -np.inf, empty)
    assert np.all(out[empty] == 0) and np.all(w[empty] == 0)
    assert not np.isnan(out).any() and not np.isnan(w).any()
    # A window that misses every key: causal top-left with Lq > Lk and right window 0 plus left 0
    # leaves only the diagonal, which does not exist for rows i >= Lk.
    out2, lse2, _ = check_attention(q, k[..., :2, :], v[..., :2, :], dtype=dtype, window=(0, 0))
    assert np.all(lse2[..., 2:] == -np.inf) and np.all(out2[..., 2:, :] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_nan_in_one_query_row_stays_in_that_row(isa, rng, dtype):
    for lq in (4, 24):
        q, k, v = qkv(rng, (2, 2), lq, 33, 16, dtype)
        q[1, 0, 2, 5] = np.nan
        out, lse, w = check_attention(q, k, v, dtype=dtype)
        assert np.isnan(out[1, 0, 2]).all() and np.isnan(lse[1, 0, 2])
        nan = np.isnan(out)
        nan[1, 0, 2] = False
        assert not nan.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_extreme_bias(isa, rng, dtype):
    q, k, v = qkv(rng, (2,), 6, 40, 8, dtype)
    bias = np.zeros((6, 40), dtype)
    bias[0] = 1e30
    bias[1] = -1e30
    bias[2, 7] = 1e30
    bias[3] = np.linspace(-1e4, 0, 40)
    bias[4, ::3] = -np.inf
    out, lse, w = check_attention(q, k, v, dtype=dtype, bias=bias)
    assert np.isfinite(out).all() and np.isfinite(w).all()
    assert np.all(w[:, 2, 7] == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "qshape, kshape", [((0, 8), (5, 8)), ((4, 8), (0, 8)), ((0, 2, 3, 8), (0, 2, 5, 8)), ((2, 3, 8), (2, 0, 8))]
)
def test_attention_zero_size(isa, dtype, qshape, kshape):
    q = np.ones(qshape, dtype)
    k = np.ones(kshape, dtype)
    v = np.ones(kshape[:-1] + (6,), dtype)
    out, lse = attnfast.attention(q, k, v, return_lse=True)
    r_out, r_lse = ref.attention(q, k, v, return_lse=True)
    assert out.shape == r_out.shape and out.dtype == np.dtype(dtype)
    assert np.array_equal(out, r_out) and np.array_equal(lse, r_lse)
    if kshape[-2] == 0 and out.size:
        assert np.all(out == 0) and np.all(lse == -np.inf)


def test_attention_accepts_lists(isa):
    q = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]
    k = [[1.0, 0.0], [0.0, 1.0]]
    v = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    out = attnfast.attention(q, k, v, mask=[[True, False], [True, True], [True, True]])
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out[0], [1.0, 2.0, 3.0])
    check_attention(np.array(q), np.array(k), np.array(v), dtype=np.float64)


# --------------------------------------------------------------------------
# out=
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [2, 19])
def test_attention_out_is_written_and_returned(isa, rng, dtype, lq):
    q, k, v = qkv(rng, (2, 3), lq, 27, 16, dtype, dv=10)
    expected = attnfast.attention(q, k, v, causal=True)
    out = np.full((2, 3, lq, 10), 7.0, dtype)
    got = attnfast.attention(q, k, v, causal=True, out=out)
    assert got is out and np.array_equal(out, expected)
    # A strided out (every other column) and an out together with lse/weights.
    big = np.full((2, 3, lq, 20), 7.0, dtype)
    view = big[..., ::2]
    got2, lse, w = attnfast.attention(q, k, v, causal=True, out=view, return_lse=True, return_weights=True)
    assert got2 is view and np.array_equal(view, expected)
    assert np.all(big[..., 1::2] == 7.0)  # the gaps are untouched
    # Every other row: the kernel writes straight into it with that row stride.
    tall = np.full((2, 3, 2 * lq, 10), 7.0, dtype)
    got3 = attnfast.attention(q, k, v, causal=True, out=tall[..., ::2, :])
    assert np.array_equal(got3, expected) and np.all(tall[..., 1::2, :] == 7.0)
    r_out, r_lse, r_w = ref_attention64(q, k, v, causal=True)
    assert_close_fixed(lse, r_lse, dtype, what="lse with out=")
    # out may alias an input (here a slice of v): the result is as if the inputs were read first.
    vv = v.copy()
    alias = attnfast.attention(q, k, vv, out=vv[..., :lq, :])
    assert alias.base is vv
    assert_close_fixed(alias, ref_attention64(q, k, v)[0], dtype, scale=float(np.abs(v).max()),
                       what="out aliasing v")
    assert np.array_equal(alias, attnfast.attention(q, k, v))


def _bad_calls(rng, dtype, lq, lk):
    q, k, v = qkv(rng, (2, 2), lq, lk, 8, dtype)
    yield "mask shape", dict(q=q, k=k, v=v, mask=np.ones((3, lq, lk), bool)), ValueError
    yield "kv_lengths range", dict(q=q, k=k, v=v, kv_lengths=np.array([lk + 1, 1])), ValueError
    yield "negative window", dict(q=q, k=k, v=v, window=(-1, 2)), ValueError
    yield "causal_align", dict(q=q, k=k, v=v, causal=True, causal_align="diagonal"), ValueError
    yield "method weight", dict(q=q, k=k, v=v, method="general", w=np.ones((3, 3), dtype)), ValueError
    yield "dtype", dict(q=q.astype(np.int64), k=k, v=v), TypeError
    yield "gqa", dict(q=q, k=k[:, :1].repeat(3, axis=1), v=v[:, :1].repeat(3, axis=1)), ValueError


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [2, 19])
def test_attention_out_untouched_when_the_call_raises(isa, rng, dtype, lq):
    for what, kw, exc in _bad_calls(rng, dtype, lq, 13):
        out = rng.standard_normal((2, 2, lq, 8)).astype(dtype)
        before = out.tobytes()
        with pytest.raises(exc):
            attnfast.attention(**kw, out=out)
        assert out.tobytes() == before, f"out was written by a failing call ({what})"
        with pytest.raises(exc):
            attnfast.attention(**kw, out=out, return_lse=True, return_weights=True)
        assert out.tobytes() == before, f"out was written by a failing call ({what}, with lse/weights)"
    # An out of the wrong dtype / read-only is itself left alone.
    q, k, v = qkv(rng, (2, 2), lq, 13, 8, dtype)
    bad = np.ones((2, 2, lq, 8), np.int32)
    with pytest.raises(TypeError):
        attnfast.attention(q, k, v, out=bad)
    assert np.all(bad == 1)
    ro = np.ones((2, 2, lq, 8), dtype)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        attnfast.attention(q, k, v, out=ro)
    assert np.all(ro == 1)


# --------------------------------------------------------------------------
# Decode shapes, split-KV, tiled path
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "qshape, kvshape, lq, lk, masks",
    [
        ((16, 1), (16, 1), 1, 50, "none"),  # one decoder step, many sequences
        ((1, 8), (1, 2), 3, 301, "causal_bottom_right"),  # Lq=3 with GQA group 4
        ((2, 8), (2, 2), 3, 129, "lengths_b"),
        ((1, 2), (1, 2), 1, 4097, "none"),  # split-KV: B*Hk = 2 < 8, Lk >= 2048
        ((1, 4), (1, 1), 2, 4097, "causal_bottom_right+window"),  # split-KV + MQA + window
        ((3, 2), (3, 2), 1, 2048, "lengths"),  # split-KV with kv_lengths 0 / Lk / Lk//2 / 1
        ((1, 2), (1, 2), 4, 3000, "mask+bias"),
    ],
)
def test_attention_decode_shapes(isa, rng, dtype, qshape, kvshape, lq, lk, masks):
    d = 64
    q = rng.standard_normal(qshape + (lq, d)).astype(dtype)
    k = rng.standard_normal(kvshape + (lk, d)).astype(dtype)
    v = rng.standard_normal(kvshape + (lk, d)).astype(dtype)
    kw = mask_kwargs(rng, masks, qshape, lq, lk, dtype)
    check_attention(q, k, v, dtype=dtype, what=f"decode {qshape} {lq}x{lk} {masks}", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, lq, lk, d, masks",
    [
        ((2, 2), 17, 17, 64, "causal_top_left"),
        ((1, 2), 65, 97, 64, "causal_bottom_right"),
        ((1, 2), 97, 65, 63, "causal_bottom_right+window"),
        ((2, 1), 129, 300, 32, "windowL+mask"),
        ((1, 1), 300, 129, 97, "bias+lengths_b"),
        ((1, 1), 1025, 1025, 64, "causal_top_left"),
    ],
)
def test_attention_tiled_path(isa, rng, dtype, batch, lq, lk, d, masks):
    q, k, v = qkv(rng, batch, lq, lk, d, dtype)
    kw = mask_kwargs(rng, masks, batch, lq, lk, dtype)
    check_attention(q, k, v, dtype=dtype, what=f"tiled {batch} {lq}x{lk} {masks}", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("masks", ["none", "causal_bottom_right+lengths"])
def test_attention_runs_of_query_blocks(isa, threads, rng, dtype, n_threads, masks):
    """Many query blocks and small K, V: each task is a run of consecutive blocks of one item (QueryRuns
    in attention_tiled.h), 5 blocks a run on one thread, 2 on two and 1 on three, claimed last run
    first, the last run partial and the last block 17 rows; the last `threads` items go one block per
    task, and a run's last block claims the next task early. Every block must be computed once, in its
    place."""
    batch, lq, lk = (2, 4), 1025, 100  # 22 blocks of 48 rows per item, 176 blocks in all
    attnfast.set_num_threads(n_threads)
    q, k, v = qkv(rng, batch, lq, lk, 24, dtype)
    kw = mask_kwargs(rng, masks, batch, lq, lk, dtype)
    check_attention(q, k, v, dtype=dtype, what=f"runs of query blocks, {n_threads} threads {masks}", **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_row_max_growing_across_key_tiles(isa, rng, dtype):
    """The tiled kernel moves a row's reference max only when a key tile exceeds it by more than a
    margin (e^5): rows whose max creeps up stay below it, rows that jump past it rescale, and two
    jumps that are each under the margin but not together must rescale at the second."""
    lq, lk = 50, 300  # tiled path, five key tiles of 64
    q, k, v = qkv(rng, (2,), lq, lk, 16, dtype)
    q *= 0.1
    j = np.arange(lk, dtype=np.float64)
    patterns = [
        0.01 * j,  # creeps up: never past the margin
        0.05 * j,  # 3.2 per tile: past it every other tile
        1.0 * j,  # 64 per tile: every tile rescales, earlier tiles underflow to 0
        -1.0 * j,  # the first tile holds the max
        4.9 * (j >= 128) + 4.9 * (j >= 192),  # two jumps under the margin, together over it
        4.99 * (j >= 64) + 1e-3 * j,  # just under the margin, then creeping
        30.0 * np.sin(j / 7.0),  # up and down
    ]
    bias = np.stack([patterns[i % len(patterns)] for i in range(lq)]).astype(dtype)
    check_attention(q, k, v, dtype=dtype, bias=bias, what="growing row max")


# --------------------------------------------------------------------------
# merge_states
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cuts", [(20,), (1,), (7, 33), (0, 50), (16, 17)])
@pytest.mark.parametrize("lq", [3, 25])
def test_merge_states_of_chunks_equals_whole(isa, rng, dtype, cuts, lq):
    lk = 50
    q, k, v = qkv(rng, (2, 2), lq, lk, 16, dtype)
    # An explicit causal (bottom-right) mask, sliced with the keys, keeps the visibility of each key.
    mask = np.tril(np.ones((lq, lk), bool), k=lk - lq)
    mask = np.broadcast_to(mask, (2, 2, lq, lk)).copy()
    mask[1, 1, 0] = False  # a row empty everywhere
    edges = (0,) + cuts + (lk,)
    outs, lses = attention_parts(q, k, v, mask, edges)
    merged, lse = attnfast.merge_states(outs, lses)
    r_out, r_lse, _ = ref_attention64(q, k, v, mask=mask)
    assert merged.dtype == np.dtype(dtype) and lse.dtype == np.dtype(dtype)
    assert_close_fixed(merged, r_out, dtype, scale=float(np.abs(v).max()), what="merged out")
    assert_close_fixed(lse, r_lse, dtype, what="merged lse")
    assert np.all(merged[1, 1, 0] == 0) and lse[1, 1, 0] == -np.inf
    m_ref, l_ref = ref.merge_states([up(o) for o in outs], [up(s) for s in lses])
    assert_close_fixed(merged, m_ref, dtype, scale=float(np.abs(v).max()), what="merge vs reference merge")


# --------------------------------------------------------------------------
# Threads: bitwise determinism, threadpoolctl
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "qshape, kvshape, lq, lk, kw",
    [
        ((1, 2), (1, 2), 1, 4097, {}),  # split-KV decode
        ((1, 8), (1, 2), 3, 2500, {"causal": True, "causal_align": "bottom_right"}),  # split-KV, GQA
        ((2, 4), (2, 4), 129, 257, {"causal": True}),  # causal tiled
        ((2, 4), (2, 4), 200, 150, {"causal": True, "causal_align": "bottom_right", "window": (40, 3)}),
        ((16, 2), (16, 2), 1, 300, {}),  # many small decode items
        ((1, 1), (1, 1), 40, 3000, {}),  # one query block, keys split in chunks (tiled)
        ((1, 2), (1, 1), 70, 2100, {"causal": True, "causal_align": "bottom_right", "window": (900, 0)}),
        ((2, 4), (2, 2), 1025, 100, {"causal": True}),  # runs of query blocks: 5 a run on 1 thread, 2 on 2
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bitwise_identical_across_thread_counts(isa, threads, rng, qshape, kvshape, lq, lk, kw, dtype):
    q = rng.standard_normal(qshape + (lq, 64)).astype(dtype)
    k = rng.standard_normal(kvshape + (lk, 64)).astype(dtype)
    v = rng.standard_normal(kvshape + (lk, 64)).astype(dtype)
    results = {}
    for n in (1, 2):
        attnfast.set_num_threads(n)
        assert attnfast.get_num_threads() == n
        results[n] = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
        # Run to run too.
        again = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
        for a, b in zip(results[n], again):
            assert np.array_equal(a, b, equal_nan=True)
    for a, b in zip(results[1], results[2]):
        assert a.tobytes() == b.tobytes()
    # The stage kernels too.
    w = results[1][2]
    v_q_heads = np.repeat(v, qshape[1] // kvshape[1], axis=1)
    stages = {}
    for n in (1, 2):
        attnfast.set_num_threads(n)
        stages[n] = (attnfast.scores(q, q), attnfast.softmax(w), attnfast.aggregate(w, v_q_heads))
    for a, b in zip(stages[1], stages[2]):
        assert a.tobytes() == b.tobytes()


def test_set_num_threads_round_trip(threads):
    default = attnfast.get_num_threads()
    assert default >= 1
    attnfast.set_num_threads(1)
    assert attnfast.get_num_threads() == 1 and attnfast.capabilities()["threads"] == 1
    attnfast.set_num_threads(0)
    assert attnfast.get_num_threads() == default


def test_threadpoolctl_limits_attnfast_threads(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="threadpoolctl is in the test extra")
    attnfast.set_num_threads(0)
    before = attnfast.get_num_threads()
    with threadpoolctl.threadpool_limits(1):
        assert attnfast.get_num_threads() == 1
        q = np.ones((2, 4, 33, 16))
        attnfast.attention(q, q, q)  # still works under the limit
    assert attnfast.get_num_threads() == before


# --------------------------------------------------------------------------
# ATTNFAST_ISA
# --------------------------------------------------------------------------


_PROBE = """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import attnfast
    import numpy as np
    q = np.random.default_rng(0).standard_normal((2, 5, 8))
    out = attnfast.attention(q, q, q)
    ok = bool(np.allclose(out, attnfast.reference.attention(q, q, q)))
print(json.dumps({"caps": attnfast.capabilities(), "ok": ok,
                  "warnings": [[w.category.__name__, str(w.message)] for w in caught]}))
"""


def _probe(value):
    env = dict(os.environ)
    env["ATTNFAST_ISA"] = value
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.path.dirname(os.path.dirname(attnfast.__file__)),
                                                    env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("target", ISAS)
def test_env_forces_each_usable_isa(target):
    res = _probe(target)
    assert res["caps"]["isa"] == target
    assert res["ok"]
    assert not [w for w in res["warnings"] if w[0] == "RuntimeWarning"]


@pytest.mark.parametrize("value", ["bogus", "avx512"])
def test_env_unusable_isa_warns_and_falls_back(value):
    if value in ISAS:
        pytest.skip(f"{value} is usable on this CPU, so it cannot serve as the unusable value")
    res = _probe(value)
    assert res["caps"]["isa"] == ISAS[0]  # the best usable target
    assert res["ok"]
    runtime = [msg for cat, msg in res["warnings"] if cat == "RuntimeWarning"]
    assert len(runtime) == 1 and f"ATTNFAST_ISA={value}" in runtime[0] and ISAS[0] in runtime[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [1, 40])
def test_additive_with_pre_projected_keys_and_queries(isa, rng, dtype, lq):
    # A decoding loop projects the encoder states once (w_k=None then means k is W_k k already);
    # every combination of given / omitted projections must give the same attention.
    q, k, v = qkv(rng, (3,), lq, 50, 16, dtype)
    w_q = rng.standard_normal((24, 16)) / 4
    w_k = rng.standard_normal((24, 16)) / 4
    extra = dict(v_a=rng.standard_normal(24), score_bias=rng.standard_normal(24), kv_lengths=np.array([50, 7, 0]))
    full = attnfast.attention(q, k, v, method="additive", w_q=w_q, w_k=w_k, **extra)
    qp = (q.astype(np.float64) @ w_q.T).astype(dtype)
    kp = (k.astype(np.float64) @ w_k.T).astype(dtype)
    ref_full = ref.attention(q, k, v, method="additive", w_q=w_q, w_k=w_k, **extra)
    for kwargs, qq, kk in [({"w_q": w_q}, q, kp), ({"w_k": w_k}, qp, k), ({}, qp, kp)]:
        got = attnfast.attention(qq, kk, v, method="additive", **kwargs, **extra)
        expected = ref.attention(qq, kk, v, method="additive", **kwargs, **extra)
        assert_close_fixed(got, expected.astype(np.float64), dtype, scale=float(np.abs(v).max()))
        assert_close_fixed(got, ref_full.astype(np.float64), dtype, scale=float(np.abs(v).max()))
    assert np.all(full[2] == 0)  # kv_lengths 0: no visible key
