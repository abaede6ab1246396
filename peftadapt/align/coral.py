"""Deep CORAL: correlation alignment (Sun & Saenko 2016)."""

from __future__ import annotations

import math

from .numerics import full_precision, stat_dtype
from .registry import register
from .regularizer import Regularizer


@register("coral")
class CORAL(Regularizer):
    r"""CORAL loss of Deep CORAL (Sun & Saenko, ECCV-W 2016, eq. 1):

        L = scale * || C_s - C_t ||_F^2,      scale = 1 / (4 d^2) by default

    with the unbiased covariances C = Xc^T Xc / (n - 1) of the centred features
    Xc = X - mean(X) (the paper's eq. 2-3). No mean term: the paper aligns
    second-order statistics only.

    Computed without any d x d matrix. With centred X_s (m x d), X_t (n x d):

        ||C_s - C_t||_F^2 = ||X_s X_s^T||_F^2 / (m-1)^2 + ||X_t X_t^T||_F^2 / (n-1)^2
                            - 2 ||X_s X_t^T||_F^2 / ((m-1)(n-1))

    since ||A^T A||_F^2 = ||A A^T||_F^2 and <A^T A, B^T B>_F = ||A B^T||_F^2. Memory
    is O((m + n)^2) beyond the inputs, so it stays flat at LLM widths
    (d = 4096 to 8192) where C would be 64 to 256 MiB per matrix in fp32.
    The expansion cancels when C_s ~ C_t; the result is clamped at 0 (the true
    value is >= 0) and computed in fp32 at least, with autocast off.

    Args:
        scale: multiplier of the squared Frobenius norm; ``None`` (default)
            means the paper's 1 / (4 d^2).

    Inputs: ``source_features (B_s, d)``, ``target_features (B_t, d)``, B >= 2 per
    domain (the unbiased covariance divides by n - 1); logits unused.

    Example::

        coral = CORAL()                  # or peftadapt.align.build("coral")
        loss = coral(torch.randn(16, 4096), 2.0 * torch.randn(16, 4096))
    """

    min_batch = 2
    batch_statistic = True  # covariances of the batch

    def __init__(self, scale: float | None = None) -> None:
        super().__init__()
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf
        ):
            raise ValueError(f"CORAL scale must be a finite positive number or None (paper: 1/(4 d^2)), got {scale!r}")
        self.scale = None if scale is None else float(scale)

    def _min_batch_reason(self) -> str:
        return " (the unbiased covariance divides by n - 1)"

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        fs, ft = self.check_features(source_features, target_features)
        dt = stat_dtype(fs)
        d = fs.shape[1]
        with full_precision(fs):
            xs = fs.to(dt)
            xt = ft.to(dt)
            xs = xs - xs.mean(0, keepdim=True)
            xt = xt - xt.mean(0, keepdim=True)
            m1, n1 = xs.shape[0] - 1, xt.shape[0] - 1
            ss = (xs @ xs.T).pow(2).sum() / (m1 * m1)
            tt = (xt @ xt.T).pow(2).sum() / (n1 * n1)
            st = (xs @ xt.T).pow(2).sum() / (m1 * n1)
            fro2 = (ss + tt - 2.0 * st).clamp_min(0.0)
            scale = self.scale if self.scale is not None else 1.0 / (4.0 * d * d)
            return fro2 * scale

    def extra_repr(self) -> str:
        return f"scale={'1/(4 d^2)' if self.scale is None else self.scale}"
