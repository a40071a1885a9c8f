"""The score modifiers -- softcap, ALiBi and attention sinks -- in the compiled kernels.

Every fused-attention path (tiled: float/double, widened 16-bit, bfloat16 pairs on avx512bf16, AMX
tiles; row-wise decode; the additive score tile; the key-split variants of both; the weights pass) and
both backward kernels, on every target (the ``isa`` fixture), against attnfast.reference, which
evaluates the formulas (README "Numerics") in float64:

    s <- c tanh(s / c)                         softcap c
    s <- s - slope |diag_i - j|                ALiBi, diag_i the causal_align diagonal
    s <- s + bias, then the masks (-inf)
    out_i = sum_j e^(s_ij - m) v_j / (e^(sink - m) + sum_j e^(s_ij - m)),  lse_i = logaddexp(lse_i, sink)

held to the one tolerance table (tests/conftest.py) through a naive computation of the same formulas
in the input precision (modified_attention: the sink as one extra key whose score is the sink and whose
value row is 0, which is what the formula says).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import attnfast
from attnfast import _inputs
from attnfast import reference
from conftest import (
    FINITE_DIFFERENCE,
    SIXTEEN_BIT,
    assert_close_to_reference,
    method_weights,
    naive_scores,
    naive_softmax,
    poisoned_kv,
    rounded_to,
    up,
)

pytestmark = pytest.mark.usefixtures("isa")

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), BF16]
METHODS = ["dot", "scaled_dot", "general", "concat", "additive"]
MODIFIERS = ["softcap", "alibi", "sinks", "all"]

# ---------------------------------------------------------------------------------------------------
# Calling the kernels with modifiers
# ---------------------------------------------------------------------------------------------------

def run_attention(q, k, v, mods, **kw):
    """attnfast.attention with the modifiers in ``mods``: (out, lse, weights)."""
    return attnfast.attention(q, k, v, return_lse=True, return_weights=True, **mods, **kw)


def run_backward(dout, q, k, v, out, lse, mods, **kw):
    return attnfast.attention_backward(dout, q, k, v, out, lse, **mods, **kw)


# ---------------------------------------------------------------------------------------------------
# The formulas, in float64 (the reference) or in the input precision (the naive yardstick)
# ---------------------------------------------------------------------------------------------------


def modified_attention(q, k, v, mods, *, rounded=None, **kw):
    """(out, lse, weights) of the modified attention in plain NumPy in the arrays' computation dtype
    (float64 on up-cast inputs: the reference); with ``rounded`` (a 16-bit dtype) every stage rounded
    to it, as conftest.naive_attention does. Visibility from the reference's own mask logic."""
    a = _inputs.check_attention(q, k, v, **kw)
    t = a.compute
    rnd = rounded_to(rounded)
    kk = np.broadcast_to(a.k, a.kv_batch_shape + (a.lk, a.dk)).astype(t)
    vv = np.broadcast_to(a.v, a.kv_batch_shape + (a.lk, a.dv)).astype(t)
    if a.group > 1:
        kk, vv = np.repeat(kk, a.group, axis=-3), np.repeat(vv, a.group, axis=-3)
    weights_kw = dict(w=a.w, w_q=a.w_q, w_k=a.w_k, v_a=a.v_a, score_bias=a.score_bias)
    s = rnd(naive_scores(a.q.astype(t), kk, method=a.method, scale=a.scale, **weights_kw))
    s = np.broadcast_to(s, a.batch_shape + (a.lq, a.lk))
    if mods.get("softcap") is not None:
        c = t.type(mods["softcap"])
        s = rnd((c * np.tanh(s / c)).astype(t))
    if mods.get("alibi_slopes") is not None:
        offset = a.diagonal_offset
        if a.diagonal_offsets is not None:  # bottom_right with kv_lengths: each item's own diagonal
            offset = np.broadcast_to(a.diagonal_offsets, a.batch_shape)[..., None, None]
        i = np.arange(a.lq)[:, None] + offset
        distance = np.abs(i - np.arange(a.lk)[None, :]).astype(t)
        slopes = np.asarray(mods["alibi_slopes"], np.float64).astype(t)[..., None, None]
        s = rnd((s - slopes * distance).astype(t))
    if a.bias is not None:
        s = rnd((s + a.bias.astype(t)).astype(t))
    s = np.where(reference._visibility(a), s, t.type(-np.inf))
    sink = mods.get("sinks")
    sink = np.full(a.batch_shape, -np.inf) if sink is None else np.asarray(sink, np.float64)
    sink_column = np.broadcast_to(sink.astype(t)[..., None, None], a.batch_shape + (a.lq, 1))
    weights, lse = naive_softmax(np.concatenate([s, sink_column], axis=-1), -1, return_lse=True)
    weights = rnd(weights[..., :-1])
    out = rnd((weights @ vv).astype(t))
    return out, lse, weights


def check(q, k, v, mods, *, what="attention", **kw):
    """The kernel's out, lse and weights against attnfast.reference (tolerance table), and the edge
    rules: rows with no visible key give out 0, weights 0 and lse = sink (-inf without one); hidden keys
    weigh exactly 0. Returns the kernel's (out, lse, weights)."""
    dtype = np.dtype(np.asarray(q).dtype)
    out, lse, w = run_attention(q, k, v, mods, **kw)
    up_kw = {name: (up(x) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x) for name, x in kw.items()}
    r_out, r_lse, r_w = reference.attention(up(q), up(k), up(v), return_lse=True, return_weights=True,
                                            **{name: up(x) for name, x in mods.items()}, **up_kw)
    n_out, n_lse, n_w = modified_attention(q, k, v, mods, **kw)
    v_scale = float(np.max(np.abs(up(v)), initial=0.0)) or 1.0
    if dtype in SIXTEEN_BIT:
        n_out, _, n_w = modified_attention(q, k, v, mods, rounded=dtype, **kw)
        v_scale = None
    assert_close_to_reference(out, r_out, n_out, dtype, scale=v_scale, what=f"{what}: out")
    assert_close_to_reference(lse, r_lse, n_lse, _inputs.lse_dtype(dtype), what=f"{what}: lse")
    assert_close_to_reference(w, r_w, n_w, dtype, scale=1.0, what=f"{what}: weights")
    a = _inputs.check_attention(q, k, v, **kw)
    visible = reference._visibility(a)
    if a.bias is not None:
        visible = visible & np.broadcast_to(a.bias != -np.inf, visible.shape)
    assert np.all(w[~visible] == 0), f"{what}: hidden keys must weigh exactly 0"
    empty = ~visible.any(axis=-1)
    sink = mods.get("sinks")
    sink = np.full(a.batch_shape, -np.inf) if sink is None else np.asarray(sink, np.float64)
    expected_lse = np.broadcast_to(sink.astype(lse.dtype)[..., None], lse.shape)
    assert np.array_equal(lse[empty], expected_lse[empty]), f"{what}: a row with no visible key has lse = sink"
    assert np.all(out[empty] == 0), f"{what}: rows with no visible key must give out 0"
    return out, lse, w


def modifiers(rng, which, heads, batch=None):
    """Modifier arguments: softcap near the scores' size (so that it bends them), ALiBi slopes as
    ALiBi's geometric sequence (per head, or per (item, head) when ``batch``), sinks of both signs."""
    shape = (heads,) if batch is None else (batch, heads)
    slopes = 2.0 ** (-8.0 * (np.arange(1, heads + 1) / heads))
    mods = {
        "softcap": dict(softcap=1.5),
        "alibi": dict(alibi_slopes=np.broadcast_to(slopes, shape) * rng.uniform(0.5, 4.0, shape)),
        "sinks": dict(sinks=rng.uniform(-2.0, 3.0, shape)),
    }
    if which == "all":
        return {**mods["softcap"], **mods["alibi"], **mods["sinks"]}
    return mods[which]


def random_inputs(rng, dtype, batch, lq, lk, d, dv=None, kv_heads=None):
    heads = batch[-1]
    kv_batch = batch[:-1] + ((heads if kv_heads is None else kv_heads),)
    q = (rng.standard_normal(batch + (lq, d)) * 1.5).astype(dtype)
    k = rng.standard_normal(kv_batch + (lk, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (lk, d if dv is None else dv)).astype(dtype)
    return q, k, v


def method_kw(rng, method, d, dtype):
    return method_weights(rng, method, d, d, np.float32 if np.dtype(dtype) in SIXTEEN_BIT else np.dtype(dtype).type)


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------

# (Lq, Lk, heads, kv heads): row-wise (Lq * group <= 16) and tiled, GQA in both.
PATHS = {"rowwise": (3, 70, 4, 2), "tiled": (53, 131, 2, 1)}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", MODIFIERS)
def test_modifiers_with_masks_and_bias(rng, which, method, dtype, path):
    lq, lk, heads, kv_heads = PATHS[path]
    d = 17
    q, k, v = random_inputs(rng, dtype, (2, heads), lq, lk, d, kv_heads=kv_heads)
    mask = rng.random((lq, lk)) < 0.8
    mask[1] = False  # a row that sees no key
    bias = rng.standard_normal((2, heads, lq, lk)).astype(np.float64 if dtype == np.float64 else np.float32)
    kw = dict(method=method, mask=mask, bias=bias, causal=True, causal_align="bottom_right",
              **method_kw(rng, method, d, dtype))
    check(q, k, v, modifiers(rng, which, heads, batch=2 if which == "alibi" else None),
          what=f"{which}/{method}/{path}", **kw)


@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
@pytest.mark.parametrize("lq, lk", [(5, 9), (9, 5), (60, 200), (200, 60)])
def test_alibi_follows_the_causal_alignment(rng, align, lq, lk):
    q, k, v = random_inputs(rng, np.float32, (1, 3), lq, lk, 16)
    for causal in (False, True):
        for window in (None, (4, 2)):
            check(q, k, v, modifiers(rng, "alibi", 3), causal=causal, causal_align=align, window=window,
                  what=f"alibi causal={causal} window={window}")


@pytest.mark.parametrize("lq", [4, 60])
def test_alibi_aligns_to_each_items_kv_lengths(rng, lq):
    """bottom_right with kv_lengths: ALiBi's diagonal is each item's own (diag_i = i + kv_lengths[b] - Lq,
    the kernel's diagonal_offsets), as causal's is."""
    q, k, v = random_inputs(rng, np.float32, (3, 2), lq, 200, 16)
    lengths = np.array([[200], [130], [lq + 3]])
    check(q, k, v, modifiers(rng, "all", 2, batch=3), kv_lengths=lengths, causal=True,
          causal_align="bottom_right", what="alibi per-item diagonal")


@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=str)
@pytest.mark.parametrize("which", MODIFIERS)
@pytest.mark.parametrize("shape", [(1, 1, 1, 5000), (1, 2, 4, 4100), (1, 1, 100, 3000)],
                         ids=["rowwise-split", "rowwise-gqa-split", "tiled-split"])
def test_key_split_calls(rng, shape, which, dtype):
    """Few kv items and many keys split the keys into chunks merged by log-sum-exp (attention_schedule.h):
    the sink must join each row once, after the merge."""
    batch, heads, lq, lk = shape
    q, k, v = random_inputs(rng, dtype, (batch, heads), lq, lk, 32)
    check(q, k, v, modifiers(rng, which, heads), causal=True, causal_align="bottom_right", what=f"split {which}")


@pytest.mark.parametrize("d", [1, 3, 17, 63, 65, 97])
@pytest.mark.parametrize("lq, lk", [(1, 1), (2, 97), (97, 2), (97, 1025)])
def test_awkward_sizes(rng, d, lq, lk):
    q, k, v = random_inputs(rng, np.float32, (1, 2), lq, lk, d, dv=max(1, d - 2))
    check(q, k, v, modifiers(rng, "all", 2), causal=lq <= lk, causal_align="bottom_right",
          what=f"D={d} Lq={lq} Lk={lk}")


@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30])
@pytest.mark.parametrize("lq", [2, 60])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, BF16], ids=str)
def test_hidden_key_garbage_never_reaches_a_result(rng, dtype, lq, garbage):
    """Keys past kv_lengths and a masked key hold garbage; with every modifier on, the results equal
    those of clean inputs (softcap turns a NaN score into NaN and a +-inf one into +-c: only the masks
    may hide them)."""
    lk, masked_key = 150, 7
    lengths = np.array([lk, 90, 0])
    q, k, v = random_inputs(rng, dtype, (3,), lq, lk, 24)
    mask = np.ones((lq, lk), bool)
    mask[:, masked_key] = False
    dirty_k, dirty_v = poisoned_kv(k, v, lengths, masked_key, garbage)
    mods = dict(softcap=2.0, alibi_slopes=np.array([0.25, 0.05, 0.1]), sinks=np.array([0.5, -1.0, 2.0]))
    kw = dict(mask=mask, kv_lengths=lengths, causal=True)
    clean = check(q, k, v, mods, what="clean inputs", **kw)
    out, lse, w = run_attention(q, dirty_k, dirty_v, mods, **kw)
    for got, expected, name in zip((out, lse, w), clean, ("out", "lse", "weights")):
        assert np.array_equal(got, expected), f"{name} depends on hidden keys' values"
    assert np.array_equal(lse[2], np.full(lq, 2.0, lse.dtype))  # item 2 sees no key: lse = its sink
    assert np.all(out[2] == 0) and np.all(w[2] == 0)


@pytest.mark.parametrize("lq", [3, 60])
def test_rows_whose_max_is_infinite_ignore_the_sink(rng, lq):
    """A +inf bias on some keys of a row: in the limit those keys take all the weight, each 1 / count,
    whatever the (finite) sink; lse is +inf. Documented in attention_common.h (fold_sink)."""
    q, k, v = random_inputs(rng, np.float32, (1, 2), lq, 80, 16)
    bias = np.zeros((lq, 80), np.float32)
    bias[0, [3, 50]] = np.inf
    out, lse, w = run_attention(q, k, v, dict(softcap=3.0, sinks=np.array([1.0, 10.0])), bias=bias)
    assert np.all(lse[:, :, 0] == np.inf)
    expected = np.zeros(80, np.float32)
    expected[[3, 50]] = 0.5
    assert np.array_equal(w[0, 0, 0], expected) and np.array_equal(w[0, 1, 0], expected)
    np.testing.assert_allclose(out[:, :, 0], (v[:, :, 3] + v[:, :, 50]) / 2, rtol=1e-6)
    assert np.all(np.isfinite(lse[:, :, 1:]))


def test_the_sink_takes_its_share_of_each_row(rng):
    """Rows of the weights sum to 1 - e^(sink - lse) (the sink's share), and a sink far above the
    scores leaves out near 0 without overflow."""
    q, k, v = random_inputs(rng, np.float32, (1, 2), 50, 300, 32)
    sinks = np.array([0.5, 80.0])
    out, lse, w = run_attention(q, k, v, dict(sinks=sinks))
    share = 1.0 - np.exp(sinks[None, :, None] - lse.astype(np.float64))
    np.testing.assert_allclose(w.astype(np.float64).sum(-1), share, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(out)) and np.all(np.abs(out[0, 1]) < 1e-20)
    np.testing.assert_allclose(lse[0, 1], 80.0, rtol=1e-6)


def test_results_do_not_depend_on_the_thread_count(rng, threads):
    """Bitwise the same for 1 and 2 threads, split and unsplit, both paths."""
    for shape in [(1, 1, 1, 5000), (1, 1, 100, 3000), (2, 4, 60, 200), (2, 4, 2, 300)]:
        batch, heads, lq, lk = shape
        q, k, v = random_inputs(rng, np.float32, (batch, heads), lq, lk, 32)
        mods = modifiers(rng, "all", heads)
        results = []
        for n in (1, 2):
            attnfast.set_num_threads(n)
            results.append(run_attention(q, k, v, mods, causal=True))
        for one, two in zip(*results):
            assert np.array_equal(one, two)


def test_no_modifier_is_the_plain_call(rng):
    """softcap 0, no slopes, no sinks: bitwise the call without them (the kernels take no new branch)."""
    q, k, v = random_inputs(rng, np.float32, (2, 2), 60, 130, 16)
    plain = attnfast.attention(q, k, v, causal=True, return_lse=True, return_weights=True)
    for got, expected in zip(run_attention(q, k, v, {}, causal=True), plain):
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("kv_lengths", [None, np.array([[11], [6]])])
def test_naive_formula_matches_the_reference(rng, kv_lengths):
    """The naive yardstick above, run in float64, is attnfast.reference's attention."""
    q, k, v = random_inputs(rng, np.float64, (2, 3), 7, 11, 5)
    mods = modifiers(rng, "all", 3, batch=2)
    kw = dict(mask=rng.random((7, 11)) < 0.8, causal=True, causal_align="bottom_right", kv_lengths=kv_lengths)
    mine = modified_attention(q, k, v, mods, **kw)
    theirs = reference.attention(q, k, v, return_lse=True, return_weights=True, **mods, **kw)
    for x, y in zip(mine, theirs):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------


def _loss(q, k, v, dout, mods, kw):
    out, _, _ = run_attention(q, k, v, mods, **kw)
    return float(np.sum(out * dout))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", MODIFIERS)
@pytest.mark.parametrize("lq, lk", [(5, 7), (60, 130)], ids=["small", "tiled"])
def test_gradients_match_finite_differences(rng, which, method, lq, lk):
    """float64 gradients of every input (q, k, v, the bias, the method's weights) against central
    differences of the float64 forward along random directions (FINITE_DIFFERENCE: the forward's own
    error, ~1e-16, is far below the difference's ~1e-11). Covers the softcap's chain rule in dq / dk
    (and dqp / dkp / dv_a) and dscores staying the bias's gradient, ALiBi inside the recomputed
    scores, and the sink through the saved lse."""
    heads, d = 2, 6
    q, k, v = random_inputs(rng, np.float64, (1, heads), lq, lk, d)
    weights = method_kw(rng, method, d, np.float64)
    bias = rng.standard_normal((lq, lk))
    kw = dict(method=method, bias=bias, mask=rng.random((lq, lk)) < 0.9, causal=True,
              causal_align="bottom_right", **weights)
    mods = modifiers(rng, which, heads)
    if "softcap" in mods:
        mods["softcap"] = 0.8  # scores well into the cap's bend
    dout = rng.standard_normal((1, heads, lq, d))
    out, lse, _ = run_attention(q, k, v, mods, **kw)
    grads = run_backward(dout, q, k, v, out, lse, mods, **kw)
    inputs = {"q": (q, grads.dq), "k": (k, grads.dk), "v": (v, grads.dv), "bias": (bias, grads.dbias)}
    for name, field in [("w", "dw"), ("w_q", "dw_q"), ("w_k", "dw_k"), ("v_a", "dv_a")]:
        if weights.get(name) is not None:
            inputs[name] = (weights[name], getattr(grads, field))
    if "sinks" in mods:
        inputs["sinks"] = (mods["sinks"], grads.dsinks)
    h = FINITE_DIFFERENCE["step"]
    for name, (x, g) in inputs.items():
        direction = rng.standard_normal(x.shape)
        x += h * direction
        plus = _loss(q, k, v, dout, mods, kw)
        x -= 2 * h * direction
        minus = _loss(q, k, v, dout, mods, kw)
        x += h * direction
        numeric = (plus - minus) / (2 * h)
        analytic = float(np.sum(g * direction))
        tol = FINITE_DIFFERENCE["atol"] * max(1.0, float(np.max(np.abs(g)))) * np.sqrt(x.size) \
            + FINITE_DIFFERENCE["rtol"] * abs(analytic)
        assert abs(numeric - analytic) <= tol, f"{which}/{method} d{name}: {analytic} vs {numeric}"


def modified_backward(dout, q, k, v, out, lse, mods, *, scale):
    """dq, dk, dv of dot-product attention with the modifiers, whole matrices, in the arrays' dtype:
    P = exp(s - lse) from the forward's lse (which holds the sink), dS = P (dO V^T - rowsum(dO O)),
    chained through the softcap's 1 - tanh^2, then dq = scale dS K, dk = scale dS^T Q, dv = P^T dO."""
    t = q.dtype
    s_raw = (q @ np.swapaxes(k, -1, -2)) * t.type(scale)
    s, slope = s_raw, np.ones_like(s_raw)
    if mods.get("softcap") is not None:
        c = t.type(mods["softcap"])
        th = np.tanh(s_raw / c)
        s, slope = c * th, 1 - th * th
    if mods.get("alibi_slopes") is not None:
        lq, lk = s.shape[-2:]
        distance = np.abs(np.arange(lq)[:, None] + (lk - lq) - np.arange(lk)[None, :]).astype(t)
        s = s - np.asarray(mods["alibi_slopes"]).astype(t)[..., None, None] * distance
    visible = np.tril(np.ones(s.shape[-2:], bool), s.shape[-1] - s.shape[-2])
    p = np.where(visible, np.exp(np.where(visible, s, 0) - lse[..., None]), 0).astype(t)
    ds = p * (dout @ np.swapaxes(v, -1, -2) - np.sum(dout * out, -1, keepdims=True))
    ds_raw = ds * slope
    grads = {"dq": ds_raw @ k * t.type(scale), "dk": np.swapaxes(ds_raw, -1, -2) @ q * t.type(scale),
             "dv": np.swapaxes(p, -1, -2) @ dout}
    # The magnitude of each gradient's summed terms (conftest.backward_scales' rule, |1 - tanh^2| <= 1):
    # |dS| <= P (|dO| |V|^T + |dO| . |O|), then the same products on absolute values.
    abs_ds = p * (np.abs(dout) @ np.swapaxes(np.abs(v), -1, -2) + np.sum(np.abs(dout * out), -1, keepdims=True))
    magnitudes = {"dq": abs_ds @ np.abs(k) * abs(scale), "dk": np.swapaxes(abs_ds, -1, -2) @ np.abs(q) * abs(scale),
                  "dv": np.swapaxes(p, -1, -2) @ np.abs(dout)}
    return grads, {name: float(np.max(x, initial=0.0)) or 1.0 for name, x in magnitudes.items()}


@pytest.mark.parametrize("which", MODIFIERS)
@pytest.mark.parametrize("lq, lk", [(4, 300), (70, 150)], ids=["few-rows", "tiled"])
def test_float32_gradients_against_float64(rng, which, lq, lk):
    """float32 gradients of scaled_dot attention held to the tolerance table: the float64 formulas
    (on the float64 forward's out and lse) vs the kernel, against the same formulas in float32 (on the
    float32 forward's), with each gradient's scale the magnitude of its summed terms."""
    heads, d = 2, 32
    q, k, v = random_inputs(rng, np.float32, (1, heads), lq, lk, d)
    mods = modifiers(rng, which, heads)
    kw = dict(causal=True, causal_align="bottom_right")
    dout = rng.standard_normal((1, heads, lq, d)).astype(np.float32)
    out, lse, _ = run_attention(q, k, v, mods, **kw)
    grads = run_backward(dout, q, k, v, out, lse, mods, **kw)
    out64, lse64, _ = run_attention(up(q), up(k), up(v), mods, **kw)
    scale = 1.0 / np.sqrt(d)
    ref, magnitudes = modified_backward(up(dout), up(q), up(k), up(v), out64, lse64, mods, scale=scale)
    naive, _ = modified_backward(dout, q, k, v, out, lse, mods, scale=scale)
    for name in ("dq", "dk", "dv"):
        assert_close_to_reference(getattr(grads, name), ref[name], naive[name], np.float32,
                                  scale=magnitudes[name], what=f"{which} {name}")
