"""``python -m attnfast demo``: the three stages of attention on a toy translation.

Translating "Tom chase Jerry" into 汤姆 追逐 杰瑞: the encoder states of the
source words are the keys and values, the decoder states of the target words
are the queries.  The demo prints

1. the score matrix       e_ij = (s_i . h_j) / sqrt(D)        attnfast.scores
2. the attention weights  a_ij = softmax_j(e_ij)             attnfast.softmax
3. the context vectors    C_i  = sum_j a_ij h_j              attnfast.aggregate

checks that the fused ``attnfast.attention`` gives the same context vectors,
and contrasts them with the model *without* attention, where every target word
sees one fixed summary C of the whole source sentence.

The embeddings are hand-made so that the numbers mean something: each feature
axis is a named property, a word and its translation share their features,
and a little seeded noise stands in for everything else a real model learns.
"""

from __future__ import annotations

import argparse
import sys
import unicodedata
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

SOURCE = ["Tom", "chase", "Jerry"]
TARGET = ["汤姆", "追逐", "杰瑞"]
PINYIN = ["Tangmu", "zhuizhu", "Jierui"]
FEATURES = ["character", "cat", "mouse", "action", "subject", "object"]

# One row per word, one column per FEATURES entry.  Tom and Jerry are both
# characters (so 杰瑞 also looks a little at Tom), chase is the only action.
MEANING = np.array(
    [
        [1.0, 1.0, 0.0, 0.0, 0.5, 0.0],  # Tom   / 汤姆
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # chase / 追逐
        [1.0, 0.0, 1.0, 0.0, 0.0, 0.5],  # Jerry / 杰瑞
    ]
)
NOISE = 0.05
SEED = 0


def embeddings(seed: int = SEED) -> Tuple[np.ndarray, np.ndarray]:
    """Encoder states h (3, D) of the source words and decoder states s (3, D) of the targets.

    A word and its translation point the same way (shared MEANING row); the
    independent noise keeps them from being identical, as in a trained model.
    """
    rng = np.random.default_rng(seed)
    h = MEANING + NOISE * rng.standard_normal(MEANING.shape)
    s = MEANING + NOISE * rng.standard_normal(MEANING.shape)
    return s, h


# --------------------------------------------------------------------------
# Terminal formatting
# --------------------------------------------------------------------------


def _width(text: str) -> int:
    """Display width in a terminal: CJK characters take two columns."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _pad(text: str, width: int, right: bool = False) -> str:
    gap = " " * max(width - _width(text), 0)
    return gap + text if right else text + gap


def _can_print(text: str) -> bool:
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _target_labels() -> List[str]:
    # A terminal that cannot encode CJK (e.g. a cp1252 console) gets pinyin.
    if _can_print("".join(TARGET)):
        return [f"{t} ({p})" for t, p in zip(TARGET, PINYIN)]
    return list(PINYIN)


def _table(rows: Sequence[str], cols: Sequence[str], values: np.ndarray, fmt: str = "{:7.3f}") -> str:
    """Aligned table with row labels on the left and column labels on top."""
    cells = [[fmt.format(x) for x in row] for row in values]
    label_w = max(_width(r) for r in rows)
    col_w = [max(_width(c), *(len(cells[i][j]) for i in range(len(rows)))) for j, c in enumerate(cols)]
    lines = ["  " + _pad("", label_w) + "  " + "  ".join(_pad(c, w, right=True) for c, w in zip(cols, col_w))]
    for r, row in zip(rows, cells):
        lines.append("  " + _pad(r, label_w) + "  " + "  ".join(_pad(x, w, right=True) for x, w in zip(row, col_w)))
    return "\n".join(lines)


def _ranked(weights_row: np.ndarray) -> str:
    order = np.argsort(-weights_row, kind="stable")
    return "  ".join(f"{SOURCE[j]} {weights_row[j]:.3f}" for j in order)


# --------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------

_CJK_FONT_HINTS = ("cjk", "han", "hei", "song", "kai", "ming", "wenquanyi", "wqy", "yahei", "pingfang",
                   "hiragino", "droid sans fallback", "arial unicode", "simsun", "simhei", "noto sans sc")


def _cjk_font() -> Optional[str]:
    """Name of an installed font that has the target words' glyphs, or None.

    Without such a font matplotlib draws empty boxes and warns about missing
    glyphs, so the plot falls back to pinyin labels instead.
    """
    from matplotlib import font_manager, ft2font

    fonts = sorted(font_manager.fontManager.ttflist,
                   key=lambda f: not any(h in f.name.lower() for h in _CJK_FONT_HINTS))
    for entry in fonts[:300]:  # bounded: font-rich systems list thousands
        # "Last Resort" maps every code point to a placeholder box: it covers
        # the characters without being able to show them.
        if "last resort" in entry.name.lower():
            continue
        try:
            font = ft2font.FT2Font(entry.fname)
        except (OSError, RuntimeError, ValueError):
            continue
        if all(font.get_char_index(ord(c)) for c in "".join(TARGET)):
            return entry.name
    return None


def plot(weights: np.ndarray, path: str) -> None:
    """Save a labelled heatmap of the attention weights (3 targets x 3 sources) to ``path``."""
    # The object-oriented API needs no GUI backend and leaves pyplot state alone.
    from matplotlib.figure import Figure

    font = _cjk_font()
    ylabels = [f"{p} ({t})" for t, p in zip(TARGET, PINYIN)] if font else list(PINYIN)
    fig = Figure(figsize=(5.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(SOURCE)), SOURCE)
    ticks: Dict[str, Any] = {"fontfamily": [font, "sans-serif"]} if font else {}
    ax.set_yticks(range(len(ylabels)), ylabels, **ticks)
    ax.set_xlabel("source word (key / value)")
    ax.set_ylabel("target word (query)")
    ax.set_title("Attention weights a_ij")
    for i in range(weights.shape[0]):
        for j in range(weights.shape[1]):
            ink = "black" if weights[i, j] > 0.6 else "white"
            ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", color=ink)
    fig.colorbar(image, ax=ax, label="weight")
    fig.savefig(path, dpi=150)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attnfast demo",
        description="Walk through score -> softmax -> aggregate on 'Tom chase Jerry' -> 汤姆 追逐 杰瑞.",
    )
    p.add_argument("--plot", metavar="FILE", help="also save a heatmap of the attention weights (needs matplotlib)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments after ``demo`` (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status, 0 on success.
    """
    args = _parser().parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit(
                "attnfast demo: --plot needs matplotlib. Install it with: pip install matplotlib"
            ) from None

    import attnfast  # the public (compiled) API; imported here so this module stays light

    s, h = embeddings()
    q = s  # decoder states of 汤姆 追逐 杰瑞: the queries, (3, D)
    k = v = h  # encoder states of Tom chase Jerry: keys and values, (3, D)
    d = h.shape[1]
    rows = _target_labels()

    print("attnfast demo: attention in three stages")
    print(f"  source (encoder states h_j = keys and values): {' '.join(SOURCE)}")
    print(f"  target (decoder states s_i = queries):         {' '.join(rows)}")
    print(f"  each state has D = {d} features; a word and its translation share their features (+ noise)\n")
    print(_table(SOURCE + rows, FEATURES, np.vstack([h, s]), fmt="{:6.2f}"))

    e = attnfast.scores(q, k)  # scaled_dot: (s_i . h_j) / sqrt(D)
    print(f"\nStage 1  score    e_ij = (s_i . h_j) / sqrt({d})                attnfast.scores(q, k)")
    print(_table(rows, SOURCE, e))

    a = attnfast.softmax(e)
    print("\nStage 2  softmax  a_ij = exp(e_ij) / sum_j exp(e_ij)           attnfast.softmax(e)")
    print(_table(rows, SOURCE, a))
    print("  attention weights per target word, largest first:")
    label_w = max(_width(r) for r in rows)
    for r, row in zip(rows, a):
        print(f"  {_pad(r + ':', label_w + 1)} {_ranked(row)}")

    c = attnfast.aggregate(a, v)
    print("\nStage 3  aggregate  C_i = sum_j a_ij h_j                      attnfast.aggregate(a, v)")
    print(_table(rows, FEATURES, c, fmt="{:6.2f}"))

    fused = attnfast.attention(q, k, v)
    diff = float(np.max(np.abs(fused - c)))
    print(f"\nFused    attnfast.attention(q, k, v) gives the same context vectors: max |difference| = {diff:.1e}")

    # Without attention the decoder gets one summary of the whole sentence
    # for every target word; the mean encoder state is exactly attention with
    # uniform weights 1/3, which makes the comparison fair.
    fixed = h.mean(axis=0)
    print("\nWithout attention every target word sees the same C = mean_j h_j (weight 1/3 on every word):")
    print(_table(["C (every word)"], FEATURES, fixed[None, :], fmt="{:6.2f}"))
    print("  the source word each target word translates, in its context vector:")
    print(f"  {_pad('', label_w + 1)} {'':<8} {'weight':>17}   {'distance |C - h_j|':>23}")
    print(f"  {_pad('', label_w + 1)} {'':<8} {'with':>8} {'without':>8}   {'with':>11} {'without':>11}")
    for i, r in enumerate(rows):
        near, far = np.linalg.norm(c[i] - h[i]), np.linalg.norm(fixed - h[i])
        print(f"  {_pad(r + ':', label_w + 1)} {SOURCE[i]:<8} {a[i, i]:8.3f} {1 / 3:8.3f}   {near:11.3f} {far:11.3f}")

    if args.plot:
        plot(a, args.plot)
        print(f"\nsaved the heatmap of the attention weights to {args.plot}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m attnfast demo` goes through __main__
    sys.exit(main())
