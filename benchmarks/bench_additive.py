"""Fused additive (Bahdanau) attention against the broadcasting code people write in NumPy and PyTorch.

Issue 5's two float32 shapes, B=64, Lk=50, D=Dv=256, A=256:

* Lq=40: a seq2seq training batch (every target position at once, teacher forcing);
* Lq=1:  one greedy decoder step (``query_t[:, None, :]`` against the encoder states).

The peers build the (B, Lq, Lk, A) tensor ``tanh(qp[:, :, None, :] + kp[:, None, :, :] + b)`` (131 MB at
Lq=40), reduce it with ``@ v_a``, then softmax and aggregate; attnfast projects q and k with BLAS and runs
tanh, the v_a dot, the online softmax and the aggregate tile by tile.  Every implementation projects q and
k inside the timed call: the benchmark times one whole ``attention(...)`` call, as the API defines it.

The projections are written as 2-D GEMMs over reshaped (B·L, D) rows: a stacked (B, L, D) @ (D, A)
``np.matmul`` runs one small GEMM per batch item and is ~100x slower here, which would flatter attnfast.

One ``benchmark.group`` per shape; the implementations are pinned to the same thread count by the
``implementations`` fixture of ``conftest.py`` (``ATTNFAST_BENCH_THREADS``, default all usable cores).
``extra_info`` records the median in ms and a nominal GFLOP/s (see :meth:`AdditiveCase.flops`).

    pytest benchmarks/bench_additive.py --benchmark-enable
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

DTYPE = np.float32
IMPLS = ["attnfast", "numpy", "torch"]


@dataclass(frozen=True)
class AdditiveCase:
    B: int
    Lq: int
    Lk: int
    D: int
    A: int
    label: str = ""
    keys_projected: bool = False  # a decoding loop projects the encoder states once per sentence

    @property
    def name(self) -> str:
        return f"additive B={self.B} Lq={self.Lq} Lk={self.Lk} D={self.D} A={self.A} ({self.label})"

    @property
    def temporary_bytes(self) -> int:
        """Size of the (B, Lq, Lk, A) tensor the broadcasting code materialises (float32)."""
        return self.B * self.Lq * self.Lk * self.A * np.dtype(DTYPE).itemsize

    def flops(self) -> int:
        """Nominal work: projections 2·B·(Lq+Lk)·D·A, scores 4·B·Lq·Lk·A (add, tanh as one op, multiply-add
        with v_a), aggregate 2·B·Lq·Lk·Dv (Dv = D).  The softmax is not counted."""
        B, Lq, Lk, D, A = self.B, self.Lq, self.Lk, self.D, self.A
        key_projection = 0 if self.keys_projected else 2 * B * Lk * D * A
        return 2 * B * Lq * D * A + key_projection + 4 * B * Lq * Lk * A + 2 * B * Lq * Lk * D


TRAINING = AdditiveCase(64, 40, 50, 256, 256, "seq2seq training batch")
DECODER_STEP = AdditiveCase(64, 1, 50, 256, 256, "one decoder step")
# The same step as a decoding loop runs it: W_k k computed once per sentence, outside the step.
DECODER_STEP_CACHED = AdditiveCase(64, 1, 50, 256, 256, "one decoder step, keys projected once", True)
CASES = [pytest.param(TRAINING, id="train-64x40x50"), pytest.param(DECODER_STEP, id="step-64x1x50"),
         pytest.param(DECODER_STEP_CACHED, id="step-cached-64x1x50")]


def make_inputs(case: AdditiveCase, dtype=DTYPE, seed: int = 0):
    """q (B, Lq, D), k and v (B, Lk, D), w_q and w_k (A, D), v_a (A,), b (A,).

    Weights are scaled by 1/sqrt(D) (the usual initialisation) so that tanh works in its sensitive range
    rather than saturating at +-1, as it would in a trained model.
    """
    rng = np.random.default_rng(seed)
    B, Lq, Lk, D, A = case.B, case.Lq, case.Lk, case.D, case.A
    q = rng.standard_normal((B, Lq, D))
    k = rng.standard_normal((B, Lk, D))
    v = rng.standard_normal((B, Lk, D))
    w_q, w_k = (rng.standard_normal((A, D)) / np.sqrt(D) for _ in range(2))
    v_a = rng.standard_normal(A) / np.sqrt(A)
    b = 0.1 * rng.standard_normal(A)
    # Cast last: a float64 NumPy scalar such as np.sqrt(D) would otherwise promote float32 arrays.
    q, k, v, w_q, w_k, v_a, b = (a.astype(dtype) for a in (q, k, v, w_q, w_k, v_a, b))
    if case.keys_projected:
        # Every implementation receives W_k k and w_k=None: "k is already projected".
        return q, (k.reshape(B * Lk, D) @ w_k.T).reshape(B, Lk, A), v, w_q, None, v_a, b
    return q, k, v, w_q, w_k, v_a, b


# --------------------------------------------------------------------------------------------------
# The three implementations
# --------------------------------------------------------------------------------------------------


def attnfast_additive(q, k, v, w_q, w_k, v_a, b):
    import attnfast

    return attnfast.attention(q, k, v, method="additive", w_q=w_q, w_k=w_k, v_a=v_a, score_bias=b)


def numpy_additive(q, k, v, w_q, w_k, v_a, b):
    """Bahdanau attention with broadcasting, as written in NumPy tutorials (plus 2-D projection GEMMs)."""
    B, Lq, D = q.shape
    Lk, A = k.shape[1], w_q.shape[0]
    qp = (q.reshape(B * Lq, D) @ w_q.T).reshape(B, Lq, A)
    kp = k if w_k is None else (k.reshape(B * Lk, -1) @ w_k.T).reshape(B, Lk, A)
    s = np.tanh(qp[:, :, None, :] + kp[:, None, :, :] + b) @ v_a  # (B, Lq, Lk, A) -> (B, Lq, Lk)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e @ v


def torch_additive(q, k, v, w_q, w_k, v_a, b):
    """The same code in PyTorch eager (tensors in, tensor out)."""
    import torch

    B, Lq, D = q.shape
    Lk, A = k.shape[1], w_q.shape[0]
    qp = (q.reshape(B * Lq, D) @ w_q.T).reshape(B, Lq, A)
    kp = k if w_k is None else (k.reshape(B * Lk, -1) @ w_k.T).reshape(B, Lk, A)
    s = torch.tanh(qp[:, :, None, :] + kp[:, None, :, :] + b) @ v_a
    return torch.softmax(s, dim=-1) @ v


def prepare(name: str, inputs):
    """A zero-argument callable running ``name`` on ``inputs`` (converted outside the timed call)."""
    if name == "attnfast":
        return lambda: attnfast_additive(*inputs)
    if name == "numpy":
        return lambda: numpy_additive(*inputs)
    import torch

    tensors = [None if a is None else torch.from_numpy(a) for a in inputs]  # zero-copy views

    def run():
        with torch.inference_mode():
            return torch_additive(*tensors)

    return run


def check_against_float64(name: str, result, inputs, rows: int = 2) -> None:
    """The implementations must compute the same function: compare the first rows with float64 NumPy."""
    as64 = (None if x is None else x.astype(np.float64) for x in inputs)
    expected = numpy_additive(*(a[:rows] if a is not None and a.ndim == 3 else a for a in as64))
    got = np.asarray(result)[:rows]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4, err_msg=name)


# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_additive(benchmark, implementations, case, impl):
    """One implementation on one shape; the ``implementations`` fixture has pinned every thread pool."""
    peer = implementations[impl]
    if not peer.available():
        from attnfast.bench.peers import INSTALL_HINTS

        pytest.skip(f"{peer.label} not available ({peer.error}); install: {INSTALL_HINTS.get(impl, '-')}")
    inputs = make_inputs(case)
    fn = prepare(impl, inputs)
    check_against_float64(impl, fn(), inputs)  # also the warm-up call: thread pools, first-touch

    benchmark.group = case.name
    benchmark.extra_info.update({"impl": impl, "threads": peer.threads(), "dtype": np.dtype(DTYPE).name,
                                 "flops": case.flops(), "temporary_mb": case.temporary_bytes / 1e6})
    benchmark(fn)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None when benchmarks are disabled: fn ran once, unmeasured
        median = stats.stats.median
        benchmark.extra_info["median_ms"] = median * 1e3
        benchmark.extra_info["gflops"] = case.flops() / median / 1e9
