"""Attention transfer (`kdray.losses.attention`): equal to a float64 loop reference per tap and summed over taps,
zero when the student is a positive multiple of the teacher, the option rules, the registry contract, and runs
that train with it."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import tiny_job

from kdray.config import job_from_dict
from kdray.engine import train
from kdray.errors import ConfigError, PreflightError
from kdray.losses import LOSSES
from kdray.losses.attention import AttentionTransfer
from kdray.testing import check_loss


def reference_attention(features, p: float) -> list[list[float]]:
    """Per image, the list over positions (row-major) of (1/C) Σ_c |f_c|^p, divided by its Euclidean norm."""
    f = features.double().tolist()
    maps = []
    for image in f:
        channels, h, w = len(image), len(image[0]), len(image[0][0])
        raw = []
        for y in range(h):
            for x in range(w):
                acc = 0.0
                for c in range(channels):
                    acc += abs(image[c][y][x]) ** p
                raw.append(acc / channels)
        norm = max(math.sqrt(sum(v * v for v in raw)), 1e-12)
        maps.append([v / norm for v in raw])
    return maps


def reference_at(pairs, p: float) -> float:
    """Σ over (student, teacher) pairs of the mean over images and positions of the squared map difference."""
    total = 0.0
    for student, teacher in pairs:
        a_s, a_t = reference_attention(student, p), reference_attention(teacher, p)
        squares = [(s - t) ** 2 for row_s, row_t in zip(a_s, a_t) for s, t in zip(row_s, row_t)]
        total += sum(squares) / len(squares)
    return total


def arguments(pairs) -> dict[str, torch.Tensor]:
    out = {}
    for i, (student, teacher) in enumerate(pairs):
        out[f"student_{i}"], out[f"teacher_{i}"] = student, teacher
    return out


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, 0.5])
@pytest.mark.parametrize("n", [1, 2])
def test_one_tap_equals_the_loop_reference_on_odd_non_square_maps(n, p):
    g = torch.Generator().manual_seed(n)
    student = torch.randn(n, 3, 5, 7, generator=g, dtype=torch.float64)
    teacher = torch.randn(n, 6, 5, 7, generator=g, dtype=torch.float64)
    value = AttentionTransfer(("head",), p)(student_0=student, teacher_0=teacher)
    assert value.item() == pytest.approx(reference_at([(student, teacher)], p), rel=1e-6)


@pytest.mark.parametrize("n", [1, 2])
def test_two_taps_sum_their_terms(n):
    g = torch.Generator().manual_seed(10 + n)
    layer = (torch.randn(n, 4, 9, 5, generator=g, dtype=torch.float64),
             torch.randn(n, 8, 9, 5, generator=g, dtype=torch.float64))
    head = (torch.randn(n, 3, 5, 7, generator=g, dtype=torch.float64),
            torch.randn(n, 6, 5, 7, generator=g, dtype=torch.float64))
    both = AttentionTransfer(("backbone.layer2", "head"))(**arguments([layer, head]))
    alone = [AttentionTransfer((tap,))(**arguments([pair])) for tap, pair in (("backbone.layer2", layer),
                                                                               ("head", head))]
    assert both.item() == pytest.approx(reference_at([layer, head], 2.0), rel=1e-6)
    assert both.item() == pytest.approx(alone[0].item() + alone[1].item(), rel=1e-12)


def test_float32_inputs_give_a_float32_value_close_to_the_reference():
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(2, 3, 5, 7, generator=g), torch.randn(2, 6, 5, 7, generator=g)
    value = AttentionTransfer()(student_0=student, teacher_0=teacher)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference_at([(student, teacher)], 2.0), rel=1e-5)


@pytest.mark.parametrize("p", [2.0, 0.5])
def test_zero_when_the_student_is_a_positive_multiple_of_the_teacher(p):
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64)
    value = AttentionTransfer(("head",), p)(student_0=3.5 * teacher, teacher_0=teacher)
    assert value.item() == pytest.approx(0.0, abs=1e-24)


def test_gradients_are_finite_at_exact_zeros_and_never_reach_the_teacher():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(1, 3, 5, 7, generator=g).relu().requires_grad_()  # ReLU maps: many exact zeros
    teacher = torch.randn(1, 6, 5, 7, generator=g, requires_grad=True)
    for p in (2.0, 1.0, 0.5):
        student.grad = None
        AttentionTransfer(("head",), p)(student_0=student, teacher_0=teacher).backward()
        assert bool(student.grad.isfinite().all()) and bool(student.grad.ne(0).any())
    assert teacher.grad is None


def test_maps_of_a_tap_on_different_grids_are_refused_with_both_shapes():
    with pytest.raises(PreflightError, match=r"student head \(1, 3, 5, 7\) and teacher head \(1, 6, 7, 5\)"):
        AttentionTransfer()(student_0=torch.randn(1, 3, 5, 7), teacher_0=torch.randn(1, 6, 7, 5))


def test_missing_maps_are_refused():
    with pytest.raises(PreflightError, match="teacher_1"):
        AttentionTransfer(("backbone.layer3", "head"))(student_0=torch.randn(1, 3, 5, 7),
                                                       teacher_0=torch.randn(1, 6, 5, 7),
                                                       student_1=torch.randn(1, 3, 5, 7))


def test_reads_one_student_and_one_teacher_map_per_tap():
    spec = LOSSES["at"]
    config = spec.config(enabled=True, taps=("backbone.layer3", "head"))
    assert {arg: i.key for arg, i in spec.inputs(config).items()} == {
        "student_0": "student.features[backbone.layer3]", "teacher_0": "teacher.features[backbone.layer3]",
        "student_1": "student.features[head]", "teacher_1": "teacher.features[head]"}


def test_defaults_are_the_cirkd_recipe():
    config = job_from_dict({}).losses.at
    assert (config.enabled, config.weight, config.taps, config.p) == (False, 10000.0, ("head",), 2.0)


@pytest.mark.parametrize(("override", "message"), [
    ("losses.at.taps=[]", r"^losses.at.taps: got \[\]; name at least one layer"),
    ("losses.at.taps=[head,backbone.layer2,head]", r"^losses.at.taps: got .*; each layer at most once; repeated: "
                                                   r"head$"),
    ("losses.at.p=0", r"^losses.at.p: got 0.0; must be > 0$"),
])
def test_bad_options_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        job_from_dict({}, [override])
    assert "\n" not in str(err.value)


def test_keeps_the_registry_contract_at_the_head():
    check_loss("at")


def test_keeps_the_registry_contract_over_two_taps():
    check_loss("at", taps=["backbone.layer3", "head"])


def test_a_run_trains_with_attention_on_two_taps(tmp_path, teacher_file):
    job = tiny_job(tmp_path, teacher_file, **{"losses.at.enabled": True,
                                              "losses.at.taps": ["backbone.layer2", "head"]})
    logs = []
    result = train(job, tmp_path / "s", log=logs.append, progress=False)
    assert result.iterations == 6 and "train/loss/at" in logs[-1]
    assert all(math.isfinite(entry["train/loss/at"]) for entry in logs)
