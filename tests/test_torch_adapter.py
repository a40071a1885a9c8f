"""attnfast.torch: the PyTorch adapter (custom operators, autograd, torch.compile, zero-copy).

The adapter computes nothing itself: its forward is attnfast.attention and its backward
attnfast.attention_backward on the tensors' memory, so results are compared bitwise with those calls;
torch.autograd.gradcheck (finite differences in float64) checks that the gradients are the derivative
of the forward, for every score method and mask kind.
"""

import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attnfast  # noqa: E402
import attnfast.torch as at  # noqa: E402

PYTHON_DIR = os.path.dirname(os.path.dirname(attnfast.__file__))
DIFFERENTIABLE = ("q", "k", "v", "bias", "w", "w_q", "w_k", "v_a", "score_bias")
GRAD_FIELDS = {"q": "dq", "k": "dk", "v": "dv", "bias": "dbias", "w": "dw", "w_q": "dw_q", "w_k": "dw_k",
               "v_a": "dv_a", "score_bias": "dscore_bias"}


def _array(t):
    """The tensor's memory as an ndarray (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _tensor(a, requires_grad=False):
    a = np.array(a, order="C")
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == ml_dtypes.bfloat16 \
        else torch.from_numpy(a)
    return t.requires_grad_(requires_grad)


def _weights(rng, method, d, hidden=3, dtype=np.float64):
    """Method weights as float64 tensors that require grad (score_bias of concat is a 0-d tensor)."""
    if method == "general":
        kw = {"w": rng.standard_normal((d, d)) / np.sqrt(d)}
    elif method == "concat":
        kw = {"w_q": rng.standard_normal(d), "w_k": rng.standard_normal(d), "score_bias": np.array(0.25)}
    elif method == "additive":
        kw = {"w_q": rng.standard_normal((hidden, d)), "w_k": rng.standard_normal((hidden, d)),
              "score_bias": rng.standard_normal(hidden), "v_a": rng.standard_normal(hidden)}
    else:
        kw = {}
    return {name: _tensor(x.astype(dtype), requires_grad=True) for name, x in kw.items()}


def _qkv(rng, batch, lq, lk, d, dv, kv_batch=None, dtype=np.float64, requires_grad=True):
    kv_batch = batch if kv_batch is None else kv_batch
    q = rng.standard_normal(batch + (lq, d)).astype(dtype)
    k = rng.standard_normal(kv_batch + (lk, d)).astype(dtype)
    v = rng.standard_normal(kv_batch + (lk, dv)).astype(dtype)
    return tuple(_tensor(x, requires_grad) for x in (q, k, v))


def _gradcheck(q, k, v, **kwargs):
    """torch.autograd.gradcheck of attention over q, k, v and every kwarg tensor that requires grad."""
    names = ["q", "k", "v"] + [n for n, x in kwargs.items() if isinstance(x, torch.Tensor) and x.requires_grad]
    inputs = {"q": q, "k": k, "v": v, **kwargs}
    fixed = {n: x for n, x in kwargs.items() if n not in names}

    def f(*tensors):
        return at.attention(**dict(zip(names, tensors)), **fixed)

    assert torch.autograd.gradcheck(f, tuple(inputs[n] for n in names), eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------
# gradcheck: the gradients are the derivative of the forward (float64, finite differences)
# --------------------------------------------------------------------------

METHODS = ["dot", "scaled_dot", "general", "concat", "additive"]


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_every_method(rng, method):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    _gradcheck(q, k, v, method=method, **_weights(rng, method, 3))


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_bias_mask_causal_gqa(rng, method):
    # 4 query heads over 2 kv heads (GQA), a broadcast (Lq, Lk) bias, a per-head mask, causal bottom-right
    # with Lq < Lk; the mask hides every key of one row (its gradients are 0).
    q, k, v = _qkv(rng, (1, 4), 3, 5, 3, 2, kv_batch=(1, 2))
    bias = _tensor(rng.standard_normal((3, 5)), requires_grad=True)
    mask = torch.from_numpy(rng.random((4, 3, 5)) < 0.8)
    mask[1, 0] = False
    _gradcheck(q, k, v, bias=bias, mask=mask, causal=True, causal_align="bottom_right", method=method,
               **_weights(rng, method, 3))


def test_gradcheck_window_kv_lengths_and_mqa(rng):
    q, k, v = _qkv(rng, (3, 2), 4, 6, 3, 3, kv_batch=(3, 1))
    kv_lengths = torch.tensor([6, 2, 0])  # 0: every row of item 2 sees nothing
    _gradcheck(q, k, v, window=(1, None), kv_lengths=kv_lengths[:, None], causal=True)


@pytest.mark.parametrize("method", ["concat", "additive"])
def test_gradcheck_additive_and_concat_scale(rng, method):
    q, k, v = _qkv(rng, (2,), 2, 3, 4, 2)
    _gradcheck(q, k, v, method=method, scale=0.7, **_weights(rng, method, 4))


def test_gradcheck_additive_preprojected(rng):
    # w_q=None / w_k=None: q and k are already projected (hidden size = D); v_a and b still get gradients.
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    b = _tensor(rng.standard_normal(3), requires_grad=True)
    v_a = _tensor(rng.standard_normal(3), requires_grad=True)
    _gradcheck(q, k, v, method="additive", score_bias=b, v_a=v_a)


def test_gradcheck_self_attention_one_tensor(rng):
    # q, k and v the same tensor: autograd adds the three gradients.
    x = _tensor(rng.standard_normal((2, 4, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: at.attention(x, x, x, causal=True), (x,), eps=1e-6, atol=1e-7)


def test_gradcheck_broadcast_batch_and_strided_inputs(rng):
    # q broadcast over a leading axis of k/v; k a transposed view, v a strided slice: non-contiguous
    # tensors are read in place and their gradients come back in their shapes.
    q = _tensor(rng.standard_normal((1, 3, 3)), requires_grad=True)
    k = _tensor(rng.standard_normal((2, 3, 4)), requires_grad=True).transpose(-1, -2)
    v = _tensor(rng.standard_normal((2, 4, 4)), requires_grad=True)[..., ::2]
    assert not k.is_contiguous() and not v.is_contiguous()
    _gradcheck(q, k, v)


# --------------------------------------------------------------------------
# The adapter is attnfast.attention / attention_backward on the same memory (bitwise)
# --------------------------------------------------------------------------


def _grads_of(out, inputs, seed=1):
    dout = torch.from_numpy(np.random.default_rng(seed).standard_normal(out.shape)).to(out.dtype)
    names = [n for n, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(out, [inputs[n] for n in names], dout)
    return dout, dict(zip(names, grads))


def _expected(q, k, v, dout, **kwargs):
    arrays = {n: (_array(x) if isinstance(x, torch.Tensor) else x) for n, x in kwargs.items()}
    out, lse = attnfast.attention(_array(q), _array(k), _array(v), return_lse=True, **arrays)
    grads = attnfast.attention_backward(_array(dout), _array(q), _array(k), _array(v), out, lse, **arrays)
    return out, lse, grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_and_gradients_are_attnfasts(rng, method, dtype):
    q, k, v = _qkv(rng, (2, 4), 17, 33, 8, 5, kv_batch=(2, 2), dtype=dtype)
    kwargs = dict(method=method, bias=_tensor(rng.standard_normal((17, 33)).astype(dtype), True),
                  mask=torch.from_numpy(rng.random((2, 1, 17, 33)) < 0.9), causal=True,
                  causal_align="bottom_right", **_weights(rng, method, 8, hidden=6, dtype=dtype))
    out, lse = at.attention(q, k, v, return_lse=True, **kwargs)
    dout, grads = _grads_of(out, {"q": q, "k": k, "v": v, **kwargs})
    e_out, e_lse, e_grads = _expected(q, k, v, dout, **kwargs)
    assert out.dtype == q.dtype and lse.dtype == q.dtype
    np.testing.assert_array_equal(out.detach().numpy(), e_out)
    np.testing.assert_array_equal(lse.numpy(), e_lse)
    assert set(grads) == {"q", "k", "v", "bias"} | set(_weights(rng, method, 8))
    for name, g in grads.items():
        expected = getattr(e_grads, GRAD_FIELDS[name])
        assert g.shape == kwargs.get(name, {"q": q, "k": k, "v": v}.get(name)).shape
        np.testing.assert_array_equal(g.numpy(), expected, err_msg=name)


def test_lse_is_returned_and_not_differentiable(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    out, lse = at.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


def test_only_the_inputs_that_require_grad_get_gradients(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2, requires_grad=False)
    k.requires_grad_(True)
    bias = _tensor(rng.standard_normal((3, 4)))  # given, but not requiring grad
    at.attention(q, k, v, bias=bias).sum().backward()
    assert q.grad is None and v.grad is None and bias.grad is None
    assert k.grad is not None and k.grad.shape == k.shape


def test_no_grad_forward_builds_no_graph(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    with torch.no_grad():
        out = at.attention(q, k, v)
    assert not out.requires_grad and out.grad_fn is None


# --------------------------------------------------------------------------
# 16-bit tensors
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_tensors(rng, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in _qkv(rng, (2, 2), 9, 13, 16, 8))
    out, lse = at.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    dout, grads = _grads_of(out, {"q": q, "k": k, "v": v})
    e_out, e_lse, e_grads = _expected(q, k, v, dout, causal=True)
    np.testing.assert_array_equal(_array(out).view(np.int16), e_out.view(np.int16))
    np.testing.assert_array_equal(lse.numpy(), e_lse)
    for name, g in grads.items():
        assert g.dtype == dtype
        expected = getattr(e_grads, GRAD_FIELDS[name])
        np.testing.assert_array_equal(_array(g).view(np.int16), np.asarray(expected).view(np.int16), err_msg=name)


def test_float32_queries_over_a_bfloat16_cache(rng):
    # Mixed storage as attnfast promotes it: a float32 q over a bfloat16 k/v gives a float32 result, and
    # the gradients keep each input's dtype.
    q, k, v = _qkv(rng, (2,), 3, 5, 4, 4, dtype=np.float32)
    k, v = (x.detach().to(torch.bfloat16).requires_grad_(True) for x in (k, v))
    out = at.attention(q, k, v)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.bfloat16 and v.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------
# Zero-copy, both ways
# --------------------------------------------------------------------------


@pytest.fixture
def seen(monkeypatch):
    """Record the arrays attnfast.attention / attention_backward receive and return inside the adapter."""
    record = {}
    forward, backward = attnfast.attention, attnfast.attention_backward

    def attention(q, k, v, **kwargs):
        result = forward(q, k, v, **kwargs)
        record["forward"] = ((q, k, v), kwargs, result)
        return result

    def attention_backward(dout, q, k, v, out, lse, **kwargs):
        result = backward(dout, q, k, v, out, lse, **kwargs)
        record["backward"] = ((dout, q, k, v, out, lse), kwargs, result)
        return result

    monkeypatch.setattr(attnfast, "attention", attention)
    monkeypatch.setattr(attnfast, "attention_backward", attention_backward)
    return record


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_zero_copy_both_ways(rng, seen, dtype):
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in _qkv(rng, (2, 2), 5, 7, 8, 8))
    # A transposed k and a sliced v: strided tensors are read in place too.
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    v_s = torch.cat([v, v], dim=-1)[..., ::2]
    bias = _tensor(rng.standard_normal((5, 7)).astype(np.float32))
    out = at.attention(q, k_t, v_s, bias=bias)
    (aq, ak, av), kwargs, (a_out, a_lse) = seen["forward"]
    for tensor, array in ((q, aq), (k_t, ak), (v_s, av), (bias, kwargs["bias"])):
        assert array.ctypes.data == tensor.data_ptr() and array.strides == tuple(
            s * tensor.element_size() for s in tensor.stride())
    assert _array(out).ctypes.data == a_out.ctypes.data, "the output tensor wraps the result array"
    out.backward(torch.ones_like(out))
    (a_dout, *_, b_out, b_lse), _, grads = seen["backward"]
    assert b_out.ctypes.data == a_out.ctypes.data and b_lse.ctypes.data == a_lse.ctypes.data
    assert q.grad.data_ptr() == np.asarray(grads.dq).ctypes.data, "the gradient wraps the result array"


# --------------------------------------------------------------------------
# torch.compile(fullgraph=True) and the operators' registration
# --------------------------------------------------------------------------


def test_opcheck_forward_and_backward_operators(rng):
    q, k, v = _qkv(rng, (1, 2), 3, 4, 3, 2, kv_batch=(1, 1))
    bias = _tensor(rng.standard_normal((3, 4)), True)
    mask = torch.from_numpy(rng.random((3, 4)) < 0.8)
    scalars = ("scaled_dot", None, True, "bottom_right", 2, None, True, 1.5)  # the last: softcap
    sinks = _tensor(rng.standard_normal(2), True)
    forward = (q, k, v, mask, bias, None, None, None, None, None, None, None, sinks) + scalars
    torch.library.opcheck(torch.ops.attnfast.attention.default, forward)
    out, lse = torch.ops.attnfast.attention(*forward)
    backward = (torch.ones_like(out), q, k, v, out.detach(), lse, mask, bias, None, None, None, None, None, None,
                None, sinks)
    torch.library.opcheck(torch.ops.attnfast.attention_backward.default, backward + scalars,
                          test_utils=("test_schema", "test_faketensor"))


# Inductor's first compile in a process imports modules of torch's own that raise DeprecationWarnings.
COMPILE_WARNINGS = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")


def test_the_operators_autograd_matches_the_eager_path(rng):
    # Eager calls on plain tensors run an autograd.Function over the same implementations (cheaper than the
    # operator's own autograd dispatch); the registered operator autograd must give the same bits.
    q, k, v = _qkv(rng, (2, 2), 5, 6, 4, 3, kv_batch=(2, 1), dtype=np.float32)
    bias = _tensor(rng.standard_normal((5, 6)).astype(np.float32), True)
    w = _tensor(rng.standard_normal((4, 4)).astype(np.float32), True)
    scalars = ("general", 0.5, True, "bottom_right", None, 1, True, None)
    out, lse = torch.ops.attnfast.attention(q, k, v, None, bias, None, w, None, None, None, None, None, None,
                                            *scalars)
    assert not lse.requires_grad
    _, op_grads = _grads_of(out, {"q": q, "k": k, "v": v, "bias": bias, "w": w})
    eager = at.attention(q, k, v, bias=bias, w=w, method="general", scale=0.5, causal=True,
                         causal_align="bottom_right", window=(None, 1))
    assert eager.grad_fn is not None and "Eager" in type(eager.grad_fn).__name__
    np.testing.assert_array_equal(eager.detach().numpy(), out.detach().numpy())
    _, eager_grads = _grads_of(eager, {"q": q, "k": k, "v": v, "bias": bias, "w": w})
    for name in op_grads:
        np.testing.assert_array_equal(op_grads[name].numpy(), eager_grads[name].numpy(), err_msg=name)


def test_parameters_and_inference_mode(rng):
    # nn.Parameter weights (a model's) take the eager route and get their .grad; inference-mode tensors work.
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2, dtype=np.float32, requires_grad=False)
    w = torch.nn.Parameter(torch.from_numpy(rng.standard_normal((3, 3)).astype(np.float32)))
    out = at.attention(q, k, v, method="general", w=w)
    assert "Eager" in type(out.grad_fn).__name__
    out.sum().backward()
    assert w.grad is not None and w.grad.shape == (3, 3)
    with torch.inference_mode():
        np.testing.assert_array_equal(at.attention(q, k, v, method="general", w=w).numpy(), out.detach().numpy())


@COMPILE_WARNINGS
def test_torch_compile_fullgraph_forward_and_backward(rng):
    # One compiled function covers the forward and the backward graph (compiling takes seconds).
    torch._dynamo.reset()
    q, k, v = _qkv(rng, (2, 4), 6, 9, 5, 3, kv_batch=(2, 2), dtype=np.float32)
    bias = _tensor(rng.standard_normal((6, 9)).astype(np.float32), True)
    w = _tensor(rng.standard_normal((5, 5)).astype(np.float32), True)

    # Around the operator only exact operations (a transpose, a sign flip), so that the compiled graph must
    # reproduce the eager results bit for bit.
    def f(q, k, v, bias, w):
        out = at.attention(q, k, v, method="general", w=w, bias=bias, causal=True, window=(3, None))
        return -out.transpose(-1, -2)

    compiled = torch.compile(f, fullgraph=True)
    inputs = (q, k, v, bias, w)
    got = compiled(*inputs)
    dout = torch.from_numpy(rng.standard_normal(got.shape).astype(np.float32))
    got_grads = torch.autograd.grad(got, inputs, dout)
    want = f(*inputs)
    want_grads = torch.autograd.grad(want, inputs, dout)
    np.testing.assert_array_equal(got.detach().numpy(), want.detach().numpy())
    for g, e in zip(got_grads, want_grads):
        np.testing.assert_array_equal(g.numpy(), e.numpy())


@COMPILE_WARNINGS
def test_torch_compile_dynamic_shapes(rng):
    # dynamic=True: the fake implementations see symbolic lengths (they specialise on them, as attnfast's
    # validation reads concrete shapes), and each new length gives the eager result.
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: at.attention(q, k, v, causal=True, window=(2, None)), fullgraph=True,
                             dynamic=True, backend="aot_eager")
    for lq in (3, 5, 8):
        q, k, v = _qkv(rng, (2,), lq, lq + 1, 4, 3, dtype=np.float32)
        got = compiled(q, k, v)
        got.backward(torch.ones_like(got))
        want = at.attention(q.detach(), k.detach(), v.detach(), causal=True, window=(2, None))
        np.testing.assert_array_equal(got.detach().numpy(), want.numpy())
        assert q.grad.shape == q.shape and v.grad.shape == v.shape


@COMPILE_WARNINGS
def test_torch_compile_sixteen_bit_dtypes(rng):
    # The fake implementation's result dtypes follow attnfast's promotion: bfloat16 with float16 gives a
    # float32 result (and lse), and each gradient keeps its input's dtype.
    torch._dynamo.reset()
    q, k, v = (x.detach().to(dtype).requires_grad_(True) for x, dtype in
               zip(_qkv(rng, (2,), 3, 5, 8, 8), (torch.bfloat16, torch.bfloat16, torch.float16)))
    compiled = torch.compile(lambda q, k, v: at.attention(q, k, v, return_lse=True), fullgraph=True,
                             backend="aot_eager")
    out, lse = compiled(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    out.backward(torch.ones_like(out))
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.bfloat16, torch.bfloat16, torch.float16)
    want, want_lse = at.attention(q.detach(), k.detach(), v.detach(), return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@COMPILE_WARNINGS
def test_torch_compile_reports_attnfasts_error_at_trace_time(rng):
    torch._dynamo.reset()
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    compiled = torch.compile(lambda q, k, v: at.attention(q, k, v[:, :2]), fullgraph=True, backend="aot_eager")
    # Dynamo wraps the fake implementation's ValueError (raised while tracing) in its own RuntimeError.
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=r"k and v must have the same number of keys Lk"):
        compiled(q, k, v)


# --------------------------------------------------------------------------
# Errors: attnfast's own, plus the tensor-specific ones
# --------------------------------------------------------------------------


def test_validation_errors_are_attnfasts(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    with pytest.raises(ValueError, match=r"k and v must have the same number of keys Lk \(axis -2\); got k "
                                         r"shape \(2, 4, 3\) and v shape \(2, 2, 2\)"):
        at.attention(q, k, v[:, :2])
    with pytest.raises(ValueError, match=r"mask has shape \(5,\), which does not broadcast to the score shape batch_shape \+ \(Lq, Lk\) \(2, 3, 4\)"):
        at.attention(q, k, v, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a boolean array \(True = attend\); got dtype float32"):
        at.attention(q, k, v, mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match=r"window must be a pair \(left, right\) of non-negative ints or None; "
                                        r"got 5"):
        at.attention(q, k, v, window=5)
    with pytest.raises(ValueError, match=r"window left must be >= 0"):
        at.attention(q, k, v, window=(-1, 0))
    with pytest.raises(ValueError, match=r"unknown method 'bahdanau'"):
        at.attention(q, k, v, method="bahdanau")
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk\] = \[0, 4\]; got 5"):
        at.attention(q, k, v, kv_lengths=torch.tensor([5, 1]))
    with pytest.raises(TypeError, match=r"causal must be True or False; got 'yes'"):
        at.attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match=r"scale must be a real number \(a Python float\); got '0.5'"):
        at.attention(q, k, v, scale="0.5")
    with pytest.raises(ValueError, match=r"unknown causal_align 1; valid values are 'top_left', 'bottom_right'"):
        at.attention(q, k, v, causal_align=1)
    with pytest.raises(ValueError, match=r"scale must be finite; got nan"):
        at.attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match=r"method='general' requires w of shape \(D, Dk\) = \(3, 3\); got None"):
        at.attention(q, k, v, method="general")


def test_tensor_errors(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    with pytest.raises(TypeError, match=r"q is a tensor on device meta; attnfast.torch runs on CPU tensors\. "
                                        r"Pass q.cpu\(\)"):
        at.attention(torch.empty(2, 3, 3, device="meta"), k, v)
    with pytest.raises(TypeError, match=r"k has dtype torch.int64; attnfast.torch takes q, k and v as tensors "
                                        r"of dtype torch.float64, torch.float32, torch.float16 or "
                                        r"torch.bfloat16\. Convert it with k.float\(\)"):
        at.attention(q, torch.ones(2, 4, 3, dtype=torch.int64), v)
    with pytest.raises(TypeError, match=r"v has dtype torch.complex64"):
        at.attention(q, k, torch.ones(2, 4, 2, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"bias has dtype torch.float8_e4m3fn, which attnfast does not read"):
        at.attention(q, k, v, bias=torch.zeros(3, 4).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match=r"q is a tensor with layout torch.sparse_coo; attnfast.torch takes "
                                        r"dense \(strided\) tensors"):
        at.attention(q.detach().to_sparse(), k, v)
    with pytest.raises(TypeError, match=r"mask requires grad, but attnfast.attention is not differentiable with "
                                        r"respect to it \(only q, k, v, bias, the method weights and sinks are\)\. "
                                        r"Pass mask.detach\(\)"):
        at.attention(q, k, v, mask=torch.ones(3, 4, requires_grad=True))
    with pytest.raises(TypeError, match=r"kv_lengths requires grad"):
        at.attention(q, k, v, kv_lengths=torch.ones(2, requires_grad=True))
    with pytest.raises(TypeError, match=r"return_lse must be True or False; got 1"):
        at.attention(q, k, v, return_lse=1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'return_weights'"):
        at.attention(q, k, v, return_weights=True)


def test_torch_func_transforms_are_refused(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2, requires_grad=False)
    with pytest.raises(NotImplementedError, match=r"attnfast.torch.attention does not support torch.func "
                                                  r"transforms \(grad, vjp, jacrev, vmap\); use torch.autograd.grad"):
        torch.func.grad(lambda q: at.attention(q, k, v).sum())(q)


def test_second_derivatives_are_refused(rng):
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    with pytest.raises(NotImplementedError, match=r"attnfast.torch.attention has no second derivative"):
        torch.autograd.grad(at.attention(q, k, v).sum(), q, create_graph=True)


def test_array_like_arguments_are_accepted(rng):
    # Masks, lengths and Python numbers need not be tensors; a Python float stays float64, as attnfast reads it.
    q, k, v = _qkv(rng, (2,), 3, 4, 3, 2)
    mask = rng.random((3, 4)) < 0.7
    assert at.attention(q, k, v, kv_lengths=np.array([4, 2], np.uint64)).shape == (2, 3, 2)
    with pytest.raises(ValueError, match=r"mask could not be converted to a NumPy array"):
        at.attention(q, k, v, mask=[[True, False], [True]])
    out = at.attention(q, k, v, mask=mask, kv_lengths=[4, 2], method="concat", w_q=np.ones(3), w_k=np.ones(3),
                       score_bias=0.1)
    expected = attnfast.attention(_array(q), _array(k), _array(v), mask=mask, kv_lengths=[4, 2], method="concat",
                                  w_q=np.ones(3), w_k=np.ones(3), score_bias=0.1)
    np.testing.assert_array_equal(out.detach().numpy(), expected)


# --------------------------------------------------------------------------
# Imports: torch stays optional, and attnfast.torch does not shadow torch
# --------------------------------------------------------------------------


def _run(code):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=PYTHON_DIR)


def test_import_attnfast_does_not_import_torch():
    _run("import attnfast, sys; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")


def test_attnfast_torch_does_not_shadow_torch():
    _run("import attnfast.torch, torch, sys; import attnfast; "
         "assert torch.__file__ != attnfast.torch.__file__ and hasattr(torch, 'library'); "
         "assert attnfast.torch.attention is not None and sys.modules['torch'] is torch; "
         "print(torch.ones(2).sum())")
