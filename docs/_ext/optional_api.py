"""Sphinx extension: ``.. optional-automodule:: attnfast.torch`` documents a module whose dependency
may be missing.

When the module imports, the directive expands to ``.. automodule:: NAME`` with ``:members:`` (the
module's ``__all__``) so it is documented like the rest of the API; when importing it raises
ImportError (PyTorch, JAX or Dask not installed, or the module not in this version), it becomes a note
saying what to install, and the build stays free of warnings either way.

Usage::

    .. optional-automodule:: attnfast.torch
       :install: pip install torch
"""

from __future__ import annotations

import importlib

from docutils import nodes
from docutils.parsers.rst import directives
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


class OptionalAutomodule(SphinxDirective):
    required_arguments = 1
    option_spec = {"install": directives.unchanged}

    def run(self):
        name = self.arguments[0]
        try:
            importlib.import_module(name)
        except ImportError as e:
            install = self.options.get("install")
            text = f"{name} could not be imported when this page was built ({e})."
            if install:
                text += f" Install its dependency ({install}) and rebuild to document it here."
            note = nodes.note()
            note += nodes.paragraph(text=text)
            return [note]
        holder = nodes.section()
        lines = StringList([f".. automodule:: {name}", "   :members:", ""], source=self.get_source_info()[0])
        self.state.nested_parse(lines, self.content_offset, holder, match_titles=True)
        return holder.children


def setup(app):
    app.add_directive("optional-automodule", OptionalAutomodule)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
