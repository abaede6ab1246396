"""Head-only training ("linear probe"): every base weight frozen but the task head.

The linear-probe baseline of transfer learning (e.g. Kornblith et al., 2019,
"Do Better ImageNet Models Transfer Better?"): features of a frozen
pretrained encoder, a trained classifier on top. The head is trained as a
per-adapter copy (see :mod:`peftadapt.methods.slots`), so the original head stays
untouched and ``disable_adapter()`` gives the base model back.

>>> model = peftadapt.wrap(AutoModelForSequenceClassification.from_pretrained(path), "head")
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from ..core.hf import HEAD_NAMES, find_task_head, unwrap
from .adapted_model import AdaptedModel
from .base import MethodConfig, field, register_method
from .slots import add_head_copies


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
            if (
                not isinstance(self.modules, (list, tuple))
                or not self.modules
                or not all(isinstance(m, str) and m for m in self.modules)
            ):
                raise ValueError(f"modules must be None or a non-empty list of module names, got {self.modules!r}")
            self.modules = list(self.modules)

    def _heads(self, model: nn.Module) -> list[str]:
        hf = unwrap(model)
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
        if not isinstance(wrapped, AdaptedModel):
            raise TypeError(f"Head.add_to needs a peftadapt AdaptedModel, got {type(wrapped).__name__}")
        self.validate()
        self._add(wrapped, adapter_name, self._heads(wrapped))

    def _add(self, wrapped: AdaptedModel, adapter_name: str, heads: list[str]) -> None:
        wrapped.check_new_name(adapter_name)
        add_head_copies(wrapped, adapter_name, heads)
        wrapped.register_adapter(adapter_name, self)
