"""Shared fixtures, the one tolerance table, and the naive same-precision oracles.

* ``isa``: parametrised over every SIMD target usable on this machine
  (``attnfast.capabilities()["isas"]``); switches the compiled core to it in-process
  and restores the original target afterwards. Use it per test (``def test_x(isa, ...)``)
  or for a whole module (``pytestmark = pytest.mark.usefixtures("isa")``).
* ``rng``: a NumPy Generator seeded from the test id (reproducible, distinct per test).
* Hypothesis profiles: ``ci`` (default, ~30 examples) and ``long`` (1000 examples);
  select with ``HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``.

Accuracy policy (flash-attention's rule): a kernel's error against the float64 reference
must be within 2x the error of a *naive* implementation done by plain NumPy in the input
precision, plus a small floor. See ``assert_close_to_reference``.
"""

from __future__ import annotations

import os
import warnings
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings

import attnfast
from attnfast import _attnfast as _core
from attnfast import _inputs
from attnfast import reference

# --------------------------------------------------------------------------
# Hypothesis profiles
# --------------------------------------------------------------------------

# When a Hypothesis test fails, its pytest plugin imports hypothesis.extra._patching (libcst) to
# print a patch; on this machine that import emits a DeprecationWarning (mypy_extensions), which
# the project's filterwarnings = error turns into an INTERNALERROR hiding the real failure.
# Import it once here, with that warning silenced, so the failure report works.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # libcst not installed: the plugin then skips the patch itself
        pass

settings.register_profile("ci", max_examples=30, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# --------------------------------------------------------------------------
# The tolerance table (the only one in the suite)
# --------------------------------------------------------------------------
#
# NAIVE_FACTOR / FLOOR (used by assert_close_to_reference, the default check):
#   max|kernel - ref64| <= NAIVE_FACTOR * max|naive - ref64| + FLOOR[dtype] * scale
#   where ``naive`` is the same computation in plain NumPy in the input precision and
#   ``scale`` is the magnitude of the values compared (max |ref64| unless given; for sums that
#   may cancel -- scores, aggregate -- the tests pass the size of the summed terms,
#   sum_magnitude / scores_magnitude, since rounding errors scale with the terms, not the result;
#   for attention outputs max|v|, as out is a convex combination of the rows of v).
#   The factor 2 is flash-attention's criterion: a kernel may reorder sums, use FMA,
#   a polynomial exp (~2 ulp, math.h) and multiply by 1/sum (1.5 ulp) instead of dividing,
#   but it must not be materially worse than the textbook computation in that precision.
#   The floor is a few ulp of the data's magnitude (float32 eps = 1.19e-7, float64
#   eps = 2.2e-16): it only matters when the naive computation happens to be exact
#   (D = 1, one key, all-integer data), where a bound of exactly 0 would demand
#   bit-identical rounding, which the contract does not promise.
#
# FIXED (used by assert_close_fixed, only where a naive same-precision computation is awkward
# or meaningless, e.g. comparing the fused kernel with itself over a different split, or
# merge_states whose NumPy implementation *is* the naive one):
#   |actual - expected| <= atol * scale + rtol * |expected|
#   float32: rtol 2e-5 ~ 170 eps: a sum of ~1000 rounded terms grows as sqrt(n) eps ~ 4e-6 in
#   practice, plus the exp/reciprocal ulps and a few roundings of the online-softmax rescale;
#   atol 2e-6 of the data scale covers outputs that cancel to ~0. float64: same reasoning
#   with eps 2.2e-16 (rtol 1e-12 ~ 4500 eps, generous because it costs nothing to detect a bug,
#   which shows up as O(1) errors).
#
# 16-bit results (float16, ml_dtypes.bfloat16): computed in float32 from the exactly converted 16-bit
# values and rounded once, so the error against the float64 reference (on the same 16-bit inputs) is
# dominated by that final rounding, half an ulp: eps/2 of the value (float16 eps 2^-11 = 4.9e-4,
# bfloat16 eps 2^-8 = 3.9e-3). The naive same-precision implementation is the computation in the 16-bit
# type as PyTorch's math SDPA does it (naive_attention(..., rounded=dtype): every stage -- scores, the
# scale, the bias, the softmax, P.V -- computed in float32 and rounded to the 16-bit type).
#   FLOOR = eps of the 16-bit type (one ulp of the data scale): the half ulp of the final rounding plus
#   the float32 computation's error, which can move a value across a rounding boundary (then the
#   rounded result is one ulp from the reference's); it decides only where the naive computation happens
#   to round exactly (D = 1, one key).
#   FIXED rtol = atol = eps: two results of the same value each rounded once to 16 bits (the kernel's
#   and the reference's merge_states) lie at most one ulp apart, and one ulp is at most eps x |value|.
FLOAT16 = np.dtype(np.float16)
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
SIXTEEN_BIT = (FLOAT16, BFLOAT16)
NAIVE_FACTOR = 2.0
FLOOR = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-14, FLOAT16: 2.0**-11, BFLOAT16: 2.0**-8}
FIXED = {
    np.dtype(np.float32): {"rtol": 2e-5, "atol": 2e-6},
    np.dtype(np.float64): {"rtol": 1e-12, "atol": 1e-13},
    FLOAT16: {"rtol": 2.0**-11, "atol": 2.0**-11},
    BFLOAT16: {"rtol": 2.0**-8, "atol": 2.0**-8},
}

# FINITE_DIFFERENCE (used by assert_matches_finite_differences, for the float64 reference backward):
#   the central difference (f(x + h) - f(x - h)) / 2h of the float64 reference forward's loss
#   sum(dout * out), with h = 1e-5 on O(1) data, errs by h^2 |f'''| / 6 ~ 2e-11 (truncation) plus
#   eps |f| / h ~ 2e-11 |f| (rounding of f, an absolute error); atol 1e-7 times max(1, max |gradient|)
#   and rtol 1e-6 are ~1000x that, while a wrong formula errs by O(1).
FINITE_DIFFERENCE = {"step": 1e-5, "rtol": 1e-6, "atol": 1e-7}
#
# attention_backward's gradients use NAIVE_FACTOR and FLOOR unchanged, with two choices of what they are
# relative to (tests/test_backward_api.py):
#   naive = naive_attention_backward: FlashAttention-2's formulas with whole matrices in the input
#   precision, P recomputed as exp(s - lse) from the forward's lse and delta = rowsum(dO * out) from its
#   rounded out, as the kernel does. A naive backward from its own softmax would be the wrong yardstick:
#   exp turns the absolute rounding of s - lse, eps (|s| + |lse|), into a relative error of every P that
#   the recomputation cannot avoid (measured: 11 eps on dv of general scores, 16x the softmax-based one).
#   scale = backward_scales: the magnitude of each gradient's summed terms (|dS| <= P (|dO||V| + |dO.O|)
#   chained on absolute values), not max |gradient|: every gradient is a sum that may cancel (each row
#   of dS sums to 0, so a per-row bias and concat's query-side gradients are exactly 0, and the weights'
#   gradients sum signed terms over the whole batch), and rounding errors scale with the terms.

DTYPES = [np.float32, np.float64]
METHODS = ["dot", "scaled_dot", "general", "concat", "additive"]
ISAS = list(attnfast.capabilities()["isas"])


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with the compiled core switched to one usable SIMD target."""
    original = _core.isa()
    if not _core.set_isa(request.param):
        pytest.fail(f"capabilities() lists {request.param!r} as usable but set_isa refused it")
    assert _core.isa() == request.param
    try:
        yield request.param
    finally:
        assert _core.set_isa(original)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def threads():
    """Restore attnfast's default thread count after a test that changes it."""
    yield
    attnfast.set_num_threads(0)


# --------------------------------------------------------------------------
# Comparison helpers
# --------------------------------------------------------------------------


def _check_special_values(actual, expected64, what):
    """NaN exactly where the reference has NaN; +-inf exactly where it has +-inf."""
    nan_a, nan_e = np.isnan(actual), np.isnan(expected64)
    if not np.array_equal(nan_a, nan_e):
        idx = np.argwhere(nan_a != nan_e)[:5].tolist()
        raise AssertionError(f"{what}: NaN pattern differs from the reference at {idx}")
    inf_a, inf_e = np.isinf(actual), np.isinf(expected64)
    if not np.array_equal(inf_a, inf_e) or not np.array_equal(actual[inf_a], expected64[inf_e]):
        idx = np.argwhere((inf_a != inf_e) | (np.isinf(actual) & (actual != expected64)))[:5].tolist()
        raise AssertionError(f"{what}: +-inf pattern differs from the reference at {idx}")
    return np.isfinite(expected64)


def _scale_of(expected64, finite, scale):
    if scale is not None:
        return float(scale)
    vals = np.abs(expected64[finite])
    s = float(vals.max()) if vals.size else 0.0
    return s if s > 0 else 1.0


def assert_close_to_reference(actual, expected64, naive, dtype, *, scale=None, what="result"):
    """Kernel error <= NAIVE_FACTOR * naive error + FLOOR * scale (see the table above).

    ``expected64`` is the float64 reference computed from the (exactly up-cast) inputs;
    ``naive`` is plain NumPy in ``dtype``. NaN/inf must sit exactly where the reference's are.
    """
    dtype = np.dtype(dtype)
    actual = np.asarray(actual)
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    actual = actual.astype(np.float64)  # exact for every dtype compared here (16-bit included)
    expected64 = np.asarray(expected64, dtype=np.float64)
    assert actual.shape == expected64.shape, f"{what}: shape {actual.shape} != {expected64.shape}"
    finite = _check_special_values(actual, expected64, what)
    if not finite.any():
        return
    a = actual.astype(np.float64)[finite]
    e = expected64[finite]
    n = np.asarray(naive, dtype=np.float64)[finite]
    n_ok = np.isfinite(n)
    naive_err = float(np.max(np.abs(n[n_ok] - e[n_ok]))) if n_ok.any() else 0.0
    err = float(np.max(np.abs(a - e)))
    bound = NAIVE_FACTOR * naive_err + FLOOR[dtype] * _scale_of(expected64, finite, scale)
    if not err <= bound:
        i = int(np.argmax(np.abs(a - e)))
        raise AssertionError(
            f"{what} ({dtype}): max error {err:.3e} > bound {bound:.3e} "
            f"(naive error {naive_err:.3e}); worst: got {a[i]!r}, reference {e[i]!r}"
        )


def assert_close_fixed(actual, expected, dtype, *, scale=None, what="result"):
    """|actual - expected| <= atol * scale + rtol * |expected| with the FIXED table."""
    dtype = np.dtype(dtype)
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    finite = _check_special_values(actual, expected, what)
    tol = FIXED[dtype]
    s = _scale_of(expected, finite, scale)
    a, e = actual.astype(np.float64)[finite], expected[finite]
    bad = np.abs(a - e) > tol["atol"] * s + tol["rtol"] * np.abs(e)
    if bad.any():
        i = int(np.argmax(np.abs(a - e)))
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())} of {bad.size} values outside rtol={tol['rtol']}, "
            f"atol={tol['atol']}*{s:.3g}; worst: got {a[i]!r}, expected {e[i]!r}"
        )


# --------------------------------------------------------------------------
# Data helpers
# --------------------------------------------------------------------------


def up(x):
    """Exact float64 copy of an array (None stays None): the reference's input."""
    return None if x is None else np.asarray(x, dtype=np.float64)


def method_weights(rng, method, d, dk, dtype, hidden=5):
    """Random weights for ``method`` (kwargs for scores/attention)."""
    if method == "general":
        return {"w": (rng.standard_normal((d, dk)) / np.sqrt(max(d, 1))).astype(dtype)}
    if method == "concat":
        return {
            "w_q": rng.standard_normal(d).astype(dtype),
            "w_k": rng.standard_normal(dk).astype(dtype),
            "score_bias": dtype(0.25),
        }
    if method == "additive":
        return {
            "w_q": (rng.standard_normal((hidden, d)) / np.sqrt(max(d, 1))).astype(dtype),
            "w_k": (rng.standard_normal((hidden, dk)) / np.sqrt(max(dk, 1))).astype(dtype),
            "score_bias": rng.standard_normal(hidden).astype(dtype),
            "v_a": rng.standard_normal(hidden).astype(dtype),
        }
    return {}


def _finite_abs(x):
    """|x| in float64 with NaN/inf counted as 0 (their entries are checked separately)."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    return np.where(np.isfinite(x), x, 0.0)


def sum_magnitude(a, b):
    """max over outputs of sum |a_ij| |b_jk|: the scale of a sum's rounding error (cancellation-proof).

    The FLOOR of the tolerance is relative to this, not to |result|: a sum of terms of size ~1 that
    cancels to ~0.04 still carries rounding errors of the terms' size.
    """
    a = _finite_abs(a)
    b = _finite_abs(b)
    return float(np.max(a @ b, initial=0.0)) or 1.0


def scores_magnitude(q, k, method="scaled_dot", scale=None, w=None, w_q=None, w_k=None, v_a=None,
                     score_bias=None):
    """The magnitude of the terms that make up each score (see sum_magnitude)."""
    q, k = _finite_abs(q), _finite_abs(k)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(d) if (method == "scaled_dot" and d > 0) else 1.0
    if method in ("dot", "scaled_dot"):
        m = np.max(q @ _swap(k), initial=0.0)
    elif method == "general":
        m = np.max((q @ np.abs(up(w))) @ _swap(k), initial=0.0)
    elif method == "concat":
        m = (np.max(q @ np.abs(up(w_q)), initial=0.0) + np.max(k @ np.abs(up(w_k)), initial=0.0)
             + abs(float(0 if score_bias is None else score_bias)))
    else:
        m = float(np.sum(np.abs(up(v_a)))) if v_a is not None else float(np.shape(w_q)[0])
    return float(m * abs(scale)) or 1.0


def weights64(kw):
    return {name: (np.float64(x) if np.ndim(x) == 0 else up(x)) for name, x in kw.items()}


# --------------------------------------------------------------------------
# Naive same-precision implementations (plain NumPy in the input dtype)
# --------------------------------------------------------------------------


def _swap(x):
    return np.swapaxes(x, -1, -2)


def naive_scores(q, k, *, method="scaled_dot", scale=None, w=None, w_q=None, w_k=None, v_a=None,
                 score_bias=None):
    q, k = np.asarray(q), np.asarray(k)
    dtype = np.result_type(q, k)
    q, k = q.astype(dtype), k.astype(dtype)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(d) if (method == "scaled_dot" and d > 0) else 1.0
    c = dtype.type(scale)
    if method in ("dot", "scaled_dot"):
        s = q @ _swap(k)
    elif method == "general":
        s = (q @ np.asarray(w, dtype)) @ _swap(k)
    elif method == "concat":
        b = dtype.type(0 if score_bias is None else score_bias)
        s = (q @ np.asarray(w_q, dtype))[..., :, None] + (k @ np.asarray(w_k, dtype))[..., None, :] + b
    else:
        # w_q / w_k None: q / k are already projected.
        pq = q if w_q is None else q @ _swap(np.asarray(w_q, dtype))
        pk = k if w_k is None else k @ _swap(np.asarray(w_k, dtype))
        hidden = pq.shape[-1]
        b = np.zeros(hidden, dtype) if score_bias is None else np.asarray(score_bias, dtype)
        va = np.ones(hidden, dtype) if v_a is None else np.asarray(v_a, dtype)
        s = np.tanh(pq[..., :, None, :] + pk[..., None, :, :] + b) @ va
    return (s * c).astype(dtype)


def naive_softmax(x, axis=-1, mask=None, return_lse=False):
    x = np.asarray(x)
    dtype = x.dtype
    if mask is not None:
        x = np.where(mask, x, dtype.type(-np.inf))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        if x.shape[axis]:
            m = np.max(x, axis=axis, keepdims=True)
        else:
            m = np.full(np.delete(np.array(x.shape), axis % x.ndim).tolist(), -np.inf, dtype)
            m = np.expand_dims(m, axis)
        shift = np.where(m == -np.inf, dtype.type(0), m)
        e = np.exp(x - shift)
        total = np.sum(e, axis=axis, keepdims=True)
        out = (e / np.where(total == 0, dtype.type(1), total)).astype(dtype)
        lse = np.squeeze(shift + np.log(total), axis=axis).astype(dtype)
    return (out, lse) if return_lse else out


def rounded_to(dtype):
    """The rounding of one intermediate of a computation in ``dtype``: float32 values rounded to the
    16-bit ``dtype`` and back (identity for ``None``)."""
    if dtype is None:
        return lambda x: x
    return lambda x: np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def naive_attention(q, k, v, *, rounded=None, **kw):
    """attention() in plain NumPy in the result dtype: (out, lse, weights).

    Visibility comes from the reference's own mask logic (validated args); everything numeric
    (scores, softmax, P.V) is done in the result precision. GQA by repeating kv heads. 16-bit inputs
    are converted exactly to the computation dtype; with ``rounded`` (a 16-bit dtype) the computation
    is PyTorch's math SDPA in that dtype: float32 arithmetic, and each stage's result -- q.k, times
    scale, plus bias, the softmax, P.V -- rounded to ``rounded`` (lse stays float32: attnfast's lse
    of a 16-bit result is float32).
    """
    kw = {key: val for key, val in kw.items() if key not in ("return_lse", "return_weights", "out")}
    a = _inputs.check_attention(q, k, v, **kw)
    dtype = a.compute
    rnd = rounded_to(rounded)
    visible = reference._visibility(a)
    kk = _naive_cache(a, a.k, a.k_scale, a.dk, dtype)
    vv = _naive_cache(a, a.v, a.v_scale, a.dv, dtype)
    if a.group > 1:
        kk = np.repeat(kk, a.group, axis=-3) if kk.shape[-3] > 1 else kk
        vv = np.repeat(vv, a.group, axis=-3) if vv.shape[-3] > 1 else vv
    weights_kw = dict(w=a.w, w_q=a.w_q, w_k=a.w_k, v_a=a.v_a, score_bias=a.score_bias)
    if rounded is None:
        s = naive_scores(a.q.astype(dtype), kk, method=a.method, scale=a.scale, **weights_kw)
    else:
        s = rnd(naive_scores(a.q.astype(dtype), kk, method=a.method, scale=1.0, **weights_kw))
        s = rnd(s * dtype.type(a.scale)) if a.scale != 1.0 else s
    s = np.broadcast_to(s, a.batch_shape + (a.lq, a.lk))
    with np.errstate(invalid="ignore", over="ignore"):
        if a.softcap is not None:
            c = dtype.type(a.softcap)
            s = rnd((c * np.tanh(s / c)).astype(dtype))
        if a.alibi_slopes is not None:
            distance = np.abs(reference._diagonals(a) - np.arange(a.lk)).astype(dtype)
            s = rnd((s - a.alibi_slopes[..., None, None] * distance).astype(dtype))
    if a.bias is not None:
        s = rnd((s + a.bias).astype(dtype))
    if a.sinks is None:
        weights, lse = naive_softmax(s, -1, visible, return_lse=True)
    else:
        # The sink as one more always-visible column, dropped after the softmax.
        rows = np.broadcast_shapes(s.shape, visible.shape)
        sink = np.broadcast_to(a.sinks.astype(dtype)[..., None, None], rows[:-1] + (1,))
        weights, lse = naive_softmax(np.concatenate([np.broadcast_to(s, rows), sink], -1), -1,
                                     np.concatenate([np.broadcast_to(visible, rows), np.ones_like(sink, bool)], -1),
                                     return_lse=True)
        weights = weights[..., :-1]
    weights = rnd(weights)
    out = rnd((weights @ vv).astype(dtype))
    return out, lse, weights


def _naive_cache(a, x, scale, features, dtype):
    """k or v in the computation dtype as kv_batch + (Lk, features): an int8 cache dequantised in that
    dtype (int8 * scale), a paged one gathered block by block (np.take along the blocks)."""
    x = x.astype(dtype)
    if scale is not None:
        x = x * scale[..., None].astype(dtype)
    if a.block_table is not None:
        table = np.where((a.block_table >= 0) & (a.block_table < x.shape[0]), a.block_table, 0)
        b, hk = a.kv_batch_shape
        x = x[table].transpose(0, 2, 1, 3, 4).reshape(b, hk, a.lk, features)
    return np.broadcast_to(x, a.kv_batch_shape + (a.lk, features))


def naive16_scores(q, k, dtype, *, method="scaled_dot", scale=None, **weights):
    """scores() computed in the 16-bit ``dtype`` as PyTorch does: the unscaled scores in float32 rounded
    to ``dtype``, then times scale, rounded again (float32 values holding 16-bit ones)."""
    rnd = rounded_to(dtype)
    q, k = np.asarray(q, np.float32), np.asarray(k, np.float32)
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / np.sqrt(d) if (method == "scaled_dot" and d > 0) else 1.0
    weights = {name: None if x is None else np.asarray(x, np.float32) for name, x in weights.items()}
    s = rnd(naive_scores(q, k, method=method, scale=1.0, **weights))
    return rnd(s * np.float32(scale)) if scale != 1.0 else s


def naive16_softmax(x, dtype, axis=-1, mask=None):
    """softmax() in the 16-bit ``dtype`` as PyTorch computes it: in float32, rounded to ``dtype``."""
    return rounded_to(dtype)(naive_softmax(np.asarray(x, np.float32), axis, mask))


def naive16_aggregate(weights, v, dtype):
    """aggregate() in the 16-bit ``dtype`` as PyTorch's matmul does: float32 sums, rounded once."""
    return rounded_to(dtype)(np.asarray(weights, np.float32) @ np.asarray(v, np.float32))


def ref_attention64(q, k, v, **kw):
    """The float64 reference of attention() on exactly up-cast inputs: (out, lse, weights)."""
    kw = dict(kw)
    kw.pop("out", None)
    kw["return_lse"] = True
    kw["return_weights"] = True
    for name in ("bias", "w", "w_q", "w_k", "v_a", "score_bias"):
        if kw.get(name) is not None:
            kw[name] = np.asarray(kw[name], dtype=np.float64)
    if kw.get("k_scale") is not None:  # an int8 cache: dequantised in float64 by the reference itself
        return reference.attention(q, k, v, **kw)
    return reference.attention(up(q), up(k), up(v), **kw)


def check_attention(q, k, v, *, dtype, what="attention", **kw):
    """Run attnfast.attention with lse and weights and hold all three to the reference.

    Also checks the contract for rows with no visible key: out exactly 0, weights exactly 0,
    lse exactly -inf wherever the reference's lse is -inf. Returns (out, lse, weights).
    """
    dtype = np.dtype(dtype)
    out, lse, w = attnfast.attention(q, k, v, return_lse=True, return_weights=True, **kw)
    r_out, r_lse, r_w = ref_attention64(q, k, v, **kw)
    n_out, n_lse, n_w = naive_attention(q, k, v, **kw)
    if dtype in SIXTEEN_BIT:
        # out and weights against the computation in the 16-bit type; lse (float32) against float32's.
        n_out, _, n_w = naive_attention(q, k, v, rounded=dtype, **kw)
    v_scale = float(np.max(np.abs(np.asarray(v, dtype=np.float64)), initial=0.0)) or 1.0
    if dtype in SIXTEEN_BIT:
        v_scale = None  # the final rounding's error is relative to the result itself (max |out|), not to v
    assert_close_to_reference(out, r_out, n_out, dtype, scale=v_scale, what=f"{what}: out")
    assert_close_to_reference(lse, r_lse, n_lse, _inputs.lse_dtype(dtype), what=f"{what}: lse")
    assert_close_to_reference(w, r_w, n_w, dtype, scale=1.0, what=f"{what}: weights")
    empty = r_lse == -np.inf
    assert np.all(lse[empty] == -np.inf)
    assert np.all(out[empty] == 0), f"{what}: rows with no visible key must give out 0"
    assert np.all(w[empty] == 0), f"{what}: rows with no visible key must give weights 0"
    a = _inputs.check_attention(q, k, v, **{key: val for key, val in kw.items() if key != "out"})
    hidden = ~reference._visibility(a)
    if a.bias is not None:
        hidden = hidden | np.broadcast_to(a.bias == -np.inf, hidden.shape)
    assert np.all(w[hidden] == 0), f"{what}: masked keys must get weight exactly 0"
    return out, lse, w


# --------------------------------------------------------------------------
# memory layouts
# --------------------------------------------------------------------------

LAYOUTS = ["C", "F", "transposed", "negative", "every_other_row", "every_other_col"]


def random_qkv(rng, dtypes, batch, lq, lk, d, dv=None, kv_batch=None):
    """Standard-normal q (batch + (lq, d)), k and v (kv_batch + (lk, d / dv)) stored in ``dtypes``, a
    (q, k, v) triple of dtypes; kv_batch defaults to batch."""
    dq, dk, dvt = dtypes
    kv_batch = batch if kv_batch is None else kv_batch
    q = rng.standard_normal(batch + (lq, d)).astype(dq)
    k = rng.standard_normal(kv_batch + (lk, d)).astype(dk)
    v = rng.standard_normal(kv_batch + (lk, d if dv is None else dv)).astype(dvt)
    return q, k, v


def modifier_case(rng):
    """q, k, v (GQA 4 over 2 heads) with ALiBi slopes and sinks per query head: the adapters' tests."""
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32) * np.float32(2)
    k = rng.standard_normal((2, 2, 11, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 11, 3)).astype(np.float32)
    slopes = np.float32(2.0) ** -np.arange(1, 5, dtype=np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    return q, k, v, slopes, sinks


def poisoned_kv(k, v, lengths, masked_key, garbage):
    """Copies of k and v (batch, Lk, D) holding ``garbage`` in every key a row cannot see: those past
    ``lengths[b]`` of item b, and key ``masked_key`` (which the caller's mask hides)."""
    dirty_k, dirty_v = k.copy(), v.copy()
    for b, n in enumerate(lengths):
        dirty_k[b, n:] = garbage
        dirty_v[b, n:] = garbage
    dirty_k[:, masked_key] = garbage
    dirty_v[:, masked_key] = garbage
    return dirty_k, dirty_v


def relayout(a, layout):
    """The same values as ``a`` stored with another memory layout (views with unusual strides)."""
    if layout == "C":
        return np.ascontiguousarray(a)
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "transposed":
        return np.swapaxes(np.ascontiguousarray(np.swapaxes(a, -1, -2)), -1, -2)
    if layout == "negative":
        return np.ascontiguousarray(a[..., ::-1, ::-1])[..., ::-1, ::-1]
    if layout == "every_other_row":
        base = np.zeros(a.shape[:-2] + (2 * a.shape[-2], a.shape[-1]), a.dtype)
        base[..., ::2, :] = a
        return base[..., ::2, :]
    if layout == "every_other_col":
        base = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        base[..., 1::2] = a
        return base[..., 1::2]
    raise ValueError(f"unknown layout {layout!r}")


def attention_parts(q, k, v, mask, edges):
    """Attention over each key range [edges[i], edges[i+1]) separately: lists of outs and lses."""
    outs, lses = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        o, s = attnfast.attention(q, k[..., lo:hi, :], v[..., lo:hi, :], mask=mask[..., lo:hi], return_lse=True)
        outs.append(o)
        lses.append(s)
    return outs, lses


# --------------------------------------------------------------------------
# The backward
# --------------------------------------------------------------------------


def naive_attention_backward(dout, q, k, v, out, lse, *, rounded=None, **kw):
    """attention_backward in plain NumPy in the computation dtype: dict of gradients by input name.

    FlashAttention-2's formulas as a textbook would code them with whole matrices: P = exp(s - lse)
    recomputed from naive scores s and the forward's ``lse`` (the kernel's source of error beyond the
    forward's: exp amplifies the absolute rounding of s - lse, eps (|s| + |lse|), into a relative one of
    P), dV = P^T dO, dP = dO V^T, delta = rowsum(dO * out) with the forward's ``out`` as the kernel gets
    it, dS = P (dP - delta), then the chain through the score method, each stage in the computation
    dtype (rounded to ``rounded``, a 16-bit dtype, as PyTorch's math backward in that dtype). GQA by
    repeating kv heads; gradients summed to the inputs' shapes. No visibility selection beyond P: hidden
    garbage makes it NaN there, which the comparison skips.
    """
    from attnfast._grads import fold_query_heads, sum_to_shape

    a = _inputs.check_attention(q, k, v, **kw)
    t = a.compute
    rnd = rounded_to(rounded)
    qq = np.broadcast_to(a.q, a.batch_shape + (a.lq, a.d)).astype(t)
    kk = np.broadcast_to(a.k, a.kv_batch_shape + (a.lk, a.dk)).astype(t)
    vv = np.broadcast_to(a.v, a.kv_batch_shape + (a.lk, a.dv)).astype(t)
    if a.group > 1:
        kk, vv = np.repeat(kk, a.group, axis=-3), np.repeat(vv, a.group, axis=-3)
    kk = np.broadcast_to(kk, a.batch_shape + kk.shape[-2:])
    vv = np.broadcast_to(vv, a.batch_shape + vv.shape[-2:])
    do, o = np.asarray(dout).astype(t), np.asarray(out).astype(t)
    c = t.type(a.scale)
    with np.errstate(invalid="ignore", over="ignore"):
        p = rnd(_naive_recomputed_weights(a, qq, kk, np.asarray(lse).astype(t), rnd))
        dv = rnd(_swap(p) @ do)
        dp = rnd(do @ _swap(vv))
        delta = rnd(np.sum(do * o, axis=-1, keepdims=True))
        ds = rnd(p * (dp - delta))
        grads = _naive_method_backward(a, ds, qq, kk, c, rnd)
    grads["v"] = dv
    if a.bias is not None:
        grads["bias"] = ds
    for name in ("k", "v"):
        grads[name] = fold_query_heads(grads[name], a.kv_batch_shape, a.group)
    shapes = {"q": a.q.shape, "k": a.k.shape, "v": a.v.shape, "bias": None if a.bias is None else a.bias.shape}
    for name in ("q", "k", "v", "bias"):
        if name in grads:
            grads[name] = sum_to_shape(grads[name], shapes[name])
    return grads


def _naive_recomputed_weights(a, q, k, lse, rnd):
    """P = exp(s - lse) on the visible keys, 0 elsewhere, s the naive scores in the computation dtype
    (each stage rounded by ``rnd``) of q and k (per query item)."""
    weights = dict(w=a.w, w_q=a.w_q, w_k=a.w_k, v_a=a.v_a, score_bias=a.score_bias)
    s = rnd(naive_scores(q, k, method=a.method, scale=1.0, **weights))
    if a.scale != 1.0:
        s = rnd(s * a.compute.type(a.scale))
    if a.bias is not None:
        s = rnd(s + a.bias)
    visible = reference._visibility(a) & (s != -np.inf)
    return np.where(visible, np.exp(s - lse[..., None]), 0)


def _naive_method_backward(a, ds, q, k, c, rnd):
    t = a.compute
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    if a.method in ("dot", "scaled_dot"):
        return {"q": rnd(c * (ds @ k)), "k": rnd(c * (_swap(ds) @ q))}
    if a.method == "general":
        qw = rnd(q @ a.w)
        dqw = rnd(c * (ds @ k))
        return {"q": rnd(dqw @ a.w.T), "k": rnd(c * (_swap(ds) @ qw)), "w": rnd(flat(q).T @ flat(dqw))}
    if a.method == "concat":
        by_query = rnd(c * np.sum(ds, axis=-1, keepdims=True))
        by_key = rnd(c * np.sum(ds, axis=-2)[..., None])
        return {"q": rnd(by_query * a.w_q), "k": rnd(by_key * a.w_k),
                "w_q": rnd(flat(q).T @ flat(by_query))[:, 0], "w_k": rnd(flat(k).T @ flat(by_key))[:, 0],
                "score_bias": rnd(np.sum(by_query))}
    qp = q if a.w_q is None else rnd(q @ a.w_q.T)
    kp = k if a.w_k is None else rnd(k @ a.w_k.T)
    th = rnd(np.tanh(qp[..., :, None, :] + kp[..., None, :, :] + a.score_bias))  # (..., Lq, Lk, A)
    dz = rnd((c * ds)[..., None] * (t.type(1) - th * th) * a.v_a)
    dqp, dkp = rnd(np.sum(dz, axis=-2)), rnd(np.sum(dz, axis=-3))
    grads = {"q": dqp if a.w_q is None else rnd(dqp @ a.w_q), "k": dkp if a.w_k is None else rnd(dkp @ a.w_k),
             "score_bias": rnd(np.sum(flat(dqp), axis=0)),
             "v_a": rnd(np.sum(flat(((c * ds)[..., None] * th)), axis=0))}
    if a.w_q is not None:
        grads["w_q"] = rnd(flat(dqp).T @ flat(q))
    if a.w_k is not None:
        grads["w_k"] = rnd(flat(dkp).T @ flat(k))
    return grads


def backward_scales(dout, q, k, v, out, **kw):
    """The FLOOR scale of each attention_backward field: the magnitude of the terms it sums.

    Every gradient is a sum (over keys, queries, batch items, features) whose terms can cancel: rows of
    dS sum to 0, so a per-row bias and concat's query-side gradients are exactly 0, and the weights'
    gradients sum signed terms over every row of the batch. As for the forward's sums (sum_magnitude),
    the rounding error scales with sum |terms|, not with the result: the same formulas evaluated on
    absolute values in float64 -- |dS| <= P (|dO| |V|^T + |dO| . |O|), dV from P^T |dO|, then the chain
    with |q|, |k|, |weights| (and 1 for additive's tanh and 1 - tanh^2). Returns {field: scale}.
    """
    from attnfast._grads import fold_query_heads, sum_to_shape

    a = _inputs.check_attention(up(q), up(k), up(v), **kw)
    ref = reference.attention(up(q), up(k), up(v), return_weights=True, **kw)
    p = np.where(np.isfinite(ref[1]), ref[1], 0.0)
    absq = np.abs(np.broadcast_to(a.q, a.batch_shape + (a.lq, a.d)))
    absk = np.abs(np.broadcast_to(a.k, a.kv_batch_shape + (a.lk, a.dk)))
    absv = np.abs(np.broadcast_to(a.v, a.kv_batch_shape + (a.lk, a.dv)))
    if a.group > 1:
        absk, absv = np.repeat(absk, a.group, axis=-3), np.repeat(absv, a.group, axis=-3)
    absk = _finite_abs(np.broadcast_to(absk, a.batch_shape + absk.shape[-2:]))
    absv = _finite_abs(np.broadcast_to(absv, a.batch_shape + absv.shape[-2:]))
    absq = _finite_abs(absq)
    do, o = _finite_abs(dout), _finite_abs(out)
    ds = p * (do @ _swap(absv) + np.sum(do * o, axis=-1, keepdims=True))
    c = abs(a.scale)
    m = {"v": _swap(p) @ do, "bias": ds}
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731
    if a.method in ("dot", "scaled_dot"):
        m.update(q=c * ds @ absk, k=c * _swap(ds) @ absq)
    elif a.method == "general":
        w = np.abs(a.w.astype(np.float64))
        dqw = c * ds @ absk
        m.update(q=dqw @ w.T, k=c * _swap(ds) @ (absq @ w), w=flat(absq).T @ flat(dqw))
    elif a.method == "concat":
        by_query, by_key = c * np.sum(ds, axis=-1)[..., None], c * np.sum(ds, axis=-2)[..., None]
        m.update(q=by_query * np.abs(a.w_q), k=by_key * np.abs(a.w_k), w_q=(flat(absq).T @ flat(by_query))[:, 0],
                 w_k=(flat(absk).T @ flat(by_key))[:, 0], score_bias=np.sum(by_query))
    else:
        va = np.abs(a.v_a.astype(np.float64))
        dqp = c * np.sum(ds, axis=-1)[..., None] * va  # |dz| summed over keys, with |1 - tanh^2| <= 1
        dkp = c * np.sum(ds, axis=-2)[..., None] * va
        wq = None if a.w_q is None else np.abs(a.w_q.astype(np.float64))
        wk = None if a.w_k is None else np.abs(a.w_k.astype(np.float64))
        m.update(q=dqp if wq is None else dqp @ wq, k=dkp if wk is None else dkp @ wk,
                 score_bias=np.sum(flat(dqp), axis=0), v_a=np.full(va.shape, c * np.sum(ds)))
        if wq is not None:
            m["w_q"] = flat(dqp).T @ flat(absq)
        if wk is not None:
            m["w_k"] = flat(dkp).T @ flat(absk)
    for name in ("k", "v"):
        m[name] = fold_query_heads(m[name], a.kv_batch_shape, a.group)
    shapes = {"q": a.q.shape, "k": a.k.shape, "v": a.v.shape, "bias": None if a.bias is None else a.bias.shape}
    scales = {}
    for name, x in m.items():
        if name == "bias" and a.bias is None:
            continue
        if name in shapes:
            x = sum_to_shape(x, shapes[name])
        scales["d" + name] = float(np.max(x, initial=0.0)) or 1.0
    return scales
