"""Adversarial alignment: gradient reversal, domain discriminator, DANN, CDAN / CDAN+E."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.autograd import scale_grad
from .numerics import check_progress, full_precision, stat_dtype
from .registry import register
from .regularizer import Regularizer
from .schedule import Schedule, dann_ramp

_GRL_SCHEDULES = ("dann", "constant")


# ---------------------------------------------------------------------------
# Gradient reversal
# ---------------------------------------------------------------------------
def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-coeff`` in the backward pass."""
    return scale_grad(x, -float(coeff))


class GradientReversal(nn.Module):
    """Gradient reversal layer (Ganin & Lempitsky 2015; Ganin et al. 2016, JMLR 17, Sec. 4).

    Forward: R(x) = x. Backward: dR/dx = -lambda I, with

        lambda(p) = coeff * (2 / (1 + exp(-gamma * p)) - 1)    (schedule="dann", gamma=10 in the paper)
        lambda    = coeff                                       (schedule="constant")

    where p in [0, 1] is the training progress set by :meth:`set_progress`.
    """

    def __init__(self, schedule: Schedule = "dann", coeff: float = 1.0, gamma: float = 10.0) -> None:
        super().__init__()
        if schedule not in _GRL_SCHEDULES:
            raise ValueError(f"unknown GRL schedule {schedule!r}; valid: {list(_GRL_SCHEDULES)}")
        for label, v in (("coeff", coeff), ("gamma", gamma)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0) or math.isinf(v):
                raise ValueError(f"GRL {label} must be a finite number >= 0, got {v!r}")
        self.schedule = schedule
        self.coeff = float(coeff)
        self.gamma = float(gamma)
        self.progress = 0.0

    def set_progress(self, p: float) -> None:
        self.progress = check_progress(p)

    @property
    def lambda_(self) -> float:
        """The current reversal coefficient."""
        if self.schedule == "constant":
            return self.coeff
        return self.coeff * dann_ramp(self.progress, self.gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, coeff={self.coeff}, gamma={self.gamma}"


# ---------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------
class DomainDiscriminator(nn.Sequential):
    """MLP ``in_features -> [hidden_size, ReLU, Dropout] x depth -> 1`` returning a domain logit.

    Defaults follow DANN / CDAN's code for deep features (two hidden layers of
    1024, dropout 0.5). ``depth=0`` is a linear discriminator.
    """

    def __init__(self, in_features: int, hidden_size: int = 1024, depth: int = 2, dropout: float = 0.5) -> None:
        _check_int("in_features", in_features, 1)
        _check_int("hidden_size", hidden_size, 1)
        _check_int("depth", depth, 0)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden_size
        layers.append(nn.Linear(width, 1))
        super().__init__(*layers)
        self.in_features = in_features


def _check_int(label: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{label} must be an integer >= {lo}, got {v!r}")


def _domain_bce(logit_s: torch.Tensor, logit_t: torch.Tensor, w_s=None, w_t=None) -> torch.Tensor:
    """0.5 * [ sum_i a_i BCE(d_i, 1) over source + sum_j b_j BCE(d_j, 0) over target ],
    a, b = per-domain weights normalised to sum 1 (uniform by default)."""
    ls = F.binary_cross_entropy_with_logits(logit_s, torch.ones_like(logit_s), reduction="none")
    lt = F.binary_cross_entropy_with_logits(logit_t, torch.zeros_like(logit_t), reduction="none")
    if w_s is None:
        return 0.5 * (ls.mean() + lt.mean())
    return 0.5 * ((w_s / w_s.sum() * ls).sum() + (w_t / w_t.sum() * lt).sum())


class _Adversarial(Regularizer):
    """Shared by DANN and CDAN: a GRL followed by a domain discriminator."""

    min_batch = 1
    batch_statistic = False  # a mean of per-sample BCE losses (CDAN+E overrides)

    def _init_adv(self, disc_in: int, hidden_size, depth, dropout, grl, coeff, gamma) -> None:
        self.grl = GradientReversal(grl, coeff, gamma)
        self.discriminator = DomainDiscriminator(disc_in, hidden_size, depth, dropout)

    def set_progress(self, p: float) -> None:
        super().set_progress(p)
        self.grl.set_progress(p)

    def _check_width(self, fs: torch.Tensor) -> None:
        if fs.shape[1] != self.in_features:
            raise ValueError(
                f"{self._label()} was built with in_features={self.in_features} but got features of "
                f"width {fs.shape[1]}; build it with in_features={fs.shape[1]}"
            )

    def _discriminate(self, z: torch.Tensor) -> torch.Tensor:
        # The discriminator's params are fp32; run it in fp32 with autocast off so the
        # BCE sees fp32 logits (its own weights are small, cost is negligible).
        w = next(self.discriminator.parameters())
        if w.device != z.device:
            raise ValueError(
                f"{self._label()}: features are on {z.device} but the discriminator is on {w.device}; "
                f"move the regularizer with .to({str(z.device)!r})"
            )
        dt = w.dtype
        return self.discriminator(self.grl(z).to(dt)).squeeze(1).to(stat_dtype(z))


@register("dann")
class DANN(_Adversarial):
    r"""Domain-adversarial loss of DANN (Ganin et al. 2016, JMLR 17(59), eq. 9-10 / Alg. 1).

        L = 0.5 * [ mean_i BCE(D(R(f_s,i)), 1) + mean_j BCE(D(R(f_t,j)), 0) ]

    D is a :class:`DomainDiscriminator` MLP, R the :class:`GradientReversal`
    layer with lambda(p) = coeff * (2 / (1 + exp(-gamma p)) - 1). Minimising L
    trains D to tell the domains apart while the reversed gradient trains the
    features to fool it (the paper's saddle point). The 0.5 (the paper sums
    the two domain means) makes L the BCE of the pooled batch when B_s = B_t,
    as in the CDAN and Transfer-Learning-Library code; it only rescales lambda.

    Args:
        in_features: feature width d (required: the discriminator is built now
            so the trainer can put its parameters in the optimizer before step 1).
        hidden_size, depth, dropout: the discriminator MLP.
        grl: "dann" (the ramp) or "constant" GRL coefficient.
        coeff: maximum (or constant) GRL coefficient.
        gamma: the ramp's steepness (10 in the paper).

    Inputs: ``source_features (B_s, d)``, ``target_features (B_t, d)``; logits unused.
    Trainable parameters: ``self.discriminator`` (``has_parameters`` is True).

    Example::

        dann = DANN(in_features=384)
        dann.set_progress(step / total_steps)
        loss = dann(f_s, f_t)
    """

    def __init__(
        self,
        in_features: int,
        hidden_size: int = 1024,
        depth: int = 2,
        dropout: float = 0.5,
        grl: str = "dann",
        coeff: float = 1.0,
        gamma: float = 10.0,
    ) -> None:
        super().__init__()
        _check_int("in_features", in_features, 1)
        self.in_features = in_features
        self._init_adv(in_features, hidden_size, depth, dropout, grl, coeff, gamma)

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        fs, ft = self.check_features(source_features, target_features)
        self._check_width(fs)
        with full_precision(fs):
            ds = self._discriminate(fs)
            dt = self._discriminate(ft)
            return _domain_bce(ds, dt)


@register("cdan")
class CDAN(_Adversarial):
    r"""Conditional domain-adversarial loss, CDAN and CDAN+E (Long et al., NeurIPS 2018).

    The discriminator sees the multilinear map of features f (d) and class
    predictions g = softmax(logits) (C):

        T(f, g) = f ⊗ g   flattened to d*C   (the outer product; when d*C <= max_multilinear)
        T(f, g) = (R_f f) ⊙ (R_g g) / sqrt(d_out)   (randomized, otherwise)

    with fixed Gaussian R_f (d_out x d), R_g (d_out x C), registered as buffers
    so they are saved in ``state_dict`` and a resumed run uses the same map.
    As in the paper's official code, g is detached inside T: the domain
    gradient reaches the features, not the classifier's softmax.

        CDAN:    L = 0.5 * [ mean_s BCE(D(R(T_s)), 1) + mean_t BCE(D(R(T_t)), 0) ]
        CDAN+E:  the same with per-sample weights w = 1 + exp(-H(g)),
                 H(g) = -sum_c g_c log g_c, normalised to sum 1 within each
                 domain (the official code's normalisation), i.e.
                 L = 0.5 * [ sum_s (w_i / W_s) BCE_i + sum_t (w_j / W_t) BCE_j ].
                 The weights are detached (the official code instead puts a
                 reversed-gradient hook on H; we treat w as a weight, as the
                 paper's eq. 9 does).

    R is the gradient reversal layer (see :class:`GradientReversal`).

    Args:
        in_features: feature width d; num_classes: C (both required).
        entropy: CDAN+E entropy conditioning (the registry name "cdan+e" sets it).
        randomized: True / False to force the map; None (default) randomizes
            when d * C > max_multilinear (4096, the paper's rule).
        randomized_dim: d_out of the randomized map (1024 in the paper).
        seed: seed for R_f, R_g (None: torch's global RNG).
        hidden_size, depth, dropout, grl, coeff, gamma: as in :class:`DANN`.

    Inputs: features (B_s, d), (B_t, d) and logits (B_s, C), (B_t, C) (required).

    Example::

        cdan = CDAN(in_features=384, num_classes=2, entropy=True)  # or build("cdan+e", ...)
        loss = cdan(f_s, f_t, logits_s, logits_t)
    """

    random_f: torch.Tensor  # buffers of the randomized map (registered only when randomized)
    random_g: torch.Tensor

    needs_logits = True

    @property
    def batch_statistic(self) -> bool:  # type: ignore[override]  # per instance; the base's class attribute is never assigned
        """CDAN+E normalises its per-sample weights over the batch: a batch statistic; plain CDAN is not."""
        return bool(self.entropy)

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        entropy: bool = False,
        randomized: bool | None = None,
        randomized_dim: int = 1024,
        max_multilinear: int = 4096,
        seed: int | None = None,
        hidden_size: int = 1024,
        depth: int = 2,
        dropout: float = 0.5,
        grl: str = "dann",
        coeff: float = 1.0,
        gamma: float = 10.0,
    ) -> None:
        super().__init__()
        _check_int("in_features", in_features, 1)
        _check_int("num_classes", num_classes, 2)
        _check_int("randomized_dim", randomized_dim, 1)
        _check_int("max_multilinear", max_multilinear, 1)
        if randomized not in (None, True, False):
            raise ValueError(f"randomized must be True, False or None (auto), got {randomized!r}")
        if not isinstance(entropy, bool):
            raise ValueError(f"entropy must be True or False, got {entropy!r}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.entropy = entropy
        self.randomized = (in_features * num_classes > max_multilinear) if randomized is None else randomized
        self.randomized_dim = randomized_dim
        if self.randomized:
            g = None if seed is None else torch.Generator().manual_seed(int(seed))
            self.register_buffer("random_f", torch.randn(in_features, randomized_dim, generator=g))
            self.register_buffer("random_g", torch.randn(num_classes, randomized_dim, generator=g))
            disc_in = randomized_dim
        else:
            disc_in = in_features * num_classes
        self._init_adv(disc_in, hidden_size, depth, dropout, grl, coeff, gamma)
        self.name = "cdan+e" if entropy else "cdan"

    def _multilinear(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        if self.randomized:
            rf = self.random_f.to(f.dtype)
            rg = self.random_g.to(f.dtype)
            return (f @ rf) * (g @ rg) / math.sqrt(self.randomized_dim)
        # Row b: [g_1 f, g_2 f, ..., g_C f] (the official code's bmm(g.unsqueeze(2), f.unsqueeze(1))).
        return torch.einsum("bc,bd->bcd", g, f).reshape(f.shape[0], -1)

    def forward(self, source_features, target_features, source_logits=None, target_logits=None):
        fs, ft = self.check_features(source_features, target_features)
        self._check_width(fs)
        ls = self.check_logits(source_logits, "source_logits", fs.shape[0], self.num_classes)
        lt = self.check_logits(target_logits, "target_logits", ft.shape[0], self.num_classes)
        dt = stat_dtype(fs)
        with full_precision(fs):
            fs32, ft32 = fs.to(dt), ft.to(dt)
            gs = torch.softmax(ls.detach().to(dt), dim=1)
            gt = torch.softmax(lt.detach().to(dt), dim=1)
            ds = self._discriminate(self._multilinear(fs32, gs))
            dtt = self._discriminate(self._multilinear(ft32, gt))
            if not self.entropy:
                return _domain_bce(ds, dtt)
            ws = 1.0 + torch.exp(-_entropy(gs))
            wt = 1.0 + torch.exp(-_entropy(gt))
            return _domain_bce(ds, dtt, ws, wt)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, entropy={self.entropy}, "
            f"randomized={self.randomized}" + (f", randomized_dim={self.randomized_dim}" if self.randomized else "")
        )


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Row-wise Shannon entropy -sum p log p (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(1)


register("cdan+e", CDAN, entropy=True)
