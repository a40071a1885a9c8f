"""attnfast for PyTorch: ``attnfast.torch.attention``, differentiable, on CPU tensors, without copies.

Import it explicitly (``import attnfast.torch``); ``import attnfast`` never imports torch.

``attention(q, k, v, **kwargs)`` takes the keyword arguments of :func:`attnfast.attention` (method,
scale, mask, bias, causal, causal_align, window, kv_lengths, w, w_q, w_k, v_a, score_bias, softcap,
alibi_slopes, sinks) as CPU tensors of dtype float64, float32, float16 or bfloat16 (mask bool,
kv_lengths integer; softcap a float) and returns a tensor (and the log-sum-exp with
``return_lse=True``). Gradients flow to q, k, v, bias, the method weights and sinks through
:func:`attnfast.attention_backward`; mask, kv_lengths and alibi_slopes are not differentiable, and
neither is lse (it is returned marked non-differentiable: the backward pass takes no gradient for it).

Tensors and arrays share memory both ways: inputs are read through ``tensor.numpy()`` (bfloat16, which
NumPy cannot hold, through an int16 view reinterpreted as ``ml_dtypes.bfloat16``), so a contiguous or
strided CPU tensor is never copied here, and results are wrapped with ``torch.from_numpy``.

The work is two ``torch.library.custom_op`` operators, ``attnfast::attention`` (forward, returning out
and lse) and ``attnfast::attention_backward``, each with a fake (shape-only) implementation that runs
attnfast's validation on the shapes, and the forward's autograd formula registered with
``torch.library.register_autograd``; so the function also runs under ``torch.compile(fullgraph=True)``,
which sees two opaque operators and traces the rest. Eager calls on plain tensors run the same
implementations through an ``autograd.Function`` instead, which skips the operator's own autograd
dispatch (in Python, and on a small call a cost the size of the attention itself). torch.func transforms (grad, vmap) are not supported: the tensors
they wrap have no memory NumPy could view.
"""

import math
from typing import Any, Callable, Dict, Literal, Optional, Sequence, Tuple, Union, cast, overload

import ml_dtypes
import numpy as np
import torch

import attnfast
from attnfast import _inputs
from attnfast._types import ArrayLike, CausalAlign, Method, Real, Window

# What the tensor arguments accept: a tensor, or anything NumPy reads (arrays, lists, Python numbers).
TensorLike = Union[torch.Tensor, ArrayLike]

__all__ = ["attention"]

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_INT64_MAX = int(np.iinfo(np.int64).max)

# The method weights, in the operators' argument order, and the AttentionGrads field of each gradient.
_WEIGHTS = ("w", "w_q", "w_k", "v_a", "score_bias")
_WEIGHT_GRADS = ("dw", "dw_q", "dw_k", "dv_a", "dscore_bias")
# The score modifiers given as tensors (softcap is a scalar); only sinks has a gradient.
_MODIFIERS = ("alibi_slopes", "sinks")


# --------------------------------------------------------------------------
# Tensors <-> arrays, sharing memory
# --------------------------------------------------------------------------


# The dtypes NumPy can view a tensor's memory as (bfloat16 through ml_dtypes); complex ones are included so
# that attnfast's own TypeError names them. A plain dict: torch.compile traces the lookup.
_NUMPY_DTYPES = {
    torch.float64: np.dtype(np.float64), torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16), torch.bfloat16: _BFLOAT16,
    torch.bool: np.dtype(np.bool_), torch.uint8: np.dtype(np.uint8), torch.int8: np.dtype(np.int8),
    torch.int16: np.dtype(np.int16), torch.int32: np.dtype(np.int32), torch.int64: np.dtype(np.int64),
    torch.complex64: np.dtype(np.complex64), torch.complex128: np.dtype(np.complex128),
}
# Unsigned integers beyond uint8 (kv_lengths may have them) exist in recent torch versions only.
_NUMPY_DTYPES.update((getattr(torch, name), np.dtype(name)) for name in ("uint16", "uint32", "uint64")
                     if hasattr(torch, name))
_TORCH_DTYPES = {np_dtype: t for t, np_dtype in _NUMPY_DTYPES.items()}


def _numpy_dtype(dtype: torch.dtype) -> Optional[np.dtype]:
    """The NumPy dtype a tensor of ``dtype`` is viewed as, or None when there is none (float8, ...)."""
    return _NUMPY_DTYPES.get(dtype)


@overload
def _as_array(t: torch.Tensor) -> np.ndarray: ...
@overload
def _as_array(t: Optional[torch.Tensor]) -> Optional[np.ndarray]: ...


def _as_array(t: Optional[torch.Tensor]) -> Optional[np.ndarray]:
    """The tensor's memory as an ndarray (no copy; any strides)."""
    if t is None:
        return None
    # resolve_neg: NumPy cannot see torch's lazy negation bit (no copy unless it is set).
    t = t.detach().resolve_neg()
    array: np.ndarray = t.numpy() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().view(_BFLOAT16)
    return array


def _as_tensor(a: ArrayLike) -> torch.Tensor:
    """A result array as a tensor sharing its memory (C-contiguous, as the fake implementations say)."""
    # Not np.ascontiguousarray: it makes a 0-d array (concat's dscore_bias) 1-d.
    a = np.asarray(a)
    if not a.flags.c_contiguous:
        a = np.array(a, order="C")
    if not a.flags.writeable:  # torch.from_numpy warns about read-only memory
        a = a.copy()
    if a.dtype == _BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@overload
def _shape_only(t: torch.Tensor, dtype: Optional[np.dtype] = None) -> np.ndarray: ...
@overload
def _shape_only(t: Optional[torch.Tensor], dtype: Optional[np.dtype] = None) -> Optional[np.ndarray]: ...


def _shape_only(t: Optional[torch.Tensor], dtype: Optional[np.dtype] = None) -> Optional[np.ndarray]:
    """An array with the shape and (NumPy) dtype of ``t`` (or ``dtype``) and no memory of its own (one
    broadcast element): what attnfast's validation needs to check a call without the data, e.g. on fake
    tensors."""
    if t is None:
        return None
    dtype = _numpy_dtype(t.dtype) if dtype is None else dtype
    return np.broadcast_to(np.zeros((), dtype), tuple(int(n) for n in t.shape))


# --------------------------------------------------------------------------
# Argument checks (the ones attnfast's NumPy validation cannot make: tensors, devices, gradients)
# --------------------------------------------------------------------------

_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_DIFFERENTIABLE = ("q", "k", "v", "bias") + _WEIGHTS + ("sinks",)


@overload
def _tensor_argument(name: str, x: TensorLike) -> torch.Tensor: ...
@overload
def _tensor_argument(name: str, x: Optional[TensorLike]) -> Optional[torch.Tensor]: ...


def _tensor_argument(name: str, x: Optional[TensorLike]) -> Optional[torch.Tensor]:
    """``x`` as a CPU strided tensor: a tensor is checked, anything else (an ndarray, a list, a Python
    number) becomes one (an ndarray shares its memory; a Python float becomes float64, as attnfast
    reads it). Raises TypeError naming ``name`` for a tensor attnfast cannot read."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        x = _tensor_from_array_like(name, x)
    if x.device.type != "cpu":
        raise TypeError(
            f"{name} is a tensor on device {x.device}; attnfast.torch runs on CPU tensors. "
            f"Pass {name}.cpu() (and move the result back)."
        )
    if x.layout != torch.strided:
        raise TypeError(
            f"{name} is a tensor with layout {x.layout}; attnfast.torch takes dense (strided) tensors. "
            f"Pass {name}.to_dense()."
        )
    if _numpy_dtype(x.dtype) is None:
        raise TypeError(
            f"{name} has dtype {x.dtype}, which attnfast does not read; its accepted dtypes are "
            f"torch.float64, torch.float32, torch.float16 and torch.bfloat16 (mask: torch.bool, "
            f"kv_lengths: an integer dtype). Convert it with {name}.float()."
        )
    if name in ("q", "k", "v") and x.dtype not in _FLOATING:
        raise TypeError(
            f"{name} has dtype {x.dtype}; attnfast.torch takes q, k and v as tensors of dtype torch.float64, "
            f"torch.float32, torch.float16 or torch.bfloat16. Convert it with {name}.float() (or .double())."
        )
    if x.requires_grad and name not in _DIFFERENTIABLE:
        raise TypeError(
            f"{name} requires grad, but attnfast.attention is not differentiable with respect to it "
            f"(only q, k, v, bias, the method weights and sinks are). Pass {name}.detach()."
        )
    return x


def _tensor_from_array_like(name: str, x: Any) -> torch.Tensor:
    if isinstance(x, float):
        return torch.tensor(x, dtype=torch.float64)
    a = _inputs._asarray(name, x)  # names the argument when it is ragged
    if a.dtype == _BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(a) if a.flags.writeable else torch.from_numpy(a.copy())
    except TypeError:
        raise TypeError(
            f"{name} has type {type(x).__name__} with NumPy dtype {a.dtype}, which torch cannot hold; "
            f"pass a torch.Tensor."
        ) from None


def _plain_side(s: Any) -> bool:
    """Whether a window side is None or an int in [0, 2^63), read without NumPy."""
    return s is None or (isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
                         and bool(0 <= s <= _INT64_MAX))


def _window_sides(window: Any) -> Tuple[Optional[int], Optional[int], bool]:
    """(left, right, windowed): the window as the operators take it, None for an unbounded side."""
    if window is None:
        return None, None, False
    # The usual pair is read here without NumPy, which torch.compile could not trace.
    if type(window) in (tuple, list) and len(window) == 2 and all(_plain_side(s) for s in window):
        left, right = (None if s is None else int(s) for s in window)
        return left, right, True
    # Anything else: attnfast's own check raises its error or normalises it (NumPy integers, an array).
    # Its clamp to Lq + Lk is an optimisation the kernels make anyway; without the lengths, none.
    left, right = _inputs._check_window(window, _INT64_MAX, 0)
    return (None if left < 0 else left), (None if right < 0 else right), True


def _window(left: Optional[int], right: Optional[int], windowed: bool) -> Optional[Tuple[Optional[int], Optional[int]]]:
    return (left, right) if windowed else None


def _scale(scale: Any) -> Optional[float]:
    """scale as the operators take it: a float (attnfast checks its value), None for the default."""
    if scale is None:
        return None
    if isinstance(scale, np.ndarray) and scale.ndim == 0 and (scale.dtype.kind in "iuf" or scale.dtype == _BFLOAT16):
        scale = scale.item()
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating,
                                                                    ml_dtypes.bfloat16)):
        raise TypeError(f"scale must be a real number (a Python float); got {scale!r}.")
    try:
        return float(scale)
    except OverflowError:  # an int beyond the float range: attnfast rejects it as not finite
        return math.inf if scale > 0 else -math.inf


def _softcap(softcap: Any) -> Optional[float]:
    """softcap as the operators take it: a float (attnfast checks its value), None for no cap."""
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        return _inputs.check_softcap(softcap, np.dtype(np.float64))  # raises attnfast's TypeError
    try:
        return float(softcap)
    except OverflowError:  # an int beyond the float range: attnfast rejects it as not finite
        return math.inf


# --------------------------------------------------------------------------
# The forward operator
# --------------------------------------------------------------------------


def _attention_kwargs(mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
                      weights: Sequence[Optional[torch.Tensor]], method: str, scale: Optional[float], causal: bool,
                      causal_align: str, left: Optional[int], right: Optional[int], windowed: bool,
                      array: Callable[[Optional[torch.Tensor]], Optional[np.ndarray]],
                      modifiers: Sequence[Optional[torch.Tensor]] = (None, None),
                      softcap: Optional[float] = None) -> Dict[str, Any]:
    """The keyword arguments of attnfast.attention / attention_backward, tensors made arrays by ``array``."""
    kwargs = dict(method=method, scale=scale, mask=array(mask), bias=array(bias), causal=causal,
                  causal_align=causal_align, window=_window(left, right, windowed),
                  kv_lengths=array(kv_lengths), softcap=softcap)
    kwargs.update((name, array(x)) for name, x in zip(_WEIGHTS, weights))
    kwargs.update((name, array(x)) for name, x in zip(_MODIFIERS, modifiers))
    return kwargs


def _attention_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
    w: Optional[torch.Tensor], w_q: Optional[torch.Tensor], w_k: Optional[torch.Tensor],
    v_a: Optional[torch.Tensor], score_bias: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    method: str, scale: Optional[float], causal: bool, causal_align: str,
    window_left: Optional[int], window_right: Optional[int], windowed: bool, softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs = _attention_kwargs(mask, bias, kv_lengths, (w, w_q, w_k, v_a, score_bias), method, scale, causal,
                               causal_align, window_left, window_right, windowed, _as_array,
                               (alibi_slopes, sinks), softcap)
    # kwargs holds no return_weights: the result is the pair.
    out, lse = cast(Tuple[np.ndarray, np.ndarray],
                    attnfast.attention(_as_array(q), _as_array(k), _as_array(v), return_lse=True, **kwargs))
    return _as_tensor(out), _as_tensor(lse)


_attention_op = torch.library.custom_op("attnfast::attention", _attention_impl, mutates_args=(),
                                        device_types="cpu")


def _checked_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
                  weights: Sequence[Optional[torch.Tensor]], method: str, scale: Optional[float], causal: bool,
                  causal_align: str, window: Optional[Tuple[Optional[int], Optional[int]]],
                  modifiers: Sequence[Optional[torch.Tensor]] = (None, None),
                  softcap: Optional[float] = None) -> _inputs.AttentionArgs:
    """attnfast's validation of the call, on shapes and dtypes only (no data is read): the same errors
    as attnfast.attention, and the arguments that describe the result."""
    kwargs = _attention_kwargs(mask, None, kv_lengths, (), method, scale, causal, causal_align,
                               None, None, False, _shape_only, softcap=softcap)
    kwargs["window"] = window
    # bias and the weights convert to the computation dtype during the check: shape-only arrays of another
    # real dtype would be expanded to their full (for bias: score-sized) shape, so they are made in it.
    arrays = [_shape_only(x) for x in (q, k, v)]
    compute = None
    if all(a.dtype in _inputs.STORAGE_DTYPES for a in arrays):
        compute = _inputs.compute_dtype(_inputs.result_dtype(*(a.dtype for a in arrays)))
    for name, x in zip(("bias",) + _WEIGHTS + _MODIFIERS, (bias,) + tuple(weights) + tuple(modifiers)):
        real = x is not None and (not x.is_complex() and x.dtype != torch.bool)
        kwargs[name] = _shape_only(x, compute if real else None)
    return _inputs.check_attention(*arrays, return_lse=True, **kwargs)


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return _TORCH_DTYPES[np.dtype(dtype)]


@_attention_op.register_fake
def _attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
    w: Optional[torch.Tensor], w_q: Optional[torch.Tensor], w_k: Optional[torch.Tensor],
    v_a: Optional[torch.Tensor], score_bias: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    method: str, scale: Optional[float], causal: bool, causal_align: str,
    window_left: Optional[int], window_right: Optional[int], windowed: bool, softcap: Optional[float],
) -> Tuple[torch.Tensor, torch.Tensor]:
    a = _checked_call(q, k, v, mask, bias, kv_lengths, (w, w_q, w_k, v_a, score_bias), method, scale, causal,
                      causal_align, _window(window_left, window_right, windowed), (alibi_slopes, sinks), softcap)
    shape = a.batch_shape + (a.lq,)
    out = q.new_empty(shape + (a.dv,), dtype=_torch_dtype(a.dtype))
    lse = q.new_empty(shape, dtype=_torch_dtype(_inputs.lse_dtype(a.dtype)))
    return out, lse


# --------------------------------------------------------------------------
# The backward operator
# --------------------------------------------------------------------------

# An operator returns tensors, never None: a gradient that does not exist (no bias, a weight the method
# lacks or one of an integer dtype, which cannot require grad) is returned as an empty placeholder,
# decided by the inputs alone so that the fake implementation agrees.


def _has_gradient(x: Optional[torch.Tensor]) -> bool:
    return x is not None and x.is_floating_point()


def _placeholder(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


def _attention_backward_impl(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
    w: Optional[torch.Tensor], w_q: Optional[torch.Tensor], w_k: Optional[torch.Tensor],
    v_a: Optional[torch.Tensor], score_bias: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    method: str, scale: Optional[float], causal: bool, causal_align: str,
    window_left: Optional[int], window_right: Optional[int], windowed: bool, softcap: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    weights = (w, w_q, w_k, v_a, score_bias)
    kwargs = _attention_kwargs(mask, bias, kv_lengths, weights, method, scale, causal, causal_align,
                               window_left, window_right, windowed, _as_array, (alibi_slopes, sinks), softcap)
    grads = attnfast.attention_backward(_as_array(dout), _as_array(q), _as_array(k), _as_array(v),
                                        _as_array(out), _as_array(lse), **kwargs)
    pairs = [(grads.dq, q), (grads.dk, k), (grads.dv, v), (grads.dbias, bias)]
    pairs += [(getattr(grads, field), x) for field, x in zip(_WEIGHT_GRADS, weights)]
    pairs.append((grads.dsinks, sinks))
    return cast("tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "
                "torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]",
                tuple(_gradient_tensor(g, x, q) for g, x in pairs))


_attention_backward_op = torch.library.custom_op("attnfast::attention_backward", _attention_backward_impl,
                                                 mutates_args=(), device_types="cpu")


def _gradient_tensor(grad: Optional[np.ndarray], x: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """The gradient of input ``x`` as a tensor of x's shape and dtype (a placeholder when x has none)."""
    if x is None or not _has_gradient(x):
        return _placeholder(q)
    if grad is None:  # a weight the method does not use: its gradient is zero
        return torch.zeros(x.shape, dtype=x.dtype)
    grad = np.asarray(grad)
    dtype = _NUMPY_DTYPES[x.dtype]  # a floating dtype (_has_gradient)
    if grad.dtype != dtype:
        grad = _inputs.round_to(grad, dtype)
    return _as_tensor(grad.reshape(tuple(x.shape)))


@_attention_backward_op.register_fake
def _attention_backward_fake(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    mask: Optional[torch.Tensor], bias: Optional[torch.Tensor], kv_lengths: Optional[torch.Tensor],
    w: Optional[torch.Tensor], w_q: Optional[torch.Tensor], w_k: Optional[torch.Tensor],
    v_a: Optional[torch.Tensor], score_bias: Optional[torch.Tensor],
    alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
    method: str, scale: Optional[float], causal: bool, causal_align: str,
    window_left: Optional[int], window_right: Optional[int], windowed: bool, softcap: Optional[float],
) -> Tuple[torch.Tensor, ...]:
    inputs = (q, k, v, bias, w, w_q, w_k, v_a, score_bias, sinks)
    return tuple(x.new_empty(x.shape) if x is not None and _has_gradient(x) else _placeholder(q) for x in inputs)


# --------------------------------------------------------------------------
# Autograd: the forward operator's derivative is the backward operator
# --------------------------------------------------------------------------

_TENSOR_INPUTS = ("q", "k", "v", "mask", "bias", "kv_lengths") + _WEIGHTS + _MODIFIERS
_SCALAR_INPUTS = ("method", "scale", "causal", "causal_align", "window_left", "window_right", "windowed",
                  "softcap")


def _setup_context(ctx: Any, inputs: Tuple[Any, ...], output: Tuple[torch.Tensor, torch.Tensor]) -> None:
    out, lse = output
    ctx.save_for_backward(*inputs[:len(_TENSOR_INPUTS)], out, lse)
    ctx.scalars = inputs[len(_TENSOR_INPUTS):]
    ctx.mark_non_differentiable(lse)


def _gradients(ctx: Any, dout: torch.Tensor, backward: Callable[..., Tuple[torch.Tensor, ...]]
               ) -> Tuple[Optional[torch.Tensor], ...]:
    """The gradients of the forward's inputs (None for the non-differentiable ones), by ``backward``: the
    backward operator, or its implementation in eager mode. lse has no gradient: it is marked
    non-differentiable, so autograd hands backward zeros or None for it, never a real one."""
    *tensors, out, lse = ctx.saved_tensors
    q, k, v, mask, bias, kv_lengths, *rest = tensors
    weights, (alibi_slopes, sinks) = rest[:len(_WEIGHTS)], rest[len(_WEIGHTS):]
    dq, dk, dv, dbias, *dweights, dsinks = backward(dout, q, k, v, out, lse, mask, bias, kv_lengths, *weights,
                                                    alibi_slopes, sinks, *ctx.scalars)
    def grad(g: torch.Tensor, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return g if _has_gradient(x) else None

    return (grad(dq, q), grad(dk, k), grad(dv, v), None, grad(dbias, bias), None,
            *(grad(g, x) for g, x in zip(dweights, weights)), None, grad(dsinks, sinks),
            *([None] * len(_SCALAR_INPUTS)))


def _backward(ctx: Any, dout: torch.Tensor, dlse: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    return _gradients(ctx, dout, _attention_backward_op)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# What the eager route takes: tensors and parameters, not subclasses that dispatch on their own (fake,
# functional or user tensor subclasses), which go through the operators.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


class _EagerAttention(torch.autograd.Function):
    """The operators' autograd formula as an autograd.Function, for eager calls on plain tensors.

    Both run the same forward and backward implementations; going through the custom operator's
    autograd costs a Python dispatch per call, as much as a whole small attention, so eager calls skip
    it. Traced calls (torch.compile, export) and tensor subclasses (fake
    and functional tensors) always use the operators.
    """

    # forward(ctx, ...) rather than a separate setup_context: apply then skips binding the arguments to
    # the signature (inspect.signature), a third of this class's own cost per call.
    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        output = _attention_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor, dlse: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
        if torch.is_grad_enabled():
            # create_graph=True: the gradients would silently lack their dependence on q, k, v (torch's
            # once_differentiable only notices one through dout).
            raise NotImplementedError(
                "attnfast.torch.attention has no second derivative: its backward pass is not itself "
                "differentiable, so torch.autograd.grad(..., create_graph=True) through it is not supported."
            )
        return _gradients(ctx, dout, _attention_backward_impl)


# --------------------------------------------------------------------------
# The public function
# --------------------------------------------------------------------------


@overload
def attention(
    q: TensorLike, k: TensorLike, v: TensorLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[TensorLike] = None, bias: Optional[TensorLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[TensorLike] = None,
    return_lse: Literal[False] = False, w: Optional[TensorLike] = None, w_q: Optional[TensorLike] = None,
    w_k: Optional[TensorLike] = None, v_a: Optional[TensorLike] = None, score_bias: Optional[TensorLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[TensorLike] = None, sinks: Optional[TensorLike] = None,
) -> torch.Tensor: ...


@overload
def attention(
    q: TensorLike, k: TensorLike, v: TensorLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[TensorLike] = None, bias: Optional[TensorLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[TensorLike] = None,
    return_lse: Literal[True], w: Optional[TensorLike] = None, w_q: Optional[TensorLike] = None,
    w_k: Optional[TensorLike] = None, v_a: Optional[TensorLike] = None, score_bias: Optional[TensorLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[TensorLike] = None, sinks: Optional[TensorLike] = None,
) -> Tuple[torch.Tensor, torch.Tensor]: ...


@overload
def attention(
    q: TensorLike, k: TensorLike, v: TensorLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[TensorLike] = None, bias: Optional[TensorLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[TensorLike] = None,
    return_lse: bool = False, w: Optional[TensorLike] = None, w_q: Optional[TensorLike] = None,
    w_k: Optional[TensorLike] = None, v_a: Optional[TensorLike] = None, score_bias: Optional[TensorLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[TensorLike] = None, sinks: Optional[TensorLike] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]: ...


def attention(
    q: TensorLike, k: TensorLike, v: TensorLike, *, method: Method = "scaled_dot", scale: Optional[Real] = None,
    mask: Optional[TensorLike] = None, bias: Optional[TensorLike] = None, causal: bool = False,
    causal_align: CausalAlign = "top_left", window: Window = None, kv_lengths: Optional[TensorLike] = None,
    return_lse: bool = False, w: Optional[TensorLike] = None, w_q: Optional[TensorLike] = None,
    w_k: Optional[TensorLike] = None, v_a: Optional[TensorLike] = None, score_bias: Optional[TensorLike] = None,
    softcap: Optional[Real] = None, alibi_slopes: Optional[TensorLike] = None, sinks: Optional[TensorLike] = None,
    **unexpected: Any,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Fused attention on CPU tensors, differentiable (attnfast's fused forward and backward).

    The arguments and results are those of :func:`attnfast.attention` as ``torch.Tensor`` objects on the
    CPU; arrays and Python numbers are accepted for the tensor arguments too. Nothing is copied: tensors,
    strided ones included, are read through ``tensor.numpy()`` (bfloat16 through an int16 view) and the
    results wrap NumPy's arrays with ``torch.from_numpy``.

    Parameters
    ----------
    q : torch.Tensor, (..., Lq, D)
        Queries: float64, float32, float16 or bfloat16, on the CPU. Leading axes broadcast; axis -3 is
        the head axis.
    k : torch.Tensor, (..., Lk, Dk)
        Keys, the same dtypes; the kv heads may divide the query heads (GQA/MQA).
    v : torch.Tensor, (..., Lk, Dv)
        Values.
    method : {"scaled_dot", "dot", "general", "concat", "additive"}, default "scaled_dot"
        The score rule, as in :func:`attnfast.attention`.
    scale : float, optional
        Multiplies every method's score; default 1/sqrt(D) for "scaled_dot", 1 otherwise.
    mask : torch.Tensor of bool, optional
        Broadcastable to (..., Lq, Lk); True = attend. Not differentiable.
    bias : torch.Tensor, optional
        Broadcastable to (..., Lq, Lk), added to the scores; differentiable.
    causal : bool, default False
        Key j visible to query i only when j <= diag_i.
    causal_align : {"top_left", "bottom_right"}, default "top_left"
        The diagonal of causal, window and ALiBi, as in :func:`attnfast.attention` (with kv_lengths,
        bottom_right aligns each item to its own length).
    window : tuple of (int or None, int or None), optional
        (left, right) around the aligned diagonal; None for an unbounded side.
    kv_lengths : torch.Tensor of int, optional
        Broadcastable to the batch shape; item b sees its first kv_lengths[b] keys. Not differentiable.
    w : torch.Tensor, (D, Dk), optional
        The weight of "general"; differentiable.
    w_q, w_k : torch.Tensor, optional
        "concat": (D,) and (Dk,); "additive": (A, D) and (A, Dk), or None for inputs already projected.
        Differentiable.
    v_a : torch.Tensor, (A,), optional
        The output weights of "additive" (default ones); differentiable.
    score_bias : torch.Tensor, optional
        "concat": a scalar; "additive": (A,); differentiable.
    softcap : float, optional
        A cap c > 0: s <- c * tanh(s / c).
    alibi_slopes : torch.Tensor, optional
        One slope per query head, broadcastable to the batch shape; not differentiable.
    sinks : torch.Tensor, optional
        One logit per query head, broadcastable to the batch shape, joining each row's denominator;
        differentiable.
    return_lse : bool, default False
        Also return the log-sum-exp (..., Lq) (float32 for a 16-bit result); it is not differentiable.
    **unexpected
        No other keyword argument is accepted (``return_weights``, ``out`` and the paged / int8 cache
        arguments are NumPy-only): TypeError, naming attnfast's equivalent of a PyTorch name
        (``is_causal``, ``attn_mask``...) where there is one.

    Returns
    -------
    out : torch.Tensor, (..., Lq, Dv)
        In the promoted dtype of q, k, v; gradients flow to q, k, v, bias, the method weights and sinks
        through :func:`attnfast.attention_backward` (broadcast inputs and shared kv heads get theirs
        summed).
    lse : torch.Tensor, (..., Lq)
        Only with ``return_lse=True``.

    Raises
    ------
    TypeError
        A tensor on another device, a sparse tensor, a mask that requires grad, a dtype
        attnfast does not compute with, a non-bool flag (and attnfast.attention's TypeErrors).
    ValueError
        attnfast.attention's ValueErrors (shapes, methods, windows, lengths); under ``torch.compile`` they
        are raised at trace time, wrapped in Dynamo's ``TorchRuntimeError``.
    NotImplementedError
        Under ``torch.func`` transforms (grad, vmap): their wrapped tensors have no memory NumPy can view.

    See Also
    --------
    attnfast.attention, attnfast.attention_backward

    Notes
    -----
    The numerics are attnfast.attention's (float32 computation, float64 for float64 inputs, one rounding
    into a 16-bit result). The work is two ``torch.library.custom_op`` operators, ``attnfast::attention``
    and ``attnfast::attention_backward``, with fake implementations and ``register_autograd``, so the
    function also runs under ``torch.compile(fullgraph=True)``; eager calls on plain tensors run the same
    implementations through an ``autograd.Function``. ``return_weights``, ``out=``, paged and int8 caches
    are NumPy-only, and there is no second derivative.

    Examples
    --------
    >>> import torch
    >>> import attnfast.torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    >>> k = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    >>> v = torch.randn(2, 4, 8, 16, generator=g, requires_grad=True)
    >>> out = attnfast.torch.attention(q, k, v, causal=True)
    >>> expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool(torch.allclose(out, expected, atol=1e-5))
    True
    >>> out.sum().backward()
    >>> q.grad.shape, k.grad.shape
    (torch.Size([2, 4, 8, 16]), torch.Size([2, 4, 8, 16]))
    """
    if unexpected:
        _inputs.reject_unexpected(attention, unexpected, "attnfast.torch.attention")
    q, k, v = (_tensor_argument(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    mask = _tensor_argument("mask", mask)
    bias = _tensor_argument("bias", bias)
    kv_lengths = _tensor_argument("kv_lengths", kv_lengths)
    weights = tuple(_tensor_argument(name, x) for name, x in zip(_WEIGHTS, (w, w_q, w_k, v_a, score_bias)))
    modifiers = tuple(_tensor_argument(name, x) for name, x in zip(_MODIFIERS, (alibi_slopes, sinks)))
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False; got {return_lse!r} of type {type(return_lse).__name__}.")
    # The scalars the operators' schema types; everything else is validated by attnfast.attention itself
    # (eager) or by the fake implementation on the traced shapes (torch.compile), with attnfast's errors.
    method = _inputs._check_method(method)
    causal = _inputs._check_bool_flag("causal", causal)
    if not isinstance(causal_align, str):
        raise ValueError(f"unknown causal_align {causal_align!r}; valid values are 'top_left', 'bottom_right'.")
    inputs = (q, k, v, mask, bias, kv_lengths, *weights, *modifiers, method, _scale(scale), causal, causal_align,
              *_window_sides(window), _softcap(softcap))
    if torch.compiler.is_compiling() or not all(x is None or type(x) in _PLAIN_TENSORS
                                                for x in inputs[:len(_TENSOR_INPUTS)]):
        out, lse = _attention_op(*inputs)
    elif torch._C._are_functorch_transforms_active():
        # Neither the custom operator's autograd nor an autograd.Function over NumPy can run on
        # torch.func's wrapped tensors (they have no storage to view).
        raise NotImplementedError(
            "attnfast.torch.attention does not support torch.func transforms (grad, vjp, jacrev, vmap); "
            "use torch.autograd.grad or .backward(), and a batch axis instead of vmap."
        )
    else:
        out, lse = _EagerAttention.apply(*inputs)
    return (out, lse) if return_lse else out
