"""The native backend: peftadapt's own methods (bottleneck adapters, head-only), carried by an
:class:`~peftadapt.methods.AdaptedModel` and saved in :mod:`peftadapt.methods.native_format`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..methods.adapted_model import AdaptedModel
from ..methods.native_format import CONFIG_NAME
from .peft import is_peft_model

__all__ = ["NativeBackend"]


class NativeBackend:
    """Adapters that are ours (``MethodConfig.backend == "native"``)."""

    name = "native"
    config_file = CONFIG_NAME

    def owns(self, model: object) -> bool:
        return isinstance(model, AdaptedModel)

    def adapter_names(self, model: Any) -> list[str]:
        return list(model.adapter_names)

    @contextlib.contextmanager
    def disabled(self, model: Any) -> Iterator[nn.Module]:
        with model.disable_adapter():
            yield model

    def merge(self, model: Any, unload: bool) -> nn.Module:
        raise ValueError(
            f"cannot merge a {model.method!r} model: bottleneck adapters are nonlinear modules, not weight "
            "updates; keep the wrapped model, or use model.unwrap() to get the base model back"
        )

    def unmerge(self, model: Any) -> nn.Module:
        raise TypeError("unmerge() needs a peft-backed model merged with merge(model, unload=False)")

    def after_optimizer_step(self, model: Any, step: int) -> None:
        pass  # no native method changes its structure while training

    def load(self, base: nn.Module, path: Path, adapter_name: str | None, is_trainable: bool) -> nn.Module:
        if self.owns(base):
            return base.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable)  # type: ignore[operator]  # torch types Module attributes as Tensor | Module
        if is_peft_model(base):
            raise ValueError(f"{path} holds a peftadapt bottleneck/head adapter; it cannot be added to a peft model")
        return AdaptedModel.from_pretrained(base, str(path), adapter_name=adapter_name, is_trainable=is_trainable)
