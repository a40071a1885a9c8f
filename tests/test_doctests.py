"""The Examples sections of the public docstrings, run as doctests against the imported package.

Runs with the stdlib :mod:`doctest` on whatever ``import attnfast`` finds (the installed package under a
plain ``pytest``), so the examples ``help()`` and the documentation show are the ones tested. Each
public module is one test; the optional ones (attnfast.torch, attnfast.jax, attnfast.dask) are skipped
when their dependency is missing. Besides every example passing, each public function and class of the
core modules must have at least one example, and a minimum number must have run in total (so a finder
that silently finds nothing fails).
"""

from __future__ import annotations

import doctest
import importlib
import inspect

import numpy as np
import pytest

import attnfast

# module -> the public names whose docstrings are checked (None: the module's __all__), and the
# dependency that makes the module optional.
CORE = {
    "attnfast": [n for n in attnfast.__all__ if n not in ("reference", "__version__")],
    "attnfast.reference": ["scores", "softmax", "aggregate", "attention", "attention_varlen", "merge_states",
                           "attention_backward"],
}
OPTIONAL = {"attnfast.torch": "torch", "attnfast.jax": "jax", "attnfast.dask": "dask"}
# Lower bounds on the examples run per module: a docstring losing its examples fails here.
MINIMUM_EXAMPLES = {"attnfast": 90, "attnfast.reference": 35, "attnfast.torch": 8, "attnfast.jax": 8}

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _import(name: str):
    dependency = OPTIONAL.get(name)
    if dependency is not None:
        pytest.importorskip(dependency)
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # the module is not part of this version (e.g. attnfast.dask not merged)
                pytest.skip(f"{name} is not in this version of attnfast")
            raise
    return importlib.import_module(name)


def _public_names(name: str, module) -> list:
    names = CORE.get(name)
    return list(module.__all__) if names is None else names


def _tests(name: str, module) -> list:
    """The doctests of the module's docstring and of each public object's (methods of classes included),
    each found once, with ``np`` and ``attnfast`` as globals."""
    finder = doctest.DocTestFinder(exclude_empty=False)
    globs = {"np": np, "attnfast": attnfast}
    tests = {}
    for test in finder.find(module, name, globs=dict(globs)):
        if test.name == name:  # the module docstring only: its objects are found by their public names
            tests[test.name] = test
    for public in _public_names(name, module):
        obj = getattr(module, public)
        if inspect.ismodule(obj):
            continue
        for test in finder.find(obj, f"{name}.{public}", module=False, globs=dict(globs)):
            tests.setdefault(test.name, test)
    return list(tests.values())


@pytest.mark.parametrize("name", list(CORE) + list(OPTIONAL))
def test_docstring_examples_pass(name):
    module = _import(name)
    tests = _tests(name, module)
    report = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    ran = 0
    for test in tests:
        result = runner.run(test, out=report.append, clear_globs=True)
        ran += result.attempted
    failures = runner.failures
    assert failures == 0, f"{failures} doctest example(s) of {name} failed:\n" + "".join(report)
    assert ran >= MINIMUM_EXAMPLES.get(name, 1), f"only {ran} doctest examples ran in {name}"


@pytest.mark.parametrize("name", list(CORE) + ["attnfast.torch", "attnfast.jax"])
def test_every_public_function_has_an_example(name):
    module = _import(name)
    without = []
    for public in _public_names(name, module):
        obj = getattr(module, public)
        if inspect.ismodule(obj):
            continue
        found = doctest.DocTestFinder(recurse=False).find(obj, public, module=False, globs={})
        if not any(test.examples for test in found):
            without.append(public)
    assert not without, f"{name}: public objects whose docstring has no Examples: {without}"


def _documented_parameters(doc: str) -> set:
    """The parameter names of a numpydoc docstring's Parameters section (``a, b : type`` lines too)."""
    lines = inspect.cleandoc(doc).splitlines()
    names = set()
    try:
        start = lines.index("Parameters") + 2
    except ValueError:
        return names
    for line in lines[start:]:
        if line and not line.startswith(" "):
            if set(line) == {"-"} or line in ("Returns", "Raises", "Notes", "Examples", "See Also", "Yields"):
                break
            names.update(part.strip() for part in line.split(" : ")[0].split(","))
    return names


def _public_functions():
    for name in CORE:
        module = importlib.import_module(name)
        for public in _public_names(name, module):
            obj = getattr(module, public)
            if inspect.isfunction(obj):
                yield f"{name}.{public}", obj


PUBLIC_FUNCTIONS = list(_public_functions())


@pytest.mark.parametrize("qualname, function", PUBLIC_FUNCTIONS, ids=[q for q, _ in PUBLIC_FUNCTIONS])
def test_every_parameter_is_documented(qualname, function):
    _assert_documented(qualname, function)


@pytest.mark.parametrize("name", ["attnfast.torch", "attnfast.jax"])
def test_every_adapter_parameter_is_documented(name):
    module = _import(name)
    for public in module.__all__:
        _assert_documented(f"{name}.{public}", getattr(module, public))


def _assert_documented(qualname, function):
    # help() shows __doc__: it must describe every argument of the signature, and what a function that
    # returns something returns, in numpydoc sections.
    doc = function.__doc__ or ""
    documented = _documented_parameters(doc)
    signature = inspect.signature(function)
    wanted = {("**" + p.name) if p.kind is p.VAR_KEYWORD else p.name for p in signature.parameters.values()}
    assert wanted <= documented, f"{qualname}: undocumented parameters {sorted(wanted - documented)}"
    returns_nothing = signature.return_annotation in (None, "None")
    for section in (["Parameters"] if wanted else []) + ([] if returns_nothing else ["Returns"]) + ["Examples"]:
        assert f"\n{section}\n" in "\n" + inspect.cleandoc(doc) + "\n", f"{qualname}: no {section} section"


def test_help_of_attention_has_every_section():
    doc = inspect.cleandoc(attnfast.attention.__doc__)
    for section in ("Parameters", "Returns", "Raises", "Notes", "Examples"):
        assert f"\n{section}\n{'-' * len(section)}\n" in doc, section
