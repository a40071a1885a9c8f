"""Errors for code written against another library: PyTorch's (and flash-attn's, JAX's) keyword names
get a TypeError naming attnfast's equivalent, and (B, L, H, D) arrays whose heads do not match get the
transpose that fixes them. Every public function raises the same message as its reference twin.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import attnfast
from attnfast import reference

def _q(shape=(2, 3, 4, 8)):
    return np.ones(shape, np.float32)


ATTENTIONS = [attnfast.attention, reference.attention]


def _call(function, **kwargs):
    q = _q()
    function(q, q, q, **kwargs)


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("given, message", [
    ({"is_causal": True},
     "attention() got an unexpected keyword argument 'is_causal' (PyTorch's name): pass causal=True "
     "(causal=True's diagonal is causal_align='top_left', the default, as PyTorch's is_causal; 'bottom_right' "
     "aligns the last query with the last key)."),
    ({"is_causal": False},
     "attention() got an unexpected keyword argument 'is_causal' (PyTorch's name): pass causal=False "),
    ({"attn_mask": np.ones((4, 4), bool)},
     "attention() got an unexpected keyword argument 'attn_mask' (PyTorch's name): a boolean attn_mask is "
     "mask= here, with the same meaning (True = attend): pass mask=attn_mask."),
    ({"attn_mask": np.zeros((4, 4), np.float32)},
     "attention() got an unexpected keyword argument 'attn_mask' (PyTorch's name): a float attn_mask is added "
     "to the scores, which is bias= here: pass bias=attn_mask (-inf hides a key)."),
    ({"attn_mask": [[0.0, -np.inf]]},
     "a float attn_mask is added to the scores, which is bias= here"),
    ({"attn_mask": object()},
     "a boolean attn_mask (True = attend) is mask= here, a float one (added to the scores) is bias=: pass "
     "mask=attn_mask or bias=attn_mask."),
    ({"dropout_p": 0.0},
     "attention() got an unexpected keyword argument 'dropout_p' (PyTorch's name): attnfast has no dropout (its "
     "results are deterministic): drop dropout_p (0.0 is what attnfast computes), or apply dropout to "
     "softmax()'s weights and aggregate() them yourself."),
    ({"enable_gqa": True},
     "attention() got an unexpected keyword argument 'enable_gqa' (PyTorch's name): grouped-query attention "
     "needs no flag: kv heads (axis -3) that divide the query heads are shared by index (query head h reads kv "
     "head h // (Hq/Hk)), so drop enable_gqa."),
    ({"key_padding_mask": np.zeros((2, 4), bool)},
     "attention() got an unexpected keyword argument 'key_padding_mask' (PyTorch's name): PyTorch's "
     "key_padding_mask is True for keys to IGNORE: pass kv_lengths= (the number of valid keys per batch item), "
     "or mask=~key_padding_mask[:, None, None, :] (True = attend)."),
    ({"need_weights": True},
     "attention() got an unexpected keyword argument 'need_weights' (PyTorch's name): pass return_weights=True"),
    ({"softmax_scale": 0.5},
     "attention() got an unexpected keyword argument 'softmax_scale' (flash-attn's name): pass scale= (None is "
     "1/sqrt(D), as in flash-attn)."),
    ({"window_size": (-1, 0)},
     "attention() got an unexpected keyword argument 'window_size' (flash-attn's name): pass window=(left, "
     "right), with None instead of -1 for an unbounded side (window_size=(-1, -1) is window=None)."),
    ({"cache_seqlens": np.array([4, 4])},
     "attention() got an unexpected keyword argument 'cache_seqlens' (flash-attn's name): pass kv_lengths="),
    ({"return_softmax_lse": True},
     "attention() got an unexpected keyword argument 'return_softmax_lse' (flash-attn's name): pass "
     "return_lse=True to get (out, lse)."),
    ({"local_window_size": (4, 0)},
     "attention() got an unexpected keyword argument 'local_window_size' (JAX's name): pass window=(left, right)"),
    ({"attn_bias": np.zeros((4, 4))},
     "attention() got an unexpected keyword argument 'attn_bias' (xformers' name): pass bias= "),
    ({"causl": True}, "attention() got an unexpected keyword argument 'causl'; did you mean 'causal'?"),
    ({"retrun_lse": True}, "attention() got an unexpected keyword argument 'retrun_lse'; did you mean 'return_lse'?"),
    ({"zzz": 1}, "attention() got an unexpected keyword argument 'zzz'."),
])
def test_attention_names_the_equivalent(attention, given, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        _call(attention, **given)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_the_hint_is_not_a_fallback_for_valid_calls(attention):
    """The keyword the hints name works: the same call with attnfast's name runs (and PyTorch's meaning)."""
    q = _q()
    mask = np.tril(np.ones((4, 4), bool))
    np.testing.assert_array_equal(attention(q, q, q, mask=mask), attention(q, q, q, causal=True))


@pytest.mark.parametrize("softmax", [attnfast.softmax, reference.softmax])
def test_softmax_dim(softmax):
    with pytest.raises(TypeError, match=re.escape(
            "softmax() got an unexpected keyword argument 'dim' (PyTorch's name): pass axis= (the axis softmax "
            "normalises over, as PyTorch's dim).")):
        softmax(_q(), dim=-1)


@pytest.mark.parametrize("function, name, call", [
    ("scores", "is_causal", lambda f, q: f(q, q, is_causal=True)),
    ("softmax", "is_causal", lambda f, q: f(q, is_causal=True)),
    ("aggregate", "dim", lambda f, q: f(q, q, dim=-1)),
])
@pytest.mark.parametrize("module", [attnfast, reference])
def test_names_without_an_equivalent_in_that_function(function, name, call, module):
    """PyTorch's name for an argument this function does not have: the plain message, not a wrong hint."""
    with pytest.raises(TypeError, match=re.escape(f"{function}() got an unexpected keyword argument {name!r}.") + "$"):
        call(getattr(module, function), _q())


def test_scores_takes_flash_attn_scale():
    with pytest.raises(TypeError, match=re.escape(
            "scores() got an unexpected keyword argument 'softmax_scale' (flash-attn's name): pass scale=")):
        attnfast.scores(_q(), _q(), softmax_scale=0.1)


@pytest.mark.parametrize("varlen", [attnfast.attention_varlen, reference.attention_varlen])
def test_varlen(varlen):
    q = np.ones((2, 8, 4), np.float32)
    with pytest.raises(TypeError, match=re.escape(
            "attention_varlen() got an unexpected keyword argument 'is_causal' (PyTorch's name): pass "
            "causal=True")):
        varlen(q, q, q, [0, 3, 8], [0, 3, 8], is_causal=True)
    with pytest.raises(TypeError, match=re.escape(
            "attention_varlen() got an unexpected keyword argument 'dropout_p' (PyTorch's name)")):
        varlen(q, q, q, [0, 3, 8], [0, 3, 8], dropout_p=0.1)


@pytest.mark.parametrize("backward", [attnfast.attention_backward, reference.attention_backward])
def test_backward(backward):
    q = _q()
    out, lse = attnfast.attention(q, q, q, return_lse=True)
    with pytest.raises(TypeError, match=re.escape(
            "attention_backward() got an unexpected keyword argument 'is_causal' (PyTorch's name): pass "
            "causal=True")):
        backward(out, q, q, q, out, lse, is_causal=True)
    with pytest.raises(TypeError, match=re.escape(
            "attention_backward() got an unexpected keyword argument 'causl'; did you mean 'causal'?")):
        backward(out, q, q, q, out, lse, causl=True)
    # The forward-only flags keep their own explanation.
    with pytest.raises(TypeError, match=re.escape(
            "attention_backward got unexpected keyword argument(s) return_lse. It takes attention's keyword")):
        backward(out, q, q, q, out, lse, return_lse=True)


# --------------------------------------------------------------------------
# (B, L, H, D) arrays
# --------------------------------------------------------------------------

HEADS = ("q has 5 heads (axis -3) but k/v have 7; the kv heads must divide the query heads (query head h uses "
         "kv head h // (Hq/Hk)). Got q batch shape {qb} and k/v batch shape {kb}.")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_blhd_arrays_get_the_transpose(attention):
    q = np.ones((2, 5, 8, 16), np.float32)  # (B, Lq, Hq, D)
    k = np.ones((2, 7, 2, 16), np.float32)  # (B, Lk, Hk, D): 2 kv heads divide 8 query heads
    message = HEADS.format(qb="(2, 5)", kb="(2, 7)") + (
        " These shapes look like (B, L, H, D) arrays (sequence axis before the heads, as flash-attn and "
        "jax.nn.dot_product_attention lay them out); attnfast reads (B, H, L, D): pass q.transpose(0, 2, 1, 3), "
        "k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3) (views, no copy), and out.transpose(0, 2, 1, 3) turns "
        "the result back.")
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        attention(q, k, k)
    # The advice is right: it runs, equals attention per (batch, head) in the (B, H, L, D) layout, and the
    # transposes are views.
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(x.shape, dtype=np.float32) for x in (q, k, k))
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    assert all(np.shares_memory(x, y) for x, y in ((q, qt), (k, kt), (v, vt)))
    out = attention(qt, kt, vt).transpose(0, 2, 1, 3)
    expected = reference.attention(np.ascontiguousarray(qt), np.repeat(np.ascontiguousarray(kt), 4, axis=1),
                                   np.repeat(np.ascontiguousarray(vt), 4, axis=1)).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_lhd_arrays_get_their_transpose(attention):
    q, k = np.ones((5, 8, 16), np.float32), np.ones((7, 8, 16), np.float32)  # (L, H, D)
    with pytest.raises(ValueError, match=re.escape(
            HEADS.format(qb="(5,)", kb="(7,)") + " These shapes look like (L, H, D) arrays (sequence axis before "
            "the heads, as flash-attn and jax.nn.dot_product_attention lay them out); attnfast reads (H, L, D): "
            "pass q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2) (views, no copy), and "
            "out.transpose(1, 0, 2) turns the result back.") + "$"):
        attention(q, k, k)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_more_axes_get_swapaxes(attention):
    q, k = np.ones((1, 2, 5, 8, 16), np.float32), np.ones((1, 2, 7, 8, 16), np.float32)
    with pytest.raises(ValueError, match=re.escape(
            "attnfast reads (..., H, L, D): pass np.swapaxes(q, -3, -2), np.swapaxes(k, -3, -2), "
            "np.swapaxes(v, -3, -2) (views, no copy), and np.swapaxes(out, -3, -2) turns the result back.")):
        attention(q, k, k)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_no_transpose_hint_when_swapping_would_not_help(attention):
    """Heads that mismatch on both axes are not a layout problem: the message stops after the shapes."""
    q, k = np.ones((2, 5, 8, 16), np.float32), np.ones((2, 7, 3, 16), np.float32)
    with pytest.raises(ValueError, match=re.escape(HEADS.format(qb="(2, 5)", kb="(2, 7)")) + "$"):
        attention(q, k, k)


def test_torch_adapter_reads_the_tensor_dtype():
    torch = pytest.importorskip("torch")
    import attnfast.torch as at

    q = torch.ones(2, 3, 4, 8)
    with pytest.raises(TypeError, match=re.escape(
            "attnfast.torch.attention() got an unexpected keyword argument 'attn_mask' (PyTorch's name): a "
            "boolean attn_mask is mask= here, with the same meaning (True = attend): pass mask=attn_mask.")):
        at.attention(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=re.escape(
            "attnfast.torch.attention() got an unexpected keyword argument 'attn_mask' (PyTorch's name): a float "
            "attn_mask is added to the scores, which is bias= here: pass bias=attn_mask (-inf hides a key).")):
        at.attention(q, q, q, attn_mask=torch.zeros(4, 4))
    with pytest.raises(TypeError, match=re.escape(
            "attnfast.torch.attention() got an unexpected keyword argument 'is_causal' (PyTorch's name): pass "
            "causal=True")):
        at.attention(q, q, q, is_causal=True)
    # torch.nn.functional.scaled_dot_product_attention's boolean attn_mask means the same as mask=.
    rng = np.random.default_rng(1)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 3, 4, 8), dtype=np.float32)) for _ in range(3))
    mask = torch.from_numpy(rng.random((4, 4)) < 0.7)
    mask[:, 0] = True
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(at.attention(q, k, v, mask=mask), expected, rtol=1e-5, atol=1e-5)


def test_jax_adapter():
    pytest.importorskip("jax")
    import attnfast.jax as ajax

    q = np.ones((2, 4, 8), np.float32)
    with pytest.raises(TypeError, match=re.escape(
            "attnfast.jax.attention() got an unexpected keyword argument 'is_causal' (PyTorch's name): pass "
            "causal=True")):
        ajax.attention(q, q, q, is_causal=True)
    with pytest.raises(TypeError, match=re.escape(
            "attnfast.jax.attention() got an unexpected keyword argument 'local_window_size' (JAX's name)")):
        ajax.attention(q, q, q, local_window_size=(4, 0))
