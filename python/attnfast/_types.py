"""Type aliases of the public signatures (the fast path, the reference and the adapters share them).

Results are ``NDArray[Any]``: their dtype is the promotion of the inputs (float64, float32, float16 or
``ml_dtypes.bfloat16``), and bfloat16 is not a ``numpy.floating`` subtype, so ``NDArray[np.floating]``
would be a claim the bfloat16 results break. ``lse`` is only ever float32 or float64, so it is typed
as a floating array. Inputs are ``numpy.typing.ArrayLike``: anything :func:`numpy.asarray` takes
(``ml_dtypes`` arrays included, being ndarrays).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, SupportsIndex, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ArrayLike",
    "Array",
    "FloatArray",
    "Method",
    "CausalAlign",
    "Real",
    "Window",
    "AttentionOutput",
]

#: A result whose dtype follows the inputs (possibly bfloat16).
Array = NDArray[Any]
#: The log-sum-exp: float32 for 16-bit and float32 results, float64 for float64 ones.
FloatArray = NDArray[np.floating[Any]]

#: The score rules of :func:`attnfast.scores` and :func:`attnfast.attention`.
Method = Literal["dot", "scaled_dot", "general", "concat", "additive"]
#: Where the causal diagonal (and the window and ALiBi with it) is anchored.
CausalAlign = Literal["top_left", "bottom_right"]

#: A real scalar (``scale``, ``softcap``): Python int/float or a NumPy scalar.
Real = Union[float, np.floating[Any], np.integer[Any]]
#: ``window=(left, right)``, each side an int >= 0 or None (unbounded).
Window = Optional[Union[Sequence[Optional[SupportsIndex]], NDArray[np.integer[Any]]]]

#: What attention returns for ``return_lse`` / ``return_weights`` known only at run time.
AttentionOutput = Union[
    Array,
    Tuple[Array, FloatArray],
    Tuple[Array, Array],
    Tuple[Array, FloatArray, Array],
]
