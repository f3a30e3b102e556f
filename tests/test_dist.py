"""DIST (`kdray.losses.dist`) against a float64 loop reference written here, its invariances and its contract."""

from __future__ import annotations

import math

import pytest
import torch

from kdray.config import job_from_dict
from kdray.errors import ConfigError
from kdray.losses.dist import DIST
from kdray.testing import check_loss


# ----------------------------------------------------------------------------------------------------------------
# the reference: plain Python over nested lists, nothing shared with the module
# ----------------------------------------------------------------------------------------------------------------
def _probabilities(logits: list[float], tau: float, standardize: bool) -> list[float]:
    if standardize:
        k = len(logits)
        mean = sum(logits) / k
        std = math.sqrt(sum((v - mean) ** 2 for v in logits) / (k - 1))
        logits = [(v - mean) / (std + 1e-7) for v in logits]
    top = max(logits)
    e = [math.exp((v - top) / tau) for v in logits]
    total = sum(e)
    return [v / total for v in e]


def _rho(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    na = math.sqrt(sum((x - ma) ** 2 for x in a))
    nb = math.sqrt(sum((y - mb) ** 2 for y in b))
    return num / (na * nb + 1e-8)


def reference(zs: torch.Tensor, zt: torch.Tensor, tau: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
              scope: str = "batch", standardize: bool = False) -> float:
    s, t = zs.double().tolist(), zt.double().tolist()
    n_img, k, h, w = zs.shape
    ps, pt = {}, {}  # (n, i, j) -> the K probabilities
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                ps[n, i, j] = _probabilities([s[n][c][i][j] for c in range(k)], tau, standardize)
                pt[n, i, j] = _probabilities([t[n][c][i][j] for c in range(k)], tau, standardize)
    pixels = list(ps)
    inter = 1 - sum(_rho(ps[p], pt[p]) for p in pixels) / len(pixels)
    if scope == "batch":
        intra = 1 - sum(_rho([ps[p][c] for p in pixels], [pt[p][c] for p in pixels]) for c in range(k)) / k
    else:
        total = 0.0
        for n in range(n_img):
            own = [p for p in pixels if p[0] == n]
            for c in range(k):
                total += _rho([ps[p][c] for p in own], [pt[p][c] for p in own])
        intra = 1 - total / (n_img * k)
    return tau * tau * (beta * inter + gamma * intra)


def _logits(n: int, k: int = 4, h: int = 3, w: int = 5, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, k, h, w, generator=g)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# the value
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("scope", ["batch", "image"])
@pytest.mark.parametrize("standardize", [False, True])
def test_dist_equals_the_loop_reference(n, tau, scope, standardize):
    zs, zt = _logits(n, seed=1), _logits(n, seed=2)
    options = {"temperature": tau, "beta": 0.7, "gamma": 1.3, "intra_scope": scope, "standardize": standardize}
    expected = reference(zs, zt, tau, 0.7, 1.3, scope, standardize)
    assert DIST(**options)(zs, zt).item() == pytest.approx(expected, rel=1e-6)
    # float32 inputs: computed in float32, the same number to float32 rounding
    value = DIST(**options)(zs.float(), zt.float())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_dist_on_a_single_pixel_and_on_one_row_or_column():
    # one pixel: each class's column has one entry, ρ = 0 there (the 1e-8 guards 0/0), so intra = 1
    zs, zt = _logits(1, h=1, w=1, seed=3), _logits(1, h=1, w=1, seed=4)
    assert DIST()(zs, zt).item() == pytest.approx(reference(zs, zt), rel=1e-6)
    zs, zt = _logits(2, k=3, h=1, w=7, seed=5), _logits(2, k=3, h=1, w=7, seed=6)
    for scope in ("batch", "image"):
        assert DIST(intra_scope=scope)(zs, zt).item() == pytest.approx(reference(zs, zt, scope=scope), rel=1e-6)


def test_the_terms_weights_and_temperature():
    zs, zt = _logits(2, seed=7), _logits(2, seed=8)
    inter = DIST(beta=1.0, gamma=0.0)(zs, zt).item()
    intra = DIST(beta=0.0, gamma=1.0)(zs, zt).item()
    assert DIST(beta=2.0, gamma=3.0)(zs, zt).item() == pytest.approx(2 * inter + 3 * intra, rel=1e-12)
    assert DIST(beta=0.0, gamma=0.0)(zs, zt).item() == 0.0


def test_dist_of_equal_logits_is_only_the_epsilon():
    z = _logits(2, seed=9)
    for tau, bound in ((1.0, 1e-6), (4.0, 1e-4)):  # flatter p at τ = 4: smaller S, and × τ² = 16
        value = DIST(temperature=tau)(z, z.clone()).item()
        assert 0 < value < bound  # ρ = S/(S + 1e-8), not 1
        assert value == pytest.approx(reference(z, z, tau=tau), rel=1e-6)
    assert DIST()(z.float(), z.float()).abs().item() < 1e-5


def test_the_scopes_agree_on_one_image():
    zs, zt = _logits(1, seed=10), _logits(1, seed=11)
    batch = DIST(intra_scope="batch")(zs, zt).item()
    assert DIST(intra_scope="image")(zs, zt).item() == pytest.approx(batch, rel=1e-12)
    zs, zt = _logits(2, seed=10), _logits(2, seed=11)
    assert DIST(intra_scope="image")(zs, zt).item() != pytest.approx(DIST(intra_scope="batch")(zs, zt).item())


def test_standardize_makes_dist_invariant_to_an_affine_map_per_pixel():
    zs, zt = _logits(2, seed=12), _logits(2, seed=13)
    g = torch.Generator().manual_seed(14)
    a_s, a_t = (0.5 + 2.5 * torch.rand(2, 1, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    b_s, b_t = (5 * torch.randn(2, 1, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    for tau in (1.0, 4.0):
        loss = DIST(temperature=tau, standardize=True, intra_scope="image")
        assert loss(a_s * zs + b_s, a_t * zt + b_t).item() == pytest.approx(loss(zs, zt).item(), rel=1e-6)
    plain = DIST()
    assert plain(a_s * zs + b_s, zt).item() != pytest.approx(plain(zs, zt).item(), rel=1e-3)


def test_no_gradient_reaches_the_teacher():
    zs = _logits(2, seed=15).float().requires_grad_()
    zt = _logits(2, seed=16).float().requires_grad_()
    DIST(standardize=True)(zs, zt).backward()
    assert zt.grad is None
    assert zs.grad is not None and bool(zs.grad.isfinite().all()) and bool(zs.grad.ne(0).any())


def test_gradcheck_in_float64():
    zs = _logits(2, k=3, h=2, w=3, seed=17).requires_grad_()
    zt = _logits(2, k=3, h=2, w=3, seed=18)
    for scope in ("batch", "image"):
        assert torch.autograd.gradcheck(lambda s, scope=scope: DIST(2.0, intra_scope=scope)(s, zt), (zs,))


def test_bfloat16_under_autocast_is_float32():
    zs, zt = _logits(2, seed=19, dtype=torch.bfloat16), _logits(2, seed=20, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = DIST()(zs, zt)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(zs, zt), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the contract and the config
# ----------------------------------------------------------------------------------------------------------------
def test_dist_keeps_the_loss_contract():
    check_loss("dist")
    check_loss("dist", intra_scope="image", standardize=True)


@pytest.mark.parametrize("override", ["losses.dist.temperature=0", "losses.dist.beta=-1", "losses.dist.gamma=-0.5",
                                      "losses.dist.intra_scope=pixel", "losses.dist.standardize=maybe"])
def test_bad_options_are_refused_in_one_line(override):
    with pytest.raises(ConfigError) as err:
        job_from_dict({}, [override])
    message = str(err.value)
    assert "\n" not in message and "losses.dist." in message


def test_the_defaults_and_the_section():
    job = job_from_dict({}, ["losses.dist.enabled=true"])
    section = job.losses.dist
    assert (section.temperature, section.beta, section.gamma, section.intra_scope, section.standardize,
            section.weight) == (1.0, 1.0, 1.0, "batch", False, 1.0)
    with pytest.raises(ConfigError):
        DIST(intra_scope="pixel")
