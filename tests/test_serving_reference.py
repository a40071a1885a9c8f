"""The float64 reference's serving additions (issue 18) against independent formulations: explicit
loops and closed forms for softcap, ALiBi and sinks, paged caches against the gathered contiguous
cache, int8 caches against the dequantised float64 one, the kv_lengths-aligned bottom_right diagonal
against one causal call over the filled prefix, and finite differences for the new backward terms."""

from __future__ import annotations

import numpy as np
import pytest

from attnfast import reference as ref


def close(actual, expected, rtol=1e-12, atol=1e-12):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def loop_attention(q, k, v, *, scale, visible, softcap=None, slopes=None, diag=None, sink=None):
    """One (Lq, D) x (Lk, D) head by explicit loops over rows and keys: (out, lse, weights).

    s_ij = scale q_i . k_j, then c tanh(s / c), then - slope |diag_i - j|; visible[i, j] selects the
    keys; the sink joins the denominator: out_i = sum_j e^{s_ij} v_j / (e^{sink} + sum_j e^{s_ij})."""
    lq, lk = q.shape[0], k.shape[0]
    out = np.zeros((lq, v.shape[1]))
    lse = np.full(lq, -np.inf)
    weights = np.zeros((lq, lk))
    for i in range(lq):
        scores = {}
        for j in range(lk):
            if not visible[i, j]:
                continue
            s = scale * float(q[i] @ k[j])
            if softcap is not None:
                s = softcap * np.tanh(s / softcap)
            if slopes is not None:
                s -= slopes * abs(diag[i] - j)
            scores[j] = s
        logits = list(scores.values()) + ([sink] if sink is not None else [])
        if not logits:
            continue
        m = max(logits)
        total = sum(np.exp(x - m) for x in logits)
        lse[i] = m + np.log(total)
        for j, s in scores.items():
            weights[i, j] = np.exp(s - m) / total
            out[i] += weights[i, j] * v[j]
    return out, lse, weights


def random_head(rng, lq, lk, d=5, dv=3):
    return rng.standard_normal((lq, d)), rng.standard_normal((lk, d)), rng.standard_normal((lk, dv))


# --------------------------------------------------------------------------
# Score modifiers against explicit loops and closed forms
# --------------------------------------------------------------------------


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("causal", [False, True])
def test_modifiers_combined_match_loops(rng, align, causal):
    lq, lk, h = 4, 9, 3
    q = rng.standard_normal((2, h, lq, 5))
    k = rng.standard_normal((2, h, lk, 5))
    v = rng.standard_normal((2, h, lk, 3))
    slopes = np.array([0.5, 0.25, 0.125])
    sinks = np.array([0.3, -1.0, 2.0])
    lengths = np.array([[9, 6, 2], [0, 9, 4]])
    kw = dict(softcap=1.5, alibi_slopes=slopes, sinks=sinks, causal=causal, causal_align=align,
              window=(3, None), kv_lengths=lengths, scale=0.7)
    out, lse, weights = ref.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    for b in range(2):
        for hh in range(h):
            n = lengths[b, hh]
            diag = np.arange(lq) + (0 if align == "top_left" else n - lq)
            vis = (j < n) & (j >= diag[:, None] - 3)
            if causal:
                vis &= j <= diag[:, None]
            e_out, e_lse, e_w = loop_attention(q[b, hh], k[b, hh], v[b, hh], scale=0.7, visible=vis,
                                               softcap=1.5, slopes=slopes[hh], diag=diag, sink=sinks[hh])
            close(out[b, hh], e_out)
            close(lse[b, hh], e_lse)
            close(weights[b, hh], e_w)


def test_alibi_equals_an_explicit_bias(rng):
    q, k, v = (x[None] for x in random_head(rng, 5, 8))
    q, k, v = np.repeat(q, 2, 0), np.repeat(k, 2, 0), np.repeat(v, 2, 0)  # two heads
    slopes = np.array([0.3, 1.25])
    i, j = np.arange(5)[:, None], np.arange(8)[None, :]
    for align, off in (("top_left", 0), ("bottom_right", 3)):
        bias = -slopes[:, None, None] * np.abs(i + off - j)
        expected = ref.attention(q, k, v, bias=bias, causal=True, causal_align=align, return_lse=True)
        actual = ref.attention(q, k, v, alibi_slopes=slopes, causal=True, causal_align=align, return_lse=True)
        for a, e in zip(actual, expected):
            close(a, e)


def test_alibi_per_batch_item_slopes(rng):
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 6, 4)), rng.standard_normal((2, 2, 6, 2))
    slopes = np.array([[0.1, 0.2], [0.4, 0.8]])  # (B, Hq)
    out = ref.attention(q, k, v, alibi_slopes=slopes)
    for b in range(2):
        close(out[b], ref.attention(q[b], k[b], v[b], alibi_slopes=slopes[b]))


def test_sinks_equal_an_extra_key_with_zero_value(rng):
    q, k, v = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 7, 6)), rng.standard_normal((3, 7, 2))
    sinks = np.array([0.5, -2.0, 4.0])
    mask = rng.random((3, 4, 7)) < 0.7
    mask[0, 1] = False  # a row with no visible real key
    out, lse, weights = ref.attention(q, k, v, sinks=sinks, mask=mask, return_lse=True, return_weights=True)
    # The extra key 7: K = 0 (score 0) plus a bias equal to the sink, V = 0.
    k_x = np.concatenate([k, np.zeros((3, 1, 6))], axis=1)
    v_x = np.concatenate([v, np.zeros((3, 1, 2))], axis=1)
    bias = np.zeros((3, 4, 8))
    bias[..., :7] = np.where(mask, 0.0, -np.inf)
    bias[..., 7] = sinks[:, None]
    e_out, e_lse, e_w = ref.attention(q, k_x, v_x, bias=bias, return_lse=True, return_weights=True)
    close(out, e_out)
    close(lse, e_lse)
    close(weights, e_w[..., :7])
    # The empty row: out 0, weights 0, lse = its sink; real weights sum to 1 - e^{sink - lse}.
    assert np.all(out[0, 1] == 0) and np.all(weights[0, 1] == 0) and lse[0, 1] == sinks[0]
    close(weights.sum(-1), 1 - np.exp(sinks[:, None] - lse))


def test_sinks_with_no_keys_give_lse_sink():
    q, k, v = np.ones((2, 3, 4)), np.ones((2, 0, 4)), np.ones((2, 0, 5))
    out, lse = ref.attention(q, k, v, sinks=np.array([1.5, -3.0]), return_lse=True)
    assert np.all(out == 0)
    np.testing.assert_array_equal(lse, [[1.5] * 3, [-3.0] * 3])


def test_softcap_closed_form_and_limit(rng):
    q, k, v = random_head(rng, 6, 9)
    q = q * 4  # large scores, where the cap matters
    vis = np.ones((6, 9), bool)
    e_out, e_lse, _ = loop_attention(q, k, v, scale=1 / np.sqrt(5), visible=vis, softcap=2.0)
    out, lse = ref.attention(q, k, v, softcap=2.0, return_lse=True)
    close(out, e_out)
    close(lse, e_lse)
    plain = ref.attention(q, k, v, return_lse=True)
    for a, e in zip(ref.attention(q, k, v, softcap=1e9, return_lse=True), plain):
        close(a, e, rtol=1e-9, atol=1e-9)
    # Capped scores never exceed c: even overflowing ones give finite weights.
    big = ref.attention(q * 1e30, k, v, softcap=3.0, return_lse=True)
    assert np.all(np.isfinite(big[0])) and np.all(big[1] <= 3.0 + np.log(9) + 1e-12)


# --------------------------------------------------------------------------
# The kv_lengths-aligned diagonal
# --------------------------------------------------------------------------


def test_chunked_prefill_into_preallocated_cache_equals_one_causal_call(rng):
    """A cache of 16 rows filled to 11: a chunk of the last 4 queries with causal bottom_right and
    kv_lengths=11 gives the same rows as one causal call over the 11 filled keys."""
    total, capacity, chunk = 11, 16, 4
    q_all = rng.standard_normal((2, total, 8))
    cache_k = rng.standard_normal((2, capacity, 8))
    cache_v = rng.standard_normal((2, capacity, 3))
    cache_k[:, total:] = np.nan  # unfilled rows: never read
    cache_v[:, total:] = np.nan
    whole, whole_lse = ref.attention(q_all, cache_k[:, :total], cache_v[:, :total], causal=True, return_lse=True)
    for options in ({}, {"window": (3, 0)}, {"alibi_slopes": np.array([0.5, 0.1])}, {"sinks": np.array([0.0, 1.0])}):
        expected = ref.attention(q_all, cache_k[:, :total], cache_v[:, :total], causal=True, return_lse=True,
                                 **options)
        out, lse = ref.attention(q_all[:, total - chunk:], cache_k, cache_v, causal=True,
                                 causal_align="bottom_right", kv_lengths=np.array([total, total]),
                                 return_lse=True, **options)
        close(out, expected[0][:, total - chunk:])
        close(lse, expected[1][:, total - chunk:])
    assert np.all(np.isfinite(whole)) and np.all(np.isfinite(whole_lse))


def test_decode_steps_into_preallocated_cache_equal_one_causal_call(rng):
    """Prefill of 5 then decoding one token at a time, items of different lengths in one batch."""
    q_all = rng.standard_normal((2, 9, 4))
    k_all = rng.standard_normal((2, 9, 4))
    v_all = rng.standard_normal((2, 9, 2))
    expected = ref.attention(q_all, k_all, v_all, causal=True)
    capacity = 12
    k_cache = np.full((2, capacity, 4), np.nan)
    v_cache = np.full((2, capacity, 2), np.nan)
    lengths = np.array([5, 3])
    k_cache[0, :5], v_cache[0, :5] = k_all[0, :5], v_all[0, :5]
    k_cache[1, :3], v_cache[1, :3] = k_all[1, :3], v_all[1, :3]
    for _ in range(4):
        rows = [q_all[b, lengths[b]:lengths[b] + 1] for b in range(2)]
        for b in range(2):
            k_cache[b, lengths[b]], v_cache[b, lengths[b]] = k_all[b, lengths[b]], v_all[b, lengths[b]]
        lengths = lengths + 1
        out = ref.attention(np.stack(rows), k_cache, v_cache, causal=True, causal_align="bottom_right",
                            kv_lengths=lengths)
        for b in range(2):
            close(out[b, 0], expected[b, lengths[b] - 1])


def test_bottom_right_without_kv_lengths_still_aligns_to_lk(rng):
    q, k, v = random_head(rng, 3, 7)
    out = ref.attention(q, k, v, causal=True, causal_align="bottom_right")
    vis = np.arange(7)[None, :] <= np.arange(3)[:, None] + 4
    close(out, loop_attention(q, k, v, scale=1 / np.sqrt(5), visible=vis)[0])


# --------------------------------------------------------------------------
# Paged and int8 caches
# --------------------------------------------------------------------------


def gathered(cache, table):
    """The contiguous (B, Hk, max_blocks * block_size, F) cache a block table describes."""
    blocks = cache[table]  # (B, max_blocks, Hk, block_size, F)
    b, n, hk, bs, f = blocks.shape
    return blocks.transpose(0, 2, 1, 3, 4).reshape(b, hk, n * bs, f)


@pytest.mark.parametrize("block_size", [1, 4, 5])
def test_paged_equals_gathered_contiguous(rng, block_size):
    num_blocks, hk, hq, d, dv = 13, 2, 4, 6, 3
    k_cache = rng.standard_normal((num_blocks, hk, block_size, d))
    v_cache = rng.standard_normal((num_blocks, hk, block_size, dv))
    table = np.stack([rng.permutation(num_blocks)[:4], rng.permutation(num_blocks)[:4]]).astype(np.int32)
    table[1, 0] = table[0, 0]  # a shared block (a common prefix)
    lengths = np.array([4 * block_size, 2 * block_size + 1])
    table[1, 3] = 10**6  # past item 1's kv_lengths: never validated, never read
    q = rng.standard_normal((2, hq, 3, d))
    kw = dict(causal=True, causal_align="bottom_right", return_lse=True, return_weights=True,
              alibi_slopes=np.linspace(0.1, 0.4, hq), softcap=4.0)
    out, lse, weights = ref.attention(q, k_cache, v_cache, block_table=table, kv_lengths=lengths, **kw)
    dense_table = np.where(table < num_blocks, table, 0)
    k, v = gathered(k_cache, dense_table), gathered(v_cache, dense_table)
    e_out, e_lse, e_w = ref.attention(q, k, v, kv_lengths=lengths[:, None], **kw)
    close(out, e_out)
    close(lse, e_lse)
    close(weights, e_w)


def test_paged_default_kv_lengths_is_every_block(rng):
    k_cache = rng.standard_normal((5, 1, 3, 4))
    v_cache = rng.standard_normal((5, 1, 3, 2))
    table = np.array([[4, 0], [2, 2]])
    q = rng.standard_normal((2, 2, 2, 4))
    out = ref.attention(q, k_cache, v_cache, block_table=table, causal=True, causal_align="bottom_right")
    close(out, ref.attention(q, gathered(k_cache, table), gathered(v_cache, table), causal=True,
                             causal_align="bottom_right"))


def quantized(rng, shape):
    values = rng.integers(-127, 128, size=shape).astype(np.int8)
    scales = rng.uniform(0.001, 0.05, size=shape[:-1]).astype(np.float32)
    return values, scales


@pytest.mark.parametrize("q_dtype", [np.float32, np.float16])
def test_int8_equals_the_dequantised_float64_cache(rng, q_dtype):
    k8, ks = quantized(rng, (2, 2, 9, 5))
    v8, vs = quantized(rng, (2, 2, 9, 3))
    q = rng.standard_normal((2, 4, 3, 5)).astype(q_dtype)
    kw = dict(causal=True, kv_lengths=np.array([[9], [4]]), return_lse=True,
              sinks=np.array([0.125, 0.25, -0.5, 1.0]))  # exact in float32, the int8 computation dtype
    out, lse = ref.attention(q, k8, v8, k_scale=ks, v_scale=vs, **kw)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    k = k8.astype(np.float64) * ks.astype(np.float64)[..., None]
    v = v8.astype(np.float64) * vs.astype(np.float64)[..., None]
    e_out, e_lse = ref.attention(q.astype(np.float64), k, v, **kw)
    # The same float64 computation, rounded once to float32.
    np.testing.assert_array_equal(out, e_out.astype(np.float32))
    np.testing.assert_array_equal(lse, e_lse.astype(np.float32))


def test_int8_broadcast_scales_and_paged(rng):
    k8, _ = quantized(rng, (6, 2, 4, 5))
    v8, _ = quantized(rng, (6, 2, 4, 3))
    k_scale = np.float32(0.02) * np.ones((1, 2, 1), np.float32)  # per head, broadcast over blocks and rows
    v_scale = rng.uniform(0.01, 0.1, (6, 2, 4)).astype(np.float32)
    table = np.array([[5, 1, 3], [0, 2, 4]], np.int32)
    q = rng.standard_normal((2, 2, 2, 5)).astype(np.float32)
    out = ref.attention(q, k8, v8, k_scale=k_scale, v_scale=v_scale, block_table=table,
                        kv_lengths=np.array([12, 7]))
    k = gathered(k8.astype(np.float64) * np.broadcast_to(k_scale, (6, 2, 4))[..., None].astype(np.float64), table)
    v = gathered(v8.astype(np.float64) * v_scale[..., None].astype(np.float64), table)
    e = ref.attention(q.astype(np.float64), k, v, kv_lengths=np.array([[12], [7]]))
    np.testing.assert_array_equal(out, e.astype(np.float32))


# --------------------------------------------------------------------------
# Backward: finite differences of the new terms
# --------------------------------------------------------------------------


def numeric_gradient(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        g[idx] = (f(x + step) - f(x - step)) / (2 * eps)
    return g


MODIFIERS = {
    "softcap": dict(softcap=1.2),
    "alibi": dict(alibi_slopes=np.array([0.3, 0.7]), causal=True, causal_align="bottom_right"),
    "sinks": dict(sinks=np.array([0.4, -0.5])),
    "all": dict(softcap=2.0, alibi_slopes=np.array([0.3, 0.7]), sinks=np.array([[0.4, -0.5]]),
                kv_lengths=np.array([[6, 3]]), causal=True, causal_align="bottom_right", window=(2, None)),
}


@pytest.mark.parametrize("name", list(MODIFIERS))
def test_backward_matches_finite_differences(rng, name):
    kw = MODIFIERS[name]
    q = rng.standard_normal((1, 2, 3, 4)) * 1.5
    k = rng.standard_normal((1, 2, 6, 4))
    v = rng.standard_normal((1, 2, 6, 2))
    dout = rng.standard_normal((1, 2, 3, 2))
    out, lse = ref.attention(q, k, v, return_lse=True, **kw)
    g = ref.attention_backward(dout, q, k, v, out, lse, **kw)
    loss = lambda **x: float(np.sum(dout * ref.attention(x.get("q", q), x.get("k", k), x.get("v", v),  # noqa: E731
                                                         **{**kw, **{n: x[n] for n in x if n == "sinks"}})))
    close(g.dq, numeric_gradient(lambda x: loss(q=x), q), rtol=1e-6, atol=1e-8)
    close(g.dk, numeric_gradient(lambda x: loss(k=x), k), rtol=1e-6, atol=1e-8)
    close(g.dv, numeric_gradient(lambda x: loss(v=x), v), rtol=1e-6, atol=1e-8)
    if "sinks" in kw:
        sinks = np.asarray(kw["sinks"], np.float64)
        assert g.dsinks.shape == sinks.shape
        close(g.dsinks, numeric_gradient(lambda x: loss(sinks=x), sinks), rtol=1e-6, atol=1e-8)
    else:
        assert g.dsinks is None


def test_dsinks_closed_form_and_broadcast_sum(rng):
    q, k, v = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 3, 6, 2))
    dout = rng.standard_normal((2, 3, 4, 2))
    sinks = np.array([0.2, -0.1, 1.0])  # (Hq,): summed over the batch items it serves
    out, lse = ref.attention(q, k, v, sinks=sinks, return_lse=True)
    g = ref.attention_backward(dout, q, k, v, out, lse, sinks=sinks)
    expected = -np.sum(np.exp(sinks[:, None] - lse) * np.sum(dout * out, -1), axis=(0, 2))
    close(g.dsinks, expected)
