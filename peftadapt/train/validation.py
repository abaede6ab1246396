"""Validators at each evaluation: ``<set>/<validator>`` metrics, and which metric a DA run selects by.

An eval set may name validators (``peftadapt.validators``); the set may then be
unlabeled. At each evaluation the model's logits and pooled features (the
layer and pooling the regularizers read) on that set are scored by each named
validator and logged as ``<set>/<validator>``. Validators that need labeled
source data (``dev``, ``reverse_validation``, ``source_accuracy``) read the
eval set named as the run's *source validation* set.

Default selection (``metric_for_best_model`` unset): a plain run selects by the
first eval set's accuracy (loss for a causal LM), as before. A domain-adaptation
classifier (regularizers on) never reads target labels by default: it selects by
:data:`DEFAULT_DA_VALIDATOR` on the first eval set that names it, else by the source
validation set's accuracy, else the first validator named on any set; with none of these
it keeps the last step's weights (no best-checkpoint selection) and says so.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

from .. import validators as V
from ..features import FeatureTap, Pooling
from .data import TextData, collate, tokenize

# What a DA run selects by when metric_for_best_model is unset and an eval set names it: the validator with
# the lowest regret in the Amazon study (docs/validators.md), ahead of source validation accuracy.
DEFAULT_DA_VALIDATOR = "im"


def check_validators(
    validators: Mapping[str, Sequence[str]],
    eval_sets: Sequence[str],
    source_validation: str | None,
    labeled: Mapping[str, bool],
    task: str,
) -> dict[str, list[str]]:
    """The per-set validator lists, checked (one-line ValueErrors naming the key and the way out)."""
    if validators and task != "classification":
        raise ValueError("validators score a classifier's predictions; this run's task is not classification")
    if source_validation is not None:
        if source_validation not in eval_sets:
            raise ValueError(
                f"source_validation: {source_validation!r} is not an eval set; valid: {list(eval_sets)} "
                "(add the labeled source validation data under data.eval)"
            )
        if not labeled.get(source_validation, False):
            raise ValueError(
                f"source_validation: eval set {source_validation!r} has no labels; it needs a label column"
            )
    out: dict[str, list[str]] = {}
    for name, names in validators.items():
        if name not in eval_sets:
            raise ValueError(f"validators: {name!r} is not an eval set; valid: {list(eval_sets)}")
        for v in names:
            V.check_name(v, f"data.eval.{name}.validators")
            if V.VALIDATORS[v].needs_source and source_validation is None:
                raise ValueError(
                    f"data.eval.{name}.validators: {v!r} needs labeled source validation data; name its eval set "
                    "in data.source_validation (Python: Trainer(source_validation=...))"
                )
        out[name] = list(dict.fromkeys(names))
    return out


def validator_metric_names(validators: Mapping[str, Sequence[str]]) -> list[str]:
    return [f"{s}/{v}" for s, names in validators.items() for v in names]


@torch.no_grad()
def collect_outputs(
    model: nn.Module,
    tokenizer,
    data: TextData,
    *,
    max_length: int,
    batch_size: int,
    feature_layer: str | int | None = None,
    pooling: Pooling = "mean",
    features: bool = True,
    accelerator=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits, pooled features or None) of ``model`` on ``data``, float32 on the CPU, in eval mode."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    ids = tokenize(data.texts, tokenizer, max_length)
    logits, feats = [], []
    tap = FeatureTap(model, feature_layer, pooling) if features else None
    try:
        for i in range(0, len(ids), batch_size):
            batch = collate(ids[i : i + batch_size], tokenizer.pad_token_id, None, "target")
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            with autocast():
                logits.append(model(**batch).logits.float().cpu())
                if tap is not None:
                    feats.append(tap.pooled().float().cpu())
    finally:
        if tap is not None:
            tap.remove()
        model.train(was_training)
    return torch.cat(logits), (torch.cat(feats) if features else None)


def validator_metrics(
    model: nn.Module,
    tokenizer,
    data: Mapping[str, TextData],
    validators: Mapping[str, Sequence[str]],
    source_validation: str | None,
    *,
    max_length: int,
    batch_size: int,
    feature_layer: str | int | None = None,
    pooling: Pooling = "mean",
    accelerator=None,
) -> dict[str, float]:
    """``{"<set>/<validator>": score}`` for every validator named for an eval set."""
    if not any(validators.values()):
        return {}
    kw = dict(max_length=max_length, batch_size=batch_size, feature_layer=feature_layer, pooling=pooling)
    need_feats = any(V.VALIDATORS[v].needs_features for names in validators.values() for v in names)
    src: dict[str, torch.Tensor | None] = {}
    if source_validation is not None and any(V.VALIDATORS[v].needs_source for n in validators.values() for v in n):
        d = data[source_validation]
        lg, ft = collect_outputs(model, tokenizer, d, features=need_feats, accelerator=accelerator, **kw)  # type: ignore[arg-type]
        src = {"source_logits": lg, "source_features": ft, "source_labels": torch.tensor(d.labels)}
    out = {}
    for name, names in validators.items():
        if not names:
            continue
        feats = any(V.VALIDATORS[v].needs_features for v in names)
        lg, ft = collect_outputs(model, tokenizer, data[name], features=feats, accelerator=accelerator, **kw)  # type: ignore[arg-type]
        outputs = V.Outputs(target_logits=lg, target_features=ft, **src)
        for v in names:
            out[f"{name}/{v}"] = V.score(v, outputs)
    return out


def default_metric_for_best(
    eval_sets: Sequence[str],
    validators: Mapping[str, Sequence[str]],
    source_validation: str | None,
    task: str,
    domain_adaptation: bool,
) -> str | None:
    """The selection metric when ``metric_for_best_model`` is unset (see the module docstring)."""
    if not eval_sets:
        return None
    if not domain_adaptation or task != "classification":  # a causal LM's eval loss reads only texts
        return f"{eval_sets[0]}/{'accuracy' if task == 'classification' else 'loss'}"
    for name, names in validators.items():
        if DEFAULT_DA_VALIDATOR in names:
            return f"{name}/{DEFAULT_DA_VALIDATOR}"
    if source_validation is not None:
        return f"{source_validation}/accuracy"
    named = validator_metric_names(validators)
    if named:
        return named[0]
    warnings.warn(
        "a domain-adaptation run without a label-free selection metric keeps its last weights: name a source "
        "validation set (data.source_validation) or validators for the target eval set (data.eval.NAME.validators), "
        "or set training.metric_for_best_model",
        stacklevel=3,
    )
    return None


def warn_if_target_labels(
    metric: str | None, source_validation: str | None, domain_adaptation: bool, task: str = "classification"
) -> None:
    """A DA classifier that selects by a labeled target eval set's metric reads target labels: say so."""
    if not domain_adaptation or metric is None or task != "classification":
        return
    name, _, kind = metric.rpartition("/")
    if kind in V.VALIDATOR_NAMES or name == source_validation:
        return
    warnings.warn(
        f"training.metric_for_best_model: {metric!r} reads the labels of eval set {name!r}; in unsupervised domain "
        "adaptation that selects the checkpoint with target labels (an optimistic result). Select by a validator "
        f"({', '.join(V.VALIDATOR_NAMES)}) or by a source validation set (data.source_validation) instead",
        stacklevel=3,
    )
