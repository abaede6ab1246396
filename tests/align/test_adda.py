"""ADDA (peftadapt.align.ADDA): the losses and one alternating update against a hand
computation, what moves and what stays, the Python API on a wrapped model and on a
model whose forward takes hidden states."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import peftadapt
from peftadapt.align import ADDA, DomainDiscriminator
from tests.conftest import make_tiny, token_batch


class Toy(nn.Module):
    """features = adapter(x) (the head's input), logits = classifier(features)."""

    def __init__(self, d: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.adapter = nn.Linear(d, d)
        self.classifier = nn.Linear(d, 2)

    def forward(self, x, attention_mask=None, labels=None):
        return SimpleNamespace(logits=self.classifier(self.adapter(x)))


def _softplus(z):
    return torch.log1p(torch.exp(z))


def _sig(z):
    return 1 / (1 + torch.exp(-z))


def test_losses_and_one_step_match_a_hand_computation():
    torch.manual_seed(1)
    model = Toy()
    disc = nn.Linear(3, 1)
    adda = ADDA(model, disc)
    xs, xt = torch.randn(4, 3), torch.randn(5, 3)
    W, b = model.adapter.weight.detach().clone(), model.adapter.bias.detach().clone()
    w, c = disc.weight.detach()[0].clone(), disc.bias.detach()[0].clone()
    fs, ft = xs @ W.T + b, xt @ W.T + b
    zs, zt = fs @ w + c, ft @ w + c
    # L_D = 0.5 [mean -log sig(zs) + mean -log(1 - sig(zt))];  L_M = mean -log sig(zt)
    d_hand = 0.5 * (_softplus(-zs).mean() + _softplus(zt).mean())
    t_hand = _softplus(-zt).mean()
    fs_a, ft_a = adda.source_features({"x": xs}), adda.target_features({"x": xt})
    assert torch.allclose(fs_a, fs, atol=1e-6) and torch.allclose(ft_a, ft, atol=1e-6)
    assert torch.allclose(adda.discriminator_loss(fs_a, ft_a), d_hand, atol=1e-6)
    assert torch.allclose(adda.target_loss(ft_a), t_hand, atol=1e-6)

    # one step with SGD: D first, then the target adapter against the UPDATED D; the head stays
    lr_d, lr_t = 0.5, 0.3
    d_opt = torch.optim.SGD(disc.parameters(), lr=lr_d)
    t_opt = torch.optim.SGD(adda.target_parameters(), lr=lr_t)
    head_before = model.classifier.weight.detach().clone()
    logs = adda.step({"x": xs, "labels": torch.zeros(4)}, {"x": xt}, d_opt, t_opt)
    assert torch.allclose(logs["d_loss"], d_hand, atol=1e-6)
    gs, gt = -(1 - _sig(zs)) / (2 * len(zs)), _sig(zt) / (2 * len(zt))  # dL_D/dz
    w1 = w - lr_d * (gs @ fs + gt @ ft)
    c1 = c - lr_d * (gs.sum() + gt.sum())
    assert torch.allclose(disc.weight.detach()[0], w1, atol=1e-6)
    assert torch.allclose(disc.bias.detach()[0], c1, atol=1e-6)
    zt1 = ft @ w1 + c1
    assert torch.allclose(logs["t_loss"], _softplus(-zt1).mean(), atol=1e-6)  # L_M against the updated D
    gf = (-(1 - _sig(zt1)) / len(zt1))[:, None] * w1[None, :]  # dL_M/df_t, through the updated D
    assert torch.allclose(model.adapter.weight.detach(), W - lr_t * gf.T @ xt, atol=1e-6)
    assert torch.allclose(model.adapter.bias.detach(), b - lr_t * gf.sum(0), atol=1e-6)
    assert torch.equal(model.classifier.weight.detach(), head_before)
    # the source encoder is the snapshot, not the live adapter
    assert torch.allclose(adda.source_features({"x": xs}), fs, atol=1e-6)
    assert not torch.allclose(adda.target_features({"x": xs}), fs, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_wrapped_model_target_starts_at_source_and_only_the_target_adapter_moves(method):
    model = peftadapt.wrap(
        make_tiny("bert", "seqcls", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), method
    )
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with ADDA(model, hidden_size=16, seed=3) as adda:
        assert adda.head_names and all("classifier" in n for n in adda.head_names)
        assert set(adda.source_params) == set(before)
        assert all(torch.equal(adda.source_params[n], before[n]) for n in before)  # target == source at the start
        src, tgt = token_batch(seed=1), token_batch(seed=2)
        assert torch.allclose(adda.source_features(src), adda.target_features(src).detach(), atol=1e-6)
        d_opt = torch.optim.AdamW(adda.discriminator.parameters(), lr=1e-2)
        # the caller may hand every trainable parameter to the target optimizer: the head still stays
        t_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            adda.step(src, tgt, d_opt, t_opt)
    after = dict(model.named_parameters())
    heads = set(adda.head_names)
    assert all(torch.equal(after[n].detach(), before[n]) for n in heads)
    assert any(not torch.equal(after[n].detach(), before[n]) for n in before if n not in heads)
    assert all(torch.equal(adda.source_params[n], before[n]) for n in before)  # the source adapter is frozen
    assert not model.base_model.model._forward_hooks if method == "lora" else True  # hooks removed by `with`


def test_default_discriminator_is_seeded_and_state_round_trips():
    a = ADDA(Toy(), hidden_size=8, seed=5)
    b = ADDA(Toy(), hidden_size=8, seed=5)
    assert isinstance(a.discriminator, DomainDiscriminator) and a.discriminator.in_features == 3
    assert all(
        torch.equal(x, y) for x, y in zip(a.discriminator.parameters(), b.discriminator.parameters(), strict=True)
    )
    with torch.no_grad():
        for p in b.discriminator.parameters():
            p.add_(1.0)
        b.source_params["adapter.weight"].add_(1.0)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a.source_params["adapter.weight"], b.source_params["adapter.weight"])
    assert all(
        torch.equal(x, y) for x, y in zip(a.discriminator.parameters(), b.discriminator.parameters(), strict=True)
    )


class HiddenStateModel(nn.Module):
    """Like the Amazon study's TopModel: forward(h, am) -> (features, logits), head named ``head``."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.block = nn.Linear(d, d)
        self.alias = self.block  # one submodule on two paths (TopModel keeps net and hf)
        self.head = nn.Linear(d, 2)

    def forward(self, h, am):
        f = (self.block(h) * am[..., None]).sum(1) / am.sum(1, keepdim=True)
        return f, self.head(f)


def test_any_model_called_with_keywords_and_a_features_function():
    torch.manual_seed(0)
    model = HiddenStateModel()
    adda = ADDA(model, head="head", features=lambda out: out[0], in_features=4)
    assert adda.head_names == ["head.weight", "head.bias"]
    h, am = torch.randn(3, 5, 4), torch.ones(3, 5)
    d_opt = torch.optim.Adam(adda.discriminator.parameters(), lr=1e-2)
    t_opt = torch.optim.Adam(adda.target_parameters(), lr=1e-2)
    w0, head0 = model.block.weight.detach().clone(), model.head.weight.detach().clone()
    logs = adda.step({"h": h, "am": am}, {"h": h + 1, "am": am}, d_opt, t_opt)
    assert set(logs) == {"d_loss", "t_loss", "d_accuracy"}
    assert not torch.equal(model.block.weight, w0) and torch.equal(model.head.weight, head0)
    # the source forward used the snapshot, and left the live (target) parameters in place on both paths
    assert model.block.weight is model.alias.weight and model.block.weight.requires_grad
    f_src = adda.source_features({"h": h, "am": am})
    w_s, b_s = adda.source_params["block.weight"], adda.source_params["block.bias"]
    assert torch.allclose(f_src, (h @ w_s.T + b_s).mean(1), atol=1e-6)
    assert model.block.weight is model.alias.weight and model.block.weight.requires_grad
    assert adda.target_features({"h": h, "am": am}).requires_grad


def test_one_line_errors():
    with pytest.raises(ValueError, match="in_features=<width>"):
        ADDA(HiddenStateModel(), head="head", features=lambda out: out[0])
    frozen = Toy()
    frozen.adapter.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters besides the head"):
        ADDA(frozen)
    with pytest.raises(ValueError, match="mapping of model inputs"):
        ADDA(Toy()).source_features(torch.zeros(2, 3))


def test_one_optimizer_for_both_sides_equals_two():
    torch.manual_seed(4)
    xs, xt = torch.randn(4, 3), torch.randn(5, 3)
    ends = []
    for shared in (False, True):
        torch.manual_seed(0)
        model, disc = Toy(), nn.Linear(3, 1)
        adda = ADDA(model, disc)
        if shared:  # a parameter without a gradient is not stepped: each half moves only its own side
            opt = torch.optim.SGD([*disc.parameters(), *model.parameters()], lr=0.3, weight_decay=0.1)
            d_opt = t_opt = opt
        else:
            d_opt = torch.optim.SGD(disc.parameters(), lr=0.3, weight_decay=0.1)
            t_opt = torch.optim.SGD(adda.target_parameters(), lr=0.3, weight_decay=0.1)
        for _ in range(2):
            adda.step({"x": xs}, {"x": xt}, d_opt, t_opt)
        ends.append([p.detach().clone() for p in [*disc.parameters(), *model.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*ends, strict=True))
