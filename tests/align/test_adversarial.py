import math

import pytest
import torch

from peftadapt.align import CDAN, DANN, GradientReversal, build, grad_reverse
from peftadapt.align.adversarial import DomainDiscriminator

from . import _ref


def _feats(m=5, n=4, d=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype) + 0.5


def _disc_ref(disc: DomainDiscriminator, rows):
    """The discriminator's logit per row by explicit float64 arithmetic (ReLU MLP, dropout off)."""
    linears = [m for m in disc if isinstance(m, torch.nn.Linear)]
    out = []
    for r in rows:
        h = [float(v) for v in r]
        for k, lin in enumerate(linears):
            w, b = lin.weight.double().tolist(), lin.bias.double().tolist()
            h = [sum(wi * hi for wi, hi in zip(w[o], h, strict=True)) + b[o] for o in range(len(w))]
            if k < len(linears) - 1:
                h = [max(0.0, v) for v in h]
        out.append(h[0])
    return out


def _bce_domain_ref(logit_s, logit_t, w_s=None, w_t=None):
    w_s = w_s or [1.0] * len(logit_s)
    w_t = w_t or [1.0] * len(logit_t)
    src = sum(w * -math.log(_ref.sigmoid(v)) for w, v in zip(w_s, logit_s, strict=True)) / sum(w_s)
    tgt = sum(w * -math.log(1 - _ref.sigmoid(v)) for w, v in zip(w_t, logit_t, strict=True)) / sum(w_t)
    return 0.5 * (src + tgt)


def test_grad_reverse_negates_and_scales():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, 4)
    (grad_reverse(x, 0.3) * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * w)
    y = grad_reverse(x, 2.0)
    torch.testing.assert_close(y, x)  # identity forward


def test_grl_schedule_is_the_dann_papers():
    grl = GradientReversal("dann", coeff=1.0)
    for p in (0.0, 0.1, 0.5, 1.0):
        grl.set_progress(p)
        assert grl.lambda_ == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
    grl.set_progress(0.0)
    assert grl.lambda_ == 0.0
    const = GradientReversal("constant", coeff=0.7)
    const.set_progress(0.9)
    assert const.lambda_ == 0.7
    with pytest.raises(ValueError, match=r"valid: \['dann', 'constant'\]"):
        GradientReversal("tllib")
    with pytest.raises(ValueError, match=r"progress must be in \[0, 1\]"):
        grl.set_progress(1.5)


def test_dann_loss_matches_formula():
    fs, ft = _feats()
    dann = DANN(in_features=6, hidden_size=5, depth=2, dropout=0.0).double()
    got = dann(fs, ft)
    want = _bce_domain_ref(_disc_ref(dann.discriminator, fs), _disc_ref(dann.discriminator, ft))
    assert got.item() == pytest.approx(want, rel=1e-10)


def _numeric_grad(f, x, eps=1e-6):
    g = torch.zeros_like(x)
    for idx in range(x.numel()):
        xp, xm = x.clone(), x.clone()
        xp.view(-1)[idx] += eps
        xm.view(-1)[idx] -= eps
        g.view(-1)[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def test_dann_feature_gradient_is_reversed_and_discriminator_gradient_is_not():
    fs, ft = _feats()
    dann = DANN(in_features=6, hidden_size=5, depth=1, dropout=0.0).double()
    dann.set_progress(0.3)
    lam = 2 / (1 + math.exp(-3.0)) - 1
    x = fs.clone().requires_grad_(True)
    loss = dann(x, ft)
    loss.backward()
    with torch.no_grad():
        num = _numeric_grad(lambda v: dann(v, ft).item(), fs)
    torch.testing.assert_close(x.grad, -lam * num, rtol=1e-6, atol=1e-9)
    # the discriminator descends the true gradient (gradcheck on its parameters)
    w = dann.discriminator[0].weight
    assert torch.autograd.gradcheck(
        lambda weight: torch.func.functional_call(dann, {"discriminator.0.weight": weight}, (fs, ft)),
        (w.detach().clone().requires_grad_(True),),
    )
    # at p = 0 the features get no gradient at all (lambda = 0)
    dann.set_progress(0.0)
    x.grad = None
    dann(x, ft).backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dann_parameters_exist_before_first_step_and_width_is_checked():
    dann = build("dann", in_features=8, hidden_size=16, depth=3, dropout=0.1)
    assert dann.has_parameters
    opt = torch.optim.AdamW(dann.parameters(), lr=1e-3)  # the trainer can do this before step 1
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == (8 * 16 + 16) + 2 * (16 * 16 + 16) + 17
    with pytest.raises(ValueError, match="built with in_features=8 but got features of width 6"):
        dann(torch.randn(4, 6), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"needs option\(s\) \['in_features'\]"):
        build("dann")
    with pytest.raises(ValueError, match="dropout"):
        DANN(in_features=4, dropout=1.0)


def _multilinear_ref(f, g):
    return [[g[b][c] * f[b][j] for c in range(len(g[b])) for j in range(len(f[b]))] for b in range(len(f))]


@pytest.mark.parametrize("entropy", [False, True])
def test_cdan_matches_formula(entropy):
    fs, ft = _feats(5, 4, 3, seed=1)
    g = torch.Generator().manual_seed(5)
    ls, lt = (
        torch.randn(5, 2, generator=g, dtype=torch.float64) * 2,
        torch.randn(4, 2, generator=g, dtype=torch.float64),
    )
    cdan = CDAN(in_features=3, num_classes=2, entropy=entropy, hidden_size=4, dropout=0.0).double()
    assert not cdan.randomized
    got = cdan(fs, ft, ls, lt)
    ps = [_ref.softmax_row(r) for r in ls.tolist()]
    pt = [_ref.softmax_row(r) for r in lt.tolist()]
    logit_s = _disc_ref(cdan.discriminator, _multilinear_ref(fs.tolist(), ps))
    logit_t = _disc_ref(cdan.discriminator, _multilinear_ref(ft.tolist(), pt))
    if entropy:
        w_s = [1 + math.exp(-_ref.entropy_row(p)) for p in ps]
        w_t = [1 + math.exp(-_ref.entropy_row(p)) for p in pt]
        want = _bce_domain_ref(logit_s, logit_t, w_s, w_t)
    else:
        want = _bce_domain_ref(logit_s, logit_t)
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_cdan_plus_e_registry_name_and_weights_change_the_loss():
    fs, ft = _feats(6, 6, 4)
    ls, lt = torch.randn(6, 3, dtype=torch.float64) * 3, torch.randn(6, 3, dtype=torch.float64)
    torch.manual_seed(0)
    e = build("cdan+e", in_features=4, num_classes=3, dropout=0.0).double()
    torch.manual_seed(0)
    p = build("cdan", in_features=4, num_classes=3, dropout=0.0).double()
    assert e.entropy and not p.entropy and e.name == "cdan+e" and p.name == "cdan"
    assert abs(e(fs, ft, ls, lt).item() - p(fs, ft, ls, lt).item()) > 1e-6
    with pytest.raises(ValueError, match="fixes option"):
        build("cdan+e", in_features=4, num_classes=3, entropy=False)


def test_cdan_randomized_map_formula_and_state_dict_roundtrip():
    fs, ft = _feats(4, 4, 50, seed=2)
    ls, lt = torch.randn(4, 100, dtype=torch.float64), torch.randn(4, 100, dtype=torch.float64)
    cdan = CDAN(in_features=50, num_classes=100, randomized_dim=32, hidden_size=8, dropout=0.0, seed=1).double()
    assert cdan.randomized  # 50 * 100 > 4096
    assert set(cdan.state_dict()) >= {"random_f", "random_g"}
    rf, rg = cdan.random_f, cdan.random_g
    t = (fs @ rf) * (torch.softmax(ls, 1) @ rg) / math.sqrt(32)
    want = _bce_domain_ref(
        _disc_ref(cdan.discriminator, t.tolist()),
        _disc_ref(cdan.discriminator, ((ft @ rf) * (torch.softmax(lt, 1) @ rg) / math.sqrt(32)).tolist()),
    )
    assert cdan(fs, ft, ls, lt).item() == pytest.approx(want, rel=1e-9)
    other = CDAN(in_features=50, num_classes=100, randomized_dim=32, hidden_size=8, dropout=0.0, seed=2).double()
    assert not torch.equal(other.random_f, rf)
    other.load_state_dict(cdan.state_dict())
    assert other(fs, ft, ls, lt).item() == pytest.approx(want, rel=1e-12)
    assert not CDAN(in_features=50, num_classes=100, randomized=False).randomized


def test_cdan_predictions_are_detached_features_get_reversed_gradient():
    fs, ft = _feats(5, 5, 4)
    ls = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    lt = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x = fs.clone().requires_grad_(True)
    cdan = CDAN(
        in_features=4, num_classes=3, entropy=True, grl="constant", coeff=0.5, hidden_size=6, dropout=0.0
    ).double()
    cdan(x, ft, ls, lt).backward()
    assert ls.grad is None and lt.grad is None
    with torch.no_grad():
        num = _numeric_grad(lambda v: cdan(v, ft, ls, lt).item(), fs)
    torch.testing.assert_close(x.grad, -0.5 * num, rtol=1e-6, atol=1e-9)


def test_cdan_bad_inputs():
    cdan = CDAN(in_features=4, num_classes=3)
    fs, ft = torch.randn(5, 4), torch.randn(6, 4)
    with pytest.raises(ValueError, match="needs source_logits"):
        cdan(fs, ft, None, torch.randn(6, 3))
    with pytest.raises(ValueError, match="needs target_logits"):
        cdan(fs, ft, torch.randn(5, 3), None)
    with pytest.raises(ValueError, match="has 2 classes but this regularizer was built with num_classes=3"):
        cdan(fs, ft, torch.randn(5, 3), torch.randn(6, 2))
    with pytest.raises(ValueError, match="batch size 4 but the matching features have 5"):
        cdan(fs, ft, torch.randn(4, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match="in_features=4 but got features of width 7"):
        cdan(torch.randn(5, 7), torch.randn(6, 7), torch.randn(5, 3), torch.randn(6, 3))
    with pytest.raises(ValueError, match=r"needs option\(s\) \['num_classes'\]"):
        build("cdan", in_features=4)
    with pytest.raises(ValueError, match="non-finite"):
        cdan(fs, ft, torch.full((5, 3), float("inf")), torch.randn(6, 3))


@pytest.mark.parametrize("name", ["dann", "cdan+e"])
def test_bf16_autocast(name):
    torch.manual_seed(0)
    reg = (
        build(name, in_features=64, num_classes=4, hidden_size=32)
        if name != "dann"
        else build(name, in_features=64, hidden_size=32)
    )
    reg.eval()
    fs, ft = (torch.randn(8, 64) * 100).bfloat16(), (torch.randn(8, 64) * 100).bfloat16()
    ls, lt = torch.randn(8, 4).bfloat16(), torch.randn(8, 4).bfloat16()
    want = reg(fs.float(), ft.float(), ls.float(), lt.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reg(fs, ft, ls, lt)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_trained_discriminator_separates_shifted_domains_not_identical_ones():
    """The domain loss stays at log 2 (chance) for identical distributions and drops for shifted ones."""

    def train(shift):
        torch.manual_seed(0)
        dann = DANN(in_features=8, hidden_size=8, depth=1, dropout=0.0, grl="constant", coeff=0.0)
        opt = torch.optim.Adam(dann.parameters(), lr=2e-2)
        g = torch.Generator().manual_seed(1)
        fs = torch.randn(1024, 8, generator=g)
        ft = torch.randn(1024, 8, generator=g) + shift
        for _ in range(40):
            loss = dann(fs, ft)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            fs, ft = torch.randn(2048, 8, generator=g), torch.randn(2048, 8, generator=g) + shift
            return dann(fs, ft).item()

    same, shifted = train(0.0), train(1.5)
    assert same == pytest.approx(math.log(2), abs=0.02)  # held-out data: chance level
    assert shifted < 0.2


@pytest.mark.parametrize("randomized", [False, True])
def test_cdan_discriminator_gradcheck(randomized):
    fs, ft = _feats(4, 3, 5, seed=4)
    ls, lt = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    cdan = CDAN(
        in_features=5,
        num_classes=3,
        entropy=True,
        randomized=randomized,
        randomized_dim=6,
        hidden_size=4,
        depth=1,
        dropout=0.0,
        seed=0,
    ).double()
    w = cdan.discriminator[3].weight  # the output layer: few entries keep gradcheck quick
    assert torch.autograd.gradcheck(
        lambda weight: torch.func.functional_call(cdan, {"discriminator.3.weight": weight}, (fs, ft, ls, lt)),
        (w.detach().clone().requires_grad_(True),),
    )
