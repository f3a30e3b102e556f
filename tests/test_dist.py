"""DIST (`kdray.losses.dist`) against a float64 loop reference written here, its invariances and its contract."""

from __future__ import annotations

import math

import pytest
import torch

from kdray.config import job_from_dict
from kdray.engine.inputs import check_losses
from kdray.errors import ConfigError, PreflightError
from kdray.losses.dist import DIST
from kdray.losses.objective import DistillationObjective
from kdray.losses.registry import loss_spec
from kdray.models import SegmenterOutput, build_model
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


@pytest.mark.parametrize("scope", ["batch", "image"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_pixel_with_equal_logits_keeps_its_value_and_passes_no_spike(scope, dtype):
    """A dead head's pixel (all K logits equal, its probabilities uniform): ρ there is 0/0 made 0 by the 1e-8
    and its formula gradient (b − b̄)/1e-8 a spike of ~1e8 (a narrow auxiliary head's CE blew up to 1e9 in two
    steps). The value still equals the reference; the gradient stays of the size of the other pixels'."""
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(2, 19, 3, 5, generator=g, dtype=dtype), torch.randn(2, 19, 3, 5, generator=g, dtype=dtype)
    zs[0, :, 1, 2] = 0.0
    zs[1, :, 2, 4] = 3.25
    zs.requires_grad_(True)
    value = DIST(intra_scope=scope)(zs, zt)
    assert value.item() == pytest.approx(reference(zs.detach(), zt, scope=scope), rel=1e-6)
    value.backward()
    assert zs.grad.abs().max().item() < 1.0
    assert zs.grad[0, :, 1, 2].abs().max().item() < 1.0  # the flat pixel still gets its intra-term gradient


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
# aux_weight: the same loss on the auxiliary heads' logits
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["batch", "image"])
@pytest.mark.parametrize("standardize", [False, True])
def test_aux_weight_adds_the_reference_on_the_auxiliary_logits(scope, standardize):
    zs, zt = _logits(2, seed=21), _logits(2, seed=22)
    aux_s, aux_t = _logits(2, h=2, w=4, seed=23), _logits(2, h=2, w=4, seed=24)  # any h'×w' (kdray's: h×w)
    options = {"temperature": 4.0, "beta": 0.7, "gamma": 1.3, "intra_scope": scope, "standardize": standardize}
    expected = (reference(zs, zt, 4.0, 0.7, 1.3, scope, standardize)
                + 0.4 * reference(aux_s, aux_t, 4.0, 0.7, 1.3, scope, standardize))
    value = DIST(**options, aux_weight=0.4)(zs, zt, aux_s, aux_t)
    assert value.item() == pytest.approx(expected, rel=1e-6)
    value = DIST(**options, aux_weight=0.4)(zs.float(), zt.float(), aux_s.float(), aux_t.float())
    assert value.dtype == torch.float32 and value.item() == pytest.approx(expected, rel=1e-5)


def test_aux_weight_zero_ignores_the_auxiliary_logits_and_reads_none():
    zs, zt, aux_s, aux_t = (_logits(2, seed=seed) for seed in (25, 26, 27, 28))
    assert DIST()(zs, zt, aux_s, aux_t).item() == DIST()(zs, zt).item()
    spec = loss_spec("dist")
    assert set(spec.inputs(job_from_dict({}, ["losses.dist.enabled=true"]).losses.dist)) == {
        "student_logits", "teacher_logits"}
    config = job_from_dict({}, ["losses.dist.enabled=true", "losses.dist.aux_weight=0.4"]).losses.dist
    assert config.aux_weight == 0.4
    reads = spec.inputs(config)
    assert (reads["student_aux_logits"].key, reads["teacher_aux_logits"].key) == (
        "student.aux_logits", "teacher.aux_logits")
    assert reads["student_aux_logits"].required and reads["teacher_aux_logits"].required


def test_aux_weight_gradients_reach_the_student_heads_only():
    zs, zt, aux_s, aux_t = (_logits(2, seed=seed).float().requires_grad_() for seed in (29, 30, 31, 32))
    DIST(aux_weight=0.4)(zs, zt, aux_s, aux_t).backward()
    assert zt.grad is None and aux_t.grad is None
    assert bool(zs.grad.ne(0).any()) and bool(aux_s.grad.ne(0).any())
    with pytest.raises(PreflightError, match="aux_weight=0.4 needs .*None for teacher_aux_logits"):
        DIST(aux_weight=0.4)(zs, zt, aux_s, None)


def _objective(*overrides: str) -> DistillationObjective:
    job = job_from_dict({}, ["losses.dist.enabled=true", *overrides])
    return DistillationObjective(job.losses, num_classes=4, student_channels=8, teacher_channels=8)


def _outputs(aux: bool) -> SegmenterOutput:
    return SegmenterOutput(torch.randn(2, 4, 3, 5), torch.randn(2, 8, 3, 5), torch.randn(2, 4, 3, 5) if aux else None)


def test_the_objective_packs_the_teachers_auxiliary_logits():
    objective = _objective("losses.dist.aux_weight=0.4")
    assert objective.reads("teacher.aux_logits") and not _objective().reads("teacher.aux_logits")
    s, t = _outputs(aux=True), _outputs(aux=True)
    tensors = objective.step_tensors(s, t, torch.zeros(2, 24, 40, dtype=torch.long), torch.zeros(2, 3, 24, 40))
    assert torch.equal(tensors["teacher.aux_logits"], t.aux_logits)
    objective.preflight(tensors)
    total, parts = objective(tensors)
    expected = DIST()(s.logits, t.logits) + 0.4 * DIST()(s.aux_logits, t.aux_logits)
    assert parts["dist"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("side", ["teacher", "student"])
def test_a_model_without_an_auxiliary_head_fails_the_preflight_naming_it(side):
    objective = _objective("losses.dist.aux_weight=0.4")
    s, t = _outputs(aux=side != "student"), _outputs(aux=side != "teacher")
    tensors = objective.step_tensors(s, t, torch.zeros(2, 24, 40, dtype=torch.long), torch.zeros(2, 3, 24, 40))
    with pytest.raises(PreflightError) as err:
        objective.preflight(tensors)
    message = str(err.value)
    assert message.startswith(f"losses.dist: needs the {side}'s auxiliary logits, but the {side} has no auxiliary "
                              "head, which losses.dist.aux_weight=0.4 reads")
    assert "set losses.dist.aux_weight=0" in message and "\n" not in message
    _objective().preflight(tensors)  # without aux_weight the heads are not needed


def _job(tmp_path, teacher_aux: bool, *overrides: str):
    path = tmp_path / f"teacher-aux-{teacher_aux}.pt"
    torch.save(build_model("deeplabv3_resnet18", 8, aux=teacher_aux, width=0.125).state_dict(), path)
    data = {"data": {"num_classes": 8, "crop": [32, 32], "batch_size": 2},
            "teacher": {"arch": "deeplabv3_resnet18", "width": 0.125, "checkpoint": str(path)},
            "student": {"arch": "deeplabv3_resnet18", "width": 0.125}}
    return job_from_dict(data, ["losses.dist.enabled=true", *overrides])


def test_a_job_with_aux_weight_and_a_teacher_without_the_head_stops_before_any_compute(tmp_path):
    check_losses(_job(tmp_path, True, "losses.dist.aux_weight=0.4"))
    check_losses(_job(tmp_path, False))  # no aux term: the teacher's head is not needed
    with pytest.raises(PreflightError, match=r"^losses.dist: needs the teacher's auxiliary logits, but the teacher "
                                             r"has no auxiliary head, .*auxlayer"):
        check_losses(_job(tmp_path, False, "losses.dist.aux_weight=0.4"))
    # the student gets its head whenever a loss requires it (student.aux, the default), CE's aux term or not
    check_losses(_job(tmp_path, True, "losses.dist.aux_weight=0.4", "losses.ce.aux_weight=0"))
    with pytest.raises(PreflightError, match="the student has no auxiliary head, .*student.aux=true"):
        check_losses(_job(tmp_path, True, "losses.dist.aux_weight=0.4", "student.aux=false"))


def test_the_segmenter_computes_its_auxiliary_head_in_eval_mode_when_asked():
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 4, width=0.125).eval()
    images = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert model(images).aux_logits is None  # aux=None: as the mode says
        out = model(images, aux=True)
        assert out.aux_logits is not None and out.aux_logits.shape == out.logits.shape == (2, 4, 3, 5)
        assert torch.equal(out.aux_logits, model.auxlayer(model.pretrained(images)[2]))  # BN statistics, no dropout
        model.train()
        assert model(images).aux_logits is not None and model(images, aux=False).aux_logits is None
        assert build_model("deeplabv3_resnet18", 4, aux=False, width=0.125).eval()(images, aux=True).aux_logits is None


# ----------------------------------------------------------------------------------------------------------------
# the contract and the config
# ----------------------------------------------------------------------------------------------------------------
def test_dist_keeps_the_loss_contract():
    check_loss("dist")
    check_loss("dist", intra_scope="image", standardize=True)
    check_loss("dist", aux_weight=0.4)


@pytest.mark.parametrize("override", ["losses.dist.temperature=0", "losses.dist.beta=-1", "losses.dist.gamma=-0.5",
                                      "losses.dist.intra_scope=pixel", "losses.dist.standardize=maybe",
                                      "losses.dist.aux_weight=-0.4"])
def test_bad_options_are_refused_in_one_line(override):
    with pytest.raises(ConfigError) as err:
        job_from_dict({}, [override])
    message = str(err.value)
    assert "\n" not in message and "losses.dist." in message


def test_the_defaults_and_the_section():
    job = job_from_dict({}, ["losses.dist.enabled=true"])
    section = job.losses.dist
    assert (section.temperature, section.beta, section.gamma, section.intra_scope, section.standardize,
            section.aux_weight, section.weight) == (1.0, 1.0, 1.0, "batch", False, 0.0, 1.0)
    with pytest.raises(ConfigError):
        DIST(intra_scope="pixel")
