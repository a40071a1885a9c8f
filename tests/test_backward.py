"""attention_backward: the float64 reference against central finite differences of the reference
forward, its visibility rules (hidden keys, empty rows, overflowed rows), gradient dtypes, and the
validation both implementations share.

The reference is what every other backward test trusts, so it is checked here against the definition
of a gradient, not against another formula: for the loss f = sum(dout * attention(...)), each
gradient element must match (f(x + h) - f(x - h)) / 2h (tolerances: FINITE_DIFFERENCE in conftest).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import attnfast
from attnfast import reference

from conftest import FINITE_DIFFERENCE, method_weights

PARAMETERS = ("bias", "w", "w_q", "w_k", "score_bias", "v_a")
# Method variants: additive also with already-projected queries and/or keys (w_q / w_k None).
VARIANTS = ["dot", "scaled_dot", "general", "concat", "additive", "additive_qp", "additive_kp", "additive_qkp"]


# --------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------


def _loss(dout, values, options):
    """sum(dout * out) of the float64 reference forward, with the differentiable inputs in ``values``."""
    arrays = {name: values[name] for name in PARAMETERS if name in values}
    out = reference.attention(values["q"], values["k"], values["v"], **options, **arrays)
    return float(np.sum(dout * out))


def finite_difference_gradients(dout, values, options):
    """Central differences of the loss with respect to every element of every array in ``values``."""
    h = FINITE_DIFFERENCE["step"]
    values = {name: np.array(x, dtype=np.float64) for name, x in values.items()}  # own, writeable
    grads = {}
    for name, x in values.items():
        g = np.zeros(x.shape)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + h
            up = _loss(dout, values, options)
            x[idx] = old - h
            down = _loss(dout, values, options)
            x[idx] = old
            g[idx] = (up - down) / (2 * h)
        grads[name] = g
    return grads


def assert_matches_finite_differences(grads, dout, values, options):
    expected = finite_difference_gradients(dout, values, options)
    for name, e in expected.items():
        actual = getattr(grads, "d" + name)
        assert actual is not None, f"d{name} is None"
        assert actual.shape == e.shape, f"d{name}: shape {actual.shape}, expected {e.shape}"
        # The differences' own error is absolute (eps |f| / h, f of order 1), so the scale is at least 1:
        # e.g. concat's dq is exactly 0 (its query term shifts every score of a row alike).
        scale = max(float(np.max(np.abs(e), initial=0.0)), 1.0)
        tol = FINITE_DIFFERENCE["atol"] * scale + FINITE_DIFFERENCE["rtol"] * np.abs(e)
        err = np.abs(actual.astype(np.float64) - e)
        assert np.all(err <= tol), (
            f"d{name}: max error {err.max():.3e} against finite differences (scale {scale:.3g}); "
            f"got {actual.ravel()[:6]}, expected {e.ravel()[:6]}"
        )


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


def variant_weights(rng, variant, d, dk, hidden=3):
    """(method, weights) for a VARIANTS entry; the additive variants with projected operands drop
    w_q / w_k (q / k then have A = D features)."""
    if not variant.startswith("additive"):
        return variant, method_weights(rng, variant, d, dk, np.float64)
    weights = method_weights(rng, "additive", d, dk, np.float64, hidden=d if variant != "additive" else hidden)
    if variant in ("additive_qp", "additive_qkp"):
        del weights["w_q"]
    if variant in ("additive_kp", "additive_qkp"):
        del weights["w_k"]
    return "additive", weights


def make_case(rng, variant="scaled_dot", batch=(2,), kv_batch=None, lq=3, lk=4, d=3, dv=2, bias_shape=None):
    """Differentiable float64 inputs (q, k, v, method weights, bias) and the method option."""
    kv_batch = batch if kv_batch is None else kv_batch
    method, weights = variant_weights(rng, variant, d, d)
    values = {
        "q": rng.standard_normal(batch + (lq, d)),
        "k": rng.standard_normal(kv_batch + (lk, d)),
        "v": rng.standard_normal(kv_batch + (lk, dv)),
        **{name: np.asarray(x, np.float64) for name, x in weights.items()},
    }
    if bias_shape is not None:
        values["bias"] = rng.standard_normal(bias_shape)
    return values, {"method": method}


def reference_gradients(rng, values, options):
    """dout and the reference backward's gradients of the loss sum(dout * out)."""
    arrays = {name: values[name] for name in PARAMETERS if name in values}
    out, lse = reference.attention(values["q"], values["k"], values["v"], return_lse=True, **options, **arrays)
    dout = rng.standard_normal(out.shape)
    grads = reference.attention_backward(dout, values["q"], values["k"], values["v"], out, lse, **options,
                                         **arrays)
    return dout, grads


def check_against_finite_differences(rng, values, options):
    dout, grads = reference_gradients(rng, values, options)
    assert_matches_finite_differences(grads, dout, values, options)
    return grads


# --------------------------------------------------------------------------
# The reference against finite differences
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_every_method(rng, variant):
    values, options = make_case(rng, variant, batch=(2, 2))
    grads = check_against_finite_differences(rng, values, options)
    method = options["method"]
    assert (grads.dw is not None) == (method == "general")
    assert (grads.dw_q is not None) == (method == "concat" or "w_q" in values)
    assert (grads.dw_k is not None) == (method == "concat" or "w_k" in values)
    assert (grads.dscore_bias is not None) == (method in ("concat", "additive"))
    assert (grads.dv_a is not None) == (method == "additive")
    assert grads.dbias is None


@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive"])
@pytest.mark.parametrize("lq, lk", [(3, 5), (5, 3)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_reference_causal(rng, variant, lq, lk, align):
    values, options = make_case(rng, variant, lq=lq, lk=lk)
    check_against_finite_differences(rng, values, {**options, "causal": True, "causal_align": align})


@pytest.mark.parametrize("window", [(1, 0), (None, 1), (0, 0), (2, None)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_reference_window(rng, window, align):
    values, options = make_case(rng, "scaled_dot", lq=4, lk=6)
    check_against_finite_differences(rng, values, {**options, "window": window, "causal_align": align})


@pytest.mark.parametrize("variant", ["dot", "general", "concat", "additive"])
def test_reference_mask_with_empty_rows(rng, variant):
    values, options = make_case(rng, variant, batch=(2,), lq=4, lk=5)
    mask = rng.random((2, 4, 5)) < 0.6
    mask[0, 1] = False  # a row with no visible key
    mask[1, :, 2] = False  # a key no row sees
    grads = check_against_finite_differences(rng, values, {**options, "mask": mask})
    assert np.all(grads.dq[0, 1] == 0)
    assert np.all(grads.dk[1, 2] == 0) and np.all(grads.dv[1, 2] == 0)


@pytest.mark.parametrize("variant", ["scaled_dot", "concat", "additive"])
def test_reference_kv_lengths_including_zero(rng, variant):
    values, options = make_case(rng, variant, batch=(3,), lq=3, lk=4)
    lengths = np.array([0, 2, 4])
    grads = check_against_finite_differences(rng, values, {**options, "kv_lengths": lengths})
    assert np.all(grads.dq[0] == 0) and np.all(grads.dk[0] == 0) and np.all(grads.dv[0] == 0)
    assert np.all(grads.dk[1, 2:] == 0) and np.all(grads.dv[1, 2:] == 0)


@pytest.mark.parametrize("bias_shape", [(2, 3, 4), (1, 3, 4), (4,), (3, 1)])
@pytest.mark.parametrize("variant", ["scaled_dot", "additive"])
def test_reference_bias_broadcast(rng, bias_shape, variant):
    values, options = make_case(rng, variant, batch=(2,), lq=3, lk=4, bias_shape=bias_shape)
    grads = check_against_finite_differences(rng, values, options)
    assert grads.dbias.shape == bias_shape


def test_reference_bias_minus_inf_hides_keys(rng):
    values, options = make_case(rng, "scaled_dot", batch=(2,), lq=3, lk=4, bias_shape=(2, 3, 4))
    values["bias"][0, :, 1] = -np.inf
    values["bias"][1, 2, :] = -np.inf  # a row with no visible key
    dout, grads = reference_gradients(rng, values, options)
    # Finite differences of a -inf entry are NaN (inf - inf): compare the finite entries only, where a
    # -inf bias entry's gradient must be exactly 0.
    assert np.all(grads.dbias[values["bias"] == -np.inf] == 0)
    assert np.all(grads.dk[0, 1] == 0) and np.all(grads.dv[0, 1] == 0) and np.all(grads.dq[1, 2] == 0)
    finite = {name: x for name, x in values.items() if name != "bias"}
    options = {**options, "bias": values["bias"]}
    expected = finite_difference_gradients(dout, finite, options)
    for name, e in expected.items():
        np.testing.assert_allclose(getattr(grads, "d" + name), e, rtol=FINITE_DIFFERENCE["rtol"],
                                   atol=FINITE_DIFFERENCE["atol"] * max(np.max(np.abs(e)), 1.0))


@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive", "additive_qkp"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 1), (1, 3)], ids=["gqa", "mqa", "one_query_head"])
def test_reference_grouped_heads(rng, variant, heads):
    hq, hk = heads
    values, options = make_case(rng, variant, batch=(2, hq), kv_batch=(2, hk), lq=3, lk=4)
    grads = check_against_finite_differences(rng, values, {**options, "causal": True})
    assert grads.dk.shape == (2, hk, 4, 3) and grads.dq.shape == (2, hq, 3, 3)


@pytest.mark.parametrize("variant", ["scaled_dot", "general", "concat", "additive"])
def test_reference_broadcast_batch(rng, variant):
    # q shared over the leading axis, k over the heads, v over neither: each gradient sums over the
    # axes its input was broadcast along.
    method, weights = variant_weights(rng, variant, 3, 3)
    values = {
        "q": rng.standard_normal((1, 2, 3, 3)),
        "k": rng.standard_normal((2, 1, 4, 3)),
        "v": rng.standard_normal((2, 2, 4, 2)),
        "bias": rng.standard_normal((1, 1, 3, 4)),
        **{name: np.asarray(x, np.float64) for name, x in weights.items()},
    }
    check_against_finite_differences(rng, values, {"method": method})


def test_reference_every_mask_at_once(rng):
    values, options = make_case(rng, "general", batch=(2, 4), kv_batch=(2, 2), lq=5, lk=6,
                                bias_shape=(1, 4, 5, 6))
    mask = rng.random((5, 6)) < 0.8
    options = {**options, "mask": mask, "causal": True, "causal_align": "bottom_right", "window": (3, None),
               "kv_lengths": np.array([[5], [0]]), "scale": 0.7}
    check_against_finite_differences(rng, values, options)


# --------------------------------------------------------------------------
# The reference's visibility rules
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("garbage", [np.nan, np.inf, -np.inf, 1e30])
def test_reference_hidden_keys_contribute_nothing(rng, variant, garbage):
    """Keys past kv_lengths and masked keys hold garbage: every gradient is the one of clean data, the
    garbage keys' gradients are exactly 0, and rows with no visible key get exactly 0 too."""
    values, options = make_case(rng, variant, batch=(3,), lq=3, lk=5)
    options = {**options, "kv_lengths": np.array([0, 2, 5]), "mask": np.array([True, True, True, False, True])}
    dout, clean = reference_gradients(rng, values, options)
    dirty = dict(values)
    for name in ("k", "v"):
        dirty[name] = values[name].copy()
        dirty[name][1, 2:] = garbage
        dirty[name][:, 3] = garbage
        dirty[name][0] = garbage
    arrays = {name: dirty[name] for name in PARAMETERS if name in dirty}
    out, lse = reference.attention(dirty["q"], dirty["k"], dirty["v"], return_lse=True, **options, **arrays)
    grads = reference.attention_backward(dout, dirty["q"], dirty["k"], dirty["v"], out, lse, **options, **arrays)
    for field in grads._fields:
        got, want = getattr(grads, field), getattr(clean, field)
        assert (got is None) == (want is None), field
        if got is not None:
            np.testing.assert_array_equal(got, want, err_msg=field)
    assert np.all(grads.dq[0] == 0)
    assert np.all(grads.dk[0] == 0) and np.all(grads.dk[1, 2:] == 0) and np.all(grads.dk[:, 3] == 0)
    assert np.all(grads.dv[0] == 0) and np.all(grads.dv[1, 2:] == 0) and np.all(grads.dv[:, 3] == 0)


def test_reference_overflowed_row(rng):
    """A float32 row whose scores overflow to +inf: P = 1/count on its +inf scores, so dV gets P^T dO,
    but dS = 0 for the row (dq 0, nothing to dk)."""
    q = rng.standard_normal((3, 2)).astype(np.float32)
    k = rng.standard_normal((4, 2)).astype(np.float32)
    v = rng.standard_normal((4, 3)).astype(np.float32)
    q[0] = [3e38, 0]
    k[:, 0] = [2, 3, -2, 1.5]  # row 0: +inf, +inf, -inf (hidden), +inf
    out, lse, p = reference.attention(q, k, v, method="dot", return_lse=True, return_weights=True)
    assert lse[0] == np.inf and np.all(p[0] == np.float32([1 / 3, 1 / 3, 0, 1 / 3]))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = reference.attention_backward(dout, q, k, v, out, lse, method="dot")
    rest = reference.attention_backward(dout[1:], q[1:], k, v, out[1:], lse[1:], method="dot")
    assert np.all(grads.dq[0] == 0)
    np.testing.assert_array_equal(grads.dq[1:], rest.dq)
    np.testing.assert_array_equal(grads.dk, rest.dk)
    expected_dv = rest.dv.astype(np.float64) + np.outer(p[0].astype(np.float64), dout[0].astype(np.float64))
    np.testing.assert_allclose(grads.dv, expected_dv, rtol=1e-6, atol=1e-6)


def test_reference_empty_calls_give_zero_gradients(rng):
    q = rng.standard_normal((2, 3, 4))
    k = np.zeros((2, 0, 4))
    v = np.zeros((2, 0, 5))
    out, lse = reference.attention(q, k, v, return_lse=True)
    grads = reference.attention_backward(np.ones(out.shape), q, k, v, out, lse, bias=np.zeros((3, 0)))
    assert grads.dq.shape == q.shape and np.all(grads.dq == 0)
    assert grads.dk.shape == k.shape and grads.dv.shape == v.shape and grads.dbias.shape == (3, 0)
    # Dv = 0: the loss depends on nothing.
    v0 = np.zeros((2, 6, 0))
    k6 = rng.standard_normal((2, 6, 4))
    out, lse = reference.attention(q, k6, v0, return_lse=True, method="general", w=np.eye(4))
    grads = reference.attention_backward(out, q, k6, v0, out, lse, method="general", w=np.eye(4))
    assert np.all(grads.dq == 0) and np.all(grads.dk == 0) and np.all(grads.dw == 0)
    assert grads.dv.shape == (2, 6, 0)


# --------------------------------------------------------------------------
# Gradient dtypes
# --------------------------------------------------------------------------


BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtypes", [
    (np.float32, np.float32, np.float32),
    (np.float64, np.float32, np.float32),
    (np.float32, BF16, BF16),
    (BF16, BF16, BF16),
    (np.float16, np.float16, np.float16),
    (np.float16, BF16, np.float32),
], ids=str)
def test_gradients_have_their_inputs_dtypes(rng, impl, dtypes):
    backward = reference.attention_backward if impl == "reference" else attnfast.attention_backward
    q = rng.standard_normal((2, 3, 4)).astype(dtypes[0])
    k = rng.standard_normal((2, 5, 4)).astype(dtypes[1])
    v = rng.standard_normal((2, 5, 2)).astype(dtypes[2])
    bias = rng.standard_normal((3, 5)).astype(np.float16)
    out, lse = attnfast.attention(q, k, v, bias=bias, return_lse=True)
    grads = backward(out, q, k, v, out, lse, bias=bias)
    assert (grads.dq.dtype, grads.dk.dtype, grads.dv.dtype) == tuple(np.dtype(d) for d in dtypes)
    assert grads.dbias.dtype == np.float16
    # Weights given as Python numbers or lists get the computation dtype.
    t = np.float64 if np.float64 in dtypes else np.float32
    kw = dict(method="concat", w_q=[1.0, 0.5, 0.0, 2.0], w_k=np.ones(4, np.float16), score_bias=0.5)
    out, lse = attnfast.attention(q, k, v, return_lse=True, **kw)
    grads = backward(out, q, k, v, out, lse, **kw)
    assert grads.dw_q.dtype == t and grads.dw_k.dtype == np.float16 and grads.dscore_bias.dtype == t
    assert grads.dscore_bias.shape == ()


def test_attention_grads_is_exported():
    assert attnfast.AttentionGrads._fields == ("dq", "dk", "dv", "dbias", "dw", "dw_q", "dw_k",
                                               "dscore_bias", "dv_a", "dsinks")
    assert "attention_backward" in reference.__all__


# --------------------------------------------------------------------------
# Validation (shared by both implementations: the same exception type and message)
# --------------------------------------------------------------------------


IMPLS = ["reference", "fast"]


def backward_of(impl):
    return reference.attention_backward if impl == "reference" else attnfast.attention_backward


@pytest.fixture
def call():
    q = np.ones((2, 3, 4), np.float32)
    k = np.ones((2, 5, 4), np.float32)
    v = np.ones((2, 5, 2), np.float32)
    out, lse = attnfast.attention(q, k, v, return_lse=True)
    return dict(dout=np.ones_like(out), q=q, k=k, v=v, out=out, lse=lse)


def _run(backward, c, **kw):
    return backward(c["dout"], c["q"], c["k"], c["v"], c["out"], c["lse"], **kw)


BAD_RESULTS = [
    ("dout", np.ones((2, 3, 3)), ValueError,
     r"dout has shape \(2, 3, 3\) but must have shape batch_shape \+ \(Lq, Dv\) = \(2, 3, 2\), the shape of "
     r"attention's output \(dout is the gradient of the loss with respect to each of its elements; "
     r"np.ones\(\(2, 3, 2\)\) is that of out.sum\(\)\)."),
    ("dout", np.ones((3, 2)), ValueError, r"dout has shape \(3, 2\) but must have shape"),
    ("dout", np.ones((2, 3, 2), np.int64), TypeError,
     r"attnfast computes in float32 or float64; dout has dtype int64. Convert it with dout.astype\(np.float32\)"),
    ("dout", np.ones((2, 3, 2), np.complex64), TypeError, r"dout has dtype complex64"),
    ("dout", None, TypeError, r"dout is required; got None. Pass a NumPy array."),
    ("dout", [[1.0], [2.0, 3.0]], ValueError, r"dout could not be converted to a NumPy array"),
    ("out", np.ones((2, 3)), ValueError,
     r"out has shape \(2, 3\) but must have shape batch_shape \+ \(Lq, Dv\) = \(2, 3, 2\). Pass the output of "
     r"attention\(q, k, v, return_lse=True, ...\) called with the same arguments."),
    ("out", np.ones((2, 3, 2), np.int32), TypeError, r"out has dtype int32"),
    ("lse", np.ones((2, 3, 1)), ValueError,
     r"lse has shape \(2, 3, 1\) but must have shape batch_shape \+ \(Lq,\) = \(2, 3\). Pass the lse of "
     r"attention\(q, k, v, return_lse=True, ...\) called with the same arguments."),
    ("lse", np.ones((2, 3), bool), TypeError, r"lse has dtype bool"),
    ("lse", np.zeros((2, 3), np.float16), TypeError,
     r"lse has dtype float16 but must have dtype float32, the dtype attention\(q, k, v, return_lse=True, ...\) "
     r"called with the same arguments returns it in: pass it unconverted \(a rounded lse scales every "
     r"recomputed weight exp\(s - lse\) of its row by its rounding error\)."),
    ("lse", np.zeros((2, 3), np.float64), TypeError, r"lse has dtype float64 but must have dtype float32"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name, bad, error, message", BAD_RESULTS, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_forward_results(call, impl, name, bad, error, message):
    backward = backward_of(impl)
    with pytest.raises(error, match=message):
        _run(backward, {**call, name: bad})


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("extra", [{"return_lse": True}, {"return_weights": False, "return_lse": True}])
def test_forward_only_keywords_are_refused(call, impl, extra):
    backward = backward_of(impl)
    names = ", ".join(sorted(extra))
    with pytest.raises(TypeError, match=rf"attention_backward got unexpected keyword argument\(s\) {names}. "
                                        r"It takes attention's keyword arguments except return_lse, "
                                        r"return_weights and out: pass the forward's out and lse as its 5th "
                                        r"and 6th positional arguments and drop those keywords."):
        _run(backward, call, **extra)


BAD_FORWARD_ARGUMENTS = [
    {"method": "bogus"},
    {"mask": np.ones((4, 4), bool)},
    {"mask": np.ones((3, 5), np.int8)},
    {"bias": np.ones((7,))},
    {"kv_lengths": np.array([6, 1])},
    {"window": (-1, 0)},
    {"causal": 1},
    {"causal_align": "center"},
    {"method": "general", "w": np.ones((4, 3))},
    {"method": "concat", "w_q": np.ones(4)},
    {"method": "additive", "v_a": np.ones(3)},
    {"w": np.ones((4, 4))},
    {"scale": float("nan")},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kw", BAD_FORWARD_ARGUMENTS, ids=lambda kw: "-".join(kw))
def test_bad_forward_arguments_raise_as_in_attention(call, impl, kw):
    """q, k, v and the keyword arguments are validated by attention's own checks: same type and message."""
    backward = backward_of(impl)
    with pytest.raises((TypeError, ValueError)) as forward:
        attnfast.attention(call["q"], call["k"], call["v"], **kw)
    with pytest.raises(forward.type, match="^" + __import__("re").escape(str(forward.value)) + "$"):
        _run(backward, call, **kw)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_qkv_raise_as_in_attention(call, impl):
    backward = backward_of(impl)
    for bad in ({"q": np.ones((2, 3, 4), np.int32)}, {"k": np.ones((2, 6, 4))}, {"v": np.ones(5)},
                {"q": np.ones((3, 3, 4))}):
        c = {**call, **bad}
        with pytest.raises((TypeError, ValueError)) as forward:
            attnfast.attention(c["q"], c["k"], c["v"])
        with pytest.raises(forward.type, match="^" + __import__("re").escape(str(forward.value)) + "$"):
            _run(backward, c)
