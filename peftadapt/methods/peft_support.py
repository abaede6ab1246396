"""What the methods that sit on peft share (LoRA, prefix tuning, :mod:`.peft_method`).

Internal helpers: task-type detection from the model class, the checks that
run before handing a model to peft, and target-module discovery.
"""

from __future__ import annotations

import re

import torch.nn as nn

from ..core.hf import CAUSAL_LM_SUFFIXES, hf_config

# transformers class-name suffix -> peft TaskType name
_TASK_BY_SUFFIX = (
    ("ForSequenceClassification", "SEQ_CLS"),
    *((suffix, "CAUSAL_LM") for suffix in CAUSAL_LM_SUFFIXES),  # LlamaForCausalLM, GPT2LMHeadModel
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def task_type_of(model: nn.Module) -> str | None:
    """peft TaskType name for a transformers model, or None for a bare backbone."""
    name = type(model).__name__
    for suffix, task in _TASK_BY_SUFFIX:
        if name.endswith(suffix):
            return task
    return None


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the linear-like layers (nn.Linear, GPT-2 Conv1D, bnb layers)."""
    names = set()
    for full, mod in model.named_modules():
        cls = type(mod).__name__
        if isinstance(mod, nn.Linear) or cls in ("Conv1D", "Linear4bit", "Linear8bitLt"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def default_targets(model: nn.Module, peft_type: str = "LORA") -> list[str] | str:
    """Per-architecture targets of a peft method: peft's table for it (LoRA: the q/v projections),
    else all linear layers."""
    from peft.utils import constants

    table = getattr(constants, f"TRANSFORMERS_MODELS_TO_{peft_type}_TARGET_MODULES_MAPPING", {})
    model_type = hf_config(model).model_type
    if model_type in table:
        return list(table[model_type])
    return "all-linear"


def check_targets_exist(model: nn.Module, targets: list[str] | str, what: str = "target_modules") -> None:
    """ValueError naming the targets that match no module, and listing the candidates.

    Mirrors peft's matching rule: a string target is a regex on the full name;
    a list target matches when a module name equals it or ends with ``.target``.
    """
    if targets == "all-linear":
        return
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise ValueError(
                f"{what}={targets!r} (a regular expression) matches no module of this "
                f"{hf_config(model).model_type} model; linear layers here: {linear_module_names(model)}"
            )
        return
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(
            f"{what} {missing} match no module of this {hf_config(model).model_type} model; "
            f"linear layers here: {linear_module_names(model)} (or use 'all-linear')"
        )
