"""A progress bar for long computations: a thin wrapper around ``tqdm`` (written to stderr).

The interface (``update(n, note)``, ``set_total``, context manager, ``enabled=None`` meaning
"only on a terminal") stays small so that the calculators do not depend on tqdm's API.

Example:
    >>> with ProgressBar(total=3, label="levels", enabled=False) as bar:
    ...     for _ in range(3):
    ...         bar.update()
    >>> bar.done
    3
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

__all__ = ["ProgressBar"]


class ProgressBar:
    """Progress of a loop; silent when ``enabled`` is False, or when None and the stream is no TTY.

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
        self._bar: tqdm | None = None

    def update(self, n: int = 1, note: str = "") -> None:
        """Advance by ``n`` steps, with an optional short ``note`` shown after the counter."""
        self.done += n
        if note:
            self.note = note
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
            if n == 0:
                self._bar.refresh()

    def set_total(self, total: int | None) -> None:
        """Change the expected number of steps (e.g. once it becomes known)."""
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            self._bar = tqdm(
                total=self.total,
                desc=self.label,
                file=self.stream,
                ncols=None if self.total is None else 80 + self.width,
                leave=True,
                dynamic_ncols=False,
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
