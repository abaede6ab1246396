"""Pictures of a run: training curves, and a bar chart for comparisons."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Training loss (task and regularizer terms) and eval metrics against the step."""
    plt = _pyplot()
    train = [r for r in history if r.get("split") == "train"]
    evals = [r for r in history if r.get("split") == "eval"]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    keys = ["loss", "task_loss", *sorted({k for r in train for k in r if k.startswith("reg/")})]
    for k in keys:
        pts = [(r["step"], r[k]) for r in train if k in r]
        if pts:
            ax.plot(*zip(*pts, strict=False), label=k, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if evals:
        ax = axes[0][1]
        for k in sorted({k for r in evals for k in r if "/" in k}):
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot(*zip(*pts, strict=False), marker="o", label=k, lw=1.2)
        ax.set_xlabel("step")
        ax.set_title("evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return Path(path)


def plot_bars(
    values: Mapping[str, float],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    baseline: str | None = None,
    errors: Mapping[str, float] | None = None,
    references: Mapping[str, float] | None = None,
) -> Path:
    """One bar per run; a dashed line at the ``baseline`` run's value and a dotted,
    labeled line per ``references`` entry (e.g. the majority-class accuracy)."""
    plt = _pyplot()
    names = list(values)
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4))
    yerr = [errors.get(n, 0.0) for n in names] if errors else None
    bars = ax.bar(
        names,
        [values[n] for n in names],
        yerr=yerr,
        capsize=4,
        color=["#888888" if n == baseline else "#3b75af" for n in names],
    )
    for b, n in zip(bars, names, strict=False):
        top = b.get_height() + (errors.get(n, 0.0) if errors else 0.0)  # above the error bar
        ax.annotate(
            f"{values[n]:.3f}",
            (b.get_x() + b.get_width() / 2, top),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    if baseline is not None and baseline in values:
        ax.axhline(values[baseline], ls="--", color="#555555", lw=1)
    for label, v in (references or {}).items():
        ax.axhline(v, ls=":", color="#aa3333", lw=1.2, label=f"{label} ({v:.3f})")
    if references:
        ax.legend(fontsize=8, loc="lower right")
    lo = min([*values.values(), *(references or {}).values()])
    hi = max([*values.values(), *(references or {}).values()])
    if lo >= 0.0 and hi <= 1.0:  # fractions: zoom in on the differences, labeled values keep it honest
        ax.set_ylim(max(0.0, lo - 0.15), min(1.02, hi + 0.08))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return Path(path)
