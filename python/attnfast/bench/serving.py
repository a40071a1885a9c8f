"""The serving suite's cases: packed variable-length batches, paged and int8 KV caches, score modifiers.

Each case is one row group of the serving issue's speed table. It names its *variants* (the calls timed
side by side, interleaved in the same rounds), its *goals* (a variant against another: a speed ratio, or
for int8 an error ratio), how to build deterministic inputs, how to run each variant and which part of
its result is checked against the float64 reference.

* :class:`VarlenCase`: ``attention_varlen`` on 32 packed causal sequences against ``attention`` on the
  same batch padded to the longest with ``kv_lengths`` and PyTorch SDPA padded with a bool mask.
* :class:`PagedDecodeCase`: decode through a shuffled ``block_table`` (block sizes 16 and 128) against
  the same cache laid out contiguously.
* :class:`Int8DecodeCase`: decode over int8 K / V with per-row scales (``quantize_kv``) against float32
  decode over the dequantised cache; its error against a naive float32 implementation's.
* :class:`ModifierCase`: softcap, ALiBi and sinks each against the plain call on the encoder shape.

A variant that needs a feature this attnfast does not have fails when it is prepared or checked (see
:mod:`.serving_run`): no number is reported for it. Nothing here imports attnfast or a peer at import
time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import numpy as np

from .cases import DEFAULT_SHAPES

__all__ = ["Variant", "Goal", "ServingCase", "VarlenCase", "PagedDecodeCase", "Int8DecodeCase",
           "ModifierCase", "default_serving_cases", "alibi_slopes", "pack_padded", "paged_cache",
           "shuffled_block_table"]

Runner = Callable[[], object]
ToChecked = Callable[[object], np.ndarray]

#: The encoder shape of the forward suite (8, 8, 512, 512, 64), the modifiers' shape.
ENCODER_SHAPE = DEFAULT_SHAPES[0][0]
#: The issue's decode shapes (B, Hq, Lq, Lk, D); the KV heads are as many as the query heads.
DECODE_SHAPES = ((1, 32, 1, 4096, 128), (8, 8, 1, 8192, 128))
PAGE_SIZES = (16, 128)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One timed call: ``name`` keys its row, ``impl`` the library (attnfast or torch), ``needs`` the
    API it relies on (named when it is missing)."""

    name: str
    label: str
    impl: str = "attnfast"
    needs: str = ""


@dataclasses.dataclass(frozen=True)
class Goal:
    """``metric`` "speedup": median(baseline) / median(subject) >= ``bound``; "error_ratio":
    error(subject) / error of the naive float32 implementation <= ``bound``."""

    subject: str
    baseline: str
    bound: float
    metric: str = "speedup"

    def met(self, value: Optional[float]) -> Optional[bool]:
        if value is None:
            return None
        return bool(value >= self.bound) if self.metric == "speedup" else bool(value <= self.bound)

    def text(self) -> str:
        if self.metric == "speedup":
            return f"≥ {self.bound:g}× {self.baseline}"
        return f"error ≤ {self.bound:g}× naive float32's"


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float64).astype(np.float32)


def _head(a: Any) -> np.ndarray:
    """The checked part of a (B, H, ...) result: batch item 0, every head, in float64."""
    return np.asarray(a)[:1].astype(np.float64)


class ServingCase:
    """Interface of the serving cases (frozen dataclasses below)."""

    kind: ClassVar[str] = "?"
    label: str = ""

    @property
    def name(self) -> str:
        raise NotImplementedError

    def variants(self) -> Tuple[Variant, ...]:
        raise NotImplementedError

    def goals(self) -> Tuple[Goal, ...]:
        raise NotImplementedError

    def make_inputs(self, seed: int = 0) -> Dict[str, Any]:
        raise NotImplementedError

    def prepare(self, variant: Variant, inputs: Dict[str, Any], impl: Any) -> Tuple[Runner, ToChecked]:
        """A zero-argument call of ``variant`` and the map from its result to the checked part."""
        raise NotImplementedError

    def reference_key(self, variant: Variant) -> str:
        """Variants with the same key share one reference result (all of them, unless they compute
        different functions)."""
        return ""

    def reference(self, inputs: Dict[str, Any], key: str = "") -> np.ndarray:
        """The float64 result on the checked part (``attnfast.reference``) of the variants of ``key``."""
        raise NotImplementedError

    def naive_error_inputs(self, inputs: Dict[str, Any]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """q, k, v (float32, checked part) of the naive implementation whose error is a goal's unit."""
        return None

    def flops(self) -> Optional[float]:
        """Useful FLOPs of a call (compute-bound cases), None for the memory-bound ones."""
        return None

    def bytes_moved(self, variant: Variant) -> Optional[float]:
        """Least bytes a call of ``variant`` reads and writes (memory-bound cases), else None."""
        return None

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = dataclasses.asdict(self)  # type: ignore[call-overload]  # subclasses are dataclasses
        d.update({"kind": self.kind, "name": self.name, "flops": self.flops(),
                  "variants": [dataclasses.asdict(v) for v in self.variants()],
                  "goals": [dataclasses.asdict(g) for g in self.goals()]})
        return d


# ----------------------------------------------------------------------------------------------------
def pack_padded(padded: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(n, H, Lmax, D) rows of each sequence's first lengths[s] positions -> packed (H, T, D)."""
    return np.concatenate([padded[s, :, :n] for s, n in enumerate(lengths)], axis=1)


def _padded(packed: np.ndarray, cu: np.ndarray, width: int) -> np.ndarray:
    """Packed (H, T, D) -> (n, H, width, D), zeros after each sequence."""
    n = cu.size - 1
    out = np.zeros((n, packed.shape[0], width, packed.shape[2]), dtype=packed.dtype)
    for s in range(n):
        out[s, :, :cu[s + 1] - cu[s]] = packed[:, cu[s]:cu[s + 1]]
    return out


@dataclasses.dataclass(frozen=True)
class VarlenCase(ServingCase):
    """``sequences`` causal self-attention sequences of lengths uniform in [min_len, max_len]."""

    sequences: int = 32
    min_len: int = 16
    max_len: int = 512
    H: int = 8
    D: int = 64
    seed: int = 0
    label: str = "packed variable-length batch"
    kind: ClassVar[str] = "varlen"

    @property
    def name(self) -> str:
        return (f"varlen {self.sequences} sequences, lengths {self.min_len}..{self.max_len}, "
                f"H={self.H} D={self.D} causal")

    def variants(self) -> Tuple[Variant, ...]:
        return (Variant("varlen", "attnfast attention_varlen (packed)", needs="attnfast.attention_varlen"),
                Variant("padded", "attnfast attention, padded + kv_lengths"),
                Variant("torch_padded", "PyTorch SDPA, padded + bool mask", impl="torch"))

    def goals(self) -> Tuple[Goal, ...]:
        return (Goal("varlen", "padded", 1.5), Goal("varlen", "torch_padded", 2.5))

    def lengths(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.integers(self.min_len, self.max_len + 1, size=self.sequences)

    def flops(self) -> Optional[float]:
        pairs = sum(int(n) * (int(n) + 1) // 2 for n in self.lengths())  # the causal triangles
        return 4.0 * self.H * self.D * pairs

    def make_inputs(self, seed: int = 0) -> Dict[str, Any]:
        lengths = self.lengths()
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        rng = np.random.default_rng(seed + 1)
        q, k, v = (_normal(rng, self.H, int(cu[-1]), self.D) for _ in range(3))
        width = int(lengths.max())
        return {"q": q, "k": k, "v": v, "cu": cu, "lengths": lengths, "width": width,
                **{f"{n}_padded": _padded(a, cu, width) for n, a in (("q", q), ("k", k), ("v", v))}}

    def prepare(self, variant: Variant, inputs: Dict[str, Any], impl: Any) -> Tuple[Runner, ToChecked]:
        lengths = inputs["lengths"]
        if variant.name == "varlen":
            af = impl._mod
            q, k, v, cu = (inputs[n] for n in ("q", "k", "v", "cu"))
            return (lambda: af.attention_varlen(q, k, v, cu, cu, causal=True)), np.asarray
        qp, kp, vp = (inputs[f"{n}_padded"] for n in "qkv")
        unpad = lambda out: pack_padded(np.asarray(out), lengths)  # noqa: E731
        if variant.name == "padded":
            af = impl._mod
            kv_lengths = lengths[:, None]  # broadcast over the heads
            return (lambda: af.attention(qp, kp, vp, causal=True, kv_lengths=kv_lengths)), unpad
        return self._torch_padded(impl, qp, kp, vp, lengths, unpad)

    def _torch_padded(self, impl: Any, qp: np.ndarray, kp: np.ndarray, vp: np.ndarray, lengths: np.ndarray,
                      unpad: Callable[[np.ndarray], np.ndarray]) -> Tuple[Runner, ToChecked]:
        torch = impl._torch
        width = qp.shape[2]
        i, j = np.arange(width)[:, None], np.arange(width)[None, :]
        mask = (j <= i) & (j < lengths[:, None, None, None])  # (n, 1, width, width): causal and padding
        tq, tk, tv = (impl._tensor(a) for a in (qp, kp, vp))
        tmask = torch.from_numpy(mask)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run() -> object:
            with torch.inference_mode():
                return sdpa(tq, tk, tv, attn_mask=tmask)

        return run, lambda out: unpad(impl._to_numpy(out))

    def reference(self, inputs: Dict[str, Any], key: str = "") -> np.ndarray:
        from attnfast import reference

        cu = inputs["cu"]
        parts = [reference.attention(*(inputs[n][:, cu[s]:cu[s + 1]].astype(np.float64) for n in "qkv"),
                                     causal=True) for s in range(cu.size - 1)]
        return np.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------------------------------
def shuffled_block_table(batch: int, length: int, block_size: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, length / block_size) int32: a random permutation of the pages, so neighbouring keys live
    in unrelated pages."""
    if length % block_size:
        raise ValueError(f"block_size {block_size} does not divide the cache length {length}")
    per_item = length // block_size
    return rng.permutation(batch * per_item).astype(np.int32).reshape(batch, per_item)


def paged_cache(contiguous: np.ndarray, block_table: np.ndarray) -> np.ndarray:
    """A (B, H, L, D) cache scattered into pages (B·L/bs, H, bs, D) by a (B, L/bs) block table: key j
    of item b is ``pages[block_table[b, j // bs], :, j % bs]``, the layout of the ``block_table``
    argument."""
    B, H, L, D = contiguous.shape
    per_item = block_table.shape[1]
    block_size = L // per_item
    blocks = contiguous.reshape(B, H, per_item, block_size, D).transpose(0, 2, 1, 3, 4)
    pages = np.empty((B * per_item, H, block_size, D), dtype=contiguous.dtype)
    pages[block_table.reshape(-1)] = blocks.reshape(B * per_item, H, block_size, D)
    return pages


@dataclasses.dataclass(frozen=True)
class _DecodeCase(ServingCase):
    B: int = 1
    H: int = 32
    Lk: int = 4096
    D: int = 128
    seed: int = 0

    @property
    def shape(self) -> Tuple[int, int, int, int, int]:
        return (self.B, self.H, 1, self.Lk, self.D)

    def _q_and_out_bytes(self) -> int:
        return 2 * self.B * self.H * self.D * 4

    def _kv_elements(self) -> int:
        return 2 * self.B * self.H * self.Lk * self.D

    def reference(self, inputs: Dict[str, Any], key: str = "") -> np.ndarray:
        from attnfast import reference

        k, v = self._reference_kv(inputs)
        return np.asarray(reference.attention(inputs["q"][:1].astype(np.float64), k, v))

    def _reference_kv(self, inputs: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        return inputs["k"][:1].astype(np.float64), inputs["v"][:1].astype(np.float64)


@dataclasses.dataclass(frozen=True)
class PagedDecodeCase(_DecodeCase):
    """One decode step over a cache read through shuffled pages, against the contiguous cache."""

    block_sizes: Tuple[int, ...] = PAGE_SIZES
    label: str = "paged KV-cache decode"
    kind: ClassVar[str] = "paged"

    @property
    def name(self) -> str:
        return f"paged decode B={self.B} H={self.H} Lq=1 Lk={self.Lk} D={self.D}"

    def variants(self) -> Tuple[Variant, ...]:
        return ((Variant("contiguous", "attnfast, contiguous cache"),)
                + tuple(Variant(f"paged{bs}", f"attnfast, paged, block_size {bs}", needs="attention(block_table=)")
                        for bs in self.block_sizes))

    def goals(self) -> Tuple[Goal, ...]:
        return tuple(Goal(f"paged{bs}", "contiguous", 0.9) for bs in self.block_sizes)

    def bytes_moved(self, variant: Variant) -> Optional[float]:
        table = 0
        if variant.name.startswith("paged"):
            table = self.B * self.Lk // int(variant.name[len("paged"):]) * 4
        return float(self._kv_elements() * 4 + self._q_and_out_bytes() + table)

    def make_inputs(self, seed: int = 0) -> Dict[str, Any]:
        rng = np.random.default_rng(seed + self.seed)
        q = _normal(rng, self.B, self.H, 1, self.D)
        k, v = (_normal(rng, self.B, self.H, self.Lk, self.D) for _ in range(2))
        inputs: Dict[str, Any] = {"q": q, "k": k, "v": v}
        for bs in self.block_sizes:
            table = shuffled_block_table(self.B, self.Lk, bs, rng)
            inputs[f"paged{bs}"] = (paged_cache(k, table), paged_cache(v, table), table)
        return inputs

    def prepare(self, variant: Variant, inputs: Dict[str, Any], impl: Any) -> Tuple[Runner, ToChecked]:
        af, q = impl._mod, inputs["q"]
        if variant.name == "contiguous":
            k, v = inputs["k"], inputs["v"]
            return (lambda: af.attention(q, k, v)), _head
        k_pages, v_pages, table = inputs[variant.name]
        return (lambda: af.attention(q, k_pages, v_pages, block_table=table)), _head


@dataclasses.dataclass(frozen=True)
class Int8DecodeCase(_DecodeCase):
    """One decode step over int8 K / V with float32 per-row scales against float32 over their values."""

    label: str = "int8 KV-cache decode"
    kind: ClassVar[str] = "int8"

    @property
    def name(self) -> str:
        return f"int8 decode B={self.B} H={self.H} Lq=1 Lk={self.Lk} D={self.D}"

    def variants(self) -> Tuple[Variant, ...]:
        return (Variant("float32", "attnfast, float32 cache (dequantised values)"),
                Variant("int8", "attnfast, int8 cache + per-row scales",
                        needs="attention(k_scale=, v_scale=) on int8 K / V"))

    def goals(self) -> Tuple[Goal, ...]:
        return (Goal("int8", "float32", 2.5), Goal("int8", "naive float32", 2.0, metric="error_ratio"))

    def bytes_moved(self, variant: Variant) -> Optional[float]:
        if variant.name == "int8":
            scales = 2 * self.B * self.H * self.Lk * 4
            return float(self._kv_elements() + scales + self._q_and_out_bytes())
        return float(self._kv_elements() * 4 + self._q_and_out_bytes())

    def make_inputs(self, seed: int = 0) -> Dict[str, Any]:
        """q and a float32 cache, quantised by ``attnfast.quantize_kv`` (AttributeError without it)."""
        import attnfast

        rng = np.random.default_rng(seed + self.seed)
        q = _normal(rng, self.B, self.H, 1, self.D)
        inputs = {"q": q}
        for n in "kv":
            x8, scale = attnfast.quantize_kv(_normal(rng, self.B, self.H, self.Lk, self.D))
            inputs[n + "8"], inputs[n + "_scale"] = x8, scale
            inputs[n] = x8.astype(np.float32) * scale[..., None]  # the values the int8 cache stands for
        return inputs

    def _reference_kv(self, inputs: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
        return tuple(inputs[n + "8"][:1].astype(np.float64) * inputs[n + "_scale"][:1, ..., None].astype(np.float64)
                     for n in "kv")

    def naive_error_inputs(self, inputs: Dict[str, Any]) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return inputs["q"][:1], inputs["k"][:1], inputs["v"][:1]

    def prepare(self, variant: Variant, inputs: Dict[str, Any], impl: Any) -> Tuple[Runner, ToChecked]:
        af, q = impl._mod, inputs["q"]
        if variant.name == "float32":
            k, v = inputs["k"], inputs["v"]
            return (lambda: af.attention(q, k, v)), _head
        k8, v8, ks, vs = (inputs[n] for n in ("k8", "v8", "k_scale", "v_scale"))
        return (lambda: af.attention(q, k8, v8, k_scale=ks, v_scale=vs)), _head


# ----------------------------------------------------------------------------------------------------
def alibi_slopes(heads: int) -> np.ndarray:
    """The ALiBi paper's slopes, 2^(-8 (h + 1) / H) for head h (a geometric series; H a power of 2)."""
    return (2.0 ** (-8.0 * np.arange(1, heads + 1) / heads)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ModifierCase(ServingCase):
    """The plain call and each score modifier alone on the forward suite's encoder shape.

    The modifiers' values make each of them change the result well beyond float32 rounding (the suite's
    tests check that), so a build that ignored one would fail the reference check instead of reporting
    a plain call's time: softcap 5 on scores of unit variance caps the largest ones, and sinks near
    log(Lk) take a share of every row's softmax comparable to the keys'.
    """

    B: int = ENCODER_SHAPE[0]
    H: int = ENCODER_SHAPE[1]
    L: int = ENCODER_SHAPE[2]
    D: int = ENCODER_SHAPE[4]
    softcap: float = 5.0
    seed: int = 0
    label: str = "encoder, score modifiers"
    kind: ClassVar[str] = "modifier"

    @property
    def name(self) -> str:
        return f"modifiers B={self.B} H={self.H} Lq={self.L} Lk={self.L} D={self.D}"

    def variants(self) -> Tuple[Variant, ...]:
        return (Variant("plain", "attnfast, plain"),
                Variant("softcap", f"attnfast, softcap={self.softcap:g}", needs="attention(softcap=)"),
                Variant("alibi", "attnfast, alibi_slopes (H,)", needs="attention(alibi_slopes=)"),
                Variant("sinks", "attnfast, sinks (H,)", needs="attention(sinks=)"))

    def goals(self) -> Tuple[Goal, ...]:
        return tuple(Goal(name, "plain", 0.85) for name in ("softcap", "alibi", "sinks"))

    def flops(self) -> Optional[float]:
        return 4.0 * self.B * self.H * self.L * self.L * self.D

    def modifier_kwargs(self, inputs: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
        return {"plain": {}, "softcap": {"softcap": self.softcap},
                "alibi": {"alibi_slopes": inputs["alibi_slopes"]}, "sinks": {"sinks": inputs["sinks"]}}

    def make_inputs(self, seed: int = 0) -> Dict[str, Any]:
        rng = np.random.default_rng(seed + self.seed)
        q, k, v = (_normal(rng, self.B, self.H, self.L, self.D) for _ in range(3))
        sinks = (math.log(self.L) + rng.standard_normal(self.H)).astype(np.float32)
        return {"q": q, "k": k, "v": v, "alibi_slopes": alibi_slopes(self.H), "sinks": sinks}

    def prepare(self, variant: Variant, inputs: Dict[str, Any], impl: Any) -> Tuple[Runner, ToChecked]:
        af = impl._mod
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        kw = self.modifier_kwargs(inputs)[variant.name]
        return (lambda: af.attention(q, k, v, **kw)), lambda out: np.asarray(out)[:1, :1].astype(np.float64)

    def reference_key(self, variant: Variant) -> str:
        return variant.name  # each modifier computes a different function

    def reference(self, inputs: Dict[str, Any], key: str = "") -> np.ndarray:
        """The float64 result of the variant ``key`` on batch item 0, head 0."""
        from attnfast import reference

        kw: Dict[str, Any] = {n: (a[:1] if isinstance(a, np.ndarray) else a)
                              for n, a in self.modifier_kwargs(inputs)[key or "plain"].items()}
        q, k, v = (inputs[n][:1, :1].astype(np.float64) for n in "qkv")
        return np.asarray(reference.attention(q, k, v, **kw))


def default_serving_cases() -> List[ServingCase]:
    """The issue's speed table: varlen, paged and int8 decode at both decode shapes, the modifiers."""
    cases: List[ServingCase] = [VarlenCase()]
    for B, H, _, Lk, D in DECODE_SHAPES:
        cases.append(PagedDecodeCase(B=B, H=H, Lk=Lk, D=D))
    for B, H, _, Lk, D in DECODE_SHAPES:
        cases.append(Int8DecodeCase(B=B, H=H, Lk=Lk, D=D))
    cases.append(ModifierCase())
    return cases
