"""Process-group primitives: world size and rank, a gather that carries gradients, and the
replicated-module helpers (broadcast, gradient averaging). Outside a multi-process run every
function is a no-op, so single-process code calls them unconditionally.

The gradient factor of :func:`gather`. With N processes, process r holds features f_r of its
shard; the loss of the whole batch is L(f_1, ..., f_N). :func:`gather` returns the
concatenation where slot r is the local tensor (autograd flows into it) and the other slots
are constants received from the other processes. So the backward pass on process r yields
only dL/df_r * df_r/dtheta. Data-parallel training then *averages* the parameter gradients
over the N processes:

    (1/N) sum_r  c * dL/df_r * df_r/dtheta   must equal   dL/dtheta = sum_r dL/df_r * df_r/dtheta

hence c = N: :func:`gather` multiplies the gradient of the local slot by N (the loss *value*
is left unchanged, so logged values are the full-batch loss). Parameters the loss touches
directly (a DANN / CDAN discriminator replicated on every process) get the full gradient
dL/dtheta_D on every process already, whose average is dL/dtheta_D: no factor there, which is
why the factor lives in the gather's backward and not on the loss. This is exact when every
process computes the same L (deterministic regularizers: MMD, CORAL, and DANN / CDAN with
``dropout=0``); with a dropout discriminator each process draws its own mask and the result
is an unbiased estimate of the same gradient.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .autograd import scale_grad

__all__ = [
    "all_gather_fixed",
    "average_gradients",
    "broadcast_parameters",
    "gather",
    "is_distributed",
    "rank",
    "world_size",
]


# ---------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------
def is_distributed() -> bool:
    """True inside an initialized process group with more than one process."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def all_gather_fixed(x: torch.Tensor) -> list[torch.Tensor]:
    """all_gather of same-shape tensors; no autograd."""
    out = [torch.empty_like(x) for _ in range(world_size())]
    torch.distributed.all_gather(out, x.contiguous())
    return out


# ---------------------------------------------------------------------------
# Gather with gradient
# ---------------------------------------------------------------------------
def gather(x: torch.Tensor, *, grad_factor: float | None = None) -> torch.Tensor:
    """Concatenate ``x`` (shape ``(b_r, ...)``) of every process along dim 0, in rank order.

    Slot r of the result is this process's own ``x`` (autograd flows into it);
    the other slots are received constants. In backward the local gradient is
    multiplied by ``grad_factor``, by default the world size N: data-parallel
    training averages gradients over the N processes, and N * (1/N) = 1 makes
    the averaged gradient equal the gradient of the loss on the whole batch
    (module docstring). Pass ``grad_factor=1`` where gradients are summed
    rather than averaged.

    Processes may hold different batch sizes (the last, smaller batch of an
    epoch): the sizes are exchanged first and the tensors padded for the
    collective. Outside a multi-process run this returns ``x`` unchanged.
    """
    if not is_distributed():
        return x
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(
            f"gather needs a tensor with a batch dimension, got {type(x).__name__}"
            + (f" of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else "")
        )
    n, r = world_size(), rank()
    sizes = [int(s) for s in all_gather_fixed(torch.tensor([x.shape[0]], device=x.device, dtype=torch.long))]
    top = max(sizes)
    send = x.detach()
    if send.shape[0] < top:  # pad to the largest shard: all_gather moves equal shapes
        send = torch.cat([send, send.new_zeros((top - send.shape[0], *send.shape[1:]))], 0)
    parts = [p[:s] for p, s in zip(all_gather_fixed(send), sizes, strict=True)]
    factor = float(n if grad_factor is None else grad_factor)
    parts[r] = scale_grad(x, factor) if x.requires_grad else x
    return torch.cat(parts, 0)


# ---------------------------------------------------------------------------
# The alignment module's parameters (discriminators): replicated, averaged by hand
# ---------------------------------------------------------------------------
def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from process ``src`` to all (what DDP does
    when it wraps a module), so every process starts from the same discriminator."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src)


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over the processes (DDP's average).

    Used for the alignment module (DANN / CDAN discriminators) instead of wrapping
    it in DDP: a parameter without a gradient on a process (a term that is still
    off, ``Term(start=...)``) counts as a zero gradient there, where DDP without
    ``find_unused_parameters`` would stop with an error; a parameter without a
    gradient on every process keeps ``grad=None`` (the optimizer skips it, as in
    one process). One all_reduce per dtype: the gradients and a has-gradient flag
    per parameter travel in one flat buffer. Every process must call it with the
    same parameters in the same order.
    """
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    n = world_size()
    for dtype in sorted(by_dtype, key=str):  # the same order on every process
        ps = by_dtype[dtype]
        device = ps[0].device
        parts = [
            (p.grad.detach().reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device))
            for p in ps
        ]
        flags = torch.tensor([float(p.grad is not None) for p in ps], dtype=dtype, device=device)
        buf = torch.cat([*parts, flags])
        torch.distributed.all_reduce(buf)
        buf /= n
        offset = 0
        for i, p in enumerate(ps):
            g = buf[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
            if float(buf[-len(ps) + i]) == 0:  # no process had a gradient
                p.grad = None
            elif p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
