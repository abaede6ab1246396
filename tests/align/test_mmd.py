import itertools

import pytest
import torch

from peftadapt.align import MMD, build

from . import _ref

MULTS = (0.25, 0.5, 1.0, 2.0, 4.0)


def _data(m=6, n=5, d=4, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, d, generator=g, dtype=torch.float64),
        torch.randn(n, d, generator=g, dtype=torch.float64) + shift,
    )


def test_unbiased_matches_gretton_formula_unequal_batches():
    x, y = _data(6, 5, shift=0.7)
    got = MMD(bandwidth=1.3)(x, y)
    want = _ref.mmd_unbiased(x.tolist(), y.tolist(), 1.3, MULTS)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("bw", ["mean", "median"])
def test_batch_bandwidth_is_mean_or_median_pair_distance(bw):
    x, y = _data(5, 4, shift=0.5, seed=1)
    pairs = _ref.pair_sq_dists(x.tolist() + y.tolist())
    pairs.sort()
    h = sum(pairs) / len(pairs) if bw == "mean" else (pairs[(len(pairs) - 1) // 2])  # torch: lower median
    got = MMD(bandwidth=bw)(x, y)
    assert got.item() == pytest.approx(_ref.mmd_unbiased(x.tolist(), y.tolist(), h, MULTS), rel=1e-9)


def test_linear_estimator_matches_formula():
    x, y = _data(7, 7, shift=0.4, seed=2)  # odd: the 7th sample is unused
    got = MMD(bandwidth=2.0, estimator="linear", kernel_multipliers=(1.0, 3.0))(x, y)
    assert got.item() == pytest.approx(_ref.mmd_linear(x.tolist(), y.tolist(), 2.0, (1.0, 3.0)), rel=1e-10)


def test_linear_mean_bandwidth_uses_pooled_batch():
    x, y = _data(6, 6, shift=0.4, seed=3)
    pairs = _ref.pair_sq_dists(x.tolist() + y.tolist())
    h = sum(pairs) / len(pairs)
    got = MMD(estimator="linear")(x, y)
    assert got.item() == pytest.approx(_ref.mmd_linear(x.tolist(), y.tolist(), h, MULTS), rel=1e-9)


@pytest.mark.parametrize("estimator", ["unbiased", "linear"])
def test_gradcheck(estimator):
    x, y = _data(6, 6, shift=0.3)
    x.requires_grad_(True)
    y.requires_grad_(True)
    mmd = MMD(bandwidth=1.7, estimator=estimator)  # fixed h: the batch bandwidth is detached by design
    assert torch.autograd.gradcheck(lambda a, b: mmd(a, b), (x, y))


def test_batch_bandwidth_is_detached():
    x, y = _data(6, 6, shift=0.3)
    x.requires_grad_(True)
    mmd = MMD()
    mmd(x, y).backward()
    g_auto = x.grad.clone()
    h = MMD()._base_bandwidth(torch.cat([x.detach(), y]))
    x.grad = None
    MMD(bandwidth=float(h))(x, y).backward()
    torch.testing.assert_close(g_auto, x.grad)


def test_zero_for_same_distribution_and_grows_with_shift():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 16, generator=g)
    same = torch.randn(64, 16, generator=g)
    mmd = MMD()
    vals = [mmd(base, same + s).item() for s in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert abs(vals[0]) < 0.05
    assert all(b > a for a, b in itertools.pairwise(vals)), vals
    scaled = [mmd(base, same * s).item() for s in (1.0, 1.5, 2.5)]
    assert all(b > a for a, b in itertools.pairwise(scaled)), scaled
    assert scaled[-1] > 10 * abs(vals[0])


def test_bf16_autocast_computes_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(32, 512, generator=g) * 30).bfloat16()
    y = (torch.randn(32, 512, generator=g) * 30 + 3).bfloat16()
    want = MMD(bandwidth=1e5)(x.double(), y.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MMD(bandwidth=1e5)(x, y)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)  # a bf16 matmul is off by ~2e-3


def test_registry_and_options():
    assert isinstance(build("mmd", estimator="linear"), MMD)
    with pytest.raises(ValueError, match=r"valid estimators: \['unbiased', 'linear'\]"):
        MMD(estimator="quadratic")
    with pytest.raises(ValueError, match="bandwidth"):
        MMD(bandwidth="max")
    with pytest.raises(ValueError, match="kernel_multipliers"):
        MMD(kernel_multipliers=(1.0, -2.0))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['kernels'\].*valid options"):
        build("mmd", kernels=3)


def test_bad_inputs():
    mmd = MMD()
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="width 8 but target features have width 6"):
        mmd(x, torch.randn(4, 6))
    with pytest.raises(ValueError, match="at least 2 samples"):
        mmd(x, torch.randn(1, 8))
    with pytest.raises(ValueError, match="empty batch"):
        mmd(torch.randn(0, 8), x)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*1 NaN"):
        mmd(bad, x)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="1 inf"):
        mmd(x, bad)
    with pytest.raises(ValueError, match="2-D"):
        mmd(torch.randn(4, 3, 8), x)
    with pytest.raises(ValueError, match="equal batch sizes"):
        MMD(estimator="linear")(x, torch.randn(6, 8))


def test_large_common_offset_does_not_cancel_in_fp32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 256, generator=g, dtype=torch.float64)
    y = torch.randn(16, 256, generator=g, dtype=torch.float64) * 1.3 + 0.2
    offset = torch.randn(256, generator=g, dtype=torch.float64) * 1e3  # LLM-style massive activations
    want = MMD()(x, y).item()
    got = MMD()((x + offset).float(), (y + offset).float()).item()
    assert got == pytest.approx(want, rel=1e-3)
