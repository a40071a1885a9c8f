"""Accuracy: each implementation's max abs error against a float64 reference on a slice of the case.

The reference is ``attnfast.reference`` (pure NumPy, float64) when the package provides it, else the
same textbook formulas here.  Large cases are checked on a slice (a few batch entries, heads and query
rows) so the float64 check never costs what the benchmark itself costs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Optional, Tuple, Union

import numpy as np

from .cases import AttentionCase, StageCase

__all__ = ["ReferenceCheck"]

F64 = np.float64


def _fallback_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool = False) -> np.ndarray:
    from .peers import numpy_attention
    out: np.ndarray = numpy_attention(q.astype(F64), k.astype(F64), v.astype(F64), causal)
    return out


def _reference_module() -> Optional[ModuleType]:
    try:
        from attnfast import reference
        return reference
    except Exception:  # noqa: BLE001 - attnfast not built/importable: use the local formulas
        return None


class ReferenceCheck:
    """Computes the float64 reference of a case once, then scores each implementation's output."""

    def __init__(self, case: Union[AttentionCase, StageCase], inputs: Tuple[Any, ...], causal: bool):
        self.case = case
        self.index = self._slice(case)
        self.expected: Optional[np.ndarray] = None
        self.error: Optional[str] = None
        try:
            self.expected = self._compute(case, inputs, causal)
        except Exception as exc:  # noqa: BLE001 - keep benchmarking without the error column
            self.error = f"reference failed: {type(exc).__name__}: {exc}"

    @staticmethod
    def _slice(case: Union[AttentionCase, StageCase]) -> Tuple[slice, ...]:
        if isinstance(case, AttentionCase):
            # First query rows: exact under top-left causal masking too (row i sees keys <= i).
            return (slice(0, 2), slice(0, 2), slice(0, 256))
        return (slice(0, 8),)

    def _compute(self, case: Union[AttentionCase, StageCase], inputs: Tuple[Any, ...], causal: bool) -> np.ndarray:
        ref = _reference_module()
        if isinstance(case, AttentionCase):
            q, k, v = inputs
            b, h, rows = self.index
            q, k, v = (a[b, h].astype(F64) for a in (q, k, v))
            q = q[..., rows, :]
            if ref is not None:
                return np.asarray(ref.attention(q, k, v, causal=causal), dtype=F64)
            return _fallback_attention(q, k, v, causal)
        sliced = [a[self.index].astype(F64) for a in inputs]
        if case.stage == "scores":
            q, k = sliced
            return (np.asarray(ref.scores(q, k, method="dot"), dtype=F64) if ref is not None
                    else q @ np.swapaxes(k, -1, -2))
        if case.stage == "softmax":
            (x,) = sliced
            if ref is not None:
                return np.asarray(ref.softmax(x, axis=-1), dtype=F64)
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            weights: np.ndarray = e / e.sum(axis=-1, keepdims=True)
            return weights
        w, v = sliced
        return np.asarray(ref.aggregate(w, v), dtype=F64) if ref is not None else w @ v

    def max_abs_error(self, output: object, to_numpy: Callable[[object], np.ndarray]) -> Optional[float]:
        """Max |output - reference| over the checked slice (None when there is no reference)."""
        if self.expected is None:
            return None
        got = np.asarray(to_numpy(output))
        if isinstance(self.case, AttentionCase):
            b, h, rows = self.index
            got = got[b, h][..., rows, :]
        else:
            got = got[self.index]
        if got.shape != self.expected.shape:
            raise ValueError(f"output slice has shape {got.shape}, expected {self.expected.shape}")
        return float(np.max(np.abs(got.astype(F64) - self.expected)))

