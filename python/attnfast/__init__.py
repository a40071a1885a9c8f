"""attnfast: fast attention kernels for NumPy.

The three stages of attention, each a SIMD + OpenMP kernel, and a fused attention that never builds the
Lq x Lk score matrix::

    scores(q, k, method=...)   -> (..., Lq, Lk)     dot, scaled_dot, general, concat, additive
    softmax(x, axis, mask=...) -> same shape         stable: row max first, empty rows give 0
    aggregate(weights, v)      -> (..., Lq, Dv)      C_i = sum_j a_ij v_j
    attention(q, k, v, ...)    -> (..., Lq, Dv)      fused, with masks, causal, window, GQA, lse
    merge_states(outs, lses)   -> (out, lse)         combine attention over disjoint key sets

``attnfast.reference`` has the same functions in plain NumPy (float64 inside); every kernel is tested
against it.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import _attnfast as _core
from . import reference
from ._api import aggregate, attention, merge_states, scores, softmax

__version__ = _core.__version__

__all__ = [
    "scores",
    "softmax",
    "aggregate",
    "attention",
    "merge_states",
    "reference",
    "set_num_threads",
    "get_num_threads",
    "capabilities",
    "show_config",
    "__version__",
]

if _core.isa_problem():
    warnings.warn(f"{_core.isa_problem()}; using {_core.isa()} instead", RuntimeWarning, stacklevel=2)


_MAX_THREADS = 2**31 - 1  # the core's thread count is a C int


def set_num_threads(n: int) -> None:
    """Use at most ``n`` threads in attnfast's kernels (``n = 0`` restores the default).

    The OpenMP limit (``OMP_NUM_THREADS``, ``threadpoolctl.threadpool_limits``) still caps it, so any
    ``n`` at least that limit (2**31 or 2**63 included) means "as many as allowed". ``n`` is an int
    (Python or NumPy); a negative one raises ``ValueError``. Results are bitwise identical for any
    thread count.
    """
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(
            f"set_num_threads expects an int, got {type(n).__name__} ({n!r}); pass a thread count such "
            f"as set_num_threads(4), or 0 for the default."
        )
    n = int(n)
    if n < 0:
        raise ValueError(
            f"set_num_threads expects n >= 0 (a thread count, or 0 for the default); got {n}."
        )
    _core.set_num_threads(min(n, _MAX_THREADS))


def get_num_threads() -> int:
    """The number of threads attnfast's kernels use now."""
    return _core.get_num_threads()


def capabilities() -> dict:
    """What this build can do here: SIMD target in use and available, threads, version, build."""
    return {
        "isa": _core.isa(),
        "isas": list(_core.usable_isas()),
        "compiled_isas": list(_core.compiled_isas()),
        "threads": _core.get_num_threads(),
        "openmp": bool(_core.openmp()),
        "version": __version__,
        "compiler": _core.compiler,
    }


def show_config() -> None:
    """Print version, SIMD targets, threads and build information."""
    import platform

    caps = capabilities()
    print(f"attnfast {caps['version']}")
    print(f"  SIMD target in use : {caps['isa']}")
    print(f"  usable here        : {', '.join(caps['isas'])}")
    print(f"  compiled in        : {', '.join(caps['compiled_isas'])}")
    default = "OpenMP's default" if caps["openmp"] else "hardware threads"
    print(f"  threads            : {caps['threads']} (attnfast's task pool; default: {default})")
    print(f"  compiler           : {caps['compiler']}")
    print(f"  python / numpy     : {platform.python_version()} / {np.__version__}")
    print("  force a target with ATTNFAST_ISA=scalar|avx2|avx512")
