"""What the benchmark measures: attention shapes, stage shapes, and their work in FLOPs and bytes.

A *case* is one problem size that every implementation runs.  Each case knows how much arithmetic it
does and how many bytes it must move at least, and whether it is bound by the FMA units or by memory,
so the report can say how close each implementation gets to the machine's limit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import numpy as np

__all__ = [
    "AttentionCase",
    "StageCase",
    "DEFAULT_SHAPES",
    "SWEEP_FULL",
    "SWEEP_QUICK",
    "SWEEP_B_H_D",
    "MEMORY_BOUND_MAX_LQ",
    "DTYPES",
    "HALF_DTYPES",
    "MIXED_DECODE_SHAPES",
    "storage_dtype",
    "compute_dtype",
    "parse_shape",
    "default_cases",
    "stage_cases",
    "make_attention_inputs",
    "make_stage_inputs",
    "case_from_dict",
]

#: Decode-shaped calls with at most this many query rows are bound by reading K and V, not by FLOPs:
#: each key/value element read is used for only 2*Lq multiply-adds.
MEMORY_BOUND_MAX_LQ = 4

#: The five shapes of the fused-attention issue: (B, H, Lq, Lk, D) and what each stands for.
DEFAULT_SHAPES: List[Tuple[Tuple[int, int, int, int, int], str]] = [
    ((8, 8, 512, 512, 64), "encoder self-attention"),
    ((1, 8, 4096, 4096, 64), "long context"),
    ((64, 1, 40, 50, 256), "seq2seq training batch"),
    ((64, 1, 1, 50, 256), "one decoder step"),
    ((1, 32, 1, 4096, 128), "KV-cache decode"),
]

#: The storage dtypes ``--dtype`` accepts, and the 16-bit ones among them (bfloat16 is ml_dtypes').
DTYPES = ("float32", "float64", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")

#: Decode shapes that 16-bit runs also measure with a float32 query: a float32 decoder reading a 16-bit
#: KV cache, where halving the bytes of K and V is the whole point of the 16-bit storage.
MIXED_DECODE_SHAPES: List[Tuple[Tuple[int, int, int, int, int], str]] = [
    ((1, 32, 1, 4096, 128), "KV-cache decode, float32 q"),
    ((64, 1, 1, 50, 256), "one decoder step, float32 q"),
]

#: Sequence-length sweep Lq = Lk at B=1, H=8, D=64: the full run and the --quick run.
SWEEP_B_H_D = (1, 8, 64)
SWEEP_FULL = (256, 512, 1024, 2048, 4096, 8192)
SWEEP_QUICK = (256, 1024, 4096)


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    """Fused attention on q (B, H, Lq, D), k and v (B, H, Lk, D)."""

    B: int
    H: int
    Lq: int
    Lk: int
    D: int
    label: str = ""
    group: str = "suite"  # "suite" (the default shapes or --shape) or "sweep"
    #: The query's dtype when it differs from K's and V's (the run's dtype); None: the run's dtype.
    q_dtype: Optional[str] = None
    kind: str = dataclasses.field(default="attention", init=False)

    @property
    def name(self) -> str:
        name = f"attention B={self.B} H={self.H} Lq={self.Lq} Lk={self.Lk} D={self.D}"
        return name + (f" q={self.q_dtype}" if self.q_dtype else "")

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        return (self.B, self.H, self.Lq, self.Lk, self.D)

    def flops(self, causal: bool = False) -> float:
        """4·B·H·Lq·Lk·D: two matmuls (QKᵀ and P·V) of 2 FLOPs per multiply-add.

        Causal masking is not subtracted: every implementation is credited the same nominal work, as
        the FlashAttention papers do, so GFLOP/s stay comparable between the causal and full runs.
        """
        return 4.0 * self.B * self.H * self.Lq * self.Lk * self.D

    def bytes_moved(self, itemsize: int, q_itemsize: Optional[int] = None) -> float:
        """The least traffic a kernel can have: read q, K and V once, write the output once.

        ``itemsize`` is K's and V's; q and the output have ``q_itemsize`` (default: :attr:`q_dtype`'s,
        else ``itemsize``): a float32 query over a 16-bit cache gives a float32 output.
        """
        if q_itemsize is None:
            q_itemsize = np.dtype(self.q_dtype).itemsize if self.q_dtype else itemsize
        q_and_out = 2 * self.B * self.H * self.Lq * self.D
        k_and_v = 2 * self.B * self.H * self.Lk * self.D
        return float(q_and_out * q_itemsize + k_and_v * itemsize)

    @property
    def memory_bound(self) -> bool:
        return self.Lq <= MEMORY_BOUND_MAX_LQ

    def output_bytes(self, itemsize: int) -> int:
        if self.q_dtype:
            itemsize = max(itemsize, np.dtype(self.q_dtype).itemsize)  # the promoted result dtype
        return self.B * self.H * self.Lq * self.D * itemsize

    def score_matrix_bytes(self, itemsize: int) -> int:
        """Size of the (B, H, Lq, Lk) score matrix that unfused implementations build."""
        return self.B * self.H * self.Lq * self.Lk * itemsize

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "label": self.label, "group": self.group,
                "B": self.B, "H": self.H, "Lq": self.Lq, "Lk": self.Lk, "D": self.D, "q_dtype": self.q_dtype}


@dataclasses.dataclass(frozen=True)
class StageCase:
    """One of the three stages on its own.

    ``scores``:    q (B, Lq, D) · k (B, Lk, D)ᵀ -> (B, Lq, Lk)
    ``softmax``:   over the last axis of (B, Lq, Lk)
    ``aggregate``: weights (B, Lq, Lk) @ v (B, Lk, D) -> (B, Lq, D)
    """

    stage: str
    B: int
    Lq: int
    Lk: int
    D: int
    label: str = ""
    group: str = dataclasses.field(default="stage", init=False)
    kind: str = dataclasses.field(default="stage", init=False)

    @property
    def name(self) -> str:
        if self.stage == "softmax":
            return f"softmax ({self.B},{self.Lq},{self.Lk})"
        if self.stage == "scores":
            return f"scores ({self.B},{self.Lq},{self.D})·({self.B},{self.Lk},{self.D})ᵀ"
        return f"aggregate ({self.B},{self.Lq},{self.Lk})@({self.B},{self.Lk},{self.D})"

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (self.B, self.Lq, self.Lk, self.D)

    def flops(self, causal: bool = False) -> float:
        if self.stage == "softmax":
            # max, subtract, exp, sum, divide: ~5 operations per element; the stage is memory-bound anyway.
            return 5.0 * self.B * self.Lq * self.Lk
        return 2.0 * self.B * self.Lq * self.Lk * self.D

    def bytes_moved(self, itemsize: int) -> float:
        if self.stage == "softmax":
            return 2.0 * self.B * self.Lq * self.Lk * itemsize  # read x, write the weights
        if self.stage == "scores":
            return float((self.B * (self.Lq + self.Lk) * self.D + self.B * self.Lq * self.Lk) * itemsize)
        return float((self.B * self.Lq * self.Lk + self.B * self.Lk * self.D + self.B * self.Lq * self.D)
                     * itemsize)

    @property
    def memory_bound(self) -> bool:
        return self.stage == "softmax"

    def output_bytes(self, itemsize: int) -> int:
        if self.stage == "aggregate":
            return self.B * self.Lq * self.D * itemsize
        return self.B * self.Lq * self.Lk * itemsize

    def score_matrix_bytes(self, itemsize: int) -> int:
        return self.B * self.Lq * self.Lk * itemsize

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "label": self.label, "group": self.group,
                "stage": self.stage, "B": self.B, "Lq": self.Lq, "Lk": self.Lk, "D": self.D}


def storage_dtype(name: Any) -> np.dtype:
    """The NumPy dtype of a ``--dtype`` name; bfloat16 needs ml_dtypes (imported only then)."""
    name = np.dtype(name).name if not isinstance(name, str) else name
    dtype: np.dtype
    if name == "bfloat16":
        import ml_dtypes
        dtype = np.dtype(ml_dtypes.bfloat16)
        return dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    dtype = np.dtype(name)
    return dtype


def compute_dtype(name: Any) -> np.dtype:
    """The type the arithmetic runs in: float64 for float64 data, float32 for everything else."""
    return np.dtype(np.float64) if storage_dtype(name) == np.float64 else np.dtype(np.float32)


def parse_shape(text: str) -> AttentionCase:
    """Parse ``"B,H,Lq,Lk,D"`` (five positive integers) into an :class:`AttentionCase`."""
    parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 5:
        raise ValueError(f"--shape wants five integers B,H,Lq,Lk,D, e.g. 8,8,512,512,64; got {text!r}")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--shape wants integers B,H,Lq,Lk,D, got {text!r}") from None
    if min(dims) < 1:
        raise ValueError(f"--shape dimensions must be >= 1, got {text!r}")
    b, h, lq, lk, d = dims
    return AttentionCase(b, h, lq, lk, d, label="--shape")


def default_cases(quick: bool, dtype: str = "float32") -> List[AttentionCase]:
    """The five issue shapes, then (16-bit ``dtype``) the float32-query decode shapes, then the sweep."""
    cases = [AttentionCase(*shape, label=label) for shape, label in DEFAULT_SHAPES]
    if dtype in HALF_DTYPES:
        cases += [AttentionCase(*shape, label=label, q_dtype="float32") for shape, label in MIXED_DECODE_SHAPES]
    seen = {c.shape for c in cases}
    b, h, d = SWEEP_B_H_D
    for length in SWEEP_QUICK if quick else SWEEP_FULL:
        case = AttentionCase(b, h, length, length, d, label=f"sweep L={length}", group="sweep")
        if case.shape in seen:
            # Measured once, reported in the suite and used as a sweep point as well.
            cases = [dataclasses.replace(c, group="suite+sweep") if c.shape == case.shape else c
                     for c in cases]
            continue
        cases.append(case)
    return cases


def stage_cases() -> List[StageCase]:
    """The three stages at B=64, L=512, D=64 (a batch of 64 heads of the encoder shape)."""
    return [
        StageCase("scores", 64, 512, 512, 64, label="QKᵀ"),
        StageCase("softmax", 64, 512, 512, 64, label="row softmax"),
        StageCase("aggregate", 64, 512, 512, 64, label="P·V"),
    ]


def make_attention_inputs(case: AttentionCase, dtype: Any, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic q, k, v in (B, H, L, D) layout; standard normal, like projected activations.

    k and v have ``dtype``; q has the case's :attr:`~AttentionCase.q_dtype` when it sets one.
    """
    rng = np.random.default_rng(seed)
    q_dtype = storage_dtype(case.q_dtype) if case.q_dtype else dtype
    q = rng.standard_normal((case.B, case.H, case.Lq, case.D), dtype=np.float64).astype(q_dtype)
    k = rng.standard_normal((case.B, case.H, case.Lk, case.D), dtype=np.float64).astype(dtype)
    v = rng.standard_normal((case.B, case.H, case.Lk, case.D), dtype=np.float64).astype(dtype)
    return q, k, v


def make_stage_inputs(case: StageCase, dtype: Any, seed: int = 0) -> Tuple[np.ndarray, ...]:
    """Inputs of one stage: (q, k) for scores, (x,) for softmax, (weights, v) for aggregate."""
    rng = np.random.default_rng(seed)
    if case.stage == "scores":
        q = rng.standard_normal((case.B, case.Lq, case.D)).astype(dtype)
        k = rng.standard_normal((case.B, case.Lk, case.D)).astype(dtype)
        return (q, k)
    if case.stage == "softmax":
        # Scores of unit-variance q, k scaled by 1/sqrt(D) have unit variance too.
        return (rng.standard_normal((case.B, case.Lq, case.Lk)).astype(dtype),)
    w = rng.random((case.B, case.Lq, case.Lk))
    w /= w.sum(axis=-1, keepdims=True)  # rows of a softmax sum to one
    v = rng.standard_normal((case.B, case.Lk, case.D))
    return (w.astype(dtype), v.astype(dtype))



def case_from_dict(d: Dict[str, Any]) -> Union[AttentionCase, StageCase]:
    """Inverse of ``to_dict()`` (for the memory child, which gets its cases as JSON)."""
    cls: Union[Type[AttentionCase], Type[StageCase]] = AttentionCase if d["kind"] == "attention" else StageCase
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return cls(**{k: v for k, v in d.items() if k in names})
