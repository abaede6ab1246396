"""The backend protocol behind ``wrap`` / ``load`` / ``merge``: one object per family of methods.

A method config names its backend (``MethodConfig.backend``): ``"peft"`` for LoRA,
prefix and the other peft methods (a ``peft.PeftModel``, peft's file format), ``"native"`` for bottleneck adapters and
head-only (an :class:`~peftadapt.methods.AdaptedModel`, our file format). :mod:`peftadapt.wrap`
asks :func:`backend_of` (a wrapped model) or :func:`backend_for_folder` (a saved
adapter) and calls the protocol; it never switches on
the model's type itself.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import torch.nn as nn

from .native import NativeBackend
from .peft import PeftBackend

__all__ = ["BACKENDS", "Backend", "backend_for_folder", "backend_of"]


class Backend(Protocol):
    """What ``wrap``'s functions need from a family of methods."""

    name: str
    config_file: str  # the file that marks a saved adapter folder of this backend

    def owns(self, model: object) -> bool: ...
    def adapter_names(self, model: Any) -> list[str]: ...
    def disabled(self, model: Any) -> contextlib.AbstractContextManager[nn.Module]: ...
    def merge(self, model: Any, unload: bool) -> nn.Module: ...
    def unmerge(self, model: Any) -> nn.Module: ...
    def after_optimizer_step(self, model: Any, step: int) -> None: ...
    def load(self, base: nn.Module, path: Path, adapter_name: str | None, is_trainable: bool) -> nn.Module: ...


BACKENDS: dict[str, Backend] = {"peft": PeftBackend(), "native": NativeBackend()}


def backend_of(model: object) -> Backend | None:
    """The backend that carries ``model``, or None for a model ``wrap`` did not make."""
    return next((b for b in BACKENDS.values() if b.owns(model)), None)


def backend_for_folder(path: Path) -> Backend | None:
    """The backend whose config file is in the adapter folder ``path`` (ours first: a folder
    holding both is a native one with a stray peft config)."""
    return next((b for b in (BACKENDS["native"], BACKENDS["peft"]) if (path / b.config_file).is_file()), None)
