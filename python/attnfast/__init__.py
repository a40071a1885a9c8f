"""attnfast: fast attention kernels for NumPy.

The three stages of attention, each a multi-threaded SIMD kernel, and a fused attention that never builds the
Lq x Lk score matrix::

    scores(q, k, method=...)   -> (..., Lq, Lk)     dot, scaled_dot, general, concat, additive
    softmax(x, axis, mask=...) -> same shape         stable: row max first, empty rows give 0
    aggregate(weights, v)      -> (..., Lq, Dv)      C_i = sum_j a_ij v_j
    attention(q, k, v, ...)    -> (..., Lq, Dv)      fused, with masks, causal, window, GQA, lse
    merge_states(outs, lses)   -> (out, lse)         combine attention over disjoint key sets
    attention_backward(dout, q, k, v, out, lse, ...) -> AttentionGrads(dq, dk, dv, dbias, ...)
    quantize_kv(x)             -> (x_int8, scale)   an int8 KV cache for attention's k_scale / v_scale

Arrays may be float64, float32, float16 or ``ml_dtypes.bfloat16``, in any mix: 16-bit data is read as
stored, computed in float32 (float64 when any input is float64) and rounded once into the result.

``attnfast.reference`` has the same functions in plain NumPy (float64 inside); every kernel is tested
against it.
"""

from __future__ import annotations

import operator
import warnings
from typing import Any, Dict, SupportsIndex

from . import _attnfast as _core
from . import _threadpool
from ._quantize import quantize_kv
from . import reference
from ._api import aggregate, attention, attention_backward, merge_states, scores, softmax
from ._grads import AttentionGrads
from ._varlen import attention_varlen

__version__ = _core.__version__

__all__ = [
    "scores",
    "softmax",
    "aggregate",
    "attention",
    "merge_states",
    "attention_backward",
    "attention_varlen",
    "AttentionGrads",
    "reference",
    "set_num_threads",
    "get_num_threads",
    "capabilities",
    "show_config",
    "quantize_kv",
    "__version__",
]

if _core.isa_problem():
    warnings.warn(f"{_core.isa_problem()}; using {_core.isa()} instead", RuntimeWarning, stacklevel=2)
if _core.default_threads_problem():
    warnings.warn(_core.default_threads_problem(), RuntimeWarning, stacklevel=2)

# threadpoolctl.threadpool_info() / threadpool_limits() see attnfast's pool (without importing threadpoolctl).
_threadpool.install()


def set_num_threads(n: SupportsIndex) -> None:
    """Use at most ``n`` threads in attnfast's kernels; ``n = 0`` restores the default.

    Parameters
    ----------
    n : int
        The thread limit, from 1 to 65536; 0 restores the default count.

    Raises
    ------
    TypeError
        n is not an int (a bool, a float or a non-0-d array).
    ValueError
        n is negative or above the maximum.

    See Also
    --------
    get_num_threads

    Notes
    -----
    The setting is process-wide: it applies to calls from every Python thread, now and later, whichever
    thread set it. It only lowers the default (``OMP_NUM_THREADS`` if set to a valid count, else the
    CPUs this process may run on, read when attnfast is imported). ``threadpoolctl.threadpool_limits``
    is a separate process-wide limit that caps this choice without changing it, and leaving its
    ``with`` block restores the state before it exactly. Calling this also lets attnfast try again to
    start threads the operating system refused earlier. Results are bitwise identical for any thread
    count: work is split by shape, never by thread count.

    Examples
    --------
    >>> import attnfast
    >>> attnfast.set_num_threads(1)
    >>> attnfast.get_num_threads()
    1
    >>> attnfast.set_num_threads(0)          # back to the default
    >>> attnfast.get_num_threads() <= attnfast.capabilities()["default_threads"]   # (a threadpoolctl limit may cap it)
    True
    """
    try:
        # bool is an int but a flag, not a count; an ndarray has __index__, but only a 0-d integer one
        # converts (operator.index's own error would not name this function).
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        import numpy as np

        what = type(n).__name__
        if isinstance(n, np.ndarray):
            what += f" of shape {tuple(n.shape)} and dtype {n.dtype}"
        raise TypeError(f"set_num_threads expects an int, got {what}") from None
    if n < 0:
        raise ValueError(f"set_num_threads: n must be >= 0 (0 restores the default), got {n}")
    if n > _core.max_threads:
        # Beyond it a count is a mistake, not a machine.
        raise ValueError(f"set_num_threads: n must be at most {_core.max_threads}, got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads attnfast's kernels use for a call made now, from any Python thread.

    The smallest of the default, ``set_num_threads``' choice and threadpoolctl's limit (all three are
    process-wide).

    Starts the threads it counts; if the operating system refuses one, it reports how many there are and
    warns once (RuntimeWarning).

    Returns
    -------
    int
        At least 1: the default (or the limit :func:`set_num_threads` set), capped by any thread limit in
        force.

    See Also
    --------
    set_num_threads, capabilities

    Examples
    --------
    >>> import attnfast
    >>> attnfast.get_num_threads() >= 1
    True
    """
    return _core.get_num_threads()


def capabilities() -> Dict[str, Any]:
    """What this build can do here: the SIMD target in use and those available, threads, version, build.

    Returns
    -------
    dict
        ``"isa"`` (str): the SIMD target in use ("scalar", "avx2", "avx512", "avx512bf16" or "amx"; set
        ``ATTNFAST_ISA`` to choose one); ``"isas"`` (list of str): the targets this CPU and OS can run,
        best first; ``"compiled_isas"`` (list of str): the targets in this build; ``"threads"`` (int):
        :func:`get_num_threads`; ``"default_threads"`` (int): the count before any
        :func:`set_num_threads` or threadpoolctl limit; ``"default_threads_source"`` (str): where that
        count comes from ("OMP_NUM_THREADS", "CPU affinity" or "hardware threads"); ``"thread_limit"``
        (int or None): threadpoolctl's process-wide limit, None when there is none; ``"version"`` (str);
        ``"compiler"`` (str).

    See Also
    --------
    show_config : the same, printed.

    Examples
    --------
    >>> import attnfast
    >>> caps = attnfast.capabilities()
    >>> caps["isa"] in caps["isas"], "scalar" in caps["compiled_isas"]
    (True, True)
    """
    return {
        "isa": _core.isa(),
        "isas": list(_core.usable_isas()),
        "compiled_isas": list(_core.compiled_isas()),
        "threads": _core.get_num_threads(),
        # Where the default count comes from: "OMP_NUM_THREADS", "CPU affinity" or "hardware threads".
        # No OpenMP runtime is involved (the kernels run on attnfast's own pool).
        "default_threads": _core.default_num_threads(),
        "default_threads_source": _core.default_threads_source(),
        "thread_limit": _core.thread_limit() or None,  # threadpoolctl's, None when not limited
        "version": __version__,
        "compiler": _core.compiler,
    }


def show_config() -> None:
    """Print version, SIMD targets, threads and build information (:func:`capabilities`, readable).

    Also ``python -m attnfast config``.

    See Also
    --------
    capabilities

    Examples
    --------
    >>> import attnfast
    >>> attnfast.show_config()  # doctest: +ELLIPSIS
    attnfast ...
      SIMD target in use : ...
    """
    import platform

    import numpy as np

    caps = capabilities()
    print(f"attnfast {caps['version']}")
    print(f"  SIMD target in use : {caps['isa']}")
    print(f"  usable here        : {', '.join(caps['isas'])}")
    print(f"  compiled in        : {', '.join(caps['compiled_isas'])}")
    limit = f"; threadpoolctl limit {caps['thread_limit']}" if caps["thread_limit"] else ""
    print(f"  threads            : {caps['threads']} (attnfast's task pool; default "
          f"{caps['default_threads']}, from {caps['default_threads_source']}{limit})")
    print(f"  compiler           : {caps['compiler']}")
    print(f"  python / numpy     : {platform.python_version()} / {np.__version__}")
    print("  force a target with ATTNFAST_ISA=scalar|avx2|avx512")
