"""Atomic writes: a temp file in the same folder, then a rename; a killed write leaves no half file.
Also the check that an output folder can be written before a run starts.

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


def json_text(obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> str:
    """``obj`` as strict JSON text: non-finite floats become ``null`` (:func:`json_safe`), and
    ``allow_nan=False`` makes anything else non-finite an error instead of ``NaN`` in the text.
    Every JSON that peftadapt writes or prints goes through here."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False, **dumps_kwargs)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically; non-finite floats become ``null`` (see :func:`json_safe`)."""
    text = json_text(obj)  # before the temp file: a bad object writes nothing

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)


def check_writable_dir(path: str | os.PathLike[str], key: str) -> None:
    """ValueError (one line naming ``key`` and the path) unless ``path`` is a folder this process
    can write in, or can be created: checked by writing a probe file in it (or in its nearest
    existing parent), which also catches a read-only filesystem and a full disk (``os.access``
    does not, for root). Creates nothing."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"{key}: {str(path)!r} is a file, not a folder; choose another {key}")
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{key}: {str(path)!r} cannot be created: {str(probe)!r} is a file; choose another {key}")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".peftadapt-write-test-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        where = "" if probe == p else f" (its nearest existing parent {str(probe)!r})"
        raise ValueError(
            f"{key}: cannot write in {str(path)!r}{where}: {e.strerror or e}; choose a writable {key}"
        ) from None
