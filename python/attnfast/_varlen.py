"""Packed variable-length attention: many sequences concatenated along the length axis, one call.

``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)`` is one :func:`attnfast.attention` per sequence
s (query rows [cu_q[s], cu_q[s+1]) against keys [cu_k[s], cu_k[s+1])) without the loop, the padding or
a dense block-diagonal mask. The kernel sees one batch item per (sequence, head): per-item row offsets
into the packed arrays (q_starts / kv_starts), the item's query and key counts (q_lengths, kv_lengths)
and its own causal diagonal (diagonal_offsets), so nothing is computed across sequences and no key of
another sequence is read.

Scheduling: the items go to the kernel longest sequence first, so its task queue hands out the big
query blocks first and the short ones fill the tail of the call. Sequences with few query rows (group *
rows <= 16: decode steps, speculative-decoding drafts) go in calls of their own (by row count), which
the kernel runs on its row-wise (and split-KV) decode path; the others in one call the tiled path runs. Results do not
depend on the order, the partition or the thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union, cast, overload

import numpy as np

from . import _attnfast as _core
from . import _inputs
from ._api import _copy_rounded, _finished, _kernel_operands, _overlaps_itself, _written
from ._types import Array, ArrayLike, CausalAlign, FloatArray, Real, Window

__all__ = ["attention_varlen", "check_attention_varlen"]

# The row-wise decode path takes calls of at most this many query rows per kv item (group * Lq), as
# attention_rowwise.h's kMaxRows.
_ROWWISE_MAX_ROWS = 16


@dataclass
class VarlenArgs:
    """Validated arguments of ``attention_varlen``: ``a`` is what ``attention`` would check of the packed
    arrays (dtypes, heads, scale, window, out), the rest the packed structure and the modifiers."""

    a: _inputs.AttentionArgs  # of the packed q, k, v (lq = Tq, lk = Tk)
    cu_q: np.ndarray  # int64 (n + 1,)
    cu_k: np.ndarray
    causal_align: CausalAlign
    softcap: Optional[float]
    alibi_slopes: Optional[np.ndarray]  # compute dtype, broadcast to the batch shape (a read-only view)
    sinks: Optional[np.ndarray]

    @property
    def len_q(self) -> np.ndarray:
        return np.diff(self.cu_q)

    @property
    def len_k(self) -> np.ndarray:
        return np.diff(self.cu_k)


def _check_cu_seqlens(name: str, x: Any, total: int, axis: str) -> np.ndarray:
    """cu_seqlens as int64 (n + 1,): 1-D integers, 0 first, non-decreasing, ``total`` last."""
    if isinstance(x, (bool, np.bool_)) or np.isscalar(x) and not isinstance(x, (str, bytes)):
        raise TypeError(
            f"{name} must be a 1-D integer array of cumulative sequence lengths (n + 1 values: 0, then each "
            f"sequence's end); got the scalar {x!r}. For one sequence of {total} rows pass [0, {total}]."
        )
    try:
        c = np.asarray(x)
    except Exception as e:  # e.g. a ragged list
        raise TypeError(f"{name} must be a 1-D integer array of cumulative sequence lengths; got {type(x).__name__} "
                        f"({e}).") from None
    if c.dtype.kind not in "iu" or c.dtype == np.bool_:
        what = "an empty array of dtype float64 (np.asarray([]))" if c.size == 0 else f"dtype {c.dtype}"
        raise TypeError(
            f"{name} must be a 1-D integer array of cumulative sequence lengths; got {what}. "
            f"Convert it with np.asarray({name}, dtype=np.int64)."
        )
    if c.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (n + 1 cumulative sequence lengths); got an array of shape {tuple(c.shape)}. "
            f"Flatten it with {name}.ravel() if it holds one value per sequence boundary."
        )
    if c.size == 0:
        raise ValueError(f"{name} must hold n + 1 values (0, then each sequence's end); got an empty array. "
                         f"For no sequence at all pass [0].")
    if c[0] != 0:
        raise ValueError(f"{name} must start at 0 (the first sequence starts at row 0); got {name}[0] = {int(c[0])}.")
    steps = np.diff(c.astype(np.int64) if c.dtype.kind == "i" else c.astype(object))
    if steps.size and (steps < 0).any():
        s = int(np.flatnonzero(steps < 0)[0])
        raise ValueError(
            f"{name} must be non-decreasing (sequence s is rows [{name}[s], {name}[s+1])); got "
            f"{name}[{s}] = {int(c[s])} > {name}[{s + 1}] = {int(c[s + 1])}."
        )
    if c[-1] != total:
        raise ValueError(
            f"{name} must end at {axis} = {total} (every row belongs to one sequence); got {name}[-1] = "
            f"{int(c[-1])}."
        )
    return c.astype(np.int64)


def check_attention_varlen(q: Any, k: Any, v: Any, cu_seqlens_q: Any, cu_seqlens_k: Any, *, method: Any = "scaled_dot",
                           scale: Any = None, causal: Any = False, causal_align: Any = "top_left", window: Any = None,
                           softcap: Any = None, alibi_slopes: Any = None, sinks: Any = None, return_lse: Any = False,
                           out: Any = None) -> VarlenArgs:
    """Validate the arguments of ``attention_varlen`` (shared by the kernel path and the reference)."""
    method = _inputs._check_method(method)
    if method not in ("dot", "scaled_dot"):
        raise ValueError(
            f"attention_varlen supports method 'dot' and 'scaled_dot'; got {method!r}. Project q (and k) "
            f"yourself first, or call attention per sequence."
        )
    for name, x in (("k", k), ("v", v)):
        if np.dtype(getattr(x, "dtype", np.float64)) == np.int8:
            raise TypeError(
                f"attention_varlen takes floating-point k and v; got {name} of dtype int8. Dequantise the "
                f"cache first ({name}_int8 * {name}_scale[..., None]), or use attention with k_scale= and "
                f"v_scale= per sequence."
            )
    a = _inputs.check_attention(q, k, v, method=method, scale=scale, causal=causal, causal_align=causal_align,
                                window=window, return_lse=return_lse, out=out, softcap=softcap,
                                alibi_slopes=alibi_slopes, sinks=sinks)
    cu_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, a.lq, "Tq (q's axis -2)")
    cu_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, a.lk, "Tk (k's and v's axis -2)")
    if cu_q.size != cu_k.size:
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; got "
            f"{cu_q.size - 1} and {cu_k.size - 1} ({cu_q.size} and {cu_k.size} values)."
        )
    batch = tuple(a.batch_shape)
    return VarlenArgs(
        a=a, cu_q=cu_q, cu_k=cu_k, causal_align=causal_align, softcap=a.softcap,
        alibi_slopes=None if a.alibi_slopes is None else np.broadcast_to(a.alibi_slopes, batch),
        sinks=None if a.sinks is None else np.broadcast_to(a.sinks, batch),
    )


def _per_item(per_sequence: np.ndarray, items_per_sequence: int) -> np.ndarray:
    """One int64 entry per kernel batch item (sequence-major, then the batch shape in C order)."""
    return np.ascontiguousarray(np.repeat(per_sequence.astype(np.int64), items_per_sequence))


def _kernel_calls(va: VarlenArgs) -> List[np.ndarray]:
    """The sequences of each kernel call, longest first. The row-wise decode path (group * rows <= 16)
    gives every kv item of a call the call's longest row count and computes the scores of the rows a
    shorter sequence does not have (it only never reads or writes them), so its sequences go in calls
    by row count rounded up to a power of two (1, 2, 3-4, 5-8, 9-16 rows per kv item): at most half of a
    call's rows are such padding. The tiled path skips a sequence's empty query blocks: one call.
    Sequences without query rows have nothing to write; those without keys are written by the caller
    (out 0, lse -inf or the sink)."""
    lq, lk = va.len_q, va.len_k
    order = np.argsort(-lq, kind="stable")
    order = order[(lq[order] > 0) & (lk[order] > 0)]
    rows = va.a.group * lq[order]
    short = rows <= _ROWWISE_MAX_ROWS
    calls = [order[~short]]
    bucket = np.ceil(np.log2(rows[short])).astype(np.int64)
    calls += [order[short][bucket == b] for b in np.unique(bucket)[::-1]]
    return [s for s in calls if s.size]


def _run_kernel(va: VarlenArgs, seqs: np.ndarray, qq: np.ndarray, kk: np.ndarray, vv: np.ndarray, kernel_scale: float,
                result: np.ndarray, lse: Optional[np.ndarray]) -> None:
    a = va.a
    batch, kv_batch = tuple(a.batch_shape), tuple(a.kv_batch_shape)
    per_q, per_kv = math.prod(batch), math.prod(kv_batch)
    lq, lk = va.len_q[seqs], va.len_k[seqs]
    diagonal = lk - lq if va.causal_align == "bottom_right" else np.zeros_like(lq)
    lse_offsets = None
    if lse is not None:
        rows = np.arange(per_q, dtype=np.int64) * a.lq
        lse_offsets = np.ascontiguousarray((va.cu_q[seqs][:, None] + rows[None, :]).ravel())
    modifiers: Dict[str, Any] = {}
    if va.softcap is not None:
        modifiers["softcap"] = va.softcap
    for name in ("alibi_slopes", "sinks"):
        x = getattr(va, name)
        if x is not None:  # the same values for every sequence: sequence-major per-item copies
            modifiers[name] = np.ascontiguousarray(np.broadcast_to(x.reshape(-1), (seqs.size, per_q)).reshape(-1))
    _core.attention(
        qq, kk, vv, result, [int(seqs.size), *batch], [int(seqs.size), *kv_batch], a.group, kernel_scale,
        None, None, _per_item(lk, per_q), a.causal, 0, a.window_left, a.window_right, lse, None, None,
        diagonal_offsets=_per_item(diagonal, per_q), q_lengths=_per_item(lq, per_q),
        q_starts=_per_item(va.cu_q[seqs], per_q), kv_starts=_per_item(va.cu_k[seqs], per_kv),
        lse_offsets=lse_offsets, lq=int(lq.max()), lk=int(lk.max()), **modifiers,
    )


def _fill_keyless(va: VarlenArgs, result: np.ndarray, lse: Optional[np.ndarray]) -> None:
    """Rows of sequences with no key: out 0, lse -inf (the sink's logit with sinks)."""
    for s in np.flatnonzero((va.len_q > 0) & (va.len_k == 0)):
        rows = slice(int(va.cu_q[s]), int(va.cu_q[s + 1]))
        result[..., rows, :] = 0
        if lse is not None:
            lse[..., rows] = -np.inf if va.sinks is None else va.sinks[..., None]


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
    """Attention over packed variable-length sequences, each attending only to its own keys.

    Equals one :func:`attention` call per sequence, without the loop, padding or a dense block-diagonal
    mask; no row of another sequence is read.

    Parameters
    ----------
    q : array_like, (..., Tq, D)
        The sequences' query rows concatenated along axis -2: float64, float32, float16 or
        ml_dtypes.bfloat16. Leading axes as in :func:`attention` (heads on axis -3; the kv heads may divide
        the query heads, GQA/MQA by index).
    k : array_like, (..., Tk, D)
        Their keys, concatenated the same way.
    v : array_like, (..., Tk, Dv)
        Their values.
    cu_seqlens_q : array_like of int, (n + 1,)
        Cumulative query lengths: 0 first, non-decreasing, Tq last. Sequence s is the query rows
        [cu_seqlens_q[s], cu_seqlens_q[s+1]).
    cu_seqlens_k : array_like of int, (n + 1,)
        Cumulative key lengths, the same way, ending at Tk; sequence s attends to keys
        [cu_seqlens_k[s], cu_seqlens_k[s+1]).
    method : {"scaled_dot", "dot"}, default "scaled_dot"
        The score rule.
    scale : float, optional
        Multiplies the scores; default 1/sqrt(D) for "scaled_dot", 1 for "dot".
    causal : bool, default False
        Causal within each sequence.
    causal_align : {"top_left", "bottom_right"}, default "top_left"
        Per sequence: "bottom_right" aligns its last query row with its last key
        (diag_i = i + len_k - len_q).
    window : tuple of (int or None, int or None), optional
        (left, right) around each sequence's diagonal, as in :func:`attention`.
    softcap : float, optional
        As in :func:`attention`: s <- softcap * tanh(s / softcap).
    alibi_slopes : array_like, optional
        Broadcastable to q's batch shape (e.g. (Hq,)), as in :func:`attention`.
    sinks : array_like, optional
        Broadcastable to q's batch shape (e.g. (Hq,)), as in :func:`attention`.
    return_lse : bool, default False
        Also return the log-sum-exp (..., Tq).
    out : ndarray, optional
        (..., Tq, Dv), of any of the four floating dtypes; written only when the call succeeds.
    **unexpected
        No other keyword argument is accepted: TypeError, naming attnfast's equivalent of a PyTorch,
        flash-attn or JAX name (``is_causal``, ``attn_mask``, ``dim``...) or the closest accepted name.

    Returns
    -------
    out : ndarray, (..., Tq, Dv)
        The promoted dtype of q, k and v (or ``out``). A sequence with no keys gets out 0.
    lse : ndarray, (..., Tq)
        Only with ``return_lse=True``: float32 for a 16-bit result; -inf (the sink with ``sinks``) for the
        rows of a sequence with no keys.

    Raises
    ------
    TypeError
        cu_seqlens that are not integer arrays (a scalar, floats), arrays of dtypes attnfast does not
        compute with, flags that are not bool.
    ValueError
        cu_seqlens that are not 1-D, do not start at 0, decrease, do not end at Tq / Tk, or have different
        lengths; a method other than "dot" and "scaled_dot"; shapes, window or scale as in
        :func:`attention`.

    See Also
    --------
    attention, attnfast.reference.attention_varlen

    Notes
    -----
    The numerics and visibility rules are those of :func:`attention`, applied per sequence; results do not
    depend on how the kernel orders or partitions the sequences, nor on the thread count. There is no
    backward yet.

    Examples
    --------
    >>> import numpy as np
    >>> import attnfast
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 3, 8])                       # two sequences: 3 and 5 tokens
    >>> q = rng.standard_normal((2, 8, 16), dtype=np.float32)   # (Hq, Tq, D)
    >>> k = rng.standard_normal((2, 8, 16), dtype=np.float32)
    >>> v = rng.standard_normal((2, 8, 16), dtype=np.float32)
    >>> out = attnfast.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> second = attnfast.attention(q[:, 3:], k[:, 3:], v[:, 3:], causal=True)
    >>> out.shape, bool(np.allclose(out[:, 3:], second, atol=1e-6))
    ((2, 8, 16), True)
    """
    if unexpected:
        _inputs.reject_unexpected(attention_varlen, unexpected)
    va = check_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, method=method, scale=scale, causal=causal,
                                causal_align=causal_align, window=window, softcap=softcap,
                                alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse, out=out)
    a = va.a
    batch = tuple(a.batch_shape)
    if a.lq == 0 or 0 in batch or (a.dv == 0 and not a.return_lse):
        # return_weights is never set here: out, or (out, lse).
        return cast(Union[Array, Tuple[Array, FloatArray]], _inputs.result_without_scores(a))
    qq, kk, vv, kernel_scale, _ = _kernel_operands(a)
    t = a.compute
    target = a.out
    work = _written(a.dtype if target is None else target.dtype, kk.dtype, t)
    calls = _kernel_calls(va)
    # As attention: straight into out= only when nothing the kernel reads shares its memory, and by one
    # kernel call (a second one could still fail, out of memory, after the first wrote).
    direct = (target is not None and len(calls) <= 1 and target.dtype == work and target.flags.aligned
              and (a.dv <= 1 or target.strides[-1] == target.itemsize) and not _overlaps_itself(target)
              and not any(np.may_share_memory(target, x) for x in (qq, kk, vv)))
    result = target if direct and target is not None else np.empty(batch + (a.lq, a.dv), work)
    lse = np.empty(batch + (a.lq,), t) if a.return_lse else None
    for seqs in calls:
        _run_kernel(va, seqs, qq, kk, vv, kernel_scale, result, lse)
    _fill_keyless(va, result, lse)
    if target is not None and not direct:
        _copy_rounded(target, result)
        result = target
    result = _finished(result, a.dtype) if target is None else result
    return (result, lse) if lse is not None else result
