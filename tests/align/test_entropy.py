import math

import pytest
import torch

from peftadapt.align import Entropy, build

from . import _ref


def _logits(n=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 2


def test_matches_mean_entropy_formula():
    lt = _logits()
    ps = [_ref.softmax_row(r) for r in lt.tolist()]
    want = sum(_ref.entropy_row(p) for p in ps) / len(ps)
    assert Entropy()(target_logits=lt).item() == pytest.approx(want, rel=1e-12)


def test_diversity_term_is_minus_entropy_of_mean_prediction():
    lt = _logits(seed=1)
    ps = [_ref.softmax_row(r) for r in lt.tolist()]
    mean_p = [sum(p[c] for p in ps) / len(ps) for c in range(4)]
    want = sum(_ref.entropy_row(p) for p in ps) / len(ps) - 0.5 * _ref.entropy_row(mean_p)
    got = build("entropy", diversity=True, diversity_weight=0.5)(torch.randn(6, 3), torch.randn(6, 3), None, lt)
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_extremes():
    assert Entropy()(target_logits=torch.zeros(5, 7)).item() == pytest.approx(math.log(7), rel=1e-6)
    confident = torch.eye(4) * 50
    assert Entropy()(target_logits=confident).item() < 1e-15
    # all samples confident in the same class: no diversity, IM loss = 0; spread classes: -log C
    same = torch.zeros(4, 4)
    same[:, 0] = 50
    assert Entropy(diversity=True)(target_logits=same).item() == pytest.approx(0.0, abs=1e-12)
    assert Entropy(diversity=True)(target_logits=confident).item() == pytest.approx(-math.log(4), rel=1e-6)


@pytest.mark.parametrize("diversity", [False, True])
def test_gradcheck(diversity):
    lt = _logits(5, 3, seed=2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: Entropy(diversity=diversity)(target_logits=x), (lt,))


def test_bf16_autocast():
    lt = (torch.randn(16, 10) * 40).bfloat16()
    want = Entropy(diversity=True)(target_logits=lt.double()).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = Entropy(diversity=True)(target_logits=lt)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_bad_inputs():
    ent = Entropy(num_classes=3)
    with pytest.raises(ValueError, match="needs target_logits"):
        ent(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="has 5 classes but this regularizer was built with num_classes=3"):
        ent(target_logits=torch.randn(4, 5))
    with pytest.raises(ValueError, match="batch size 3 but the matching features have 4"):
        ent(torch.randn(4, 8), torch.randn(4, 8), None, torch.randn(3, 3))
    with pytest.raises(ValueError, match="empty batch"):
        ent(target_logits=torch.randn(0, 3))
    with pytest.raises(ValueError, match="non-finite"):
        ent(target_logits=torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="num_classes"):
        Entropy(num_classes=1)
