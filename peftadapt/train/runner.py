"""From a validated run config to a model, data, regularizers and a Trainer.

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

from ..wrap import load, wrap

from .config import TERM_KEYS, TrainConfig
from .data import TextData, balance_classes, check_tokenizer, collate, load_text_data, tokenize


def load_data(cfg: dict[str, Any], num_labels: int | None) -> tuple[TextData, TextData | None, dict[str, TextData]]:
    data, task = cfg["data"], cfg["model"]["task"]
    labels = data.get("labels")

    def read(spec: dict[str, Any], name: str, labeled: bool) -> TextData:
        s = dict(spec)
        label = s.pop("label", None) if labeled else None
        return load_text_data(s.pop("path"), text=s.pop("text"), label=label, labels=labels,
                              num_labels=num_labels, name=name, **s)

    cls = task == "classification"
    source = read(data["source"], "data.source", cls)
    target = None
    if data.get("target") is not None:
        target = read(data["target"], "data.target", cls and bool(data["target"].get("label")))
    evals = {n: read(s, n, cls) for n, s in data["eval"].items()}
    return source, target, evals


def num_labels_of(cfg: dict[str, Any]) -> int | None:
    if cfg["model"]["task"] != "classification":
        return None
    if cfg["model"].get("num_labels"):
        return cfg["model"]["num_labels"]
    if cfg["data"].get("labels"):
        return len(cfg["data"]["labels"])
    return None


def load_tokenizer(mcfg: dict[str, Any], truncation: str = "right"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mcfg.get("tokenizer") or mcfg["path"])
    pad = mcfg.get("pad_token")
    if pad == "eos":
        if tok.eos_token is None:
            raise ValueError("model.pad_token: eos, but the tokenizer has no eos token; give a token string")
        tok.pad_token = tok.eos_token
    elif pad is not None:
        tok.pad_token = pad
    check_tokenizer(tok)
    tok.truncation_side = truncation  # data.truncation: which end of a long text is cut
    return tok


def load_base_model(mcfg: dict[str, Any], num_labels: int | None, gradient_checkpointing: bool = False):
    """The transformers model named by ``model:`` (4/8-bit through peftadapt.load_quantized)."""
    path, task = mcfg["path"], mcfg["task"]
    if not Path(path).exists() and (os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise FileNotFoundError(f"model.path: folder not found: {path!r} (offline: a local folder is needed)")
    kwargs: dict[str, Any] = {}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    if mcfg.get("dtype"):
        kwargs["dtype"] = getattr(torch, mcfg["dtype"])
    if mcfg.get("quantize"):
        from ..quant import load_quantized  # lazy: bitsandbytes is optional

        if mcfg.get("quant_storage"):
            kwargs["quant_storage"] = mcfg["quant_storage"]
        return load_quantized(path, bits=mcfg["quantize"], task="seqcls" if task == "classification" else "causal",
                              gradient_checkpointing=gradient_checkpointing, **kwargs)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    return cls.from_pretrained(path, **kwargs)


def wrap_model(base, cfg: dict[str, Any]):
    opts = {k: v for k, v in cfg["method"].items() if k != "name"}
    return wrap(base, cfg["method"]["name"], **opts)


def feature_width(model, tokenizer, layer=None, pooling="mean") -> int:
    """Width of the alignment features: one tiny forward through a FeatureTap."""
    from ..features import FeatureTap

    batch = collate(tokenize(["width probe"], tokenizer, 8), tokenizer.pad_token_id)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    was = model.training
    model.eval()
    with FeatureTap(model, layer=layer, pooling=pooling) as tap, torch.no_grad():
        model(**batch)
        width = tap.pooled(batch["attention_mask"]).shape[-1]
    model.train(was)
    return int(width)


def build_alignment(terms: list[dict[str, Any]], *, width: int | None, num_labels: int | None):
    """``peftadapt.align.Alignment`` from the config's regularizer list; fills in
    ``in_features`` / ``num_classes`` where the regularizer takes them."""
    if not terms:
        return None
    from ..align import REGULARIZERS, Alignment, Term, build
    from ..align.registry import init_params

    built = []
    for i, t in enumerate(terms):
        name = t["name"].lower()
        if name not in REGULARIZERS:
            raise ValueError(f"regularizers[{i}].name: unknown regularizer {t['name']!r}; "
                             f"allowed values: {sorted(REGULARIZERS)}")
        opts = {k: v for k, v in t.items() if k not in TERM_KEYS}
        accepted = init_params(REGULARIZERS[name][0])
        if "in_features" in accepted and "in_features" not in opts and width is not None:
            opts["in_features"] = width
        if "num_classes" in accepted and "num_classes" not in opts and num_labels is not None:
            opts["num_classes"] = num_labels
        reg = build(name, **opts)
        term_kw = {k: t[k] for k in ("weight", "schedule", "warmup", "start") if k in t}
        built.append(Term(reg, **term_kw, name=name if sum(x["name"].lower() == name for x in terms) == 1 else f"{name}_{i}"))
    return Alignment(built)


def build_trainer(cfg: dict[str, Any], training_overrides: dict[str, Any] | None = None):
    """Everything a run needs, from a validated config: returns a Trainer."""
    from accelerate.utils import set_seed

    from .loop import Trainer

    training: TrainConfig = cfg["training"]
    if training_overrides:
        import dataclasses
        training = dataclasses.replace(training, **training_overrides)
    nl = num_labels_of(cfg)
    source, target, evals = load_data(cfg, nl)
    task = cfg["model"]["task"]
    if task == "classification" and nl is None:
        nl = max(2, max(source.labels) + 1)  # integer labels without a list: 0..max
    if cfg["data"].get("balance", "none") == "oversample":
        source = balance_classes(source)
    tokenizer = load_tokenizer(cfg["model"], cfg["data"].get("truncation", "right"))
    set_seed(training.seed)  # head init, adapter init and discriminators are seeded too
    base = load_base_model(cfg["model"], nl, training.gradient_checkpointing)
    model = wrap_model(base, cfg)
    feats = cfg["features"]
    alignment = None
    if cfg["regularizers"]:
        width = feature_width(model, tokenizer, feats.get("layer"), feats.get("pooling", "mean"))
        alignment = build_alignment(cfg["regularizers"], width=width, num_labels=nl)
    return Trainer(model, tokenizer, source, target=target, eval=evals, regularizers=alignment,
                   config=training, task=task, max_length=cfg["data"]["max_length"],
                   feature_layer=feats.get("layer"), pooling=feats.get("pooling", "mean"))


def evaluate_checkpoint(cfg: dict[str, Any], checkpoint: str | Path) -> dict[str, float]:
    """Metrics on ``data.eval`` of the base model with the adapter saved in
    ``checkpoint`` (a checkpoint / final folder holding ``adapter/``, or an adapter folder)."""
    from .loop import evaluate_model

    ck = Path(checkpoint)
    if not ck.exists():
        raise FileNotFoundError(f"--checkpoint: folder not found: {str(ck)!r}")
    adapter = ck / "adapter" if (ck / "adapter").is_dir() else ck
    if not adapter.is_dir() or not any(adapter.iterdir()):
        raise ValueError(f"--checkpoint: {str(ck)!r} holds no adapter (expected an adapter/ folder "
                         "written by peftadapt train, e.g. OUTPUT_DIR/final)")
    nl = num_labels_of(cfg)
    _, _, evals = load_data(cfg, nl)
    if not evals:
        raise ValueError("eval needs data.eval in the config: {name: {path: ..., text: ..., label: ...}}")
    if cfg["model"]["task"] == "classification" and nl is None:
        nl = max(2, max(max(d.labels) for d in evals.values()) + 1)
    tokenizer = load_tokenizer(cfg["model"], cfg["data"].get("truncation", "right"))  # as in training
    base = load_base_model(cfg["model"], nl)
    model = load(base, str(adapter))
    training: TrainConfig = cfg["training"]
    return evaluate_model(model, tokenizer, evals, task=cfg["model"]["task"], max_length=cfg["data"]["max_length"],
                          batch_size=training.eval_batch_size or 2 * training.batch_size)
