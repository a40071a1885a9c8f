"""attnfast.quantize_kv: symmetric per-row int8 quantisation (the format of attention's k_scale / v_scale)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import attnfast


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 1), (2, 4, 17, 64), (7, 97)])
def test_round_trip_within_half_a_step(rng, dtype, shape):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 100, shape[:-1] + (1,))).astype(dtype)
    x8, scale = attnfast.quantize_kv(x)
    assert x8.dtype == np.int8 and x8.shape == x.shape
    assert scale.dtype == np.float32 and scale.shape == x.shape[:-1]
    wide = x.astype(np.float64)
    np.testing.assert_array_equal(scale, (np.max(np.abs(wide), -1) / 127).astype(np.float32))
    error = np.abs(wide - x8.astype(np.float64) * scale.astype(np.float64)[..., None])
    assert np.all(error <= scale.astype(np.float64)[..., None] / 2 * (1 + 1e-6))
    assert np.all(np.abs(x8) <= 127)
    # Each row's largest magnitude maps to +-127.
    assert np.all(np.max(np.abs(x8.astype(np.int64)), -1) == 127)


def test_rounds_half_to_even():
    x = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]], np.float32)  # scale 1: quotients are x itself
    x8, scale = attnfast.quantize_kv(x)
    assert scale[0] == 1.0
    np.testing.assert_array_equal(x8, [[127, 0, 2, 2, 0, -2]])


def test_zero_rows_have_scale_zero():
    x = np.zeros((2, 3, 4), np.float32)
    x[1, 2] = [0.0, -3.0, 1.0, 2.0]
    x8, scale = attnfast.quantize_kv(x)
    assert np.all(scale[0] == 0) and np.all(x8[0] == 0) and np.all(x8[1, :2] == 0)
    np.testing.assert_array_equal(x8[1, 2], [0, -127, 42, 85])
    assert np.all(np.isfinite(scale))


def test_empty_rows():
    x8, scale = attnfast.quantize_kv(np.ones((3, 0), np.float32))
    assert x8.shape == (3, 0) and np.all(scale == 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_an_error(bad):
    x = np.ones((2, 4), np.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x holds a non-finite value .* at index \(1, 2\); int8 with a finite scale"):
        attnfast.quantize_kv(x)


@pytest.mark.parametrize("x", [np.ones((2, 4), np.int32), np.ones((2, 4), np.int8), np.ones((2, 4), complex),
                               np.array([["a"]])])
def test_non_float_dtypes_are_a_type_error(x):
    with pytest.raises(TypeError, match=rf"x has dtype {x.dtype}"):
        attnfast.quantize_kv(x)


def test_scalar_is_an_error():
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension"):
        attnfast.quantize_kv(np.float32(1.0))


def test_feeds_attention(rng):
    k = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 9, 8)).astype(np.float32)
    q = rng.standard_normal((1, 2, 3, 8)).astype(np.float32)
    k8, ks = attnfast.quantize_kv(k)
    v8, vs = attnfast.quantize_kv(v)
    out = attnfast.reference.attention(q, k8, v8, k_scale=ks, v_scale=vs)
    dense = attnfast.reference.attention(q.astype(np.float64), k8 * ks[..., None].astype(np.float64),
                                         v8 * vs[..., None].astype(np.float64))
    np.testing.assert_array_equal(out, dense.astype(np.float32))


@pytest.mark.parametrize("row", [[1e300, 1.0], [1e-300, 5e-301]])
def test_rows_beyond_float32_scales_are_an_error(row):
    # max|x| / 127 overflows (scale inf: NaN on dequantising) or underflows (scale 0: the row lost).
    with pytest.raises(ValueError, match=r"x row \(0,\) has max \|x\| = .*, whose scale max\|x\| / 127 is "
                                         r"outside float32's range"):
        attnfast.quantize_kv(np.array([row]))
