"""reference.attention_varlen: packed variable-length attention as a loop of reference.attention calls,
one per sequence, in float64 (each sequence's rows rounded once into the result dtype)."""

from __future__ import annotations

from typing import Any, Dict, Literal, Optional, Tuple, Union, overload

import numpy as np

from . import _inputs
from ._types import Array, ArrayLike, CausalAlign, FloatArray, Real, Window
from ._varlen import check_attention_varlen

__all__ = ["attention_varlen"]


@overload
def attention_varlen(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike, *,
    method: Literal["scaled_dot", "dot"] = "scaled_dot", scale: Optional[Real] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, softcap: Optional[Real] = None,
    alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None, return_lse: Literal[False] = False,
    out: Optional[Array] = None,
) -> Array: ...


@overload
def attention_varlen(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike, *,
    method: Literal["scaled_dot", "dot"] = "scaled_dot", scale: Optional[Real] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, softcap: Optional[Real] = None,
    alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None, return_lse: Literal[True],
    out: Optional[Array] = None,
) -> Tuple[Array, FloatArray]: ...


@overload
def attention_varlen(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike, *,
    method: Literal["scaled_dot", "dot"] = "scaled_dot", scale: Optional[Real] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, softcap: Optional[Real] = None,
    alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None, return_lse: bool = False,
    out: Optional[Array] = None,
) -> Union[Array, Tuple[Array, FloatArray]]: ...


def attention_varlen(
    q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike, cu_seqlens_k: ArrayLike, *,
    method: Literal["scaled_dot", "dot"] = "scaled_dot", scale: Optional[Real] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, softcap: Optional[Real] = None,
    alibi_slopes: Optional[ArrayLike] = None, sinks: Optional[ArrayLike] = None, return_lse: bool = False,
    out: Optional[Array] = None, **unexpected: Any,
) -> Union[Array, Tuple[Array, FloatArray]]:
    """Reference for :func:`attnfast.attention_varlen`: one float64 attention per packed sequence.

    Same signature, errors and semantics as :func:`attnfast.attention_varlen`. Sequence s, query rows
    [cu_q[s], cu_q[s+1]) against keys [cu_k[s], cu_k[s+1]), is one :func:`attnfast.reference.attention`
    call on float64 copies of its rows, with the same options (the window and the bottom_right diagonal
    per sequence).

    Parameters
    ----------
    q : array_like, (..., Tq, D)
        The sequences' query rows concatenated along axis -2 (float64, float32, float16 or
        ml_dtypes.bfloat16); heads on axis -3, GQA/MQA by index.
    k : array_like, (..., Tk, D)
        Their keys, concatenated the same way.
    v : array_like, (..., Tk, Dv)
        Their values.
    cu_seqlens_q : array_like of int, (n + 1,)
        Cumulative query lengths: 0 first, non-decreasing, Tq last.
    cu_seqlens_k : array_like of int, (n + 1,)
        Cumulative key lengths: 0 first, non-decreasing, Tk last.
    method : {"scaled_dot", "dot"}, default "scaled_dot"
        The score rule.
    scale : float, optional
        Multiplies the scores; default 1/sqrt(D) for "scaled_dot", 1 for "dot".
    causal : bool, default False
        Causal within each sequence.
    causal_align : {"top_left", "bottom_right"}, default "top_left"
        Per sequence, as in :func:`attnfast.attention_varlen`.
    window : tuple of (int or None, int or None), optional
        (left, right) around each sequence's diagonal.
    softcap : float, optional
        s <- softcap * tanh(s / softcap).
    alibi_slopes : array_like, optional
        Broadcastable to q's batch shape (e.g. (Hq,)).
    sinks : array_like, optional
        Broadcastable to q's batch shape (e.g. (Hq,)).
    return_lse : bool, default False
        Also return the log-sum-exp (..., Tq).
    out : ndarray, optional
        (..., Tq, Dv) of any of the four floating dtypes to write the result into.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    out : ndarray, (..., Tq, Dv)
        The promoted dtype of q, k and v (or ``out``); 0 for a sequence with no keys.
    lse : ndarray, (..., Tq)
        Only with ``return_lse=True``; -inf (the sink with ``sinks``) for a sequence with no keys.

    Raises
    ------
    TypeError
        As :func:`attnfast.attention_varlen`: cu_seqlens that are not integer arrays, unsupported dtypes.
    ValueError
        As :func:`attnfast.attention_varlen`: malformed cu_seqlens, an unsupported method, bad shapes.

    See Also
    --------
    attnfast.attention_varlen

    Notes
    -----
    Each sequence's rows are computed in float64 and rounded once into the result dtype.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> v = np.arange(4.0).reshape(4, 1)
    >>> out = attnfast.reference.attention_varlen(np.zeros((3, 2)), np.zeros((4, 2)), v, [0, 1, 3], [0, 2, 4])
    >>> print(out.ravel())                           # the mean of each sequence's values
    [0.5 2.5 2.5]
    """
    from . import reference

    if unexpected:
        _inputs.reject_unexpected(attention_varlen, unexpected)
    va = check_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, method=method, scale=scale, causal=causal,
                                causal_align=causal_align, window=window, softcap=softcap,
                                alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse, out=out)
    a = va.a
    batch = tuple(a.batch_shape)
    o = np.zeros(batch + (a.lq, a.dv))
    lse = np.full(batch + (a.lq,), -np.inf)
    window = None if a.window_left < 0 and a.window_right < 0 else (
        None if a.window_left < 0 else a.window_left, None if a.window_right < 0 else a.window_right)
    modifiers: Dict[str, Any] = {name: value for name, value in (
        ("softcap", va.softcap), ("alibi_slopes", va.alibi_slopes), ("sinks", va.sinks)) if value is not None}
    q64, k64, v64 = (x.astype(np.float64) for x in (a.q, a.k, a.v))
    for s in range(va.cu_q.size - 1):
        rows = slice(int(va.cu_q[s]), int(va.cu_q[s + 1]))
        keys = slice(int(va.cu_k[s]), int(va.cu_k[s + 1]))
        if rows.stop == rows.start:
            continue
        o_s, lse_s = reference.attention(q64[..., rows, :], k64[..., keys, :], v64[..., keys, :], method=a.method,
                                         scale=a.scale, causal=a.causal, causal_align=va.causal_align,
                                         window=window, return_lse=True, **modifiers)
        o[..., rows, :] = o_s
        lse[..., rows] = lse_s
    result = reference._rounded_result(a, o)
    if a.return_lse:
        return result, lse.astype(_inputs.lse_dtype(a.dtype))
    return result
