"""attnfast.jax.attention: the fused kernels as a JAX custom_vjp.

Gradients are checked three ways: against attnfast.reference.attention_backward (float64, the
explicit formulas), against JAX's own autodiff of a pure-jnp attention formula (an independent
derivation), and bitwise against attnfast.attention_backward called on the same NumPy arrays (the
adapter adds no arithmetic, only plumbing). jit, vmap (one batched kernel call), vmap of grad
(per-item gradients), 16-bit dtypes and the error messages are covered too.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import attnfast  # noqa: E402
import attnfast.jax as ajax  # noqa: E402
from attnfast import reference  # noqa: E402
from conftest import (  # noqa: E402
    BFLOAT16,
    FLOAT16,
    METHODS,
    assert_close_fixed,
    assert_close_to_reference,
    method_weights,
)

GRAD_FIELDS = {"q": "dq", "k": "dk", "v": "dv", "bias": "dbias", "w": "dw", "w_q": "dw_q", "w_k": "dw_k",
               "v_a": "dv_a", "score_bias": "dscore_bias"}


@pytest.fixture
def x64():
    """float64 in JAX for one test (off by default in JAX); the previous setting restored after it."""
    before = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------
# An independent formula: attention in jnp, differentiated by JAX itself
# --------------------------------------------------------------------------


def jnp_attention(q, k, v, *, method="scaled_dot", scale=None, mask=None, bias=None, causal=False,
                  causal_align="top_left", window=None, kv_lengths=None, w=None, w_q=None, w_k=None,
                  v_a=None, score_bias=None):
    """softmax(scores + bias over the visible keys) @ v, spelled out in jnp (GQA by repeating heads)."""
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] not in (1, q.shape[-3]):
        group = q.shape[-3] // k.shape[-3]
        k, v = jnp.repeat(k, group, axis=-3), jnp.repeat(v, group, axis=-3)
    if scale is None:
        scale = 1 / math.sqrt(d) if method == "scaled_dot" else 1.0
    kt = jnp.swapaxes(k, -1, -2)
    if method in ("dot", "scaled_dot"):
        s = (q * scale) @ kt
    elif method == "general":
        s = ((q @ w) * scale) @ kt
    elif method == "concat":
        s = ((q @ w_q)[..., :, None] + (k @ w_k)[..., None, :] + score_bias) * scale
    else:
        qp = q if w_q is None else q @ w_q.T
        kp = k if w_k is None else k @ w_k.T
        hidden = jnp.tanh(qp[..., :, None, :] + kp[..., None, :, :] + score_bias)
        s = scale * jnp.sum(hidden * (1 if v_a is None else v_a), axis=-1)
    if bias is not None:
        s = s + bias
    i, j = np.arange(lq)[:, None], np.arange(lk)[None, :]
    diag = i + (lk - lq if causal_align == "bottom_right" else 0)
    visible = np.ones((lq, lk), bool)
    if causal:
        visible &= j <= diag
    if window is not None:
        left, right = window
        visible &= (j >= diag - left) if left is not None else True
        visible &= (j <= diag + right) if right is not None else True
    visible = jnp.asarray(visible)
    if mask is not None:
        visible = visible & mask
    if kv_lengths is not None:
        visible = visible & (j < jnp.asarray(kv_lengths)[..., None, None])
    s = jnp.where(visible, s, -jnp.inf)
    top = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.where(visible, jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0)), 0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return (e / jnp.where(total == 0, 1, total)) @ v


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

D, DV = 3, 5  # odd feature sizes: no SIMD-width luck


def case(rng, kind, method, dtype):
    """(arrays to differentiate, fixed keyword arguments) for one masking configuration."""
    if kind == "bias+mask":
        q = rng.standard_normal((2, 3, 5, D))
        k = rng.standard_normal((2, 3, 7, D))
        v = rng.standard_normal((2, 3, 7, DV))
        mask = rng.random((3, 1, 7)) < 0.6
        mask[..., 0] = True
        fixed = {"mask": mask}
        extra = {"bias": rng.standard_normal((5, 7))}  # broadcast over batch and heads: dbias summed
    elif kind == "causal+gqa":
        q = rng.standard_normal((1, 4, 6, D))
        k = rng.standard_normal((1, 2, 9, D))
        v = rng.standard_normal((1, 2, 9, DV))
        fixed = {"causal": True, "causal_align": "bottom_right", "window": (4, None)}
        extra = {}
    else:  # kv_lengths with an empty row set, broadcast k/v (MQA over a shared batch)
        q = rng.standard_normal((3, 2, 4, D))
        k = rng.standard_normal((1, 1, 6, D))
        v = rng.standard_normal((1, 1, 6, DV))
        fixed = {"kv_lengths": np.array([[6], [0], [2]]), "causal": True}
        extra = {}
    params = {"q": q, "k": k, "v": v, **extra, **method_weights(rng, method, D, D, np.float64)}
    params = {name: np.asarray(x, dtype) for name, x in params.items()}
    return params, {"method": method, **fixed}


KINDS = ["bias+mask", "causal+gqa", "lengths"]


def loss_of(fn, cotangent, fixed):
    def loss(params):
        params = dict(params)
        out = fn(params.pop("q"), params.pop("k"), params.pop("v"), **params, **fixed)
        return jnp.sum(out * cotangent)
    return loss


def reference_grads(params, cotangent, fixed):
    """attnfast.reference.attention_backward, keyed like params."""
    args = dict(params)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    out, lse = reference.attention(q, k, v, return_lse=True, **args, **fixed)
    grads = reference.attention_backward(cotangent, q, k, v, out, lse, **args, **fixed)
    return {name: getattr(grads, GRAD_FIELDS[name]) for name in params}


def cotangent_for(rng, params, fixed, dtype):
    out = attnfast.attention(params["q"], params["k"], params["v"],
                             **{n: x for n, x in params.items() if n not in "qkv"}, **fixed)
    return rng.standard_normal(out.shape).astype(dtype)


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_grad_float64_matches_reference_and_jax_autodiff(rng, method, kind):
    params, fixed = case(rng, kind, method, np.float64)
    cotangent = cotangent_for(rng, params, fixed, np.float64)
    grads = jax.grad(loss_of(ajax.attention, cotangent, fixed))(params)
    autodiff = jax.jit(jax.grad(loss_of(jnp_attention, cotangent, fixed)))(params)
    expected = reference_grads(params, cotangent, fixed)
    assert set(grads) == set(params)
    for name in params:
        got = np.asarray(grads[name])
        assert got.dtype == np.float64 and got.shape == params[name].shape, name
        assert np.isfinite(got).all(), name
        scale = terms_scale(expected[name], params, cotangent)
        assert_close_fixed(got, expected[name], np.float64, scale=scale, what=f"d{name} vs reference")
        assert_close_fixed(got, np.asarray(autodiff[name]), np.float64, scale=scale,
                           what=f"d{name} vs jax autodiff")


@pytest.mark.parametrize("method", METHODS)
def test_grad_float32_within_twice_naive_error(rng, method):
    """float32 gradients against the float64 reference, held to the tolerance table with JAX's float32
    autodiff of the jnp formula as the naive same-precision computation."""
    params, fixed = case(rng, "bias+mask", method, np.float32)
    cotangent = cotangent_for(rng, params, fixed, np.float32)
    grads = jax.grad(loss_of(ajax.attention, cotangent, fixed))(params)
    naive = jax.jit(jax.grad(loss_of(jnp_attention, cotangent, fixed)))(params)
    expected = reference_grads({n: x.astype(np.float64) for n, x in params.items()},
                               cotangent.astype(np.float64), fixed)
    for name in params:
        assert_close_to_reference(np.asarray(grads[name]), expected[name], np.asarray(naive[name]), np.float32,
                                  scale=terms_scale(expected[name], params, cotangent), what=f"d{name}")


def terms_scale(expected, params, cotangent):
    """The size of the terms a gradient sums (the tolerance's scale, cancellation-proof): dS = P (dP -
    delta) has entries up to ~max|dout| max|v|, and some gradients cancel to ~0 (concat's dq is exactly
    0: a per-row score shift does not change the softmax)."""
    return max(float(np.max(np.abs(expected), initial=0.0)),
               float(np.max(np.abs(cotangent))) * float(np.max(np.abs(params["v"]))))


def direct_grads(params, cotangent, fixed):
    """attnfast.attention_backward on the NumPy arrays: what the adapter must reproduce bitwise."""
    args = dict(params)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    out, lse = attnfast.attention(q, k, v, return_lse=True, **args, **fixed)
    grads = attnfast.attention_backward(cotangent, q, k, v, out, lse, **args, **fixed)
    return out, {name: getattr(grads, GRAD_FIELDS[name]) for name in params}


def assert_same(actual, expected, what):
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert np.array_equal(actual.view(np.uint8), np.ascontiguousarray(expected).view(np.uint8)), what


@pytest.mark.parametrize("method", ["scaled_dot", "additive"])
def test_jit_of_grad_is_bitwise_the_direct_backward(rng, method):
    params, fixed = case(rng, "causal+gqa", method, np.float32)
    cotangent = cotangent_for(rng, params, fixed, np.float32)
    value_and_grad = jax.jit(jax.value_and_grad(loss_of(ajax.attention, cotangent, fixed)))
    _, grads = value_and_grad(params)
    out, expected = direct_grads(params, cotangent, fixed)
    for name in params:
        assert_same(grads[name], expected[name], f"d{name}")
    forward = jax.jit(lambda p: ajax.attention(p["q"], p["k"], p["v"], **fixed,
                                               **{n: x for n, x in p.items() if n not in "qkv"}))
    assert_same(forward(params), out, "out")


@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16])
def test_16bit_forward_and_grad_are_the_kernels(rng, dtype):
    params, fixed = case(rng, "bias+mask", "scaled_dot", dtype)
    params["bias"] = params["bias"].astype(np.float32)  # a float32 bias next to 16-bit q, k, v
    cotangent = cotangent_for(rng, params, fixed, dtype)
    out, expected = direct_grads(params, cotangent, fixed)
    assert out.dtype == dtype
    got = ajax.attention(params["q"], params["k"], params["v"], bias=params["bias"], **fixed)
    assert_same(got, out, "out")
    grads = jax.grad(loss_of(ajax.attention, cotangent, fixed))(params)
    for name in params:
        assert np.asarray(grads[name]).dtype == params[name].dtype
        assert_same(grads[name], expected[name], f"d{name}")


def test_eager_calls_compile_once(rng, caplog):
    """An eager call with the same shapes and arguments reuses the compiled callback program."""
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    ajax.attention(q, q, q, causal=True)
    with jax.log_compiles(), caplog.at_level("DEBUG"):
        caplog.clear()
        ajax.attention(q, q, q, causal=True)
        compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
        ajax.attention(q, q, q, causal=False)  # a new configuration compiles (the check's own check)
        recompiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert compiled == []
    assert recompiled


def test_mask_and_kv_lengths_get_zero_cotangents(rng):
    q = rng.standard_normal((2, 4, D)).astype(np.float32)
    k = rng.standard_normal((2, 6, D)).astype(np.float32)
    v = rng.standard_normal((2, 6, DV)).astype(np.float32)
    mask = rng.random((4, 6)) < 0.7
    lengths = np.array([3, 6], np.int32)
    out, vjp = jax.vjp(lambda q, mask, lengths: ajax.attention(q, k, v, mask=mask, kv_lengths=lengths),
                       q, mask, lengths)
    dq, dmask, dlengths = vjp(jnp.ones_like(out))
    assert dmask.dtype == jax.dtypes.float0 and dmask.shape == mask.shape
    assert dlengths.dtype == jax.dtypes.float0 and dlengths.shape == lengths.shape
    assert np.asarray(dq).shape == q.shape


def test_integer_bias_gets_a_float0_cotangent(rng):
    q = rng.standard_normal((3, D)).astype(np.float32)
    bias = rng.integers(-2, 3, (3, 3)).astype(np.int32)  # attnfast converts it to the computation dtype
    dq, dbias = jax.grad(lambda q, bias: jnp.sum(ajax.attention(q, q, q, bias=bias)), argnums=(0, 1),
                         allow_int=True)(q, bias)
    assert dbias.dtype == jax.dtypes.float0 and dbias.shape == bias.shape
    _, expected = direct_grads({"q": q, "k": q, "v": q}, np.ones((3, D), np.float32), {"bias": bias})
    # q is also k and v: JAX adds the three gradients (in an order of its choosing).
    assert_close_fixed(np.asarray(dq), expected["q"] + expected["k"] + expected["v"], np.float32,
                       what="dq of self-attention")


@pytest.mark.parametrize("lq, lk", [(0, 4), (3, 0), (1, 1)])
def test_empty_and_single_sizes(rng, lq, lk):
    """No query, no key (out 0 and zero gradients, no kernel), and one query over one key at D = 1."""
    q = rng.standard_normal((2, lq, 1)).astype(np.float32)
    k = rng.standard_normal((2, lk, 1)).astype(np.float32)
    v = rng.standard_normal((2, lk, 2)).astype(np.float32)
    cotangent = rng.standard_normal((2, lq, 2)).astype(np.float32)
    out, expected = direct_grads({"q": q, "k": k, "v": v}, cotangent, {})
    assert_same(ajax.attention(q, k, v), out, "out")
    grads = jax.grad(loss_of(ajax.attention, cotangent, {}))({"q": q, "k": k, "v": v})
    for name in "qkv":
        assert_same(grads[name], expected[name], f"d{name}")
    if lk == 0:
        assert not np.asarray(grads["q"]).any() and not np.asarray(out).any()


# --------------------------------------------------------------------------
# vmap
# --------------------------------------------------------------------------


class CountingKernels:
    """Counts the calls the adapter makes into attnfast.attention / attention_backward."""

    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        forward = attnfast.attention
        backward = attnfast.attention_backward

        def counted_forward(*args, **kwargs):
            self.forward += 1
            return forward(*args, **kwargs)

        def counted_backward(*args, **kwargs):
            self.backward += 1
            return backward(*args, **kwargs)

        monkeypatch.setattr(attnfast, "attention", counted_forward)
        monkeypatch.setattr(attnfast, "attention_backward", counted_backward)


def mapped_inputs(rng, n=3):
    q = rng.standard_normal((n, 2, 5, D)).astype(np.float32)
    k = rng.standard_normal((n, 2, 7, D)).astype(np.float32)
    v = rng.standard_normal((n, 2, 7, DV)).astype(np.float32)
    bias = rng.standard_normal((n, 5, 7)).astype(np.float32)
    mask = rng.random((n, 1, 7)) < 0.7
    mask[..., 0] = True
    return q, k, v, bias, mask


@pytest.mark.parametrize("in_axes", [(0, 0, 0, 0, 0), (0, None, None, None, None), (None, 0, 0, None, 0),
                                     (None, None, None, 0, None), (1, 1, 1, 2, 2)])
def test_vmap_is_one_kernel_call_equal_to_the_loop(rng, monkeypatch, in_axes):
    q, k, v, bias, mask = mapped_inputs(rng)
    args = [np.moveaxis(x, 0, a) if a is not None else x[0] for x, a in zip((q, k, v, bias, mask), in_axes)]

    def f(q, k, v, bias, mask):
        return ajax.attention(q, k, v, bias=bias, mask=mask, causal=True)

    expected = [f(*(x if a is None else np.take(x, i, axis=a) for x, a in zip(args, in_axes))) for i in range(3)]
    calls = CountingKernels(monkeypatch)
    got = jax.vmap(f, in_axes=in_axes)(*args)
    assert calls.forward == 1
    assert_same(got, np.stack([np.asarray(e) for e in expected]), "vmapped out")


def test_nested_vmap_under_jit(rng):
    q = rng.standard_normal((2, 3, 5, D)).astype(np.float32)
    k = rng.standard_normal((3, 7, D)).astype(np.float32)
    v = rng.standard_normal((3, 7, DV)).astype(np.float32)
    f = jax.jit(jax.vmap(jax.vmap(lambda q, k, v: ajax.attention(q, k, v), in_axes=(0, 0, 0)),
                         in_axes=(0, None, None)))
    assert_same(f(q, k, v), attnfast.attention(q, k[None], v[None]), "nested vmap")


def test_vmap_over_method_weights_runs_per_item(rng, monkeypatch):
    q = rng.standard_normal((2, 5, D)).astype(np.float32)
    k = rng.standard_normal((2, 7, D)).astype(np.float32)
    v = rng.standard_normal((2, 7, DV)).astype(np.float32)
    ws = rng.standard_normal((4, D, D)).astype(np.float32)
    calls = CountingKernels(monkeypatch)
    got = jax.vmap(lambda w: ajax.attention(q, k, v, method="general", w=w))(ws)
    assert calls.forward == 4
    expected = np.stack([attnfast.attention(q, k, v, method="general", w=w) for w in ws])
    assert_same(got, expected, "vmap over w")


@pytest.mark.parametrize("method", ["scaled_dot", "general"])
def test_vmap_of_grad_gives_per_item_gradients(rng, monkeypatch, method):
    """Per-example gradients: the unmapped k, v, bias and weights get one gradient per mapped q."""
    q, k, v, bias, mask = mapped_inputs(rng)
    k, v, bias = k[0], v[0], bias[0]
    weights = {name: x.astype(np.float32) for name, x in method_weights(rng, method, D, D, np.float32).items()}
    cotangent = rng.standard_normal((2, 5, DV)).astype(np.float32)

    def loss(q, k, v, bias, weights):
        return jnp.sum(ajax.attention(q, k, v, bias=bias, method=method, **weights) * cotangent)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    expected = [grad(q[i], k, v, bias, weights) for i in range(3)]
    calls = CountingKernels(monkeypatch)
    got = jax.vmap(grad, in_axes=(0, None, None, None, None))(q, k, v, bias, weights)
    assert calls.forward == 1  # the unmapped weights are passed once, the mapped axis is a batch axis
    assert calls.backward == (1 if method == "scaled_dot" else 3)
    for position, name in enumerate(["dq", "dk", "dv", "dbias"]):
        assert_same(got[position], np.stack([np.asarray(e[position]) for e in expected]), name)
    for name in weights:
        assert_same(got[4][name], np.stack([np.asarray(e[4][name]) for e in expected]), f"d{name}")


def test_grad_of_vmap_sums_over_the_mapped_axis(rng):
    q, k, v, bias, mask = mapped_inputs(rng)
    k0, v0 = k[0], v[0]
    f = jax.vmap(lambda q: ajax.attention(q, k0, v0), in_axes=0)
    dk = jax.grad(lambda k0: jnp.sum(jax.vmap(lambda q: ajax.attention(q, k0, v0))(q) ** 2))(k0)
    direct = jax.grad(lambda k0: jnp.sum(ajax.attention(q, k0[None], v0[None]) ** 2))(k0)
    assert_close_fixed(np.asarray(dk), np.asarray(direct), np.float32, what="dk")
    assert f(q).shape == (3, 2, 5, DV)


# --------------------------------------------------------------------------
# Errors and imports
# --------------------------------------------------------------------------


def small():
    return (np.zeros((2, 4, D), np.float32), np.zeros((2, 6, D), np.float32), np.zeros((2, 6, DV), np.float32))


def test_numpy_only_arguments_are_refused():
    q, k, v = small()
    with pytest.raises(TypeError, match=r"does not take return_lse= .*call attnfast.attention on NumPy"):
        ajax.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"does not take out="):
        ajax.attention(q, k, v, out=np.empty((2, 4, DV), np.float32))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'causl'"):
        ajax.attention(q, k, v, causl=True)


def test_shape_and_dtype_errors_are_attnfasts_at_trace_time():
    q, k, v = small()
    with pytest.raises(ValueError, match=r"k and v must have the same number of keys Lk"):
        jax.jit(ajax.attention)(q, k, v[:, :5])
    with pytest.raises(TypeError, match=r"q has dtype int32"):
        ajax.attention(q.astype(np.int32), k, v)
    with pytest.raises(TypeError, match=r"mask must be a boolean array"):
        jax.jit(lambda q: ajax.attention(q, k, v, mask=jnp.ones((4, 6))))(q)
    with pytest.raises(ValueError, match=r"unknown causal_align 'middle'"):
        ajax.attention(q, k, v, causal=True, causal_align="middle")


def test_traced_static_arguments_are_refused():
    q, k, v = small()
    with pytest.raises(TypeError, match=r"scale must be a Python value fixed at trace time.*static_argnames"):
        jax.jit(lambda q, s: ajax.attention(q, k, v, scale=s))(q, 0.5)
    got = jax.jit(lambda q, s: ajax.attention(q, k, v, scale=s), static_argnames="s")(q, s=0.5)
    assert_same(got, attnfast.attention(q, k, v, scale=0.5), "static scale")


def test_kv_lengths_out_of_range():
    q, k, v = small()
    with pytest.raises(ValueError, match=r"kv_lengths must lie in \[0, Lk\] = \[0, 6\]; got 7"):
        ajax.attention(q, k, v, kv_lengths=np.array([7, 1]))
    # Traced, the values are known only when the kernel runs: JAX's runtime error carries the message.
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"kv_lengths must lie in \[0, Lk\] = \[0, 6\]; got 7"):
        jax.block_until_ready(jax.jit(lambda n: ajax.attention(q, k, v, kv_lengths=n))(np.array([7, 1])))


def test_forward_mode_and_second_derivatives_are_refused_by_jax():
    """A custom_vjp has no forward mode, and the backward (a callback) has no derivative: JAX says so."""
    q = np.ones((3, D), np.float32)

    def f(q):
        return jnp.sum(ajax.attention(q, q, q))

    with pytest.raises(TypeError, match=r"can't apply forward-mode autodiff \(jvp\) to a custom_vjp"):
        jax.jvp(f, (q,), (q,))
    with pytest.raises(ValueError, match=r"Pure callbacks do not support JVP"):
        jax.grad(lambda q: jnp.sum(jax.grad(f)(q)))(q)


def run_python(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_attnfast_does_not_import_jax():
    assert run_python("import sys, attnfast; print('jax' in sys.modules, 'jaxlib' in sys.modules)") \
        == "False False\n"


def test_attnfast_jax_leaves_import_jax_the_real_jax():
    code = "import attnfast.jax, jax; print(jax.__name__, hasattr(jax, 'grad'), attnfast.jax is not jax)"
    assert run_python(code) == "jax True True\n"
