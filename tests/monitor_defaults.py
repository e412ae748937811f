"""Monitor arguments for tests that compare with every-step synchronous records.

The monitor is bounded by default (an overhead budget decides which steps are recorded, and
``recording="auto"`` may pick a worker recorder). Tests that count or compare records step by
step ask for every step on the training thread, unless they choose a schedule or recorder.
"""

from __future__ import annotations

from typing import Any

SCHEDULE = ("every", "log_spaced", "overhead_budget")
RECORDER = ("recording", "asynchronous")


def every_step(kw: dict[str, Any]) -> dict[str, Any]:
    """``kw`` with ``every=1`` and ``recording="sync"`` where it chooses neither."""
    out = dict(kw)
    if not any(k in out for k in SCHEDULE):
        out["every"] = 1
    if not any(k in out for k in RECORDER):
        out["recording"] = "sync"
    return out
