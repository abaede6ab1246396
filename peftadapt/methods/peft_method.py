"""Every other peft method, by name or as a ``peft.PeftConfig``: one config class, :class:`PeftMethod`.

``wrap(model, "ia3")``, ``"vera"``, ``"adalora"``, ``"loha"``, ``"lokr"``, ``"oft"`` and
``"prompt_tuning"`` build peft's own config for that method (:data:`PEFT_TYPES`) from the
keyword options, which are peft's field names (``PeftMethod.help("ia3")`` lists them with
peft's help text); ``wrap(model, peft.IA3Config(...))`` takes any peft config as it is.
What peftadapt adds, as for LoRA: target modules from peft's per-architecture table for
that method (else ``"all-linear"``) checked against the model, the task type from the model
class (so a classifier's head trains and is saved, unless ``train_head=False``), GPT-2's
transposed ``Conv1D`` weights, and a value check when the options are read (peft's own
``__post_init__``), not when the model is wrapped.

AdaLoRA re-allocates its rank budget during training; both of peftadapt's trainers call
its ``update_and_allocate`` after each optimizer step (:mod:`peftadapt.backends.peft`), so
its ``total_step`` must be the run's number of optimizer steps.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from typing import Any, ClassVar

import torch.nn as nn

from ..core.fields import help_of
from ..core.hf import hf_config
from . import peft_support
from .base import MethodConfig, field, register_method

__all__ = ["PEFT_TYPES", "PeftMethod"]

# peftadapt's name -> peft's PeftType
PEFT_TYPES: dict[str, str] = {
    "ia3": "IA3",
    "vera": "VERA",
    "adalora": "ADALORA",
    "loha": "LOHA",
    "lokr": "LOKR",
    "oft": "OFT",
    "prompt_tuning": "PROMPT_TUNING",
}
# where peft's own default does not give a working adapter
_DEFAULTS: dict[str, dict[str, Any]] = {"PROMPT_TUNING": {"num_virtual_tokens": 20}}
# set by peftadapt from the model, not an option
_OURS = ("task_type", "target_modules", "peft_type")
_CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def _peft_config_class(peft_type: str) -> type:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)  # type: ignore[call-overload]  # keyed by PeftType, a str enum
    if cls is None:
        valid = sorted(str(k) for k in PEFT_TYPE_TO_CONFIG_MAPPING)
        raise ValueError(f"peft_type {peft_type!r} is not a peft method; valid: {valid}")
    return cls


def _peft_option_names(peft_type: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_peft_config_class(peft_type)) if f.init and f.name not in _OURS]


@register_method("peft", *((name, {"peft_type": t}) for name, t in PEFT_TYPES.items()))
@dataclasses.dataclass
class PeftMethod(MethodConfig):
    backend: ClassVar[str] = "peft"

    peft_type: str = field("", f"peft's method (a PeftType); the names {sorted(PEFT_TYPES)} set it")
    target_modules: Any = field(
        None,
        "None: peft's per-architecture default for this method, else 'all-linear'; 'all-linear'; a list of module "
        "names; or a regex string (not for prompt_tuning)",
    )
    train_head: bool = field(True, "train the task head (classifier / score) when the model has one")
    options: dict[str, Any] = field({}, "peft's own options for this method, e.g. r, init_weights (see .help('ia3'))")
    peft_config_object: Any = field(None, "a ready peft.PeftConfig, used as it is (wrap(model, config) sets it)")

    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        """Own fields by name; every other keyword is one of peft's options for the method."""
        own = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in options.items() if k in own}
        kw["options"] = {**kw.get("options", {}), **{k: v for k, v in options.items() if k not in own}}
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def from_peft_config(cls, config: Any) -> PeftMethod:
        return cls(peft_type=str(config.peft_type.value), peft_config_object=config)

    @classmethod
    def help(cls, method: str | None = None) -> dict[str, str]:
        """Our fields; with a method name (``"ia3"``) or PeftType, also peft's options for it and their help."""
        out = help_of(cls)
        if method is not None:
            peft_type = PEFT_TYPES.get(method.lower(), method.upper())
            for f in dataclasses.fields(_peft_config_class(peft_type)):
                if f.init and f.name not in _OURS:
                    out[f.name] = f.metadata.get("help", "")
        return out

    @classmethod
    def option_names(cls, method: str) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)] + _peft_option_names(PEFT_TYPES.get(method, method.upper()))

    @property
    def name(self) -> str:
        """peftadapt's name of the method (``"ia3"``), else peft's type in lower case."""
        return next((n for n, t in PEFT_TYPES.items() if t == self.peft_type), self.peft_type.lower())

    def validate(self) -> None:
        if self.peft_config_object is not None:
            return  # the user's own peft config: peft checked it when it was built
        if not self.peft_type:
            raise ValueError(f"method 'peft' needs peft_type (e.g. 'IA3'), or use a name: {sorted(PEFT_TYPES)}")
        valid = _peft_option_names(self.peft_type)
        unknown = sorted(set(self.options) - set(valid))
        if unknown:
            close = difflib.get_close_matches(unknown[0], valid, n=1)
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; valid options: {['target_modules', 'train_head', *valid]}"
            )
        prompt = self._is_prompt_learning()
        if prompt and self.target_modules is not None:
            raise ValueError(f"{self.name} adapts no modules: target_modules must be None, got {self.target_modules!r}")
        try:  # peft's own value checks (its __post_init__)
            self._build(None, None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self.name}: {e}") from None

    def _is_prompt_learning(self) -> bool:
        from peft.config import PromptLearningConfig

        return issubclass(_peft_config_class(self.peft_type), PromptLearningConfig)

    def _build(self, task: str | None, targets: Any) -> Any:
        opts = {**_DEFAULTS.get(self.peft_type, {}), **self.options}
        if not self._is_prompt_learning():
            opts["target_modules"] = targets
        return _peft_config_class(self.peft_type)(task_type=task, **opts)

    def peft_config(self, model: nn.Module) -> Any:
        if self.peft_config_object is not None:
            return copy.deepcopy(self.peft_config_object)  # peft fills in defaults in place
        task = peft_support.task_type_of(model)
        if self._is_prompt_learning():
            if task is None or (task in _CLASSIFIER_TASKS and not self.train_head):
                task = "FEATURE_EXTRACTION"  # prompts prepended, no head copied into modules_to_save
            return self._build(task, None)
        targets = self.target_modules
        if targets is None:
            targets = peft_support.default_targets(model, self.peft_type)
        elif isinstance(targets, (tuple, set)):
            targets = list(targets)
        peft_support.check_targets_exist(model, targets)
        if not self.train_head and task in _CLASSIFIER_TASKS:
            task = None  # peft copies the head into modules_to_save for these task types
        config = self._build(task, targets)
        if hasattr(config, "fan_in_fan_out") and "fan_in_fan_out" not in self.options:
            # GPT-2's Conv1D stores weights transposed
            config.fan_in_fan_out = any(type(m).__name__ == "Conv1D" for m in model.modules())
        return config

    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        from peft import get_peft_model

        try:
            return get_peft_model(model, self.peft_config(model), adapter_name=adapter_name)
        except (ValueError, TypeError, NotImplementedError) as e:
            raise ValueError(f"peft cannot apply {self.name} to this {hf_config(model).model_type} model: {e}") from e

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        wrapped.add_adapter(adapter_name, self.peft_config(wrapped.get_base_model()))  # type: ignore[operator]  # torch types Module attributes as Tensor | Module
