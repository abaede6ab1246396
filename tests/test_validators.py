"""Each validator against a float64 NumPy reference of its formula on fixed tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftadapt import validators as V

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(40, 3)) * 2.0
SRC_LOGITS = RNG.normal(size=(30, 3))
SRC_LABELS = RNG.integers(0, 3, size=30)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _h(p):
    return -(p * np.log(p)).sum(-1)


def t(a):
    return torch.tensor(a, dtype=torch.float32)


def test_entropy_and_im_match_reference():
    p = _softmax(LOGITS.astype(np.float32).astype(np.float64))
    assert V.target_entropy(t(LOGITS)) == pytest.approx(-_h(p).mean(), rel=1e-9)
    assert V.information_maximization(t(LOGITS)) == pytest.approx(_h(p.mean(0)) - _h(p).mean(), rel=1e-9)


def test_im_prefers_confident_and_balanced_over_collapsed():
    balanced = torch.tensor([[9.0, 0.0], [0.0, 9.0]] * 10)
    collapsed = torch.tensor([[9.0, 0.0]] * 20)
    assert V.information_maximization(balanced) > V.information_maximization(collapsed)
    assert V.target_entropy(collapsed) == pytest.approx(V.target_entropy(balanced))


def test_snd_matches_reference():
    p = _softmax(LOGITS.astype(np.float32).astype(np.float64))
    x = p / np.linalg.norm(p, axis=1, keepdims=True)
    s = x @ x.T / 0.05
    np.fill_diagonal(s, -np.inf)
    q = _softmax(s)
    ref = -(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)).sum(1).mean()
    assert V.soft_neighborhood_density(t(LOGITS)) == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        V.soft_neighborhood_density(t(LOGITS), temperature=0.0)


def test_bnm_matches_reference():
    p = _softmax(LOGITS.astype(np.float32).astype(np.float64))
    ref = np.linalg.svd(p, compute_uv=False).sum() / len(p)
    assert V.batch_nuclear_norm(t(LOGITS)) == pytest.approx(ref, rel=1e-9)


def test_source_accuracy_matches_reference():
    ref = (SRC_LOGITS.argmax(1) == SRC_LABELS).mean()
    assert V.source_accuracy(t(SRC_LOGITS), torch.tensor(SRC_LABELS)) == pytest.approx(ref)


def test_dev_risk_matches_reference_with_control_variate():
    losses = RNG.uniform(0.1, 2.0, size=50)
    w = RNG.uniform(0.2, 3.0, size=50)
    wl = w * losses
    eta = -np.cov(wl, w, ddof=1)[0, 1] / np.var(w, ddof=1)
    ref = wl.mean() + eta * w.mean() - eta
    assert V.dev_risk(torch.tensor(losses), torch.tensor(w)) == pytest.approx(ref, rel=1e-9)
    # constant weights: no control variate, the plain mean loss
    assert V.dev_risk(torch.tensor(losses), torch.ones(50)) == pytest.approx(losses.mean(), rel=1e-9)


def test_dev_matches_reference_given_the_domain_classifier():
    """End to end: the density ratio of the fitted domain classifier, then the DEV risk, negated."""
    fs = RNG.normal(size=(60, 4))
    ft = RNG.normal(size=(90, 4)) + np.array([1.0, 0.0, 0.0, 0.0])
    x = torch.tensor(np.concatenate([fs, ft]))
    d = torch.cat([torch.zeros(60), torch.ones(90)]).long()
    domain = V.fit_logistic(x, d, 2)
    logp = torch.log_softmax(domain(torch.tensor(fs)), -1).numpy()
    w = np.exp(logp[:, 1] - logp[:, 0]) * 60 / 90
    lg = RNG.normal(size=(60, 3))
    y = RNG.integers(0, 3, size=60)
    ce = -np.log(_softmax(lg)[np.arange(60), y])
    wl = w * ce
    eta = -np.cov(wl, w, ddof=1)[0, 1] / np.var(w, ddof=1)
    ref = -(wl.mean() + eta * w.mean() - eta)
    got = V.deep_embedded_validation(torch.tensor(ft), torch.tensor(fs), torch.tensor(lg), torch.tensor(y))
    assert got == pytest.approx(ref, rel=1e-6)
    # the domain classifier is informative: source points nearer the target get larger weights
    assert np.corrcoef(fs[:, 0], w)[0, 1] > 0.5


def test_fit_logistic_reaches_the_regularized_optimum():
    x = torch.tensor(RNG.normal(size=(80, 3)))
    y = (x[:, 0] + 0.5 * torch.tensor(RNG.normal(size=80)) > 0).long()
    predict = V.fit_logistic(x, y, 2, l2=1e-2)
    # the fitted map is affine in the standardized inputs: recover (W, b) and check the objective's gradient is 0
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    za = torch.cat([z, torch.ones(80, 1, dtype=torch.float64)], 1)
    wb = torch.linalg.lstsq(za, predict(x)).solution.requires_grad_(True)
    w, b = wb[:3], wb[3]
    loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 1e-2 * w.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, wb)
    assert grad.abs().max() < 1e-5
    assert (predict(x).argmax(1) == y).double().mean() > 0.8  # and it learned the signal


def test_reverse_validation_separable_and_collapsed():
    ft = torch.tensor(np.concatenate([RNG.normal(-3, 1, size=(50, 2)), RNG.normal(3, 1, size=(50, 2))]))
    lt = torch.cat([torch.tensor([[5.0, 0.0]] * 50), torch.tensor([[0.0, 5.0]] * 50)])
    fs = torch.tensor(np.concatenate([RNG.normal(-3, 1, size=(20, 2)), RNG.normal(3, 1, size=(20, 2))]))
    ys = torch.tensor([0] * 20 + [1] * 20)
    assert V.reverse_validation(ft, lt, fs, ys) == 1.0
    assert V.reverse_validation(ft, lt, fs, 1 - ys) == 0.0  # the pseudo-labels disagree with the source
    # every pseudo-label one class: the constant classifier, right on that class's share
    assert V.reverse_validation(ft, torch.tensor([[5.0, 0.0]] * 100), fs, ys) == 0.5


def test_registry_and_score():
    assert set(V.VALIDATORS) == set(V.VALIDATOR_NAMES)
    o = V.Outputs(t(LOGITS))
    assert V.score("im", o) == V.information_maximization(t(LOGITS))
    with pytest.raises(ValueError, match=r"needs.*source"):
        V.score("dev", o)
    with pytest.raises(ValueError, match="unknown validator 'snf'"):
        V.score("snf", o)
