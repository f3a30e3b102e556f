"""Logit standardization (`standardize` on the logit losses): KD against a float64 loop, and its invariance."""

import math

import pytest
import torch

from kdray.losses.kd import PixelwiseKD
from kdray.losses.standardize import standardize_logits
from kdray.testing import check_loss


def _loop_kd(zs, zt, temperature, standardize):
    """T²/P Σ_i KL(p_T,i ‖ p_S,i) with plain Python, standardizing each pixel's logits first when asked."""
    n, k, h, w = zs.shape

    def prepare(v):
        if not standardize:
            return v
        mean = sum(v) / k
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (k - 1))
        return [(x - mean) / (std + 1e-7) for x in v]

    def log_softmax(v):
        top = max(v)
        lse = top + math.log(sum(math.exp(x - top) for x in v))
        return [x - lse for x in v]

    total = 0.0
    for a in range(n):
        for y in range(h):
            for x in range(w):
                s = prepare([zs[a, c, y, x].item() / 1.0 for c in range(k)])
                t = prepare([zt[a, c, y, x].item() / 1.0 for c in range(k)])
                ls = log_softmax([v / temperature for v in s])
                lt = log_softmax([v / temperature for v in t])
                total += sum(math.exp(lt[c]) * (lt[c] - ls[c]) for c in range(k))
    return temperature ** 2 * total / (n * h * w)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_kd_matches_a_float64_loop(n, temperature, standardize):
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(n, 5, 3, 7, generator=g, dtype=torch.float64), torch.randn(n, 5, 3, 7, generator=g,
                                                                                   dtype=torch.float64) * 3
    got = PixelwiseKD(temperature=temperature, standardize=standardize)(zs, zt).item()
    assert got == pytest.approx(_loop_kd(zs, zt, temperature, standardize), rel=1e-6)


def test_standardized_kd_ignores_each_pixels_scale_and_shift():
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64), torch.randn(2, 6, 4, 5, generator=g,
                                                                                   dtype=torch.float64)
    a = torch.rand(2, 1, 4, 5, generator=g, dtype=torch.float64) * 5 + 0.1
    b = torch.randn(2, 1, 4, 5, generator=g, dtype=torch.float64) * 10
    kd = PixelwiseKD(temperature=2.0, standardize=True)
    assert kd(a * zs + b, zt).item() == pytest.approx(kd(zs, zt).item(), rel=1e-7)
    assert kd(zs, a * zt + b).item() == pytest.approx(kd(zs, zt).item(), rel=1e-7)
    assert PixelwiseKD(temperature=2.0)(a * zs + b, zt).item() != pytest.approx(kd(zs, zt).item(), rel=1e-3)


def test_standardized_logits_have_zero_mean_and_unit_std_per_pixel_in_float32_at_least():
    z = torch.randn(2, 7, 3, 4).bfloat16()
    out = standardize_logits(z)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(2, 3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(dim=1), torch.ones(2, 3, 4), atol=1e-5, rtol=0)


def test_standardized_kd_keeps_the_loss_contract():
    check_loss("kd", standardize=True, temperature=2.0)
    check_loss("kd", standardize=True, mask_ignore=True)
