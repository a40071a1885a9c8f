"""What ``attention_backward`` returns, and the reductions the fast path and the reference share.

Both implementations compute every gradient on batch-shaped operands (one item per query item, or per
kv item for the kernel's dk and dv) and then sum it back to the shape of its input: over the axes the
input was broadcast along and, for GQA/MQA, over the query heads that share a kv head. Summing is
always done by ``np.add.reduce`` on the gradient, never by materialising a broadcast input.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

__all__ = ["AttentionGrads", "sum_to_shape", "fold_query_heads"]


class AttentionGrads(NamedTuple):
    """Gradients of a scalar loss with respect to the inputs of :func:`attnfast.attention`.

    What :func:`attnfast.attention_backward` returns: a named tuple (fields by name or unpacked in order).
    Each gradient has its input's shape and dtype; a field is None when the call had no such input.

    Attributes
    ----------
    dq : ndarray
        Of q, q's shape and dtype: summed over the axes along which q was broadcast.
    dk : ndarray
        Of k: summed over broadcast axes and over the query heads that share each kv head (GQA/MQA).
    dv : ndarray
        Of v, like dk.
    dbias : ndarray or None
        Of ``bias`` (given only): the gradient of the scores, summed over bias's broadcast axes.
    dw : ndarray or None
        Of ``w`` (``method="general"``), (D, Dk).
    dw_q : ndarray or None
        Of ``w_q`` (``method="concat"``, and ``"additive"`` when it was given: with ``w_q=None`` q is the
        projection and ``dq`` its gradient).
    dw_k : ndarray or None
        Of ``w_k``, like dw_q.
    dscore_bias : ndarray or None
        Of ``score_bias`` (``"concat"``: 0-d; ``"additive"``: (A,)), also when it was left at its default.
    dv_a : ndarray or None
        Of ``v_a`` (``"additive"``), also when it was left at its default of ones.
    dsinks : ndarray or None
        Of ``sinks`` (given only), with sinks' shape: -sum_i e^(sink - lse_i) (dO_i . O_i) over the rows
        (and batch items) each sink serves.

    See Also
    --------
    attnfast.attention_backward

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> q = k = v = np.eye(3, dtype=np.float32)
    >>> out, lse = attnfast.attention(q, k, v, return_lse=True)
    >>> grads = attnfast.attention_backward(np.ones_like(out), q, k, v, out, lse)
    >>> dq, dk, dv, *rest = grads
    >>> dv.shape, all(g is None for g in rest)
    ((3, 3), True)
    """

    dq: NDArray[Any]
    dk: NDArray[Any]
    dv: NDArray[Any]
    dbias: Optional[NDArray[Any]] = None
    dw: Optional[NDArray[Any]] = None
    dw_q: Optional[NDArray[Any]] = None
    dw_k: Optional[NDArray[Any]] = None
    dscore_bias: Optional[NDArray[Any]] = None
    dv_a: Optional[NDArray[Any]] = None
    dsinks: Optional[NDArray[Any]] = None


def sum_to_shape(x: NDArray[Any], shape: Tuple[int, ...]) -> NDArray[Any]:
    """``x`` summed over the axes an input of ``shape`` was broadcast along to reach ``x.shape``.

    Returns ``x`` itself when nothing was broadcast. Leading axes ``shape`` lacks and axes where it
    has extent 1 (and ``x`` does not) are summed; the result has exactly ``shape``.
    """
    shape = tuple(shape)
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    if not axes:
        return x
    return np.add.reduce(x, axis=axes, keepdims=True).reshape(shape)


def fold_query_heads(x: NDArray[Any], kv_batch_shape: Tuple[int, ...], group: int) -> NDArray[Any]:
    """A gradient per query item (batch + (L, D)) summed over the ``group`` query heads that read each
    kv head (axis -3 of the batch: query head h reads kv head h // group), giving kv_batch + (L, D)."""
    if group == 1:
        return x
    split = x.shape[:-3] + (kv_batch_shape[-1], group) + x.shape[-2:]
    folded: NDArray[Any] = np.add.reduce(x.reshape(split), axis=-3)
    return folded
