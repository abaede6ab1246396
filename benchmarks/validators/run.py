"""The validator study: a grid of regularizers and weights per Amazon pair, every validator scored per cell.

Each cell (pair x regularizer x weight x seed) is the quick profile of
``benchmarks.amazon.run`` (MiniLM, LoRA on the top layer, length 64, 100
source-only warm-up steps shared by every cell of a source and seed, then 60
steps with the regularizer; "none" runs the same 60 steps source-only). After
training, the cell records

- ``acc``: accuracy on the target's 400 test reviews (never used to pick; scored afterwards),
- one score per validator of ``peftadapt.validators.VALIDATOR_NAMES``, computed from the
  model's outputs on 800 unlabeled target train reviews and the source's 200 labeled
  validation reviews (features: the mean-pooled last layer the head reads).

Usage (resumable: finished cells are skipped; one results file per pair)::

    TORCH_THREADS=1 python -m benchmarks.validators.run --pairs books:kitchen kitchen:electronics --seeds 0
    python -m benchmarks.validators.report

Results: ``benchmarks/results/validators/<source>-<target>.json`` (``--extended``: ``.extra.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from peftadapt import validators as V

from ..amazon.data import DOMAINS
from ..amazon.run import (
    PROFILES,
    QUICK_PAIRS,
    Encoded,
    TopModel,
    _atomic_json,
    build_regularizer,
    encode_domain,
    outputs,
    train_steps,
    warm_model,
)

OUT = Path(__file__).resolve().parents[1] / "results" / "validators"
# Cells in this order, so a study cut short still has a balanced grid for every pair.
GRID = [("none", 0.0), ("mmd", 0.3), ("entropy", 0.3), ("mmd", 1.0), ("entropy", 1.0), ("mmd", 0.1), ("entropy", 0.1)]
# --extended: a heavier weight of each regularizer, to see whether a validator notices over-regularization
EXTRA = [("entropy", 3.0), ("mmd", 3.0)]


def cell_key(reg: str, weight: float, seed: int) -> str:
    return f"{reg}|{weight:g}|s{seed}"


def score_cell(model: TopModel, src: Encoded, tgt: Encoded, device: str) -> dict:
    """Target test accuracy and every validator's score (no target label is read by a validator)."""
    ft, lt = outputs(model, tgt, tgt.train[::2], device)  # 800 unlabeled target train reviews
    fs, ls = outputs(model, src, src.val, device)  # 200 labeled source validation reviews
    _, ltest = outputs(model, tgt, tgt.test, device)
    o = V.Outputs(
        target_logits=lt, target_features=ft, source_logits=ls, source_features=fs, source_labels=src.labels[src.val]
    )
    cell = {"acc": float((ltest.argmax(1) == tgt.labels[tgt.test]).float().mean())}
    for name in V.VALIDATOR_NAMES:
        cell[name] = V.score(name, o)
    return cell


def run_pair(source: str, target: str, seeds: list[int], grid: list, device: str, log=print, extra=False) -> None:
    prof = PROFILES["quick"]
    prof.methods = ["lora"]
    out = OUT / f"{source}-{target}{'.extra' if extra else ''}.json"  # one writer per file
    results = json.loads(out.read_text()) if out.exists() else {}
    cells = results.setdefault("cells", {})
    cmds = results.setdefault("meta", {}).setdefault("commands", [])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("TORCH_THREADS",) if k in os.environ)
    cmd = f"{env} python -m benchmarks.validators.run {' '.join(sys.argv[1:])}".strip()
    if cmd not in cmds:
        cmds.append(cmd)
    results["meta"].update(profile="quick", method="lora", torch=torch.__version__, machine=f"{os.cpu_count()} cpus")
    enc = {d: encode_domain(d, prof, device) for d in (source, target)}
    for seed in seeds:
        for reg, w in grid:
            k = cell_key(reg, w, seed)
            if k in cells:
                continue
            t0 = time.time()
            model, _ = warm_model(prof, enc, source, "lora", seed, device)
            torch.manual_seed(2000 + seed)  # the same dropout stream in every branch
            try:
                if reg == "none":
                    stats = train_steps(model, enc[source], prof.adapt_steps, prof, seed + 1, device)
                else:
                    align = build_regularizer(reg, w, model.head.in_features, seed).to(device)
                    stats = train_steps(
                        model, enc[source], prof.adapt_steps, prof, seed + 1, device, tgt=enc[target], align=align
                    )
                cell = score_cell(model, enc[source], enc[target], device)
                cell["ce"] = stats["ce"]
            except FloatingPointError as e:
                cell = {"acc": float("nan"), "error": str(e)}
            cell["seconds"] = time.time() - t0
            cells[k] = cell
            _atomic_json(results, out)
            log(f"{source}>{target} {k}: " + " ".join(f"{a} {b:.4f}" for a, b in cell.items() if isinstance(b, float)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", nargs="+", default=[f"{s}:{t}" for s, t in QUICK_PAIRS], help="source:target ...")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--extended", action="store_true", help=f"run only the extra cells {EXTRA}")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", torch.get_num_threads())))
    pairs = [tuple(p.split(":")) for p in args.pairs]
    bad = [p for p in pairs if len(p) != 2 or p[0] not in DOMAINS or p[1] not in DOMAINS or p[0] == p[1]]
    if bad:
        raise SystemExit(f"bad pair(s) {bad}; write source:target with domains {list(DOMAINS)}")
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.0f}s] {msg}", flush=True)

    for seed in args.seeds:  # seed-major: a study cut short has every pair of the first seed
        for s, t in pairs:
            run_pair(s, t, [seed], EXTRA if args.extended else GRID, args.device, log, extra=args.extended)
    log("done")


if __name__ == "__main__":
    main()
