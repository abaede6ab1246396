"""Head-only training ("linear probe"): every base weight frozen but the task head.

The linear-probe baseline of transfer learning (e.g. Kornblith et al., 2019,
"Do Better ImageNet Models Transfer Better?"): features of a frozen
pretrained encoder, a trained classifier on top. The head is trained as a
per-adapter copy (see :mod:`peftadapt.model`), so the original head stays
untouched and ``disable_adapter()`` gives the base model back.

>>> model = peftadapt.wrap(AutoModelForSequenceClassification.from_pretrained(path), "head")
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.nn as nn

from .base import MethodConfig, field, register_method

# Top-level attribute names transformers uses for task heads, in the order a
# model applies them (DistilBERT: pre_classifier, then classifier).
HEAD_NAMES = (
    "pre_classifier",  # DistilBERT sequence classification
    "classifier",  # BERT/RoBERTa/DistilBERT/ELECTRA sequence and token classification
    "score",  # Llama/Qwen2/Mistral/GPT-2 sequence classification
    "qa_outputs",  # extractive question answering
    "lm_head",  # causal / masked language models
    "cls",  # BERT masked-LM / pre-training heads
    "vocab_transform",  # DistilBERT masked LM
    "vocab_layer_norm",
    "vocab_projector",
)
# Language-model heads: vocabulary-sized and usually tied to the input
# embeddings, so bottleneck adapters do not train them by default.
LM_HEAD_NAMES = ("lm_head", "cls", "vocab_transform", "vocab_layer_norm", "vocab_projector")


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peftadapt or peft wrapper (or the model itself)."""
    from ..model import AdaptedModel

    if isinstance(model, AdaptedModel):
        return model.model
    get_base = getattr(model, "get_base_model", None)  # peft's PeftModel
    if callable(get_base):
        return get_base()
    return model


def find_task_head(model: nn.Module) -> list[str]:
    """Names of the task-head modules of a transformers model (top-level attributes).

    ``classifier`` for BERT classifiers, ``score`` for decoder classifiers,
    ``["pre_classifier", "classifier"]`` for DistilBERT, ``lm_head`` for causal
    LMs, ``qa_outputs`` for question answering; ``[]`` for a bare encoder
    (``AutoModel``). Names are relative to the transformers model, also when
    ``model`` is an AdaptedModel or a peft PeftModel.
    """
    hf = _hf_model(model)
    children = dict(hf.named_children())
    return [n for n in HEAD_NAMES if n in children and isinstance(children[n], nn.Module)]


def _add_head_copies(wrapped, adapter_name: str, head_names: list[str]) -> None:
    """Give ``adapter_name`` its own trainable copy of each head module."""
    from ..model import _HeadSlot

    hf = wrapped.model
    for name in head_names:
        module = hf.get_submodule(name)
        if not isinstance(module, _HeadSlot):
            slot = _HeadSlot(module)
            setattr(hf, name, slot)
            module = slot
        head = copy.deepcopy(module.base_layer)  # also unties a tied lm_head: the copy owns its weight
        for p in head.parameters():
            p.requires_grad_(True)
        module.heads[adapter_name] = head


@register_method("head")
@dataclass
class Head(MethodConfig):
    """Train only the task head; the whole base model stays frozen."""

    modules: list[str] | None = field(
        None,
        "names of the top-level head modules to train; None = found automatically "
        "(classifier / score / pre_classifier / qa_outputs / lm_head)",
    )

    def validate(self) -> None:
        if self.modules is not None:
            if isinstance(self.modules, str):
                self.modules = [self.modules]
            if not isinstance(self.modules, (list, tuple)) or not self.modules or not all(
                isinstance(m, str) and m for m in self.modules
            ):
                raise ValueError(f"modules must be None or a non-empty list of module names, got {self.modules!r}")
            self.modules = list(self.modules)

    def _heads(self, model: nn.Module) -> list[str]:
        hf = _hf_model(model)
        found = find_task_head(hf)
        if self.modules is None:
            if not found:
                raise ValueError(
                    f"{type(hf).__name__} has no task head to train (looked for {list(HEAD_NAMES)}); "
                    "head-only training needs a model with a head, e.g. load it with "
                    "AutoModelForSequenceClassification (or *ForTokenClassification / *ForCausalLM)"
                )
            return found
        children = dict(hf.named_children())
        bad = [m for m in self.modules if m not in children]
        if bad:
            raise ValueError(
                f"head module(s) {bad} not found in {type(hf).__name__}; its top-level modules are "
                f"{sorted(children)} (detected heads: {found})"
            )
        return list(self.modules)

    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        from ..model import AdaptedModel

        self.validate()
        heads = self._heads(model)  # check before wrapping: errors leave the model untouched
        wrapped = AdaptedModel(model)
        try:
            self._add(wrapped, adapter_name, heads)
        except BaseException:
            wrapped.unwrap()
            raise
        return wrapped

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        from ..model import AdaptedModel

        if not isinstance(wrapped, AdaptedModel):
            raise TypeError(f"Head.add_to needs a peftadapt AdaptedModel, got {type(wrapped).__name__}")
        self.validate()
        self._add(wrapped, adapter_name, self._heads(wrapped))

    def _add(self, wrapped, adapter_name: str, heads: list[str]) -> None:
        wrapped._check_new_name(adapter_name)
        _add_head_copies(wrapped, adapter_name, heads)
        wrapped._register(adapter_name, self)
