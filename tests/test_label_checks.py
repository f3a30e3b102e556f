"""Labels outside 0..K-1 ∪ {ignore} reaching a loss are refused with one `DataError` naming the value, K and the
ignore value: once per step at the objective's entry (every loss, any device), and in the helpers the losses
call directly (ACE, `one_hot_ignore` under IFVD and I2CKD) where that costs no device sync (the CPU).

The decision is checked against a plain Python loop; the awkward valid cases (all pixels ignored, an ignore
value of -1, 255 or inside the classes, no label at all) still pass.
"""

from __future__ import annotations

import re

import pytest
import torch

from kdray.config import job_from_dict
from kdray.errors import DataError
from kdray.losses import I2CKD, AdaptiveCrossEntropy, IntraClassFeatureVariation, one_hot_ignore
from kdray.losses.labels import check_labels, check_labels_on_cpu
from kdray.losses.objective import DistillationObjective
from kdray.models import SegmenterOutput

K, C_S, C_T = 5, 4, 6
EVERY_LABEL_LOSS = ["losses.kd.enabled=true", "losses.kd.mask_ignore=true", "losses.ace.enabled=true",
                    "losses.ifvd.enabled=true", "losses.i2ckd.enabled=true"]


def naive_bad_label(labels: torch.Tensor, num_classes: int, ignore_index: int) -> int | None:
    """The first value (in row-major order) that is neither a class nor the ignore value, by a Python loop."""
    for value in labels.flatten().tolist():
        if not (0 <= value < num_classes or value == ignore_index):
            return value
    return None


def refusal(value: int, num_classes: int = K, ignore_index: int = 255) -> str:
    return re.escape(f"label value {value} is outside 0..{num_classes - 1} (K = {num_classes}) and is not the "
                     f"ignore value {ignore_index}")


def valid_labels(shape=(2, 8, 12), ignore_index: int = 255, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = ignore_index
    return labels


# --------------------------------------------------------------------------------------------------------------
# check_labels against the loop
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_check_labels_agrees_with_a_python_loop(seed):
    g = torch.Generator().manual_seed(seed)
    ignore_index = [255, -1, 0, K][seed % 4]
    labels = torch.randint(0, K, (2, 5, 7), generator=g)
    labels[torch.rand(2, 5, 7, generator=g) < 0.3] = ignore_index
    if seed % 3:  # two thirds of the maps get one stray value: above K, negative or another ignore convention
        stray = [K, K + 3, -1, -7, 255, 254][seed % 6]
        labels.view(-1)[int(torch.randint(0, labels.numel(), (1,), generator=g))] = stray
    expected = naive_bad_label(labels, K, ignore_index)
    if expected is None:
        check_labels(labels, K, ignore_index)
    else:
        with pytest.raises(DataError, match=refusal(expected, K, ignore_index)):
            check_labels(labels, K, ignore_index)


@pytest.mark.parametrize("ignore_index", [255, -1, 0, K])
def test_valid_awkward_labels_pass(ignore_index):
    check_labels(valid_labels(ignore_index=ignore_index), K, ignore_index)
    check_labels(torch.full((2, 3, 4), ignore_index), K, ignore_index)  # every pixel ignored
    check_labels(torch.zeros(0, 3, 4, dtype=torch.long), K, ignore_index)  # no pixel
    check_labels(torch.full((2, 3), 255, dtype=torch.uint8), K, 255)  # uint8 masks as read from PNG files
    check_labels(torch.full((2, 3), ignore_index), 0, ignore_index)  # no class at all, only ignored pixels


def test_without_classes_any_label_is_refused():
    with pytest.raises(DataError, match=refusal(3, 0, -1)):
        check_labels(torch.tensor([-1, 3, -1]), 0, -1)


def test_the_message_names_the_largest_or_the_negative_value():
    with pytest.raises(DataError, match=refusal(9)):
        check_labels(torch.tensor([0, 7, 9, 255]), K, 255)
    with pytest.raises(DataError, match=refusal(-3)):
        check_labels(torch.tensor([0, -3, 9, 255]), K, 255)


def test_losses_skip_the_check_off_the_cpu():
    """Off the CPU the read-back would be a device sync per loss (and illegal inside a CUDA graph capture): the
    helpers leave those labels to the objective's once-per-step check. A meta tensor stands for the device:
    reading it back would fail, so passing shows that nothing was read."""
    check_labels_on_cpu(torch.full((2, 3), 99, device="meta"), K, 255)
    with pytest.raises(DataError, match=refusal(99)):
        check_labels_on_cpu(torch.full((2, 3), 99), K, 255)


# --------------------------------------------------------------------------------------------------------------
# the helpers the losses use directly
# --------------------------------------------------------------------------------------------------------------
def naive_one_hot(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    n, h, w = labels.shape
    out = torch.zeros(n, num_classes, h, w, dtype=torch.float64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                y = int(labels[b, i, j])
                if y != ignore_index:
                    out[b, y, i, j] = 1.0
    return out


@pytest.mark.parametrize("ignore_index", [255, -1, 0])
def test_one_hot_of_valid_labels_matches_the_loop(ignore_index):
    labels = valid_labels((2, 3, 4), ignore_index, seed=5)
    got = one_hot_ignore(labels, K, ignore_index, torch.float64)
    torch.testing.assert_close(got, naive_one_hot(labels, K, ignore_index), rtol=0, atol=0)


@pytest.mark.parametrize("bad, ignore_index", [(K, 255), (K + 3, 255), (-2, 255), (255, -1), (-1, 255)])
def test_one_hot_refuses_labels_outside_the_classes(bad, ignore_index):
    labels = valid_labels(ignore_index=ignore_index)
    labels[1, 2, 3] = bad
    with pytest.raises(DataError, match=refusal(bad, K, ignore_index)):
        one_hot_ignore(labels, K, ignore_index, torch.float32)


def loss_inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"zs": torch.randn(2, K, 4, 6, generator=g, dtype=torch.float64),
            "zt": torch.randn(2, K, 4, 6, generator=g, dtype=torch.float64),
            "fs": torch.randn(2, C_S, 4, 6, generator=g, dtype=torch.float64),
            "ft": torch.randn(2, C_T, 4, 6, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("bad", [K, K + 3, -2])
@pytest.mark.parametrize("loss", ["ace", "ifvd", "i2ckd"])
def test_losses_called_directly_refuse_labels_outside_the_classes(loss, bad):
    """Before: ACE counted a label >= K in |V| but in no term (a smaller loss, silently); IFVD and I2CKD gave it
    a zero one-hot column. Labels at the maps' size, so that nearest resizing keeps the bad pixel."""
    x = loss_inputs()
    labels = valid_labels((2, 4, 6))
    labels[0, 1, 2] = bad
    call = {
        "ace": lambda: AdaptiveCrossEntropy()(x["zs"], x["zt"], labels),
        "ifvd": lambda: IntraClassFeatureVariation(num_classes=K)(x["fs"], x["ft"], labels),
        "i2ckd": lambda: I2CKD(C_S, C_T, K).double()(x["fs"], x["ft"], labels),
    }[loss]
    with pytest.raises(DataError, match=refusal(bad)):
        call()


@pytest.mark.parametrize("ignore_index", [255, -1])
def test_ace_with_every_pixel_ignored_is_still_zero(ignore_index):
    x = loss_inputs(1)
    labels = torch.full((2, 4, 6), ignore_index)
    assert float(AdaptiveCrossEntropy(ignore_index=ignore_index)(x["zs"], x["zt"], labels)) == 0.0


# --------------------------------------------------------------------------------------------------------------
# the objective: once per step, for every loss
# --------------------------------------------------------------------------------------------------------------
def objective_and_outputs(ignore_index: int = 255):
    losses = job_from_dict({"data": {"num_classes": K}}, EVERY_LABEL_LOSS).losses
    objective = DistillationObjective(losses, num_classes=K, student_channels=C_S, teacher_channels=C_T,
                                      ignore_index=ignore_index)
    x = loss_inputs(2)
    student = SegmenterOutput(x["zs"].float(), x["fs"].float(), None)
    teacher = SegmenterOutput(x["zt"].float(), x["ft"].float(), None)
    return objective, student, teacher


@pytest.mark.parametrize("bad, ignore_index", [(K, 255), (-1, 255), (255, -1)])
def test_objective_refuses_bad_labels_where_they_come_in(bad, ignore_index):
    objective, student, teacher = objective_and_outputs(ignore_index)
    labels = valid_labels((2, 16, 24), ignore_index)
    labels[1, 15, 23] = bad  # a pixel that no loss's nearest resize to 4x6 keeps: only the entry check sees it
    with pytest.raises(DataError, match=refusal(bad, K, ignore_index)):
        objective.step_tensors(student, teacher, labels, torch.zeros(2, 3, 16, 24))


@pytest.mark.parametrize("ignore_index", [255, -1])
def test_objective_runs_on_valid_labels(ignore_index):
    objective, student, teacher = objective_and_outputs(ignore_index)
    tensors = objective.step_tensors(student, teacher, valid_labels((2, 16, 24), ignore_index),
                                     torch.zeros(2, 3, 16, 24))
    objective.preflight(tensors)
    total, parts = objective(tensors)
    assert torch.isfinite(total) and set(parts) == {"ce", "kd", "ace", "ifvd", "i2ckd"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_objective_refuses_bad_labels_on_cuda_before_any_loss_runs():
    """On the GPU the check is the objective's alone (one read-back per step, outside any CUDA graph); a bad
    label must stop the step there, as a DataError, not as CUDA cross-entropy's device-side assert."""
    objective, student, teacher = objective_and_outputs()
    objective = objective.cuda()
    student = SegmenterOutput(*(t.cuda() for t in student[:2]), None)
    teacher = SegmenterOutput(*(t.cuda() for t in teacher[:2]), None)
    labels = valid_labels((2, 16, 24)).cuda()
    images = torch.zeros(2, 3, 16, 24, device="cuda")
    total, _ = objective(objective.step_tensors(student, teacher, labels, images))
    assert torch.isfinite(total)
    labels[0, 3, 5] = K + 1
    with pytest.raises(DataError, match=refusal(K + 1)):
        objective.step_tensors(student, teacher, labels, images)
    torch.cuda.synchronize()  # the device is still usable: nothing asserted on it


def test_cross_entropy_refuses_labels_outside_the_classes():
    from kdray.losses.cross_entropy import SegmentationCrossEntropy

    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(DataError, match="label value 5 is outside 0..2"):
        SegmentationCrossEntropy()(logits, torch.full((1, 4, 4), 5))
    assert torch.isfinite(SegmentationCrossEntropy()(logits, torch.full((1, 4, 4), 255)))
