"""The two-line API: ``wrap`` a transformers model, then load, merge, switch.

``wrap(model, "lora", r=8)`` returns a ``peft.PeftModel`` for the methods that
sit on peft (LoRA, DoRA, rsLoRA, prefix, IA3, VeRA, AdaLoRA, LoHa, LoKr, OFT, prompt
tuning, or any ``peft.PeftConfig``) and a :class:`peftadapt.AdaptedModel`
for our own (bottleneck adapters, head-only). Every function here accepts
either kind, so user code does not need to know which one it holds: each asks
the model's backend (:mod:`peftadapt.backends`) to do the work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .backends import Backend, backend_for_folder, backend_of
from .backends.native import CONFIG_NAME as NATIVE_CONFIG
from .backends.peft import CONFIG_FILE as PEFT_CONFIG
from .core.hf import check_transformers_model, trainable_and_total, unwrap, validate_adapter_name, wrapped_reason
from .methods.base import MethodConfig, build_config
from .quant import cast_trainable_to_fp32, check_prefix_compat, guard_4bit_cpu, is_quantized

__all__ = [
    "adapter_names",
    "add_adapter",
    "after_optimizer_step",
    "base_model",
    "disabled",
    "is_wrapped",
    "load",
    "merge",
    "print_trainable_parameters",
    "save",
    "set_adapter",
    "trainable_parameters",
    "unmerge",
    "wrap",
]


def is_wrapped(model: object) -> bool:
    """True for a model that ``wrap`` (or peft, or transformers' add_adapter) already adapted."""
    return isinstance(model, nn.Module) and wrapped_reason(model) is not None


def base_model(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a wrapped (or plain) model."""
    return unwrap(model)


def _backend(model: object, what: str) -> Backend:
    backend = backend_of(model)
    if backend is None:
        raise TypeError(f"{what}() needs a model returned by peftadapt.wrap(); call wrap() first")
    return backend


# -- wrap ---------------------------------------------------------------------------


def wrap(model: nn.Module, method: str | MethodConfig, *, adapter_name: str = "default", **options: Any) -> nn.Module:
    """Adapt a transformers model with a parameter-efficient method.

    ``method`` is a name (``"lora"``, ``"dora"``, ``"rslora"``, ``"adapter"``,
    ``"houlsby"``, ``"pfeiffer"``, ``"prefix"``, ``"head"``; peft's ``"ia3"``, ``"vera"``,
    ``"adalora"``, ``"loha"``, ``"lokr"``, ``"oft"``, ``"prompt_tuning"``), a config object
    (``LoRA(r=8)``, ``Adapter(...)``, ``Prefix(...)``, ``Head()``) or any ``peft.PeftConfig``;
    ``options`` are that method's fields (see ``peftadapt.LoRA.help()``,
    ``peftadapt.PeftMethod.help("ia3")`` etc.).

    The base weights are frozen; the method's parameters, and the task head where
    the model has one, are trainable. Returns the wrapped model.
    """
    check_transformers_model(model)
    validate_adapter_name(adapter_name)
    reason = wrapped_reason(model)
    if reason is not None:
        raise ValueError(
            f"this {type(model).__name__} is already wrapped ({reason}); to put a second adapter on it use "
            "peftadapt.add_adapter(model, name, method, ...), or wrap the original transformers model"
        )
    config = build_config(method, **options)
    if config.method == "prefix":
        check_prefix_compat(model)  # peft's prefix cannot run under gradient checkpointing
    wrapped = config.apply(model, adapter_name)
    _trainable_in_fp32(wrapped)
    guard_4bit_cpu(wrapped)  # also a base the user quantized with from_pretrained(quantization_config=...)
    return wrapped


def _trainable_in_fp32(wrapped: nn.Module) -> None:
    """On a half-precision or quantized base, train adapters and heads in fp32.

    New head copies (peft's modules_to_save, our head slots) are created in the
    base's dtype; bf16 rounds away updates smaller than 2^-8 of a weight.
    """
    frozen_half = any(
        p.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16) for p in wrapped.parameters()
    )
    if frozen_half or is_quantized(unwrap(wrapped)):
        cast_trainable_to_fp32(wrapped)


def add_adapter(model: nn.Module, name: str, method: str | MethodConfig, **options: Any) -> nn.Module:
    """Add another named adapter to a wrapped model (it becomes trainable only once active)."""
    validate_adapter_name(name)
    backend = _backend(model, "add_adapter")
    config = build_config(method, **options)
    if config.backend != backend.name:
        kind = "peft-backed (lora, prefix, ia3, ...)" if backend.name == "peft" else "peftadapt-native (adapter/head)"
        raise ValueError(
            f"cannot add a {config.method!r} adapter to a model wrapped with a {kind} method; "
            "several named adapters on one model must come from the same family"
        )
    if name in backend.adapter_names(model):
        raise ValueError(f"an adapter named {name!r} already exists; existing: {backend.adapter_names(model)}")
    config.add_to(model, name)
    _trainable_in_fp32(model)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    backend = backend_of(model)
    return [] if backend is None else backend.adapter_names(model)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active (and trainable) adapter."""
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; this model has {names}")
    # torch types Module attributes as Tensor | Module
    model.set_adapter(name)  # type: ignore[operator]


def after_optimizer_step(model: nn.Module, step: int) -> None:
    """What the method does after ``optimizer.step()`` and before ``zero_grad()`` of optimizer step
    ``step`` (0-based): AdaLoRA allocates its rank budget from the gradients. peftadapt's ``Trainer``
    and ``add_alignment`` call it; a plain PyTorch loop should too. Nothing for other methods or a
    model ``wrap`` did not make."""
    backend = backend_of(model)
    if backend is not None:
        backend.after_optimizer_step(model, step)


# -- parameters ----------------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        # torch types Module attributes as Tensor | Module
        t, n = model.get_nb_trainable_parameters()  # type: ignore[operator]
        return int(t), int(n)
    return trainable_and_total(model)


def print_trainable_parameters(model: nn.Module) -> None:
    t, n = trainable_parameters(model)
    print(f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / max(n, 1):.4f}")


# -- switching adaptation off, merging ----------------------------------------------------


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes the base model's outputs (adapters and trained heads off)."""
    with _backend(model, "disabled").disabled(model) as m:
        yield m


def merge(model: nn.Module, unload: bool = True) -> nn.Module:
    """Fold LoRA (or IA3, VeRA, AdaLoRA, LoHa, LoKr, OFT) into the base weights.

    ``unload=True`` returns a plain transformers model (same outputs, within fp32
    tolerance); ``unload=False`` merges in place and keeps the wrapper so that
    :func:`unmerge` can restore the separate weights.
    """
    backend = backend_of(model)
    if backend is None:
        raise TypeError("merge() needs a model returned by peftadapt.wrap(model, 'lora', ...)")
    return backend.merge(model, unload)


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, unload=False)``."""
    backend = backend_of(model)
    if backend is None:
        raise TypeError("unmerge() needs a peft-backed model merged with merge(model, unload=False)")
    return backend.unmerge(model)


# -- save / load -----------------------------------------------------------------------


def save(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Save the adapter (not the base model) of a wrapped model to ``path``."""
    _backend(model, "save")
    # torch types Module attributes as Tensor | Module
    model.save_pretrained(str(path))  # type: ignore[operator]


def load(
    base: nn.Module, path: str | os.PathLike[str], adapter_name: str | None = None, is_trainable: bool = False
) -> nn.Module:
    """Load an adapter saved by peftadapt or by plain peft onto ``base``.

    ``base`` is the transformers model the adapter was trained on (same
    architecture and sizes), or an already wrapped model to which the adapter
    is added. ``adapter_name``: the name to load under (peft format, default
    ``"default"``), or which saved adapter to load (peftadapt format, default:
    all of them under their saved names). Checks the saved shapes against
    ``base`` before loading and says what differs. ``is_trainable=False``
    loads for inference (everything frozen).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no adapter folder at {str(path)!r}")
    backend = backend_for_folder(path)
    if backend is None:
        raise FileNotFoundError(
            f"no adapter in {str(path)!r}: expected {PEFT_CONFIG} (peft format: LoRA/DoRA/prefix) "
            f"or {NATIVE_CONFIG} (peftadapt format: adapter/head); found {sorted(p.name for p in path.iterdir())}"
        )
    return backend.load(base, path, adapter_name, is_trainable)
