"""The regularizer interface: what every alignment loss ``D`` is and checks.

A regularizer ``D`` is an ``nn.Module`` whose forward takes source features
``(B_s, d)``, target features ``(B_t, d)`` and, where the method needs them,
source / target logits ``(B, C)``, and returns a scalar loss. Training
minimises

    L_task(source) + sum_k  w_k(p) * D_k(f_s, f_t, g_s, g_t)

where ``p`` in [0, 1] is the training progress and ``w_k(p)`` the term's
weight schedule (:class:`Term`); :class:`Alignment` holds the sum.

Writing your own (a few lines)::

    import peftadapt

    @peftadapt.align.register("mean_l2")
    class MeanL2(peftadapt.align.Regularizer):
        '''||mean(f_s) - mean(f_t)||^2.'''
        def forward(self, source_features, target_features,
                    source_logits=None, target_logits=None):
            fs, ft = self.check_features(source_features, target_features)
            return (fs.mean(0) - ft.mean(0)).pow(2).sum()

    reg = peftadapt.align.build("mean_l2")

A plain function ``f(fs, ft, source_logits=None, target_logits=None)`` can be
registered the same way; it is wrapped into a :class:`Regularizer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .numerics import check_progress

__all__ = ["FunctionRegularizer", "Regularizer"]


class Regularizer(nn.Module):
    """Base class of every alignment regularizer.

    Subclasses implement ``forward(source_features, target_features,
    source_logits=None, target_logits=None) -> scalar tensor`` and call
    :meth:`check_features` / :meth:`check_logits` first so bad input is a
    ``ValueError`` that names the problem.

    Class attributes:
        name: registry name (set by :func:`register`).
        needs_logits: whether forward needs ``source_logits``/``target_logits``.
        needs_lm_loss: whether forward needs ``target_lm_loss``, the causal LM's own next-token
            loss on the target batch (``target_lm``), which :class:`DomainAdaptation` computes.
        min_batch: the smallest batch per domain the estimator is defined for.
        check_finite: reject NaN/inf features (one device sync per call;
            set to False on an instance to skip the check).
        batch_statistic: whether the loss is a statistic of the whole batch (MMD's kernel
            means, CORAL's covariances) rather than a mean of per-sample losses (DANN's
            BCE). With several processes a batch statistic computed on one process's shard
            is a different estimator, so ``scope="auto"`` gathers the global batch for it
            (see :mod:`peftadapt.align.scope`). The safe default is True; a subclass
            whose loss is a mean of per-sample terms says False.
    """

    name: str = "regularizer"
    needs_logits: bool = False
    needs_lm_loss: bool = False
    min_batch: int = 1
    check_finite: bool = True
    batch_statistic: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.progress = 0.0

    # -- training progress ---------------------------------------------------
    def set_progress(self, p: float) -> None:
        """Tell the regularizer how far training is (p in [0, 1]). No-op by default
        apart from storing ``self.progress``; DANN/CDAN ramp their GRL coefficient with it."""
        self.progress = check_progress(p)

    @property
    def has_parameters(self) -> bool:
        """True if this regularizer has trainable parameters (a discriminator) that
        the trainer must put in an optimizer (``self.parameters()``)."""
        return any(p.requires_grad for p in self.parameters())

    # -- input checks --------------------------------------------------------
    def _label(self) -> str:
        return type(self).__name__

    def _check_one(self, x: Any, what: str, min_batch: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._label()}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self._label()}: {what} must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() != 2:
            raise ValueError(
                f"{self._label()}: {what} must be 2-D (batch, width), got shape {tuple(x.shape)}"
                + ("; pool token features first (peftadapt.FeatureTap)" if x.dim() == 3 else "")
            )
        if x.shape[0] == 0:
            raise ValueError(f"{self._label()}: {what} is an empty batch (shape {tuple(x.shape)})")
        if x.shape[0] < min_batch:
            raise ValueError(
                f"{self._label()}: {what} has batch size {x.shape[0]}, but this estimator needs at "
                f"least {min_batch} samples per domain{self._min_batch_reason()}"
            )
        if x.shape[1] == 0:
            raise ValueError(f"{self._label()}: {what} has width 0 (shape {tuple(x.shape)})")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(torch.isinf(x).sum())
            raise ValueError(f"{self._label()}: {what} contains non-finite values ({n_nan} NaN, {n_inf} inf)")
        return x

    def _min_batch_reason(self) -> str:
        return ""

    def check_features(self, source_features: Any, target_features: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate the two feature batches; returns them unchanged."""
        fs = self._check_one(source_features, "source_features", self.min_batch)
        ft = self._check_one(target_features, "target_features", self.min_batch)
        if fs.shape[1] != ft.shape[1]:
            raise ValueError(
                f"{self._label()}: source features have width {fs.shape[1]} but target features "
                f"have width {ft.shape[1]}; both domains must come from the same layer"
            )
        return fs, ft

    def check_logits(self, logits: Any, what: str, batch: int | None, num_classes: int | None) -> torch.Tensor:
        """Validate a logits batch: present, 2-D, matching batch size and class count."""
        if logits is None:
            raise ValueError(
                f"{self._label()} needs {what} (the classifier's logits, shape (batch, num_classes)); got None"
            )
        x = self._check_one(logits, what, 1)
        if batch is not None and x.shape[0] != batch:
            raise ValueError(
                f"{self._label()}: {what} has batch size {x.shape[0]} but the matching features have {batch}"
            )
        if num_classes is not None and x.shape[1] != num_classes:
            raise ValueError(
                f"{self._label()}: {what} has {x.shape[1]} classes but this regularizer was built "
                f"with num_classes={num_classes}"
            )
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class FunctionRegularizer(Regularizer):
    """A registered plain function, wrapped."""

    fn: Callable[..., torch.Tensor]

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        fs, ft = self.check_features(source_features, target_features)
        out = type(self).fn(fs, ft, source_logits=source_logits, target_logits=target_logits)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise TypeError(f"regularizer {self.name!r} must return a scalar tensor, got {out!r:.80}")
        return out
