"""Progress off a terminal: plain lines instead of redrawn bars.

A tqdm bar redraws itself with carriage returns; in a log file (CI, ``nohup``, a job
scheduler) that is thousands of updates on one line. Where stderr is not a terminal, the
Trainer's and the evaluation's bars are off and :class:`PlainProgress` writes one plain line
at a logging step, at most every :data:`PLAIN_EVERY_S` seconds (and always at the last step).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

PLAIN_EVERY_S = 10.0  # at most one progress line per this many seconds off a terminal


def on_terminal() -> bool:
    """Whether stderr is a terminal (where a redrawn bar is readable)."""
    try:
        return bool(sys.stderr is not None and sys.stderr.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class PlainProgress:
    """One line per logging step, throttled to one per ``every_s`` seconds: ``train: step 40/100 loss 0.6931 ...``."""

    def __init__(self, name: str, total: int, every_s: float | None = None):
        self.name, self.total = name, total
        self.every_s = PLAIN_EVERY_S if every_s is None else every_s
        self.t0 = time.perf_counter()
        self.last: float | None = None

    def line(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def step(self, step: int, values: Mapping[str, Any]) -> None:
        now = time.perf_counter()
        if step != self.total and self.last is not None and now - self.last < self.every_s:
            return
        self.last = now
        shown = " ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        self.line(f"step {step}/{self.total} {shown} ({now - self.t0:.0f} s)")

    def eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.line(f"eval at step {step}: " + " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items()))
