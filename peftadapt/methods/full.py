"""Full fine-tuning: every weight of the model trains.

The baseline every parameter-efficient method is measured against, with the
same recipe (schedules, early stopping, alignment terms). ``wrap(model, "full")``
returns the transformers model itself, all its parameters trainable and marked
(:data:`~peftadapt.core.hf.FULL_FINETUNE_MARK`) so that the Trainer knows the
choice was made on purpose; saving it is ``save_pretrained``: a normal
transformers model folder (``from_pretrained`` loads it).

>>> model = peftadapt.wrap(AutoModelForSequenceClassification.from_pretrained(path), "full")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn

from ..core.hf import FULL_FINETUNE_MARK, check_transformers_model
from ..quant import is_quantized
from .base import MethodConfig, register_method


def mark_full(model: nn.Module) -> nn.Module:
    """Every floating-point parameter of ``model`` trainable, and the model marked as fully fine-tuned."""
    if is_quantized(model):
        raise ValueError(
            "full fine-tuning cannot train quantized (4/8-bit) weights; load the model unquantized "
            "(drop model.quantize) or train LoRA on it (QLoRA: method lora)"
        )
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    setattr(model, FULL_FINETUNE_MARK, True)
    return model


@register_method("full")
@dataclass
class Full(MethodConfig):
    """Train every weight (no adapter); saved as a whole transformers model."""

    backend: ClassVar[str] = "full"

    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        check_transformers_model(model)
        if adapter_name != "default":
            raise ValueError(f"full fine-tuning has no adapters to name (got adapter_name={adapter_name!r})")
        return mark_full(model)

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        raise ValueError(
            "full fine-tuning trains the whole model; it cannot be added as a second adapter "
            "(wrap the original model with 'full' instead)"
        )
