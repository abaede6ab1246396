"""Non-finite values in a training run: the one check per step, the weight check before a save, the message.

A loss or gradient norm that is NaN or inf means the update would poison the weights (every later
step, checkpoint and ``final/`` would hold NaN). The trainer checks each step with one host sync of one
flag (:func:`step_is_finite`) and, on a bad step, either stops with :class:`NonFiniteError` (``nan_policy:
stop``, the default) or skips the update and counts it (``nan_policy: skip``, stopping after
``max_skipped_steps_in_a_row``). Before a checkpoint or ``final/`` is written the trainable weights are
checked as well (:func:`count_nonfinite`): nothing non-finite is ever saved.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch


class NonFiniteError(RuntimeError):
    """A training step produced a NaN / inf loss or gradient norm, or the weights about to be saved are
    not finite. The message is one line naming the step, what was non-finite and the way out; ``step``
    is the optimizer step (1-based, as in ``metrics.jsonl``)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 parameters and gradients); a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def step_is_finite(
    losses: Mapping[str, Sequence[torch.Tensor]],
    grad_norm: torch.Tensor | None,
    grads: Iterable[torch.Tensor] | None,
) -> torch.Tensor:
    """A 0-dim bool tensor on the device: every logged loss of the step's micro-batches, the gradient
    norm (when clipping computed it) and, given ``grads`` (when it did not), every gradient are finite.
    No host sync: the caller reads it once (``bool(...)``) after combining it across processes."""
    flags = [torch.isfinite(torch.stack([v.detach().float() for vs in losses.values() for v in vs])).all()]
    if grad_norm is not None:
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        flags.append(torch.isfinite(torch.as_tensor(gn, device=flags[0].device)).all())
    if grads is not None:
        flags += [torch.isfinite(_local(g)).all() for g in grads]
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def describe_step(losses: Mapping[str, Sequence[torch.Tensor]], grad_norm: torch.Tensor | None) -> str:
    """What was non-finite in a bad step, e.g. ``the loss is nan (task loss nan, mmd 0.31)`` or ``the
    gradient norm is inf (loss 0.693)`` (host syncs: called only once the step is known to be bad)."""
    means = {k: sum(float(v) for v in vs) / len(vs) for k, vs in losses.items()}
    loss = means["task_loss"] + means.get("reg_loss", 0.0)
    parts = [f"task loss {means['task_loss']:.4g}"] + [
        f"{k[len('reg/') :]} {v:.4g}" for k, v in means.items() if k.startswith("reg/")
    ]
    if not math.isfinite(loss):
        return f"the loss is {loss:.4g} ({', '.join(parts)})"
    if grad_norm is not None and not math.isfinite(float(grad_norm)):
        return f"the gradient norm is {float(grad_norm):.4g} (loss {loss:.4g})"
    return f"a gradient is not finite (loss {loss:.4g})"


def way_out(config: Any) -> str:
    """The advice every non-finite message ends with."""
    clip = "" if config.max_grad_norm is not None else ", set training.max_grad_norm (now null)"
    return (
        f"lower training.learning_rate (now {config.learning_rate:g}){clip}, check the data and any "
        "regularizer weights for extreme values"
    )


def count_nonfinite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """How many entries of ``tensors`` are NaN or inf: a 0-dim int64 tensor (no host sync)."""
    counts = [(~torch.isfinite(_local(t).detach())).sum() for t in tensors]
    return torch.stack(counts).sum() if counts else torch.zeros((), dtype=torch.int64)


def nonfinite_names(named: Iterable[tuple[str, torch.Tensor]], limit: int = 3) -> list[str]:
    """Names of up to ``limit`` tensors holding a non-finite value (for the message)."""
    out = []
    for name, t in named:
        if not bool(torch.isfinite(_local(t).detach()).all()):
            out.append(name)
            if len(out) == limit:
                break
    return out
