"""Numerics every regularizer shares: statistics in fp32 at least, autocast off, progress checked."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

__all__ = ["check_progress", "full_precision", "stat_dtype"]


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics run in at least fp32: bf16/fp16 sums of squares overflow or lose all precision."""
    return torch.promote_types(x.dtype, torch.float32)


@contextlib.contextmanager
def full_precision(*tensors: torch.Tensor) -> Iterator[None]:
    """Disable autocast for the enclosed block (on the tensors' device type).

    Under ``torch.autocast`` a matmul would silently run in bf16 again even
    after we upcast the inputs; the statistics must stay in fp32.
    """
    device_type = tensors[0].device.type if tensors else "cpu"
    ctx: contextlib.AbstractContextManager[object]
    try:
        ctx = torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def check_progress(p: object) -> float:
    """``p`` as a float in [0, 1] (the fraction of training done, ``step / total_steps``);
    a ValueError for anything else (a bool or a string is not a progress)."""
    value = None
    if not isinstance(p, (bool, str)):
        try:
            value = float(p)  # type: ignore[arg-type]  # any object: float() raising is the check
        except (TypeError, ValueError):
            value = None
    if value is None or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"progress must be in [0, 1] (the fraction of training done, step / total_steps), got {p!r}")
    return value
