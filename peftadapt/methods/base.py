"""The method interface: one config dataclass per adaptation method.

A method config is a dataclass whose fields are its options (each field's
``metadata["help"]`` says what it does). ``wrap(model, "lora", r=8)`` looks
the name up in :data:`METHODS`, builds the config from the keyword options
(unknown options are a ``ValueError`` naming the valid ones), validates it, and
calls :meth:`MethodConfig.apply`.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar

import torch.nn as nn

from ..core.fields import field, help_of

__all__ = ["ALIASES", "METHODS", "MethodConfig", "build_config", "field", "method_names", "register_method"]

METHODS: dict[str, type[MethodConfig]] = {}
# Aliases: a name that maps to a config class with some options preset.
ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}


def register_method(name: str, *aliases: tuple[str, dict[str, Any]]):
    """Class decorator: register a method config under ``name`` (and aliases)."""

    def deco(cls):
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(cls)
        cls.method = name
        METHODS[name] = cls
        for alias, preset in aliases:
            ALIASES[alias] = (name, dict(preset))
        return cls

    return deco


def method_names() -> list[str]:
    return sorted(set(METHODS) | set(ALIASES))


@dataclasses.dataclass
class MethodConfig:
    """Base class of every method's options."""

    method: ClassVar[str] = "base"
    # which backend carries it: "peft" (LoRA, prefix: a peft PeftModel) or "native" (ours: AdaptedModel)
    backend: ClassVar[str] = "native"

    # -- construction ------------------------------------------------------
    @classmethod
    def from_options(cls, **options: Any) -> MethodConfig:
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {cls.method!r}; valid options: {valid}")
        cfg = cls(**options)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ValueError/TypeError for bad option values. Override."""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["method"] = self.method
        return d

    @classmethod
    def help(cls) -> dict[str, str]:
        return help_of(cls)

    @classmethod
    def option_names(cls, method: str) -> list[str]:
        """The keyword options ``wrap(model, method, ...)`` takes (the run file's ``method:`` keys)."""
        return [f.name for f in dataclasses.fields(cls)]

    # -- application -------------------------------------------------------
    def apply(self, model: nn.Module, adapter_name: str = "default") -> nn.Module:
        """Return ``model`` adapted with this method (base weights frozen)."""
        raise NotImplementedError

    def add_to(self, wrapped: nn.Module, adapter_name: str) -> None:
        """Add this method as another named adapter to an already wrapped model."""
        raise NotImplementedError


def _is_peft_config(obj: object) -> bool:
    """True for a ``peft.PeftConfig``; never imports peft (none can exist before it is imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(obj, peft.PeftConfig)


def build_config(method: Any, **options: Any) -> MethodConfig:
    """Turn ``("lora", r=8)``, ``LoRA(r=8)`` or a ``peft.PeftConfig`` into a validated config."""
    if isinstance(method, MethodConfig):
        if options:
            raise ValueError(
                f"pass options either in the config object or as keywords, not both (got {sorted(options)})"
            )
        method.validate()
        return method
    if _is_peft_config(method):  # any peft.PeftConfig: the generic peft method carries it
        if options:
            raise ValueError(f"pass options either in the peft config or as keywords, not both (got {sorted(options)})")
        return METHODS["peft"].from_peft_config(method)  # type: ignore[attr-defined]  # PeftMethod's
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a name, a MethodConfig or a peft.PeftConfig, got {type(method).__name__}; "
            f"valid names: {method_names()}"
        )
    key = method.lower()
    if key in ALIASES:
        base, preset = ALIASES[key]
        clash = sorted(k for k in options if k in preset and options[k] != preset[k])
        if clash:
            raise ValueError(f"method {method!r} fixes {clash} to {[preset[k] for k in clash]}; use {base!r} instead")
        return METHODS[base].from_options(**{**preset, **options})
    if key not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {method_names()}")
    return METHODS[key].from_options(**options)
