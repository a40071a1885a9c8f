"""The stage softmax on infinite and NaN entries, against hand-computed expected rows.

The rule (the limit of softmax as entries grow without bound): a row whose visible entries
include +inf splits its weight evenly over its +inf entries and gives every other entry exactly
0; -inf and masked entries weigh 0; a row with no visible entry (all masked or all -inf) is all
zeros; a NaN visible entry makes its whole row NaN (a masked NaN is hidden). Rows are long enough
(37) to put entries both in whole vectors and in the tail on every target, and each case runs
along the last axis (contiguous rows) and along axis 0 (the strided, buffered path).
"""

from __future__ import annotations

import numpy as np
import pytest

import attnfast

DTYPES = [np.float32, np.float64]
N = 37
INF, NAN = np.inf, np.nan


def row(n=N, fill=0.0, **entries):
    """A length-n row of `fill` with entries {index: value} (keys are "i<index>")."""
    r = np.full(n, fill)
    for key, value in entries.items():
        r[int(key[1:])] = value
    return r


def softmax_rows(x, axis, mask=None):
    """attnfast.softmax of the rows of x (2-D, one row per line) along `axis` (rows laid out there)."""
    if axis == -1:
        return attnfast.softmax(x, axis=-1, mask=mask)
    t = attnfast.softmax(np.ascontiguousarray(x.T), axis=0, mask=None if mask is None else np.ascontiguousarray(mask.T))
    return t.T


CASES = {
    # name: (row, mask or None, expected)
    "two_plus_inf": (row(3, i0=INF, i1=1.0, i2=INF), None, np.array([0.5, 0.0, 0.5])),
    "plus_inf_in_vector_and_tail": (row(i3=INF, i20=INF, i36=INF, i5=7.0),
                                    None, row(i3=1 / 3, i20=1 / 3, i36=1 / 3)),
    "mask_hides_one_plus_inf": (row(i0=INF, i1=1.0, i30=INF), row(fill=1.0, i0=0.0).astype(bool), row(i30=1.0)),
    "mask_hides_every_plus_inf": (row(i0=INF, i30=INF, i2=3.0), row(fill=1.0, i0=0.0, i30=0.0).astype(bool),
                                  None),  # expected: the ordinary softmax of the visible finite entries
    "all_plus_inf": (row(fill=INF), None, row(fill=1.0 / N)),
    "plus_and_minus_inf": (row(fill=-INF, i4=INF, i17=0.0, i33=INF), None, row(i4=0.5, i33=0.5)),
    "plus_inf_and_nan": (row(i2=INF, i19=NAN), None, row(fill=NAN)),
    "nan_then_minus_inf": (row(fill=-INF, i0=NAN), None, row(fill=NAN)),
    "nan_before_plus_inf": (row(fill=-INF, i0=NAN, i21=INF), None, row(fill=NAN)),
    "masked_nan_with_plus_inf": (row(i0=NAN, i9=INF), row(fill=1.0, i0=0.0).astype(bool), row(i9=1.0)),
    "all_minus_inf": (row(fill=-INF), None, row()),
    "all_masked_plus_inf": (row(fill=INF), np.zeros(N, bool), row()),
}


def expected_of(case, dtype):
    x, mask, expected = CASES[case]
    if expected is None:  # ordinary softmax of the visible entries, hidden ones 0
        e = np.where(mask, np.exp(np.where(mask, x, -INF) - x[mask].max()), 0.0)
        expected = e / e.sum()
    return np.asarray(expected, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("case", list(CASES))
def test_softmax_special_rows(isa, case, axis, dtype):
    x, mask, _ = CASES[case]
    expected = expected_of(case, dtype)
    # The special row sits between two ordinary rows, which must stay untouched by it.
    ordinary = np.linspace(-2.0, 2.0, x.size)
    xs = np.stack([ordinary, x, ordinary[::-1]]).astype(dtype)
    masks = None if mask is None else np.stack([np.ones_like(mask), mask, np.ones_like(mask)])
    got = softmax_rows(xs, axis, masks)
    assert got.dtype == np.dtype(dtype)
    if CASES[case][2] is None:
        np.testing.assert_allclose(got[1], expected, rtol=8 * np.finfo(dtype).eps, atol=0)
        assert np.all(got[1][~mask] == 0)
    else:
        # Exact: 1/k, 0 and NaN are what the rule defines, no rounding is involved.
        np.testing.assert_array_equal(got[1], expected)
    for r in (0, 2):
        assert np.isfinite(got[r]).all()
        assert abs(float(np.sum(got[r], dtype=np.float64)) - 1.0) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_plus_inf_on_a_middle_axis(isa, dtype):
    # (2, 5, 3) softmax over axis 1: each (i, :, j) line is one row.
    x = np.zeros((2, 5, 3), dtype)
    x[0, 1, 0] = x[0, 4, 0] = INF  # line (0, :, 0): two +inf
    x[1, :, 2] = INF  # line (1, :, 2): all +inf
    x[1, 2, 1] = NAN  # line (1, :, 1): NaN
    got = attnfast.softmax(x, axis=1)
    np.testing.assert_array_equal(got[0, :, 0], np.array([0, 0.5, 0, 0, 0.5], dtype))
    np.testing.assert_array_equal(got[1, :, 2], np.full(5, dtype(1) / dtype(5)))
    assert np.isnan(got[1, :, 1]).all()
    np.testing.assert_array_equal(got[0, :, 1], np.full(5, dtype(0.2)))
