"""Table and noise check of the causal-LM study: ``benchmarks/results/causal_da.{json -> md}``.

    python -m benchmarks.causal_da.report

Accuracy % on each target's 400 test reviews, mean ± std over seeds; the average over pairs is taken per
seed first. The gain check is the quick profile's noise rule (``benchmarks.amazon.report.gain_check``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from benchmarks.amazon.report import _fmt, _stats, gain_check

from .run import REGULARIZERS, RESULTS

ROWS = ("zero-shot", "source-only", *REGULARIZERS)
LABELS = {
    "mmd": "mmd (last token)",
    "mmd-mean": "mmd (mean over the prompt)",
    "coral": "coral (last token)",
    "entropy": "entropy (information maximisation)",
    "target_lm": "target_lm (UDALM-style)",
}


def collect(res: dict):
    acc, weights, pos = {}, {}, {}
    for key, cell in res["cells"].items():
        pair, row, seed = key.split("|")
        if "error" in cell:
            continue
        acc[(row, pair, seed)] = 100 * cell["acc"]
        pos[(row, pair, seed)] = 100 * cell.get("pos_frac", float("nan"))
        if "weight" in cell:
            weights.setdefault(row, []).append(cell["weight"])
    prof = res["meta"]["profile"]
    pairs = [f"{s}>{t}" for s, t in prof["pairs"]]
    return acc, weights, pos, pairs, [str(s) for s in prof["seeds"]]


def report(res: dict) -> str:
    acc, weights, pos, pairs, seeds = collect(res)
    lines = ["| | " + " | ".join(pairs) + " | **average** | λ (balance rule, range) | predicted positive % |",
             "|---|" + "---|" * (len(pairs) + 3)]
    for row in ROWS:
        sds = ["-"] if row == "zero-shot" else seeds
        cells = [_fmt(*_stats([acc.get((row, p, s)) for s in sds])) for p in pairs]
        per_seed = []
        for s in sds:
            vals = [acc.get((row, p, s)) for p in pairs]
            per_seed.append(None if any(v is None for v in vals) else sum(vals) / len(vals))
        m, sd, n = _stats(per_seed)
        avg = "–" if m is None else (f"{m:.2f}" if row == "zero-shot" else _fmt(m, sd, n))
        w = weights.get(row)
        wtxt = f"{min(w):.3g} – {max(w):.3g}" if w else ""
        pp = [v for (r, _p, _s), v in pos.items() if r == row and not math.isnan(v)]
        ptxt = f"{sum(pp) / len(pp):.0f}" if pp else ""
        lines.append(f"| {LABELS.get(row, row)} | " + " | ".join(cells) + f" | **{avg}** | {wtxt} | {ptxt} |")
    lines += ["", "Gain over source-only (the quick profile's noise rule: gain > 2 sigma):", "",
              "| regularizer | gain (points) | sigma | (pair, seed) cells better / tied / total | gain > 2 sigma? |",
              "|---|---|---|---|---|"]
    base = {(p, s): acc.get(("source-only", p, s)) for p in pairs for s in seeds}
    for row in REGULARIZERS:
        other = {(p, s): acc.get((row, p, s)) for p in pairs for s in seeds}
        if all(v is None for v in other.values()):
            continue
        g = gain_check(base, other, pairs, seeds)
        gain = "–" if g["gain"] is None else f"{g['gain']:+.2f}"
        lines.append(f"| {LABELS.get(row, row)} | {gain} | {g['sigma']:.2f} | {g['wins']} / {g['ties']} / "
                     f"{g['cells']} | {'**yes**' if g['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(RESULTS / "causal_da.json"))
    args = ap.parse_args(argv)
    path = Path(args.results)
    res = json.loads(path.read_text())
    p = res["meta"]["profile"]
    head = [
        "# Causal-LM domain adaptation: SmolLM2-135M-Instruct, sentiment as a chat answer",
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in res["meta"]["commands"]) + f" ({res['meta']['machine']}, "
        f"torch {res['meta']['torch']}). Report: `python -m benchmarks.causal_da.report`.",
        "",
        (f"Protocol: the review (first 64 tokens) in a user turn, \"Review: ...\\n\\nIs this review positive or "
        f"negative? Answer with one word.\"; the answer \"positive\" / \"negative\"; accuracy (%) on the target's "
        f"400 test reviews by the answer token's log-likelihood at the end of the prompt; source: 800 labeled "
        f"reviews (balanced), target: 800 unlabeled reviews (prompts only). LoRA r {p['lora_r']} on q/k/v/o of "
        f"the top {p['adapt_layers']} of 30 blocks, answer-only loss, batch {p['batch']} source + {p['batch']} "
        f"target, AdamW lr {p['learning_rate']}, {p['warmup_steps']} source-only warm-up steps then "
        f"{p['adapt_steps']} steps with the regularizer (source-only: the same steps without it); seeds "
        f"{p['seeds']}. Weights: λ = {p['balance']} × L_answer / |D| on the warm-up model (no target label)."),
        "",
    ]
    md = "\n".join(head) + report(res) + "\n"
    out = path.with_suffix(".md")
    out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
