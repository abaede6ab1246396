"""Apply a method to a model through one of three implementations.

* ``peftadapt``: ``peftadapt.wrap(model, method, **options)`` (full fine-tuning
  needs no wrap: every parameter trains);
* ``peft``: the same LoRA / DoRA / prefix configuration through plain
  ``peft.get_peft_model``;
* ``adapters``: AdapterHub's bottleneck adapters (``double_seq_bn`` = Houlsby,
  ``seq_bn`` = Pfeiffer) with the same reduction factor and activation.

Every implementation gets the same hyper-parameters from :data:`DEFAULTS`, so a
ratio between two of them compares code, not configurations.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..core.hf import classifier_heads

IMPLS = ("peftadapt", "peft", "adapters")
METHODS = ("full", "head", "lora", "dora", "houlsby", "pfeiffer", "prefix")
PEER_METHODS = {"peftadapt": METHODS, "peft": ("lora", "dora", "prefix"), "adapters": ("houlsby", "pfeiffer")}

# shared hyper-parameters of the benchmark configurations
DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16, "reduction_factor": 16, "activation": "relu", "prefix_tokens": 20}
# adapters' name for each activation
_ADAPTERS_ACT = {"relu": "relu", "gelu": "gelu", "silu": "swish", "swish": "swish", "tanh": "tanh"}


def targets_for(model) -> list[str]:
    """The attention query and value projections: LoRA's paper default, used by every impl."""
    mt = getattr(model.config, "model_type", "")
    return ["query", "value"] if mt in ("bert", "roberta") else ["q_proj", "v_proj"]


def check(impl: str, method: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}; valid choices: {list(IMPLS)}")
    if method not in PEER_METHODS[impl]:
        raise ValueError(f"implementation {impl!r} has no method {method!r}; valid methods: {list(PEER_METHODS[impl])}")


def apply(model, impl: str, method: str, head: str, quant: str | None = None, grad_ckpt: bool = False) -> Any:
    """Return the model ready to train with ``method`` via ``impl``."""
    check(impl, method)
    if quant is not None:
        if method == "full":
            raise ValueError("full fine-tuning of a quantized base is not possible; use a PEFT method")
        _prepare_kbit(model, grad_ckpt, ours=impl == "peftadapt")
    if impl == "peftadapt":
        return _apply_peftadapt(model, method, head)
    if impl == "peft":
        return _apply_peft(model, method, head)
    return _apply_adapters(model, method, head)


def _prepare_kbit(model, grad_ckpt: bool, ours: bool) -> None:
    """k-bit preparation: peftadapt's own (``peftadapt.quant``) for peftadapt, peft's for the peers."""
    prep = None
    if ours:
        try:
            from .. import quant as q  # lazy: a peer's venv may hold a peftadapt that fails to import

            prep = getattr(q, "prepare_for_kbit_training", None) or getattr(q, "prepare_kbit", None)
        except ImportError:
            prep = None
    if prep is not None:
        prep(model, gradient_checkpointing=grad_ckpt)
        return
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False}
    )


def _apply_peftadapt(model, method: str, head: str):
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from ..wrap import wrap  # lazy: a peer's venv may hold a peftadapt that fails to import

    d = DEFAULTS
    if method in ("lora", "dora"):
        opts = dict(r=d["r"], alpha=d["alpha"], dropout=0.0, target_modules=targets_for(model))
    elif method in ("houlsby", "pfeiffer"):
        opts = dict(reduction_factor=d["reduction_factor"], activation=d["activation"])
    elif method == "prefix":
        opts = dict(num_virtual_tokens=d["prefix_tokens"])
    else:
        opts = {}
    return wrap(model, method, **_accepted(method, opts))


def _accepted(method: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Keep the options the method's config knows, renaming common synonyms."""
    import dataclasses

    from ..methods.base import ALIASES  # lazy: a peer's venv may hold a peftadapt that fails to import
    from ..methods.base import METHODS as REG

    key = ALIASES[method][0] if method in ALIASES else method
    cls = REG.get(key)
    if cls is None:
        return opts
    names = {f.name for f in dataclasses.fields(cls)}
    synonyms = {
        "alpha": ["lora_alpha"],
        "dropout": ["lora_dropout"],
        "num_virtual_tokens": ["prefix_length", "n_tokens"],
        "activation": ["non_linearity", "act"],
        "target_modules": ["targets"],
    }
    out = {}
    for k, v in opts.items():
        for cand in [k, *synonyms.get(k, [])]:
            if cand in names:
                out[cand] = v
                break
    return out


def _apply_peft(model, method: str, head: str):
    from peft import LoraConfig, PeftConfig, PrefixTuningConfig, TaskType, get_peft_model

    task = TaskType.CAUSAL_LM if head == "causal" else TaskType.SEQ_CLS
    d = DEFAULTS
    if method in ("lora", "dora"):
        cfg: PeftConfig = LoraConfig(
            r=d["r"],
            lora_alpha=d["alpha"],
            lora_dropout=0.0,
            target_modules=targets_for(model),
            use_dora=method == "dora",
            task_type=task,
        )
    else:
        cfg = PrefixTuningConfig(num_virtual_tokens=d["prefix_tokens"], task_type=task)
    return get_peft_model(model, cfg)


def _apply_adapters(model, method: str, head: str):
    import adapters

    adapters.init(model)
    act = _ADAPTERS_ACT[DEFAULTS["activation"]]
    rf = DEFAULTS["reduction_factor"]
    if method == "houlsby":
        cfg = adapters.DoubleSeqBnConfig(reduction_factor=rf, non_linearity=act)
    else:
        cfg = adapters.SeqBnConfig(reduction_factor=rf, non_linearity=act)
    model.add_adapter("bench", config=cfg)
    model.train_adapter("bench")
    # peftadapt and peft train the task head of a classifier with the adapter: do the same here
    for name in classifier_heads(model):
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
    return model


def trainable_counts(model) -> tuple[int, int]:
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if getattr(p, "quant_state", None) is not None or p.dtype == torch.uint8:
            n *= 2  # bitsandbytes packs two 4-bit weights into one byte
        total += n
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def saved_size_bytes(model, impl: str, method: str, tmpdir: str) -> tuple[int, bool]:
    """Bytes of the saved adapter (what a user ships), and whether it is an estimate.

    Full fine-tuning has no adapter: the size is that of every parameter
    (what ``save_pretrained`` of the whole model writes), computed, not written.
    """
    if method == "full":
        return sum(p.numel() * p.element_size() for p in model.parameters()), True
    out = os.path.join(tmpdir, f"saved-{impl}-{method}")
    if impl == "adapters":
        model.save_adapter(out, "bench")
    else:
        model.save_pretrained(out)
    size = 0
    for root, _, files in os.walk(out):
        for f in files:
            size += os.path.getsize(os.path.join(root, f))
    return size, False
