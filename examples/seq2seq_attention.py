"""Greedy seq2seq decoding with Bahdanau (additive) attention, one decoder step at a time.

The task is the classic sanity check for attention models: *reverse the sentence*
("Tom chase Jerry" -> "Jerry chase Tom").  A model that solves it must look at the
last source word first, then the one before, ... so its alignment matrix (target
steps x source words) is an anti-diagonal.  A model without attention, squeezing
the sentence into one fixed vector, struggles with exactly this.

Nothing is trained and nothing is downloaded: the weights are built by hand so that
each number has a meaning, and the script runs in well under a second.

Encoder (a linear RNN, run left to right over a padded batch)
    state  h_j = [ one-hot(word_j) ; position register p_j ]
    p_{-1} = e_0 ("before the first word"),   p_j = S p_{j-1}   (S shifts down by one slot)
so word j carries p_j = e_{j+1}: the recurrence is a counter.  Encoder states are the
keys *and* the values of the attention.

Decoder
    state  s_t = [ one-hot(previous output) ; pointer d_t ]
    d_0 = p of the encoder's last real word (e_n, as seq2seq models start the decoder
          from the encoder's final state),   d_{t+1} = S^T d_t   (move one word left)
After n steps the pointer reaches e_0, the "before the first word" slot, which no source
word occupies: that is when the decoder says <eos>.

Additive attention  score(s_t, h_j) = v_a . tanh(W_q s_t + W_k h_j + b)
uses one hidden unit per register slot a, which fires only when the decoder pointer
*and* the source word are both at slot a:
    W_q[a] = alpha e_a (pointer part),  W_k[a] = alpha e_a (position part),  b_a = -1.5 alpha
pre-activation of unit a:  alpha ([d_t = e_a] + [p_j = e_a]) - 1.5 alpha
    both at a      ->  +0.5 alpha  (tanh ~ +1)
    one of them    ->  -0.5 alpha
    neither        ->  -1.5 alpha  (tanh ~ -1)
The matching word has one "both" unit and A-1 "neither" units; any other word has two
"one of them" units and A-2 "neither" units, so its score is lower by
v * (3 tanh(alpha/2) - tanh(3 alpha/2)), whatever the sentence length (``score_gap``).
With alpha = 4 and v_a = 2 the gap is ~3.8: the right word gets e^3.8 ~ 44x the weight
of any other.  Attention stays soft (weights ~0.9, not 1),
as in a trained model, and the printed matrix shows it.

Readout: the context vector C_t = sum_j a_tj h_j holds a soft one-hot of the attended
word; the logits are kappa * C_t's word part, and <eos> gets 2 kappa when the pointer
is at e_0.  Greedy decoding takes the argmax.

Run:  python examples/seq2seq_attention.py [--plot alignment.png]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

import attnfast

PAD, EOS = "<pad>", "<eos>"
SENTENCES = [
    "Tom chase Jerry",
    "the cat eats the cheese",
    "Jerry eats cheese",
    "the mouse chase the big cat too",
]

ALPHA = 4.0   # sharpness of the slot detectors: pre-activations are multiples of alpha/2
V_SCALE = 2.0  # v_a = V_SCALE * ones: scales the score gap between the right word and the rest
KAPPA = 10.0  # readout gain: a soft one-hot context of ~0.9 becomes a decisive logit
DTYPE = np.float32


# --------------------------------------------------------------------------
# Vocabulary and batch
# --------------------------------------------------------------------------


def build_vocab(sentences: Sequence[str]) -> List[str]:
    """<pad>, <eos>, then the words in order of first appearance (deterministic ids)."""
    vocab = [PAD, EOS]
    for sentence in sentences:
        for word in sentence.split():
            if word not in vocab:
                vocab.append(word)
    return vocab


def encode_batch(sentences: Sequence[str], vocab: Sequence[str]):
    """Token ids (B, L) padded with <pad>, and the true lengths (B,)."""
    index = {w: i for i, w in enumerate(vocab)}
    tokens = [[index[w] for w in s.split()] for s in sentences]
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    ids = np.full((len(tokens), int(lengths.max())), index[PAD], dtype=np.int64)
    for row, t in zip(ids, tokens):
        row[:len(t)] = t
    return ids, lengths


# --------------------------------------------------------------------------
# The hand-built model
# --------------------------------------------------------------------------


@dataclass
class Model:
    """Sizes and attention weights; states are [word one-hot (V) ; register (R)] everywhere."""

    vocab_size: int
    slots: int            # R = max source length + 1 (slot 0 = "before the first word")
    w_q: np.ndarray       # (A, V + R)  A = R: one hidden unit per slot
    w_k: np.ndarray       # (A, V + R)
    v_a: np.ndarray       # (A,)
    score_bias: np.ndarray  # (A,)

    @property
    def state_size(self) -> int:
        return self.vocab_size + self.slots


def build_model(vocab_size: int, max_len: int) -> Model:
    """Attention weights that compare the decoder pointer with the encoder position, slot by slot."""
    slots = max_len + 1
    size = vocab_size + slots
    # Both projections read only the register part: word identity plays no role in *where* to look.
    w_q = np.zeros((slots, size), DTYPE)
    w_k = np.zeros((slots, size), DTYPE)
    w_q[:, vocab_size:] = ALPHA * np.eye(slots)
    w_k[:, vocab_size:] = ALPHA * np.eye(slots)
    # -1.5 alpha: one active input is not enough to switch a unit on; both are (see module docstring).
    score_bias = np.full(slots, -1.5 * ALPHA, DTYPE)
    v_a = np.full(slots, V_SCALE, DTYPE)
    return Model(vocab_size, slots, w_q, w_k, v_a, score_bias)


def score_gap(slots: int) -> float:
    """Score of the matching word minus that of any other real word (a closed form of the docstring)."""
    t = np.tanh
    match = t(0.5 * ALPHA) + (slots - 1) * t(-1.5 * ALPHA)
    other = 2 * t(-0.5 * ALPHA) + (slots - 2) * t(-1.5 * ALPHA)
    return float(V_SCALE * (match - other))


def shift_down(register: np.ndarray) -> np.ndarray:
    """S p: move the one-hot one slot up the sentence (the encoder's counter step)."""
    out = np.zeros_like(register)
    out[..., 1:] = register[..., :-1]
    return out


def shift_up(register: np.ndarray) -> np.ndarray:
    """S^T d: move the pointer one word to the left (the decoder's step)."""
    out = np.zeros_like(register)
    out[..., :-1] = register[..., 1:]
    return out


def encode(model: Model, ids: np.ndarray, lengths: np.ndarray):
    """Run the encoder RNN over the padded batch.

    Returns the encoder states (B, L, V + R) and the final state of each sentence, taken at its last
    real word (as a packed/masked RNN would), not at the padding.
    """
    batch, length = ids.shape
    register = np.zeros((batch, model.slots), DTYPE)
    register[:, 0] = 1.0  # p_{-1} = e_0
    states = np.zeros((batch, length, model.state_size), DTYPE)
    for j in range(length):
        register = shift_down(register)
        states[np.arange(batch), j, ids[:, j]] = 1.0
        states[:, j, model.vocab_size:] = register
    # Padding states are garbage on purpose (a real RNN keeps running over the pads); kv_lengths hides them.
    final = states[np.arange(batch), lengths - 1]
    return states, final


@dataclass
class Decoded:
    """Greedy outputs and, per sentence, the alignment matrix (steps x source length)."""

    outputs: List[List[str]]
    alignments: List[np.ndarray]
    weights: np.ndarray  # (B, steps, L): every step's weights over the padded source, as returned


def decode(model: Model, vocab: Sequence[str], enc_states: np.ndarray, final: np.ndarray,
           lengths: np.ndarray, max_steps: int) -> Decoded:
    """Greedy decoding, one additive-attention call per step for the whole batch."""
    batch = enc_states.shape[0]
    eos = vocab.index(EOS)
    state = np.zeros((batch, model.state_size), DTYPE)
    state[:, model.vocab_size:] = final[:, model.vocab_size:]  # d_0: the encoder's final position
    outputs: List[List[str]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    step_weights = []
    for _ in range(max_steps):
        # One query per sentence: (B, 1, V+R) against (B, L, V+R); kv_lengths hides the padding.
        context, weights = attnfast.attention(
            state[:, None, :], enc_states, enc_states, method="additive",
            w_q=model.w_q, w_k=model.w_k, v_a=model.v_a, score_bias=model.score_bias,
            kv_lengths=lengths, return_weights=True)
        step_weights.append(weights[:, 0, :])
        logits = KAPPA * context[:, 0, :model.vocab_size]
        logits[:, eos] = 2 * KAPPA * state[:, model.vocab_size]  # pointer at "before the first word"
        logits[:, vocab.index(PAD)] = -np.inf
        token = logits.argmax(axis=1)
        for b in np.flatnonzero(~done):
            outputs[b].append(vocab[token[b]])
        done |= token == eos
        if done.all():
            break
        # Next decoder state: feed the output back in, move the pointer one word left.
        pointer = shift_up(state[:, model.vocab_size:])
        state = np.zeros_like(state)
        state[np.arange(batch), token] = 1.0
        state[:, model.vocab_size:] = pointer
    weights = np.stack(step_weights, axis=1)
    alignments = [weights[b, :len(outputs[b]), :lengths[b]] for b in range(batch)]
    return Decoded(outputs, alignments, weights)


def translate(sentences: Sequence[str] = SENTENCES):
    """The whole pipeline: vocabulary, batch, model, encoder, greedy decoder."""
    vocab = build_vocab(sentences)
    ids, lengths = encode_batch(sentences, vocab)
    model = build_model(len(vocab), ids.shape[1])
    enc_states, final = encode(model, ids, lengths)
    return decode(model, vocab, enc_states, final, lengths, max_steps=ids.shape[1] + 1), lengths


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def format_alignment(source: Sequence[str], target: Sequence[str], alignment: np.ndarray) -> str:
    """The alignment matrix as text: one row per output word, one column per source word."""
    width = max(6, *(len(w) for w in source)) + 1
    label = max(len(w) for w in target) + 2
    lines = [" " * label + "".join(w.rjust(width) for w in source)]
    for word, row in zip(target, alignment):
        lines.append(word.ljust(label) + "".join(f"{x:{width}.3f}" for x in row))
    return "\n".join(lines)


def plot_alignments(sentences: Sequence[str], decoded: Decoded, path: str) -> None:
    """Save one heatmap per sentence (rows: output words, columns: source words)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sentences), figsize=(3.2 * len(sentences), 3.4), squeeze=False)
    for ax, sentence, target, alignment in zip(axes[0], sentences, decoded.outputs, decoded.alignments):
        source = sentence.split()
        ax.imshow(alignment, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(source)), source, rotation=60, ha="right")
        ax.set_yticks(range(len(target)), target)
        ax.set_xlabel("source")
    axes[0][0].set_ylabel("output")
    fig.suptitle("Bahdanau attention, reverse-copy task: alignment (anti-diagonal)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="FILE", help="save the alignment heatmaps to FILE (needs matplotlib)")
    args = parser.parse_args(argv)

    decoded, lengths = translate(SENTENCES)
    gap = score_gap(int(lengths.max()) + 1)
    print(f"additive attention, score gap between the right word and any other: {gap:.2f}")
    for sentence, target, alignment in zip(SENTENCES, decoded.outputs, decoded.alignments):
        print()
        print(f"source: {sentence}")
        print(f"output: {' '.join(target)}")
        print(format_alignment(sentence.split(), target, alignment))

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 1
        plot_alignments(SENTENCES, decoded, args.plot)
        print(f"\nalignment heatmaps saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
