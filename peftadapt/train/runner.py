"""From a checked :class:`~peftadapt.train.schema.RunConfig` to a model, data, regularizers and a Trainer.

Used by ``peftadapt train`` / ``peftadapt eval``. Order matters: the cheap
checks come first (:func:`check_inputs`: the output folder can be written, the
model folder is whole), then the data files are read and checked (most
mistakes live there), then the model is loaded, wrapped, and the regularizers
are built with the feature width measured on the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import quant
from ..align import Alignment, Term
from ..align.registry import build_with_defaults
from ..align.verbalizer import class_token_ids
from ..core.hf import check_attn_implementation, check_model_folder, saved_classifier_rows
from ..core.io import check_writable_dir
from ..features import FeatureTap
from ..wrap import load as load_adapter
from ..wrap import wrap
from .adda import ADDATrainer, check_adda_run
from .checkpoint import MANIFEST, verify_checkpoint
from .data import (
    Encoded,
    TextData,
    balance_classes,
    check_domain_labels,
    check_tokenizer,
    collate,
    load_dataset_spec,
    load_text_data,
    tokenize,
)
from .loop import Trainer, evaluate_model
from .schema import DatasetSpec, ModelConfig, RunConfig, TermConfig
from .sft import encode_sft, pack


def _labels(d: TextData) -> list[int]:
    """The labels of a classifier's data set (read with its label column, so present)."""
    if d.labels is None:
        raise ValueError(f"{d.name}: no labels; a classifier needs a label column")
    return d.labels


def _selection(spec: DatasetSpec) -> dict[str, Any]:
    """How a spec reads and filters its file (load_dataset_spec's keywords, shared by both readers)."""
    return dict(format=spec.format, split=spec.split, subset=spec.subset, where=spec.where, where_not=spec.where_not)


def source_domain_specs(run: RunConfig) -> dict[str, tuple[DatasetSpec, str]]:
    """``{domain name: (spec, config key)}`` of several source domains (data.source as a list, or
    data.domain_column: one spec per value of that column, read with a ``where`` on it); {} for one source."""
    data = run.data
    srcs = data.source_specs()
    if data.domain_column is None:
        if len(srcs) == 1:
            return {}
        return {str(s.name): (s, f"data.source[{i}]") for i, s in enumerate(srcs)}
    spec, col = srcs[0], data.domain_column
    key = "data.source" if not isinstance(data.source, list) else "data.source[0]"
    ds = load_dataset_spec(spec.path, name=key, **_selection(spec))
    if col not in ds.column_names:
        raise ValueError(
            f"data.domain_column: column {col!r} not in {spec.path!r} ({key}); columns: {list(ds.column_names)}"
        )
    values = ds.unique(col)
    if any(v is None or str(v) == "" for v in values):
        raise ValueError(
            f"data.domain_column: some rows of {spec.path!r} have no domain in column {col!r}; fill them, or drop "
            f"them with {key}.where_not: {{{col}: ''}}"
        )
    out = {}
    for v in sorted(str(v) for v in values):
        where = {**(spec.where or {}), col: v}
        out[v] = (dataclasses.replace(spec, where=where, name=v), f"{key} ({col}={v})")
    return out


def load_data(
    run: RunConfig, num_labels: int | None, tokenizer=None
) -> tuple[Any, TextData | Encoded | None, dict[str, TextData | Encoded]]:
    """The run's datasets. A classifier's are texts + labels; a causal LM's are tokenized here
    (``tokenizer`` needed) in their SFT format, the source packed if ``data.packing``, the
    target as prompts (a chat row: its turns before the answer plus the generation prompt;
    the alignment reads it unlabeled). Several source domains (data.source as a list,
    data.domain_column): the source is ``{domain name: data}``."""
    data, cls = run.data, run.model.task == "classification"

    def read(spec: DatasetSpec, name: str, labeled: bool) -> TextData:
        return load_text_data(
            spec.path,
            text=spec.text,
            label=spec.label if labeled else None,
            labels=data.labels,
            num_labels=num_labels,
            name=name,
            **_selection(spec),
        )

    def read_sft(spec: DatasetSpec, name: str, prompts: bool = False) -> Encoded:
        if tokenizer is None:
            raise ValueError(f"{name}: causal-LM data is tokenized while loading; pass the tokenizer")
        ds = load_dataset_spec(spec.path, name=name, **_selection(spec))
        return encode_sft(
            ds,
            tokenizer,
            format=spec.sft_format,
            columns={
                "text": spec.text,
                "prompt": spec.prompt,
                "completion": spec.completion,
                "messages": spec.messages,
            },
            max_length=data.max_length,
            truncation=data.truncation,
            train_on_inputs=data.train_on_inputs,
            prompts=prompts,
            name=name,
        )

    def read_source(spec: DatasetSpec, name: str) -> TextData | Encoded:
        if cls:
            return read(spec, name, True)
        enc = read_sft(spec, name)
        return pack(enc, data.max_length) if data.packing else enc

    domains = source_domain_specs(run)
    source: Any = (
        {d: read_source(spec, key) for d, (spec, key) in domains.items()}
        if domains
        else read_source(data.source_specs()[0], "data.source")
    )
    if cls:  # an unlabeled eval set is scored by its validators only
        evals: dict[str, TextData | Encoded] = {n: read(s, n, bool(s.label)) for n, s in data.eval.items()}
    else:
        evals = {n: read_sft(s, f"data.eval.{n}") for n, s in data.eval.items()}
    target: TextData | Encoded | None = None
    if data.target is not None and cls:
        target = read(data.target, "data.target", bool(data.target.label))
    elif data.target is not None:
        target = read_sft(data.target, "data.target", prompts=True)
    return source, target, evals


def _data_tokenizer(run: RunConfig):
    """The tokenizer when loading the data needs it (causal-LM data is tokenized as it loads);
    None for a classifier, whose data is read (and checked) before the tokenizer loads."""
    if run.model.task == "classification":
        return None
    return load_tokenizer(run.model, run.data.truncation, run.data.chat_template)


def check_inputs(run: RunConfig, output: bool = True) -> None:
    """The checks that take milliseconds, before the data and the model are loaded: the
    output folder can be written (``output``), the model (and tokenizer) folder is whole."""
    if output:
        check_writable_dir(run.training.output_dir, "training.output_dir")
    check_model_folder(run.model.path, "model.path")
    if run.model.tokenizer:
        check_model_folder(run.model.tokenizer, "model.tokenizer", model=False)


def check_head_size(run: RunConfig, num_labels: int | None) -> None:
    """A classifier head saved in model.path must have this run's number of classes (transformers
    would stop with a size-mismatch report); checked from the safetensors header, before loading."""
    saved = saved_classifier_rows(run.model.path) if run.model.task == "classification" else None
    if saved is not None and num_labels is not None and saved[1] != num_labels:
        raise ValueError(
            f"model.path: its saved classifier ({saved[0]}) has {saved[1]} classes but this run has {num_labels} "
            "(data.labels / model.num_labels / the labels in the data); match them, or start from the "
            "model without its trained head"
        )


@contextlib.contextmanager
def _loading(key: str, path: str) -> Iterator[None]:
    """transformers' loading errors (a file it cannot read, a hub it cannot reach: OSError) as one line."""
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{key}: cannot load {path!r}: {first}") from None


def load_tokenizer(mcfg: ModelConfig, truncation: str = "right", chat_template: str | None = None):
    from transformers import AutoTokenizer

    key, path = ("model.tokenizer", mcfg.tokenizer) if mcfg.tokenizer else ("model.path", mcfg.path)
    with _loading(key, path):
        tok = AutoTokenizer.from_pretrained(path)
    if mcfg.pad_token == "eos":
        if tok.eos_token is None:
            raise ValueError("model.pad_token: eos, but the tokenizer has no eos token; give a token string")
        tok.pad_token = tok.eos_token
    elif mcfg.pad_token is not None:
        tok.pad_token = mcfg.pad_token
    check_tokenizer(tok)
    tok.truncation_side = truncation  # data.truncation: which end of a long text is cut
    if chat_template is not None:  # data.chat_template: the template itself, or a file holding it
        template_file = Path(chat_template)
        is_file = "{" not in chat_template and template_file.is_file()
        tok.chat_template = template_file.read_text(encoding="utf-8") if is_file else chat_template
    return tok


def load_base_model(mcfg: ModelConfig, num_labels: int | None, gradient_checkpointing: bool = False):
    """The transformers model named by ``model:`` (4/8-bit through peftadapt.load_quantized;
    bitsandbytes is imported only then). Looked up on the module so tests can stand in for it."""
    path, task = mcfg.path, mcfg.task
    kwargs: dict[str, Any] = {}
    if task == "classification":
        kwargs["num_labels"] = num_labels
    if mcfg.dtype:
        kwargs["dtype"] = getattr(torch, mcfg.dtype)
    kwargs["attn_implementation"] = check_attn_implementation(
        mcfg.attn_implementation, where="model.attn_implementation"
    )
    if mcfg.quantize:
        if mcfg.quant_storage:
            kwargs["quant_storage"] = mcfg.quant_storage
        with _loading("model.path", path):
            return quant.load_quantized(
                path,
                bits=mcfg.quantize,
                task="seqcls" if task == "classification" else "causal",
                gradient_checkpointing=gradient_checkpointing,
                **kwargs,
            )
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    with _loading("model.path", path):
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
    check_inputs(run)
    check_adda_run(run)
    tokenizer = _data_tokenizer(run)
    source, target, evals = load_data(run, nl, tokenizer)
    domains = source if isinstance(source, dict) else {"data.source": source}
    if all(isinstance(d, TextData) for d in domains.values()):  # a classifier's
        if nl is None:  # integer labels without a list: 0..max
            nl = max(2, *(max(_labels(d)) + 1 for d in domains.values()))
        if run.data.balance == "oversample":  # each domain balanced on its own
            domains = {k: balance_classes(d) for k, d in domains.items()}
            source = domains if isinstance(source, dict) else domains["data.source"]
        if isinstance(source, dict):  # before the model loads: the same classes in every domain
            check_domain_labels(source, "data.source", run.data.labels)
    check_head_size(run, nl)
    tokenizer = tokenizer or load_tokenizer(run.model, run.data.truncation, run.data.chat_template)
    class_tokens = _class_tokens(run, tokenizer)
    set_seed(training.seed)  # head init, adapter init and discriminators are seeded too
    base = load_base_model(run.model, nl, training.gradient_checkpointing)
    model = wrap_model(base, run)
    peft_cfg = getattr(model, "active_peft_config", None)
    if run.data.packing and getattr(peft_cfg, "is_prompt_learning", False):
        raise ValueError(
            f"data.packing: method {run.method.name} feeds virtual tokens through the attention cache, which turns "
            "off the packed-sequence masking, so packed examples would attend to each other; set data.packing: false"
        )
    feats = run.features
    alignment = None
    if run.regularizers:
        try:
            width = feature_width(model, tokenizer, feats.layer, feats.pooling)
        except (ValueError, TypeError) as e:  # a layer name / index the model does not have
            raise ValueError(f"features.layer: {e}" if feats.layer is not None else str(e)) from None
        alignment = build_alignment(run.regularizers, width=width, num_labels=nl)
    trainer_class = ADDATrainer if training.procedure == "adda" else Trainer
    return trainer_class(
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
        class_tokens=class_tokens,
    )


def _class_tokens(run: RunConfig, tokenizer) -> list[int] | None:
    """``features.class_tokens`` as token ids (the answers' first tokens), checked before the model loads."""
    if run.features.class_tokens is None:
        return None
    try:
        return class_token_ids(tokenizer, run.features.class_tokens)
    except ValueError as e:
        raise ValueError(f"features.{e}") from None


def evaluate_checkpoint(run: RunConfig, checkpoint: str | Path) -> dict[str, float]:
    """Metrics on ``data.eval`` of the base model with the adapter saved in
    ``checkpoint`` (a checkpoint / final folder holding ``adapter/``, or an adapter folder)."""
    ck = Path(checkpoint)
    if not ck.exists():
        raise FileNotFoundError(f"--checkpoint: folder not found: {str(ck)!r}")
    if (ck / MANIFEST).is_file():  # a training checkpoint: its files as they were written, or one line saying not
        verify_checkpoint(ck)
    adapter = ck / "adapter" if (ck / "adapter").is_dir() else ck
    if not adapter.is_dir() or not any(adapter.iterdir()):
        raise ValueError(
            f"--checkpoint: {str(ck)!r} holds no adapter (expected an adapter/ folder "
            "written by peftadapt train, e.g. OUTPUT_DIR/final)"
        )
    nl = run.num_labels
    check_inputs(run, output=False)
    if not run.data.eval:
        raise ValueError("eval needs data.eval in the config: {name: {path: ..., text: ..., label: ...}}")
    tokenizer = _data_tokenizer(run)  # as in training
    _, _, evals = load_data(run, nl, tokenizer)
    if run.model.task == "classification":  # unlabeled sets carry only validators, which need a training run
        evals = {n: d for n, d in evals.items() if d.labels is not None}
    if not evals:
        raise ValueError("eval needs a labeled set in data.eval: {name: {path: ..., text: ..., label: ...}}")
    if run.model.task == "classification" and nl is None:
        nl = max(2, max(max(_labels(d)) for d in evals.values() if isinstance(d, TextData)) + 1)
    check_head_size(run, nl)
    tokenizer = tokenizer or load_tokenizer(run.model, run.data.truncation, run.data.chat_template)
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
