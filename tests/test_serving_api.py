"""attnfast.attention / attention_backward with issue 18's serving arguments, end to end through the
compiled kernels on every target, against the float64 reference (tolerance table in conftest.py):
softcap, ALiBi and sinks (alone, together, with masks), the kv_lengths-aligned bottom_right diagonal,
paged caches (shuffled and shared blocks, awkward block sizes), int8 caches (contiguous and paged),
and the backward's new terms (softcap, ALiBi, dsinks)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import attnfast
from attnfast import reference
from conftest import assert_close_fixed, check_attention

pytestmark = pytest.mark.usefixtures("isa")

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), BF16]


def qkv(rng, dtype, batch, lq, lk, d, dv=None, kv_heads=None):
    dv = d if dv is None else dv
    kv_batch = batch[:-1] + ((kv_heads,) if kv_heads else batch[-1:])
    q = rng.standard_normal(batch + (lq, d)).astype(dtype)
    k = rng.standard_normal(kv_batch + (lk, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (lk, dv)).astype(dtype)
    return q, k, v


def exact32(x):
    """Values exact in float32 (the kernels' computation dtype for 32- and 16-bit inputs), so the
    reference sees the numbers the kernel does."""
    return np.asarray(x, np.float32).astype(np.float64)


def modifiers(rng, which, heads):
    mods = {}
    if which in ("softcap", "all"):
        mods["softcap"] = 1.75
    if which in ("alibi", "all"):
        mods["alibi_slopes"] = exact32(2.0 ** -np.arange(1, heads + 1))
    if which in ("sinks", "all"):
        mods["sinks"] = exact32(rng.standard_normal(heads))
    return mods


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["softcap", "alibi", "sinks", "all"])
@pytest.mark.parametrize("lq, lk", [(1, 97), (5, 33), (97, 65)])
def test_modifiers_against_reference(rng, dtype, which, lq, lk):
    q, k, v = qkv(rng, dtype, (2, 4), lq, lk, 17, kv_heads=2)
    q = q * np.asarray(3, dtype)  # scores of a few units: softcap 1.75 matters
    mask = rng.random((2, 1, lq, lk)) < 0.8
    check_attention(q, k, v, dtype=dtype, what=which, causal=True, causal_align="bottom_right", mask=mask,
                    kv_lengths=np.array([[lk], [lk // 2]]), **modifiers(rng, which, 4))


@pytest.mark.parametrize("d", [1, 3, 63])
def test_modifiers_awkward_sizes_and_window(rng, d):
    q, k, v = qkv(rng, np.float32, (1, 3), 2, 1025, d)
    check_attention(q, k, v, dtype=np.float32, window=(100, 0), causal=True, causal_align="bottom_right",
                    **modifiers(rng, "all", 3))


def test_sinks_rows_without_keys_and_lse(rng):
    q, k, v = qkv(rng, np.float32, (2, 2), 3, 8, 4)
    sinks = exact32([0.5, -1.0])
    out, lse, w = attnfast.attention(q, k, v, sinks=sinks, kv_lengths=np.array([[0], [8]]), return_lse=True,
                                     return_weights=True)
    assert np.all(out[0] == 0) and np.all(w[0] == 0)
    np.testing.assert_array_equal(lse[0], np.broadcast_to(sinks[:, None], (2, 3)).astype(np.float32))
    assert_close_fixed(w.sum(-1)[1], 1 - np.exp(sinks[:, None] - lse[1].astype(np.float64)), np.float32, scale=1.0)


def test_prefill_chunk_into_preallocated_cache(rng):
    """kv_lengths-aligned bottom_right: the chunk's rows equal those of one causal call over the
    filled prefix; the unfilled cache rows (NaN) are never read."""
    filled, capacity, chunk = 37, 64, 9
    q, k, v = qkv(rng, np.float32, (2, 4), filled, capacity, 16)
    k[..., filled:, :] = np.nan
    v[..., filled:, :] = np.nan
    whole = attnfast.attention(q, k[..., :filled, :], v[..., :filled, :], causal=True,
                               alibi_slopes=exact32([0.5, 0.25, 0.125, 0.0625]))
    part = attnfast.attention(q[..., filled - chunk:, :], k, v, causal=True, causal_align="bottom_right",
                              kv_lengths=np.array([filled, filled])[:, None],
                              alibi_slopes=exact32([0.5, 0.25, 0.125, 0.0625]))
    assert_close_fixed(part, whole[..., filled - chunk:, :], np.float32, scale=1.0)


def gathered(cache, table):
    blocks = cache[table]
    b, n, hk, bs, f = blocks.shape
    return blocks.transpose(0, 2, 1, 3, 4).reshape(b, hk, n * bs, f)


def paged_case(rng, dtype, block_size, lq, lengths, hq=4, hk=2, d=17, dv=9):
    max_blocks = -(-max(lengths) // block_size)
    num_blocks = 2 * len(lengths) * max_blocks + 1
    k = rng.standard_normal((num_blocks, hk, block_size, d)).astype(dtype)
    v = rng.standard_normal((num_blocks, hk, block_size, dv)).astype(dtype)
    table = np.stack([rng.permutation(num_blocks)[:max_blocks] for _ in lengths]).astype(np.int32)
    if len(lengths) > 1:
        table[1, 0] = table[0, 0]  # a block shared by two items (a common prompt)
    for b, n in enumerate(lengths):  # entries past an item's length: out of range, never read
        table[b, -(-n // block_size):] = -1
    q = rng.standard_normal((len(lengths), hq, lq, d)).astype(dtype)
    return q, k, v, table, np.array(lengths)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size, lq, lengths", [(16, 1, [100, 37]), (5, 3, [41, 12, 1]), (128, 7, [300, 129])])
def test_paged_against_reference_and_contiguous(rng, dtype, block_size, lq, lengths):
    q, k, v, table, kv_lengths = paged_case(rng, dtype, block_size, lq, lengths)
    kw = dict(causal=True, causal_align="bottom_right", kv_lengths=kv_lengths, block_table=table)
    out, _, _ = check_attention(q, k, v, dtype=dtype, what="paged", **kw)
    dense = np.where(table >= 0, table, 0)
    contiguous = attnfast.attention(q, gathered(k, dense), gathered(v, dense), causal=True,
                                    causal_align="bottom_right", kv_lengths=kv_lengths[:, None])
    assert_close_fixed(out, contiguous.astype(np.float64), dtype, scale=1.0, what="paged vs contiguous")


def test_paged_with_modifiers(rng):
    q, k, v, table, kv_lengths = paged_case(rng, np.float32, 16, 4, [70, 33])
    check_attention(q, k, v, dtype=np.float32, block_table=table, kv_lengths=kv_lengths, causal=True,
                    causal_align="bottom_right", **modifiers(rng, "all", 4))


def quantized_cache(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return attnfast.quantize_kv(x)


@pytest.mark.parametrize("q_dtype", [np.float32, BF16])
@pytest.mark.parametrize("lq, lk, d", [(1, 1025, 64), (5, 97, 17), (33, 65, 3)])
def test_int8_against_reference(rng, q_dtype, lq, lk, d):
    k8, ks = quantized_cache(rng, (2, 2, lk, d))
    v8, vs = quantized_cache(rng, (2, 2, lk, d))
    q = rng.standard_normal((2, 4, lq, d)).astype(q_dtype)
    check_attention(q, k8, v8, dtype=np.float32, what="int8", k_scale=ks, v_scale=vs, causal=True,
                    causal_align="bottom_right", kv_lengths=np.array([[lk], [lk - 7]]))


def test_int8_broadcast_scales(rng):
    k8, _ = quantized_cache(rng, (2, 2, 40, 16))
    v8, _ = quantized_cache(rng, (2, 2, 40, 16))
    q = rng.standard_normal((2, 4, 3, 16)).astype(np.float32)
    for k_scale, v_scale in ((np.float32(0.01), np.full((1, 2, 1), 0.02, np.float32)),
                             (rng.uniform(0.01, 0.1, 40).astype(np.float32), np.full((2, 1, 40), 0.03, np.float32))):
        check_attention(q, k8, v8, dtype=np.float32, what="broadcast scales", k_scale=k_scale, v_scale=v_scale,
                        kv_lengths=np.array([[40], [23]]))


def test_int8_paged(rng):
    q, k, v, table, kv_lengths = paged_case(rng, np.float32, 16, 2, [50, 17])
    k8, ks = attnfast.quantize_kv(k)
    v8, vs = attnfast.quantize_kv(v)
    check_attention(q, k8, v8, dtype=np.float32, what="paged int8", k_scale=ks, v_scale=vs, block_table=table,
                    kv_lengths=kv_lengths, causal=True, causal_align="bottom_right")
    check_attention(q, k8, v8, dtype=np.float32, what="paged int8, broadcast scales", k_scale=np.float32(0.01),
                    v_scale=np.full((1, 2, 1), 0.02, np.float32), block_table=table, kv_lengths=kv_lengths)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float64)])
@pytest.mark.parametrize("which", ["softcap", "alibi", "sinks", "all"])
def test_backward_against_reference(rng, dtype, which):
    q, k, v = qkv(rng, dtype, (2, 4), 9, 33, 16, kv_heads=2)
    q = q * np.asarray(2, dtype)
    mods = modifiers(rng, which, 4)
    if "sinks" in mods:
        mods["sinks"] = mods["sinks"].astype(dtype)  # its gradient comes back in its dtype
    kw = dict(causal=True, causal_align="bottom_right", kv_lengths=np.array([[33], [20]]), **mods)
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    dout = rng.standard_normal(out.shape).astype(dtype)
    got = attnfast.attention_backward(dout, q, k, v, out, lse, **kw)
    want = reference.attention_backward(dout, q, k, v, out, lse, **kw)
    for name in ("dq", "dk", "dv", "dsinks"):
        g, w = getattr(got, name), getattr(want, name)
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = float(np.max(np.abs(w))) or 1.0
        assert_close_fixed(g, w, dtype, scale=scale, what=f"{which}: {name}")
