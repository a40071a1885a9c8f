"""attnfast.torch.attention with softcap, alibi_slopes and sinks: the same values as attnfast.attention,
and autograd gradients (sinks included) equal to attnfast.attention_backward's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import attnfast  # noqa: E402
import attnfast.torch as at  # noqa: E402
from conftest import modifier_case  # noqa: E402


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch")  # inductor's first compile, see test_torch_adapter
@pytest.mark.parametrize("compiled", [False, True])
def test_modifiers_forward_and_gradients(rng, compiled):
    q, k, v, slopes, sinks = modifier_case(rng)
    kw = dict(causal=True, causal_align="bottom_right", kv_lengths=np.array([[11], [6]]))
    tq, tk, tv, ts = (torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v, sinks))
    fn = at.attention
    if compiled:
        fn = torch.compile(at.attention, fullgraph=True)
    out, lse = fn(tq, tk, tv, softcap=2.5, alibi_slopes=torch.from_numpy(slopes), sinks=ts,
                  kv_lengths=torch.from_numpy(kw["kv_lengths"]), causal=True, causal_align="bottom_right",
                  return_lse=True)
    e_out, e_lse = attnfast.attention(q, k, v, softcap=2.5, alibi_slopes=slopes, sinks=sinks, return_lse=True, **kw)
    np.testing.assert_array_equal(out.detach().numpy(), e_out)
    np.testing.assert_array_equal(lse.numpy(), e_lse)
    dout = rng.standard_normal(e_out.shape).astype(np.float32)
    out.backward(torch.from_numpy(dout))
    g = attnfast.attention_backward(dout, q, k, v, e_out, e_lse, softcap=2.5, alibi_slopes=slopes, sinks=sinks, **kw)
    for tensor, expected in ((tq, g.dq), (tk, g.dk), (tv, g.dv), (ts, g.dsinks)):
        np.testing.assert_array_equal(tensor.grad.numpy(), expected)


def test_alibi_slopes_is_not_differentiable(rng):
    q, k, v, slopes, _ = modifier_case(rng)
    with pytest.raises(TypeError, match=r"alibi_slopes requires grad, but attnfast.attention is not differentiable"):
        at.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                     alibi_slopes=torch.from_numpy(slopes).requires_grad_())


def test_bad_softcap_raises_attnfast_error(rng):
    q, k, v, _, _ = modifier_case(rng)
    with pytest.raises(ValueError, match=r"softcap must be a positive finite number"):
        at.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), softcap=-1.0)
    with pytest.raises(TypeError, match=r"softcap must be a positive finite number"):
        at.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), softcap="1")
