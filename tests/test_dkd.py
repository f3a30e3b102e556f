"""DKD (`kdray.losses.dkd`) against a float64 loop reference written here, its identity with KD, its invariance
under standardization and its contract."""

from __future__ import annotations

import math

import pytest
import torch

from kdray.config import job_from_dict
from kdray.errors import ConfigError, PreflightError
from kdray.losses.dkd import DecoupledKD
from kdray.losses.kd import PixelwiseKD
from kdray.losses.objective import DistillationObjective
from kdray.losses.registry import LossContext, loss_spec
from kdray.models import SegmenterOutput
from kdray.testing import check_loss

IGNORE = 255


# ----------------------------------------------------------------------------------------------------------------
# the reference: plain Python over nested lists, nothing shared with the module
# ----------------------------------------------------------------------------------------------------------------
def _scaled(logits: list[float], temperature: float, standardize: bool) -> list[float]:
    if standardize:
        k = len(logits)
        mean = sum(logits) / k
        std = math.sqrt(sum((v - mean) ** 2 for v in logits) / (k - 1))
        logits = [(v - mean) / (std + 1e-7) for v in logits]
    return [v / temperature for v in logits]


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    e = [math.exp(v - top) for v in values]
    total = sum(e)
    return [v / total for v in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def pixel_parts(zs: list[float], zt: list[float], g: int, temperature: float = 1.0,
                standardize: bool = False) -> tuple[float, float]:
    """(TCKD, NCKD) at one pixel of class g."""
    ps = _softmax(_scaled(zs, temperature, standardize))
    pt = _softmax(_scaled(zt, temperature, standardize))
    tckd = _kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]])
    rest_s = _softmax([v for c, v in enumerate(_scaled(zs, temperature, standardize)) if c != g])
    rest_t = _softmax([v for c, v in enumerate(_scaled(zt, temperature, standardize)) if c != g])
    return tckd, _kl(rest_t, rest_s)


def reference(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
              alpha: float = 1.0, beta: float = 2.0, standardize: bool = False) -> float:
    s, t, y = zs.double().tolist(), zt.double().tolist(), labels.tolist()
    n_img, k, h, w = zs.shape
    tckd_sum = nckd_sum = 0.0
    count = 0
    for n in range(n_img):
        for i in range(h):
            for j in range(w):
                g = y[n][i][j]
                if g == IGNORE:
                    continue
                tckd, nckd = pixel_parts([s[n][c][i][j] for c in range(k)], [t[n][c][i][j] for c in range(k)],
                                         g, temperature, standardize)
                tckd_sum += tckd
                nckd_sum += nckd
                count += 1
    if count == 0:
        return 0.0
    return temperature ** 2 * (alpha * tckd_sum / count + beta * nckd_sum / count)


def _logits(n: int, k: int = 5, h: int = 3, w: int = 5, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(n, k, h, w, generator=g)).to(dtype)


def _labels(n: int, h: int = 3, w: int = 5, seed: int = 0) -> torch.Tensor:
    """Classes 0..2 and a fifth ignored; class 3 on exactly one pixel, class 4 (of K = 5) absent."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n, h, w), generator=g)
    labels[torch.rand(n, h, w, generator=g) < 0.2] = IGNORE
    labels[0, h - 1, 1] = 3
    return labels


# ----------------------------------------------------------------------------------------------------------------
# the value
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("standardize", [False, True])
def test_dkd_equals_the_loop_reference(n, temperature, standardize):
    zs, zt, y = _logits(n, seed=1), _logits(n, seed=2), _labels(n, seed=3)
    assert (y == 3).sum() == 1 and not (y == 4).any() and (y == IGNORE).any()
    options = {"temperature": temperature, "alpha": 0.6, "beta": 1.7, "standardize": standardize}
    expected = reference(zs, zt, y, temperature, 0.6, 1.7, standardize)
    assert DecoupledKD(**options)(zs, zt, y).item() == pytest.approx(expected, rel=1e-6)
    value = DecoupledKD(**options)(zs.float(), zt.float(), y)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_defaults_two_classes_and_full_size_labels():
    zs, zt, y = _logits(2, k=2, seed=4), _logits(2, k=2, seed=5), _labels(2, seed=6).clamp_max(1)
    y[1, 0, 0] = IGNORE
    assert DecoupledKD()(zs, zt, y).item() == pytest.approx(reference(zs, zt, y), rel=1e-6)
    # labels at 8× the logits' size are resized by nearest neighbour first
    big = y.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    assert DecoupledKD()(zs, zt, big).item() == pytest.approx(reference(zs, zt, y), rel=1e-6)


def test_all_ignored_gives_exactly_zero_with_a_graph():
    zs = _logits(2, seed=7).float().requires_grad_()
    zt = _logits(2, seed=8).float()
    value = DecoupledKD(temperature=4.0, standardize=True)(zs, zt, torch.full((2, 3, 5), IGNORE))
    assert value.dtype == torch.float32 and value.item() == 0.0 and value.requires_grad
    value.backward()
    assert zs.grad is not None and bool(zs.grad.eq(0).all())


def test_kd_is_tckd_plus_confidence_weighted_nckd_per_pixel():
    """KD_i = T²·(TCKD_i + (1 − p_T,g)·NCKD_i), with TCKD_i and NCKD_i from the module on one pixel."""
    zs, zt = _logits(1, k=6, h=2, w=3, seed=9), _logits(1, k=6, h=2, w=3, seed=10)
    for temperature in (1.0, 4.0):
        for i in range(2):
            for j in range(3):
                s, t = zs[:, :, i:i + 1, j:j + 1], zt[:, :, i:i + 1, j:j + 1]
                for g in (0, 3, 5):
                    y = torch.full((1, 1, 1), g)
                    t2_tckd = DecoupledKD(temperature, alpha=1.0, beta=0.0)(s, t, y).item()
                    t2_nckd = DecoupledKD(temperature, alpha=0.0, beta=1.0)(s, t, y).item()
                    p_tg = torch.softmax(t[0, :, 0, 0] / temperature, dim=0)[g].item()
                    kd = PixelwiseKD(temperature)(s, t).item()
                    assert kd == pytest.approx(t2_tckd + (1 - p_tg) * t2_nckd, rel=1e-9)
                    tckd, nckd = pixel_parts(s.flatten().tolist(), t.flatten().tolist(), g, temperature)
                    assert t2_tckd == pytest.approx(temperature ** 2 * tckd, rel=1e-9)
                    assert t2_nckd == pytest.approx(temperature ** 2 * nckd, rel=1e-9)


def test_dkd_is_zero_when_the_student_equals_the_teacher():
    z, y = _logits(2, seed=11), _labels(2, seed=12)
    for options in ({}, {"temperature": 4.0, "standardize": True}):
        assert DecoupledKD(**options)(z, z.clone(), y).item() == 0.0
        assert DecoupledKD(**options)(z.float(), z.float(), y).abs().item() < 1e-7


def test_standardize_makes_dkd_invariant_to_an_affine_map_per_pixel():
    zs, zt, y = _logits(2, seed=13), _logits(2, seed=14), _labels(2, seed=15)
    g = torch.Generator().manual_seed(16)
    a_s, a_t = (0.5 + 2.5 * torch.rand(2, 1, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    b_s, b_t = (5 * torch.randn(2, 1, 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    for temperature in (1.0, 4.0):
        loss = DecoupledKD(temperature, standardize=True)
        assert loss(a_s * zs + b_s, a_t * zt + b_t, y).item() == pytest.approx(loss(zs, zt, y).item(), rel=1e-6)
    plain = DecoupledKD()
    assert plain(a_s * zs + b_s, zt, y).item() != pytest.approx(plain(zs, zt, y).item(), rel=1e-3)


def test_no_gradient_reaches_the_teacher_and_none_is_nan():
    zs = _logits(2, seed=17).float().requires_grad_()
    zt = _logits(2, seed=18).float().requires_grad_()
    DecoupledKD(standardize=True)(zs, zt, _labels(2, seed=19)).backward()
    assert zt.grad is None
    assert zs.grad is not None and bool(zs.grad.isfinite().all()) and bool(zs.grad.ne(0).any())


def test_gradcheck_in_float64():
    zs = _logits(2, k=4, h=2, w=3, seed=20).requires_grad_()
    zt = _logits(2, k=4, h=2, w=3, seed=21)
    y = torch.tensor([[[0, 1, IGNORE], [3, 3, 2]], [[1, 1, 1], [0, IGNORE, 2]]])
    assert torch.autograd.gradcheck(lambda s: DecoupledKD(2.0, 1.0, 8.0)(s, zt, y), (zs,))


def test_bfloat16_under_autocast_is_float32():
    zs, zt, y = _logits(2, seed=22, dtype=torch.bfloat16), _logits(2, seed=23, dtype=torch.bfloat16), _labels(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = DecoupledKD()(zs, zt, y)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference(zs, zt, y), rel=1e-5)


def test_one_class_is_refused():
    z = _logits(1, k=1)
    with pytest.raises(PreflightError, match="K >= 2"):
        DecoupledKD()(z, z, torch.zeros(1, 3, 5, dtype=torch.long))


def test_the_ignore_value_comes_from_the_context():
    config = job_from_dict({}, ["losses.dkd.enabled=true"]).losses.dkd
    module = loss_spec("dkd").make(config, LossContext(5, 7, {"head": 4}, {"head": 6}))
    assert module.ignore_index == 7
    zs, zt, y = _logits(1, seed=24), _logits(1, seed=25), _labels(1, seed=26)
    y[y == IGNORE] = 7
    assert module(zs, zt, y).item() == pytest.approx(reference(zs, zt, y.masked_fill(y == 7, IGNORE)), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# aux_weight: the same loss on the auxiliary heads' logits, the labels at their size
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("standardize", [False, True])
def test_aux_weight_adds_the_reference_on_the_auxiliary_logits(standardize):
    zs, zt, y = _logits(2, seed=27), _logits(2, seed=28), _labels(2, seed=29)
    aux_s, aux_t = _logits(2, seed=30), _logits(2, seed=31)  # kdray's auxiliary logits: at the logits' h×w
    options = {"temperature": 4.0, "alpha": 0.6, "beta": 1.7, "standardize": standardize}
    expected = (reference(zs, zt, y, 4.0, 0.6, 1.7, standardize)
                + 0.4 * reference(aux_s, aux_t, y, 4.0, 0.6, 1.7, standardize))
    assert DecoupledKD(**options, aux_weight=0.4)(zs, zt, y, aux_s, aux_t).item() == pytest.approx(expected, rel=1e-6)
    value = DecoupledKD(**options, aux_weight=0.4)(zs.float(), zt.float(), y, aux_s.float(), aux_t.float())
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected, rel=1e-5)


def test_the_auxiliary_term_takes_the_labels_at_its_own_size():
    zs, zt, y = _logits(2, seed=32), _logits(2, seed=33), _labels(2, seed=34)
    aux_s, aux_t = _logits(2, h=6, w=10, seed=35), _logits(2, h=6, w=10, seed=36)  # another size: y resized to it
    big = y.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    expected = reference(zs, zt, y) + 0.5 * reference(aux_s, aux_t, big)
    assert DecoupledKD(aux_weight=0.5)(zs, zt, big, aux_s, aux_t).item() == pytest.approx(expected, rel=1e-6)


def test_aux_weight_zero_ignores_the_auxiliary_logits_and_reads_none():
    zs, zt, y = _logits(2, seed=37), _logits(2, seed=38), _labels(2, seed=39)
    assert DecoupledKD()(zs, zt, y, _logits(2, seed=40), _logits(2, seed=41)).item() == DecoupledKD()(zs, zt, y).item()
    spec = loss_spec("dkd")
    assert set(spec.inputs(job_from_dict({}, ["losses.dkd.enabled=true"]).losses.dkd)) == {
        "student_logits", "teacher_logits", "labels"}
    reads = spec.inputs(job_from_dict({}, ["losses.dkd.enabled=true", "losses.dkd.aux_weight=0.4"]).losses.dkd)
    assert (reads["student_aux_logits"].key, reads["teacher_aux_logits"].key) == (
        "student.aux_logits", "teacher.aux_logits")


def test_all_ignored_with_the_aux_term_is_exactly_zero():
    zs, aux_s = (_logits(2, seed=seed).float().requires_grad_() for seed in (42, 43))
    zt, aux_t = _logits(2, seed=44).float(), _logits(2, seed=45).float()
    value = DecoupledKD(aux_weight=0.4)(zs, zt, torch.full((2, 3, 5), IGNORE), aux_s, aux_t)
    assert value.item() == 0.0 and value.dtype == torch.float32
    value.backward()
    assert bool(zs.grad.eq(0).all()) and bool(aux_s.grad.eq(0).all())


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_a_model_without_an_auxiliary_head_fails_the_preflight_naming_it(side):
    job = job_from_dict({}, ["losses.dkd.enabled=true", "losses.dkd.aux_weight=0.4"])
    objective = DistillationObjective(job.losses, num_classes=5, student_channels=8, teacher_channels=8)

    def outputs(aux: bool) -> SegmenterOutput:
        aux_logits = torch.randn(2, 5, 3, 5) if aux else None
        return SegmenterOutput(torch.randn(2, 5, 3, 5), torch.randn(2, 8, 3, 5), aux_logits)

    labels = torch.randint(0, 5, (2, 24, 40))
    with_heads = objective.step_tensors(outputs(True), outputs(True), labels, torch.zeros(2, 3, 24, 40))
    objective.preflight(with_heads)
    s, t = outputs(side != "student"), outputs(side != "teacher")
    with pytest.raises(PreflightError, match=f"^losses.dkd: needs the {side}'s auxiliary logits, but the {side} has "
                                             "no auxiliary head, which losses.dkd.aux_weight=0.4 reads"):
        objective.preflight(objective.step_tensors(s, t, labels, torch.zeros(2, 3, 24, 40)))


# ----------------------------------------------------------------------------------------------------------------
# the contract and the config
# ----------------------------------------------------------------------------------------------------------------
def test_dkd_keeps_the_loss_contract():
    check_loss("dkd")
    check_loss("dkd", standardize=True, temperature=2.0)
    check_loss("dkd", aux_weight=0.4)


@pytest.mark.parametrize("override", ["losses.dkd.temperature=0", "losses.dkd.alpha=-1", "losses.dkd.beta=-0.1",
                                      "losses.dkd.standardize=maybe", "losses.dkd.gamma=1",
                                      "losses.dkd.aux_weight=-1"])
def test_bad_options_are_refused_in_one_line(override):
    with pytest.raises(ConfigError) as err:
        job_from_dict({}, [override])
    message = str(err.value)
    assert "\n" not in message and "losses.dkd." in message


def test_the_defaults():
    section = job_from_dict({}, ["losses.dkd.enabled=true"]).losses.dkd
    assert (section.temperature, section.alpha, section.beta, section.standardize, section.aux_weight,
            section.weight) == (1.0, 1.0, 2.0, False, 0.0, 1.0)
