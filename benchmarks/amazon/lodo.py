"""Leave-one-domain-out on the four Amazon domains: several labeled sources, one unlabeled target.

For each target T (every domain in turn) the three other domains are the labeled sources; T's 1600 train
reviews are the unlabeled target data and its 400 test reviews the score, as in ``run.py``. Same model and
CPU settings as the quick profile (MiniLM, the top 1 of 6 layers adapted with LoRA over the cached bottom 5,
64 tokens, AdamW lr 1e-3), seeds 0 and 1. Rows:

- ``single`` S -> T for each source S: the quick profile's source-only model of S (100 + 60 steps, batch 16);
  reported as the mean over the three sources and as the best of them (picked WITH target labels: an
  upper bound on choosing one source, as multi-source papers report it);
- ``pooled``: all three sources, one batch of 16 per domain per step (``DomainAdaptation`` with a mapping of
  source batches), mean of the three task losses; 100 warm-up + 60 steps;
- ``pooled+mmd``: the pooled warm-up, then 60 steps with MMD (λ 0.3, the weight frozen in ``run.py``) between
  the concatenated source features and the target (``sources="pooled"``);
- ``per-source mmd``: the same with the mean over sources of MMD(source d, target) (``sources="per_source"``);
- ``mldg``: MLDG (``peftadapt.train.meta.MLDG``, first order, one meta-test domain drawn per step,
  inner lr = the lr, β = 1) for all 160 steps from the same initialisation;
- ``mldg+mmd``: MLDG with the pooled MMD to the target on its meta-train loss from step 100 (after the same
  warm-up length: aligning from step 0 wrecks an untrained classifier, see docs/amazon.md);
- ``adda``: the pooled source-only model, then 60 ADDA steps (``peftadapt.align.ADDA``: a target adapter
  initialized from the source one on the same frozen base, a discriminator, inverted-label GAN loss,
  alternating updates; Adam lr 2e-4, betas (0.5, 0.999) as in Tzeng et al.); the source head.

Nothing is tuned on target labels: every weight and learning rate is fixed above before the run.

    nohup python -m benchmarks.amazon.lodo > benchmarks/results/amazon_lodo.log 2>&1 &
    python -m benchmarks.amazon.lodo --report

Cells are written one by one to ``benchmarks/results/amazon_lodo.json``; a rerun skips finished cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_outputs import SequenceClassifierOutput

from peftadapt.align import ADDA, DomainAdaptation, Term
from peftadapt.train.meta import MLDG

from .data import DOMAINS
from .report import _fmt, _stats, gain_check
from .run import (
    FROZEN_WEIGHTS,
    PROFILES,
    RESULTS,
    TopModel,
    _batch,
    _Sampler,
    _save_results,
    encode_domain,
    train_steps,
    warm_model,
)

ROWS = (
    "single (mean of 3 sources)",
    "single (best source, picked with target labels)",
    "pooled",
    "pooled+mmd",
    "per-source mmd",
    "mldg",
    "mldg+mmd",
    "adda",
)
SEEDS = (0, 1, 2)
MMD_WEIGHT = FROZEN_WEIGHTS["mmd"]
ADDA_LR, ADDA_BETAS = 2e-4, (0.5, 0.999)


class Classifier(nn.Module):
    """``run.TopModel`` called the way every peftadapt step calls a model: ``model(**batch)`` -> ``.loss``, ``.logits``.

    ``feature`` (an identity) carries the pooled feature the head reads: the layer the alignment terms, MLDG
    and ADDA tap.
    """

    def __init__(self, top: TopModel):
        super().__init__()
        self.top = top
        self.feature = nn.Identity()

    def forward(self, hidden, attention_mask, labels=None):
        f = self.feature(self.top.features(hidden, attention_mask))
        logits = self.top.head(self.top.drop(f))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _b(enc, idx, labels: bool = True) -> dict:
    h, m, y = _batch(enc, idx, "cpu")
    return {"hidden": h, "attention_mask": m, **({"labels": y} if labels else {})}


@torch.no_grad()
def accuracy(model: Classifier, enc, bs: int = 100) -> float:
    model.eval()
    right = 0
    for s in range(0, len(enc.test), bs):
        idx = enc.test[s : s + bs]
        right += int((model(**_b(enc, idx, labels=False)).logits.argmax(1) == enc.labels[idx]).sum())
    return right / len(enc.test)


def fresh(prof, seed: int) -> Classifier:
    torch.manual_seed(1000 + seed)  # the quick profile's initialisation of a warm-up
    return Classifier(TopModel("lora", prof))


def multi_steps(
    model: Classifier,
    enc: dict,
    sources: list,
    target: str | None,
    steps: int,
    prof,
    seed: int,
    da: DomainAdaptation | None = None,
    mldg: MLDG | None = None,
    offset: int = 0,
    total: int | None = None,
) -> dict:
    """``steps`` AdamW steps on one batch per source domain (+ the target batch when ``da`` is on)."""
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad] + (da.parameters() if da is not None else []),
        lr=prof.learning_rate,
        weight_decay=0.01,
    )
    samp = {d: _Sampler(enc[d].fit, prof.batch, seed + 13 * i) for i, d in enumerate(sources)}
    t_samp = _Sampler(enc[target].train, prof.batch, seed + 7) if target else None
    total = total or steps
    model.train()
    last = {}
    for step in range(steps):
        batches = {d: _b(enc[d], s.next()) for d, s in samp.items()}
        p = (offset + step) / max(1, total - 1)
        tb = _b(enc[target], t_samp.next(), labels=False) if t_samp is not None else None
        opt.zero_grad(set_to_none=True)
        if mldg is not None:
            last = mldg.backward(batches, target_batch=tb, progress=p, da=da)
        elif da is not None:
            loss, last = da.loss(batches, tb, p)
            loss.backward()
        else:
            loss = sum(model(**b).loss for b in batches.values()) / len(batches)
            loss.backward()
        opt.step()
    return {k: float(v) for k, v in last.items() if isinstance(v, torch.Tensor) and v.dim() == 0}


def run_target(target: str, seed: int, enc: dict, prof, cells: dict, save, log) -> None:
    sources = [d for d in DOMAINS if d != target]
    key = lambda row: f"{target}|{row}|{seed}"  # noqa: E731
    for s in sources:  # single sources: the quick profile's source-only models (warm-up cached by run.py)
        k = key(f"single:{s}")
        if k not in cells:
            top, _ = warm_model(prof, enc, s, "lora", seed, "cpu")
            torch.manual_seed(2000 + seed)
            train_steps(top, enc[s], prof.adapt_steps, prof, seed + 1, "cpu")
            cells[k] = {"acc": accuracy(Classifier(top), enc[target])}
            save(), log(f"{k}: {cells[k]}")
    W, A = prof.warmup_steps, prof.adapt_steps
    if all(key(row) in cells for row in ROWS[2:]):
        return
    t0 = time.time()
    warm = fresh(prof, seed)
    multi_steps(warm, enc, sources, None, W, prof, seed)
    warm_state = {k: v.detach().clone() for k, v in warm.state_dict().items()}
    log(f"{target} s{seed}: pooled warm-up {time.time() - t0:.0f}s")

    def branch() -> Classifier:
        m = fresh(prof, seed)
        m.load_state_dict(warm_state)
        torch.manual_seed(2000 + seed)
        return m

    pooled = None
    for row in ("pooled", "pooled+mmd", "per-source mmd"):
        k = key(row)
        if k in cells and row != "pooled":
            continue
        t0 = time.time()
        m = branch()
        if row == "pooled":
            logs = multi_steps(m, enc, sources, None, A, prof, seed + 1)
            pooled = m
            if k in cells:
                continue
        else:
            with DomainAdaptation(
                m,
                [Term("mmd", weight=MMD_WEIGHT)],
                layer=m.feature,
                sources="pooled" if row == "pooled+mmd" else "per_source",
            ) as da:
                logs = multi_steps(m, enc, sources, target, A, prof, seed + 1, da=da)
        cells[k] = {"acc": accuracy(m, enc[target]), "seconds": time.time() - t0, **logs}
        save(), log(f"{k}: acc {cells[k]['acc']:.4f} ({cells[k]['seconds']:.0f}s)")
    for row in ("mldg", "mldg+mmd"):
        k = key(row)
        if k in cells:
            continue
        t0 = time.time()
        m = fresh(prof, seed)
        ml = MLDG(m, inner_lr=prof.learning_rate, meta_weight=1.0, first_order=True, meta_test_domains=1, seed=seed)
        if row == "mldg":
            logs = multi_steps(m, enc, sources, None, W + A, prof, seed, mldg=ml)
        else:
            start = W / (W + A)
            with DomainAdaptation(
                m, [Term("mmd", weight=MMD_WEIGHT, start=start)], layer=m.feature, sources="pooled"
            ) as da:
                logs = multi_steps(m, enc, sources, target, W + A, prof, seed, da=da, mldg=ml)
        cells[k] = {"acc": accuracy(m, enc[target]), "seconds": time.time() - t0, **logs}
        save(), log(f"{k}: acc {cells[k]['acc']:.4f} ({cells[k]['seconds']:.0f}s)")
    k = key("adda")
    if k not in cells:
        t0 = time.time()
        assert pooled is not None
        m = pooled
        with ADDA(m, head="head", layer=m.feature, in_features=m.top.head.in_features, seed=seed) as adda:
            d_opt = torch.optim.Adam(adda.discriminator.parameters(), lr=ADDA_LR, betas=ADDA_BETAS)
            t_opt = torch.optim.Adam(adda.target_parameters(), lr=ADDA_LR, betas=ADDA_BETAS)
            samp = {d: _Sampler(enc[d].fit, prof.batch, seed + 13 * i) for i, d in enumerate(sources)}
            t_samp = _Sampler(enc[target].train, 3 * prof.batch, seed + 7)
            m.train()
            for _ in range(A):
                sb = [_b(enc[d], s.next(), labels=False) for d, s in samp.items()]
                logs = adda.step(_concat(sb), _b(enc[target], t_samp.next(), labels=False), d_opt, t_opt)
        cells[k] = {
            "acc": accuracy(m, enc[target]),
            "seconds": time.time() - t0,
            **{a: float(b) for a, b in logs.items()},
        }
        save(), log(f"{k}: acc {cells[k]['acc']:.4f} ({cells[k]['seconds']:.0f}s)")


def _concat(batches: list[dict]) -> dict:
    """One batch of several (right-padded to the longest)."""
    t = max(b["hidden"].shape[1] for b in batches)
    h = torch.cat([F.pad(b["hidden"], (0, 0, 0, t - b["hidden"].shape[1])) for b in batches])
    m = torch.cat([F.pad(b["attention_mask"], (0, t - b["attention_mask"].shape[1])) for b in batches])
    return {"hidden": h, "attention_mask": m}


def report(res: dict) -> str:
    cells = res["cells"]
    seeds = [str(s) for s in res["meta"]["seeds"]]
    targets = list(DOMAINS)
    acc: dict = {}
    for t in targets:
        for s in seeds:
            singles = [cells.get(f"{t}|single:{d}|{s}", {}).get("acc") for d in DOMAINS if d != t]
            if all(v is not None for v in singles):
                acc[(ROWS[0], t, s)] = 100 * sum(singles) / 3
                acc[(ROWS[1], t, s)] = 100 * max(singles)
            for row in ROWS[2:]:
                c = cells.get(f"{t}|{row}|{s}")
                if c is not None:
                    acc[(row, t, s)] = 100 * c["acc"]
    lines = ["| | " + " | ".join(f"→ {t}" for t in targets) + " | **average** |", "|---|" + "---|" * (len(targets) + 1)]
    for row in ROWS:
        per_t = [_fmt(*_stats([acc.get((row, t, s)) for s in seeds])) for t in targets]
        avg = []
        for s in seeds:
            v = [acc.get((row, t, s)) for t in targets]
            avg.append(None if any(x is None for x in v) else sum(v) / len(v))
        lines.append(f"| {row} | " + " | ".join(per_t) + f" | **{_fmt(*_stats(avg))}** |")
    lines += [
        "",
        ("Gain over `pooled` (source-only on all three sources), the quick profile's noise rule (gain > 2 sigma):"),
        "",
        ("| row | gain (points) | sigma | (target, seed) cells better / tied / total | gain > 2 sigma? |"),
        "|---|---|---|---|---|",
    ]
    base = {(t, s): acc.get(("pooled", t, s)) for t in targets for s in seeds}
    for row in ROWS:
        if row == "pooled":
            continue
        g = gain_check(base, {(t, s): acc.get((row, t, s)) for t in targets for s in seeds}, targets, seeds)
        gain = "–" if g["gain"] is None else f"{g['gain']:+.2f}"
        lines.append(
            f"| {row} | {gain} | {g['sigma']:.2f} | {g['wins']} / {g['ties']} / {g['cells']} | "
            f"{'**yes**' if g['met'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(RESULTS / "amazon_lodo.json"))
    ap.add_argument("--targets", nargs="+", choices=DOMAINS, default=list(DOMAINS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--report", action="store_true", help="only write the table (amazon_lodo.md) from the JSON")
    ap.add_argument(
        "--steps",
        nargs=2,
        type=int,
        default=None,
        metavar=("WARMUP", "ADAPT"),
        help="override the quick profile's 100 + 60 steps (a smoke run: write to another --out)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    res = json.loads(out.read_text()) if out.exists() else {"cells": {}}
    if not args.report:
        import transformers

        transformers.logging.set_verbosity_error()
        torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
        prof = PROFILES["quick"]
        if args.steps:
            prof = dataclasses.replace(prof, warmup_steps=args.steps[0], adapt_steps=args.steps[1])
        env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_THREADS",) if k in os.environ)
        cmd = f"{env} python -m benchmarks.amazon.lodo {' '.join(sys.argv[1:])}".strip()
        res["meta"] = {
            "seeds": sorted(set(res.get("meta", {}).get("seeds", [])) | set(SEEDS)),
            "commands": list(dict.fromkeys([*res.get("meta", {}).get("commands", []), cmd])),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        }
        t0 = time.time()
        log = lambda m: print(f"[{time.time() - t0:7.0f}s] {m}", flush=True)  # noqa: E731
        enc = {d: encode_domain(d, prof, "cpu") for d in DOMAINS}

        def save() -> None:
            _save_results(res, out)

        for seed in args.seeds:
            for t in args.targets:
                run_target(t, seed, enc, prof, res["cells"], save, log)
        log("done")
    md = [
        "# Leave-one-domain-out: three labeled Amazon sources, one unlabeled target",
        "",
        "Commands: "
        + "; ".join(f"`{c}`" for c in res["meta"]["commands"])
        + f" ({res['meta']['machine']}, torch {res['meta']['torch']}). "
        "Report: `python -m benchmarks.amazon.lodo --report`. Protocol: docs/amazon.md (leave-one-domain-out); "
        "accuracy % on the target's 400 test reviews, mean ± std over seeds; the average over targets per seed "
        "first.",
        "",
        report(res),
    ]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
