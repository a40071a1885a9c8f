"""The 16-bit storage conversions of every SIMD target, exhaustively where it is cheap.

Widening (float16/bfloat16 -> float32) must be exact for all 65536 bit patterns, and narrowing
(float32 -> 16 bit) must round to nearest, ties to even, as NumPy's float16 cast and ml_dtypes'
bfloat16 cast do (overflow to inf, subnormal results, NaN stays NaN). The kernels are driven through
the compiled core directly so that no Python-side conversion can hide a kernel's:
* widening: attention over one key returns its value row (weight exactly 1), so out = v;
* narrowing: scores_dot with D = 1 and q = 1 gives k * scale, exact in float32 for the chosen
  operands (8-bit significands times 16-bit ones), rounded once to the 16-bit result.
Both run on the vectorised bodies and on the partial-vector tails (odd lengths).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from attnfast import _attnfast as _core

SIXTEEN_BIT = [pytest.param(np.dtype(np.float16), id="float16"), pytest.param(np.dtype(ml_dtypes.bfloat16), id="bfloat16")]


def _all_patterns(dtype: np.dtype) -> np.ndarray:
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)


def _same_values(actual: np.ndarray, expected: np.ndarray) -> None:
    """Bitwise equal, except that any NaN matches any NaN (payloads are not part of the contract) and
    -0 matches +0: every kernel sums from +0, so a -0 term gives +0 (a dot product's, an accumulator's)."""
    with np.errstate(invalid="ignore"):  # widening a signalling NaN raises NumPy's invalid flag
        a, e = actual.astype(np.float64), expected.astype(np.float64)
    nan = np.isnan(e)
    np.testing.assert_array_equal(np.isnan(a), nan)
    np.testing.assert_array_equal(a[~nan], e[~nan])


def _attention_one_key(v: np.ndarray, out_dtype) -> np.ndarray:
    """attention over a single key whose value row is v: (rows, Dv) -> (rows, Dv) in out_dtype."""
    rows, dv = v.shape
    q = np.zeros((1, rows, 1), v.dtype)
    k = np.zeros((1, 1, 1), v.dtype)
    out = np.empty((1, rows, dv), out_dtype)
    _core.attention(q, k, v.reshape(1, 1, dv).repeat(1, 0) if rows == 1 else v[None, :1], out, [1], [1], 1, 1.0,
                    None, None, None, False, 0, -1, -1, None, None)
    return out[0]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("dv", [65536, 65535, 7, 1])
def test_widening_is_exact_for_every_bit_pattern(isa, dtype, dv):
    patterns = _all_patterns(dtype)
    for start in range(0, patterns.size, dv):
        v = patterns[start:start + dv][None]
        if v.shape[1] < dv:
            break
        with np.errstate(invalid="ignore"):
            expected = v.astype(np.float32)
        _same_values(_attention_one_key(v, np.float32), expected)
        if dv < 65536 and start > 4 * dv:
            break  # the short rows check the tails; the full row covered every pattern once


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_round_trip_through_a_16_bit_result_keeps_every_value(isa, dtype):
    v = _all_patterns(dtype)[None]
    _same_values(_attention_one_key(v, dtype), v)


def _scores_d1(k: np.ndarray, scale: float, out_dtype) -> np.ndarray:
    """k * scale for a (n,) k, through scores_dot with q = 1 (one query, n keys of one feature)."""
    q = np.ones((1, 1, 1), k.dtype)
    out = np.empty((1, 1, k.size), out_dtype)
    _core.scores_dot(q, k.reshape(1, k.size, 1), out, [1], scale)
    return out[0, 0]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
@pytest.mark.parametrize("n", [4099, 16])
def test_narrowing_rounds_to_nearest_even(isa, dtype, n, rng):
    # k: random finite 16-bit values of moderate size (so no product leaves float32's normal range);
    # scale: a significand of 24 minus k's significand bits, so k * scale is exact in float32 and the
    # 16-bit store is the only rounding. Many products land exactly half-way.
    k = _all_patterns(dtype)
    with np.errstate(invalid="ignore"):
        magnitude = np.abs(k.astype(np.float64))
    moderate = (magnitude < 2.0 ** 60) & ((magnitude > 2.0 ** -60) | (magnitude == 0))
    k = rng.choice(k[moderate], size=n)
    bits = 24 - (ml_dtypes.finfo(dtype).nmant + 1)
    for exponent in (-30, -14, -8, 0, 8, 15):
        significand = rng.integers(1 << (bits - 1), 1 << bits, dtype=np.int64)
        scale = float(significand) * 2.0 ** (exponent - bits + 1)
        exact = k.astype(np.float64) * scale
        assert np.array_equal(exact.astype(np.float32).astype(np.float64), exact, equal_nan=True)  # premise
        with np.errstate(over="ignore"):
            expected = exact.astype(np.float32).astype(dtype)
        _same_values(_scores_d1(k, scale, dtype), expected)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT)
def test_narrowing_of_the_special_values(isa, dtype):
    info = ml_dtypes.finfo(dtype)
    big, tiny = float(info.max), float(info.smallest_subnormal)
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, big, -big, tiny, -tiny, tiny / 2, tiny * 0.75, 1.0, -1.0],
                      np.float32)
    # Through float32 keys (scores_dot is keyed by the key storage: use the 16-bit table with float32 out
    # for the exact values, then the 16-bit result for the rounding).
    k = values.astype(dtype)
    _same_values(_scores_d1(k, 1.0, np.float32), k.astype(np.float32))
    for scale in (2.0, 0.5, 1.0 + 2.0 ** -8, 65536.0):
        with np.errstate(over="ignore", invalid="ignore"):
            expected = (k.astype(np.float32) * np.float32(scale)).astype(dtype)
        _same_values(_scores_d1(k, scale, dtype), expected)
