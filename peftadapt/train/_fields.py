"""Type and choice checks for the config dataclasses, read from their annotations.

Every run-file section is a dataclass whose annotations are its schema:
``int``, ``float``, ``bool``, ``str``, ``Literal[...]`` choices, ``X | None``,
``list[X]``, ``dict[str, X]`` and nested config dataclasses. One checker reads
them, so a new field needs no validation code of its own, and every message
names the key, the value and what was expected.

Coercions (the only ones): an int where a float is expected becomes a float;
a string that parses as a number where a float is expected becomes that float
(YAML 1.1 reads ``1e-3`` as a string: it wants ``1.0e-3``); a single value
where a list is expected becomes a one-item list. A float must be finite:
``.inf`` / ``.nan`` are refused, as nothing a run file sets means them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

REQUIRED = dataclasses.MISSING  # field(REQUIRED, "help"): a key the run file must give


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a dataclass (cached: read on every construction)."""
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType)


def choices(tp: Any) -> tuple | None:
    """The allowed values of a ``Literal`` annotation (also inside ``X | None``), else None."""
    if get_origin(tp) is Literal:
        return get_args(tp)
    if _is_union(tp):
        for a in get_args(tp):
            if get_origin(a) is Literal:
                return get_args(a)
    return None


def describe(tp: Any) -> str:
    """A readable name of an annotation, for errors and ``peftadapt config --schema``."""
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if _is_union(tp):
        return " | ".join(describe(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {describe(get_args(tp)[0])}"
    if get_origin(tp) is dict:
        return f"mapping of {describe(get_args(tp)[0])} to {describe(get_args(tp)[1])}"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        short = getattr(tp, "_shorthand", None)
        return "mapping" + (f" or {short}" if short else "")
    return "any" if tp is Any else getattr(tp, "__name__", str(tp))


class UnknownKeyError(ValueError, TypeError):
    """An unknown key or keyword: a ValueError (a bad run file) and a TypeError (a bad keyword
    argument, what Python raises for one), so either ``except`` catches it."""


def unknown_key(key: str, where: str, valid: list[str], renamed: Mapping[str, str] | None = None) -> UnknownKeyError:
    """``unknown key training.lr; did you mean learning_rate? (valid keys in training: [...])``."""
    new = (renamed or {}).get(key)
    close = [new] if new else difflib.get_close_matches(str(key), valid, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    why = "renamed; " if new else ""
    return UnknownKeyError(f"unknown key {where}.{key}{hint} ({why}valid keys in {where}: {valid})")


def checked_keywords(cls: type) -> type:
    """Class decorator for a config dataclass built from Python: an unknown keyword
    (``TrainConfig(lerning_rate=...)``) gets :func:`unknown_key`'s did-you-mean and the valid
    names instead of the dataclass's bare TypeError."""
    init = cls.__init__  # type: ignore[misc]  # the dataclass's generated __init__, wrapped below
    valid = [f.name for f in dataclasses.fields(cls)]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_keys(kwargs, valid, getattr(cls, "_where", cls.__name__), getattr(cls, "_renamed", None))
        init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]  # replacing the generated __init__ is the point
    return cls


def check_keys(raw: Mapping[str, Any], valid: list[str], where: str, renamed: Mapping[str, str] | None = None) -> None:
    for key in raw:
        if key not in valid:
            raise unknown_key(key, where, valid, renamed)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the annotation ``tp`` (and coerced, see the module doc)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        errors = []
        for a in args:
            try:
                return coerce(value, a, key)
            except ValueError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: X's own message (it names the choices)
            raise errors[0]
        for a, err in zip(args, errors, strict=True):  # `X | list[X]`: the message of the form the value has
            shaped = get_origin(a) is list if isinstance(value, (list, tuple)) else dataclasses.is_dataclass(a)
            if shaped and isinstance(value, (Mapping, list, tuple)):
                raise err
        raise ValueError(f"{key}: expected {describe(tp)}, got {value!r}")
    if get_origin(tp) is Literal:
        if value not in get_args(tp) or isinstance(value, bool) != any(isinstance(a, bool) for a in get_args(tp)):
            raise ValueError(f"{key}: {value!r} is not allowed; allowed values: {list(get_args(tp))}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # an annotation: a class
        if isinstance(value, tp):
            check_fields(value, key)
            return value
        return build(tp, value, key)
    if get_origin(tp) is list:
        items = value if isinstance(value, (list, tuple)) else [value]
        return [coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if get_origin(tp) is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # not a number: the type error below names it
            value = float(value)
    ok = (isinstance(value, tp) and not (isinstance(value, bool) and tp is not bool)) or (
        tp is float and isinstance(value, int) and not isinstance(value, bool)
    )
    if not ok:
        raise ValueError(f"{key}: expected {describe(tp)}, got {value!r}")
    if tp is float:
        number = float(value) if isinstance(value, float) or abs(value) < 2**1023 else math.inf
        if not math.isfinite(number):  # YAML's .inf / .nan, or an int past float range: no setting means them
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return number
    return value


def check_fields(obj: Any, where: str) -> None:
    """Check (and coerce in place) every field of a config dataclass, then run its
    ``validate(where)`` (the checks that types cannot say: ranges, cross-field rules)."""
    cls: type = type(obj)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        new = coerce(value, hints(cls)[f.name], f"{where}.{f.name}" if where else f.name)
        if new is not value:
            object.__setattr__(obj, f.name, new)
    if hasattr(obj, "validate"):
        obj.validate(where)


def build(cls: type, raw: Any, where: str) -> Any:
    """A config dataclass from a parsed mapping: unknown keys (with the closest valid
    name), missing required keys (with their help), then every value's type.

    Class hooks: ``_shorthand`` names the field a bare scalar fills (``source: x.csv``
    is ``source: {path: x.csv}``); ``_extra`` names a dict field that collects keys
    the class does not know (a method's or regularizer's own options, checked by
    its ``validate``); ``_renamed`` maps old key names to new ones for the error.
    """
    shorthand, extra = getattr(cls, "_shorthand", None), getattr(cls, "_extra", None)
    if shorthand and not isinstance(raw, Mapping) and raw is not None:
        raw = {shorthand: raw}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    if extra:
        kwargs[extra] = {k: v for k, v in raw.items() if k not in fields or k == extra}
        raw = {k: v for k, v in raw.items() if k in fields and k != extra}
    check_keys(raw, list(fields), where, getattr(cls, "_renamed", None))
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = raw[name]
        elif f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ValueError(f"{where}.{name} is required: {f.metadata.get('help', '')}")
    if not hasattr(cls, "__post_init__"):  # sections check themselves on construction
        obj = cls(**kwargs)
        check_fields(obj, where)
        return obj
    return cls(**kwargs)


def as_dict(obj: Any) -> Any:
    """A config dataclass as plain data, the way a run file writes it (``_extra``
    options flattened back next to the fixed keys)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        extra = getattr(obj, "_extra", None)
        if extra:
            out.update(out.pop(extra))
        return out
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj
