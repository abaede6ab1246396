"""Evaluation: loss, accuracy and macro-F1 of a classifier; loss and perplexity of a causal LM.

The recipe (:class:`~peftadapt.train.loop.Trainer`) calls :func:`evaluate_model`
at each evaluation step; ``peftadapt eval`` calls it on a saved adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import Task
from .data import Encoded, TextData, as_text_data, check_tokenizer, collate, token_rows
from .progress import on_terminal

# metrics where smaller is better (the best checkpoint is the lowest)
LOWER_IS_BETTER = ("loss", "perplexity")


def metric_names(eval_sets: Sequence[str], task: str) -> list[str]:
    """``<set>/<metric>`` for every eval set: what :func:`evaluate_model` returns."""
    per = ["loss", "accuracy", "macro_f1"] if task == "classification" else ["loss", "perplexity"]
    return [f"{n}/{m}" for n in eval_sets for m in per]


def macro_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    classes = sorted(set(preds) | set(labels))
    f1s = []
    for c in classes:
        tp = sum(1 for p, y in zip(preds, labels, strict=False) if p == c and y == c)
        fp = sum(1 for p, y in zip(preds, labels, strict=False) if p == c and y != c)
        fn = sum(1 for p, y in zip(preds, labels, strict=False) if p != c and y == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    tokenizer,
    data: Mapping[str, TextData | Encoded],
    *,
    task: Task = "classification",
    max_length: int = 128,
    batch_size: int = 32,
    accelerator=None,
    progress: bool = False,
) -> dict[str, float]:
    """Evaluate ``model`` on each named dataset: ``{"<set>/<metric>": value}``.

    Classifiers: loss (mean cross-entropy), accuracy, macro_f1. Causal LMs:
    loss (mean next-token NLL over all real tokens) and perplexity = exp(loss).
    ``progress``: a bar per eval set, shown only where stderr is a terminal.
    """
    check_tokenizer(tokenizer)
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, d in data.items():
        d = d if isinstance(d, Encoded) else as_text_data(d, name)
        gold = d.labels if isinstance(d, TextData) else None
        if task == "classification" and gold is None:
            raise ValueError(f"eval set {name!r} has no labels; a classifier is evaluated on labeled data")
        ids, token_labels, positions = token_rows(d, tokenizer, max_length, task)
        preds, nll, count = [], 0.0, 0
        for i in tqdm(
            range(0, len(ids), batch_size),
            desc=f"eval {name}",
            unit="batch",
            leave=False,
            disable=not progress or not on_terminal(),  # a bar in a log file is only noise
            dynamic_ncols=True,
        ):
            rows = slice(i, i + batch_size)
            labels = token_labels[rows] if token_labels is not None else None
            pos = None if positions is None else positions[rows]
            batch = collate(ids[rows], tokenizer.pad_token_id, labels, task, pos)
            batch = {k: v.to(device) for k, v in batch.items()}
            y = batch.pop("labels")  # collate sets them: class ids (checked above) or, for a causal LM, the tokens
            with autocast():
                logits = model(**batch).logits.float()
            if task == "classification":
                preds += logits.argmax(-1).tolist()
                nll += float(F.cross_entropy(logits, y, reduction="sum"))
                count += len(y)
            else:  # next-token loss, summed over real tokens
                nll += float(
                    F.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]),
                        y[:, 1:].reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += int((y[:, 1:] != -100).sum())
        loss = nll / max(1, count)
        out[f"{name}/loss"] = loss
        if task == "classification" and gold is not None:  # gold is set for a classifier (checked above)
            out[f"{name}/accuracy"] = sum(int(p == t) for p, t in zip(preds, gold, strict=False)) / len(preds)
            out[f"{name}/macro_f1"] = macro_f1(preds, gold)
        else:
            out[f"{name}/perplexity"] = math.exp(min(loss, 50.0))
    model.train(was_training)
    return out
