"""int8 KV caches: symmetric per-row quantisation, the format attention's k_scale / v_scale read."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from numpy.typing import NDArray

from . import _inputs
from ._types import ArrayLike

__all__ = ["quantize_kv"]

_LEVELS = 127  # symmetric: -128 is never produced, so negation stays in range


def quantize_kv(x: ArrayLike) -> Tuple[NDArray[np.int8], NDArray[np.float32]]:
    """Quantise a K or V cache to int8 with one float32 scale per row (the last axis).

    Parameters
    ----------
    x : array_like, (..., D)
        float64, float32, float16 or ml_dtypes.bfloat16 values; any shape with at least one axis, e.g.
        (B, Hk, Lk, D) or a paged cache (num_blocks, Hk, block_size, D).

    Returns
    -------
    x_int8 : ndarray of int8, x's shape
        round-half-even(x / scale), in [-127, 127] (-128 is never produced).
    scale : ndarray of float32, x.shape[:-1]
        max(abs(x)) / 127 over each row, rounded to float32; 0 for an all-zero row, whose values are 0.
        Then x ~= x_int8 * scale[..., None] within scale / 2 per element: what
        ``attention(q, x_int8, ..., k_scale=scale)`` reads.

    Raises
    ------
    TypeError
        x is not of a floating storage dtype.
    ValueError
        x is 0-d, holds NaN or inf (no finite scale represents them), or has a row whose scale would be
        outside float32's range.

    See Also
    --------
    attention : takes the result as k / v with ``k_scale`` / ``v_scale``.

    Notes
    -----
    Symmetric per-row quantisation, computed in float64 (exact for every storage dtype), so the only
    roundings are the scale's (to float32) and the quotient's (to an integer). The round trip error is at
    most scale / 2 per element.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> x = np.array([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0]], dtype=np.float32)
    >>> x8, scale = attnfast.quantize_kv(x)
    >>> x8
    array([[127, -64,  32],
           [  0,   0,   0]], dtype=int8)
    >>> print(scale * 127)
    [1. 0.]

    An int8 KV cache in attention:

    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 1, 64), dtype=np.float32)
    >>> k = rng.standard_normal((1, 4, 256, 64), dtype=np.float32)
    >>> v = rng.standard_normal((1, 4, 256, 64), dtype=np.float32)
    >>> (k8, k_scale), (v8, v_scale) = attnfast.quantize_kv(k), attnfast.quantize_kv(v)
    >>> out = attnfast.attention(q, k8, v8, k_scale=k_scale, v_scale=v_scale)
    >>> out.dtype, bool(np.abs(out - attnfast.attention(q, k, v)).max() < 0.05)
    (dtype('float32'), True)
    """
    a = _inputs._float_array("x", x)
    if a.ndim == 0:
        raise ValueError("x must have at least 1 dimension (..., D): quantize_kv makes one scale per row.")
    # float64 arithmetic: exact for every storage dtype's values, so the only roundings are the scale's
    # (to float32) and the quotient's (to an integer).
    wide = a.astype(np.float64)
    if not np.all(np.isfinite(wide)):
        bad = np.argwhere(~np.isfinite(wide))[0]
        raise ValueError(
            f"x holds a non-finite value {float(wide[tuple(bad)])!r} at index {tuple(int(i) for i in bad)}; int8 with "
            f"a finite scale cannot represent it. Replace NaN / inf (e.g. np.nan_to_num) before quantising."
        )
    peak = np.max(np.abs(wide), axis=-1, initial=0.0)
    with np.errstate(over="ignore", under="ignore"):
        scale = (peak / _LEVELS).astype(np.float32)
    # A float64 row beyond float32's range has no float32 scale: one that overflows dequantises to NaN,
    # one that underflows to 0 turns the row into zeros. Both are errors, as a non-finite value is.
    unrepresentable = ~np.isfinite(scale) | ((scale == 0) & (peak > 0))
    if np.any(unrepresentable):
        row = tuple(int(i) for i in np.argwhere(unrepresentable)[0])
        raise ValueError(
            f"x row {row} has max |x| = {float(peak[row])!r}, whose scale max|x| / 127 is outside float32's "
            f"range (the scales are float32); rescale x before quantising."
        )
    divisor = np.where(scale == 0, 1.0, scale.astype(np.float64))[..., None]
    levels = np.clip(np.rint(wide / divisor), -_LEVELS, _LEVELS)  # np.rint rounds half to even
    return levels.astype(np.int8), scale
