"""The one gradient-scaling autograd op (gradient reversal (DANN), the global-batch gather), and running a
model with other tensors in place of its parameters (ADDA's source adapter, MLDG's meta-test step)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn


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


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, values: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Run ``model`` with other tensors in place of some of its parameters, for the duration of the block.

    ``values`` maps ``id(parameter)`` to the tensor to use instead (a frozen snapshot, or a tensor with a
    graph such as ``theta - alpha * grad``: gradients then flow through it). Like
    ``torch.func.functional_call``, which we do not use: on a model that reaches one submodule by two
    paths (a wrapper keeping ``self.net = wrap(hf)`` and ``self.hf = base_model(self.net)``) torch 2.x
    leaves the replacement in the model after the call and computes with the wrong weights. Here every
    module is visited once, its parameter entries swapped and put back (ADDA's source adapter, MLDG's
    meta-test step)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():  # each module object once, however many paths reach it
            for leaf, p in list(module._parameters.items()):
                if p is not None and id(p) in values:
                    module._parameters[leaf] = values[id(p)]  # type: ignore[assignment]
                    swapped.append((module, leaf, p))
        yield
    finally:
        for module, leaf, p in reversed(swapped):
            module._parameters[leaf] = p
