"""The backward suite's cases and implementations: attnfast's fused backward against PyTorch autograd.

Three kinds of case, all measured with the same interleaved timing as the forward suite:

* ``fwdbwd``: one training step of an attention layer, forward then backward. attnfast runs
  ``attention(q, k, v, return_lse=True)`` then ``attention_backward(dout, q, k, v, out, lse)``; PyTorch
  runs ``scaled_dot_product_attention`` on leaf tensors with ``requires_grad`` and ``out.backward(dout)``.
* ``bwd``: the backward alone, from a forward done outside the timed call (attnfast keeps ``out`` and
  ``lse``; PyTorch keeps the graph and calls ``torch.autograd.grad(..., retain_graph=True)``).
* ``additive``: Bahdanau attention forward+backward, ``v_a . tanh(W_q q + W_k k + b)`` with a key-length
  mask, through attnfast's ``method="additive"`` against the same formula in PyTorch eager autograd
  (which builds the (B, Lq, Lk, A) tanh tensor and keeps it for the backward).

Every implementation returns its gradients as NumPy arrays for the accuracy check (float64 reference of
``attnfast.reference.attention_backward``); nothing here imports attnfast or a peer at import time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import peers
from .cases import storage_dtype

__all__ = ["BackwardCase", "BACKWARD_SHAPES", "BACKWARD_BF16_SHAPES", "BACKWARD_ALONE_SHAPE",
           "ADDITIVE_CASE", "MEMORY_CASE", "default_backward_cases", "shape_backward_cases",
           "make_backward_inputs", "backward_impls", "gradient_names", "case_from_dict"]

KINDS = ("fwdbwd", "bwd", "additive")

#: The issue's forward+backward shapes: (B, H, Lq, Lk, D), causal, label.
BACKWARD_SHAPES: List[Tuple[Tuple[int, int, int, int, int], bool, str]] = [
    ((8, 8, 512, 512, 64), False, "encoder"),
    ((1, 8, 2048, 2048, 64), False, "long context"),
    ((1, 8, 2048, 2048, 64), True, "long context, causal"),
    ((64, 1, 40, 50, 256), False, "seq2seq batch"),
]
#: bfloat16 forward+backward rows (the issue quotes PyTorch's bfloat16 times for these two).
BACKWARD_BF16_SHAPES = BACKWARD_SHAPES[:2]
#: The shape at which the backward alone is measured against the FMA peak.
BACKWARD_ALONE_SHAPE = (1, 8, 4096, 4096, 64)


@dataclasses.dataclass(frozen=True)
class BackwardCase:
    """q (B, H, Lq, D), k and v (B, H, Lk, D); additive: q (B, Lq, D), k, v (B, Lk, D), A features."""

    kind: str
    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    dtype: str = "float32"
    causal: bool = False
    label: str = ""
    A: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")

    @property
    def name(self) -> str:
        what = {"fwdbwd": "forward+backward", "bwd": "backward", "additive": "additive forward+backward"}
        if self.kind == "additive":
            dims = f"B={self.B} Lq={self.Lq} Lk={self.Lk} D={self.D} A={self.A}"
        else:
            dims = f"B={self.B} H={self.H} Lq={self.Lq} Lk={self.Lk} D={self.D}"
        return f"{what[self.kind]} {dims}{' causal' if self.causal else ''} {self.dtype}"

    @property
    def shape(self) -> Tuple[int, ...]:
        if self.kind == "additive":
            return (self.B, self.Lq, self.Lk, self.D, self.A)
        return (self.B, self.H, self.Lq, self.Lk, self.D)

    def flops(self) -> Optional[float]:
        """Nominal FLOPs: forward 4·B·H·Lq·Lk·D (QKᵀ, P·V), backward 10·B·H·Lq·Lk·D (QKᵀ recomputed, dV,
        dP, dQ, dK: five products, 2.5× the forward), as the FlashAttention-2 paper counts them.

        Causal runs are credited only the (query, key) pairs they see (top-left: Lq (Lq + 1) / 2 for
        Lq <= Lk), as FlashAttention-2's benchmarks count them: the kernels skip the hidden tiles, and a
        full-square count would put a causal run above the FMA peak. Additive attention has no such
        standard count (tanh dominates): None, and its rows give times and ratios only.
        """
        if self.kind == "additive":
            return None
        per_pair = 2.0 * self.B * self.H * self.visible_pairs() * self.D
        return per_pair * (7 if self.kind == "fwdbwd" else 5)

    def visible_pairs(self) -> int:
        """(query, key) pairs the scores cover: Lq·Lk, or the top-left causal triangle."""
        if not self.causal:
            return self.Lq * self.Lk
        n = min(self.Lq, self.Lk)  # rows i < n see i + 1 keys, the rest see all Lk
        return n * (n + 1) // 2 + (self.Lq - n) * self.Lk

    def gradient_bytes(self) -> int:
        """Bytes of the gradients the call returns (dq, dk, dv; additive: also dW_q, dW_k, db, dv_a)."""
        itemsize = storage_dtype(self.dtype).itemsize
        if self.kind == "additive":
            return (self.B * (self.Lq + 2 * self.Lk) * self.D + 2 * self.A * self.D + 2 * self.A) * itemsize
        return self.B * self.H * (self.Lq + 2 * self.Lk) * self.D * itemsize

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update({"name": self.name, "flops": self.flops(), "gradient_bytes": self.gradient_bytes()})
        return d


def case_from_dict(d: Dict[str, Any]) -> BackwardCase:
    """Inverse of :meth:`BackwardCase.to_dict` (the memory child gets its case as JSON)."""
    names = {f.name for f in dataclasses.fields(BackwardCase)}
    return BackwardCase(**{k: v for k, v in d.items() if k in names})


#: The additive case of the issue: the seq2seq training batch, the source lengths masked.
ADDITIVE_CASE = BackwardCase("additive", 64, 1, 40, 50, 256, A=256, label="seq2seq batch, kv_lengths")
#: The memory case of the issue: the unfused backward would hold several 8 GiB (B, H, L, L) matrices.
MEMORY_CASE = BackwardCase("fwdbwd", 1, 2, 32768, 32768, 64, label="memory")


def default_backward_cases(with_bfloat16: bool = True) -> List[BackwardCase]:
    """The issue's rows: float32 forward+backward, bfloat16 forward+backward, backward alone, additive."""
    cases = [BackwardCase("fwdbwd", *shape, causal=causal, label=label)
             for shape, causal, label in BACKWARD_SHAPES]
    if with_bfloat16:
        cases += [BackwardCase("fwdbwd", *shape, dtype="bfloat16", causal=causal, label=label)
                  for shape, causal, label in BACKWARD_BF16_SHAPES]
    cases.append(BackwardCase("bwd", *BACKWARD_ALONE_SHAPE, label="long context, backward alone"))
    cases.append(ADDITIVE_CASE)
    return cases


def shape_backward_cases(shapes: Sequence[Any], dtype: str, causal: bool) -> List[BackwardCase]:
    """``--backward --shape ...``: forward+backward and the backward alone for each shape."""
    out = []
    for s in shapes:
        b, h, lq, lk, d = s.shape if hasattr(s, "shape") else tuple(s)
        out += [BackwardCase(kind, b, h, lq, lk, d, dtype=dtype, causal=causal, label="--shape")
                for kind in ("fwdbwd", "bwd")]
    return out


def make_backward_inputs(case: BackwardCase, seed: int = 0) -> Dict[str, np.ndarray]:
    """Deterministic inputs in the case's storage dtype: q, k, v, dout (+ the additive weights, lengths).

    Additive weights are scaled by 1/sqrt(D) (the usual initialisation) so tanh works in its sensitive
    range, as in ``benchmarks/bench_additive.py``; key lengths are drawn from Lk/2..Lk.
    """
    rng = np.random.default_rng(seed)
    dtype = storage_dtype(case.dtype)

    def normal(*shape: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal(shape)).astype(dtype)

    if case.kind == "additive":
        B, Lq, Lk, D, A = case.shape
        return {"q": normal(B, Lq, D), "k": normal(B, Lk, D), "v": normal(B, Lk, D),
                "dout": normal(B, Lq, D), "w_q": normal(A, D, scale=D ** -0.5),
                "w_k": normal(A, D, scale=D ** -0.5), "v_a": normal(A, scale=A ** -0.5),
                "score_bias": normal(A, scale=0.1),
                "kv_lengths": rng.integers(max(1, Lk // 2), Lk + 1, size=B).astype(np.int64)}
    B, H, Lq, Lk, D = case.shape
    return {"q": normal(B, H, Lq, D), "k": normal(B, H, Lk, D), "v": normal(B, H, Lk, D),
            "dout": normal(B, H, Lq, D)}


def gradient_names(case: BackwardCase) -> Tuple[str, ...]:
    """The gradients each implementation returns for ``case``, by their AttentionGrads field names."""
    if case.kind == "additive":
        return ("dq", "dk", "dv", "dw_q", "dw_k", "dscore_bias", "dv_a")
    return ("dq", "dk", "dv")


def attnfast_kwargs(case: BackwardCase, inputs: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """The keyword arguments of ``attention`` and ``attention_backward`` for ``case``."""
    if case.kind == "additive":
        return {"method": "additive", **{n: inputs[n] for n in ("w_q", "w_k", "v_a", "score_bias",
                                                                 "kv_lengths")}}
    return {"causal": True} if case.causal else {}


Runner = Callable[[], object]
ToGrads = Callable[[object], Dict[str, np.ndarray]]


# ----------------------------------------------------------------------------------------------------
class AttnfastBackward(peers.AttnfastImpl):
    """``attnfast.attention(..., return_lse=True)`` then ``attnfast.attention_backward``."""

    def backward_note(self, case: BackwardCase) -> Optional[str]:
        return None

    def _import(self) -> None:
        super()._import()
        from attnfast import _attnfast

        if not hasattr(self._mod, "attention_backward"):
            raise ImportError("this attnfast has no attention_backward (the backward pass is not built in)")
        if not hasattr(_attnfast, "attention_backward"):
            raise ImportError("attnfast's compiled module has no attention_backward kernel (rebuild it)")

    def prepare_backward(self, case: BackwardCase, inputs: Dict[str, np.ndarray]) -> Tuple[Runner, ToGrads]:
        af = self._mod
        q, k, v, dout = (inputs[n] for n in ("q", "k", "v", "dout"))
        kw = attnfast_kwargs(case, inputs)
        names = gradient_names(case)

        def to_grads(g: Any) -> Dict[str, np.ndarray]:
            return {n: np.asarray(getattr(g, n)) for n in names}

        if case.kind == "bwd":
            out, lse = af.attention(q, k, v, return_lse=True, **kw)
            return (lambda: af.attention_backward(dout, q, k, v, out, lse, **kw)), to_grads

        def run() -> object:
            out, lse = af.attention(q, k, v, return_lse=True, **kw)
            return af.attention_backward(dout, q, k, v, out, lse, **kw)

        return run, to_grads


class TorchBackward(peers.TorchImpl):
    """PyTorch autograd: SDPA for dot-product scores, the eager formula for additive ones."""

    label = "PyTorch SDPA"

    def label_for(self, case: Any, dtype: Any = None) -> str:
        return "PyTorch eager autograd" if case.kind == "additive" else "PyTorch SDPA autograd"

    def _leaf(self, a: np.ndarray) -> Any:
        """A leaf tensor with requires_grad on ``a``'s buffer (zero-copy; bfloat16 via the int16 view)."""
        return self._tensor(a).detach().requires_grad_(True)

    def prepare_backward(self, case: BackwardCase, inputs: Dict[str, np.ndarray]) -> Tuple[Runner, ToGrads]:
        torch = self._torch
        names = gradient_names(case)
        order = ("q", "k", "v", "w_q", "w_k", "score_bias", "v_a")[:len(names)]
        leaves = [self._leaf(inputs[n]) for n in order]
        dout = self._tensor(inputs["dout"])
        forward = self._additive_forward(inputs) if case.kind == "additive" else self._sdpa_forward(case)

        def to_grads(grads: Any) -> Dict[str, np.ndarray]:
            return {n: self._to_numpy(g) for n, g in zip(names, grads)}

        if case.kind == "bwd":
            out = forward(*leaves)  # the graph is kept: each timed call runs the backward only
            return (lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)), to_grads

        def run() -> object:
            for t in leaves:
                t.grad = None
            forward(*leaves).backward(dout)
            return [t.grad for t in leaves]

        return run, to_grads

    def backward_note(self, case: BackwardCase) -> Optional[str]:
        """Which backward node autograd records for SDPA at this dtype and mask (its CPU kernel's name)."""
        if case.kind == "additive":
            return "eager ops; autograd keeps the (B, Lq, Lk, A) tanh tensor for the backward"
        x = self._leaf(np.zeros((1, 1, 8, case.D), dtype=storage_dtype(case.dtype)))
        node = self._sdpa_forward(case)(x, x, x).grad_fn
        return f"autograd node {type(node).__name__}"

    def _sdpa_forward(self, case: BackwardCase) -> Callable[..., Any]:
        sdpa = self._torch.nn.functional.scaled_dot_product_attention
        return lambda q, k, v: sdpa(q, k, v, is_causal=case.causal)

    def _additive_forward(self, inputs: Dict[str, np.ndarray]) -> Callable[..., Any]:
        """Bahdanau attention as written with broadcasting; the projections as 2-D GEMMs over (B·L, D)
        rows (a stacked (B, L, D) @ (D, A) is far slower and would flatter attnfast)."""
        torch = self._torch
        lengths = torch.from_numpy(inputs["kv_lengths"])

        def forward(q: Any, k: Any, v: Any, w_q: Any, w_k: Any, b: Any, v_a: Any) -> Any:
            B, Lq, D = q.shape
            Lk, A = k.shape[1], w_q.shape[0]
            qp = (q.reshape(B * Lq, D) @ w_q.T).reshape(B, Lq, A)
            kp = (k.reshape(B * Lk, D) @ w_k.T).reshape(B, Lk, A)
            s = torch.tanh(qp[:, :, None, :] + kp[:, None, :, :] + b) @ v_a  # (B, Lq, Lk)
            hidden = torch.arange(Lk)[None, :] >= lengths[:, None]  # (B, Lk): padding keys
            s = s.masked_fill(hidden[:, None, :], float("-inf"))
            return torch.softmax(s, dim=-1) @ v

        return forward


BackwardImpl = Union[AttnfastBackward, TorchBackward]


def backward_impls() -> List[BackwardImpl]:
    """attnfast, then PyTorch (optional: a missing torch is reported, not an error)."""
    return [AttnfastBackward(), TorchBackward()]
