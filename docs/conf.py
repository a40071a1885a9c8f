"""Sphinx configuration of attnfast's documentation site.

Build it with ``python -m attnfast docs`` or, as CI does (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The API reference is autodoc + numpydoc on the attnfast that Python imports (the installed package, or
the source tree's ``python/`` with an in-place build when nothing is installed). The mask pictures are
drawn at build time by ``_ext/maskfigures.py`` from :mod:`attnfast.reference`; nothing generated is
committed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
try:
    import attnfast
except ImportError:
    # A source checkout whose extension was built in place (the development worktree layout).
    sys.path.insert(0, str(HERE.parent / "python"))
    import attnfast

project = "attnfast"
author = "attnfast developers"
copyright = "attnfast developers"
release = attnfast.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
    "maskfigures",
    "optional_api",
]

# Sources: the .rst guides, plus the Markdown pages kept next to the data they describe
# (kernel_decisions.md; dask.md once the Dask support is merged). The perf_*.json / *.txt files are
# data read by the performance guide (literalinclude), not pages.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_generated", "_ext", "Thumbs.db", ".DS_Store"]
root_doc = "index"

html_theme = "furo"
html_title = f"attnfast {release}"
html_static_path: list = []

# Every cross-reference must resolve (nitpicky), except the names of other projects: the build runs
# offline, so there is no intersphinx inventory for NumPy, Python's typing module, PyTorch or JAX.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(numpy|np|typing|collections|jax|torch|ml_dtypes|dask|builtins)(\..*)?"),
    (r"py:.*", r"(ArrayLike|NDArray|DTypeLike|Any|Optional|Union|Literal|Sequence|Tuple|Dict|Mapping|"
               r"Iterable|Callable|Self|int|float|bool|str|dict|list|tuple|None|ndarray|array_like|"
               r"dtype|Array|Tensor|floating|integer|bool_|int8|int32|int64|float32|float64|float16|"
               r"bfloat16|signedinteger|NamedTuple|object|optional|default|sequence|array|scalar|of)"),
]

autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
# Signatures without annotations: each parameter's shape and dtype are in its numpydoc entry, and the
# annotations (ArrayLike unions, one @overload per return_lse / return_weights combination) are for
# type checkers; autodoc would print every overload with the aliases expanded.
autodoc_typehints = "none"

# numpydoc: types in parameter lists stay text (they are shapes and dtypes, not classes); members
# of classes are documented by their own sections, not by generated tables.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
# Every public function must document every parameter (PR01/PR02), its result (RT01) and an example
# (EX01); with -W a missing one fails the build.
numpydoc_validation_checks = {"PR01", "PR02", "RT01", "EX01"}
numpydoc_validation_exclude = {
    r"\.AttentionGrads\.",  # the named tuple's generated field accessors and methods
    r"\.AttentionGrads$",  # a NamedTuple: its fields are documented as Attributes
    r"\.show_config$",  # prints, returns nothing
    r"\.set_num_threads$",
}

myst_heading_anchors = 3

# ALiBi's distance is written |diag_i - j| in docstrings (attnfast.dask's among them); in reStructuredText
# that is a substitution reference, so it is defined as its own text.
rst_prolog = """
.. |diag_i - j| unicode:: U+7C diag_i U+20 - U+20 j U+7C
"""


def _scale_out_pages(app, docname, source):
    """Link the Dask guide (docs/dask.md, from the Dask branch) from the scale-out page when it exists,
    so this tree builds without warnings before and after it lands."""
    if docname != "guide/scaleout":
        return
    if (HERE / "dask.md").exists():
        source[0] += "\n.. toctree::\n   :maxdepth: 2\n\n   /dask\n"
    else:
        source[0] += "\n*(The Dask guide, docs/dask.md, is not in this checkout.)*\n"


# A Markdown page in docs/ is written to be read on the repository too, so it links files outside docs/
# (../README.md, ../benchmarks/...) that are not pages of this site: show those as the file's path.
_OUTSIDE_LINK = re.compile(r"\[([^\]]+)\]\(\.\./([^)#\s]+)(#[^)\s]*)?\)")


def _repository_links(app, docname, source):
    if app.env.doc2path(docname).suffix == ".md":
        source[0] = _OUTSIDE_LINK.sub(lambda m: f"{m.group(1)} (`{m.group(2)}` in the repository)", source[0])


def setup(app):
    app.connect("source-read", _scale_out_pages)
    app.connect("source-read", _repository_links)
