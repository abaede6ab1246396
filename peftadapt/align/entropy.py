"""Target entropy minimisation (Grandvalet & Bengio 2005), optionally with a diversity term."""

from __future__ import annotations

import math

import torch

from .numerics import full_precision, stat_dtype
from .registry import register
from .regularizer import Regularizer


@register("entropy")
class Entropy(Regularizer):
    r"""Mean prediction entropy on the target batch (Grandvalet & Bengio, NeurIPS 2005):

        L = 1/n sum_j H(g_j),      g_j = softmax(target_logits_j),  H(g) = -sum_c g_c log g_c

    With ``diversity=True`` it is the information-maximisation loss (Shi & Sha
    2012; Hu et al. 2017; SHOT, Liang et al. 2020): confident per sample, yet
    spread over classes on the batch, which stops the collapse onto one class
    that plain entropy minimisation invites:

        L = 1/n sum_j H(g_j) - diversity_weight * H( 1/n sum_j g_j )

    The diversity term makes L negative (down to -log C), which is expected.

    Args:
        diversity: add the diversity (minus entropy of the mean prediction) term.
        diversity_weight: its weight (1 in the information-maximisation loss).
        num_classes: if given, the logits' class count is checked against it.

    Inputs: ``target_logits (B_t, C)`` (required); features and source logits are
    not used (features are still checked when given, for a consistent interface).
    Computed from log-softmax in fp32 at least, autocast off. Logits more than
    ``-2 log(tiny)`` (175 in fp32) below their row's maximum are clamped there first:
    their probability underflows to exactly 0 either way, so the loss is unchanged,
    and finite logits spanning more than the dtype's range (``[-3e38, 3e38]``)
    give a finite loss and gradient instead of ``0 * -inf = NaN``.

    Example::

        ent = Entropy(diversity=True)
        loss = ent(f_s, f_t, target_logits=logits_t)
    """

    needs_logits = True

    @property
    def batch_statistic(self) -> bool:  # type: ignore[override]  # per instance; the base's class attribute is never assigned
        """The diversity term (entropy of the mean prediction) is a batch statistic; the mean
        per-sample entropy alone is not."""
        return bool(self.diversity)

    def __init__(self, diversity: bool = False, diversity_weight: float = 1.0, num_classes: int | None = None) -> None:
        super().__init__()
        if not isinstance(diversity, bool):
            raise ValueError(f"diversity must be True or False, got {diversity!r}")
        if (
            isinstance(diversity_weight, bool)
            or not isinstance(diversity_weight, (int, float))
            or not 0 <= diversity_weight < math.inf
        ):
            raise ValueError(f"diversity_weight must be a finite number >= 0, got {diversity_weight!r}")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        self.diversity = diversity
        self.diversity_weight = float(diversity_weight)
        self.num_classes = num_classes

    def forward(self, source_features=None, target_features=None, source_logits=None, target_logits=None):
        batch = None
        if source_features is not None and target_features is not None:
            _, ft = self.check_features(source_features, target_features)
            batch = ft.shape[0]
        lt = self.check_logits(target_logits, "target_logits", batch, self.num_classes)
        with full_precision(lt):
            logp = torch.log_softmax(_bounded_logits(lt.to(stat_dtype(lt))), dim=1)
            p = logp.exp()
            loss = -(p * logp).sum(1).mean()
            if self.diversity:
                mean_p = p.mean(0)
                h_mean = -(mean_p * torch.log(mean_p.clamp_min(torch.finfo(mean_p.dtype).tiny))).sum()
                loss = loss - self.diversity_weight * h_mean
            return loss

    def extra_repr(self) -> str:
        return f"diversity={self.diversity}, diversity_weight={self.diversity_weight}, num_classes={self.num_classes}"


def _bounded_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits shifted so each row's maximum is 0 and clamped below at ``2 log(tiny)``: the same
    softmax (a class clamped there has probability exactly 0 before and after) without ``x - max``
    overflowing to -inf; the clamped entries get gradient 0, which is their true gradient in this dtype.
    The maximum is detached: log-softmax does not depend on the shift."""
    shifted = logits - logits.max(dim=1, keepdim=True).values.detach()
    return shifted.clamp_min(2.0 * math.log(torch.finfo(logits.dtype).tiny))
