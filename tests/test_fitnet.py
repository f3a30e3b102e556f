"""FitNet hint (`kdray.losses.fitnet`): equal to a float64 loop over every element, zero when the adapted student
matches the teacher, the registry contract at the head and at a backbone layer, and a run that trains with it."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import tiny_job

from kdray.config import job_from_dict
from kdray.engine import train
from kdray.errors import ConfigError, PreflightError
from kdray.losses import LOSSES, LossContext
from kdray.losses.fitnet import FitNetHint
from kdray.testing import check_loss


def reference_hint(weight, student, teacher) -> float:
    """mean over n, t, y, x of (Σ_s W[t, s]·f_S[n, s, y, x] − f_T[n, t, y, x])², as plain float64 loops."""
    n_images, c_s, h, w = student.shape
    c_t = teacher.shape[1]
    w_ = weight.double().tolist()
    s_ = student.double().tolist()
    t_ = teacher.double().tolist()
    total = 0.0
    for n in range(n_images):
        for t in range(c_t):
            for y in range(h):
                for x in range(w):
                    mapped = 0.0
                    for s in range(c_s):
                        mapped += w_[t][s] * s_[n][s][y][x]
                    total += (mapped - t_[n][t][y][x]) ** 2
    return total / (n_images * c_t * h * w)


@pytest.mark.parametrize("n", [1, 2])
def test_equals_the_loop_reference_on_odd_non_square_maps(n):
    g = torch.Generator().manual_seed(n)
    c_s, c_t, h, w = 3, 5, 5, 7
    loss = FitNetHint(c_s, c_t).double()
    student = torch.randn(n, c_s, h, w, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, c_t, h, w, generator=g, dtype=torch.float64)
    value = loss(student, teacher)
    expected = reference_hint(loss.adapter.conv.weight.detach()[:, :, 0, 0], student, teacher)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_float32_inputs_give_a_float32_value_close_to_the_reference():
    g = torch.Generator().manual_seed(7)
    loss = FitNetHint(4, 6)
    student, teacher = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 6, 3, 5, generator=g)
    value = loss(student, teacher)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference_hint(loss.adapter.conv.weight.detach()[:, :, 0, 0], student,
                                                        teacher), rel=1e-5)


def test_zero_when_the_adapted_student_is_the_teacher():
    g = torch.Generator().manual_seed(3)
    c_s, c_t = 3, 5
    loss = FitNetHint(c_s, c_t).double()
    mixing = torch.randn(c_t, c_s, generator=g, dtype=torch.float64)
    with torch.no_grad():
        loss.adapter.conv.weight.copy_(mixing[:, :, None, None])
    student = torch.randn(2, c_s, 5, 7, generator=g, dtype=torch.float64)
    teacher = torch.einsum("ts,nsyx->ntyx", mixing, student)
    assert loss(student, teacher).item() == pytest.approx(0.0, abs=1e-24)


def test_gradients_reach_the_student_and_the_adapter_never_the_teacher():
    g = torch.Generator().manual_seed(4)
    loss = FitNetHint(3, 5)
    student = torch.randn(1, 3, 5, 7, generator=g, requires_grad=True)
    teacher = torch.randn(1, 5, 5, 7, generator=g, requires_grad=True)
    loss(student, teacher).backward()
    assert student.grad is not None and bool(student.grad.ne(0).any())
    assert loss.adapter.conv.weight.grad is not None and bool(loss.adapter.conv.weight.grad.ne(0).any())
    assert teacher.grad is None


def test_mismatched_maps_are_refused_with_both_shapes():
    loss = FitNetHint(3, 5)
    with pytest.raises(PreflightError, match=r"\(1, 3, 5, 7\).*\(1, 5, 5, 6\)"):
        loss(torch.randn(1, 3, 5, 7), torch.randn(1, 5, 5, 6))
    with pytest.raises(PreflightError, match="must have 3 and 5 channels"):
        loss(torch.randn(1, 3, 5, 7), torch.randn(1, 4, 5, 7))


def test_the_adapter_is_sized_from_the_tap_it_reads():
    spec = LOSSES["fitnet"]
    config = spec.config(enabled=True, tap="backbone.layer2")
    assert {i.key for i in spec.inputs(config).values()} == {"student.features[backbone.layer2]",
                                                            "teacher.features[backbone.layer2]"}
    context = LossContext(19, 255, {"head": 128, "backbone.layer2": 128}, {"head": 256, "backbone.layer2": 512})
    module = spec.make(config, context)
    assert module.adapter.conv.weight.shape[:2] == (512, 128)


def test_defaults_are_the_cirkd_recipe():
    config = job_from_dict({}).losses.fitnet
    assert (config.enabled, config.weight, config.tap) == (False, 10.0, "head")


def test_keeps_the_registry_contract_at_the_head():
    check_loss("fitnet")


def test_keeps_the_registry_contract_at_a_backbone_layer():
    check_loss("fitnet", tap="backbone.layer2")


def test_a_layer_the_model_lacks_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^losses.fitnet: got 'student layer backbone.layer5'; .*valid: ") as err:
        job_from_dict({}, ["losses.fitnet.enabled=true", "losses.fitnet.tap=backbone.layer5"])
    assert "\n" not in str(err.value)


def test_a_run_trains_with_a_hint_on_layer3(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.fitnet.enabled": True, "losses.fitnet.tap": "backbone.layer3"})
    logs = []
    result = train(job, tmp_path / "s", log=logs.append, progress=False)
    assert result.iterations == 6 and "train/loss/fitnet" in logs[-1]
    assert all(math.isfinite(entry["train/loss/fitnet"]) for entry in logs)
