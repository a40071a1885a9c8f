"""attnfast.jax.attention with softcap, alibi_slopes and sinks: attnfast.attention's values under
jax.jit, and jax.grad equal to attnfast.attention_backward's gradients (sinks included), also under vmap."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import attnfast  # noqa: E402
import attnfast.jax as aj  # noqa: E402
from conftest import modifier_case  # noqa: E402


KW = dict(causal=True, causal_align="bottom_right", softcap=2.5)


def test_jit_forward_and_grad(rng):
    q, k, v, slopes, sinks = modifier_case(rng)
    lengths = np.array([[11], [6]])
    dout = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)

    def loss(q, k, v, sinks):
        out = aj.attention(q, k, v, alibi_slopes=slopes, sinks=sinks, kv_lengths=lengths, **KW)
        return jnp.sum(out * dout)

    out = jax.jit(lambda q, k, v, s: aj.attention(q, k, v, alibi_slopes=slopes, sinks=s, kv_lengths=lengths,
                                                   **KW))(q, k, v, sinks)
    e_out, e_lse = attnfast.attention(q, k, v, alibi_slopes=slopes, sinks=sinks, kv_lengths=lengths,
                                      return_lse=True, **KW)
    np.testing.assert_array_equal(np.asarray(out), e_out)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, sinks)
    g = attnfast.attention_backward(dout, q, k, v, e_out, e_lse, alibi_slopes=slopes, sinks=sinks,
                                    kv_lengths=lengths, **KW)
    for got, expected in zip(grads, (g.dq, g.dk, g.dv, g.dsinks)):
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_vmap_of_grad_over_sinks(rng):
    q, k, v, slopes, sinks = modifier_case(rng)
    many = np.stack([sinks, sinks + 1, sinks - 2])

    def loss(s):
        return jnp.sum(aj.attention(q, k, v, alibi_slopes=slopes, sinks=s, **KW))

    per_item = jax.vmap(jax.grad(loss))(many)
    for i in range(3):
        out, lse = attnfast.attention(q, k, v, alibi_slopes=slopes, sinks=many[i], return_lse=True, **KW)
        g = attnfast.attention_backward(np.ones_like(out), q, k, v, out, lse, alibi_slopes=slopes, sinks=many[i],
                                        **KW)
        np.testing.assert_allclose(np.asarray(per_item[i]), g.dsinks, rtol=1e-6, atol=1e-6)
