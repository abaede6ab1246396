"""Which batch a term's loss is computed on when several processes train together.

Under DDP / FSDP / DeepSpeed each process sees its own shard of every batch.
A per-sample loss (task cross-entropy, DANN, plain CDAN, entropy) is a mean
over samples, so the mean of the per-process means *is* the full-batch mean,
and the data-parallel gradient average already gives the full-batch gradient.
Batch statistics are different: MMD (kernel means over all pairs), CORAL
(covariances), CDAN+E (per-domain weight normalisation) and the diversity
term of ``Entropy(diversity=True)`` (the mean prediction) computed on a shard
are a *different* estimator from the one on the whole batch, and a noisier one.
Each regularizer says which it is (``Regularizer.batch_statistic``).

Scopes (``Term(..., scope=...)``, ``TrainConfig.align_scope``):

- ``"global"``: every process gathers the source / target features (and
  logits when the regularizer reads them) of all processes and computes the
  loss of the whole batch; the gradient reaches each process's own share
  (:func:`peftadapt.core.comm.gather` explains the gradient factor).
- ``"local"``: each process computes the loss on its own shard (cheaper: no
  communication, and O(b^2) instead of O((N b)^2) for MMD / CORAL).
- ``"auto"`` (default): ``"global"`` for a batch statistic, ``"local"`` for
  per-sample losses.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch

from ..core.comm import gather, is_distributed

__all__ = ["SCOPES", "Scope", "check_scope", "default_scope", "gather_inputs", "resolve_scope"]

Scope = Literal["auto", "local", "global"]
SCOPES: tuple[str, ...] = get_args(Scope)


def check_scope(scope: Any) -> str:
    """Validate a scope name; returns it."""
    if scope not in SCOPES:
        raise ValueError(
            f"unknown alignment scope {scope!r}; valid scopes: {list(SCOPES)} "
            "(global: loss over the whole batch of all processes; local: each process on its shard)"
        )
    return str(scope)


def default_scope(regularizer: Any) -> str:
    """``"global"`` if the regularizer's loss is a batch statistic (its ``batch_statistic``
    attribute; the shard loss is then a different estimator), ``"local"`` if it is a mean of
    per-sample losses (global == local). A module without the attribute counts as a batch
    statistic: global is always correct, local the cheaper approximation you opt into."""
    return "global" if bool(getattr(regularizer, "batch_statistic", True)) else "local"


def resolve_scope(scope: str, regularizer: Any) -> str:
    """``"local"`` or ``"global"`` for a term's scope (``"auto"`` -> :func:`default_scope`)."""
    check_scope(scope)
    return default_scope(regularizer) if scope == "auto" else scope


def gather_inputs(
    scope: str,
    regularizer: Any,
    fs: torch.Tensor,
    ft: torch.Tensor,
    ls: torch.Tensor | None = None,
    lt: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The regularizer's inputs under ``scope``: unchanged for local (or one process),
    gathered over all processes for global. Logits are gathered only when the regularizer
    reads them."""
    if not is_distributed() or resolve_scope(scope, regularizer) == "local":
        return fs, ft, ls, lt
    fs, ft = gather(fs), gather(ft)
    if getattr(regularizer, "needs_logits", False):
        ls = None if ls is None else gather(ls)
        lt = None if lt is None else gather(lt)
    return fs, ft, ls, lt
