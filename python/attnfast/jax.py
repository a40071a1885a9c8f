"""attnfast's fused attention as a differentiable JAX function.

``attnfast.jax.attention(q, k, v, **kwargs)`` takes the keyword arguments of :func:`attnfast.attention`
(but not ``return_lse``, ``return_weights`` or ``out``) and returns ``out`` as a JAX array. It is a
``jax.custom_vjp``: the forward runs ``attnfast.attention(..., return_lse=True)`` and the backward
``attnfast.attention_backward`` (the fused FlashAttention-2-style kernels) on the host through
``jax.pure_callback``, so it works under ``jax.jit``, ``jax.grad`` and ``jax.vmap``.

* Differentiable with respect to q, k, v, ``bias``, the method weights (``w``, ``w_q``, ``w_k``,
  ``v_a``, ``score_bias``) and ``sinks``; ``mask``, ``kv_lengths`` and ``alibi_slopes`` get zero
  cotangents (float0 for integer and boolean arrays, as JAX requires). ``method``, ``scale``,
  ``causal``, ``causal_align``, ``window`` and ``softcap`` are static: Python values fixed at trace
  time.
* Shapes and dtypes are checked when the function is traced, with attnfast's own messages
  (``TypeError``/``ValueError``); only the values of a traced ``kv_lengths`` can be checked no earlier
  than when the kernel runs, where a bad one surfaces as JAX's runtime error carrying attnfast's message.
* ``jax.vmap``: the kernels take any number of leading batch axes, so the callback uses
  ``vmap_method="expand_dims"`` and runs the kernel once on the whole mapped batch; unmapped arguments
  arrive with size-1 leading axes and broadcast without being copied. Only what the kernels cannot
  batch, mapped method weights, or per-item gradients of the method weights under ``vmap`` of ``grad``,
  falls back to one kernel call per mapped item.
* Cost over calling the kernels on NumPy arrays: ``jax.pure_callback`` copies each input into a fresh
  host array before the callback sees it (XLA hands over views JAX does not alias) and each result into
  XLA's buffer afterwards. An XLA FFI handler written in C++ could read and write XLA's buffers in place.

This module imports JAX; ``import attnfast`` does not import it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union, cast

import jax
import jax.numpy as jnp
import numpy as np

import attnfast
from attnfast import _inputs
from attnfast._types import ArrayLike, CausalAlign, Method, Real, Window

# What the array arguments accept: JAX arrays (traced ones included) or anything NumPy reads.
JaxLike = Union[jax.Array, ArrayLike]
_Signature = Tuple[Tuple[str, Tuple[int, ...], np.dtype], ...]

__all__ = ["attention"]

# Array keyword arguments of attnfast.attention, in a fixed order, with the AttentionGrads field of
# their gradient (None: not differentiable).
_ARRAY_KWARGS = {
    "mask": None,
    "bias": "dbias",
    "kv_lengths": None,
    "w": "dw",
    "w_q": "dw_q",
    "w_k": "dw_k",
    "v_a": "dv_a",
    "score_bias": "dscore_bias",
    "alibi_slopes": None,
    "sinks": "dsinks",
}
# Arguments with the batch shape (no trailing score axes): aligned like kv_lengths under vmap.
_PER_ITEM = ("kv_lengths", "alibi_slopes", "sinks")
_METHOD_WEIGHTS = ("w", "w_q", "w_k", "v_a", "score_bias")
_NUMPY_ONLY = ("return_lse", "return_weights", "out")


@dataclasses.dataclass(frozen=True)
class _Static:
    """The arguments fixed at trace time (hashable: the custom_vjp's non-differentiable argument)."""

    method: str
    scale: Optional[float]
    causal: bool
    causal_align: str
    window: Optional[Tuple[Optional[int], Optional[int]]]
    softcap: Optional[float] = None

    def kwargs(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What tracing needs to know about one call: the result's shape and dtype, and each argument's
    shape without any vmap axes (the callbacks count the mapped axes as the extra leading ones)."""

    out: jax.ShapeDtypeStruct
    lse: jax.ShapeDtypeStruct
    shapes: Tuple[Tuple[str, Tuple[int, ...]], ...]
    batch_rank: int


def attention(q: JaxLike, k: JaxLike, v: JaxLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
              mask: Optional[JaxLike] = None, bias: Optional[JaxLike] = None, causal: bool = False,
              causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[JaxLike] = None,
              w: Optional[JaxLike] = None, w_q: Optional[JaxLike] = None, w_k: Optional[JaxLike] = None,
              v_a: Optional[JaxLike] = None, score_bias: Optional[JaxLike] = None, softcap: Optional[Real] = None,
              alibi_slopes: Optional[JaxLike] = None, sinks: Optional[JaxLike] = None,
              **numpy_only: Any) -> jax.Array:
    """Fused attention as a differentiable JAX function (under jit, grad and vmap).

    A ``jax.custom_vjp`` whose forward is ``attnfast.attention(..., return_lse=True)`` and whose backward
    is :func:`attnfast.attention_backward`, both run on the host through ``jax.pure_callback``.

    Parameters
    ----------
    q : jax.Array or array_like, (..., Lq, D)
        Queries: float32, float64 (with ``jax_enable_x64``), float16 or bfloat16. Leading axes
        broadcast; axis -3 is the head axis.
    k : jax.Array or array_like, (..., Lk, Dk)
        Keys, the same dtypes; the kv heads may divide the query heads (GQA/MQA).
    v : jax.Array or array_like, (..., Lk, Dv)
        Values.
    method : {"scaled_dot", "dot", "general", "concat", "additive"}, default "scaled_dot"
        The score rule, as in :func:`attnfast.attention`.
    scale : float, optional
        Multiplies every method's score; default 1/sqrt(D) for "scaled_dot", 1 otherwise.
    mask : jax.Array of bool, optional
        Broadcastable to (..., Lq, Lk); True = attend. Not differentiable.
    bias : jax.Array, optional
        Broadcastable to (..., Lq, Lk), added to the scores; differentiable.
    causal : bool, default False
        Key j visible to query i only when j <= diag_i.
    causal_align : {"top_left", "bottom_right"}, default "top_left"
        The diagonal of causal, window and ALiBi, as in :func:`attnfast.attention` (with kv_lengths,
        bottom_right aligns each item to its own length).
    window : tuple of (int or None, int or None), optional
        (left, right) around the aligned diagonal; None for an unbounded side.
    kv_lengths : jax.Array of int, optional
        Broadcastable to the batch shape; item b sees its first kv_lengths[b] keys. Not differentiable.
    w : jax.Array, (D, Dk), optional
        The weight of "general"; differentiable.
    w_q, w_k : jax.Array, optional
        "concat": (D,) and (Dk,); "additive": (A, D) and (A, Dk), or None for inputs already projected.
        Differentiable.
    v_a : jax.Array, (A,), optional
        The output weights of "additive" (default ones); differentiable.
    score_bias : jax.Array, optional
        "concat": a scalar; "additive": (A,); differentiable.
    softcap : float, optional
        A cap c > 0: s <- c * tanh(s / c).
    alibi_slopes : jax.Array, optional
        One slope per query head, broadcastable to the batch shape; not differentiable.
    sinks : jax.Array, optional
        One logit per query head, broadcastable to the batch shape, joining each row's denominator;
        differentiable.
    **numpy_only
        ``return_lse``, ``return_weights``, ``out``, ``block_table``, ``k_scale`` and ``v_scale`` are
        NumPy-only: a TypeError that says so (as for any other unexpected keyword).

    Returns
    -------
    jax.Array, (..., Lq, Dv)
        ``out``, in the promoted dtype of q, k, v.

    Raises
    ------
    TypeError
        A traced value for a static argument (method, scale, causal, causal_align, window, softcap), a
        NumPy-only keyword, and attnfast.attention's TypeErrors, at trace time.
    ValueError
        attnfast.attention's ValueErrors, at trace time; a traced kv_lengths out of range surfaces when
        the kernel runs, as ``jax.errors.JaxRuntimeError`` carrying attnfast's message.

    See Also
    --------
    attnfast.attention, attnfast.attention_backward

    Notes
    -----
    Differentiable with respect to q, k, v, bias, the method weights and sinks; mask, kv_lengths and
    alibi_slopes get zero cotangents (float0 for integer and bool arrays). ``method``, ``scale``,
    ``causal``, ``causal_align``, ``window`` and ``softcap`` are static Python values. There is no forward
    mode (``jax.jvp``) and no second derivative. Under ``vmap`` the mapped axis becomes one more batch axis
    of a single kernel call (``vmap_method="expand_dims"``). ``jax.pure_callback`` copies each input and
    result once on the host.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import attnfast
    >>> import attnfast.jax
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (jnp.asarray(rng.standard_normal((2, 8, 16), dtype=np.float32)) for _ in range(3))
    >>> out = jax.jit(lambda q, k, v: attnfast.jax.attention(q, k, v, causal=True))(q, k, v)
    >>> bool(np.allclose(out, attnfast.attention(np.asarray(q), np.asarray(k), np.asarray(v), causal=True)))
    True
    >>> dq = jax.grad(lambda q: attnfast.jax.attention(q, k, v).sum())(q)
    >>> dq.shape
    (2, 8, 16)
    """
    _reject_numpy_only(numpy_only)
    static = _static_args(method=method, scale=scale, causal=causal, causal_align=causal_align,
                          window=window, softcap=softcap)
    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    given = dict(mask=mask, bias=bias, kv_lengths=kv_lengths, w=w, w_q=w_q, w_k=w_k, v_a=v_a,
                 score_bias=score_bias, alibi_slopes=alibi_slopes, sinks=sinks)
    arrays = {name: jnp.asarray(x) for name, x in given.items() if x is not None}
    _plan(static, _signature(jq, jk, jv, arrays))  # validates shapes and dtypes now, at trace time
    if "kv_lengths" in arrays and not isinstance(arrays["kv_lengths"], jax.core.Tracer):
        _check_values(static, jq, jk, jv, arrays)
    out: jax.Array = _attention(static, jq, jk, jv, arrays)
    return out


def _reject_numpy_only(numpy_only: Dict[str, Any]) -> None:
    for name in numpy_only:
        if name in _NUMPY_ONLY:
            raise TypeError(
                f"attnfast.jax.attention does not take {name}= (a JAX function returns a new array, "
                f"and only out is differentiable); call attnfast.attention on NumPy arrays for it."
            )
        _inputs.reject_unexpected(attention, numpy_only, "attnfast.jax.attention")


def _static_args(**values: Any) -> _Static:
    """The static arguments as hashable Python values. A traced one is refused: it would need a kernel
    configuration per value, so it must be fixed at trace time."""
    for name, value in values.items():
        parts = value if name == "window" and isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(x, jax.core.Tracer) for x in parts):
            raise TypeError(
                f"{name} must be a Python value fixed at trace time, got a traced JAX value. Pass it as "
                f"a constant or mark it static (jax.jit(f, static_argnames=...))."
            )
    scale, window, softcap = values["scale"], values["window"], values["softcap"]
    if isinstance(scale, jax.Array):
        scale = np.asarray(scale)  # concrete: attnfast's check takes a 0-d array like a NumPy scalar
    if isinstance(scale, np.ndarray) and scale.ndim == 0:
        scale = scale.item()
    if isinstance(softcap, (jax.Array, np.ndarray)) and np.ndim(softcap) == 0:
        softcap = np.asarray(softcap).item()
    if isinstance(window, (list, np.ndarray)) and np.ndim(window) == 1:
        window = tuple(window.tolist() if isinstance(window, np.ndarray) else window)
    static = dict(values, scale=scale, window=window, softcap=softcap)
    try:
        hash(tuple(static.values()))
    except TypeError:
        # Only values attnfast rejects are unhashable here: let it say what it expects.
        _inputs.check_attention(_stand_in((1, 1), np.float32), _stand_in((1, 1), np.float32),
                                _stand_in((1, 1), np.float32), **static)
        raise TypeError(f"the static arguments must be hashable Python values; got {static!r}") from None
    return _Static(**static)


def _signature(q: Any, k: Any, v: Any, arrays: Dict[str, Any]) -> _Signature:
    named = {"q": q, "k": k, "v": v, **arrays}
    return tuple((name, tuple(x.shape), np.dtype(x.dtype)) for name, x in named.items())


def _stand_in(shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
    """An array of this shape and dtype that costs one element (a zero-stride broadcast view)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


@functools.lru_cache(maxsize=256)
def _plan(static: _Static, signature: _Signature) -> _Plan:
    """Validate one call's shapes and dtypes with attnfast's own checks (on stand-in arrays, since traced
    values are unknown) and return the result's shape and dtype."""
    named = {name: _stand_in(shape, dtype) for name, shape, dtype in signature}
    q, k, v = named.pop("q"), named.pop("k"), named.pop("v")
    a = _inputs.check_attention(q, k, v, return_lse=True, **static.kwargs(), **named)
    out = jax.ShapeDtypeStruct(a.batch_shape + (a.lq, a.dv), a.dtype)
    lse = jax.ShapeDtypeStruct(a.batch_shape + (a.lq,), _inputs.lse_dtype(a.dtype))
    shapes = tuple((name, shape) for name, shape, _ in signature)
    shapes += (("dout", out.shape), ("out", out.shape), ("lse", lse.shape))
    return _Plan(out=out, lse=lse, shapes=shapes, batch_rank=len(a.batch_shape))


def _check_values(static: _Static, q: Any, k: Any, v: Any, arrays: Dict[str, Any]) -> None:
    """Check a concrete kv_lengths' values now (their range depends on Lk), so that a bad one raises
    attnfast's ValueError here rather than JAX's runtime error from inside the callback."""
    named = {name: _stand_in(x.shape, x.dtype) for name, x in arrays.items()}
    named["kv_lengths"] = np.asarray(arrays["kv_lengths"])
    _inputs.check_attention(_stand_in(q.shape, q.dtype), _stand_in(k.shape, k.dtype),
                            _stand_in(v.shape, v.dtype), **static.kwargs(), **named)


# --------------------------------------------------------------------------
# The differentiable function
# --------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static: _Static, q: Any, k: Any, v: Any, arrays: Dict[str, Any]) -> Any:
    return _forward(static, q, k, v, arrays)[0]


def _attention_fwd(static: _Static, q: Any, k: Any, v: Any, arrays: Dict[str, Any]) -> Tuple[Any, Tuple[Any, ...]]:
    out, lse = _forward(static, q, k, v, arrays)
    return out, (q, k, v, arrays, out, lse)


def _attention_bwd(static: _Static, residuals: Tuple[Any, ...], dout: Any) -> Tuple[Any, ...]:
    q, k, v, arrays, out, lse = residuals
    wanted = {name: x for name, x in arrays.items() if _differentiable(name, x)}
    plan = _plan(static, _signature(q, k, v, arrays))
    specs = (_spec(q), _spec(k), _spec(v), {name: _spec(x) for name, x in wanted.items()})
    callback = _HostCall(_backward_callback, static, plan, tuple(arrays), tuple(wanted))
    dq, dk, dv, grads = jax.pure_callback(callback, specs, dout, q, k, v, out, lse, arrays,
                                          vmap_method="expand_dims")
    cotangents = {name: grads[name] if name in grads else _zero_cotangent(x) for name, x in arrays.items()}
    return dq, dk, dv, cotangents


_attention.defvjp(_attention_fwd, _attention_bwd)


def _differentiable(name: str, x: Any) -> bool:
    return _ARRAY_KWARGS[name] is not None and bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _zero_cotangent(x: Any) -> Any:
    """The cotangent of an input that gets no gradient: float0 zeros for integer and boolean arrays (JAX's
    rule), zeros of its dtype otherwise."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros(x.shape, x.dtype)
    return np.zeros(x.shape, jax.dtypes.float0)


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _forward(static: _Static, q: Any, k: Any, v: Any, arrays: Dict[str, Any]) -> Any:
    plan = _plan(static, _signature(q, k, v, arrays))
    callback = _HostCall(_forward_callback, static, plan, tuple(arrays))
    return jax.pure_callback(callback, (plan.out, plan.lse), q, k, v, arrays, vmap_method="expand_dims")


# --------------------------------------------------------------------------
# The host callbacks
# --------------------------------------------------------------------------


class _HostCall:
    """A callback with its configuration, equal to (and hashing like) any other with the same one.

    JAX caches the compiled program of an eager pure_callback by its parameters, the callback included:
    with a fresh functools.partial per call (which compares by identity) every eager call would compile
    again."""

    def __init__(self, function: Callable[..., Any], *config: Any):
        self.function, self.config = function, config

    def __call__(self, *args: Any) -> Any:
        return self.function(*self.config, *args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HostCall) and (self.function, self.config) == (other.function, other.config)

    def __hash__(self) -> int:
        return hash((self.function, self.config))

#
# Under vmap with vmap_method="expand_dims", every argument arrives with the same number of extra leading
# axes: the mapped axis (one per nested vmap) for mapped arguments, size 1 for the others. The results
# must have the full mapped axes in front of the unmapped result's shape.


class _Mapped:
    """One callback's arguments as NumPy arrays, split into the mapped leading axes and the rest."""

    def __init__(self, plan: _Plan, named: Dict[str, Any]):
        self.plan = plan
        self.shapes = dict(plan.shapes)
        self.arrays = {name: np.asarray(x) for name, x in named.items()}
        self.lead = self.arrays["q"].ndim - len(self.shapes["q"])
        self.shape = np.broadcast_shapes(*(x.shape[:self.lead] for x in self.arrays.values()))

    def aligned(self, name: str) -> np.ndarray:
        """The argument with size-1 axes inserted after the mapped ones, so that its own batch axes line
        up with everyone's (batch axes broadcast from the right, and the mapped ones are in front)."""
        x = self.arrays[name]
        full = self.plan.batch_rank + (1 if name == "lse" else 0 if name in _PER_ITEM else 2)
        missing = full - len(self.shapes[name])
        return x.reshape(x.shape[:self.lead] + (1,) * missing + x.shape[self.lead:])

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """An aligned argument broadcast to every mapped axis (a view: no copy)."""
        return np.broadcast_to(x, self.shape + x.shape[self.lead:])

    def unmapped(self, name: str) -> Optional[np.ndarray]:
        """A method weight without its mapped axes, or None when it differs between mapped items."""
        x = self.arrays[name]
        if any(n != 1 for n in x.shape[:self.lead]):
            return None
        return x.reshape(self.shapes[name])

    def item(self, name: str, index: Tuple[int, ...]) -> np.ndarray:
        """The argument for one mapped item (its own unmapped shape)."""
        x = self.arrays[name]
        item: np.ndarray = x[tuple(i if n > 1 else 0 for i, n in zip(index, x.shape[:self.lead]))]
        return item

    def full(self, name: str) -> Tuple[int, ...]:
        """The shape of a result (or gradient) shaped like ``name``: the mapped axes, then its own."""
        return self.shape + tuple(self.shapes[name])

    def per_item(self, names: Sequence[str], run: Callable[[Dict[str, np.ndarray]], Sequence[np.ndarray]],
                 results: Sequence[Tuple[str, Any]]) -> Tuple[np.ndarray, ...]:
        """``run`` once per mapped item, the results stacked: the path for what one call cannot batch.
        ``results``: (shape-like name, dtype) of each result."""
        stacked = tuple(np.empty(self.full(like), dtype) for like, dtype in results)
        for index in np.ndindex(*self.shape):
            for target, value in zip(stacked, run({name: self.item(name, index) for name in names})):
                target[index] = value
        return stacked


def _forward_callback(static: _Static, plan: _Plan, names: Tuple[str, ...], q: Any, k: Any, v: Any,
                      arrays: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
    mapped = _Mapped(plan, {"q": q, "k": k, "v": v, **arrays})

    def run(args: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        # No return_weights among the arguments: the result is (out, lse).
        return cast(Tuple[np.ndarray, np.ndarray],
                    attnfast.attention(args.pop("q"), args.pop("k"), args.pop("v"), return_lse=True,
                                       **static.kwargs(), **args))

    operands = ("q", "k", "v", *names)
    results = (("out", plan.out.dtype), ("lse", plan.lse.dtype))
    weights = {name: mapped.unmapped(name) for name in names if name in _METHOD_WEIGHTS}
    if any(x is None for x in weights.values()):
        return mapped.per_item(operands, run, results)  # mapped method weights: no batched kernel for them
    args = {name: mapped.aligned(name) for name in operands if name not in weights}
    # q, k and v decide the batch shape (a mask or bias must broadcast to it), so they carry every mapped
    # axis, as zero-stride views where they are not mapped.
    for name in ("q", "k", "v"):
        args[name] = mapped.broadcast(args[name])
    return run({**args, **weights})


def _backward_callback(static: _Static, plan: _Plan, names: Tuple[str, ...], wanted: Tuple[str, ...], dout: Any,
                       q: Any, k: Any, v: Any, out: Any, lse: Any, arrays: Dict[str, Any]
                       ) -> Tuple[Any, Any, Any, Dict[str, Any]]:
    mapped = _Mapped(plan, {"dout": dout, "q": q, "k": k, "v": v, "out": out, "lse": lse, **arrays})
    operands = ("dout", "q", "k", "v", "out", "lse", *names)
    differentiated = ("q", "k", "v", *wanted)
    results = tuple((name, mapped.arrays[name].dtype) for name in differentiated)

    def run(args: Dict[str, Any]) -> Tuple[np.ndarray, ...]:
        grads = attnfast.attention_backward(args.pop("dout"), args.pop("q"), args.pop("k"), args.pop("v"),
                                            args.pop("out"), args.pop("lse"), **static.kwargs(), **args)
        return tuple(_gradient(grads, name, dtype) for name, dtype in results)

    if mapped.lead and any(name in _METHOD_WEIGHTS for name in names):
        # Each mapped item needs its own weight gradients, which one batched call would sum.
        grads = mapped.per_item(operands, run, results)
    else:
        # No mapped axes when there are weights; then unmapped() is the weight itself.
        args: Dict[str, Any] = {name: mapped.unmapped(name) if name in _METHOD_WEIGHTS else mapped.aligned(name)
                                for name in operands}
        # The differentiated operands (and those shaped like the result) carry every mapped axis, as
        # zero-stride views where they are not mapped: each gradient then has one slice per mapped item
        # instead of their sum.
        for name in ("dout", "out", "lse", *differentiated):
            args[name] = mapped.broadcast(args[name])
        grads = tuple(g.reshape(mapped.full(name)) for g, name in zip(run(args), differentiated))
    dq, dk, dv, *rest = grads
    return dq, dk, dv, dict(zip(wanted, rest))


def _gradient(grads: attnfast.AttentionGrads, name: str, dtype: Any) -> np.ndarray:
    """One gradient out of AttentionGrads, in its argument's dtype."""
    field = {"q": "dq", "k": "dk", "v": "dv"}.get(name) or _ARRAY_KWARGS[name]
    assert field is not None  # only the differentiable arguments have gradients
    g = np.asarray(getattr(grads, field))
    return g if g.dtype == dtype else _inputs.round_to(g, dtype)
