"""Sphinx extension: ``.. mask-figure::`` draws which keys each query sees, at build time.

The picture is computed, not drawn by hand: the directive calls :func:`attnfast.reference.attention`
with ``return_weights=True`` on all-zero queries and keys (so every visible key of a row has the same
score) and the keyword arguments given in its ``:kwargs:`` option, and colours each (query, key) cell
by its weight; a hidden key weighs exactly 0 and is drawn grey. The figure therefore shows the
reference's own visibility rule for that call, and cannot drift from it.

Usage (the content becomes the caption)::

    .. mask-figure:: causal_bottom_right
       :lq: 4
       :lk: 7
       :kwargs: causal=True, causal_align="bottom_right"

       ``causal=True, causal_align="bottom_right"``: the last query sees every key.

``:kwargs:`` is evaluated as the arguments of ``dict(...)`` with ``np`` (NumPy) in scope. ``:batch:``
(default 1) draws one panel per batch item (for per-item ``kv_lengths``). The PNG is written to
``_generated/masks/`` under the source directory (ignored by git) and rewritten only when it changes.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

OUTPUT = Path("_generated") / "masks"


def _weights(lq: int, lk: int, batch: int, kwargs: dict):
    import numpy as np

    import attnfast.reference

    q = np.zeros((batch, lq, 2))
    k = np.zeros((batch, lk, 2))
    v = np.zeros((batch, lk, 1))
    _, weights = attnfast.reference.attention(q, k, v, return_weights=True, **kwargs)
    return np.asarray(weights, dtype=np.float64)


def _titles(batch: int, kwargs: dict):
    import numpy as np

    lengths = kwargs.get("kv_lengths")
    if lengths is None or batch == 1:
        return [None] * batch
    lengths = np.broadcast_to(np.asarray(lengths), (batch,))
    return [f"item {b}: kv_lengths = {int(n)}" for b, n in enumerate(lengths)]


def _render(weights, titles) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    batch, lq, lk = weights.shape
    cell = 0.32
    fig, axes = plt.subplots(1, batch, figsize=(batch * (lk * cell + 0.9) + 0.3, lq * cell + 1.1), squeeze=False)
    for ax, w, title in zip(axes[0], weights, titles):
        hidden = np.ma.masked_where(w > 0, np.ones_like(w))
        shown = np.ma.masked_where(w <= 0, w)
        ax.imshow(hidden, cmap="Greys", vmin=0, vmax=4, aspect="equal", interpolation="nearest")
        ax.imshow(shown, cmap="Blues", vmin=-0.25 * float(w.max()), vmax=float(w.max()) * 1.1, aspect="equal",
                  interpolation="nearest")
        ax.set_xticks(range(lk))
        ax.set_yticks(range(lq))
        ax.set_xticks(np.arange(-0.5, lk), minor=True)
        ax.set_yticks(np.arange(-0.5, lq), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.0)
        ax.tick_params(which="both", length=0, labelsize=7)
        ax.set_xlabel("key j", fontsize=8)
        ax.set_ylabel("query i", fontsize=8)
        if title:
            ax.set_title(title, fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    # No timestamp in the file: the same picture gives the same bytes (and is not rewritten).
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


class MaskFigure(SphinxDirective):
    required_arguments = 1
    has_content = True
    option_spec = {
        "lq": directives.positive_int,
        "lk": directives.positive_int,
        "batch": directives.positive_int,
        "kwargs": directives.unchanged,
        "alt": directives.unchanged,
    }

    def run(self):
        import numpy as np

        name = self.arguments[0]
        lq, lk = self.options.get("lq", 5), self.options.get("lk", 8)
        batch = self.options.get("batch", 1)
        source = self.options.get("kwargs", "")
        try:
            kwargs = eval(f"dict({source})", {"np": np})  # the docs' own sources, not user input
            weights = _weights(lq, lk, batch, kwargs)
        except Exception as e:
            raise self.error(f"mask-figure {name}: {type(e).__name__}: {e}") from None
        png = _render(weights, _titles(batch, kwargs))
        target = Path(self.env.srcdir) / OUTPUT / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or hashlib.sha256(target.read_bytes()).digest() != hashlib.sha256(png).digest():
            target.write_bytes(png)
        figure = nodes.figure()
        figure += nodes.image(uri=f"/{OUTPUT.as_posix()}/{name}.png",
                              alt=self.options.get("alt", f"visibility of {source or 'no mask'}"))
        if self.content:
            caption_holder = nodes.Element()
            self.state.nested_parse(self.content, self.content_offset, caption_holder)
            first = caption_holder[0] if len(caption_holder) else None
            if isinstance(first, nodes.paragraph):
                figure += nodes.caption(first.rawsource, "", *first.children)
                figure.extend(caption_holder[1:])
        return [figure]


def setup(app):
    app.add_directive("mask-figure", MaskFigure)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
