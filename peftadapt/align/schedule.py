"""Weight schedules: how a term's weight lambda(p) grows over training progress p in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

from .numerics import check_progress

__all__ = ["SCHEDULES", "Schedule", "dann_ramp", "schedule_weight"]

Schedule = Literal["constant", "linear", "dann"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


def dann_ramp(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule ``2 / (1 + exp(-gamma * p)) - 1`` (Ganin et al. 2016, Sec. 5.2.2; gamma = 10).

    0 at p = 0, 0.987 at p = 0.5, 0.99991 at p = 1.
    """
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def schedule_weight(
    schedule: str | Callable[[float], float], progress: float, warmup: float = 0.0, start: float = 0.0
) -> float:
    """The multiplier in [0, 1] that a schedule gives at training progress ``progress``.

    Before ``start`` the term is off (0). After it, with ``q = progress - start``
    and ramp length ``L = warmup`` if ``warmup > 0`` else ``1 - start``
    (the rest of training), ``r = min(1, q / L)``:

    - ``"constant"``: 1
    - ``"linear"``:   r                         (linear warm-up)
    - ``"dann"``:     2 / (1 + exp(-10 r)) - 1  (Ganin et al. 2016; with start=0,
      warmup=0 this is exactly the paper's ramp over p)

    A callable ``schedule(progress) -> float`` is used as is (after ``start``).
    """
    p = check_progress(progress)
    if p < start:
        return 0.0
    if callable(schedule):
        return float(schedule(p))
    if schedule == "constant":
        return 1.0
    length = warmup if warmup > 0 else 1.0 - start
    r = 1.0 if length <= 0 else min(1.0, (p - start) / length)
    if schedule == "linear":
        return r
    if schedule == "dann":
        return dann_ramp(r)
    raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)} or a callable")
