"""Hypothesis property tests of the kernels, on every SIMD target.

Profiles (registered in conftest.py): ``ci`` (default, 30 examples per test and ISA) and
``long`` (1000): ``HYPOTHESIS_PROFILE=long pytest tests/test_properties.py``.

The ``isa`` fixture is function-scoped; Hypothesis runs all examples of one test inside one
fixture instance, which is what we want here (the ISA is process state, nothing to reset
between examples), so that health check is suppressed for these tests only.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnfast
from attnfast import reference as ref
from conftest import (
    attention_parts,
    LAYOUTS,
    assert_close_fixed,
    assert_close_to_reference,
    check_attention,
    method_weights,
    naive_scores,
    naive_softmax,
    ref_attention64,
    relayout,
    scores_magnitude,
    sum_magnitude,
    up,
    weights64,
)

pytestmark = pytest.mark.usefixtures("isa")
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)
@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds)
def test_softmax_rows_sum_to_one(data, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="shape"))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    spread = data.draw(st.sampled_from([1.0, 30.0, 1e4]), label="spread")
    x = (spread * rng.standard_normal(shape)).astype(dtype)
    mask = None
    if data.draw(st.booleans(), label="masked"):
        mask = rng.random(shape) < 0.7
    w = attnfast.softmax(x, axis=axis, mask=mask)
    assert w.dtype == np.dtype(dtype) and w.shape == shape
    assert np.all(w >= 0) and np.all(w <= 1)
    sums = w.sum(axis=axis, dtype=np.float64)
    visible = np.ones(shape, bool) if mask is None else mask
    has_any = visible.any(axis=axis)
    eps = np.finfo(dtype).eps
    n = shape[axis]
    np.testing.assert_allclose(sums[has_any], 1.0, rtol=0, atol=4 * n * eps)
    assert np.all(sums[~has_any] == 0)
    if mask is not None:
        assert np.all(w[~mask] == 0)


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds, shift=st.integers(-1000, 1000))
def test_softmax_shift_invariance(data, dtype, seed, shift):
    # x on a grid of 1/16 in [-16, 16] and an integer shift: x + c is exact in both dtypes, and
    # softmax subtracts the row maximum first, so (x + c) - max(x + c) == x - max(x) exactly and
    # the results must be identical bit for bit.
    rng = np.random.default_rng(seed)
    shape = tuple(data.draw(st.lists(st.integers(1, 40), min_size=1, max_size=3), label="shape"))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = (rng.integers(-256, 257, size=shape) / 16).astype(dtype)
    shifted = x + dtype(shift)
    assert np.array_equal(shifted - dtype(shift), x)
    a = attnfast.softmax(x, axis=axis)
    b = attnfast.softmax(shifted, axis=axis)
    assert np.array_equal(a, b)


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds)
def test_scores_then_softmax_shift_invariance_through_bias(data, dtype, seed):
    # Adding a per-row constant to the scores (via bias) does not change the attention.
    rng = np.random.default_rng(seed)
    lq, lk, d = data.draw(st.integers(1, 30)), data.draw(st.integers(1, 50)), data.draw(st.integers(1, 33))
    q = rng.integers(-3, 4, size=(2, lq, d)).astype(dtype)
    k = rng.integers(-3, 4, size=(2, lk, d)).astype(dtype)
    v = rng.standard_normal((2, lk, 9)).astype(dtype)
    c = rng.integers(-500, 501, size=(lq, 1)).astype(dtype)  # integer scores + integer shift: exact
    base, lse0 = attnfast.attention(q, k, v, method="dot", return_lse=True)
    moved, lse1 = attnfast.attention(q, k, v, method="dot", bias=c, return_lse=True)
    assert_close_fixed(moved, base.astype(np.float64), dtype, scale=float(np.abs(v).max()))
    assert_close_fixed(lse1, (lse0 + c[:, 0]).astype(np.float64), dtype, scale=float(np.abs(lse0).max()) + 500)


# --------------------------------------------------------------------------
# attention invariants
# --------------------------------------------------------------------------


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds)
def test_attention_key_permutation_equivariance(data, dtype, seed):
    rng = np.random.default_rng(seed)
    lq, lk = data.draw(st.integers(1, 40), label="lq"), data.draw(st.integers(1, 60), label="lk")
    d = data.draw(st.integers(1, 40), label="d")
    q = rng.standard_normal((2, 2, lq, d)).astype(dtype)
    k = rng.standard_normal((2, 2, lk, d)).astype(dtype)
    v = rng.standard_normal((2, 2, lk, 7)).astype(dtype)
    mask = rng.random((2, 1, lq, lk)) < 0.8
    bias = rng.standard_normal((lq, lk)).astype(dtype)
    perm = rng.permutation(lk)
    out, lse, w = attnfast.attention(q, k, v, mask=mask, bias=bias, return_lse=True, return_weights=True)
    out_p, lse_p, w_p = attnfast.attention(q, k[..., perm, :], v[..., perm, :], mask=mask[..., perm],
                                           bias=bias[:, perm], return_lse=True, return_weights=True)
    scale = float(np.abs(v).max())
    assert_close_fixed(out_p, out.astype(np.float64), dtype, scale=scale, what="out under key permutation")
    assert_close_fixed(lse_p, lse.astype(np.float64), dtype, what="lse under key permutation")
    assert_close_fixed(w_p, w[..., perm].astype(np.float64), dtype, scale=1.0, what="weights permute")
    assert np.all(w_p[~np.broadcast_to(mask[..., perm], w_p.shape)] == 0)


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds)
def test_attention_masking_a_key_equals_removing_it(data, dtype, seed):
    rng = np.random.default_rng(seed)
    lq, lk = data.draw(st.integers(1, 40), label="lq"), data.draw(st.integers(2, 60), label="lk")
    d = data.draw(st.integers(1, 40), label="d")
    drop = np.sort(rng.choice(lk, size=data.draw(st.integers(1, lk - 1), label="n_drop"), replace=False))
    keep = np.setdiff1d(np.arange(lk), drop)
    q = rng.standard_normal((3, lq, d)).astype(dtype)
    k = rng.standard_normal((3, lk, d)).astype(dtype)
    v = rng.standard_normal((3, lk, 11)).astype(dtype)
    mask = np.ones(lk, bool)
    mask[drop] = False
    out, lse, w = attnfast.attention(q, k, v, mask=mask, return_lse=True, return_weights=True)
    out_r, lse_r, w_r = attnfast.attention(q, k[:, keep], v[:, keep], return_lse=True, return_weights=True)
    assert np.all(w[..., drop] == 0)
    scale = float(np.abs(v).max())
    assert_close_fixed(out, out_r.astype(np.float64), dtype, scale=scale, what="masked vs removed out")
    assert_close_fixed(lse, lse_r.astype(np.float64), dtype, what="masked vs removed lse")
    assert_close_fixed(w[..., keep], w_r.astype(np.float64), dtype, scale=1.0, what="masked vs removed w")


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds)
def test_merge_states_over_any_split_equals_the_whole(data, dtype, seed):
    rng = np.random.default_rng(seed)
    lq, lk = data.draw(st.integers(1, 30), label="lq"), data.draw(st.integers(1, 80), label="lk")
    # Repeated cuts make empty chunks (Lk = 0 slices: lse -inf, contributing nothing).
    cuts = sorted(data.draw(st.lists(st.integers(0, lk), max_size=4), label="cuts"))
    q = rng.standard_normal((2, 2, lq, 16)).astype(dtype)
    k = rng.standard_normal((2, 2, lk, 16)).astype(dtype)
    v = rng.standard_normal((2, 2, lk, 8)).astype(dtype)
    mask = rng.random((2, 2, lq, lk)) < data.draw(st.sampled_from([0.1, 0.5, 1.0]), label="density")
    edges = [0] + cuts + [lk]
    outs, lses = attention_parts(q, k, v, mask, edges)
    merged, lse = attnfast.merge_states(outs, lses)
    whole, whole_lse = attnfast.attention(q, k, v, mask=mask, return_lse=True)
    r_out, r_lse, _ = ref_attention64(q, k, v, mask=mask)
    scale = float(np.abs(v).max())
    assert_close_fixed(merged, r_out, dtype, scale=scale, what="merged vs reference")
    assert_close_fixed(merged, whole.astype(np.float64), dtype, scale=scale, what="merged vs whole")
    assert_close_fixed(lse, r_lse, dtype, what="merged lse")
    assert np.array_equal(lse == -np.inf, whole_lse == -np.inf)
    assert np.all(merged[lse == -np.inf] == 0)


# --------------------------------------------------------------------------
# Agreement with the reference on random shapes, masks and strides
# --------------------------------------------------------------------------


@st.composite
def attention_case(draw):
    dtype = draw(dtypes)
    seed = draw(seeds)
    rng = np.random.default_rng(seed)
    lq, lk = draw(st.integers(1, 40), label="lq"), draw(st.integers(1, 70), label="lk")
    d, dv = draw(st.integers(1, 70), label="d"), draw(st.integers(1, 40), label="dv")
    b = draw(st.integers(1, 3), label="b")
    hk = draw(st.sampled_from([1, 2, 3]), label="hk")
    hq = hk * draw(st.sampled_from([1, 2, 4]), label="group")
    q = rng.standard_normal((b, hq, lq, d)).astype(dtype)
    k = rng.standard_normal((b, hk, lk, d)).astype(dtype)
    v = rng.standard_normal((b, hk, lk, dv)).astype(dtype)
    q, k, v = (relayout(x, draw(st.sampled_from(LAYOUTS), label="layout")) for x in (q, k, v))
    if draw(st.booleans(), label="broadcast k/v batch"):
        k = np.broadcast_to(k[:1], k.shape)
        v = np.broadcast_to(v[:1], v.shape)
    kw = {}
    if draw(st.booleans(), label="mask"):
        mshape = draw(st.sampled_from([(lk,), (lq, lk), (hq, 1, lk), (b, hq, lq, lk)]), label="mask shape")
        kw["mask"] = rng.random(mshape) < 0.7
    if draw(st.booleans(), label="bias"):
        bshape = draw(st.sampled_from([(lk,), (lq, lk), (b, 1, lq, lk)]), label="bias shape")
        kw["bias"] = rng.standard_normal(bshape).astype(dtype)
    if draw(st.booleans(), label="kv_lengths"):
        kw["kv_lengths"] = rng.integers(0, lk + 1, size=draw(st.sampled_from([(b, 1), (b, hq)])))
    if draw(st.booleans(), label="causal"):
        kw["causal"] = True
    kw["causal_align"] = draw(st.sampled_from(["top_left", "bottom_right"]), label="align")
    if draw(st.booleans(), label="window"):
        side = st.one_of(st.none(), st.integers(0, 20))
        kw["window"] = (draw(side, label="left"), draw(side, label="right"))
    return dtype, q, k, v, kw


@fixture_ok
@given(case=attention_case())
def test_attention_agrees_with_reference(case):
    dtype, q, k, v, kw = case
    check_attention(q, k, v, dtype=dtype, what=f"random {q.shape} {k.shape} {sorted(kw)}", **kw)


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds, method=st.sampled_from(
    ["dot", "scaled_dot", "general", "concat", "additive"]))
def test_scores_agree_with_reference(data, dtype, seed, method):
    rng = np.random.default_rng(seed)
    lq, lk, d = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 70)), data.draw(st.integers(1, 70))
    dk = d if method in ("dot", "scaled_dot") else data.draw(st.integers(1, 40))
    q = relayout(rng.standard_normal((2, lq, d)).astype(dtype), data.draw(st.sampled_from(LAYOUTS)))
    k = relayout(rng.standard_normal((2, lk, dk)).astype(dtype), data.draw(st.sampled_from(LAYOUTS)))
    kw = method_weights(rng, method, d, dk, dtype, hidden=data.draw(st.integers(1, 9)))
    got = attnfast.scores(q, k, method=method, **kw)
    assert_close_to_reference(got, ref.scores(up(q), up(k), method=method, **weights64(kw)),
                              naive_scores(q, k, method=method, **kw), dtype,
                              scale=scores_magnitude(q, k, method, **kw), what=f"scores[{method}]")


@fixture_ok
@given(data=st.data(), dtype=dtypes, seed=seeds)
def test_softmax_and_aggregate_agree_with_reference(data, dtype, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(data.draw(st.lists(st.integers(1, 30), min_size=2, max_size=4), label="shape"))
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = relayout((3 * rng.standard_normal(shape)).astype(dtype), data.draw(st.sampled_from(LAYOUTS)))
    mask = rng.random(shape[-2:]) < 0.6 if data.draw(st.booleans(), label="mask") else None
    w = attnfast.softmax(x, axis=axis, mask=mask)
    assert_close_to_reference(w, ref.softmax(up(x), axis=axis, mask=mask), naive_softmax(x, axis, mask),
                              dtype, scale=1.0, what="softmax")
    dv = data.draw(st.integers(1, 40), label="dv")
    v = relayout(rng.standard_normal(shape[:-2] + (shape[-1], dv)).astype(dtype),
                 data.draw(st.sampled_from(LAYOUTS)))
    ctx = attnfast.aggregate(w, v)
    assert_close_to_reference(ctx, ref.aggregate(up(w), up(v)), np.matmul(w, v), dtype,
                              scale=sum_magnitude(w, v), what="aggregate")
