"""The dataclass field that carries its help text: every config in peftadapt uses it."""

from __future__ import annotations

import dataclasses
from typing import Any


def field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with ``metadata["help"]``; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def help_of(cls: type) -> dict[str, str]:
    """{field name: help text} of a dataclass built with :func:`field`."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
