"""The three stage kernels (scores, softmax, aggregate) against the float64 reference.

Every test runs once per usable SIMD target (the ``isa`` fixture) and is held to the
tolerance policy of conftest.py: error <= 2x a naive same-precision NumPy computation.
Sizes are the awkward ones (around the vector widths 8/16 and register blocks), one
axis at a time plus a few representative combinations, so the file stays fast.
"""

import numpy as np
import pytest

import attnfast
from attnfast import reference as ref
from conftest import (
    DTYPES,
    LAYOUTS,
    METHODS,
    assert_close_to_reference,
    method_weights,
    naive_scores,
    naive_softmax,
    relayout,
    scores_magnitude,
    sum_magnitude,
    up,
    weights64,
)

pytestmark = pytest.mark.usefixtures("isa")

AWKWARD_D = [1, 3, 15, 16, 17, 63, 64, 65, 97, 111]
AWKWARD_L = [1, 2, 97, 1025]


def make(rng, shape, dtype, layout="C", scale=1.0):
    """Random array of logical ``shape`` stored with the given memory layout."""
    return relayout((scale * rng.standard_normal(tuple(shape))).astype(dtype), layout)


# --------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------


def check_scores(q, k, dtype, method, **kw):
    got = attnfast.scores(q, k, method=method, **kw)
    expected = ref.scores(up(q), up(k), method=method, **weights64(kw))
    naive = naive_scores(q, k, method=method, **kw)
    assert_close_to_reference(got, expected, naive, dtype, scale=scores_magnitude(q, k, method, **kw),
                              what=f"scores[{method}]")
    return got


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", AWKWARD_D)
def test_scores_awkward_feature_size(rng, method, dtype, d):
    q = make(rng, (2, 7, d), dtype)
    k = make(rng, (2, 11, d), dtype)
    check_scores(q, k, dtype, method, **method_weights(rng, method, d, d, dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", AWKWARD_L)
@pytest.mark.parametrize("side", ["lq", "lk"])
def test_scores_awkward_lengths(rng, method, dtype, length, side):
    lq, lk = (length, 33) if side == "lq" else (33, length)
    q = make(rng, (lq, 16), dtype)
    k = make(rng, (lk, 16), dtype)
    check_scores(q, k, dtype, method, **method_weights(rng, method, 16, 16, dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, lq, lk, d",
    [((3,), 97, 65, 64), ((2, 2), 17, 1025, 65), ((), 1, 1, 1), ((2,), 2, 97, 111), ((1,), 1025, 3, 17)],
)
def test_scores_representative_shapes(rng, method, dtype, batch, lq, lk, d):
    q = make(rng, batch + (lq, d), dtype)
    k = make(rng, batch + (lk, d), dtype)
    check_scores(q, k, dtype, method, **method_weights(rng, method, d, d, dtype))


@pytest.mark.parametrize("method", ["general", "concat", "additive"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_key_size_differs_from_query_size(rng, method, dtype):
    q = make(rng, (2, 9, 17), dtype)
    k = make(rng, (2, 13, 40), dtype)
    check_scores(q, k, dtype, method, **method_weights(rng, method, 17, 40, dtype, hidden=9))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_explicit_scale(rng, method, dtype):
    q = make(rng, (2, 9, 24), dtype)
    k = make(rng, (2, 19, 24), dtype)
    check_scores(q, k, dtype, method, scale=0.37, **method_weights(rng, method, 24, 24, dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_scores_strided_inputs(rng, method, dtype, layout):
    q = make(rng, (2, 19, 33), dtype, layout)
    k = make(rng, (2, 21, 33), dtype, layout)
    check_scores(q, k, dtype, method, **method_weights(rng, method, 33, 33, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_q", LAYOUTS)
@pytest.mark.parametrize("layout_k", ["C", "transposed", "negative", "every_other_col"])
def test_scores_mixed_layouts(rng, dtype, layout_q, layout_k):
    q = make(rng, (3, 18, 65), dtype, layout_q)
    k = make(rng, (3, 23, 65), dtype, layout_k)
    check_scores(q, k, dtype, "scaled_dot")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_broadcast_batch_axes(rng, method, dtype):
    kw = method_weights(rng, method, 20, 20, dtype)
    q = make(rng, (2, 3, 9, 20), dtype)
    # Stride-0 batch axis on k, and k with fewer batch axes than q.
    k_b = np.broadcast_to(make(rng, (1, 3, 14, 20), dtype), (2, 3, 14, 20))
    assert k_b.strides[0] == 0
    got = check_scores(q, k_b, dtype, method, **kw)
    assert got.shape == (2, 3, 9, 14)
    k_few = make(rng, (3, 14, 20), dtype)
    assert check_scores(q, k_few, dtype, method, **kw).shape == (2, 3, 9, 14)
    # Stride-0 on q, broadcasting against a k batch of 4.
    q_b = np.broadcast_to(make(rng, (1, 9, 20), dtype), (4, 9, 20))
    k4 = make(rng, (4, 1, 14, 20), dtype)
    assert check_scores(q_b, k4, dtype, method, **kw).shape == (4, 4, 9, 14)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_scores_nan_confined_to_its_row_and_column(rng, method, dtype):
    q = make(rng, (2, 6, 16), dtype)
    k = make(rng, (2, 9, 16), dtype)
    q[1, 3, 5] = np.nan
    k[0, 4, 2] = np.nan
    kw = method_weights(rng, method, 16, 16, dtype)
    got = check_scores(q, k, dtype, method, **kw)  # checks the NaN pattern equals the reference's
    nan = np.isnan(got)
    assert nan[1, 3].all() and nan[0, :, 4].all()
    if method == "concat":  # separable: NaN stays in its row/column
        expect = np.zeros_like(nan)
        expect[1, 3, :] = True
        expect[0, :, 4] = True
        assert np.array_equal(nan, expect)
    assert not nan[0, np.arange(6) != 3][:, np.arange(9) != 4].any()
    assert not nan[1, np.arange(6) != 3].any()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "qshape, kshape",
    [((0, 8), (5, 8)), ((4, 8), (0, 8)), ((0, 3, 8), (0, 5, 8)), ((2, 0, 8), (2, 0, 8)), ((3, 0), (4, 0))],
)
def test_scores_zero_size(rng, method, dtype, qshape, kshape):
    q, k = make(rng, qshape, dtype), make(rng, kshape, dtype)
    d = qshape[-1]
    kw = method_weights(rng, method, d, d, dtype)
    got = attnfast.scores(q, k, method=method, **kw)
    expected = ref.scores(q, k, method=method, **kw)
    assert got.dtype == np.dtype(dtype) and got.shape == expected.shape
    assert_close_to_reference(got, expected, naive_scores(q, k, method=method, **kw), dtype)


@pytest.mark.parametrize("method", METHODS)
def test_scores_accept_lists(rng, method):
    q = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]]
    k = [[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 1.0], [2.0, -2.0, 1.0]]
    kw = {name: (x.tolist() if isinstance(x, np.ndarray) else float(x))
          for name, x in method_weights(rng, method, 3, 3, np.float64).items()}
    got = attnfast.scores(q, k, method=method, **kw)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (2, 4)
    expected = ref.scores(q, k, method=method, **kw)
    naive = naive_scores(np.array(q), np.array(k), method=method, **kw)
    assert_close_to_reference(got, expected, naive, np.float64)


def test_scores_mixed_precision_promotes_to_float64(rng):
    q = make(rng, (5, 16), np.float32)
    k = make(rng, (7, 16), np.float64)
    got = attnfast.scores(q, k)
    assert got.dtype == np.float64
    assert_close_to_reference(got, ref.scores(up(q), k), naive_scores(up(q), k), np.float64)


# --------------------------------------------------------------------------
# softmax
# --------------------------------------------------------------------------


def check_softmax(x, dtype, axis=-1, mask=None, what="softmax"):
    got = attnfast.softmax(x, axis=axis, mask=mask)
    expected = ref.softmax(up(x), axis=axis, mask=mask)
    naive = naive_softmax(np.asarray(x), axis=axis, mask=mask)
    assert_close_to_reference(got, expected, naive, dtype, scale=1.0, what=what)
    assert not np.isnan(got).any() or np.isnan(np.asarray(x, dtype=np.float64)).any()
    return got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", AWKWARD_L + AWKWARD_D)
def test_softmax_awkward_row_lengths(rng, dtype, length):
    x = make(rng, (5, length), dtype, scale=3.0)
    got = check_softmax(x, dtype)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-4, -3, -2, -1, 0, 1, 2, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_every_axis(rng, dtype, axis, masked):
    x = make(rng, (3, 5, 17, 33), dtype, scale=2.0)
    mask = None
    if masked:
        mask = rng.random((5, 1, 33)) < 0.7  # broadcasts over axes 0 and 2
    check_softmax(x, dtype, axis=axis, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [-1, -2])
def test_softmax_strided_inputs(rng, dtype, layout, axis):
    x = make(rng, (4, 19, 37), dtype, layout, scale=2.0)
    mask = np.broadcast_to(rng.random((19, 37)) < 0.8, (4, 19, 37))
    check_softmax(x, dtype, axis=axis)
    check_softmax(x, dtype, axis=axis, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_mask_fully_masked_rows_are_zero(rng, dtype):
    x = make(rng, (2, 6, 97), dtype)
    mask = rng.random((2, 6, 97)) < 0.5
    mask[0, 2] = False
    mask[1, 5] = False
    x[0, 2] = np.nan  # hidden by the mask: must not leak
    got = check_softmax(x, dtype, mask=mask)
    assert np.all(got[0, 2] == 0) and np.all(got[1, 5] == 0)
    assert np.all(got[~mask] == 0)
    assert not np.isnan(got).any()
    # Masked along another axis, with a mask that broadcasts (stride 0).
    col_mask = np.ones((1, 6, 1), bool)
    col_mask[0, 4] = False
    got0 = check_softmax(x, dtype, axis=-2, mask=np.where(np.isnan(x), False, col_mask))
    assert np.all(got0[:, 4] == 0) and not np.isnan(got0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_all_neg_inf_rows_are_zero(dtype):
    x = np.zeros((3, 17), dtype)
    x[1] = -np.inf
    x[2, ::2] = -np.inf
    got = check_softmax(x, dtype)
    assert np.all(got[1] == 0)
    assert np.all(got[2, ::2] == 0)
    np.testing.assert_allclose(got[2, 1::2], 1 / 8, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", [3, 17, 97])
def test_softmax_extreme_logits(rng, dtype, length):
    x = make(rng, (6, length), dtype)
    x[0] = 1e30
    x[1] = -1e30
    x[2, :] = -1e30
    x[2, length // 2] = 1e30
    x[3] = np.linspace(-1e4, 0, length, dtype=dtype)  # spread of 1e4
    x[4] = np.linspace(0, 1e4, length, dtype=dtype)
    x[4, 1::2] = -np.inf
    x[5] = x[5] * 1e4  # random spread of ~1e4
    got = check_softmax(x, dtype)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0], 1 / length, rtol=1e-6)
    np.testing.assert_allclose(got[1], 1 / length, rtol=1e-6)
    assert got[2, length // 2] == 1 and np.count_nonzero(got[2]) == 1
    assert got[3, -1] == pytest.approx(1.0) and got[4, -1] == pytest.approx(1.0)
    assert np.all(got[4, 1::2] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_nan_confined_to_its_row(rng, dtype, axis):
    x = make(rng, (7, 33), dtype)
    if axis == -1:
        x[3, 10] = np.nan
    else:
        x[5, 3] = np.nan
    got = check_softmax(x, dtype, axis=axis)
    line = np.moveaxis(got, axis, -1)
    assert np.isnan(line[3]).all()
    assert np.isfinite(np.delete(line, 3, axis=0)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis", [((0, 5), -1), ((3, 0), -1), ((3, 0), 0), ((0,), 0), ((2, 0, 4), 1)])
def test_softmax_zero_size(dtype, shape, axis):
    x = np.zeros(shape, dtype)
    got = attnfast.softmax(x, axis=axis)
    assert got.shape == shape and got.dtype == np.dtype(dtype)
    assert np.array_equal(got, ref.softmax(x, axis=axis))


def test_softmax_accepts_lists_and_1d():
    x = [[1.0, 2.0, 3.0], [0.0, -np.inf, 5.0]]
    got = attnfast.softmax(x)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64
    assert_close_to_reference(got, ref.softmax(x), naive_softmax(np.array(x)), np.float64, scale=1.0)
    got1 = attnfast.softmax(np.arange(5.0, dtype=np.float32))
    assert got1.shape == (5,) and got1.dtype == np.float32
    x1 = np.arange(5.0, dtype=np.float32)
    assert_close_to_reference(got1, ref.softmax(up(x1)), naive_softmax(x1), np.float32, scale=1.0)
    got_mask = attnfast.softmax([1.0, 2.0, 3.0], mask=[True, False, True])
    assert got_mask[1] == 0
    assert_close_to_reference(got_mask, ref.softmax([1.0, 2.0, 3.0], mask=[True, False, True]),
                              naive_softmax(np.array([1.0, 2.0, 3.0]), mask=np.array([True, False, True])),
                              np.float64, scale=1.0)


# --------------------------------------------------------------------------
# aggregate
# --------------------------------------------------------------------------


def check_aggregate(weights, v, dtype, what="aggregate"):
    got = attnfast.aggregate(weights, v)
    expected = ref.aggregate(up(weights), up(v))
    naive = np.matmul(np.asarray(weights), np.asarray(v)).astype(dtype)
    assert_close_to_reference(got, expected, naive, dtype, scale=sum_magnitude(weights, v), what=what)
    return got


def prob_rows(rng, shape, dtype, layout="C"):
    """Softmax-like weights (non-negative rows summing to 1) with the requested layout."""
    e = np.exp(rng.standard_normal(shape))
    return relayout((e / e.sum(-1, keepdims=True)).astype(dtype), layout)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dv", AWKWARD_D)
def test_aggregate_awkward_value_size(rng, dtype, dv):
    w = prob_rows(rng, (2, 7, 13), dtype)
    v = make(rng, (2, 13, dv), dtype)
    check_aggregate(w, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", AWKWARD_L)
@pytest.mark.parametrize("side", ["lq", "lk"])
def test_aggregate_awkward_lengths(rng, dtype, length, side):
    lq, lk = (length, 33) if side == "lq" else (33, length)
    w = prob_rows(rng, (lq, lk), dtype)
    v = make(rng, (lk, 24), dtype)
    check_aggregate(w, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, lq, lk, dv", [((3,), 97, 65, 64), ((2, 2), 17, 1025, 65), ((), 1, 1, 1), ((2,), 1025, 97, 111)]
)
def test_aggregate_representative_shapes(rng, dtype, batch, lq, lk, dv):
    w = prob_rows(rng, batch + (lq, lk), dtype)
    v = make(rng, batch + (lk, dv), dtype)
    check_aggregate(w, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_general_weights_not_just_probabilities(rng, dtype):
    # aggregate is a batched matmul; signed weights with cancellation must also work.
    check_aggregate(make(rng, (3, 17, 63), dtype), make(rng, (3, 63, 17), dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout_w", LAYOUTS)
@pytest.mark.parametrize("layout_v", LAYOUTS)
def test_aggregate_strided_inputs(rng, dtype, layout_w, layout_v):
    w = prob_rows(rng, (2, 18, 35), dtype, layout_w)
    v = make(rng, (2, 35, 20), dtype, layout_v)
    check_aggregate(w, v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_broadcast_batch_axes(rng, dtype):
    w = prob_rows(rng, (2, 3, 9, 14), dtype)
    v_b = np.broadcast_to(make(rng, (1, 3, 14, 20), dtype), (2, 3, 14, 20))
    assert check_aggregate(w, v_b, dtype).shape == (2, 3, 9, 20)
    assert check_aggregate(w, make(rng, (3, 14, 20), dtype), dtype).shape == (2, 3, 9, 20)
    w_b = np.broadcast_to(prob_rows(rng, (9, 14), dtype), (4, 9, 14))
    assert w_b.strides[0] == 0
    assert check_aggregate(w_b, make(rng, (4, 14, 20), dtype), dtype).shape == (4, 9, 20)
    assert check_aggregate(w_b, make(rng, (2, 1, 14, 20), dtype), dtype).shape == (2, 4, 9, 20)


@pytest.mark.parametrize("dtype", DTYPES)
def test_aggregate_nan_confined_to_its_row(rng, dtype):
    w = prob_rows(rng, (2, 8, 40), dtype)
    w[1, 5, 7] = np.nan
    got = check_aggregate(w, make(rng, (2, 40, 19), dtype), dtype)
    assert np.isnan(got[1, 5]).all()
    nan = np.isnan(got)
    nan[1, 5] = False
    assert not nan.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "wshape, vshape", [((0, 5), (5, 4)), ((3, 0), (0, 4)), ((3, 5), (5, 0)), ((0, 2, 3), (0, 3, 4))]
)
def test_aggregate_zero_size(dtype, wshape, vshape):
    w, v = np.ones(wshape, dtype), np.ones(vshape, dtype)
    got = attnfast.aggregate(w, v)
    expected = ref.aggregate(w, v)
    assert got.shape == expected.shape and got.dtype == np.dtype(dtype)
    assert np.array_equal(got, expected)  # empty, or all zeros when Lk == 0


def test_aggregate_accepts_lists():
    w = [[0.25, 0.75], [1.0, 0.0], [0.5, 0.5]]
    v = [[1.0, 2.0, 3.0], [-1.0, 0.0, 4.0]]
    got = attnfast.aggregate(w, v)
    assert isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == (3, 3)
    assert_close_to_reference(got, ref.aggregate(w, v), np.array(w) @ np.array(v), np.float64)
