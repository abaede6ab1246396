"""``Term`` (one scheduled, weighted regularizer) and ``Alignment`` (their sum).

Training minimises ``L_task(source) + sum_k lambda_k(p) * D_k(f_s, f_t[, g_s, g_t])``;
:class:`Alignment` is the sum, each :class:`Term` one ``lambda_k(p) * D_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from .registry import build
from .regularizer import Regularizer
from .schedule import SCHEDULES, Schedule, schedule_weight
from .scope import Scope, check_scope, gather_inputs

__all__ = ["Alignment", "Term"]


class Term(nn.Module):
    """One weighted regularizer: ``weight * schedule(progress) * regularizer(...)``.

    Args:
        regularizer: a :class:`Regularizer` or a registered name (built with
            default options; use :func:`build` for options).
        weight: the term's maximum weight lambda (>= 0).
        schedule: "constant", "linear" (warm-up), "dann" (2/(1+exp(-10r))-1)
            or a callable progress -> multiplier.
        warmup: ramp length as a fraction of training ("linear"/"dann"; 0 means
            the ramp spans from ``start`` to the end of training).
        start: fraction of training before which the term is off. Aligning
            from step 0 can wreck a classifier that has not learnt the task yet.
        name: the key of this term in the logged values (default: regularizer name).
        scope: with several processes, "global" (loss over the whole batch of all processes),
            "local" (each process on its shard) or "auto" (global for batch statistics such as
            MMD / CORAL, local for per-sample losses); see :mod:`peftadapt.align.scope`.
    """

    def __init__(
        self,
        regularizer: Regularizer | str,
        weight: float = 1.0,
        schedule: Schedule | Callable[[float], float] = "constant",
        warmup: float = 0.0,
        start: float = 0.0,
        name: str | None = None,
        scope: Scope = "auto",
    ) -> None:
        super().__init__()
        reg = build(regularizer) if isinstance(regularizer, str) else regularizer
        if not isinstance(reg, nn.Module):
            raise TypeError(f"Term needs a Regularizer or a registered name, got {type(regularizer).__name__}")
        if isinstance(schedule, str) and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; valid schedules: {list(SCHEDULES)} or a callable")
        if not callable(schedule) and not isinstance(schedule, str):
            raise TypeError(f"schedule must be a name {list(SCHEDULES)} or a callable, got {schedule!r}")
        for label, v, hi in (("weight", weight, math.inf), ("warmup", warmup, 1.0), ("start", start, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (0.0 <= v <= hi):
                want = "a number >= 0 (and finite)" if hi == math.inf else f"a number in [0, {hi}]"
                raise ValueError(f"Term {label} must be {want}, got {v!r}")
        if schedule == "constant" and warmup > 0:
            raise ValueError("warmup has no effect with schedule='constant'; use schedule='linear' or 'dann'")
        if start + warmup > 1.0 + 1e-12:
            raise ValueError(f"start + warmup must be <= 1 (fractions of training), got {start} + {warmup}")
        self.regularizer = reg
        self.weight = float(weight)
        self.schedule = schedule
        self.warmup = float(warmup)
        self.start = float(start)
        self.name: str = name if name else getattr(reg, "name", type(reg).__name__.lower())
        self.scope = check_scope(scope)

    def weight_at(self, progress: float) -> float:
        """The effective weight lambda(progress)."""
        return self.weight * schedule_weight(self.schedule, progress, self.warmup, self.start)

    def forward(self, fs, ft, source_logits=None, target_logits=None, progress: float = 0.0, target_lm_loss=None):
        """Returns (weighted loss or None if the weight is 0, raw loss or None). ``target_lm_loss``
        reaches only a regularizer that reads it (``needs_lm_loss``: ``target_lm``)."""
        w = self.weight_at(progress)
        if hasattr(self.regularizer, "set_progress"):
            self.regularizer.set_progress(progress)
        if w == 0.0:
            return None, None
        if getattr(self.regularizer, "needs_lm_loss", False):  # a per-process loss: nothing to gather
            raw = self.regularizer(fs, ft, source_logits, target_logits, target_lm_loss=target_lm_loss)
            return w * raw, raw
        fs, ft, source_logits, target_logits = gather_inputs(
            self.scope, self.regularizer, fs, ft, source_logits, target_logits
        )
        raw = self.regularizer(fs, ft, source_logits, target_logits)
        return w * raw, raw

    def extra_repr(self) -> str:
        sched = self.schedule if isinstance(self.schedule, str) else getattr(self.schedule, "__name__", "callable")
        return f"name={self.name!r}, weight={self.weight}, schedule={sched!r}, warmup={self.warmup}, start={self.start}"


class Alignment(nn.Module):
    """A weighted sum of regularizers: ``sum_k lambda_k(p) * D_k``.

    ``terms`` is an iterable of :class:`Term` (a bare :class:`Regularizer` or
    name becomes ``Term(it)`` with weight 1). Term names must be unique (pass
    ``Term(..., name=...)`` to use one method twice).

    ``forward(fs, ft, ls=None, lt=None, progress=0.0)`` returns
    ``(total_loss, {name: raw_loss_float})``; a term whose weight is 0 at this
    progress (before ``start``) is not computed and is absent from the dict.
    ``total_loss`` is a 0-dim tensor (zero when no term is on).
    """

    def __init__(self, terms: Iterable[Term | Regularizer | str]) -> None:
        super().__init__()
        if isinstance(terms, (Term, Regularizer, str)):
            terms = [terms]
        built = [t if isinstance(t, Term) else Term(t) for t in terms]
        if not built:
            raise ValueError("Alignment needs at least one term")
        names = [t.name for t in built]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate term name(s) {dup}; give each Term a distinct name=")
        self.terms = nn.ModuleList(built)

    @property
    def members(self) -> list[Term]:
        """The terms, typed (iterating the ModuleList yields plain ``nn.Module``)."""
        return [t for t in self.terms if isinstance(t, Term)]

    @property
    def needs_logits(self) -> bool:
        return any(getattr(t.regularizer, "needs_logits", False) for t in self.members)

    @property
    def needs_lm_loss(self) -> bool:
        """Some term reads the target's own language-modeling loss (``target_lm``)."""
        return any(getattr(t.regularizer, "needs_lm_loss", False) for t in self.members)

    @property
    def has_parameters(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def set_progress(self, p: float) -> None:
        for t in self.members:
            t.regularizer.set_progress(p)

    def set_default_scope(self, scope: str) -> None:
        """Give every term left on ``scope="auto"`` the run-wide ``scope`` (``TrainConfig.align_scope``)."""
        if check_scope(scope) == "auto":
            return
        for t in self.members:
            if t.scope == "auto":
                t.scope = scope

    def weights(self, progress: float) -> dict[str, float]:
        """{term name: effective weight at this progress}."""
        return {t.name: t.weight_at(progress) for t in self.members}

    def forward(self, fs, ft, ls=None, lt=None, progress: float = 0.0):
        total = None
        values: dict[str, float] = {}
        for t in self.members:
            weighted, raw = t(fs, ft, ls, lt, progress=progress)
            if weighted is None:
                continue
            values[t.name] = float(raw.detach())
            total = weighted if total is None else total + weighted
        if total is None:
            ref = fs if isinstance(fs, torch.Tensor) else None
            total = torch.zeros((), device=ref.device if ref is not None else None, dtype=torch.float32)
        return total, values
