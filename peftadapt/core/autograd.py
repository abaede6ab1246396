"""The one gradient-scaling autograd op: gradient reversal (DANN) and the global-batch gather."""

from __future__ import annotations

from typing import Any

import torch


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass
    (gradient reversal: a negative factor; the global-batch gather: the world size)."""
    out: torch.Tensor = _ScaleGrad.apply(x, float(factor))
    return out
