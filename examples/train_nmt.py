"""Train the seed's story: one fixed context vector C against Bahdanau attention, on a toy translation.

The tutorial this project comes from argues that an encoder-decoder which squeezes the whole source
sentence into one fixed context vector C loses detail as sentences get longer, and that attention, a
context C_t = sum_j a_tj h_j of its own for every output word, fixes it.  This script trains both models
on the same synthetic task and measures token accuracy by source length.

Task: a toy language pair.  The source is 3-30 words drawn uniformly from a vocabulary of V words; the
translation maps every word to its own target word (a fixed lexicon) and reverses the order, so output
word t translates source word n-1-t.  Target length = source length (word by word), so the decoder is
told how many words to produce and accuracy is counted per target token.

Both models share everything except how the decoder reads the source:

    encoder     h_j = tanh(E[x_j] + R[n-1-j])             (B, n, H)
                E: word embeddings; R: the word's position counted from the end of the sentence
                (what an encoder reading right to left knows), one linear layer over the two one-hots.
    query       s_t = Q[t]                                 a learned embedding of output step t
    context     fixed C:    c_t = C = (1/n) sum_j h_j      the same vector for every output word
                attention:  c_t = sum_j a_tj h_j,  a_t = softmax_j(v_a . tanh(W_q s_t + W_k h_j + b))
    readout     o_t = tanh(W_h [c_t; s_t] + b_h),  p(y_t) = softmax(W_o o_t + b_o)

The fixed C is the mean of the encoder states, i.e. attention with uniform weights 1/n (as in
``python -m attnfast demo``): both models see exactly the same encoder states, and the fixed-C model
has every parameter of the attention model except W_q, W_k, v_a, b.  Its C has H numbers to carry
n words and their positions; attention only has to find one word per step.  The fixed-C model is still
improving when the run ends (the attention model reaches a loss near 0 within the first fifth): more
steps, a larger H or a recurrent decoder lift its curve, but for any fixed H it falls with length.

The attention is ``attnfast.attention(method="additive", kv_lengths=n, return_lse=True)`` over a padded
batch, and its gradients (dq, dk, dv, dw_q, dw_k, dv_a, dscore_bias) come from
``attnfast.attention_backward``; dk and dv flow back into the encoder.  Everything else (embeddings,
tanh layers, softmax cross-entropy, Adam) is NumPy with hand-written gradients, checked against finite
differences in tests/test_examples.py.  Both models train on the same batches from fixed seeds.

Run:  python examples/train_nmt.py [--plot accuracy.png] [--smoke] [--steps N]
(a few minutes on 2 cores, about a minute of it CPU time; --smoke takes a few seconds and is what the tests run)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__":
    # The matrices here are small (thousands of rows, 128 columns): BLAS threads cost more in
    # synchronisation than they save and compete with attnfast's threads for the cores.  This must be set
    # before NumPy loads BLAS; single_threaded_blas() covers the case of an importer that loaded it first.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

import attnfast

KINDS = ("fixed", "attention")
LABELS = {"fixed": "fixed C", "attention": "attention"}

Params = Dict[str, np.ndarray]


@dataclass(frozen=True)
class Config:
    vocab: int = 20          # V: source words (and as many target words)
    hidden: int = 64         # H: encoder states, decoder queries, context vectors
    attn_units: int = 32     # A: hidden units of the additive score
    readout: int = 128       # hidden units of the output layer
    min_len: int = 3
    max_len: int = 30
    steps: int = 6000
    batch: int = 32
    lr: float = 3e-3
    eval_per_length: int = 100  # test sentences per source length
    seed: int = 0


FULL = Config()
SMOKE = Config(vocab=8, hidden=16, attn_units=8, readout=32, max_len=12, steps=300, batch=32, lr=1e-2,
               eval_per_length=40)


# --------------------------------------------------------------------------
# The toy language pair
# --------------------------------------------------------------------------


def lexicon(vocab: int) -> Tuple[List[str], List[str]]:
    """Source words and their translations (target word i translates source word i).

    Which bijection the lexicon is does not matter to the models: their output layer is learned."""
    syllables = [c + v for c in "bdgklmnprstvz" for v in "aeiou"]
    if vocab > len(syllables):
        raise ValueError(f"vocab: at most {len(syllables)} words, got {vocab}")
    source = syllables[:vocab]
    # The target words are spelled differently so that a printed translation is readable as one.
    target = [w[0].upper() + w[1] + w[0] for w in reversed(syllables[-vocab:])]
    return source, target


def translate_ids(src: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The reference translation of a padded batch: target word t = source word n-1-t; -1 on padding."""
    source_pos = lengths[:, None] - 1 - np.arange(src.shape[1])  # negative past the end
    tgt = np.take_along_axis(src, np.maximum(source_pos, 0), axis=1)
    return np.where(source_pos >= 0, tgt, -1)


def sample_batch(rng: np.random.Generator, cfg: Config, batch: int):
    """Random sentences of random lengths, padded to the longest: (src, lengths, tgt)."""
    lengths = rng.integers(cfg.min_len, cfg.max_len + 1, size=batch)
    width = int(lengths.max())
    src = rng.integers(0, cfg.vocab, size=(batch, width))
    src[np.arange(width)[None, :] >= lengths[:, None]] = 0  # padding: any id, hidden by kv_lengths
    return src, lengths, translate_ids(src, lengths)


def held_out_sentences(cfg: Config) -> Dict[int, np.ndarray]:
    """Fixed test sentences, ``eval_per_length`` of every length (independent of the training stream)."""
    rng = np.random.default_rng([cfg.seed, 1])
    return {n: rng.integers(0, cfg.vocab, size=(cfg.eval_per_length, n))
            for n in range(cfg.min_len, cfg.max_len + 1)}


# --------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------


def init_params(cfg: Config, kind: str, dtype=np.float32) -> Params:
    """Small random weights.  The shared weights are drawn first from the same seed, so both models start
    from the same embeddings and readout; the attention model adds the score's weights."""
    rng = np.random.default_rng([cfg.seed, 2])
    h, a, r, v = cfg.hidden, cfg.attn_units, cfg.readout, cfg.vocab

    def normal(shape, std):
        return (std * rng.standard_normal(shape)).astype(dtype)

    params = {
        "E": normal((v, h), 1.0),
        "R": normal((cfg.max_len, h), 1.0),
        "Q": normal((cfg.max_len, h), 1.0),
        "W_h": normal((r, 2 * h), 1.0 / np.sqrt(2 * h)),
        "b_h": np.zeros(r, dtype),
        "W_o": normal((v, r), 1.0 / np.sqrt(r)),
        "b_o": np.zeros(v, dtype),
    }
    if kind == "attention":
        # Scores of order 1 at the start: the weights begin spread out, close to the fixed C's uniform 1/n.
        params.update(W_q=normal((a, h), 1.0 / np.sqrt(h)), W_k=normal((a, h), 1.0 / np.sqrt(h)),
                      v_a=normal((a,), 1.0 / np.sqrt(a)), b_a=np.zeros(a, dtype))
    return params


def additive_kwargs(params: Params, lengths: np.ndarray) -> dict:
    """The keyword arguments of the forward call, which attention_backward gets again."""
    return dict(method="additive", w_q=params["W_q"], w_k=params["W_k"], v_a=params["v_a"],
                score_bias=params["b_a"], kv_lengths=lengths)


def visible(lengths: np.ndarray, width: int) -> np.ndarray:
    """(B, width) bool: position j < n (a real word, or a real output step)."""
    return np.arange(width)[None, :] < lengths[:, None]


def encode(params: Params, src: np.ndarray, lengths: np.ndarray):
    """Encoder states h (B, L, H) and the positions-from-the-end that indexed R (0 on padding)."""
    from_end = np.maximum(lengths[:, None] - 1 - np.arange(src.shape[1]), 0)
    return np.tanh(params["E"][src] + params["R"][from_end]), from_end


def context(params: Params, kind: str, queries: np.ndarray, h: np.ndarray, lengths: np.ndarray):
    """Context vectors (B, L, H) and what the backward pass needs (the forward's out and lse)."""
    if kind == "fixed":
        keep = visible(lengths, h.shape[1])[..., None]
        mean = (h * keep).sum(axis=1) / lengths[:, None].astype(h.dtype)
        return np.broadcast_to(mean[:, None, :], h.shape), None
    out, lse = attnfast.attention(queries, h, h, return_lse=True, **additive_kwargs(params, lengths))
    return out, lse


def readout(params: Params, c: np.ndarray, s: np.ndarray):
    """Logits (N, V) of N output tokens from their context and query vectors (N, H) each; also returns the
    hidden layer's input and output, which the backward pass needs."""
    x = np.concatenate([c, s], axis=-1)
    o = np.tanh(x @ params["W_h"].T + params["b_h"])
    return o @ params["W_o"].T + params["b_o"], x, o


def cross_entropy(logits: np.ndarray, tgt: np.ndarray):
    """Mean cross-entropy of N tokens, logits (N, V) and targets (N,), and its gradient w.r.t. the logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    tokens = np.arange(tgt.size)
    loss = -logp[tokens, tgt].mean()
    dlogits = np.exp(logp)
    dlogits[tokens, tgt] -= 1
    return float(loss), dlogits / tgt.size


def scatter_rows(index: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """sum of values[i] into row index[i] of a (count, ...) array: the gradient of a table lookup.

    A one-hot matrix product rather than np.add.at: the tables are small, and the product is a fixed
    sequence of BLAS calls instead of an unbuffered scatter (several times faster here).
    """
    one_hot = (index.reshape(-1)[:, None] == np.arange(count)).astype(values.dtype)
    return one_hot.T @ values.reshape(one_hot.shape[0], -1)


def loss_and_grads(params: Params, kind: str, src: np.ndarray, lengths: np.ndarray, tgt: np.ndarray):
    """The training loss on one padded batch and its gradient with respect to every parameter."""
    width, hidden = src.shape[1], params["Q"].shape[1]
    h, from_end = encode(params, src, lengths)
    s = params["Q"][:width][None]  # (1, L, H): the same queries for every sentence (a broadcast batch)
    c, lse = context(params, kind, s, h, lengths)
    rows, steps = np.nonzero(visible(lengths, width))  # the real output tokens; padding is never read out
    logits, x, o = readout(params, c[rows, steps], s[0, steps])
    loss, dlogits = cross_entropy(logits, tgt[rows, steps])

    grads = {}
    # Readout.
    grads["W_o"] = dlogits.T @ o
    grads["b_o"] = dlogits.sum(axis=0)
    dpre = (dlogits @ params["W_o"]) * (1 - o * o)
    grads["W_h"] = dpre.T @ x
    grads["b_h"] = dpre.sum(axis=0)
    dx = dpre @ params["W_h"]
    dc = np.zeros_like(h)
    dc[rows, steps] = dx[:, :hidden]
    grads["Q"] = scatter_rows(steps, dx[:, hidden:], params["Q"].shape[0])
    # Context.
    if kind == "fixed":
        keep = visible(lengths, width)[..., None]
        dh = keep * (dc.sum(axis=1) / lengths[:, None].astype(h.dtype))[:, None, :]
    else:
        g = attnfast.attention_backward(dc, s, h, h, c, lse, **additive_kwargs(params, lengths))
        grads["Q"][:width] += g.dq[0]
        dh = g.dk + g.dv  # the encoder states are both the keys and the values
        grads.update(W_q=g.dw_q, W_k=g.dw_k, v_a=g.dv_a, b_a=g.dscore_bias)
    # Encoder.  Padding states got dh = 0: masked above, and attention gives hidden keys zero dk, dv.
    dpre_h = dh * (1 - h * h)
    grads["E"] = scatter_rows(src, dpre_h, params["E"].shape[0])
    grads["R"] = scatter_rows(from_end, dpre_h, params["R"].shape[0])
    return loss, grads


def predict(params: Params, kind: str, src: np.ndarray):
    """Most likely translation of equal-length sentences (B, n), and the attention weights (B, n, n)
    (None for the fixed-C model)."""
    batch, n = src.shape
    lengths = np.full(batch, n)
    h, _ = encode(params, src, lengths)
    s = params["Q"][:n][None]
    if kind == "fixed":
        (c, _), weights = context(params, kind, s, h, lengths), None
    else:
        c, weights = attnfast.attention(s, h, h, return_weights=True, **additive_kwargs(params, lengths))
    logits, _, _ = readout(params, c.reshape(batch * n, -1), np.tile(s[0], (batch, 1)))
    return logits.argmax(axis=-1).reshape(batch, n), weights


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def single_threaded_blas():
    """A context limiting NumPy's BLAS to one thread when threadpoolctl is installed (else a no-op)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class Adam:
    """Adam (Kingma & Ba) with bias correction, updating a parameter dict in place."""

    def __init__(self, params: Params, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}
        self.t = 0

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        correction1, correction2 = 1 - self.beta1 ** self.t, 1 - self.beta2 ** self.t
        for k, g in grads.items():
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * g * g
            update = (self.lr / correction1) * self.m[k] / (np.sqrt(self.v[k] / correction2) + self.eps)
            params[k] -= update.astype(params[k].dtype)


def train(cfg: Config, log=print) -> Tuple[Dict[str, Params], Dict[str, List[float]]]:
    """Train both models on the same stream of batches; returns their parameters and loss curves."""
    models = {kind: init_params(cfg, kind) for kind in KINDS}
    optimizers = {kind: Adam(p, cfg.lr) for kind, p in models.items()}
    losses: Dict[str, List[float]] = {kind: [] for kind in KINDS}
    rng = np.random.default_rng([cfg.seed, 0])
    report_every = max(cfg.steps // 10, 1)
    for step in range(1, cfg.steps + 1):
        src, lengths, tgt = sample_batch(rng, cfg, cfg.batch)
        for kind in KINDS:
            loss, grads = loss_and_grads(models[kind], kind, src, lengths, tgt)
            optimizers[kind].step(models[kind], grads)
            losses[kind].append(loss)
        if step % report_every == 0 or step == 1:
            recent = {kind: np.mean(losses[kind][-report_every:]) for kind in KINDS}
            log(f"step {step:5d}   loss  fixed C {recent['fixed']:.3f}   attention {recent['attention']:.3f}")
    return models, losses


def accuracy_by_length(models: Dict[str, Params], tests: Dict[int, np.ndarray]) -> Dict[str, Dict[int, float]]:
    """Token accuracy of each model on the test sentences of each source length."""
    result: Dict[str, Dict[int, float]] = {kind: {} for kind in models}
    for n, src in tests.items():
        tgt = translate_ids(src, np.full(src.shape[0], n))
        for kind, params in models.items():
            pred, _ = predict(params, kind, src)
            result[kind][n] = float((pred == tgt).mean())
    return result


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def length_buckets(cfg: Config, width: int = 3) -> List[Tuple[int, int]]:
    """(first, last) source lengths of each table row; the last row takes the remainder."""
    starts = list(range(cfg.min_len, cfg.max_len + 1, width))
    if len(starts) > 1 and cfg.max_len - starts[-1] + 1 < width:
        starts.pop()
    ends = [s - 1 for s in starts[1:]] + [cfg.max_len]
    return list(zip(starts, ends))


def format_table(cfg: Config, accuracy: Dict[str, Dict[int, float]]) -> str:
    """Token accuracy by source length, one row per length bucket (test sets are equal-sized per length)."""
    lines = [f"{'source length':>13}  {'fixed C':>8}  {'attention':>9}"]
    rows = [(f"{first}-{last}", range(first, last + 1)) for first, last in length_buckets(cfg)]
    rows.append(("all", range(cfg.min_len, cfg.max_len + 1)))
    for label, lengths in rows:
        cells = [np.mean([accuracy[kind][n] for n in lengths]) for kind in KINDS]
        lines.append(f"{label:>13}  {cells[0]:8.1%}  {cells[1]:9.1%}")
    return "\n".join(lines)


def format_example(cfg: Config, models: Dict[str, Params], src: np.ndarray) -> str:
    """One test sentence, its reference translation and both models' outputs (wrong words in brackets)."""
    source_words, target_words = lexicon(cfg.vocab)
    tgt = translate_ids(src[None], np.array([src.size]))[0]
    lines = [f"{'source':>10}: {' '.join(source_words[i] for i in src)}",
             f"{'reference':>10}: {' '.join(target_words[i] for i in tgt)}"]
    for kind in KINDS:
        pred = predict(models[kind], kind, src[None])[0][0]
        words = [target_words[p] if p == t else f"[{target_words[p]}]" for p, t in zip(pred, tgt)]
        lines.append(f"{LABELS[kind]:>10}: {' '.join(words)}")
    return "\n".join(lines)


def plot(cfg: Config, accuracy: Dict[str, Dict[int, float]], models: Dict[str, Params],
         heatmap_src: np.ndarray, path: str) -> None:
    """Accuracy by source length for both models, and the attention model's weights on one sentence."""
    from matplotlib.figure import Figure  # the object-oriented API needs no GUI backend

    source_words, target_words = lexicon(cfg.vocab)
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.15, 1])
    lengths = sorted(accuracy["fixed"])
    for kind, style in zip(KINDS, ("o-", "s-")):
        left.plot(lengths, [100 * accuracy[kind][n] for n in lengths], style, ms=3.5, label=LABELS[kind])
    left.axhline(100 / cfg.vocab, color="gray", ls=":", lw=1, label=f"chance (1/{cfg.vocab})")
    left.set_xlabel("source length (words)")
    left.set_ylabel("token accuracy (%)")
    left.set_ylim(0, 102)
    left.set_title("Test accuracy by source length")
    left.legend(loc="lower left")
    left.grid(alpha=0.3)

    pred, weights = predict(models["attention"], "attention", heatmap_src[None])
    image = right.imshow(weights[0], cmap="viridis", vmin=0.0, vmax=1.0)
    right.set_xticks(range(heatmap_src.size), [source_words[i] for i in heatmap_src], rotation=90, fontsize=7)
    right.set_yticks(range(heatmap_src.size), [target_words[i] for i in pred[0]], fontsize=7)
    right.set_xlabel("source word (key / value)")
    right.set_ylabel("output word (query)")
    right.set_title(f"Attention weights, a {heatmap_src.size}-word test sentence")
    fig.colorbar(image, ax=right, label="weight")
    fig.savefig(path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (what CI runs)")
    parser.add_argument("--steps", type=int, help=f"training steps (default {FULL.steps}, --smoke {SMOKE.steps})")
    parser.add_argument("--plot", metavar="FILE", help="save accuracy by length and an attention heatmap to FILE "
                                                       "(needs matplotlib)")
    args = parser.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 1
    cfg = SMOKE if args.smoke else FULL
    if args.steps is not None:
        if args.steps < 1:
            parser.error(f"--steps: expected a positive number of steps, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)

    print(f"toy translation: {cfg.vocab} words, source lengths {cfg.min_len}-{cfg.max_len}, reversed word by word")
    print(f"models: H={cfg.hidden}, additive attention A={cfg.attn_units}, readout {cfg.readout}; "
          f"{cfg.steps} Adam steps of {cfg.batch} sentences")
    start = time.perf_counter()
    with single_threaded_blas():
        models, _ = train(cfg)
        print(f"trained both models in {time.perf_counter() - start:.1f} s\n")
        tests = held_out_sentences(cfg)
        accuracy = accuracy_by_length(models, tests)
    print(f"token accuracy on {cfg.eval_per_length} test sentences per length:")
    print(format_table(cfg, accuracy))
    long_example = tests[cfg.max_len][0]
    print()
    print(format_example(cfg, models, long_example))
    if args.plot:
        plot(cfg, accuracy, models, long_example, args.plot)
        print(f"\nplot saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
