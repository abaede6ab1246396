"""make_optimizer: torch AdamW, bitsandbytes 8-bit AdamW, paged variants on the CPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from peftadapt.quant import OPTIMIZERS, make_optimizer


def _one_step(name, seed=0, n=8192):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n))
    g = torch.randn(n)
    opt = make_optimizer([p], name=name, lr=1e-2)
    p.grad = g.clone()
    opt.step()
    return opt, p.detach().clone()


def test_adamw_8bit_first_step_matches_torch_adamw():
    # Adam's first step is -lr * g / (|g| + eps) = -lr * sign(g): the 8-bit state must reproduce it.
    torch.manual_seed(0)
    start = torch.randn(8192)
    _, ref = _one_step("adamw_torch")
    opt, got = _one_step("adamw_8bit")
    assert type(opt).__name__ == "AdamW8bit"
    assert opt.state[opt.param_groups[0]["params"][0]]["state1"].dtype == torch.uint8  # really 8-bit state
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert (ref - start).abs().mean() > 5e-3  # the step did move the weights


def test_paged_optimizer_on_cpu_warns_and_uses_the_unpaged_rule():
    with pytest.warns(UserWarning, match="non-paged bitsandbytes AdamW8bit"):
        opt, got = _one_step("paged_adamw_8bit")
    assert type(opt).__name__ == "AdamW8bit"
    _, want = _one_step("adamw_8bit")
    assert torch.equal(got, want)
    with pytest.warns(UserWarning, match="non-paged bitsandbytes AdamW32bit"):
        opt, _ = _one_step("paged_adamw_32bit")
    assert type(opt).__name__ == "AdamW32bit"


def test_make_optimizer_checks_its_arguments():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(
        ValueError,
        match=r"unknown optimizer 'sgd'.*'adamw_torch', 'adamw_8bit', 'paged_adamw_8bit', 'paged_adamw_32bit'",
    ):
        make_optimizer([p], name="sgd")
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer([], name="adamw_torch")
    with pytest.raises(ValueError, match="lr must be a positive"):
        make_optimizer([p], name="adamw_torch", lr=0)
    assert set(OPTIMIZERS) == {"adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(make_optimizer([p], "ADAMW_TORCH", lr=1e-3), torch.optim.AdamW)


def test_the_device_argument_decides_the_cpu_fallback():
    # a trainer builds its optimizer before Accelerate moves the model: the target device decides
    p = torch.nn.Parameter(torch.zeros(8192))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the parameters will be on the GPU
        opt = make_optimizer([p], "paged_adamw_8bit", lr=1e-3, device="cuda")  # built lazily: no GPU needed yet
    assert type(opt).__name__ == "PagedAdamW8bit"
    with pytest.warns(UserWarning, match="non-paged"):
        opt = make_optimizer([p], "paged_adamw_8bit", lr=1e-3, device="cpu")
    assert type(opt).__name__ == "AdamW8bit"
