"""Atomic writes: a temp file in the same folder, then a rename; a killed write leaves no half file.

JSON is always valid JSON: a non-finite float (NaN, inf), which ``json.dump`` would write as the
non-standard ``NaN`` / ``Infinity`` that strict readers reject, is written as ``null``
(:func:`json_safe`), and the writer runs with ``allow_nan=False`` so nothing else slips through.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` to a temp file in ``path``'s folder, fsync, then rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, +-inf, in nested dicts, lists and tuples) replaced by
    None, so ``json.dumps(json_safe(obj), allow_nan=False)`` cannot fail on a number: JSON has no NaN
    and ``null`` is what every reader understands ("no finite value")."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; non-finite floats become ``null`` (see :func:`json_safe`)."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False)  # before the temp file: a bad object writes nothing

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)
