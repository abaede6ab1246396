"""Prefix tuning (Li & Liang 2021), built on peft.

Trainable key/value vectors for ``num_virtual_tokens`` virtual positions are
prepended to every attention layer (``past_key_values``); the base model stays
frozen. Optionally reparameterised through an MLP (``prefix_projection``).

transformers 5 classifiers (``*ForSequenceClassification``) no longer name
``past_key_values`` in their ``forward`` signature, which peft's classifier
path checks for and rejects. Their ``**kwargs`` do reach the backbone, so for
such classifiers we use peft's feature-extraction wrapper (which prepends the
prefix mask and passes ``past_key_values`` through) and list the head in
``modules_to_save``. transformers 4.x classifiers take no ``**kwargs``, and
there peft's own classifier path works. :func:`prefix_task_type` picks the
route for the installed transformers; ``peftadapt.load`` re-picks it, so an
adapter saved under one transformers version loads under the other. The saved
adapter is ordinary peft format either way.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch.nn as nn

from ..core.hf import classifier_heads, hf_config
from ..quant.prepare import check_prefix_compat
from . import peft_support
from .base import MethodConfig, field, register_method

# Architectures whose attention does not read past_key_values: prefix tuning
# cannot reach them.
_NO_KV_CACHE = ("distilbert", "albert", "t5encoder")


def prefix_task_type(model: nn.Module) -> str:
    """The peft task type that makes prefix tuning work for this model here (see module doc)."""
    task = peft_support.task_type_of(model)
    if task is None:
        return "FEATURE_EXTRACTION"
    if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        params = inspect.signature(model.forward).parameters
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "past_key_values" not in params and takes_kwargs:
            return "FEATURE_EXTRACTION"
    return task


@register_method("prefix")
class Prefix(MethodConfig):
    backend: ClassVar[str] = "peft"

    num_virtual_tokens: int = field(20, "number of virtual prefix positions per layer")
    prefix_projection: bool = field(
        False, "reparameterise the prefix through a 2-layer MLP (more stable, more params while training)"
    )
    projection_hidden_size: int | None = field(None, "hidden size of that MLP (default: the model's hidden size)")
    train_head: bool = field(True, "train the task head (classifier / score) when the model has one")

    def validate(self) -> None:
        if (
            not isinstance(self.num_virtual_tokens, int)
            or isinstance(self.num_virtual_tokens, bool)
            or self.num_virtual_tokens < 1
        ):
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.projection_hidden_size is not None and (
            not isinstance(self.projection_hidden_size, int) or self.projection_hidden_size < 1
        ):
            raise ValueError(
                f"projection_hidden_size must be a positive integer or None, got {self.projection_hidden_size!r}"
            )

    def peft_config(self, model: nn.Module):
        from peft import PrefixTuningConfig

        config = hf_config(model)
        mt = config.model_type
        if mt in _NO_KV_CACHE or getattr(config, "is_encoder_decoder", False):
            raise ValueError(
                f"prefix tuning cannot be applied to a {mt!r} model: its attention takes no past_key_values"
                + (
                    " (encoder-decoder models are not supported by peftadapt's prefix path)"
                    if getattr(config, "is_encoder_decoder", False)
                    else ""
                )
                + "; use 'lora' or 'adapter' instead"
            )
        own_task = peft_support.task_type_of(model)
        if own_task not in (None, "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM"):
            raise ValueError(
                f"prefix tuning supports classifiers, causal LMs and backbones; got a {own_task} model "
                f"({type(model).__name__})"
            )
        task = prefix_task_type(model)
        heads = classifier_heads(model)
        modules_to_save = None
        if task == "FEATURE_EXTRACTION" and own_task is not None:
            modules_to_save = heads if (self.train_head and heads) else None
        elif task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") and not self.train_head:
            raise ValueError(
                "train_head=False with prefix tuning on a classifier needs transformers >= 5 "
                "(peft's classifier path always trains the head)"
            )
        hidden = (self.projection_hidden_size or config.hidden_size) if self.prefix_projection else None
        return PrefixTuningConfig(
            task_type=task,
            num_virtual_tokens=self.num_virtual_tokens,
            prefix_projection=self.prefix_projection,
            modules_to_save=modules_to_save,
            # None is peft's own default (its field is annotated int but defaults to None)
            encoder_hidden_size=hidden,  # type: ignore[arg-type]
        )

    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        from peft import get_peft_model

        check_prefix_compat(model)  # turns checkpointing off, with a warning
        return get_peft_model(model, self.peft_config(model), adapter_name=adapter_name)

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        wrapped.add_adapter(adapter_name, self.peft_config(wrapped.get_base_model()))  # type: ignore[operator]  # torch types Module attributes as Tensor | Module
