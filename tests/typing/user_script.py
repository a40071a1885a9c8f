"""User code as a type checker sees it: CI runs ``mypy --strict`` on this file (and tests/test_typing.py
runs it), so a change to attnfast's annotations that breaks ordinary use fails there.

It exercises the three stages, fused attention with and without the log-sum-exp, split-KV merging and
the backward pass, annotating its own functions as a strictly typed project would.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
from numpy.typing import NDArray

import attnfast
from attnfast import AttentionGrads


def three_stages(q: NDArray[np.float32], k: NDArray[np.float32], v: NDArray[np.float32]) -> NDArray[np.float32]:
    """Attention spelled out: scores, a masked softmax, the weighted sum of the values."""
    s = attnfast.scores(q, k, method="scaled_dot")
    causal = np.tril(np.ones(s.shape[-2:], dtype=bool))
    p = attnfast.softmax(s, axis=-1, mask=causal)
    out = attnfast.aggregate(p, v)
    return out.astype(np.float32, copy=False)


def split_kv(q: NDArray[np.float32], k: NDArray[np.float32], v: NDArray[np.float32],
             parts: int) -> Tuple[NDArray[np.float32], NDArray[np.floating]]:
    """Attention over the keys in ``parts`` chunks, merged: what one call over all the keys gives."""
    outs: List[NDArray[np.float32]] = []
    lses: List[NDArray[np.floating]] = []
    for chunk in np.array_split(np.arange(k.shape[-2]), parts):
        out, lse = attnfast.attention(q, k[..., chunk, :], v[..., chunk, :], return_lse=True)
        outs.append(out)
        lses.append(lse)
    merged, lse = attnfast.merge_states(outs, lses)
    return merged, lse


def train_step(q: NDArray[np.float32], k: NDArray[np.float32], v: NDArray[np.float32],
               target: NDArray[np.float32], lr: float = 0.1) -> float:
    """One gradient step on q for the squared error of causal attention; returns the loss before it."""
    out, lse = attnfast.attention(q, k, v, causal=True, return_lse=True)
    error = out - target
    grads: AttentionGrads = attnfast.attention_backward(2.0 * error, q, k, v, out, lse, causal=True)
    q -= lr * grads.dq
    assert grads.dbias is None  # no bias given
    return float(np.sum(error * error))


def main() -> None:
    rng = np.random.default_rng(0)
    b, h, lq, lk, d = 2, 4, 16, 64, 32
    q = rng.standard_normal((b, h, lq, d), dtype=np.float32)
    k = rng.standard_normal((b, h, lk, d), dtype=np.float32)
    v = rng.standard_normal((b, h, lk, d), dtype=np.float32)

    out = attnfast.attention(q, k, v)  # an ndarray, not a tuple
    print("attention:", out.shape, out.dtype)
    staged = three_stages(q, k[..., :lq, :], v[..., :lq, :])
    fused = attnfast.attention(q, k[..., :lq, :], v[..., :lq, :], causal=True)
    print("three stages vs fused: max |diff|", float(np.max(np.abs(staged - fused))))

    merged, lse = split_kv(q, k, v, parts=4)
    whole, whole_lse = attnfast.attention(q, k, v, return_lse=True)
    print("split-KV vs one call: max |diff|", float(np.max(np.abs(merged - whole))),
          float(np.max(np.abs(lse - whole_lse))))

    out_w, weights = attnfast.attention(q, k, v, return_weights=True)
    print("weights:", weights.shape, "rows sum to", float(weights.sum(axis=-1).mean()))

    k8, k_scale = attnfast.quantize_kv(k)
    v8, v_scale = attnfast.quantize_kv(v)
    int8_out = attnfast.attention(q, k8, v8, k_scale=k_scale, v_scale=v_scale)
    print("int8 cache: max |diff|", float(np.max(np.abs(int8_out - out_w))))

    target = np.zeros_like(q)
    trained = q.copy()
    losses = [train_step(trained, k, v, target) for _ in range(3)]  # updates trained in place
    print("losses:", [round(x, 2) for x in losses])
    attnfast.set_num_threads(0)
    print("threads:", attnfast.get_num_threads(), "isa:", attnfast.capabilities()["isa"])


if __name__ == "__main__":
    main()
