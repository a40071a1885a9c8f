"""Greedy decoding with a paged int8 KV cache, checked against a float32 run without pages.

A small decoder-only transformer with random weights, in NumPy: token embeddings, pre-norm blocks of grouped-query attention (RoPE on q and k) and a SiLU MLP, RMSNorm.  It
continues a batch of prompts of different lengths greedily, twice:

* **served**: the way an inference server keeps its cache.  Every layer's K and V live in int8 pages of
  ``block_size`` tokens, ``(num_blocks, Hk, block_size, head_dim)``, with one float32 scale per token
  and head (``attnfast.quantize_kv``), preallocated for the longest sequence; each sequence owns pages
  scattered through the pool (a shuffled ``block_table``, as an allocator hands them out).  The prompts
  are prefilled with ONE causal call per layer: their K and V are written to the pages, and the queries,
  right-aligned in a (B, Hq, longest prompt, head_dim) block (prompt b fills its last rows), attend
  with ``kv_lengths`` = each prompt's length and ``causal_align="bottom_right"``, which aligns the
  diagonal to each item's ``kv_lengths`` (the last query row sees key ``kv_lengths[b] - 1``).  Then each step
  decodes one token per sequence: its K and V are quantised into the next slot and one call per layer
  reads the pages through the block table.  Slots not yet written hold garbage that would overflow any
  result it reached (the largest float32 scale; NaN in float32 pages): the kernels never read a key at
  or past ``kv_lengths``.
* **reference**: each sequence on its own, float32, in a contiguous cache: the prompt through one plain
  causal call (Lq = Lk), each decoded token through a call over the cache's filled prefix; it is fed
  the served run's tokens, so both runs see the same inputs at every step.

Every served token must be the reference's greedy choice, or a near tie (the reference's two best logits
closer than twice that step's logit difference, which int8 rounding may decide either way; once it did,
free-running greedy runs would continue different texts), and the logits must stay close: int8 keys and
values carry up to 0.4% error per element, so the logits differ by a small fraction of their spread.
With ``--cache float32`` the served run keeps float32 pages and matches the reference to float32
rounding.

Run:  python examples/kv_cache_decode.py [--smoke] [--steps N] [--cache int8|float32]
(--smoke takes a second and is what the tests run)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

import attnfast

Params = Dict[str, np.ndarray]


@dataclass(frozen=True)
class Config:
    vocab: int = 512
    d_model: int = 256
    layers: int = 4
    q_heads: int = 8
    kv_heads: int = 2          # GQA: query head h reads kv head h // (q_heads / kv_heads)
    mlp: int = 768
    block_size: int = 16
    prompt_lengths: Tuple[int, ...] = (37, 5, 64, 20)
    steps: int = 64            # tokens decoded after each prompt
    rope_base: float = 10000.0
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.q_heads


FULL = Config()
SMOKE = Config(vocab=64, d_model=64, layers=2, q_heads=4, kv_heads=2, mlp=128, block_size=8,
               prompt_lengths=(11, 3, 17), steps=12)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


def init_params(cfg: Config) -> Params:
    """Random weights with the usual 1/sqrt(fan_in) scale, so activations keep unit size through the layers."""
    rng = np.random.default_rng(cfg.seed)
    d, hd = cfg.d_model, cfg.head_dim

    def normal(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)

    # Untied output layer: with tied random embeddings every token's own logit would dominate, and greedy
    # decoding would repeat the prompt's last token whatever the attention reads.
    params: Params = {"embed": rng.standard_normal((cfg.vocab, d)).astype(np.float32),
                      "final_norm": np.ones(d, np.float32), "unembed": normal(d, cfg.vocab)}
    for layer in range(cfg.layers):
        params.update({f"{layer}.attn_norm": np.ones(d, np.float32), f"{layer}.mlp_norm": np.ones(d, np.float32),
                       f"{layer}.wq": normal(d, cfg.q_heads * hd), f"{layer}.wk": normal(d, cfg.kv_heads * hd),
                       f"{layer}.wv": normal(d, cfg.kv_heads * hd), f"{layer}.wo": normal(cfg.q_heads * hd, d),
                       f"{layer}.w_in": normal(d, cfg.mlp), f"{layer}.w_out": normal(cfg.mlp, d)})
    return params


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotary position embedding of x (B, H, L, hd) at positions (B, L): pairs (i, i + hd/2) rotated."""
    half = x.shape[-1] // 2
    freq = base ** (-np.arange(half) / half)
    angle = positions[:, None, :, None] * freq  # (B, 1, L, half)
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


# attend(layer, q, k, v) -> attention output (B, Hq, L, hd): q, k, v of the new tokens, RoPE applied.
Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def heads(x: np.ndarray, count: int) -> np.ndarray:
    """(B, L, count * hd) -> (B, count, L, hd)."""
    B, L, _ = x.shape
    return x.reshape(B, L, count, -1).transpose(0, 2, 1, 3)


def forward(params: Params, cfg: Config, tokens: np.ndarray, positions: np.ndarray, attend: Attend) -> np.ndarray:
    """Logits (B, L, vocab) of tokens (B, L) at positions (B, L); the cache lives behind ``attend``."""
    x = params["embed"][tokens]
    for layer in range(cfg.layers):
        p = lambda name: params[f"{layer}.{name}"]  # noqa: E731
        h = rms_norm(x, p("attn_norm"))
        q = rope(heads(h @ p("wq"), cfg.q_heads), positions, cfg.rope_base)
        k = rope(heads(h @ p("wk"), cfg.kv_heads), positions, cfg.rope_base)
        v = heads(h @ p("wv"), cfg.kv_heads)
        out = attend(layer, q, k, v)  # (B, Hq, L, hd)
        x = x + out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1) @ p("wo")
        x = x + silu(rms_norm(x, p("mlp_norm")) @ p("w_in")) @ p("w_out")
    return rms_norm(x, params["final_norm"]) @ params["unembed"]


# --------------------------------------------------------------------------
# The served run: one paged (int8 or float32) cache for the batch
# --------------------------------------------------------------------------


class PagedCache:
    """Every layer's K and V in pages of ``block_size`` tokens, one shuffled block table for the batch.

    ``int8``: pages of int8 values and (num_blocks, Hk, block_size) float32 scales; ``float32``: pages
    of float32 values.  Unwritten slots hold garbage (NaN values; random int8 values with the largest
    float32 scale) that no call may read.
    """

    def __init__(self, cfg: Config, capacity: Sequence[int], dtype: str, seed: int = 1):
        rng = np.random.default_rng(seed)
        bs = cfg.block_size
        per_sequence = [-(-n // bs) for n in capacity]  # pages each sequence may fill
        self.block_size, self.dtype = bs, dtype
        self.block_table = np.zeros((len(capacity), max(per_sequence)), dtype=np.int32)
        pool = rng.permutation(sum(per_sequence)).astype(np.int32)  # pages in the order an allocator gives them
        start = 0
        for b, count in enumerate(per_sequence):
            self.block_table[b, :count] = pool[start:start + count]
            start += count
        shape = (sum(per_sequence), cfg.kv_heads, bs, cfg.head_dim)
        self.pages: List[Dict[str, np.ndarray]] = []
        for _ in range(cfg.layers):
            if dtype == "int8":
                layer = {n: rng.integers(-127, 128, size=shape, dtype=np.int8) for n in "kv"}
                # attention() takes finite scales only; the largest float32 one would overflow any
                # score or value it reached.
                huge = np.finfo(np.float32).max
                layer.update({f"{n}_scale": np.full(shape[:-1], huge, np.float32) for n in "kv"})
            else:
                layer = {n: np.full(shape, np.nan, np.float32) for n in "kv"}
            self.pages.append(layer)
        self.lengths = np.zeros(len(capacity), dtype=np.int64)  # tokens written per sequence

    def write(self, layer: int, k: np.ndarray, v: np.ndarray, rows: np.ndarray, positions: np.ndarray) -> None:
        """Store k, v (B, Hk, L, hd) rows ``rows`` (n,) of items ``positions`` (n, 2) = (b, position)."""
        b, pos = positions[:, 0], positions[:, 1]
        block, slot = self.block_table[b, pos // self.block_size], pos % self.block_size
        pages = self.pages[layer]
        for name, x in (("k", k), ("v", v)):
            values = x[b, :, rows]  # (n, Hk, hd)
            if self.dtype == "int8":
                values, scale = attnfast.quantize_kv(values)
                pages[f"{name}_scale"][block, :, slot] = scale
            pages[name][block, :, slot] = values

    def attention(self, layer: int, q: np.ndarray, **kwargs) -> np.ndarray:
        """attention(q, pages...) over the first ``lengths[b]`` keys of each sequence."""
        pages = self.pages[layer]
        scales = {"k_scale": pages["k_scale"], "v_scale": pages["v_scale"]} if self.dtype == "int8" else {}
        return attnfast.attention(q, pages["k"], pages["v"], block_table=self.block_table,
                                  kv_lengths=self.lengths, **scales, **kwargs)

    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.pages for a in layer.values())


def generate_served(params: Params, cfg: Config, prompts: List[np.ndarray], dtype: str = "int8"):
    """Greedy continuation of every prompt, batched through one paged cache: (tokens (B, steps),
    logits (B, steps, vocab), cache, seconds per decode step)."""
    B, longest = len(prompts), max(len(p) for p in prompts)
    lengths = np.array([len(p) for p in prompts])
    cache = PagedCache(cfg, lengths + cfg.steps, dtype)

    # Prefill: prompt b fills the last lengths[b] query rows, so its last token is row `longest - 1`.
    offset = longest - lengths
    tokens = np.zeros((B, longest), dtype=np.int64)
    for b, p in enumerate(prompts):
        tokens[b, offset[b]:] = p
    positions = np.arange(longest)[None, :] - offset[:, None]  # negative on the padding rows
    real = np.argwhere(positions >= 0)  # (n, 2): (b, row) of every prompt token
    written = np.stack([real[:, 0], positions[real[:, 0], real[:, 1]]], axis=1)

    def prefill(layer, q, k, v):
        cache.write(layer, k, v, real[:, 1], written)
        cache.lengths[:] = lengths
        # kv_lengths-aligned bottom_right: row i of item b sees keys j <= i + lengths[b] - longest.
        # Padding rows see no key and give 0; their tokens are never read.
        return cache.attention(layer, q, causal=True, causal_align="bottom_right")

    logits = forward(params, cfg, tokens, positions.clip(0), prefill)[:, -1]
    out_tokens, out_logits = [], []
    start = time.perf_counter()
    for step in range(cfg.steps):
        next_tokens = np.argmax(logits, axis=-1)
        out_tokens.append(next_tokens)
        out_logits.append(logits)
        if step == cfg.steps - 1:
            break
        position = lengths + step  # where the new token goes
        slots = np.stack([np.arange(B), position], axis=1)

        def decode(layer, q, k, v):
            cache.write(layer, k, v, np.zeros(B, dtype=np.int64), slots)
            cache.lengths[:] = position + 1
            return cache.attention(layer, q)

        logits = forward(params, cfg, next_tokens[:, None], position[:, None], decode)[:, -1]
    seconds = (time.perf_counter() - start) / max(1, cfg.steps - 1)
    return np.stack(out_tokens, axis=1), np.stack(out_logits, axis=1), cache, seconds


# --------------------------------------------------------------------------
# The reference run: one sequence at a time, float32, contiguous
# --------------------------------------------------------------------------


def reference_logits(params: Params, cfg: Config, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The logits (steps, vocab) one sequence gets, alone, in float32 with a contiguous cache, when it is
    fed ``tokens`` (the served run's choices): the same inputs at every step, so the two runs' logits
    stay comparable even after a near-tie that int8 rounding decided the other way."""
    capacity = len(prompt) + cfg.steps
    k_cache = np.zeros((cfg.layers, 1, cfg.kv_heads, capacity, cfg.head_dim), np.float32)
    v_cache = np.zeros_like(k_cache)
    filled = [0]

    def attend(layer, q, k, v):
        start, n = filled[0], k.shape[2]
        k_cache[layer, :, :, start:start + n], v_cache[layer, :, :, start:start + n] = k, v
        ks, vs = k_cache[layer, :, :, :start + n], v_cache[layer, :, :, :start + n]
        # The prompt: Lq = Lk, plain causal. A decoded token: one query over the whole prefix.
        return attnfast.attention(q, ks, vs, causal=n > 1)

    def advance(new_tokens, positions):
        logits = forward(params, cfg, new_tokens[None], positions[None], attend)[0, -1]
        filled[0] += len(new_tokens)
        return logits

    out = [advance(prompt, np.arange(len(prompt)))]
    for step, token in enumerate(tokens[:-1]):
        out.append(advance(np.array([token]), np.array([len(prompt) + step])))
    return np.stack(out)


def make_prompts(cfg: Config) -> List[np.ndarray]:
    rng = np.random.default_rng(cfg.seed + 100)
    return [rng.integers(0, cfg.vocab, size=n) for n in cfg.prompt_lengths]


@dataclass
class Comparison:
    steps: int                   # decoded steps of every sequence
    same_choice: int             # (sequence, step)s whose served token is the reference's greedy choice
    near_ties: int               # the others: the reference's two best logits closer than the logit error
    other: int                   # the rest: a served token the reference would not pick
    max_logit_error: float       # max |served - reference| over every step, sequence and token
    logit_spread: float          # standard deviation of the reference logits

    @property
    def relative_logit_error(self) -> float:
        return self.max_logit_error / self.logit_spread


def compare(served_tokens: np.ndarray, served_logits: np.ndarray, ref_logits: np.ndarray) -> Comparison:
    """Each served greedy choice against the reference's on the same inputs, and the logits' distance.

    A choice counts as a near tie when the reference's best and second-best logits are closer than twice
    that step's largest logit difference: then rounding, not the cache layout, picked between them.
    """
    error = np.max(np.abs(served_logits - ref_logits), axis=-1)  # (B, steps)
    top2 = np.sort(ref_logits, axis=-1)[..., -2:]
    same = served_tokens == np.argmax(ref_logits, axis=-1)
    tie = ~same & (top2[..., 1] - top2[..., 0] <= 2 * error)
    return Comparison(served_tokens.shape[1], int(same.sum()), int(tie.sum()), int((~same & ~tie).sum()),
                      float(error.max()), float(np.std(ref_logits)))


#: How close the served logits must be to the reference's, relative to the logits' spread: int8 K / V
#: (0.4% per element at most) and float32 pages (rounding only).
LOGIT_TOLERANCE = {"int8": 0.05, "float32": 1e-4}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, about a second (what the tests run)")
    parser.add_argument("--steps", type=int, help=f"tokens to decode (default {FULL.steps}, --smoke {SMOKE.steps})")
    parser.add_argument("--cache", choices=sorted(LOGIT_TOLERANCE), default="int8",
                        help="the served cache's storage (default int8)")
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps: expected a positive number of steps, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)

    params = init_params(cfg)
    prompts = make_prompts(cfg)
    print(f"decoder: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.q_heads} query heads over {cfg.kv_heads} "
          f"kv heads of {cfg.head_dim}, vocab {cfg.vocab}, RoPE; prompts of {list(cfg.prompt_lengths)} tokens, "
          f"{cfg.steps} greedy steps")
    tokens, logits, cache, step_s = generate_served(params, cfg, prompts, args.cache)
    reference = np.stack([reference_logits(params, cfg, p, t) for p, t in zip(prompts, tokens)])
    result = compare(tokens, logits, reference)
    float32_bytes = 2 * cfg.layers * cache.pages[0]["k"].size * 4  # the same pages in float32
    print(f"served: {args.cache} pages of {cfg.block_size} tokens, block table {cache.block_table.shape} "
          f"(shuffled), {cache.nbytes() / 2**10:.1f} KiB of cache ({cache.nbytes() / float32_bytes:.2f}x "
          f"float32 pages), {step_s * 1e3:.2f} ms per decode step of the batch")
    for b, prompt in enumerate(prompts):
        print(f"  sequence {b}: prompt {len(prompt):3d} tokens -> {' '.join(map(str, tokens[b][:16]))}"
              f"{' ...' if cfg.steps > 16 else ''}")
    tolerance = LOGIT_TOLERANCE[args.cache]
    close = result.relative_logit_error <= tolerance
    total = len(prompts) * cfg.steps
    print(f"against each sequence alone in float32 without pages, fed the same tokens: the greedy choice at "
          f"{result.same_choice} of {total} steps, near ties at {result.near_ties}, other tokens at "
          f"{result.other}; max |logit difference| {result.max_logit_error:.2e} = "
          f"{result.relative_logit_error:.2e} of the logits' standard deviation ({result.logit_spread:.2f}; "
          f"tolerance {tolerance:g})")
    ok = result.other == 0 and close
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
