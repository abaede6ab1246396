"""Multi-kernel maximum mean discrepancy (Gretton et al. 2012; DAN, Long et al. 2015)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .numerics import full_precision, stat_dtype
from .registry import register
from .regularizer import Regularizer

_ESTIMATORS = ("unbiased", "linear")
_BANDWIDTHS = ("mean", "median")


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances ||a_i - b_j||^2 via the Gram expansion (clamped at 0)."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
    return d.clamp_min(0.0)


@register("mmd")
class MMD(Regularizer):
    r"""Squared multi-kernel MMD between source and target features.

    Kernel (a sum of Gaussians, equal weights, as DAN's code):

        k(x, y) = sum_m exp(-||x - y||^2 / (c_m * h))

    with multipliers ``c_m`` (default 1/4, 1/2, 1, 2, 4: DAN's kernel_mul=2,
    kernel_num=5 around the base) and base bandwidth ``h`` set from the batch,
    detached: the mean (``"mean"``) or median (``"median"``) squared distance
    over the distinct pairs of the pooled batch Z = [X_s; X_t]; or a fixed
    float. A batch-derived ``h`` is floored at ``eps * mean_i ||z_i||^2`` (``eps``
    the dtype's machine epsilon, ``z`` the pooled features): distances below the
    features' own rounding are not resolved. Identical features (``h = 0``) then
    give loss 0 and gradient 0 instead of ``1 / h`` overflowing.

    Estimators (Gretton et al. 2012, JMLR 13, eq. 3 and Lemma 14):

    - ``"unbiased"`` (quadratic time, B_s != B_t allowed, needs >= 2 per domain):

          MMD_u^2 = 1/(m(m-1)) sum_{i!=j} k(x_i,x_j) + 1/(n(n-1)) sum_{i!=j} k(y_i,y_j)
                    - 2/(mn) sum_{i,j} k(x_i,y_j)

    - ``"linear"`` (linear time, needs B_s == B_t >= 2; uses m2 = floor(m/2) pairs):

          MMD_l^2 = 1/m2 sum_i [k(x_{2i-1},x_{2i}) + k(y_{2i-1},y_{2i})
                                - k(x_{2i-1},y_{2i}) - k(x_{2i},y_{2i-1})]

    Both are unbiased, so they can be slightly negative on finite batches when
    the distributions match; they are 0 in expectation then.

    Inputs: ``source_features (B_s, d)``, ``target_features (B_t, d)``; logits unused.
    Output: scalar. Statistics are computed in fp32 (or fp64 for fp64 input) with
    autocast off.

    Example::

        mmd = MMD()                      # or peftadapt.align.build("mmd")
        loss = mmd(torch.randn(16, 384), torch.randn(16, 384) + 1.0)
    """

    min_batch = 2
    batch_statistic = True  # kernel means over all pairs of the batch

    def __init__(
        self,
        kernel_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        bandwidth: str | float = "mean",
        estimator: str = "unbiased",
    ) -> None:
        super().__init__()
        mults = tuple(float(c) for c in kernel_multipliers)
        if not mults or any(not (0 < c < math.inf) for c in mults):
            raise ValueError(
                f"kernel_multipliers must be a non-empty list of finite positive numbers, got {kernel_multipliers!r}"
            )
        if isinstance(bandwidth, str):
            if bandwidth not in _BANDWIDTHS:
                raise ValueError(f"unknown bandwidth {bandwidth!r}; valid: {list(_BANDWIDTHS)} or a positive float")
        elif isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not 0 < bandwidth < math.inf:
            raise ValueError(f"bandwidth must be {list(_BANDWIDTHS)} or a finite positive float, got {bandwidth!r}")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {list(_ESTIMATORS)}")
        self.kernel_multipliers = mults
        self.bandwidth = bandwidth if isinstance(bandwidth, str) else float(bandwidth)
        self.estimator = estimator

    def _min_batch_reason(self) -> str:
        return " (the unbiased and linear MMD estimators use pairs of distinct samples)"

    def _base_bandwidth(self, z: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """h from the pooled batch z (N, d), detached; ``scale``: the mean squared norm of the features
        before they were mean-shifted (the floor's reference; default: z's own)."""
        if not isinstance(self.bandwidth, str):
            return torch.tensor(self.bandwidth, dtype=z.dtype, device=z.device)
        z = z.detach()
        n = z.shape[0]
        if scale is None:
            scale = z.pow(2).sum(1).mean()
        if self.bandwidth == "mean":
            # sum_{i,j} ||z_i - z_j||^2 = 2n sum_i ||z_i - mean||^2: O(N d), no N x N matrix, no cancellation.
            total = 2.0 * n * (z - z.mean(0, keepdim=True)).pow(2).sum()
            h = total / (n * (n - 1))
        else:
            d = _sq_dists(z, z)
            off = ~torch.eye(n, dtype=torch.bool, device=z.device)
            h = d[off].median()
        # Identical points give h = 0; any positive h then yields k = 1 everywhere (loss 0), but the
        # gradient has a 1/h factor: at finfo.tiny it overflows to inf and inf * 0 = NaN. A floor at the
        # features' rounding level (relative to their scale) keeps 1/h finite and the gradient ~0 there;
        # sqrt(tiny) covers all-zero features.
        fi = torch.finfo(z.dtype)
        return torch.maximum(h, (fi.eps * scale).clamp_min(fi.tiny**0.5))

    def _kernel(self, sq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = torch.exp(-sq / (self.kernel_multipliers[0] * h))  # kernel_multipliers is non-empty (checked)
        for c in self.kernel_multipliers[1:]:
            out = out + torch.exp(-sq / (c * h))
        return out

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        fs, ft = self.check_features(source_features, target_features)
        if self.estimator == "linear" and fs.shape[0] != ft.shape[0]:
            raise ValueError(
                f"MMD(estimator='linear') needs equal batch sizes, got source {fs.shape[0]} and target "
                f"{ft.shape[0]}; use estimator='unbiased' for unequal batches"
            )
        dt = stat_dtype(fs)
        with full_precision(fs):
            x, y = fs.to(dt), ft.to(dt)
            # Distances are translation invariant: shift by the pooled mean (a constant, so the
            # gradient is unchanged) so the Gram-expansion distances do not cancel in fp32 when
            # features share a large offset (common in LLM hidden states).
            pooled = torch.cat([x, y], 0).detach()
            shift = pooled.mean(0, keepdim=True)
            x, y = x - shift, y - shift
            h = self._base_bandwidth(torch.cat([x, y], 0), pooled.pow(2).sum(1).mean())
            if self.estimator == "unbiased":
                return self._unbiased(x, y, h)
            return self._linear(x, y, h)

    def _unbiased(self, x, y, h):
        m, n = x.shape[0], y.shape[0]
        kxx = self._kernel(_sq_dists(x, x), h)
        kyy = self._kernel(_sq_dists(y, y), h)
        kxy = self._kernel(_sq_dists(x, y), h)
        # Off-diagonal sums: subtract the trace (k(x, x) = number of kernels exactly in theory;
        # the trace of the computed matrix is used so rounding in the diagonal cancels).
        sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
        return sxx + syy - 2.0 * kxy.mean()

    def _linear(self, x, y, h):
        m2 = x.shape[0] // 2
        x1, x2 = x[0 : 2 * m2 : 2], x[1 : 2 * m2 : 2]
        y1, y2 = y[0 : 2 * m2 : 2], y[1 : 2 * m2 : 2]

        def k(a, b):
            return self._kernel((a - b).pow(2).sum(1), h)

        return (k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)).mean()

    def extra_repr(self) -> str:
        return (
            f"kernel_multipliers={self.kernel_multipliers}, bandwidth={self.bandwidth!r}, estimator={self.estimator!r}"
        )
