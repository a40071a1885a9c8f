"""Input coercion and validation shared by the public API and the reference.

Every public function (fast path and :mod:`attnfast.reference`) runs its inputs
through one ``check_*`` function here, so both raise the same exception, with
the same message, for the same bad input.  The checks return dataclasses
holding the coerced arrays and the derived sizes the kernels need (plain, not
frozen: a frozen dataclass's __init__ alone took ~5 us, a visible part of a
decoder-step call).

Policy
------
* Arrays go through :func:`numpy.asarray`; an array whose dtype already
  matches is never copied (views, negative strides and Fortran order are kept:
  deciding whether a contiguous copy is worth it is the kernel's business).
* q/k/v/x/weights/v/outs/lses must be float64, float32, float16 or
  ``ml_dtypes.bfloat16`` (the storage dtypes).  The result dtype is NumPy's
  promotion of them, except float16 + bfloat16, which NumPy refuses and
  attnfast defines as float32 (:func:`result_dtype`, the one rule used
  everywhere); the computation dtype is float64 when the result is, else
  float32 (:func:`compute_dtype`).  float32/float64 inputs are converted to
  the result dtype; 16-bit ones are kept as given (converted exactly where
  they are computed with), so a 16-bit KV cache is never copied.  Anything
  else is a ``TypeError``.  Any byte order is accepted: a non-native one
  (``'>f4'``) is converted once.
* Every layout NumPy can make is accepted (zero, negative, unaligned or
  non-multiple strides); the fast path copies only what its kernels need.
* Integer parameters (window sides, kv_lengths) must fit int64, else a
  ``ValueError``; window sides are clamped to Lq + Lk, which changes nothing
  (no query sees further than that) and keeps all index arithmetic in range.
* ``scale`` must be finite in the computation dtype (1e39 is not a float32).
* Shapes that broadcast to a result (or score-shaped operand) larger than one
  NumPy array can hold are a ``ValueError`` saying so, not a shape mismatch.
* Method weights and ``bias`` are converted to the computation dtype (they may
  be any storage dtype or integer: those convert exactly or harmlessly).
* A torch.Tensor of dtype bfloat16, which NumPy cannot wrap, is a
  ``TypeError`` that says how to pass it (duck-typed: torch is never imported).
* Shapes and values: ``ValueError``; kinds and dtypes: ``TypeError``.  Every
  message names the argument, shows what was received and what was expected,
  and says how to fix it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import ml_dtypes
import numpy as np

from ._types import AttentionOutput, Method

__all__ = [
    "METHODS",
    "CAUSAL_ALIGNS",
    "ScoresArgs",
    "SoftmaxArgs",
    "AggregateArgs",
    "AttentionArgs",
    "MergeArgs",
    "AttentionBackwardArgs",
    "broadcast_batch",
    "check_scores",
    "check_softmax",
    "check_aggregate",
    "check_attention",
    "check_merge_states",
    "check_attention_backward",
    "reject_backward_extras",
    "reject_unexpected",
    "result_dtype",
    "compute_dtype",
    "lse_dtype",
    "round_to",
    "STORAGE_DTYPES",
]

METHODS = ("dot", "scaled_dot", "general", "concat", "additive")
CAUSAL_ALIGNS = ("top_left", "bottom_right")

# Which keyword arguments each method reads; a weight passed to a method that
# ignores it is almost always a bug in the caller (wrong method name), so it
# is rejected instead of silently dropped.
_METHOD_WEIGHTS = {
    "dot": (),
    "scaled_dot": (),
    "general": ("w",),
    "concat": ("w_q", "w_k", "score_bias"),
    "additive": ("w_q", "w_k", "score_bias", "v_a"),
}
_WEIGHT_USERS = {
    "w": "method='general'",
    "w_q": "method='concat' or method='additive'",
    "w_k": "method='concat' or method='additive'",
    "score_bias": "method='concat' or method='additive'",
    "v_a": "method='additive'",
}

_FLOAT64 = np.dtype(np.float64)
_FLOAT32 = np.dtype(np.float32)
_FLOAT16 = np.dtype(np.float16)
_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# The dtypes arrays may be stored in (widest first); the kernels compute in float32 or float64.
STORAGE_DTYPES = (_FLOAT64, _FLOAT32, _FLOAT16, _BFLOAT16)
_SIXTEEN_BIT = (_FLOAT16, _BFLOAT16)
# The same, most frequent first: membership tests compare in order (~40 ns each, on every array of a call).
_STORAGE_BY_FREQUENCY = (_FLOAT32, _FLOAT64, _BFLOAT16, _FLOAT16)
_ACCEPTED = "float64, float32, float16 or ml_dtypes.bfloat16"
# The smallest magnitude that rounds to inf in float32: FLT_MAX plus half an ulp (a tie rounds to the
# even neighbour, and FLT_MAX's significand is odd). Exact in float64.
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103

Shape = Tuple[int, ...]


# --------------------------------------------------------------------------
# Result records
# --------------------------------------------------------------------------
# eq=False: the fields are ndarrays, whose == is elementwise, so a generated
# __eq__ would raise on use; identity comparison is the honest default.


@dataclass(eq=False)
class ScoresArgs:
    """Validated arguments of ``scores``.

    ``q``: (..., Lq, D) and ``k``: (..., Lk, Dk), not broadcast, each in
    ``dtype`` (the result dtype) or its own 16-bit dtype.  Weights a method
    does not use are None; the others are in ``compute`` (float32 or
    float64).  ``score_bias`` is a 0-d array for ``concat`` and an (A,)
    array for ``additive``.
    """

    q: np.ndarray
    k: np.ndarray
    dtype: np.dtype
    compute: np.dtype
    batch_shape: Shape
    lq: int
    lk: int
    d: int
    dk: int
    method: Method
    scale: float
    w: Optional[np.ndarray] = None
    w_q: Optional[np.ndarray] = None
    w_k: Optional[np.ndarray] = None
    v_a: Optional[np.ndarray] = None
    score_bias: Optional[np.ndarray] = None
    hidden: int = 0


@dataclass(eq=False)
class SoftmaxArgs:
    """Validated arguments of ``softmax``.

    ``axis`` is non-negative; ``mask`` is None or a bool array broadcastable
    to ``x.shape`` (not broadcast).
    """

    x: np.ndarray
    axis: int
    mask: Optional[np.ndarray]
    dtype: np.dtype
    compute: np.dtype


@dataclass(eq=False)
class AggregateArgs:
    """Validated arguments of ``aggregate``: weights (..., Lq, Lk), v (..., Lk, Dv), each in ``dtype``
    (the result dtype) or its own 16-bit dtype."""

    weights: np.ndarray
    v: np.ndarray
    dtype: np.dtype
    compute: np.dtype
    batch_shape: Shape
    lq: int
    lk: int
    dv: int


@dataclass(eq=False)
class AttentionArgs:
    """Validated arguments of ``attention``.

    Shapes (none of the arrays is broadcast or copied beyond dtype promotion):

    * ``q``: (..., Lq, D), ``k``: (..., Lk, Dk), ``v``: (..., Lk, Dv), each
      in ``dtype`` (the result dtype) or its own 16-bit dtype; method
      weights and ``bias`` in ``compute`` (float32 or float64);
    * ``batch_shape``: the output's batch shape, so out is
      ``batch_shape + (lq, dv)``;
    * ``kv_batch_shape``: the batch shape k and v broadcast to (same as
      ``batch_shape`` except on the head axis -3, which holds the kv heads);
    * ``group``: query head h (axis -3 of ``batch_shape``) reads kv head
      ``h // group``.  ``group == 1`` unless GQA/MQA applies.  When q has a
      single head and k/v have H (plain broadcasting), ``group == 1`` and the
      output has H heads.
    * ``mask``/``bias``: broadcastable to ``batch_shape + (lq, lk)``;
      ``kv_lengths``: int64, broadcastable to ``batch_shape``.
    * ``window_left``/``window_right``: -1 means unbounded.  Key j is visible
      to query i when ``diag - left <= j <= diag + right`` with
      ``diag = i + diagonal_offset`` (the offset aligns causal AND window).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    dtype: np.dtype
    compute: np.dtype
    method: Method
    scale: float
    w: Optional[np.ndarray]
    w_q: Optional[np.ndarray]
    w_k: Optional[np.ndarray]
    v_a: Optional[np.ndarray]
    score_bias: Optional[np.ndarray]
    hidden: int
    lq: int
    lk: int
    d: int
    dk: int
    dv: int
    batch_shape: Shape
    kv_batch_shape: Shape
    group: int
    mask: Optional[np.ndarray]
    bias: Optional[np.ndarray]
    kv_lengths: Optional[np.ndarray]
    causal: bool
    diagonal_offset: int
    window_left: int
    window_right: int
    return_lse: bool
    return_weights: bool
    out: Optional[np.ndarray]
    # Issue 18's serving additions (None when the call does not use them).
    # diagonal_offsets: int64 broadcastable to batch_shape, replacing diagonal_offset per item (causal
    # bottom_right with kv_lengths aligns each item's diagonal to its kv_lengths).
    diagonal_offsets: Optional[np.ndarray] = None
    softcap: Optional[float] = None
    alibi_slopes: Optional[np.ndarray] = None  # compute dtype, broadcastable to batch_shape
    sinks: Optional[np.ndarray] = None  # compute dtype, broadcastable to batch_shape
    # Paged: k and v are the caches (num_blocks, Hk, block_size, D / Dv), block_table int32 (B, blocks),
    # C-contiguous, whose entries past each item's kv_lengths are not validated (and may be anything).
    block_table: Optional[np.ndarray] = None
    block_size: int = 0
    # int8 k and v: float32 per-row scales, broadcastable to k.shape[:-1] / v.shape[:-1].
    k_scale: Optional[np.ndarray] = None
    v_scale: Optional[np.ndarray] = None


@dataclass(eq=False)
class MergeArgs:
    """Validated arguments of ``merge_states``.

    ``outs``: list of arrays of one shape (..., Lq, Dv); ``lses``: list of the
    same length of arrays of shape (..., Lq); each in ``dtype`` (the merged
    out's dtype) or its own 16-bit dtype.  The merged lse has ``lse_dtype``;
    both are computed in ``compute``.
    """

    outs: List[np.ndarray]
    lses: List[np.ndarray]
    dtype: np.dtype
    lse_dtype: np.dtype
    compute: np.dtype
    shape: Shape


@dataclass(eq=False)
class AttentionBackwardArgs:
    """Validated arguments of ``attention_backward``.

    ``forward``: the forward call's arguments, exactly as ``attention`` validates them (no lse, no
    weights, no out=). ``dout`` and ``out``: batch_shape + (Lq, Dv), ``lse``: batch_shape + (Lq,), each
    a native array of a storage dtype, as given. ``grad_dtypes``: the dtype of each gradient, by input
    name (q, k, v, bias, w, w_q, w_k, score_bias, v_a, sinks; only the inputs the call has).
    """

    forward: AttentionArgs
    dout: np.ndarray
    out: np.ndarray
    lse: np.ndarray
    grad_dtypes: Dict[str, np.dtype]


# --------------------------------------------------------------------------
# Dtypes: the storage/compute contract
# --------------------------------------------------------------------------


def result_dtype(*dtypes: Any) -> np.dtype:
    """The result dtype of inputs of these storage dtypes: NumPy's promotion (``np.result_type``, with
    ml_dtypes' rules for bfloat16), except float16 + bfloat16, which ml_dtypes refuses (neither holds the
    other) and attnfast defines as float32, the narrowest dtype that holds both exactly."""
    # One dtype (the usual call) needs no promotion, and checking that first is 10x cheaper than NumPy's.
    first = dtypes[0]
    for d in dtypes[1:]:
        if d != first:
            break
    else:
        same: np.dtype = np.dtype(first)
        return same
    if _FLOAT16 in dtypes and _BFLOAT16 in dtypes:
        dtypes = tuple(_FLOAT32 if d == _FLOAT16 or d == _BFLOAT16 else d for d in dtypes)
    return np.dtype(np.result_type(*dtypes))


def compute_dtype(result: np.dtype) -> np.dtype:
    """The dtype the kernels compute a result of dtype ``result`` in: float64 for float64, else float32
    (16-bit values are converted exactly on load and rounded once, on the final store)."""
    return _FLOAT64 if result == _FLOAT64 else _FLOAT32


def lse_dtype(result: np.dtype) -> np.dtype:
    """The dtype of ``lse`` next to a result of dtype ``result``: float32 for a 16-bit result (a 16-bit
    lse would lose the precision merge_states needs: exp(lse_i - lse) amplifies its error), else the
    result's."""
    return _FLOAT32 if result in _SIXTEEN_BIT else np.dtype(result)


def round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` rounded to nearest-even into ``dtype``, once.

    ``astype`` does that for every pair but float64 -> bfloat16, which ml_dtypes performs through float32
    (1 + 2^-8 + 2^-30 becomes 1, not 1 + 2^-7: two roundings). For that pair the float32 step rounds to
    odd instead (truncate, then set the last bit when inexact): with 16 more bits than bfloat16 it keeps
    every tie and sticky bit the final rounding needs, which then is exact RNE.
    """
    dtype = np.dtype(dtype)
    if dtype != _BFLOAT16 or x.dtype != _FLOAT64:
        return x.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(_FLOAT32)
        too_far = np.abs(y.astype(_FLOAT64)) > np.abs(x)  # rounded away from zero: step back
        y = np.where(too_far, np.nextafter(y, np.float32(0)), y)
        inexact = y.astype(_FLOAT64) != x
    bits = y.view(np.uint32) | inexact.astype(np.uint32)
    rounded: np.ndarray = bits.view(_FLOAT32).astype(_BFLOAT16)
    return rounded


def dtype_expr(dtype: np.dtype) -> str:
    """How to spell ``dtype`` in Python: ``np.float32``, ``ml_dtypes.bfloat16``."""
    dtype = np.dtype(dtype)
    return "ml_dtypes.bfloat16" if dtype == _BFLOAT16 else f"np.{dtype.name}"


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _fmt(shape: Sequence[int]) -> str:
    """Format a shape exactly like NumPy prints it, e.g. ``(5,)``."""
    return str(tuple(int(s) for s in shape))


def _reject_torch_bfloat16(name: str, x: Any) -> None:
    """TypeError for a torch.Tensor of dtype bfloat16, which NumPy cannot wrap (np.asarray raises, or
    with other versions makes an object array); recognised by duck typing so that torch is never
    imported."""
    if type(x).__module__.startswith("torch") and str(getattr(x, "dtype", "")) == "torch.bfloat16":
        raise TypeError(
            f"{name} is a torch.Tensor of dtype torch.bfloat16, which NumPy cannot wrap. Pass "
            f"{name}.view(torch.int16).numpy().view(ml_dtypes.bfloat16) (the same memory, no copy; call "
            f".detach().cpu() first for a tensor on a GPU or one that requires grad)."
        )


def _asarray(name: str, x: Any) -> np.ndarray:
    """``np.asarray`` that names the argument when the input is ragged."""
    if x is None:
        raise TypeError(f"{name} is required; got None. Pass a NumPy array.")
    if type(x) is not np.ndarray:
        _reject_torch_bfloat16(name, x)
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{name} could not be converted to a NumPy array ({exc}). "
            f"Pass a rectangular array (all rows the same length)."
        ) from None


def _conversion_hint(name: str, x: Any, dtype: str) -> str:
    """How to convert argument ``name`` to ``dtype``: ``.astype`` for arrays, ``np.asarray`` otherwise."""
    if isinstance(x, np.ndarray):
        return f"{name}.astype({dtype})"
    return f"np.asarray({name}, dtype={dtype})"


def _indexable(name: str, x: Any) -> str:
    """``name`` as an expression a hint can index (``q[None, :]``): a list needs np.asarray first."""
    return name if isinstance(x, np.ndarray) else f"np.asarray({name})"


def _native(a: np.ndarray) -> np.ndarray:
    """``a`` in native byte order ('>f4' -> float32), copying only when it is not."""
    return a if a.dtype.isnative else a.astype(a.dtype.type)


def _float_array(name: str, x: Any) -> np.ndarray:
    """Return ``x`` as a native array of a storage dtype (float64/32/16, bfloat16), or raise ``TypeError``."""
    a = _asarray(name, x)
    # bfloat16 has kind 'V' (it is not a NumPy float), so membership is by dtype equality, never by kind.
    if a.dtype in _STORAGE_BY_FREQUENCY:
        return a
    if a.dtype.kind == "f" and not a.dtype.isnative:
        a = _native(a)
    if a.dtype not in _STORAGE_BY_FREQUENCY:
        raise TypeError(
            f"attnfast computes in float32 or float64; {name} has dtype {a.dtype}. "
            f"Convert it with {_conversion_hint(name, x, 'np.float32')} (or np.float64). It also takes "
            f"float16 and ml_dtypes.bfloat16 arrays as they are (computed in float32): the accepted dtypes "
            f"are {_ACCEPTED}."
        )
    return a


def _to_result(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A float32/float64 input converted to the result dtype (as before 16-bit storage existed); a
    16-bit one kept as given: its consumer converts it exactly where it computes, so a 16-bit KV cache
    is neither copied nor widened here."""
    return a if a.dtype == dtype or a.dtype in _SIXTEEN_BIT else _cast(a, dtype)


def _cast(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert to ``dtype`` without copying when it already matches."""
    return a.astype(dtype, copy=False)


def _real_array(name: str, x: Any, dtype: np.dtype) -> np.ndarray:
    """Coerce a weight/bias to ``dtype``; accepts any real int or float dtype.

    Weights do not decide the computation dtype (q/k/v do); integer, float16
    or bfloat16 weights convert to it exactly, so they are accepted.  bool,
    complex, object and strings are almost certainly mistakes and raise
    ``TypeError``.
    """
    a = _asarray(name, x)
    if a.dtype.kind not in "iuf" and a.dtype != _BFLOAT16:
        raise TypeError(
            f"{name} must be a real floating-point array; got dtype {a.dtype}. "
            f"Convert it with {_conversion_hint(name, x, dtype_expr(dtype))}."
        )
    return _cast(a, dtype)


def _at_least_2d(name: str, a: np.ndarray, layout: str, hint: str, given: Any) -> None:
    """Raise unless ``a`` is at least 2-D; ``hint``'s ``{x}`` becomes an indexable spelling of ``given``."""
    if a.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions {layout}; got shape {_fmt(a.shape)}. "
            f"{hint.format(x=_indexable(name, given))}"
        )


def _check_bool_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r} of type {type(value).__name__}.")
    return bool(value)


def _broadcast_to_target(name: str, shape: Shape, target: Shape, what: str, hint: Any = "") -> None:
    """Raise unless an array of ``shape`` broadcasts to exactly ``target``.

    ``hint`` is a string, or a function returning one (built only when the check fails).
    """
    # By hand, not np.broadcast_shapes, which takes at most 32 axes and also fails when ``target`` holds
    # more elements than an array can, which is not this argument's fault (the result-size checks say so).
    ok = len(shape) <= len(target) and all(s == t or s == 1 for s, t in zip(reversed(shape), reversed(target)))
    if not ok:
        hint = hint() if callable(hint) else hint
        raise ValueError(
            f"{name} has shape {_fmt(shape)}, which does not broadcast to {what} "
            f"{_fmt(target)}.{(' ' + hint) if hint else ''}"
        )


def _broadcast_shape(shapes: Sequence[Shape]) -> Optional[Shape]:
    """NumPy's broadcast of ``shapes``, or None when they do not broadcast; unlike np.broadcast_shapes,
    for any number of axes and whatever the size of the result."""
    ndim = max(len(s) for s in shapes)
    joint = []
    for axis in range(-ndim, 0):
        sizes = {s[axis] for s in shapes if len(s) >= -axis} - {1}
        if len(sizes) > 1:
            return None
        joint.append(sizes.pop() if sizes else 1)
    return tuple(joint)


_MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)


def _check_result_size(what: str, shape: Shape, dtype: np.dtype, inputs: Any) -> None:
    """Raise ``ValueError`` when an array of ``shape`` and ``dtype`` (a result, or a broadcast operand) is
    larger than NumPy can make: (product of the nonzero extents) x itemsize above the largest intp, as
    NumPy counts, so an empty shape whose other extents are that large is refused as well.

    ``inputs`` is a function returning the message's description of the inputs (built only on failure).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if 0 < nbytes <= _MAX_ARRAY_BYTES:
        return
    nominal = math.prod(max(int(n), 1) for n in shape) * dtype.itemsize
    if nominal > _MAX_ARRAY_BYTES:
        raise ValueError(
            f"{what} would have shape {_fmt(shape)} ({nominal} bytes of {dtype.name}), more than one NumPy "
            f"array can hold (at most {_MAX_ARRAY_BYTES} bytes); {inputs()}. Loop over a part of the batch "
            f"or of the queries."
        )


def broadcast_batch(*shapes: Sequence[int], names: Optional[Sequence[str]] = None) -> Shape:
    """Broadcast batch shapes with NumPy rules, raising a descriptive ``ValueError``.

    Parameters
    ----------
    *shapes : tuple of int
        Batch shapes (every axis but the last two of each array).
    names : sequence of str, optional
        Argument names used in the error message, one per shape.

    Returns
    -------
    tuple of int
        The broadcast shape.

    Raises
    ------
    ValueError
        If the shapes do not broadcast.
    """
    # Equal shapes (the usual case: slices of ndarray shapes) need no broadcasting. Checking that first
    # skips the normalisation and NumPy's general machinery, ~8 us of a ~100 us decoder-step call.
    first = shapes[0] if shapes else ()
    if type(first) is tuple and all(s == first for s in shapes[1:]):
        return first
    normalised = tuple(tuple(int(n) for n in s) for s in shapes)
    # By hand, not np.broadcast_shapes, which takes at most 32 axes (an array may have 64) and refuses a
    # broadcast larger than one array can hold (the callers check the arrays they make).
    joint = _broadcast_shape(normalised)
    if joint is not None:
        return joint
    if names is None:
        names = [f"argument {i}" for i in range(len(normalised))]
    listing = ", ".join(f"{n} {_fmt(s)}" for n, s in zip(names, normalised))
    raise ValueError(
        f"the batch shapes (all axes before the last two) do not broadcast: {listing}. "
        f"Batch axes follow NumPy broadcasting, aligned from the right: each axis must be "
        f"equal or 1. Insert size-1 axes (e.g. x[:, None]) to line them up."
    )


# --------------------------------------------------------------------------
# Score method and weights (shared by scores and attention)
# --------------------------------------------------------------------------


def _check_method(method: Any) -> Method:
    if not isinstance(method, str) or method not in METHODS:
        valid = ", ".join(repr(m) for m in METHODS)
        raise ValueError(f"unknown method {method!r}; valid methods are {valid}.")
    return cast(Method, str(method))


def _check_scale(scale: Any, method: str, d: int, dtype: np.dtype) -> float:
    if scale is None:
        # 1/sqrt(D) keeps the variance of q.k near 1 for unit-variance inputs;
        # with D == 0 every score is 0 anyway, so any finite scale will do.
        return 1.0 / math.sqrt(d) if (method == "scaled_dot" and d > 0) else 1.0
    if isinstance(scale, (bool, np.bool_)) or not isinstance(
            scale, (int, float, np.integer, np.floating, ml_dtypes.bfloat16)):
        if isinstance(scale, np.ndarray) and scale.ndim == 0 and (scale.dtype.kind in "iuf" or scale.dtype == _BFLOAT16):
            scale = scale.item()
        else:
            raise TypeError(f"scale must be a real number (a Python float); got {scale!r}.")
    try:
        value = float(scale)
    except OverflowError:  # an int beyond the float range
        value = math.inf if scale > 0 else -math.inf
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite; got {value!r}. Pass a finite float or None for the default.")
    if dtype == _FLOAT32 and abs(value) >= FLOAT32_OVERFLOW:
        raise ValueError(
            f"scale={value!r} overflows {dtype.name} (the computation dtype, whose largest value is "
            f"{float(np.finfo(dtype).max):.8g}); pass a smaller scale, or float64 inputs."
        )
    return value


def _weight(name: str, x: Any, expected: Shape, dtype: np.dtype, method: str, labels: str) -> np.ndarray:
    """Coerce one method weight and check its exact shape."""
    if x is None:
        raise ValueError(f"method={method!r} requires {name} of shape {labels} = {_fmt(expected)}; got None.")
    a = _real_array(name, x, dtype)
    if a.shape != tuple(expected):
        raise ValueError(
            f"{name} for method={method!r} must have shape {labels} = {_fmt(expected)}; "
            f"got shape {_fmt(a.shape)}."
        )
    return a


def _check_method_weights(
    method: str, dtype: np.dtype, d: int, dk: int, q_shape: Shape, k_shape: Shape, **given: Any
) -> Dict[str, Any]:
    """Validate the weights of ``method``; return the ScoresArgs weight fields."""
    used = _METHOD_WEIGHTS[method]
    for name, value in given.items():
        if value is not None and name not in used:
            raise ValueError(
                f"{name} is only used by {_WEIGHT_USERS[name]}; got method={method!r}. "
                f"Remove {name} or choose the method that uses it."
            )
    fields: Dict[str, Any] = dict(w=None, w_q=None, w_k=None, v_a=None, score_bias=None, hidden=0)

    if method in ("dot", "scaled_dot") and d != dk:
        raise ValueError(
            f"method={method!r} needs q and k with the same feature size D; got q shape "
            f"{_fmt(q_shape)} (D={d}) and k shape {_fmt(k_shape)} (D={dk}). Use method='general' "
            f"with a (D, Dk) weight w for different sizes."
        )
    if method == "general":
        fields["w"] = _weight("w", given["w"], (d, dk), dtype, method, "(D, Dk)")
    elif method == "concat":
        fields["w_q"] = _weight("w_q", given["w_q"], (d,), dtype, method, "(D,)")
        fields["w_k"] = _weight("w_k", given["w_k"], (dk,), dtype, method, "(Dk,)")
        b = given["score_bias"]
        if b is None:
            fields["score_bias"] = np.zeros((), dtype=dtype)
        else:
            b = _real_array("score_bias", b, dtype)
            if b.shape != ():
                # The hint names the argument and, for a one-element array, the very float to pass.
                given_value = np.asarray(given["score_bias"]).reshape(-1)[:1]  # before the cast to dtype
                fix = (f"Pass a float: score_bias={float(given_value[0])!r}." if b.size == 1 else
                       "Pass a float: concat adds one bias to every score (method='additive' takes an (A,) one).")
                raise ValueError(
                    f"score_bias for method='concat' must be a scalar (shape ()); got shape {_fmt(b.shape)}. {fix}"
                )
            fields["score_bias"] = b
    elif method == "additive":
        # w_q / w_k may be None: q / k then already hold the projections W_q q_i / W_k k_j (A features),
        # which is how decoding loops use Bahdanau attention (the keys are projected once per sentence).
        wq, wk = given["w_q"], given["w_k"]
        if wq is not None:
            wq = _real_array("w_q", wq, dtype)
            if wq.ndim != 2 or wq.shape[1] != d:
                raise ValueError(
                    f"w_q for method='additive' must have shape (A, D) = (A, {d}); got shape {_fmt(wq.shape)}."
                )
            a = wq.shape[0]
        elif wk is not None:
            wk_arr = _real_array("w_k", wk, dtype)
            a = wk_arr.shape[0] if wk_arr.ndim == 2 else d
        else:
            a = d
        if wq is None and d != a:
            raise ValueError(
                f"method='additive' with w_q=None takes q as already projected queries W_q q of shape "
                f"(..., Lq, A) = (..., Lq, {a}); got D={d}. Pass w_q of shape (A, D) = ({a}, {d}) to project them."
            )
        if wk is None:
            if dk != a:
                raise ValueError(
                    f"method='additive' with w_k=None takes k as already projected keys W_k k of shape "
                    f"(..., Lk, A) = (..., Lk, {a}); got Dk={dk}. Pass w_k of shape (A, Dk) = ({a}, {dk}) to "
                    f"project them."
                )
            fields["w_k"] = None
        else:
            fields["w_k"] = _weight("w_k", wk, (a, dk), dtype, method, "(A, Dk)")
        fields["w_q"] = wq
        b = given["score_bias"]
        fields["score_bias"] = (
            np.zeros((a,), dtype=dtype) if b is None else _weight("score_bias", b, (a,), dtype, method, "(A,)")
        )
        va = given["v_a"]
        fields["v_a"] = np.ones((a,), dtype=dtype) if va is None else _weight("v_a", va, (a,), dtype, method, "(A,)")
        fields["hidden"] = int(a)
    return fields


# --------------------------------------------------------------------------
# Public checks
# --------------------------------------------------------------------------


def check_scores(q: Any, k: Any, *, method: Any = "scaled_dot", scale: Any = None, w: Any = None, w_q: Any = None,
                 w_k: Any = None, v_a: Any = None, score_bias: Any = None) -> ScoresArgs:
    """Validate the arguments of ``scores``.

    Parameters
    ----------
    q : array_like, (..., Lq, D)
    k : array_like, (..., Lk, Dk)
    method, scale, w, w_q, w_k, v_a, score_bias
        As in :func:`attnfast.scores`.

    Returns
    -------
    ScoresArgs
    """
    q_in, k_in = q, k
    q = _float_array("q", q)
    k = _float_array("k", k)
    _at_least_2d("q", q, "(..., Lq, D)", "Use {x}[None, :] for a single query.", q_in)
    _at_least_2d("k", k, "(..., Lk, Dk)", "Use {x}[None, :] for a single key.", k_in)
    method = _check_method(method)
    dtype = result_dtype(q.dtype, k.dtype)
    compute = compute_dtype(dtype)
    q, k = _to_result(q, dtype), _to_result(k, dtype)
    batch = broadcast_batch(q.shape[:-2], k.shape[:-2], names=("q", "k"))
    _check_result_size("the scores", batch + (q.shape[-2], k.shape[-2]), dtype,
                       lambda: f"q has shape {_fmt(q.shape)} and k {_fmt(k.shape)}")
    d, dk = int(q.shape[-1]), int(k.shape[-1])
    fields = _check_method_weights(
        method, compute, d, dk, q.shape, k.shape, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias
    )
    return ScoresArgs(
        q=q,
        k=k,
        dtype=dtype,
        compute=compute,
        batch_shape=batch,
        lq=int(q.shape[-2]),
        lk=int(k.shape[-2]),
        d=d,
        dk=dk,
        method=method,
        scale=_check_scale(scale, method, d, compute),
        **fields,
    )


def _check_axis(axis: Any, ndim: int) -> int:
    if isinstance(axis, (bool, np.bool_)):
        raise TypeError(f"axis must be an integer; got {axis!r}.")
    try:
        ax = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer; got {axis!r} of type {type(axis).__name__}.") from None
    if not -ndim <= ax < ndim:
        raise ValueError(f"axis {ax} is out of range for x with {ndim} dimension(s); use -{ndim} <= axis < {ndim}.")
    return ax % ndim


def _check_mask(mask: Any) -> np.ndarray:
    m = _asarray("mask", mask)
    if m.dtype != np.bool_:
        compare = "m != 0" if isinstance(mask, np.ndarray) else "np.asarray(m) != 0"
        raise TypeError(
            f"mask must be a boolean array (True = attend); got dtype {m.dtype}. "
            f"Build it with a comparison, e.g. mask = ({compare}), or pass additive scores as bias=."
        )
    return m


def check_softmax(x: Any, axis: Any = -1, mask: Any = None) -> SoftmaxArgs:
    """Validate the arguments of ``softmax``.

    Parameters
    ----------
    x : array_like, float64, float32, float16 or bfloat16, ndim >= 1
    axis : int
    mask : array_like of bool, optional, broadcastable to ``x.shape``

    Returns
    -------
    SoftmaxArgs
    """
    x = _float_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x must have at least 1 dimension; got shape {_fmt(x.shape)}. Use np.atleast_1d(x).")
    ax = _check_axis(axis, x.ndim)
    if mask is not None:
        mask = _check_mask(mask)
        _broadcast_to_target("mask", mask.shape, x.shape, "the shape of x")
    return SoftmaxArgs(x=x, axis=ax, mask=mask, dtype=x.dtype, compute=compute_dtype(x.dtype))


def check_aggregate(weights: Any, v: Any) -> AggregateArgs:
    """Validate the arguments of ``aggregate``.

    Parameters
    ----------
    weights : array_like, (..., Lq, Lk)
    v : array_like, (..., Lk, Dv)

    Returns
    -------
    AggregateArgs
    """
    weights_in, v_in = weights, v
    weights = _float_array("weights", weights)
    v = _float_array("v", v)
    _at_least_2d("weights", weights, "(..., Lq, Lk)",
                 "Use {x}[None, :] for a single query.", weights_in)
    _at_least_2d("v", v, "(..., Lk, Dv)", "Use {x}[:, None] for scalar values.", v_in)
    if weights.shape[-1] != v.shape[-2]:
        raise ValueError(
            f"weights has Lk={weights.shape[-1]} keys (last axis, shape {_fmt(weights.shape)}) but v has "
            f"Lk={v.shape[-2]} rows (axis -2, shape {_fmt(v.shape)}); they must be equal."
        )
    dtype = result_dtype(weights.dtype, v.dtype)
    weights, v = _to_result(weights, dtype), _to_result(v, dtype)
    batch = broadcast_batch(weights.shape[:-2], v.shape[:-2], names=("weights", "v"))
    _check_result_size("the result", batch + (weights.shape[-2], v.shape[-1]), dtype,
                       lambda: f"weights has shape {_fmt(weights.shape)} and v {_fmt(v.shape)}")
    return AggregateArgs(
        weights=weights,
        v=v,
        dtype=dtype,
        compute=compute_dtype(dtype),
        batch_shape=batch,
        lq=int(weights.shape[-2]),
        lk=int(weights.shape[-1]),
        dv=int(v.shape[-1]),
    )


def _heads_fit(hq: int, hk: int) -> bool:
    """Whether Hq query heads can read Hk kv heads: equal, MQA, one query head broadcast, or GQA."""
    return hq == hk or hk == 1 or hq == 1 or (hk > 0 and hq % hk == 0)


def _swap_hint(q_shape: Shape, k_shape: Shape) -> str:
    """For q and k whose heads (axis -3) do not fit: how to pass them if they look like (B, L, H, D)
    arrays, i.e. if their axis -2 would fit as heads; "" otherwise."""
    if len(q_shape) < 3 or len(k_shape) < 3 or not _heads_fit(q_shape[-2], k_shape[-2]):
        return ""
    if len(q_shape) == len(k_shape) == 4:
        swap, layout, ours = "{}.transpose(0, 2, 1, 3)", "(B, L, H, D)", "(B, H, L, D)"
    elif len(q_shape) == len(k_shape) == 3:
        swap, layout, ours = "{}.transpose(1, 0, 2)", "(L, H, D)", "(H, L, D)"
    else:
        swap, layout, ours = "np.swapaxes({}, -3, -2)", "(..., L, H, D)", "(..., H, L, D)"
    views = ", ".join(swap.format(x) for x in ("q", "k", "v"))
    return (f" These shapes look like {layout} arrays (sequence axis before the heads, as flash-attn and "
            f"jax.nn.dot_product_attention lay them out); attnfast reads {ours}: pass {views} (views, no "
            f"copy), and {swap.format('out')} turns the result back.")


def _attention_batch(q_batch: Shape, kv_batch: Shape, q_shape: Shape = (), k_shape: Shape = ()
                     ) -> Tuple[Shape, Shape, int]:
    """Combine q's and k/v's batch shapes; return (batch, kv_batch, group).

    Axis -3 (the head axis, when both sides have one) follows the GQA rule;
    every other batch axis broadcasts as in NumPy. ``q_shape`` and ``k_shape`` (the whole arrays'
    shapes, when known) only shape the error's hint.
    """
    if len(q_batch) == 0 or len(kv_batch) == 0:
        batch = broadcast_batch(q_batch, kv_batch, names=("q", "k/v"))
        return batch, batch, 1
    hq, hk = q_batch[-1], kv_batch[-1]
    rest = broadcast_batch(q_batch[:-1], kv_batch[:-1], names=("q", "k/v"))
    if hq == hk:
        heads, group = hq, 1
    elif hk == 1:
        # MQA: every query head reads the single kv head.
        heads, group = hq, max(hq, 1)
    elif hq == 1:
        # Plain NumPy broadcasting of a single query head over the kv heads.
        heads, group = hk, 1
    elif hk > 0 and hq > 0 and hq % hk == 0:
        heads, group = hq, hq // hk
    else:
        raise ValueError(
            f"q has {hq} heads (axis -3) but k/v have {hk}; the kv heads must divide the query heads "
            f"(query head h uses kv head h // (Hq/Hk)). Got q batch shape {_fmt(q_batch)} and k/v batch "
            f"shape {_fmt(kv_batch)}.{_swap_hint(q_shape, k_shape)}"
        )
    return rest + (heads,), rest + (hk,), group


def _integers_beyond_int64(kv_lengths: Any, n: np.ndarray) -> Optional[np.ndarray]:
    """``kv_lengths`` as an object array when it holds only integers, but ones no NumPy integer dtype
    holds together (NumPy made [2**70] an object array and [-1, 2**64 - 1] a float64 one); else None."""
    if n.dtype.kind == "O":
        items = n
    elif n.dtype.kind == "f" and not isinstance(kv_lengths, np.ndarray):
        items = np.asarray(kv_lengths, dtype=object)
    else:
        return None
    def is_int(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    return items if items.size and all(is_int(x) for x in items.flat) else None


def _check_kv_lengths(kv_lengths: Any, batch: Shape, lk: int) -> np.ndarray:
    n = _asarray("kv_lengths", kv_lengths)
    if n.dtype.kind not in "iu":
        wide = _integers_beyond_int64(kv_lengths, n)
        if wide is not None:
            # Report the first one outside [0, Lk] like any other out-of-range length.
            bad = next((int(x) for x in wide.flat if not 0 <= x <= lk), None)
            if bad is not None:
                raise ValueError(f"kv_lengths must lie in [0, Lk] = [0, {lk}]; got {bad}.")
            n = wide.astype(np.int64)
    if n.dtype.kind not in "iu":
        raise TypeError(
            f"kv_lengths must be an integer array (the number of visible keys per batch entry); got dtype "
            f"{n.dtype}. Convert it with {_conversion_hint('kv_lengths', kv_lengths, 'np.int64')}."
        )
    def hint() -> str:
        if n.ndim >= 1 and len(batch) > n.ndim:
            return (
                "Batch axes align from the right; for one length per leading batch entry add trailing "
                f"size-1 axes, e.g. {_indexable('kv_lengths', kv_lengths)}[:, None]."
            )
        return ""

    _broadcast_to_target("kv_lengths", n.shape, batch, "the batch shape", hint)
    # Check the range before converting, so huge uint64 values cannot wrap.
    if n.size:
        lo, hi = n.min(), n.max()
        if lo < 0 or hi > lk:
            bad = lo if lo < 0 else hi
            raise ValueError(f"kv_lengths must lie in [0, Lk] = [0, {lk}]; got {int(bad)}.")
    return n.astype(np.int64, copy=False)


def diagonal_offset(causal_align: str, lq: int, lk: int) -> int:
    """Key index minus query index on the causal diagonal: 0 top-left aligned, Lk - Lq bottom-right."""
    return 0 if causal_align == "top_left" else lk - lq


_INT64_MAX = int(np.iinfo(np.int64).max)


def _check_window(window: Any, lq: int, lk: int) -> Tuple[int, int]:
    """(left, right) with -1 for an unbounded side, each clamped to Lq + Lk.

    No query's diagonal is more than Lq + Lk keys away from any key, so the clamp leaves every visible
    range unchanged, and ``diag +- side`` stays far inside int64 in the kernels and the reference.
    """
    if window is None:
        return -1, -1
    # A 0-d array is a scalar, not a pair, like window=4.
    if isinstance(window, (str, bytes)) or not isinstance(window, (tuple, list, np.ndarray)) or np.ndim(window) == 0:
        raise TypeError(
            f"window must be a pair (left, right) of non-negative ints or None; got {window!r}. "
            f"Use e.g. window=(128, 0), or window=None for no window."
        )
    if isinstance(window, np.ndarray) and window.shape != (2,):
        raise ValueError(
            f"window must be a pair (left, right); got an array of shape {_fmt(window.shape)}. "
            f"Use e.g. window=(128, 0), or window=None for no window."
        )
    if len(window) != 2:
        raise ValueError(f"window must be a pair (left, right); got {len(window)} values: {tuple(window)!r}.")
    sides = []
    reach = lq + lk
    for side, value in zip(("left", "right"), window):
        if value is None:
            sides.append(-1)
            continue
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"window {side} must be an int >= 0 or None; got {value!r}.")
        try:
            n = operator.index(value)
        except TypeError:
            raise TypeError(f"window {side} must be an int >= 0 or None; got {value!r}.") from None
        if n < 0:
            raise ValueError(f"window {side} must be >= 0 (or None for unbounded); got {n}.")
        if n > reach:
            if n > _INT64_MAX:
                raise ValueError(
                    f"window {side} must fit in a 64-bit signed integer (at most {_INT64_MAX}); got {n}. "
                    f"Pass None for an unbounded side."
                )
            n = reach
        sides.append(int(n))
    return sides[0], sides[1]


def _check_out(out: Any, shape: Shape, dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(
            f"out must be a NumPy ndarray of shape {_fmt(shape)} and dtype {dtype}; got {type(out).__name__}."
        )
    if out.shape != tuple(shape):
        raise ValueError(
            f"out has shape {_fmt(out.shape)} but the result has shape batch_shape + (Lq, Dv) = {_fmt(shape)}. "
            f"Allocate it with np.empty({_fmt(shape)}, dtype={dtype_expr(dtype)})."
        )
    # Any storage dtype will do (the result is rounded once into it), and any byte order (the result is
    # written through a native temporary when out's is not).
    if out.dtype not in STORAGE_DTYPES and (out.dtype.kind != "f" or out.dtype.newbyteorder("=") not in STORAGE_DTYPES):
        raise TypeError(
            f"out has dtype {out.dtype} but the result has dtype {dtype} (the promoted dtype of q, k, v), and "
            f"out= must have one of the dtypes {_ACCEPTED} (the result is rounded once into it). "
            f"Allocate out with dtype={dtype_expr(dtype)}."
        )
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array (e.g. np.empty_like(out)).")
    return out


def _check_attention_sizes(q: np.ndarray, k: np.ndarray, v: np.ndarray, batch: Shape, scores_shape: Shape,
                           dtype: np.dtype, compute: np.dtype, mask: bool, bias: bool, weights: bool) -> None:
    """Every array attention makes (the result; lse is never larger), or views with the score shape, fits
    in one NumPy array; bias and weights are made in the computation dtype."""
    inputs = lambda: f"q has shape {_fmt(q.shape)}, k {_fmt(k.shape)} and v {_fmt(v.shape)}"  # noqa: E731
    _check_result_size("the result", batch + (scores_shape[-2], v.shape[-1]), dtype, inputs)
    if mask:
        _check_result_size("mask broadcast to the score shape", scores_shape, np.dtype(np.bool_), inputs)
    if bias:
        _check_result_size("bias broadcast to the score shape", scores_shape, compute, inputs)
    if weights:
        _check_result_size("weights (return_weights=True)", scores_shape, compute, inputs)


def nothing_to_compute(a: AttentionArgs) -> bool:
    """True when attention() has no score to compute: no key, no query row, an empty batch, or Dv = 0
    with neither lse nor weights asked for."""
    return a.lk == 0 or a.lq == 0 or 0 in a.batch_shape or (a.dv == 0 and not (a.return_lse or a.return_weights))


def result_without_scores(a: AttentionArgs) -> AttentionOutput:
    """attention()'s result when :func:`nothing_to_compute`: out 0, lse -inf, weights 0 (written into
    ``out=`` when given). Shared by the fast path and the reference; it runs before any projection or
    broadcast, so the outputs are the only allocation and an empty result of a 10^8-item broadcast batch
    costs O(1)."""
    if a.out is not None:
        a.out[...] = 0
        result = a.out
    else:
        result = np.zeros(a.batch_shape + (a.lq, a.dv), a.dtype)
    lse = None
    if a.return_lse:
        shape = a.batch_shape + (a.lq,)
        if a.sinks is None:
            lse = np.full(shape, -np.inf, lse_dtype(a.dtype))
        else:  # a row without keys has lse = its sink
            lse = np.broadcast_to(a.sinks[..., None], shape).astype(lse_dtype(a.dtype))
    if not a.return_weights:
        return result if lse is None else (result, lse)
    weights = np.zeros(a.batch_shape + (a.lq, a.lk), a.dtype)
    return (result, weights) if lse is None else (result, lse, weights)


# --------------------------------------------------------------------------
# Serving additions: score modifiers, int8 and paged caches (issue 18)
# --------------------------------------------------------------------------

_INT8 = np.dtype(np.int8)
_PER_HEAD_TARGET = "the batch shape (..., Hq) (e.g. (Hq,) or (B, Hq))"


def check_softcap(softcap: Any, compute: np.dtype) -> Optional[float]:
    """``softcap`` as a float c > 0 (scores become c tanh(s / c)), or None when not given."""
    if softcap is None:
        return None
    what = (f"softcap must be a positive finite number (the cap c of s -> c * tanh(s / c)) or None; got "
            f"{softcap!r}")
    if isinstance(softcap, np.ndarray) and softcap.ndim == 0 and softcap.dtype.kind in "iuf":
        softcap = softcap.item()
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what}. Pass e.g. softcap=50.0.")
    try:
        value = float(softcap)
    except OverflowError:
        value = math.inf
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what}. Pass e.g. softcap=50.0, or softcap=None for no cap.")
    if compute == _FLOAT32 and value >= FLOAT32_OVERFLOW:
        raise ValueError(f"{what}, which overflows float32 (the computation dtype); pass a smaller cap.")
    if np.asarray(value, dtype=compute) == 0:
        # The kernels read a cap of 0 as "no cap": one that rounds to 0 would silently turn it off.
        raise ValueError(f"{what}, which rounds to 0 in {compute} (the computation dtype); pass a larger cap.")
    return value


def check_per_head(name: str, x: Any, target: Shape, compute: np.dtype, what: str = _PER_HEAD_TARGET) -> Optional[np.ndarray]:
    """``alibi_slopes`` or ``sinks``: a finite real array broadcastable to ``target`` (the batch
    shape), converted to the computation dtype (not broadcast); None when not given."""
    if x is None:
        return None
    a = _asarray(name, x)
    if a.dtype.kind not in "iuf" and a.dtype != _BFLOAT16:
        raise TypeError(
            f"{name} must be a real floating-point array (one value per query head); got dtype {a.dtype}. "
            f"Convert it with {_conversion_hint(name, x, dtype_expr(compute))}."
        )
    _broadcast_to_target(name, a.shape, target, what,
                         "Pass one value per query head, shape (Hq,), or per batch item and head.")
    with np.errstate(over="ignore", invalid="ignore"):
        converted = _cast(_native(a) if a.dtype.kind == "f" else a, compute)
    if not np.all(np.isfinite(converted)):
        bad = float(a.flat[int(np.flatnonzero(~np.isfinite(converted.ravel()))[0])])
        raise ValueError(
            f"{name} must be finite in {compute.name} (the computation dtype); got {bad!r}. "
            f"{'Leave a head without sinks out by passing -1e30 rather than -inf.' if name == 'sinks' else ''}"
            .rstrip()
        )
    return converted


def check_score_modifiers(softcap: Any, alibi_slopes: Any, sinks: Any, batch: Shape, compute: np.dtype
                          ) -> Tuple[Optional[float], Optional[np.ndarray], Optional[np.ndarray]]:
    """(softcap, alibi_slopes, sinks) validated for a call of batch shape ``batch`` (see
    :func:`check_softcap` and :func:`check_per_head`); shared with attention_varlen."""
    return (check_softcap(softcap, compute), check_per_head("alibi_slopes", alibi_slopes, batch, compute),
            check_per_head("sinks", sinks, batch, compute))


def _kv_array(name: str, x: Any) -> np.ndarray:
    """k or v: an int8 array (a quantised cache) as given, else a storage-dtype array."""
    # _asarray names the argument for a ragged list or a torch bfloat16 tensor; _float_array gets the
    # input as given, for its conversion hint.
    a = x if type(x) is np.ndarray else _asarray(name, x)
    return a if a.dtype == _INT8 else _float_array(name, x)


def _check_scale_array(name: str, scale: Any, cache: np.ndarray, cache_name: str, shape_name: str) -> np.ndarray:
    """One of k_scale / v_scale: float32, broadcastable to the cache's shape without its last axis."""
    target = cache.shape[:-1]
    a = _asarray(name, scale)
    if a.dtype != _FLOAT32:
        if a.dtype.kind == "f" and not a.dtype.isnative and a.dtype.newbyteorder("=") == _FLOAT32:
            a = _native(a)
        else:
            raise TypeError(
                f"{name} must be a float32 array (one scale per cached row, as attnfast.quantize_kv returns "
                f"it); got dtype {a.dtype}. Convert it with {_conversion_hint(name, scale, 'np.float32')}."
            )
    _broadcast_to_target(name, a.shape, target, f"{shape_name} {cache_name}.shape[:-1]",
                         f"Pass one scale per row of {cache_name} (its last axis is the features).")
    # The scales are cache data, like K and V themselves, and are not scanned: the slots of a
    # preallocated cache past kv_lengths (or in pages no block_table row uses) may hold anything, and a
    # scan would read the whole cache's scales on every decode step. A NaN scale of a visible key makes
    # its rows NaN, as a NaN in a float cache does; hidden keys' scales are never read.
    return a


def _check_int8_cache(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_scale: Any, v_scale: Any, method: str
                      ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """(k_scale, v_scale) for int8 k and v (float32, validated), (None, None) for floating ones."""
    k8, v8 = k.dtype == _INT8, v.dtype == _INT8
    if not (k8 or v8):
        for name, given, cache in (("k_scale", k_scale, k), ("v_scale", v_scale, v)):
            if given is not None:
                raise TypeError(
                    f"{name} is given but {name[0]} has dtype {cache.dtype}: the scales apply to an int8 "
                    f"cache only. Drop {name}, or pass the int8 cache (attnfast.quantize_kv) with it."
                )
        return None, None
    if k8 != v8:
        raise TypeError(
            f"k and v must both be int8 (a quantised cache) or both floating; got k of dtype {k.dtype} and "
            f"v of dtype {v.dtype}. Quantize both with attnfast.quantize_kv."
        )
    for name, scale, cache_name in (("k_scale", k_scale, "k"), ("v_scale", v_scale, "v")):
        if scale is None:
            raise TypeError(
                f"{cache_name} is int8 but {name} is None: an int8 cache needs its per-row scales "
                f"({cache_name} value = int8 * scale). Pass {name}=, e.g. from "
                f"{cache_name}_int8, {name} = attnfast.quantize_kv({cache_name})."
            )
    if q.dtype == _FLOAT64:
        raise TypeError(
            "q has dtype float64 but an int8 KV cache is computed in float32; pass q as float32 "
            "(q.astype(np.float32)), or a float64 cache for a float64 result."
        )
    if method not in _PAGED_METHODS:
        raise ValueError(
            f"an int8 KV cache takes method 'dot', 'scaled_dot' or 'general' (whose kernels read the keys as "
            f"stored); got method={method!r}. Dequantize the cache first: k.astype(np.float32) * k_scale[..., None]."
        )
    return (_check_scale_array("k_scale", k_scale, k, "k", "the shape of"),
            _check_scale_array("v_scale", v_scale, v, "v", "the shape of"))


_PAGED_METHODS = ("dot", "scaled_dot", "general")
_PAGED_LAYOUT = "k and v caches (num_blocks, Hk, block_size, D / Dv), q (B, Hq, Lq, D), block_table (B, max_blocks)"


def _check_paged_shapes(q: np.ndarray, k: np.ndarray, v: np.ndarray, block_table: Any, method: str) -> np.ndarray:
    """The shapes of a paged call (see _PAGED_LAYOUT); returns block_table as an integer array."""
    for name, a in (("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(
                f"with block_table, {name} must be a 4-D cache (num_blocks, Hk, block_size, "
                f"{'D' if name == 'k' else 'Dv'}); got shape {_fmt(a.shape)}."
            )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"with block_table, k and v must be caches of the same (num_blocks, Hk, block_size); got k shape "
            f"{_fmt(k.shape)} and v shape {_fmt(v.shape)}."
        )
    if q.ndim != 4:
        raise ValueError(f"with block_table, q must be 4-D (B, Hq, Lq, D); got shape {_fmt(q.shape)}.")
    table = _asarray("block_table", block_table)
    if table.dtype.kind not in "iu":
        raise TypeError(
            f"block_table must be an integer array (block indices into the cache), preferably int32; got "
            f"dtype {table.dtype}. Convert it with {_conversion_hint('block_table', block_table, 'np.int32')}."
        )
    if table.ndim != 2:
        raise ValueError(
            f"block_table must be 2-D (B, max_blocks): row b lists the cache blocks of batch item b; got "
            f"shape {_fmt(table.shape)}."
        )
    if table.shape[0] != q.shape[0]:
        raise ValueError(
            f"block_table has {table.shape[0]} rows but q has B = {q.shape[0]} batch items (axis 0); pass "
            f"one row of block indices per batch item."
        )
    if method not in _PAGED_METHODS:
        raise ValueError(
            f"a paged KV cache (block_table) takes method 'dot', 'scaled_dot' or 'general'; got "
            f"method={method!r}. Gather the cache first: k[block_table] (see the README)."
        )
    return table


def _paged_kv_lengths(kv_lengths: Any, b: int) -> Any:
    """kv_lengths of a paged call: a (B,) array is one length per batch item (all heads)."""
    if kv_lengths is None:
        return None
    n = np.asarray(kv_lengths) if not isinstance(kv_lengths, np.ndarray) else kv_lengths
    if n.ndim == 1 and n.shape[0] == b:
        return n[:, None]
    return kv_lengths


def _kernel_block_table(table: np.ndarray, kv_lengths: Optional[np.ndarray], batch: Shape, num_blocks: int,
                        block_size: int) -> np.ndarray:
    """Check that every block an item reads is in [0, num_blocks); return the table as C-contiguous
    int32 (as given when it already is; a converted copy has 0 in the entries no item reads, which
    may hold anything, even values int32 cannot)."""
    b, max_blocks = table.shape
    if kv_lengths is None or 0 in batch:
        keys = np.full(b, max_blocks * block_size, np.int64)
    else:
        keys = np.max(np.broadcast_to(kv_lengths, batch), axis=1)  # the longest head of each item
    needed = np.arange(max_blocks)[None, :] < -(-keys // block_size)[:, None]
    bad = needed & ((table < 0) | (table >= num_blocks))
    if np.any(bad):
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table[{i}, {j}] = {int(table[i, j])} is not a block of the cache (num_blocks = "
            f"{num_blocks}), but batch item {i} reads it (its first {int(keys[i])} keys, block_size "
            f"{block_size}). Entries must lie in [0, num_blocks) for every block an item's kv_lengths reaches."
        )
    if table.dtype == np.int32 and table.flags.c_contiguous and table.flags.aligned:
        return table
    return np.where(needed, table, 0).astype(np.int32)


def _check_paged_heads(q: np.ndarray, k: np.ndarray) -> Tuple[Shape, Shape, int]:
    """(batch, kv_batch, group) of a paged call: q (B, Hq), the kv items (B, Hk)."""
    b, hq, hk = int(q.shape[0]), int(q.shape[1]), int(k.shape[1])
    if not (hq == hk or (hk > 0 and hq % hk == 0)):
        raise ValueError(
            f"q has {hq} heads (axis 1) but the k/v cache has Hk = {hk} (axis 1); the kv heads must divide "
            f"the query heads (query head h uses kv head h // (Hq/Hk))."
        )
    return (b, hq), (b, hk), (hq // hk if hk else 1)


def per_item_diagonal_offsets(causal_align: str, kv_lengths: Optional[np.ndarray], lq: int) -> Optional[np.ndarray]:
    """With kv_lengths, bottom_right aligns each item's diagonal to its own kv_lengths (the last query
    sees key kv_lengths[b] - 1, as flash_attn_with_kvcache aligns to cache_seqlens): offsets
    kv_lengths - Lq, broadcastable to the batch shape. None otherwise (the call's one offset)."""
    if causal_align != "bottom_right" or kv_lengths is None:
        return None
    return kv_lengths.astype(np.int64, copy=False) - lq


def check_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    method: Any = "scaled_dot",
    scale: Any = None,
    mask: Any = None,
    bias: Any = None,
    causal: Any = False,
    causal_align: Any = "top_left",
    window: Any = None,
    kv_lengths: Any = None,
    return_lse: Any = False,
    return_weights: Any = False,
    out: Any = None,
    w: Any = None,
    w_q: Any = None,
    w_k: Any = None,
    v_a: Any = None,
    score_bias: Any = None,
    softcap: Any = None,
    alibi_slopes: Any = None,
    sinks: Any = None,
    block_table: Any = None,
    k_scale: Any = None,
    v_scale: Any = None,
) -> AttentionArgs:
    """Validate the arguments of ``attention``.

    Parameters
    ----------
    q : array_like, (..., Lq, D)
    k : array_like, (..., Lk, Dk)
    v : array_like, (..., Lk, Dv)
    others
        As in :func:`attnfast.attention`.

    Returns
    -------
    AttentionArgs
    """
    q_in, k_in, v_in = q, k, v
    q = _float_array("q", q)
    k = _kv_array("k", k)
    v = _kv_array("v", v)
    _at_least_2d("q", q, "(..., Lq, D)", "Use {x}[None, :] for a single query.", q_in)
    _at_least_2d("k", k, "(..., Lk, Dk)", "Use {x}[None, :] for a single key.", k_in)
    _at_least_2d("v", v, "(..., Lk, Dv)", "Use {x}[None, :] for a single key.", v_in)
    method = _check_method(method)
    k_scale, v_scale = _check_int8_cache(q, k, v, k_scale, v_scale, method)
    table = None if block_table is None else _check_paged_shapes(q, k, v, block_table, method)
    if table is None and k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same number of keys Lk (axis -2); got k shape {_fmt(k.shape)} "
            f"and v shape {_fmt(v.shape)}."
        )
    if k_scale is not None:
        dtype = _FLOAT32  # int8 caches are dequantised to float32 (q float32 or 16-bit)
        q = _to_result(q, dtype)
    else:
        dtype = result_dtype(q.dtype, k.dtype, v.dtype)
        q, k, v = _to_result(q, dtype), _to_result(k, dtype), _to_result(v, dtype)
    compute = compute_dtype(dtype)
    lq = int(q.shape[-2])
    d, dk, dv = int(q.shape[-1]), int(k.shape[-1]), int(v.shape[-1])

    if table is None:
        lk = int(k.shape[-2])
        kv_batch = broadcast_batch(k.shape[:-2], v.shape[:-2], names=("k", "v"))
        batch, kv_batch, group = _attention_batch(q.shape[:-2], kv_batch, q.shape, k.shape)
    else:
        # Key j of item b is row j % block_size of cache block table[b, j // block_size].
        lk = int(table.shape[1] * k.shape[2])
        batch, kv_batch, group = _check_paged_heads(q, k)
        kv_lengths = _paged_kv_lengths(kv_lengths, int(q.shape[0]))
    fields = _check_method_weights(
        method, compute, d, dk, q.shape, k.shape, w=w, w_q=w_q, w_k=w_k, v_a=v_a, score_bias=score_bias
    )
    scores_shape = batch + (lq, lk)

    if mask is not None:
        mask = _check_mask(mask)
        _broadcast_to_target("mask", mask.shape, scores_shape, "the score shape batch_shape + (Lq, Lk)")
    if bias is not None:
        bias = _real_array("bias", bias, compute)
        _broadcast_to_target("bias", bias.shape, scores_shape, "the score shape batch_shape + (Lq, Lk)")
    if kv_lengths is not None:
        kv_lengths = _check_kv_lengths(kv_lengths, batch, lk)

    if table is not None:
        table = _kernel_block_table(table, kv_lengths, batch, int(k.shape[0]), int(k.shape[2]))
    softcap, alibi_slopes, sinks = check_score_modifiers(softcap, alibi_slopes, sinks, batch, compute)

    causal = _check_bool_flag("causal", causal)
    if not isinstance(causal_align, str) or causal_align not in CAUSAL_ALIGNS:
        raise ValueError(f"unknown causal_align {causal_align!r}; valid values are 'top_left', 'bottom_right'.")
    offset = diagonal_offset(causal_align, lq, lk)
    left, right = _check_window(window, lq, lk)
    return_lse = _check_bool_flag("return_lse", return_lse)
    return_weights = _check_bool_flag("return_weights", return_weights)
    _check_attention_sizes(q, k, v, batch, scores_shape, dtype, compute, mask is not None, bias is not None,
                           return_weights)
    if out is not None:
        out = _check_out(out, batch + (lq, dv), dtype)

    return AttentionArgs(
        q=q,
        k=k,
        v=v,
        dtype=dtype,
        compute=compute,
        method=method,
        scale=_check_scale(scale, method, d, compute),
        lq=lq,
        lk=lk,
        d=d,
        dk=dk,
        dv=dv,
        batch_shape=batch,
        kv_batch_shape=kv_batch,
        group=group,
        mask=mask,
        bias=bias,
        kv_lengths=kv_lengths,
        causal=causal,
        diagonal_offset=offset,
        window_left=left,
        window_right=right,
        return_lse=return_lse,
        return_weights=return_weights,
        out=out,
        # Only causal, the window and ALiBi read the diagonal: without them the per-item offsets are not made.
        diagonal_offsets=(per_item_diagonal_offsets(causal_align, kv_lengths, lq)
                          if causal or left >= 0 or right >= 0 or alibi_slopes is not None else None),
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        block_table=table,
        block_size=0 if table is None else int(k.shape[2]),
        k_scale=k_scale,
        v_scale=v_scale,
        **fields,
    )


def check_merge_states(outs: Any, lses: Any) -> MergeArgs:
    """Validate the arguments of ``merge_states``.

    Parameters
    ----------
    outs : sequence of array_like, each (..., Lq, Dv)
    lses : sequence of array_like, each (..., Lq)

    Returns
    -------
    MergeArgs
    """
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        raise TypeError(
            "outs and lses must be lists (one entry per part); got an ndarray. "
            "For stacked parts pass list(outs) and list(lses)."
        )
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(
            f"outs and lses must be lists of arrays; got {type(outs).__name__} and {type(lses).__name__}."
        )
    if len(outs) == 0:
        raise ValueError("merge_states needs at least one part; got empty outs.")
    if len(outs) != len(lses):
        raise ValueError(f"outs and lses must have the same length; got {len(outs)} outs and {len(lses)} lses.")
    outs = [_float_array(f"outs[{i}]", o) for i, o in enumerate(outs)]
    lses = [_float_array(f"lses[{i}]", s) for i, s in enumerate(lses)]
    shape = outs[0].shape
    if len(shape) < 2:
        raise ValueError(f"outs[0] must have at least 2 dimensions (..., Lq, Dv); got shape {_fmt(shape)}.")
    for i, o in enumerate(outs):
        if o.shape != shape:
            raise ValueError(
                f"outs[{i}] has shape {_fmt(o.shape)} but outs[0] has shape {_fmt(shape)}; all parts must "
                f"have the same shape."
            )
    for i, s in enumerate(lses):
        if s.shape != shape[:-1]:
            raise ValueError(
                f"lses[{i}] has shape {_fmt(s.shape)} but must have shape outs.shape[:-1] = {_fmt(shape[:-1])}."
            )
    dtype = _merged_dtype([o.dtype for o in outs], [s.dtype for s in lses])
    return MergeArgs(
        outs=[_to_result(o, dtype) for o in outs],
        # A 16-bit result keeps the lses as given (float32 ones are never rounded to 16 bits).
        lses=[s if dtype in _SIXTEEN_BIT else _to_result(s, dtype) for s in lses],
        dtype=dtype,
        lse_dtype=lse_dtype(dtype),
        compute=compute_dtype(dtype),
        shape=tuple(shape),
    )


def _merged_dtype(outs: Sequence[np.dtype], lses: Sequence[np.dtype]) -> np.dtype:
    """The merged out's dtype: the promotion of the parts' outs and lses, except that lses no wider than
    float32 leave 16-bit outs 16-bit, since attention() returns float32 lses beside 16-bit outs and the
    merge of its parts should have the parts' dtype."""
    of_outs = result_dtype(*outs)
    if of_outs in _SIXTEEN_BIT and result_dtype(*lses) != _FLOAT64:
        return of_outs
    return result_dtype(*outs, *lses)


# --------------------------------------------------------------------------
# attention_backward
# --------------------------------------------------------------------------

_FORWARD_CALL = "attention(q, k, v, return_lse=True, ...) called with the same arguments"


def _check_forward_result(name: str, x: Any, shape: Shape, fix: str) -> np.ndarray:
    """One of dout / out / lse: a storage-dtype array of exactly ``shape``."""
    a = _float_array(name, x)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {_fmt(a.shape)} but must have shape {fix}")
    return a


def _gradient_dtype(given: Any, fallback: np.dtype) -> np.dtype:
    """The dtype a parameter's gradient is returned in: the parameter's own when it is an array of a
    storage dtype (any byte order), else (a Python number or list, an integer array) ``fallback``, the
    computation dtype."""
    if isinstance(given, (np.ndarray, np.generic)):
        dtype = given.dtype
        if dtype.kind == "f" and not dtype.isnative:
            dtype = dtype.newbyteorder("=")
        if dtype in STORAGE_DTYPES:
            return np.dtype(dtype)
    return fallback


# --------------------------------------------------------------------------
# Keyword arguments from other libraries
# --------------------------------------------------------------------------

# Names PyTorch (scaled_dot_product_attention, softmax, nn.MultiheadAttention), flash-attn and JAX give
# arguments attnfast has under another name or does not need: (whose name, attnfast's name or None, how
# to pass it; "{value!r}" is the value given).
# Shared names (scale, causal, mask, bias, softcap, alibi_slopes, block_table, cu_seqlens_q/k) need none.
_TORCH, _FLASH, _JAX, _XFORMERS = "PyTorch's", "flash-attn's", "JAX's", "xformers'"
_FOREIGN_KEYWORDS = {
    "is_causal": (_TORCH, "causal", "pass causal={value!r} (causal=True's diagonal is causal_align='top_left', "
                                    "the default, as PyTorch's is_causal; 'bottom_right' aligns the last query "
                                    "with the last key)"),
    "dim": (_TORCH, "axis", "pass axis= (the axis softmax normalises over, as PyTorch's dim)"),
    "dropout_p": (_TORCH, None, "attnfast has no dropout (its results are deterministic): drop dropout_p "
                                "(0.0 is what attnfast computes), or apply dropout to softmax()'s weights "
                                "and aggregate() them yourself"),
    "enable_gqa": (_TORCH, None, "grouped-query attention needs no flag: kv heads (axis -3) that divide the "
                                 "query heads are shared by index (query head h reads kv head h // (Hq/Hk)), "
                                 "so drop enable_gqa"),
    "key_padding_mask": (_TORCH, "kv_lengths", "PyTorch's key_padding_mask is True for keys to IGNORE: pass "
                                               "kv_lengths= (the number of valid keys per batch item), or "
                                               "mask=~key_padding_mask[:, None, None, :] (True = attend)"),
    "need_weights": (_TORCH, "return_weights", "pass return_weights=True to get the weights (..., Lq, Lk) too"),
    "softmax_scale": (_FLASH, "scale", "pass scale= (None is 1/sqrt(D), as in flash-attn)"),
    "window_size": (_FLASH, "window", "pass window=(left, right), with None instead of -1 for an unbounded "
                                      "side (window_size=(-1, -1) is window=None)"),
    "cache_seqlens": (_FLASH, "kv_lengths", "pass kv_lengths= (the number of valid keys per batch item)"),
    "return_softmax_lse": (_FLASH, "return_lse", "pass return_lse=True to get (out, lse)"),
    "return_attn_probs": (_FLASH, "return_weights", "pass return_weights=True to get the weights "
                                                    "(..., Lq, Lk) too, or return_lse=True for the log-sum-exp"),
    "local_window_size": (_JAX, "window", "pass window=(left, right), None for an unbounded side"),
    "key_value_seq_lengths": (_JAX, "kv_lengths", "pass kv_lengths= (the number of valid keys per batch item)"),
    "attn_bias": (_XFORMERS, "bias", "pass bias= (added to the scores; -inf hides a key)"),
}


def _is_boolean(x: Any) -> Optional[bool]:
    """Whether ``x`` holds booleans (NumPy, PyTorch, JAX or nested lists), None when it cannot tell."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except Exception:  # anything NumPy cannot wrap: say both
            return None
    if str(dtype) in ("bool", "torch.bool"):
        return True
    return False if getattr(dtype, "is_floating_point", False) or np.dtype(dtype).kind in "fiu" else None


def _attn_mask_hint(value: Any, takes_bias: bool) -> str:
    """How to pass PyTorch's attn_mask: a boolean one is mask= (True = attend in both libraries), a
    float one is added to the scores, which is bias=."""
    boolean = _is_boolean(value)
    if boolean is True or not takes_bias:
        return "a boolean attn_mask is mask= here, with the same meaning (True = attend): pass mask=attn_mask"
    if boolean is False:
        return "a float attn_mask is added to the scores, which is bias= here: pass bias=attn_mask (-inf hides a key)"
    return ("a boolean attn_mask (True = attend) is mask= here, a float one (added to the scores) is bias=: pass "
            "mask=attn_mask or bias=attn_mask")


def reject_unexpected(function: Callable[..., Any], given: Dict[str, Any], name: Optional[str] = None) -> None:
    """TypeError for the keyword arguments ``function`` does not take (``given``, not empty; its
    ``**unexpected``): a name from PyTorch, flash-attn or JAX gets attnfast's equivalent, any other name
    the closest one ``function`` accepts. ``name``: how the message names the function (default its
    ``__name__``). Only the error path runs this, so it may be slow.
    """
    import difflib
    import inspect

    accepted = [p.name for p in inspect.signature(function).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    start = f"{name or function.__name__}() got an unexpected keyword argument"
    for given_name, value in given.items():
        if given_name == "attn_mask":
            if "mask" in accepted:
                raise TypeError(f"{start} 'attn_mask' (PyTorch's name): {_attn_mask_hint(value, 'bias' in accepted)}.")
            continue
        if given_name in _FOREIGN_KEYWORDS:
            origin, ours, how = _FOREIGN_KEYWORDS[given_name]
            if ours is None or ours in accepted:
                raise TypeError(f"{start} {given_name!r} ({origin} name): {how.format(value=value)}.")
    first = next(iter(given))
    close = difflib.get_close_matches(first, accepted, n=1)
    raise TypeError(f"{start} {first!r}" + (f"; did you mean {close[0]!r}?" if close else "."))


_DENSIFY = ("k[block_table].transpose(0, 2, 1, 3, 4).reshape(B, Hk, -1, D) for a paged one, "
            "k.astype(np.float32) * k_scale[..., None] for an int8 one")


def reject_backward_extras(given: Dict[str, Any], function: Optional[Callable[..., Any]] = None) -> None:
    """TypeError for keyword arguments attention_backward does not take (``given``: the unexpected
    ones), most likely the forward's return_lse / return_weights / out passed along with the others;
    other names as :func:`reject_unexpected` words them (``function``: attention_backward itself)."""
    for name in ("block_table", "k_scale", "v_scale"):
        if name in given:
            what = "a paged cache (block_table)" if name == "block_table" else "an int8 cache (k_scale, v_scale)"
            raise ValueError(
                f"attention_backward does not take {name}: it has no gradients of {what}. "
                f"Densify the cache first ({_DENSIFY}) and pass the dense k and v."
            )
    if function is not None and any(name not in ("return_lse", "return_weights", "out") for name in given):
        reject_unexpected(function, {name: x for name, x in given.items()
                                     if name not in ("return_lse", "return_weights", "out")})
    if given:
        names = ", ".join(sorted(given))
        raise TypeError(
            f"attention_backward got unexpected keyword argument(s) {names}. It takes attention's keyword "
            f"arguments except return_lse, return_weights and out: pass the forward's out and lse as its "
            f"5th and 6th positional arguments and drop those keywords."
        )


def check_attention_backward(dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, **kwargs: Any
                             ) -> AttentionBackwardArgs:
    """Validate the arguments of ``attention_backward``.

    Parameters
    ----------
    dout : array_like, batch_shape + (Lq, Dv)
        Gradient of the loss with respect to attention's output.
    q, k, v
        As in :func:`attnfast.attention`.
    out, lse : array_like
        What ``attention(q, k, v, return_lse=True, **kwargs)`` returned.
    **kwargs
        attention's keyword arguments but return_lse, return_weights and out; checked by
        :func:`check_attention`, so they raise the same errors.

    Returns
    -------
    AttentionBackwardArgs
    """
    for name, x in (("k", k), ("v", v)):
        if getattr(x, "dtype", None) == _INT8:
            raise ValueError(
                f"attention_backward got an int8 {name}: it has no gradients of an int8 cache. Densify the "
                f"cache first ({_DENSIFY}) and pass the dense k and v."
            )
    a = check_attention(q, k, v, **kwargs)
    result_shape = a.batch_shape + (a.lq, a.dv)
    dout = _check_forward_result(
        "dout", dout, result_shape,
        f"batch_shape + (Lq, Dv) = {_fmt(result_shape)}, the shape of attention's output (dout is the "
        f"gradient of the loss with respect to each of its elements; np.ones({_fmt(result_shape)}) is that "
        f"of out.sum()).",
    )
    out = _check_forward_result(
        "out", out, result_shape,
        f"batch_shape + (Lq, Dv) = {_fmt(result_shape)}. Pass the output of {_FORWARD_CALL}.",
    )
    lse_shape = a.batch_shape + (a.lq,)
    lse = _check_forward_result(
        "lse", lse, lse_shape, f"batch_shape + (Lq,) = {_fmt(lse_shape)}. Pass the lse of {_FORWARD_CALL}."
    )
    expected_lse = lse_dtype(a.dtype)
    if lse.dtype.newbyteorder("=") != expected_lse:
        raise TypeError(
            f"lse has dtype {lse.dtype} but must have dtype {expected_lse}, the dtype {_FORWARD_CALL} returns "
            f"it in: pass it unconverted (a rounded lse scales every recomputed weight exp(s - lse) of its row "
            f"by its rounding error)."
        )
    t = a.compute
    grad_dtypes = {"q": _float_array("q", q).dtype, "k": _float_array("k", k).dtype,
                   "v": _float_array("v", v).dtype}
    if a.bias is not None:
        grad_dtypes["bias"] = _gradient_dtype(kwargs.get("bias"), t)
    for name in ("w", "w_q", "w_k", "score_bias", "v_a", "sinks"):
        if getattr(a, name) is not None:
            grad_dtypes[name] = _gradient_dtype(kwargs.get(name), t)
    return AttentionBackwardArgs(forward=a, dout=dout, out=out, lse=lse, grad_dtypes=grad_dtypes)
