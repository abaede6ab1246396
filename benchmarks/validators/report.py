"""The validator study's table: for each validator, its pick's target accuracy, regret and rank correlation.

    python -m benchmarks.validators.report      # -> benchmarks/results/validators.md / .json / .png

Per (pair, seed) the candidates are the grid's cells (regularizer x weight, "none" included).
A validator picks the cell with its highest score; its *regret* is the best cell's target test
accuracy minus the picked cell's (points; the best cell is known only in hindsight, with target
labels). Spearman is the rank correlation between the validator's score and target accuracy over
the cells. Each figure is the mean over (pair, seed) groups; only complete groups count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from peftadapt.core.io import write_json
from peftadapt.validators import VALIDATOR_NAMES, spearman

from .run import EXTRA, GRID, OUT, cell_key

RESULTS = OUT.parent
NAMES = {
    "source_accuracy": "source validation accuracy (baseline)",
    "im": "information maximization (IM)",
    "entropy": "target entropy",
    "snd": "SND (Saito et al. 2021)",
    "bnm": "BNM (Cui et al. 2020)",
    "dev": "DEV (You et al. 2019)",
    "reverse_validation": "reverse validation",
}
FIXED = [("none", 0.0), ("mmd", 0.3), ("entropy", 0.3)]  # no selection: one fixed choice for every pair


def load() -> tuple[dict, list[str]]:
    groups, commands = {}, []
    for f in sorted(OUT.glob("*.json"), key=lambda f: f.name.endswith(".extra.json")):  # main files first
        data = json.loads(f.read_text())
        commands += data.get("meta", {}).get("commands", [])
        extra = f.name.endswith(".extra.json")
        pair = f.name.removesuffix(".json").removesuffix(".extra").replace("-", ">")
        seeds = sorted({int(k.rsplit("|s", 1)[1]) for k in data["cells"]})
        for s in seeds:
            cells = groups.setdefault((pair, s), dict.fromkeys(GRID))
            cells.update({(r, w): data["cells"].get(cell_key(r, w, s)) for r, w in (EXTRA if extra else GRID)})
    return groups, list(dict.fromkeys(commands))


# Candidate sets: the whole grid, and each regularizer's weights with source-only ("none" = weight 0).
CANDIDATES = {
    "all cells": GRID,
    "MMD weight (0, 0.1, 0.3, 1)": [c for c in GRID if c[0] in ("none", "mmd")],
    "entropy weight (0, 0.1, 0.3, 1)": [c for c in GRID if c[0] in ("none", "entropy")],
}
ORDER = ["source_accuracy", *[n for n in VALIDATOR_NAMES if n != "source_accuracy"]]


def mean(v):
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


def evaluate(groups: dict, cands: list) -> tuple[dict, dict]:
    """Per selection rule: pick accuracy, regret, Spearman over the (pair, seed) groups; and the picks per group."""
    rows: dict = {}
    per_group = {}
    for g, cells in groups.items():
        acc = {k: 100 * cells[k]["acc"] for k in cands}
        best = max(acc.values())
        per_group[g] = {"best": best, "best_cell": max(acc, key=acc.get), "picks": {}}
        for name in VALIDATOR_NAMES:
            score = {k: cells[k][name] for k in cands}
            pick = max(score, key=score.get)
            r = rows.setdefault(name, {"acc": [], "regret": [], "rho": []})
            r["acc"].append(acc[pick])
            r["regret"].append(best - acc[pick])
            r["rho"].append(spearman([score[k] for k in cands], [acc[k] for k in cands]))
            per_group[g]["picks"][name] = f"{pick[0]} {pick[1]:g}"
        for reg, w in FIXED:
            if (reg, w) in cands:
                r = rows.setdefault(f"fixed: {reg} {w:g}", {"acc": [], "regret": [], "rho": []})
                r["acc"].append(acc[(reg, w)])
                r["regret"].append(best - acc[(reg, w)])
        r = rows.setdefault("oracle (best cell, target labels)", {"acc": [], "regret": [], "rho": []})
        r["acc"].append(best)
        r["regret"].append(0.0)
    return rows, per_group


def table(rows: dict) -> list[str]:
    lines = [
        "| selection | target accuracy of the pick (%) | regret vs best cell (points) | Spearman(score, target acc) |",
        "|---|---|---|---|",
    ]
    for name in ORDER + [k for k in rows if k not in VALIDATOR_NAMES]:
        if name in rows:
            r = rows[name]
            rho = f"{mean(r['rho']):+.2f}" if r["rho"] else ""
            lines.append(f"| {NAMES.get(name, name)} | {mean(r['acc']):.2f} | {mean(r['regret']):.2f} | {rho} |")
    return lines


def summary_table(summary: dict, n_groups: int, n_extended: int) -> list[str]:
    """One row per selection rule: regret (points) on each candidate set, pick accuracy and Spearman on the grid."""
    titles = list(summary)
    head = (
        f"| selection | target acc. of the pick, 7 cells (%) | regret: 7 cells | MMD weights only | "
        f"entropy weights only | 9 cells (+ weight 3; {n_extended} groups) | Spearman, 7 cells |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name in [*ORDER, *[k for k in summary[titles[0]] if k not in VALIDATOR_NAMES]]:
        cols = []
        for t in titles[:3] + ([titles[3]] if len(titles) > 3 else [None]):
            v = summary[t].get(name) if t else None
            cols.append("" if v is None else f"{v['regret']:.2f}")
        main = summary[titles[0]].get(name)
        if main is None:
            continue
        rho = "" if main["spearman"] is None else f"{main['spearman']:+.2f}"
        lines.append(f"| {NAMES.get(name, name)} | {main['acc']:.2f} | " + " | ".join(cols) + f" | {rho} |")
    lines.append(f"\n{n_groups} (pair, seed) groups: 4 pairs x {n_groups // 4} seeds; regret in points.")
    return lines


def main() -> None:
    groups, commands = load()

    def ok(c, cands):
        return all(c.get(k) is not None and math.isfinite(c[k]["acc"]) for k in cands)

    complete = {g: c for g, c in groups.items() if ok(c, GRID)}
    extended = {g: c for g, c in groups.items() if ok(c, GRID + EXTRA)}
    done = sum(c.get(k) is not None for c in groups.values() for k in GRID)
    seeds = sorted({s for _, s in groups})
    n_expected = len(GRID) * 4 * len(seeds)  # 4 pairs x every seed started
    status = (
        f"**Complete**: {len(complete)} (pair, seed) groups"
        if done >= n_expected
        else f"**PARTIAL**: {done} of {n_expected} cells (4 pairs x seeds {seeds} x {len(GRID)} grid cells) done; "
        f"the {len(complete)} complete (pair, seed) groups ({', '.join(f'{p} s{s}' for p, s in sorted(complete))}) "
        "enter the tables"
    )
    lines = [
        "# Validator study: picking the regularizer and its weight without target labels",
        "",
        status + ". Resume (finished cells are skipped): "
        "`TORCH_THREADS=1 python -m benchmarks.validators.run --seeds 0 1 2` (and with `--extended`) then "
        "`python -m benchmarks.validators.report`.",
        "",
        "Commands that added cells: " + "; ".join(f"`{c}`" for c in commands) + ".",
        "",
        "Grid per (pair, seed): "
        + ", ".join(f"{r} {w:g}" if r != "none" else "none (source-only)" for r, w in GRID)
        + ". Amazon reviews, quick profile of `benchmarks/amazon` (MiniLM, LoRA on the top layer, length 64, "
        "100 source-only warm-up steps + 60 steps with the regularizer). Target accuracy on the target's 400 test "
        "reviews; validators read 800 unlabeled target train reviews and the source's 200 validation reviews. "
        "Each figure is the mean over the (pair, seed) groups; regret = best candidate's target accuracy "
        "(hindsight, target labels) minus the pick's, in points.",
    ]
    summary = {}
    sets = [(title, cands, complete) for title, cands in CANDIDATES.items()]
    if extended:
        names = ", ".join(f"{p} s{s}" for p, s in sorted(extended))
        title = f"all cells + weight 3 of each regularizer (only {len(extended)} groups: {names})"
        sets.append((title, GRID + EXTRA, extended))
    for title, cands, grp in sets:
        rows, per_group = evaluate(grp, cands)
        summary[title] = {
            k: {"acc": mean(v["acc"]), "regret": mean(v["regret"]), "spearman": mean(v["rho"]) if v["rho"] else None}
            for k, v in rows.items()
        }
        lines += ["", f"## Candidates: {title}", "", *table(rows), ""]
        head = ["pair", "seed", "best (acc %)", *ORDER]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (pair, s), pg in sorted(per_group.items()):
            bc = pg["best_cell"]
            picks = " | ".join(pg["picks"][n] for n in ORDER)
            lines.append(f"| {pair} | {s} | {bc[0]} {bc[1]:g} ({pg['best']:.2f}) | {picks} |")
    short = summary_table(summary, len(complete), len(extended))
    lines[6:6] = ["", "## Summary", "", *short]
    (RESULTS / "validators.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "validators_summary.md").write_text("\n".join(short) + "\n")
    write_json(
        RESULTS / "validators.json",
        {
            "cells_done": done,
            "cells_expected": n_expected,
            "groups": [f"{p}|s{s}" for p, s in sorted(complete)],
            "summary": summary,
            "cells": {f"{p}|s{s}": {f"{r} {w:g}": v for (r, w), v in c.items() if v} for (p, s), c in groups.items()},
            "commands": commands,
        },
    )
    _plot({g: {k: c[k] for k in GRID} for g, c in complete.items()}, RESULTS / "validators.png")
    print("\n".join(lines))


def _plot(groups: dict, path: Path) -> None:
    if not groups:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ORDER
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for (pair, s), cells in sorted(groups.items()):
            xs = [v[name] for v in cells.values()]
            lo, hi = min(xs), max(xs)
            xs = [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in xs]  # per-group min-max: the ranking is what picks
            ax.scatter(xs, [100 * v["acc"] for v in cells.values()], s=10, label=f"{pair} s{s}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (scaled per pair)", fontsize=7)
    axes[0][0].set_ylabel("target test accuracy (%)")
    axes[0][-1].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
