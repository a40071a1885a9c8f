"""``python -m attnfast docs``: the documentation build command (the build itself runs in CI)."""

from __future__ import annotations

import importlib.util

from attnfast.__main__ import main


def test_docs_without_sphinx_names_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sphinx" else real(name, *a))
    assert main(["docs"]) == 1
    err = capsys.readouterr().err
    assert "needs sphinx" in err and 'pip install "attnfast[docs]"' in err


def test_docs_outside_a_source_checkout(monkeypatch, tmp_path, capsys):
    import attnfast.__main__ as cli

    monkeypatch.chdir(tmp_path)
    # As installed from a wheel: no docs/ next to the package.
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "attnfast" / "__main__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert main(["docs"]) == 1
    assert "source checkout" in capsys.readouterr().err


def test_docs_help(capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:
        main(["docs", "-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--open" in out and "OUTDIR" in out.upper()
