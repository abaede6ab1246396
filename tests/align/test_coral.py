import itertools

import pytest
import torch

from peftadapt.align import CORAL, build

from . import _ref


def _data(m, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, d, generator=g, dtype=torch.float64),
        torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64),
    )


@pytest.mark.parametrize("m,n,d", [(5, 7, 3), (4, 4, 9), (12, 3, 2)])
def test_matches_paper_formula_with_unbiased_covariances(m, n, d):
    xs, xt = _data(m, n, d)
    got = CORAL()(xs, xt)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_ref.coral(xs, xt), rel=1e-10)


def test_scale_option():
    xs, xt = _data(6, 5, 4, seed=1)
    assert CORAL(scale=1.0)(xs, xt).item() == pytest.approx(_ref.coral(xs, xt, scale=1.0), rel=1e-10)
    assert CORAL(scale=2.5)(xs, xt).item() == pytest.approx(2.5 * CORAL(scale=1.0)(xs, xt).item(), rel=1e-12)


def test_gram_form_equals_direct_dxd_at_llm_width():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(16, 4096, generator=g, dtype=torch.float64)
    xt = torch.randn(24, 4096, generator=g, dtype=torch.float64) * 1.3 + 0.2
    direct = (torch.cov(xs.T) - torch.cov(xt.T)).pow(2).sum() / (4 * 4096**2)
    assert CORAL()(xs, xt).item() == pytest.approx(direct.item(), rel=1e-9)
    # fp32 path agrees with the fp64 direct formula too
    assert CORAL()(xs.float(), xt.float()).item() == pytest.approx(direct.item(), rel=1e-4)


def test_gradcheck():
    xs, xt = _data(5, 6, 4, seed=2)
    xs.requires_grad_(True)
    xt.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: CORAL(scale=1.0)(a, b), (xs, xt))


def test_zero_for_identical_batch_translation_invariant_grows_with_covariance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 16, generator=g)
    coral = CORAL()
    assert coral(x, x).item() == 0.0
    assert coral(x, x + 5.0).item() == pytest.approx(0.0, abs=1e-8)  # second-order only: no mean term
    vals = [coral(x, x * s).item() for s in (1.0, 1.2, 1.5, 2.0)]
    assert all(b > a for a, b in itertools.pairwise(vals)), vals
    # Gradient pushes the target covariance toward the source's.
    xt = (x * 2.0).requires_grad_(True)
    coral(x, xt).backward()
    assert (xt.grad * (xt.detach() - xt.detach().mean(0))).sum() > 0


def test_bf16_autocast_no_overflow_fp32_statistics():
    g = torch.Generator().manual_seed(0)
    xs = (torch.randn(16, 4096, generator=g) * 200).bfloat16()
    xt = (torch.randn(16, 4096, generator=g) * 260).bfloat16()
    want = CORAL()(xs.double(), xt.double()).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = CORAL()(xs, xt)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want, rel=1e-3)


def test_bad_inputs_and_options():
    coral = CORAL()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"at least 2 samples.*n - 1"):
        coral(torch.randn(1, 8), x)
    with pytest.raises(ValueError, match="width 8 but target features have width 3"):
        coral(x, torch.randn(4, 3))
    with pytest.raises(ValueError, match="empty batch"):
        coral(x, torch.randn(0, 8))
    with pytest.raises(ValueError, match="non-finite"):
        coral(x, torch.full((4, 8), float("nan")))
    with pytest.raises(TypeError, match="floating-point"):
        coral(x, torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="scale"):
        CORAL(scale=0)
    with pytest.raises(ValueError, match=r"valid options: \['scale'\]"):
        build("coral", weight=3)


def test_no_dxd_tensor_is_saved_for_backward():
    """Memory stays O(B^2 + B d): nothing of size d x d is kept for the backward pass."""
    d, b = 2048, 8
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    xs = torch.randn(b, d, requires_grad=True)
    xt = torch.randn(b, d, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CORAL()(xs, xt).backward()
    assert sizes and max(sizes) <= b * d  # a d x d covariance would be 4.2M elements
