"""Benchmark of attnfast against NumPy and the optional peers; run it as ``python -m attnfast bench``.

Modules, one purpose each:

* :mod:`.cli`       argument parsing and the command's entry point :func:`main`
* :mod:`.cases`     the shapes, their FLOPs and bytes
* :mod:`.peers`     attnfast, NumPy, PyTorch, ONNX Runtime and JAX behind one interface
* :mod:`.timing`    interleaved warm-up / repeat / median timing
* :mod:`.probes`    FMA-peak and read-bandwidth probes
* :mod:`.memory`    peak-RSS measurement in a child process started with the run
* :mod:`.runner`    runs everything and builds the report dict (the ``--json`` content)
* :mod:`.report`    the text tables and their legend;  :mod:`.plot`  the PNG
* :mod:`.compare`   ``--compare A.json B.json``: two saved reports side by side
* :mod:`.backward`, :mod:`.backward_run`, :mod:`.backward_report`   ``--backward``: cases, run, text
* :mod:`.serving`, :mod:`.serving_run`, :mod:`.serving_report`      ``--serving``: cases, run, text

Nothing here imports attnfast's compiled module or any peer at import time.
"""

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m attnfast bench`` (``argv`` excludes the word ``bench``)."""
    from .cli import main as _main
    return _main(None if argv is None else list(argv))


__all__ = ["main"]
