"""``peftadapt sweep``: run a grid of one run file, pick the cell by a validator, report.

    peftadapt sweep run.yaml --grid regularizers.0.weight=0.1,0.3,1 [--grid KEY=V1,V2 ...] --select snd

Each cell is the run file with one value per ``--grid`` key (the cartesian
product), trained into its own folder ``<sweep dir>/<key=value,...>`` with
``training.metric_for_best_model`` set to the selection metric, so the checkpoint
inside a cell and the cell itself are chosen by the same label-free score.
A cell whose ``summary.json`` exists is finished and skipped; an unfinished one
resumes from its newest checkpoint. The sweep writes ``sweep.json``, ``sweep.md``
(a table) and, when a labeled eval set gives an accuracy to compare with,
``sweep.png`` (selection score against that accuracy, the pick marked).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..core.io import write_atomic, write_json
from ..validators import VALIDATOR_NAMES, spearman
from .plots import _pyplot, _save
from .schema import RunConfig, load_run_config


def parse_grid(items: Sequence[str]) -> list[tuple[str, list[Any]]]:
    """``["KEY=V1,V2", ...]`` -> ``[(KEY, [v1, v2]), ...]`` (each value parsed as YAML)."""
    out = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or not values:
            raise ValueError(f"--grid {item!r}: expected SECTION.KEY=V1,V2,..., e.g. regularizers.0.weight=0.1,0.3,1")
        vals = [yaml.safe_load(v) for v in values.split(",")]
        if len(set(map(repr, vals))) != len(vals):
            raise ValueError(f"--grid {item!r}: a value is repeated")
        out.append((key, vals))
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--grid: a key is given twice: {keys}")
    return out


def cell_name(overrides: Mapping[str, Any]) -> str:
    """The folder name of a cell: ``key=value`` pairs joined by commas (path-safe)."""
    name = ",".join(f"{k}={v}" for k, v in overrides.items())
    return "".join(c if c.isalnum() or c in "=.,-_" else "_" for c in name)


def selection_metric(run: RunConfig, select: str) -> str:
    """``select`` as a metric name: a validator named for exactly one eval set, or ``<set>/<metric>`` as is."""
    if "/" in select:
        return select
    sets = [n for n, s in run.data.eval.items() if select in s.validators]
    if len(sets) == 1:
        return f"{sets[0]}/{select}"
    if select not in VALIDATOR_NAMES:
        raise ValueError(
            f"--select: {select!r} is not a validator ({', '.join(VALIDATOR_NAMES)}); or give a metric as SET/METRIC"
        )
    if not sets:
        raise ValueError(
            f"--select {select}: no eval set names it; add it to data.eval.NAME.validators in the run file"
        )
    raise ValueError(f"--select {select}: several eval sets name it ({sets}); give SET/{select}")


def reference_metric(run: RunConfig, score: str | None) -> str | None:
    """What the pick is compared with: ``score``, else the first labeled eval set's accuracy other than
    the source validation set (None when there is none)."""
    if score is not None:
        return score
    for n, s in run.data.eval.items():
        if s.label and n != run.data.source_validation:
            return f"{n}/accuracy"
    return None


def run_sweep(
    config: str | Path,
    grid: Sequence[str],
    select: str,
    *,
    overrides: Sequence[str] = (),
    output_dir: str | None = None,
    score: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every cell of the grid that is not finished, then pick and report (see the module docstring)."""
    from .runner import build_trainer  # lazy: loads transformers / accelerate only when a cell trains

    axes = parse_grid(grid)
    base = load_run_config(config, list(overrides), output_dir=output_dir)
    metric = selection_metric(base, select)
    ref = reference_metric(base, score)
    root = Path(base.training.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    cells = []
    for values in itertools.product(*(v for _, v in axes)):
        cell = dict(zip((k for k, _ in axes), values, strict=True))
        out = root / cell_name(cell)
        summary_path = out / "summary.json"
        if summary_path.exists():
            log(f"sweep: {out.name}: finished, skipped")
        else:
            run = load_run_config(
                config,
                [*overrides, *(f"{k}={json.dumps(v)}" for k, v in cell.items())],
                output_dir=str(out),
            )
            run.training.metric_for_best_model = metric
            log(f"sweep: {out.name}: training")
            build_trainer(run).train(resume=True)
        summary = json.loads(summary_path.read_text())
        final = summary["final_metrics"]
        if metric not in final:
            raise ValueError(f"--select: {metric!r} is not a metric of cell {out.name}; it has {sorted(final)}")
        cells.append(
            {
                "cell": cell,
                "output_dir": str(out),
                "best_step": summary.get("best_step"),
                "score": final[metric],
                "reference": final.get(ref) if ref else None,
            }
        )
    pick = max(range(len(cells)), key=lambda i: _finite(cells[i]["score"]))
    for i, c in enumerate(cells):
        c["selected"] = i == pick
    refs = [c["reference"] for c in cells]
    result: dict[str, Any] = {
        "config": str(config),
        "grid": dict(axes),
        "select": metric,
        "reference": ref,
        "cells": cells,
        "selected": cells[pick],
    }
    if ref and all(r is not None for r in refs):
        best_ref = max(refs)
        result["regret"] = best_ref - cells[pick]["reference"]
        result["spearman"] = spearman([c["score"] for c in cells], refs) if len(cells) > 2 else None
    write_json(root / "sweep.json", result)
    table = _table(result)

    def write_md(tmp: str) -> None:
        Path(tmp).write_text(table, encoding="utf-8")

    write_atomic(root / "sweep.md", write_md)
    if ref and all(r is not None for r in refs):
        _plot(result, root / "sweep.png")
    log(f"sweep: picked {cell_name(cells[pick]['cell'])} by {metric} = {cells[pick]['score']:.4g}; see {root}/sweep.md")
    return result


def _finite(x: float) -> float:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else -math.inf


def _table(result: Mapping[str, Any]) -> str:
    metric, ref = result["select"], result["reference"]
    keys = list(result["grid"])
    head = [*keys, "best step", metric, *([ref] if ref else []), "picked"]
    lines = [
        f"# Sweep of `{result['config']}`, selected by `{metric}`",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for c in result["cells"]:
        row = [str(c["cell"][k]) for k in keys] + [str(c["best_step"]), f"{c['score']:.4f}"]
        if ref:
            row.append("n/a" if c["reference"] is None else f"{c['reference']:.4f}")
        row.append("**yes**" if c["selected"] else "")
        lines.append("| " + " | ".join(row) + " |")
    if "regret" in result:
        rho = result.get("spearman")
        lines += [
            "",
            (
                f"Regret of the pick against the best cell by `{ref}`: {result['regret']:.4f}; Spearman rank "
                f"correlation of `{metric}` with `{ref}` over the cells: {'n/a' if rho is None else f'{rho:.3f}'}."
            ),
        ]
    return "\n".join(lines) + "\n"


def _plot(result: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    cells = result["cells"]
    xs, ys = [c["score"] for c in cells], [c["reference"] for c in cells]
    ax.scatter(xs, ys, s=28)
    for c in cells:
        ax.annotate(cell_name(c["cell"]), (c["score"], c["reference"]), fontsize=6, alpha=0.7)
    pick = result["selected"]
    ax.scatter([pick["score"]], [pick["reference"]], s=120, facecolors="none", edgecolors="red", label="picked")
    ax.set_xlabel(f"{result['select']} (selection score)")
    ax.set_ylabel(f"{result['reference']} (not used to pick)")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)
