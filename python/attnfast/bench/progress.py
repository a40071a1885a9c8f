"""Progress display: a tqdm bar when tqdm is installed, plain numbered lines on stderr otherwise."""

from __future__ import annotations

import sys
import time
from typing import List, Optional, Tuple

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, enabled) as p: p.step("label")`` — one step per finished unit of work."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "attnfast bench"):
        self.total = total
        self.enabled = enabled
        self.count = 0
        self._bar = None
        self._t0 = time.perf_counter()
        self._current: Optional[Tuple[str, float]] = None
        #: (label, seconds) of every finished step, in order: where a run's wall time went.
        self.durations: List[Tuple[str, float]] = []
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, leave=False,
                                 dynamic_ncols=True)
            except ImportError:
                self._bar = None

    def start(self, label: str) -> None:
        """Say what is being measured now (plain lines carry the seconds since the start)."""
        self._current = (label, time.perf_counter())
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        else:
            elapsed = time.perf_counter() - self._t0
            print(f"[{self.count + 1}/{self.total} {elapsed:6.1f} s] {label}", file=sys.stderr, flush=True)

    def step(self) -> None:
        self.count += 1
        if self._current is not None:
            label, t = self._current
            self.durations.append((label, time.perf_counter() - t))
            self._current = None
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
