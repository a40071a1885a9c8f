"""attnfast on Dask arrays: attention over chunked (and distributed) q, k, v, exact by lse merging.

::

    import attnfast.dask as ad
    out = ad.attention(q, k, v, causal=True)            # a dask.array.Array, lazy
    out, lse = ad.attention(q, k, v, return_lse=True)
    out.compute()                                        # any scheduler: threads, processes, distributed

Chunks along the batch and head axes map blockwise, query chunks are independent, and each visible
key chunk of an output block gives a partial (out, lse) that a fixed balanced tree of
:func:`attnfast.merge_states` combines, so the result does not depend on the scheduler. Key chunks that
causal, a window or kv_lengths hide from a whole output block get no task.

Needs the optional dependencies ``pip install "attnfast[dask]"`` (dask[array] and distributed);
``import attnfast`` itself never imports Dask.
"""

from __future__ import annotations

try:
    import dask.array  # noqa: F401  (the one dependency the graphs need)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without dask
    raise ImportError(
        "attnfast.dask needs Dask's array module, which is not installed (" + str(exc) + "). "
        'Install it with: pip install "attnfast[dask]"'
    ) from exc

from ._forward import attention  # noqa: E402

__all__ = ["attention"]

# The backward lives in its own module; export it when present.
try:
    from ._backward import attention_backward  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != f"{__name__}._backward":
        raise
else:
    __all__.append("attention_backward")
