"""The full backend: a transformers model whose every weight trains (``wrap(model, "full")``),
saved and loaded as a whole model folder (``save_pretrained`` / ``from_pretrained``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..core.hf import FULL_FINETUNE_MARK, unwrap
from ..methods.full import mark_full

__all__ = ["FullBackend"]


class FullBackend:
    """Full fine-tuning (``MethodConfig.backend == "full"``): no adapter, the model itself."""

    name = "full"
    config_file = "config.json"  # a save_pretrained folder: the whole model

    def owns(self, model: object) -> bool:
        return bool(getattr(model, FULL_FINETUNE_MARK, False))

    def adapter_names(self, model: Any) -> list[str]:
        return []

    @contextlib.contextmanager
    def disabled(self, model: Any) -> Iterator[nn.Module]:
        raise ValueError(
            "a fully fine-tuned model has no adapter to switch off; load the original model for the base outputs"
        )
        yield model  # unreachable: a generator, as contextmanager needs

    def merge(self, model: Any, unload: bool) -> nn.Module:
        return model  # nothing to fold in: the weights are the model

    def unmerge(self, model: Any) -> nn.Module:
        raise TypeError("unmerge() needs a peft-backed model merged with merge(model, unload=False)")

    def after_optimizer_step(self, model: Any, step: int) -> None:
        pass  # full fine-tuning keeps its structure while training

    def load(self, base: nn.Module, path: Path, adapter_name: str | None, is_trainable: bool) -> nn.Module:
        """The whole model saved in ``path``, of ``base``'s class and dtype (``base`` says what to build)."""
        hf = unwrap(base)
        dtype = next((p.dtype for p in hf.parameters() if p.is_floating_point()), None)
        model = type(hf).from_pretrained(str(path), dtype=dtype)  # type: ignore[attr-defined]  # a PreTrainedModel
        model.to(next(hf.parameters()).device)
        if is_trainable:
            return mark_full(model)
        model.requires_grad_(False)
        return model.eval()
