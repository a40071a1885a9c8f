"""The pure-NumPy reference against textbook formulas and hand-computed cases.

Everything else in the test-suite trusts ``attnfast.reference``, so these tests
check it independently: explicit Python loops, small examples worked out by
hand, and invariants (rows sum to 1, shift invariance, split-KV merging).
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from attnfast import reference as ref

# Both sides are float64 sums of a handful of terms: only rounding differs.
RTOL = 1e-12
ATOL = 1e-12


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture
def rng():
    return np.random.default_rng(20240601)


# --------------------------------------------------------------------------
# Independent loop implementations (the textbook definitions)
# --------------------------------------------------------------------------


def loop_softmax(row, visible=None):
    row = np.asarray(row, dtype=np.float64)
    vis = np.ones(row.shape, bool) if visible is None else np.asarray(visible)
    vals = [x for x, ok in zip(row, vis) if ok and x != -np.inf]
    if not vals:
        return np.zeros_like(row), -np.inf
    m = max(vals)
    total = sum(math.exp(x - m) for x in vals)
    w = np.array([math.exp(x - m) / total if ok and x != -np.inf else 0.0 for x, ok in zip(row, vis)])
    return w, m + math.log(total)


def loop_attention(q, k, v, scale, visible):
    """Single head: q (Lq, D), k (Lk, D), v (Lk, Dv), visible (Lq, Lk)."""
    lq, lk = q.shape[0], k.shape[0]
    out = np.zeros((lq, v.shape[1]))
    lse = np.empty(lq)
    for i in range(lq):
        s = [sum(q[i, c] * k[j, c] for c in range(q.shape[1])) * scale for j in range(lk)]
        w, lse[i] = loop_softmax(s, visible[i])
        for j in range(lk):
            out[i] += w[j] * v[j]
    return out, lse


# --------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------

Q = np.array([[1.0, 2.0], [0.0, -1.0]])  # Lq=2, D=2
K = np.array([[1.0, 0.0], [1.0, 1.0], [-2.0, 0.5]])  # Lk=3, D=2


def test_scores_dot_by_hand():
    # q0.k = [1, 3, -1]; q1.k = [0, -1, -0.5]
    expected = np.array([[1.0, 3.0, -1.0], [0.0, -1.0, -0.5]])
    close(ref.scores(Q, K, method="dot"), expected)


def test_scores_scaled_dot_default_scale_is_inverse_sqrt_d():
    expected = np.array([[1.0, 3.0, -1.0], [0.0, -1.0, -0.5]]) / math.sqrt(2.0)
    close(ref.scores(Q, K), expected)
    close(ref.scores(Q, K, method="scaled_dot", scale=0.5), expected * math.sqrt(2.0) * 0.5)


def test_scores_general_by_hand():
    w = np.array([[0.0, 1.0], [2.0, 0.0]])
    # q0 W = [4, 1]; q1 W = [-2, 0]
    expected = np.array([[4.0, 5.0, -7.5], [-2.0, -2.0, 4.0]])
    close(ref.scores(Q, K, method="general", w=w), expected)


def test_scores_general_with_different_key_size():
    k3 = np.array([[1.0, 0.0, 2.0]])  # Lk=1, Dk=3
    w = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (D=2, Dk=3)
    # q0 W = [1, 0, 2] -> 1 + 4 = 5 ; q1 W = [0, 0, -1] -> -2
    close(ref.scores(Q, k3, method="general", w=w), [[5.0], [-2.0]])


def test_scores_concat_by_hand():
    w_q = np.array([1.0, -1.0])
    w_k = np.array([0.5, 2.0])
    # w_q.q = [-1, 1]; w_k.k = [0.5, 2.5, 0]; b = 0.25
    expected = np.array([[-0.25, 1.75, -0.75], [1.75, 3.75, 1.25]])
    close(ref.scores(Q, K, method="concat", w_q=w_q, w_k=w_k, score_bias=0.25), expected)


def test_scores_concat_equals_linear_layer_on_concatenation(rng):
    q = rng.standard_normal((4, 3))
    k = rng.standard_normal((5, 2))
    w_q, w_k = rng.standard_normal(3), rng.standard_normal(2)
    layer = np.concatenate([w_q, w_k])
    expected = np.array([[layer @ np.concatenate([qi, kj]) + 0.7 for kj in k] for qi in q])
    close(ref.scores(q, k, method="concat", w_q=w_q, w_k=w_k, score_bias=0.7), expected)


def test_scores_additive_by_hand():
    w_q = np.array([[1.0, 0.0]])  # A=1
    w_k = np.array([[0.0, 1.0]])
    # tanh(q_i[0] + k_j[1] + b) with b = -1: q0 -> 1, q1 -> 0; k -> [0, 1, 0.5]
    pre = np.array([[0.0, 1.0, 0.5], [-1.0, 0.0, -0.5]])
    close(ref.scores(Q, K, method="additive", w_q=w_q, w_k=w_k, score_bias=[-1.0]), np.tanh(pre))
    close(ref.scores(Q, K, method="additive", w_q=w_q, w_k=w_k, score_bias=[-1.0], v_a=[3.0]), 3 * np.tanh(pre))


def test_scores_additive_matches_bahdanau_loop(rng):
    a, d, dk = 4, 3, 5
    q = rng.standard_normal((2, d))
    k = rng.standard_normal((3, dk))
    w_q, w_k = rng.standard_normal((a, d)), rng.standard_normal((a, dk))
    b, v_a = rng.standard_normal(a), rng.standard_normal(a)
    expected = np.array([[v_a @ np.tanh(w_q @ qi + w_k @ kj + b) for kj in k] for qi in q])
    got = ref.scores(q, k, method="additive", w_q=w_q, w_k=w_k, score_bias=b, v_a=v_a)
    close(got, expected)
    # v_a defaults to ones: the plain sum over hidden units.
    ones = np.array([[np.tanh(w_q @ qi + w_k @ kj + b).sum() for kj in k] for qi in q])
    close(ref.scores(q, k, method="additive", w_q=w_q, w_k=w_k, score_bias=b), ones)


@pytest.mark.parametrize("method", ["dot", "scaled_dot", "general", "concat", "additive"])
def test_scores_scale_multiplies_every_method(rng, method):
    q, k = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    weights = {
        "dot": {},
        "scaled_dot": {},
        "general": {"w": rng.standard_normal((4, 4))},
        "concat": {"w_q": rng.standard_normal(4), "w_k": rng.standard_normal(4), "score_bias": 0.3},
        "additive": {"w_q": rng.standard_normal((2, 4)), "w_k": rng.standard_normal((2, 4))},
    }[method]
    base = ref.scores(q, k, method=method, scale=1.0, **weights)
    close(ref.scores(q, k, method=method, scale=-2.5, **weights), -2.5 * base)


def test_scores_broadcast_batch_axes(rng):
    q = rng.standard_normal((3, 1, 2, 4))
    k = rng.standard_normal((5, 6, 4))
    got = ref.scores(q, k, method="dot")
    assert got.shape == (3, 5, 2, 6)
    for a in range(3):
        for b in range(5):
            close(got[a, b], q[a, 0] @ k[b].T)


def test_scores_keep_float32_and_promote_mixed(rng):
    q = rng.standard_normal((2, 3)).astype(np.float32)
    k = rng.standard_normal((4, 3)).astype(np.float32)
    assert ref.scores(q, k).dtype == np.float32
    assert ref.scores(q, k.astype(np.float64)).dtype == np.float64


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


def test_softmax_by_hand():
    x = np.array([0.0, math.log(2.0), math.log(5.0)])
    close(ref.softmax(x), [1 / 8, 2 / 8, 5 / 8])


def test_softmax_matches_textbook(rng):
    x = rng.standard_normal((4, 7))
    e = np.exp(x)
    close(ref.softmax(x), e / e.sum(-1, keepdims=True))


@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2, -3])
def test_softmax_axis(rng, axis):
    x = rng.standard_normal((3, 4, 5))
    e = np.exp(x)
    close(ref.softmax(x, axis=axis), e / e.sum(axis=axis, keepdims=True))


def test_softmax_mask_broadcasts_and_zeroes_masked(rng):
    x = rng.standard_normal((2, 3, 4))
    mask = np.array([True, False, True, True])  # broadcast over all rows
    got = ref.softmax(x, mask=mask)
    assert np.all(got[..., 1] == 0.0)
    e = np.exp(x[..., [0, 2, 3]])
    close(got[..., [0, 2, 3]], e / e.sum(-1, keepdims=True))


def test_softmax_mask_along_other_axis():
    x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    mask = np.array([[True], [False], [True]])
    got = ref.softmax(x, axis=0, mask=mask)
    e = np.exp([1.0, 5.0])
    close(got[:, 0], [e[0] / e.sum(), 0.0, e[1] / e.sum()])


def test_softmax_fully_masked_and_all_neg_inf_rows_are_zero():
    x = np.array([[1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf], [4.0, 5.0, 6.0]])
    mask = np.array([[True, True, True], [True, True, True], [False, False, False]])
    got = ref.softmax(x, mask=mask)
    assert not np.isnan(got).any()
    assert np.all(got[1:] == 0.0)
    close(got[0].sum(), 1.0)


def test_softmax_neg_inf_entries_get_zero_weight():
    got = ref.softmax(np.array([-np.inf, 0.0, -np.inf, 0.0]))
    close(got, [0.0, 0.5, 0.0, 0.5])


def test_softmax_masked_nan_is_ignored_and_visible_nan_stays_in_its_row():
    x = np.array([[np.nan, 1.0, 1.0], [1.0, np.nan, 0.0], [0.0, 0.0, 0.0]])
    mask = np.array([[False, True, True], [True, True, True], [True, True, True]])
    got = ref.softmax(x, mask=mask)
    close(got[0], [0.0, 0.5, 0.5])
    assert np.isnan(got[1]).all()
    close(got[2], [1 / 3] * 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_extreme_logits(dtype):
    x = np.array([[1e30, -1e30, 1e30], [-1e30, -1e30, -1e30], [0.0, 1e4, -1e4]], dtype=dtype)
    got = ref.softmax(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got[0], np.array([0.5, 0.0, 0.5], dtype=dtype))
    close(got[1], [1 / 3] * 3, rtol=1e-6)
    # exp(-1e4) underflows to exactly 0 in both precisions.
    np.testing.assert_array_equal(got[2], np.array([0.0, 1.0, 0.0], dtype=dtype))


def test_softmax_spread_within_row_keeps_small_weights():
    # Shifting by the max keeps exp(-700) representable instead of underflowing to 0/0.
    x = np.array([1e4, 1e4 - 700.0])
    got = ref.softmax(x)
    close(got, [1.0 / (1.0 + math.exp(-700.0)), math.exp(-700.0)], rtol=1e-12, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float64, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
               elements=st.floats(-50, 50)),
    st.floats(-1e3, 1e3),
)
def test_softmax_rows_sum_to_one_and_shift_invariant(x, c):
    got = ref.softmax(x)
    close(got.sum(-1), np.ones(x.shape[:-1]))
    assert np.all(got >= 0)
    close(ref.softmax(x + c), got, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------
# aggregate
# --------------------------------------------------------------------------


def test_aggregate_by_hand():
    weights = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    v = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    close(ref.aggregate(weights, v), [[0.5, 0.5], [1.2, 1.3]])


def test_aggregate_broadcasts_batch(rng):
    weights = rng.random((2, 1, 3, 4))
    v = rng.standard_normal((5, 4, 6))
    got = ref.aggregate(weights, v)
    assert got.shape == (2, 5, 3, 6)
    close(got[1, 3], weights[1, 0] @ v[3])


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def qkv(rng, lq, lk, d=4, dv=3, batch=()):
    return (
        rng.standard_normal(batch + (lq, d)),
        rng.standard_normal(batch + (lk, d)),
        rng.standard_normal(batch + (lk, dv)),
    )


def test_attention_by_hand():
    # One query, two keys with scores 0 and log 3: weights 1/4, 3/4.
    q = np.array([[1.0]])
    k = np.array([[0.0], [math.log(3.0)]])
    v = np.array([[4.0, 0.0], [0.0, 8.0]])
    out, lse = ref.attention(q, k, v, method="dot", return_lse=True)
    close(out, [[1.0, 6.0]])
    close(lse, [math.log(4.0)])


def test_attention_matches_loop(rng):
    q, k, v = qkv(rng, 3, 5)
    expected, expected_lse = loop_attention(q, k, v, 0.5, np.ones((3, 5), bool))
    out, lse, weights = ref.attention(q, k, v, return_lse=True, return_weights=True)
    close(out, expected)
    close(lse, expected_lse)
    close(weights.sum(-1), np.ones(3))


@pytest.mark.parametrize("method", ["dot", "general", "concat", "additive"])
def test_attention_is_the_three_stages(rng, method):
    q = rng.standard_normal((2, 3, 4))
    k = rng.standard_normal((2, 5, 6))
    v = rng.standard_normal((2, 5, 2))
    weights = {
        "dot": {},
        "general": {"w": rng.standard_normal((4, 6))},
        "concat": {"w_q": rng.standard_normal(4), "w_k": rng.standard_normal(6), "score_bias": -1.0},
        "additive": {"w_q": rng.standard_normal((3, 4)), "w_k": rng.standard_normal((3, 6)),
                     "v_a": rng.standard_normal(3), "score_bias": rng.standard_normal(3)},
    }[method]
    if method == "dot":
        k = k[..., :4]
    s = ref.scores(q, k, method=method, scale=0.7, **weights)
    expected = ref.aggregate(ref.softmax(s), v)
    close(ref.attention(q, k, v, method=method, scale=0.7, **weights), expected)


def causal_visible(lq, lk, offset):
    return np.tril(np.ones((lq, lk), bool), k=offset)


@pytest.mark.parametrize("lq,lk", [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_attention_causal(rng, lq, lk, align):
    q, k, v = qkv(rng, lq, lk)
    offset = 0 if align == "top_left" else lk - lq
    visible = causal_visible(lq, lk, offset)
    expected, expected_lse = loop_attention(q, k, v, 0.5, visible)
    out, lse = ref.attention(q, k, v, causal=True, causal_align=align, return_lse=True)
    close(out, expected)
    close(lse, expected_lse)
    # Rows with no visible key (bottom_right with Lq > Lk) are 0 / -inf, never NaN.
    empty = ~visible.any(-1)
    assert np.all(out[empty] == 0.0) and np.all(lse[empty] == -np.inf)
    if align == "bottom_right" and lq > lk:
        assert empty.sum() == lq - lk


def test_attention_causal_bottom_right_last_query_sees_all_keys(rng):
    q, k, v = qkv(rng, 2, 5)
    out = ref.attention(q, k, v, causal=True, causal_align="bottom_right")
    close(out[-1], ref.attention(q[-1:], k, v)[0])


@pytest.mark.parametrize("window", [(0, 0), (1, 0), (2, 1), (None, 1), (1, None), (0, None)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_attention_window(rng, window, align):
    lq, lk = 4, 6
    q, k, v = qkv(rng, lq, lk)
    offset = 0 if align == "top_left" else lk - lq
    left, right = window
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    visible = np.ones((lq, lk), bool)
    if left is not None:
        visible &= j >= i + offset - left
    if right is not None:
        visible &= j <= i + offset + right
    expected, _ = loop_attention(q, k, v, 0.5, visible)
    close(ref.attention(q, k, v, window=window, causal_align=align), expected)


def test_attention_window_and_causal_combine(rng):
    q, k, v = qkv(rng, 5, 5)
    # (2, 3) with causal: the right side is cut by causality.
    visible = causal_visible(5, 5, 0) & ~causal_visible(5, 5, -3)
    expected, _ = loop_attention(q, k, v, 0.5, visible)
    close(ref.attention(q, k, v, window=(2, 3), causal=True), expected)


def test_attention_kv_lengths_including_zero(rng):
    q, k, v = qkv(rng, 3, 5, batch=(3,))
    lengths = np.array([5, 2, 0])
    out, lse = ref.attention(q, k, v, kv_lengths=lengths, return_lse=True)
    for b, n in enumerate(lengths):
        visible = np.zeros((3, 5), bool)
        visible[:, :n] = True
        expected, expected_lse = loop_attention(q[b], k[b], v[b], 0.5, visible)
        close(out[b], expected)
        close(lse[b], expected_lse)
    assert np.all(out[2] == 0.0) and np.all(lse[2] == -np.inf)


def test_attention_kv_lengths_equals_slicing(rng):
    q, k, v = qkv(rng, 2, 7, batch=(2,))
    out = ref.attention(q, k, v, kv_lengths=np.array([4, 7]))
    close(out[0], ref.attention(q[0], k[0, :4], v[0, :4]))
    close(out[1], ref.attention(q[1], k[1], v[1]))


def test_attention_mask_and_bias(rng):
    q, k, v = qkv(rng, 3, 4)
    mask = rng.random((3, 4)) > 0.3
    mask[:, 0] = True
    bias = rng.standard_normal((3, 4))
    s = q @ k.T * 0.5 + bias
    expected = np.stack([loop_softmax(s[i], mask[i])[0] for i in range(3)]) @ v
    close(ref.attention(q, k, v, mask=mask, bias=bias), expected)


def test_attention_neg_inf_bias_row_gives_zero_output(rng):
    q, k, v = qkv(rng, 2, 3)
    bias = np.zeros((2, 3))
    bias[1] = -np.inf
    out, lse, weights = ref.attention(q, k, v, bias=bias, return_lse=True, return_weights=True)
    assert np.all(out[1] == 0.0) and lse[1] == -np.inf and np.all(weights[1] == 0.0)
    close(out[0], ref.attention(q[:1], k, v)[0])


def test_attention_everything_combined_matches_loop(rng):
    lq, lk = 4, 7
    q, k, v = qkv(rng, lq, lk)
    mask = rng.random((lq, lk)) > 0.2
    off = 6 - lq  # bottom_right with kv_lengths aligns to kv_lengths, not to Lk
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    visible = mask & (j <= i + off) & (j >= i + off - 2) & (j < 6)
    expected, expected_lse = loop_attention(q, k, v, 0.5, visible)
    out, lse = ref.attention(q, k, v, mask=mask, causal=True, causal_align="bottom_right",
                             window=(2, None), kv_lengths=6, return_lse=True)
    close(out, expected)
    close(lse, expected_lse)


@pytest.mark.parametrize("hq,hk", [(8, 2), (6, 3), (4, 1), (4, 4), (1, 3)])
def test_attention_gqa_equals_repeating_heads(rng, hq, hk):
    q = rng.standard_normal((2, hq, 3, 4))
    k = rng.standard_normal((2, hk, 5, 4))
    v = rng.standard_normal((2, hk, 5, 3))
    out, lse, weights = ref.attention(q, k, v, causal=True, return_lse=True, return_weights=True)
    heads = max(hq, hk)
    if hq >= hk:
        k_rep, v_rep = np.repeat(k, hq // hk, axis=1), np.repeat(v, hq // hk, axis=1)
        q_rep = q
    else:  # a single query head broadcasts over the kv heads
        k_rep, v_rep, q_rep = k, v, np.broadcast_to(q, (2, hk, 3, 4))
    assert out.shape == (2, heads, 3, 3)
    expected, expected_lse, expected_w = ref.attention(
        q_rep, k_rep, v_rep, causal=True, return_lse=True, return_weights=True)
    close(out, expected)
    close(lse, expected_lse)
    close(weights, expected_w)


def test_attention_gqa_head_mapping_is_h_div_group(rng):
    q = rng.standard_normal((4, 2, 3))
    k = rng.standard_normal((2, 5, 3))
    v = rng.standard_normal((2, 5, 2))
    out = ref.attention(q, k, v)
    for h in range(4):
        close(out[h], ref.attention(q[h], k[h // 2], v[h // 2]))


def test_attention_lse_is_log_sum_exp_of_scores(rng):
    q, k, v = qkv(rng, 3, 6, batch=(2,))
    bias = rng.standard_normal((3, 6))
    _, lse = ref.attention(q, k, v, bias=bias, scale=0.3, return_lse=True)
    s = np.einsum("bid,bjd->bij", q, k) * 0.3 + bias
    close(lse, np.log(np.exp(s).sum(-1)))


def test_attention_return_order(rng):
    q, k, v = qkv(rng, 2, 3)
    out = ref.attention(q, k, v)
    assert isinstance(out, np.ndarray)
    pair = ref.attention(q, k, v, return_weights=True)
    assert len(pair) == 2 and pair[1].shape == (2, 3)
    triple = ref.attention(q, k, v, return_lse=True, return_weights=True)
    assert [t.shape for t in triple] == [(2, 3), (2,), (2, 3)]


def test_attention_writes_into_out(rng):
    q, k, v = qkv(rng, 3, 4, batch=(2,))
    buf = np.full((2, 3, 3), np.nan)
    result, lse = ref.attention(q, k, v, out=buf, return_lse=True)
    assert result is buf
    close(buf, ref.attention(q, k, v))
    assert lse.shape == (2, 3)


def test_attention_out_may_be_a_strided_view(rng):
    q, k, v = qkv(rng, 3, 4)
    big = np.zeros((6, 3))
    view = big[::2]
    assert ref.attention(q, k, v, out=view) is view
    close(big[::2], ref.attention(q, k, v))
    assert np.all(big[1::2] == 0.0)


def test_attention_float32_and_empty_keys(rng):
    q, k, v = (x.astype(np.float32) for x in qkv(rng, 2, 0))
    out, lse, weights = ref.attention(q, k, v, return_lse=True, return_weights=True)
    assert out.dtype == lse.dtype == weights.dtype == np.float32
    assert out.shape == (2, 3) and np.all(out == 0) and np.all(lse == -np.inf) and weights.shape == (2, 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**32 - 1))
def test_attention_key_permutation_invariance(lq, lk, seed):
    rng = np.random.default_rng(seed)
    q, k, v = qkv(rng, lq, lk)
    perm = rng.permutation(lk)
    close(ref.attention(q, k[perm], v[perm]), ref.attention(q, k, v), rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------
# merge_states
# --------------------------------------------------------------------------


@pytest.mark.parametrize("cuts", [(3,), (2, 5), (1, 4), (0, 7)])
def test_merge_states_equals_attention_over_all_keys(rng, cuts):
    q, k, v = qkv(rng, 4, 7, batch=(2,))
    whole, whole_lse = ref.attention(q, k, v, return_lse=True)
    bounds = (0,) + cuts + (7,)
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, s = ref.attention(q, k[:, a:b], v[:, a:b], return_lse=True)
        outs.append(o)
        lses.append(s)
    merged, merged_lse = ref.merge_states(outs, lses)
    close(merged, whole)
    close(merged_lse, whole_lse)


def test_merge_states_with_causal_chunks(rng):
    # Later chunks are empty for early queries: their lse is -inf.
    q, k, v = qkv(rng, 6, 6)
    whole = ref.attention(q, k, v, causal=True)
    parts = [ref.attention(q, k[a:b], v[a:b], mask=(np.arange(a, b)[None, :] <= np.arange(6)[:, None]),
                           return_lse=True) for a, b in [(0, 2), (2, 4), (4, 6)]]
    merged, _ = ref.merge_states([p[0] for p in parts], [p[1] for p in parts])
    close(merged, whole)


def test_merge_states_by_hand_and_all_empty():
    outs = [np.array([[1.0], [5.0]]), np.array([[3.0], [np.nan]])]
    lses = [np.array([0.0, -np.inf]), np.array([math.log(3.0), -np.inf])]
    out, lse = ref.merge_states(outs, lses)
    # Row 0: weights 1/4 and 3/4; row 1: both parts empty -> 0 / -inf (the NaN part is ignored).
    close(out, [[2.5], [0.0]])
    close(lse, [math.log(4.0), -np.inf])


def test_merge_states_single_part_is_identity(rng):
    o, s = rng.standard_normal((3, 2)), rng.standard_normal(3)
    out, lse = ref.merge_states([o], [s])
    close(out, o)
    close(lse, s)
