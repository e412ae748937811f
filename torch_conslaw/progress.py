"""A dependency-free progress bar for long computations (written to stderr).

Example:
    >>> with ProgressBar(total=3, label="levels", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.update()
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    """Minimal text progress bar; silent when ``enabled`` is False or the stream is no TTY.

    ``total=None`` shows a counter without a bar (for loops of unknown length).
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        width: int = 30,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled
        self.total = total
        self.label = label
        self.width = width
        self.done = 0
        self.note = ""
        self._start = time.perf_counter()

    def update(self, n: int = 1, note: str = "") -> None:
        """Advance by ``n`` steps and redraw, with an optional short ``note``."""
        self.done += n
        if note:
            self.note = note
        self._draw()

    def set_total(self, total: int | None) -> None:
        """Change the expected number of steps (e.g. once it becomes known)."""
        self.total = total
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._start
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(round(frac * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {self.note}"
        else:
            text = f"\r{self.label} {self.done} {elapsed:6.1f}s {self.note}"
        self.stream.write(text[:160].ljust(80))
        self.stream.flush()

    def __enter__(self) -> "ProgressBar":
        self._draw()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
