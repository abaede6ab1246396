"""MLDG: first- and second-order meta steps equal their formulas (a linear model by hand, a LoRA BERT)."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import peftadapt
from peftadapt.align import DomainAdaptation, Term
from peftadapt.train.meta import MLDG

from ..align.test_step import LAYER, _model
from ..conftest import token_batch


class Linear(nn.Module):
    """Least squares: loss = mean((x w + b - y)^2), with b frozen (not a meta parameter)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.1, dtype=torch.float64), requires_grad=False)

    def forward(self, x, labels):
        return SimpleNamespace(loss=((x @ self.w + self.b - labels) ** 2).mean())


def _domains():
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, n in (("a", 4), ("b", 5), ("c", 3)):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        out[name] = {"x": x, "labels": torch.randn(n, generator=g, dtype=torch.float64)}
    return out


def _grad_and_hessian(w, b, dom):
    """Mean over the domains of 2/n x^T (x w + b - y) and 2/n x^T x: least squares by hand."""
    g = sum(2 / len(d["x"]) * d["x"].T @ (d["x"] @ w + b - d["labels"]) for d in dom) / len(dom)
    h = sum(2 / len(d["x"]) * d["x"].T @ d["x"] for d in dom) / len(dom)
    return g, h


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_step_equals_the_formula(first_order):
    model, domains = Linear(), _domains()
    alpha, beta = 0.1, 0.7
    ml = MLDG(model, inner_lr=alpha, meta_weight=beta, first_order=first_order, seed=3)
    train, test = ml.split(domains)
    logs = ml.backward(domains)
    assert ml.last_split == (train, test) and len(test) == 1 and ml.step == 1
    w, b = model.w.detach(), model.b.detach()
    g_tr, h_tr = _grad_and_hessian(w, b, [domains[d] for d in train])
    w2 = w - alpha * g_tr
    g_te, _ = _grad_and_hessian(w2, b, [domains[d] for d in test])
    want = g_tr + beta * (g_te if first_order else (torch.eye(3, dtype=torch.float64) - alpha * h_tr) @ g_te)
    torch.testing.assert_close(model.w.grad, want)
    assert model.b.grad is None
    l_te = ((domains[test[0]]["x"] @ w2 + b - domains[test[0]]["labels"]) ** 2).mean()
    torch.testing.assert_close(logs["meta_test_loss"], l_te)
    torch.testing.assert_close(logs[f"meta_test/{test[0]}"], l_te)


def test_splits_are_seeded_and_resume_from_the_state():
    names = ["books", "dvd", "electronics", "kitchen"]
    a, b = MLDG(Linear(), inner_lr=0.1, seed=1), MLDG(Linear(), inner_lr=0.1, seed=1)
    draws = [a.split(names, step=i)[1] for i in range(12)]
    assert len({tuple(d) for d in draws}) > 1  # not always the same held-out domain
    b.load_state_dict({"step": 5, "seed": 1})
    assert b.split(names) == a.split(names, step=5)
    two = MLDG(Linear(), inner_lr=0.1, meta_test_domains=2, seed=0).split(names)
    assert len(two[1]) == 2 and sorted(two[0] + two[1]) == names


def test_first_order_on_a_lora_model_equals_two_plain_backwards():
    model = _model()
    ref = copy.deepcopy(model)
    domains = {
        d: {**token_batch(seed=s, batch=3), "labels": torch.tensor([0, 1, 1])} for s, d in enumerate(["x", "y", "z"])
    }
    ml = MLDG(model, inner_lr=0.5, meta_weight=2.0, first_order=True, seed=0)
    train, test = ml.split(domains)
    ml.backward(domains)
    lora = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    l_tr = torch.stack([ref(**domains[d]).loss for d in train]).mean()
    g_tr = torch.autograd.grad(l_tr, [p for _, p in lora])
    moved = copy.deepcopy(ref)
    with torch.no_grad():
        for (n, _), g in zip(lora, g_tr, strict=True):
            moved.get_parameter(n).sub_(0.5 * g)
    l_te = torch.stack([moved(**domains[d]).loss for d in test]).mean()
    g_te = torch.autograd.grad(l_te, [moved.get_parameter(n) for n, _ in lora])
    for (n, _), a, b in zip(lora, g_tr, g_te, strict=True):
        torch.testing.assert_close(model.get_parameter(n).grad, a + 2.0 * b, rtol=1e-4, atol=1e-6)


def test_second_order_with_alignment_runs_through_the_tap():
    model = _model()
    domains = {d: {**token_batch(seed=s, batch=3), "labels": torch.tensor([0, 1, 0])} for s, d in enumerate("pq")}
    with pytest.raises(RuntimeError, match=r"first_order=True, or .* attn_implementation='eager'"):
        MLDG(model, inner_lr=0.1, seed=0).backward(domains)  # CPU SDPA attention has no double backward
    model.zero_grad()
    peftadapt.base_model(model).set_attn_implementation("eager")
    domains = {d: {**token_batch(seed=s, batch=3), "labels": torch.tensor([0, 1, 0])} for s, d in enumerate("pq")}
    with DomainAdaptation(model, [Term("mmd", weight=0.5)], layer=LAYER) as da:
        logs = MLDG(model, inner_lr=0.1, seed=0).backward(domains, token_batch(seed=9, batch=4), 0.5, da=da)
    assert {"loss", "meta_train_loss", "meta_test_loss", "reg/mmd"} <= set(logs)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)


def test_clear_errors():
    model, domains = Linear(), _domains()
    with pytest.raises(ValueError, match="inner_lr must be a finite number > 0"):
        MLDG(model, inner_lr=0.0)
    ml = MLDG(model, inner_lr=0.1)
    with pytest.raises(ValueError, match="needs several source domains"):
        ml.backward(domains["a"])
    with pytest.raises(ValueError, match="more source domains than meta_test_domains=1"):
        ml.backward({"a": domains["a"]})
    frozen = Linear().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        MLDG(frozen, inner_lr=0.1)


@pytest.mark.parametrize("first_order", [True, False])
def test_scale_accumulates_like_one_call(first_order):
    domains = _domains()
    one, two = Linear(), Linear()
    MLDG(one, inner_lr=0.1, first_order=first_order, seed=2).backward(domains)
    ml = MLDG(two, inner_lr=0.1, first_order=first_order, seed=2)
    for _ in range(2):
        ml.step = 0  # the same split both times: half the gradient each
        ml.backward(domains, scale=0.5)
    torch.testing.assert_close(two.w.grad, one.w.grad)


def test_a_model_reaching_a_module_by_two_paths_keeps_its_parameters():
    """The Amazon benchmark's TopModel keeps ``net = wrap(hf)`` and ``hf = base_model(net)``: one
    submodule, two paths. torch.func.functional_call left theta' in such a model after the meta-test
    forward (the next call then failed, or trained the wrong tensors); the swap puts theta back."""

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.alias = self.lin

        def forward(self, x, labels):
            return SimpleNamespace(loss=nn.functional.cross_entropy(self.alias(x), labels))

    torch.manual_seed(0)
    model = TwoPaths()
    weight = model.lin.weight
    before = weight.detach().clone()
    batches = {d: {"x": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])} for d in ("a", "b", "c")}
    ml = MLDG(model, inner_lr=0.5, first_order=True, seed=0)
    for _ in range(2):
        model.zero_grad()
        ml.backward(batches)
        assert model.lin.weight is weight and model.alias.weight is weight
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(weight.detach(), before)  # backward only: no tensor left behind
