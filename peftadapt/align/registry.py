"""The regularizer registry: names -> classes (with preset options), ``register`` and ``build``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .regularizer import FunctionRegularizer, Regularizer

__all__ = [
    "REGULARIZERS",
    "build",
    "build_with_defaults",
    "init_params",
    "register",
    "regularizer_names",
    "validate_options",
]

# name -> (class, preset options). Presets let one class serve two names
# ("cdan" and "cdan+e").
REGULARIZERS: dict[str, tuple[type, dict[str, Any]]] = {}


def regularizer_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(REGULARIZERS)


def register(name: str, obj: Any = None, *, needs_logits: bool = False, override: bool = False, **preset: Any):
    """Register a regularizer under ``name``; usable as a decorator.

    ``obj`` is a :class:`Regularizer` subclass or a plain function
    ``f(fs, ft, source_logits=None, target_logits=None) -> scalar``
    (``needs_logits`` then says whether it needs the logits). ``preset`` fixes
    constructor options for this name (e.g. ``"cdan+e"`` is CDAN with
    ``entropy=True``). Registering a taken name raises unless ``override=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"regularizer name must be a non-empty string, got {name!r}")
    key = name.strip().lower()

    def deco(o):
        if key in REGULARIZERS and not override:
            raise ValueError(
                f"a regularizer named {key!r} is already registered ({REGULARIZERS[key][0].__name__}); "
                f"pass override=True to replace it"
            )
        if inspect.isclass(o) and issubclass(o, Regularizer):
            cls = o
            if not preset:
                cls.name = key
        elif inspect.isclass(o):
            raise TypeError(
                f"register({key!r}): {o.__name__} must subclass peftadapt.align.Regularizer (or be a plain function)"
            )
        elif callable(o):
            cls = type(
                f"Regularizer_{o.__name__}",
                (FunctionRegularizer,),
                {"fn": staticmethod(o), "name": key, "needs_logits": bool(needs_logits), "__doc__": o.__doc__},
            )
        else:
            raise TypeError(f"register({key!r}) needs a Regularizer subclass or a function, got {o!r}")
        if preset:
            validate_options(key, cls, preset)
        REGULARIZERS[key] = (cls, dict(preset))
        return o

    return deco if obj is None else deco(obj)


def init_params(cls: type[Any]) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(cls.__init__)
    return {
        k: p
        for k, p in list(sig.parameters.items())[1:]
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }


def validate_options(name: str, cls: type, options: Mapping[str, Any]) -> None:
    valid = init_params(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for regularizer {name!r}; valid options: {sorted(valid)}")


def build(name: str, **options: Any) -> Regularizer:
    """Build the regularizer registered as ``name`` with keyword ``options``.

    Unknown names / options are a ``ValueError`` listing the valid ones;
    a missing required option (``in_features`` for "dann") names it.
    """
    if isinstance(name, Regularizer):
        if options:
            raise ValueError("build() got a Regularizer instance and options; pass options to its constructor")
        return name
    if not isinstance(name, str):
        raise TypeError(f"regularizer name must be a string, got {type(name).__name__}")
    key = name.strip().lower()
    if key not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; valid names: {regularizer_names()}")
    cls, preset = REGULARIZERS[key]
    validate_options(key, cls, options)
    clash = sorted(k for k in options if k in preset and options[k] != preset[k])
    if clash:
        raise ValueError(f"regularizer {key!r} fixes option(s) {clash} to { ({k: preset[k] for k in clash}) }")
    kwargs = {**preset, **options}
    missing = [k for k, p in init_params(cls).items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ValueError(
            f"regularizer {key!r} needs option(s) {missing}; e.g. build({key!r}, "
            + ", ".join(f"{k}=..." for k in missing)
            + ")"
        )
    reg = cls(**kwargs)
    if preset:
        reg.name = key  # instance-level: "cdan+e" vs "cdan" share a class
    return reg


def build_with_defaults(name: str, defaults: Mapping[str, Any], **options: Any) -> Regularizer:
    """:func:`build`, filling each option in ``defaults`` (e.g. ``in_features``, ``num_classes``
    known from the model) that the regularizer takes and ``options`` does not set."""
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key in REGULARIZERS:
        accepted = init_params(REGULARIZERS[key][0])
        options = {**{k: v for k, v in defaults.items() if k in accepted and v is not None}, **options}
    return build(name, **options)
