"""Validators: score a domain-adapted model without target labels (higher is better).

In unsupervised domain adaptation the target has no labels, so the regularizer
weight and the checkpoint cannot be chosen by target accuracy. A validator
turns what *is* available (the model's outputs on unlabeled target data and,
for some, on a labeled source validation set) into one number per candidate
model; the candidate with the highest score is picked. Every function here
takes tensors (logits, features, labels), computes in float64 on the CPU, and
returns one Python float, higher is better:

=====================  ==========================================================  ===========================
name                   score                                                       needs
=====================  ==========================================================  ===========================
``im``                 H(mean_i p_i) - mean_i H(p_i)                               target logits
``entropy``            -mean_i H(p_i)                                              target logits
``snd``                mean_i H(softmax_j(cos(p_i, p_j) / tau)), j != i            target logits
``bnm``                ||P||_* / n (nuclear norm of the n x C softmax matrix)      target logits
``dev``                -(mean(w l) + eta mean(w) - eta), eta = -Cov(wl, w)/Var(w)  target + source features,
                                                                                   source logits + labels
``reverse_validation`` accuracy on source val of a classifier fit on target        target + source features,
                       features with the model's pseudo-labels                     target logits, source labels
``source_accuracy``    accuracy on the labeled source validation set               source logits + labels
=====================  ==========================================================  ===========================

``p_i = softmax(logits_i)``, ``H(p) = -sum_c p_c log p_c`` (natural log).
:data:`VALIDATORS` maps each name to its function; :func:`score` computes one
by name from an :class:`Outputs` bundle. How well each one picks, measured on
the Amazon reviews, is in docs/validators.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

ValidatorName = Literal["im", "entropy", "snd", "bnm", "dev", "reverse_validation", "source_accuracy"]
VALIDATOR_NAMES: tuple[str, ...] = get_args(ValidatorName)


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to("cpu", torch.float64)


def _entropy_rows(p: torch.Tensor) -> torch.Tensor:
    """H(p_i) per row, 0 log 0 = 0."""
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def target_entropy(target_logits: torch.Tensor) -> float:
    """Negative mean prediction entropy on the target: ``-mean_i H(p_i)``.

    Confident target predictions score high (Morerio, Cavazza and Murino, "Minimal-Entropy
    Correlation Alignment", ICLR 2018, pick by it). A model that predicts one class with
    certainty for every input scores the maximum, 0: pair it with ``im`` or ``snd``.
    """
    p = F.softmax(_f64(target_logits), -1)
    return float(-_entropy_rows(p).mean())


def information_maximization(target_logits: torch.Tensor) -> float:
    """Information maximization: ``H(mean_i p_i) - mean_i H(p_i)``.

    The mutual information between input and predicted class under the empirical
    distribution (Gomes, Krause and Perona, "Discriminative clustering by regularized
    information maximization", NeurIPS 2010; used for UDA by SHOT, Liang et al., ICML 2020).
    High when each prediction is confident *and* the classes are used evenly.
    """
    p = F.softmax(_f64(target_logits), -1)
    return float(_entropy_rows(p.mean(0)) - _entropy_rows(p).mean())


def soft_neighborhood_density(target_logits: torch.Tensor, temperature: float = 0.05) -> float:
    """SND, soft neighborhood density (Saito et al., "Tune it the Right Way", ICCV 2021).

    ``x_i = p_i / ||p_i||`` (the softmax outputs, as in the paper), ``s_ij = x_i . x_j / tau``
    with ``s_ii`` masked out, ``P_ij = softmax_j(s_ij)``; the score is ``mean_i H(P_i.)``:
    high when each target point has many close neighbours (dense clusters), low when the
    predictions are scattered. ``tau = 0.05`` as in the paper.
    """
    if temperature <= 0:
        raise ValueError(f"snd temperature must be > 0, got {temperature}")
    x = F.normalize(F.softmax(_f64(target_logits), -1), dim=-1)
    s = x @ x.T / temperature
    s.fill_diagonal_(float("-inf"))
    return float(_entropy_rows(F.softmax(s, -1)).mean())


def batch_nuclear_norm(target_logits: torch.Tensor) -> float:
    """BNM, batch nuclear-norm (Cui et al., "Towards Discriminability and Diversity", CVPR 2020).

    ``||P||_* / n`` with ``P`` the ``n x C`` matrix of target softmax outputs: the sum of its
    singular values, which grows with both confidence (discriminability) and the rank of the
    prediction matrix (diversity).
    """
    p = F.softmax(_f64(target_logits), -1)
    return float(torch.linalg.matrix_norm(p, ord="nuc") / p.shape[0])


def source_accuracy(source_logits: torch.Tensor, source_labels: torch.Tensor) -> float:
    """Accuracy on the labeled source validation set: the baseline every validator is compared with."""
    return float((source_logits.argmax(-1).cpu() == source_labels.cpu()).double().mean())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1e-2, max_iter: int = 100):
    """An L2-regularized multinomial logistic regression (float64, L-BFGS) on standardized ``x``.

    Returns ``predict_logits(x_new)``. The standardization (mean and std of ``x``) is part of the model.
    """
    x = _f64(x)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    y = y.cpu().long()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_, b_ = w.detach(), b.detach()
    return lambda xn: ((_f64(xn) - mu) / sd) @ w_ + b_


def dev_risk(losses: torch.Tensor, weights: torch.Tensor) -> float:
    """The DEV estimate of the target risk from per-example source losses and density ratios.

    ``L = w * l``; ``eta = -Cov(L, w) / Var(w)``; risk ``= mean(L) + eta * mean(w) - eta``
    (You et al. 2019, Algorithm 1: the control variate uses ``E[w] = 1``).
    """
    w, l_ = _f64(weights), _f64(losses)
    wl = w * l_
    var = w.var(unbiased=True)
    eta = 0.0 if float(var) == 0.0 else float(-((wl - wl.mean()) * (w - w.mean())).sum() / (len(w) - 1) / var)
    return float(wl.mean() + eta * w.mean() - eta)


def deep_embedded_validation(
    target_features: torch.Tensor,
    source_features: torch.Tensor,
    source_logits: torch.Tensor,
    source_labels: torch.Tensor,
    l2: float = 1e-2,
) -> float:
    """DEV, deep embedded validation (You et al., "Towards Accurate Model Selection in Deep UDA", ICML 2019).

    A logistic-regression domain classifier on the features (source validation = 0, target = 1)
    gives each source validation example the density ratio
    ``w_i = p(target | x_i) / p(source | x_i) * n_s / n_t``; the per-example cross-entropy
    ``l_i`` of the model's source predictions, importance-weighted and with the control variate of
    :func:`dev_risk`, estimates the target risk. Returned negated (higher is better).
    """
    ns, nt = len(source_features), len(target_features)
    x = torch.cat([_f64(source_features), _f64(target_features)])
    d = torch.cat([torch.zeros(ns), torch.ones(nt)]).long()
    domain = fit_logistic(x, d, 2, l2=l2)
    logp = F.log_softmax(domain(source_features), -1)
    w = torch.exp(logp[:, 1] - logp[:, 0]) * ns / nt
    losses = F.cross_entropy(_f64(source_logits), source_labels.cpu().long(), reduction="none")
    return -dev_risk(losses, w)


def reverse_validation(
    target_features: torch.Tensor,
    target_logits: torch.Tensor,
    source_features: torch.Tensor,
    source_labels: torch.Tensor,
    l2: float = 1e-3,
) -> float:
    """Reverse validation (Zhong et al., ECML 2010; Ganin et al., JMLR 2016, Sec. 5.1.2), linear version.

    Pseudo-label the target with the model (``argmax p_i``), fit a logistic regression on the
    target features with those labels, and return its accuracy on the labeled source validation
    features. No target label is read. A model that collapses or scrambles the target features
    scores low even when its source accuracy stays high. When every pseudo-label is one class,
    the reverse classifier predicts that class (its accuracy is that class's share of the source).
    """
    pseudo = target_logits.argmax(-1).cpu()
    labels = source_labels.cpu().long()
    num_classes = max(int(target_logits.shape[-1]), int(labels.max()) + 1)
    if pseudo.unique().numel() < 2:
        return float((labels == pseudo[0]).double().mean())
    predict = fit_logistic(target_features, pseudo, num_classes, l2=l2)
    return float((predict(source_features).argmax(-1) == labels).double().mean())


@dataclass(frozen=True)
class Outputs:
    """What the validators read: a model's outputs on unlabeled target and labeled source validation data."""

    target_logits: torch.Tensor
    target_features: torch.Tensor | None = None
    source_logits: torch.Tensor | None = None
    source_features: torch.Tensor | None = None
    source_labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Validator:
    fn: Callable[[Outputs], float]
    needs_features: bool  # pooled features of the target (and of the source, with needs_source)
    needs_source: bool  # a labeled source validation set


VALIDATORS: dict[str, Validator] = {
    "im": Validator(lambda o: information_maximization(o.target_logits), False, False),
    "entropy": Validator(lambda o: target_entropy(o.target_logits), False, False),
    "snd": Validator(lambda o: soft_neighborhood_density(o.target_logits), False, False),
    "bnm": Validator(lambda o: batch_nuclear_norm(o.target_logits), False, False),
    "dev": Validator(
        lambda o: deep_embedded_validation(o.target_features, o.source_features, o.source_logits, o.source_labels),  # type: ignore[arg-type]
        True,
        True,
    ),
    "reverse_validation": Validator(
        lambda o: reverse_validation(o.target_features, o.target_logits, o.source_features, o.source_labels),  # type: ignore[arg-type]
        True,
        True,
    ),
    "source_accuracy": Validator(lambda o: source_accuracy(o.source_logits, o.source_labels), False, True),  # type: ignore[arg-type]
}
assert tuple(VALIDATORS) == VALIDATOR_NAMES


def check_name(name: str, where: str = "validator") -> str:
    """``name`` if it is a validator, else a one-line ValueError listing the valid names."""
    if name not in VALIDATORS:
        raise ValueError(f"{where}: unknown validator {name!r}; valid: {list(VALIDATOR_NAMES)}")
    return name


def score(name: str, outputs: Outputs) -> float:
    """The validator ``name`` on ``outputs`` (higher is better)."""
    v = VALIDATORS[check_name(name)]
    missing = []
    if v.needs_features and outputs.target_features is None:
        missing.append("target_features")
    if v.needs_source:
        missing += [k for k in ("source_logits", "source_labels") if getattr(outputs, k) is None]
        if v.needs_features and outputs.source_features is None:
            missing.append("source_features")
    if missing:
        raise ValueError(f"validator {name!r} needs {missing}; give a labeled source validation set for it")
    return v.fn(outputs)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equal-length sequences (ties get their average rank).

    How well a validator's scores order the candidates by their target accuracy: 1 is the
    same order, 0 none, -1 the reverse. NaN when either sequence is constant.
    """
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return float("nan") if vx == 0 or vy == 0 else cov / (vx * vy) ** 0.5


def _ranks(v: Sequence[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
