"""From a checked :class:`~peftadapt.train.schema.RunConfig` to a model, data, regularizers and a Trainer.

Used by ``peftadapt train`` / ``peftadapt eval``. Order matters: data files
are read and checked first (cheap, and most mistakes live there), then the
model is loaded, wrapped, and the regularizers are built with the feature
width measured on the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .. import quant
from ..align import Alignment, Term
from ..align.registry import build_with_defaults
from ..features import FeatureTap
from ..wrap import load as load_adapter
from ..wrap import wrap
from .data import TextData, balance_classes, check_tokenizer, collate, load_text_data, tokenize
from .loop import Trainer, evaluate_model
from .schema import DatasetSpec, ModelConfig, RunConfig, TermConfig


def _labels(d: TextData) -> list[int]:
    """The labels of a classifier's data set (read with its label column, so present)."""
    if d.labels is None:
        raise ValueError(f"{d.name}: no labels; a classifier needs a label column")
    return d.labels


def load_data(run: RunConfig, num_labels: int | None) -> tuple[TextData, TextData | None, dict[str, TextData]]:
    data, cls = run.data, run.model.task == "classification"

    def read(spec: DatasetSpec, name: str, labeled: bool) -> TextData:
        return load_text_data(
            spec.path,
            text=spec.text,
            label=spec.label if labeled else None,
            labels=data.labels,
            num_labels=num_labels,
            name=name,
            format=spec.format,
            split=spec.split,
            where=spec.where,
            where_not=spec.where_not,
        )

    source = read(data.source, "data.source", cls)
    target = None
    if data.target is not None:
        target = read(data.target, "data.target", cls and bool(data.target.label))
    evals = {n: read(s, n, cls and bool(s.label)) for n, s in data.eval.items()}
    return source, target, evals


def load_tokenizer(mcfg: ModelConfig, truncation: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mcfg.tokenizer or mcfg.path)
    if mcfg.pad_token == "eos":
        if tok.eos_token is None:
            raise ValueError("model.pad_token: eos, but the tokenizer has no eos token; give a token string")
        tok.pad_token = tok.eos_token
    elif mcfg.pad_token is not None:
        tok.pad_token = mcfg.pad_token
    check_tokenizer(tok)
    tok.truncation_side = truncation  # data.truncation: which end of a long text is cut
    return tok


def load_base_model(mcfg: ModelConfig, num_labels: int | None, gradient_checkpointing: bool = False):
    """The transformers model named by ``model:`` (4/8-bit through peftadapt.load_quantized;
    bitsandbytes is imported only then). Looked up on the module so tests can stand in for it."""
    path, task = mcfg.path, mcfg.task
    if not Path(path).exists() and (os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise FileNotFoundError(f"model.path: folder not found: {path!r} (offline: a local folder is needed)")
    kwargs: dict[str, Any] = {}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    if mcfg.dtype:
        kwargs["dtype"] = getattr(torch, mcfg.dtype)
    if mcfg.quantize:
        if mcfg.quant_storage:
            kwargs["quant_storage"] = mcfg.quant_storage
        return quant.load_quantized(
            path,
            bits=mcfg.quantize,
            task="seqcls" if task == "classification" else "causal",
            gradient_checkpointing=gradient_checkpointing,
            **kwargs,
        )
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return cls.from_pretrained(path, **kwargs)


def wrap_model(base, run: RunConfig):
    return wrap(base, run.method.name, **run.method.options)


def feature_width(model, tokenizer, layer=None, pooling="mean") -> int:
    """Width of the alignment features: one tiny forward through a FeatureTap."""
    batch = collate(tokenize(["width probe"], tokenizer, 8), tokenizer.pad_token_id)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    was = model.training
    model.eval()
    with FeatureTap(model, layer=layer, pooling=pooling) as tap, torch.no_grad():
        model(**batch)
        width = tap.pooled(batch["attention_mask"]).shape[-1]
    model.train(was)
    return int(width)


def build_alignment(terms: list[TermConfig], *, width: int | None, num_labels: int | None):
    """``peftadapt.align.Alignment`` from the config's regularizer list; fills in
    ``in_features`` / ``num_classes`` where the regularizer takes them."""
    if not terms:
        return None
    built = []
    for i, t in enumerate(terms):
        name = t.name.lower()
        reg = build_with_defaults(name, {"in_features": width, "num_classes": num_labels}, **t.options)
        unique = sum(x.name.lower() == name for x in terms) == 1
        built.append(
            Term(
                reg,
                weight=t.weight,
                schedule=t.schedule,
                warmup=t.warmup,
                start=t.start,
                scope=t.scope,
                name=name if unique else f"{name}_{i}",
            )
        )
    return Alignment(built)


def build_trainer(run: RunConfig):
    """Everything a run needs, from a checked run config: returns a Trainer."""
    from accelerate.utils import set_seed

    training, task = run.training, run.model.task
    nl = run.num_labels
    source, target, evals = load_data(run, nl)
    if task == "classification" and nl is None:
        nl = max(2, max(_labels(source)) + 1)  # integer labels without a list: 0..max
    if run.data.balance == "oversample":
        source = balance_classes(source)
    tokenizer = load_tokenizer(run.model, run.data.truncation)
    set_seed(training.seed)  # head init, adapter init and discriminators are seeded too
    base = load_base_model(run.model, nl, training.gradient_checkpointing)
    model = wrap_model(base, run)
    feats = run.features
    alignment = None
    if run.regularizers:
        width = feature_width(model, tokenizer, feats.layer, feats.pooling)
        alignment = build_alignment(run.regularizers, width=width, num_labels=nl)
    return Trainer(
        model,
        tokenizer,
        source,
        target=target,
        eval=evals,
        regularizers=alignment,
        config=training,
        task=task,
        max_length=run.data.max_length,
        feature_layer=feats.layer,
        pooling=feats.pooling,
        validators={n: s.validators for n, s in run.data.eval.items() if s.validators},
        source_validation=run.data.source_validation,
    )


def evaluate_checkpoint(run: RunConfig, checkpoint: str | Path) -> dict[str, float]:
    """Metrics on ``data.eval`` of the base model with the adapter saved in
    ``checkpoint`` (a checkpoint / final folder holding ``adapter/``, or an adapter folder)."""
    ck = Path(checkpoint)
    if not ck.exists():
        raise FileNotFoundError(f"--checkpoint: folder not found: {str(ck)!r}")
    adapter = ck / "adapter" if (ck / "adapter").is_dir() else ck
    if not adapter.is_dir() or not any(adapter.iterdir()):
        raise ValueError(
            f"--checkpoint: {str(ck)!r} holds no adapter (expected an adapter/ folder "
            "written by peftadapt train, e.g. OUTPUT_DIR/final)"
        )
    nl = run.num_labels
    _, _, evals = load_data(run, nl)
    if run.model.task == "classification":  # unlabeled sets carry only validators, which need a training run
        evals = {n: d for n, d in evals.items() if d.labels is not None}
    if not evals:
        raise ValueError("eval needs data.eval in the config: {name: {path: ..., text: ..., label: ...}}")
    if run.model.task == "classification" and nl is None:
        nl = max(2, max(max(_labels(d)) for d in evals.values()) + 1)
    tokenizer = load_tokenizer(run.model, run.data.truncation)  # as in training
    base = load_base_model(run.model, nl)
    model = load_adapter(base, str(adapter))
    training = run.training
    return evaluate_model(
        model,
        tokenizer,
        evals,
        task=run.model.task,
        max_length=run.data.max_length,
        batch_size=training.per_device_eval_batch_size or 2 * training.per_device_train_batch_size,
    )
