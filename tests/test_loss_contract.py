"""Every registered loss keeps the registry's contract (`kdray.testing.check_loss`), and the harness catches a
loss that breaks it.

The built-ins run under their defaults and under each option that changes what they read (CWD on features,
KD masking ignored pixels, the discriminator conditioned on the image or trained as a WGAN-GP critic, I2CKD's
per-image prototypes). The broken losses below are registered for one test each and removed afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.losses import LOSSES, STUDENT_FEATURES, STUDENT_LOGITS, TEACHER_FEATURES, TEACHER_LOGITS
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.registry import LossConfig, register_loss
from kdray.testing import CHECKS, LossChecker, check_loss

VARIANTS = {
    "cwd": [{"on": "features"}, {"on": "both"}],
    "kd": [{"mask_ignore": True}, {"standardize": True, "temperature": 2.0}],
    "adversarial": [{"conditioning": "logits+image"}, {"objective": "wgan_gp"}],
    "i2ckd": [{"scope": "image"}],
    "fitnet": [{"tap": "backbone.layer2"}],
    "at": [{"taps": ("backbone.layer3", "head")}],
    "dist": [{"intra_scope": "image", "standardize": True}, {"aux_weight": 0.4}],
    "dkd": [{"standardize": True, "temperature": 2.0}, {"aux_weight": 0.4}],
}
VARIANTS["cirkd"] = [{"enqueue_mode": "cirkd_code", "pool": 2}, {"weight_pixel": 0.0, "weight_region": 0.0},
                     {"weight_batch": 0.0}]
BUILT_INS = [name for name in LOSSES if not name.startswith("_broken")]
CASES = [(name, {}) for name in BUILT_INS] + [(name, o) for name, options in VARIANTS.items() for o in options]


def case_id(case: tuple[str, dict]) -> str:
    name, options = case
    return "-".join([name, *(f"{k}={v}" for k, v in options.items())])


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_loss_keeps_the_contract(case, check):
    name, options = case
    getattr(LossChecker(name, options), f"check_{check}")()


def test_check_loss_runs_every_check():
    check_loss("kd", temperature=2.0, mask_ignore=True)


def test_the_variants_name_real_options():
    for name, options in VARIANTS.items():
        for option in options:
            LossChecker(name, option)  # builds and validates the config: a renamed option fails here


def test_the_harness_feeds_both_models_auxiliary_logits():
    for name in ("dist", "dkd"):
        tensors = LossChecker(name, {"aux_weight": 0.4})._tensors()
        assert {"student.aux_logits", "teacher.aux_logits"} <= set(tensors)
        assert tensors["teacher.aux_logits"].shape == tensors["teacher.logits"].shape
        assert "teacher.aux_logits" not in LossChecker(name)._tensors()


# --------------------------------------------------------------------------------------------------------------
# losses that break the contract, one way each
# --------------------------------------------------------------------------------------------------------------
@dataclass
class BrokenConfig(LossConfig):
    pass


LOGITS = {"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS}
FEATURES = {"student_features": STUDENT_FEATURES, "teacher_features": TEACHER_FEATURES}


class LeaksToTheTeacher(nn.Module):
    """MSE of the logits with the teacher left attached."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return F.mse_loss(student_logits, teacher_logits)


class ReturnsAVector(nn.Module):
    """One value per image instead of a scalar."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return (student_logits - teacher_logits.detach()).square().mean(dim=(1, 2, 3))


class UnusedAdapter(nn.Module):
    """Builds an adapter, then compares the raw features' means (channel counts differ)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = FeatureAdapter(student_channels, teacher_channels)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        return (student_features.mean() - teacher_features.detach().mean()).square()


class DividesByTheBatch(nn.Module):
    """A per-image mean written as sum / N: 0/0 on an empty batch (in float32, whatever the inputs)."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        difference = student_logits.float() - teacher_logits.detach().float()
        return difference.square().sum() / student_logits.shape[0]


BROKEN = {
    "_broken_leak": (LeaksToTheTeacher, LOGITS, "gradients", "reached the teacher"),
    "_broken_vector": (ReturnsAVector, LOGITS, "value", r"shape \(2,\)"),
    "_broken_adapter": (UnusedAdapter, FEATURES, "parameters", "adapter.conv.weight gets no gradient"),
    "_broken_empty": (DividesByTheBatch, LOGITS, "empty", "expected exactly 0.0"),
}


@pytest.fixture
def broken():
    """Registers the broken losses for one test; afterwards `LOSSES` is as it was."""
    for name, (cls, reads, *_) in BROKEN.items():
        register_loss(name, config=BrokenConfig, label=name, reads=reads)(cls)
    yield
    for name in BROKEN:
        LOSSES.pop(name, None)


@pytest.mark.parametrize("name", list(BROKEN))
def test_the_harness_fails_a_loss_that_breaks_the_contract(broken, name):
    *_, check, message = BROKEN[name]
    with pytest.raises(AssertionError, match=rf"check_loss\('{name}'\), check '{check}': .*{message}"):
        check_loss(name)


def test_a_broken_loss_fails_only_the_check_it_breaks(broken):
    """The harness is not failing everything: the loss that divides by N passes every other check."""
    checker = LossChecker("_broken_empty")
    for check in CHECKS:
        if check != "empty":
            getattr(checker, f"check_{check}")()


def test_the_broken_losses_are_gone_after_their_test():
    assert not any(name.startswith("_broken") for name in LOSSES)
