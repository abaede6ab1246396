"""LoRA, DoRA and rsLoRA, built on peft.

LoRA (Hu et al. 2021) adds a trainable low-rank update to a frozen weight:
``W x + (alpha / r) * B A x`` with A (r x in) Gaussian/Kaiming-initialised and
B (out x r) zero, so the wrapped model equals the base model at step 0.
rsLoRA (Kalajdzievski 2023) scales by ``alpha / sqrt(r)`` instead; DoRA
(Liu et al. 2024) splits the weight into magnitude and direction and applies
LoRA to the direction. The result is a ``peft.PeftModel``, saved in peft's own
format (``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import torch.nn as nn

from . import peft_support
from .base import MethodConfig, field, register_method

Bias = Literal["none", "all", "lora_only"]  # peft's LoraConfig.bias
_BIASES: tuple[Bias, ...] = get_args(Bias)
_INITS = ("default", "gaussian", "pissa", "olora")
# our init names -> peft's init_lora_weights
_PEFT_INIT: dict[str, bool | Literal["gaussian", "pissa", "olora"]] = {
    "default": True,
    "gaussian": "gaussian",
    "pissa": "pissa",
    "olora": "olora",
}


@register_method("lora", ("dora", {"use_dora": True}), ("rslora", {"use_rslora": True}))
class LoRA(MethodConfig):
    backend: ClassVar[str] = "peft"

    r: int = field(8, "rank of the update B A")
    alpha: float | None = field(
        None, "scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora); default 2*r"
    )
    dropout: float = field(0.0, "dropout on the LoRA branch input")
    target_modules: Any = field(
        None, "None: per-architecture default (attention q/v); 'all-linear'; a list of module names; or a regex string"
    )
    exclude_modules: Any = field(None, "module names (or a regex) never to adapt")
    layers: list[int] | None = field(None, "adapt only these layer indices (default: all)")
    use_dora: bool = field(False, "DoRA: weight-decomposed low-rank adaptation")
    use_rslora: bool = field(False, "rank-stabilized scaling alpha/sqrt(r)")
    bias: str = field("none", "which biases train: 'none', 'all', 'lora_only'")
    init: str = field("default", "LoRA init: 'default' (Kaiming A, zero B), 'gaussian', 'pissa', 'olora'")
    train_head: bool = field(True, "train the task head (classifier / score) when the model has one")
    modules_to_save: list[str] | None = field(None, "extra modules trained fully and saved with the adapter")

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number or None, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in _BIASES:
            raise ValueError(f"bias={self.bias!r} is not valid; choose one of {list(_BIASES)}")
        if self.init not in _INITS:
            raise ValueError(f"init={self.init!r} is not valid; choose one of {list(_INITS)}")
        tm = self.target_modules
        if (
            tm is not None
            and not isinstance(tm, str)
            and not (isinstance(tm, (list, tuple, set)) and tm and all(isinstance(t, str) for t in tm))
        ):
            raise TypeError(
                f"target_modules must be None, 'all-linear', a regex string or a non-empty list of names; got {tm!r}"
            )
        if self.layers is not None and not all(isinstance(i, int) and i >= 0 for i in self.layers):
            raise ValueError(f"layers must be a list of non-negative layer indices, got {self.layers!r}")

    def peft_config(self, model: nn.Module):
        from peft import LoraConfig

        targets = self.target_modules
        if targets is None:
            targets = peft_support.default_targets(model, "LORA")
        elif isinstance(targets, (tuple, set)):
            targets = list(targets)
        peft_support.check_targets_exist(model, targets)
        if self.use_dora:
            _check_dora_base(model)
        if self.exclude_modules is not None:
            peft_support.check_targets_exist(model, self.exclude_modules, "exclude_modules")
        task = peft_support.task_type_of(model)
        modules_to_save = list(self.modules_to_save or [])
        if not self.train_head and task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
            # peft adds the head to modules_to_save for these task types; a
            # task_type of None keeps the plain model and trains no head.
            task = None
        init = _PEFT_INIT[self.init]
        bias = next(b for b in _BIASES if b == self.bias)  # validated in validate(): the Literal it equals
        return LoraConfig(
            r=self.r,
            # peft annotates lora_alpha as int, but only divides by it (lora_alpha / r): a float is fine
            lora_alpha=self.alpha if self.alpha is not None else 2 * self.r,  # type: ignore[arg-type]
            lora_dropout=self.dropout,
            target_modules=targets,
            exclude_modules=self.exclude_modules,
            layers_to_transform=self.layers,
            use_dora=self.use_dora,
            use_rslora=self.use_rslora,
            bias=bias,
            init_lora_weights=init,
            task_type=task,
            modules_to_save=modules_to_save or None,
            # GPT-2's Conv1D stores weights transposed; peft would warn and flip it anyway
            fan_in_fan_out=any(type(m).__name__ == "Conv1D" for m in model.modules()),
        )

    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(model), adapter_name=adapter_name)

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        wrapped.add_adapter(adapter_name, self.peft_config(wrapped.get_base_model()))  # type: ignore[operator]  # torch types Module attributes as Tensor | Module


def _check_dora_base(model: nn.Module) -> None:
    """DoRA on an 8-bit bitsandbytes base on the CPU: peft 0.21 + bitsandbytes 0.50 train one
    step, then fail inside bitsandbytes' 8-bit matmul (``state.SCB`` is None) at the second
    forward. Plain peft does the same (``get_peft_model(..., LoraConfig(use_dora=True))``;
    checked on a tiny Llama), so refuse up front with the ways out. Not checked on a GPU."""
    for name, mod in model.named_modules():
        if (
            type(mod).__name__ == "Linear8bitLt"
            and getattr(mod.weight, "device", None) is not None
            and mod.weight.device.type == "cpu"
        ):
            raise ValueError(
                f"DoRA on an 8-bit base on the CPU fails at the second training step ({name!r} is a CPU "
                "bitsandbytes Linear8bitLt; peft 0.21 / bitsandbytes 0.50 lose the 8-bit scales, state.SCB, "
                "after the first step). Use a 4-bit base (load_quantized(..., bits=4): DoRA works there), "
                "or plain LoRA on the 8-bit base."
            )
