"""FitNet hint: the student's feature at one tap, mapped to the teacher's width, regressed onto the teacher's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.inputs import HEAD, StepInput, student_features, teacher_features
from kdray.losses.registry import LossConfig, LossContext, register_loss


@dataclass
class FitNetConfig(LossConfig):
    """`losses.fitnet`: see `FitNetHint`."""

    weight: float = option(10.0, at_least=0)
    # what the loss reads, not how it computes: the layer whose output both networks are compared at
    tap: str = option(HEAD, constructor=False)


def _reads(config: FitNetConfig) -> dict[str, StepInput]:
    return {"student_features": student_features(config.tap), "teacher_features": teacher_features(config.tap)}


def _build(config: FitNetConfig, context: LossContext) -> FitNetHint:
    return FitNetHint(context.student(config.tap), context.teacher(config.tap))


@register_loss("fitnet", position=90, config=FitNetConfig, label="FitNet", reads=_reads, build=_build)
class FitNetHint(nn.Module):
    """FitNet: `L = mean over N·C_T·h·w of (A(f_S) − f_T)²`.

    A is the adapter (1×1 conv C_S → C_T without bias, owned here and trained with the student). `tap` picks
    the layer: `head` (the map the classifier reads; the default, as in CIRKD) or `backbone.layer1` ..
    `backbone.layer4` (R18's 64/128/256/512 channels mapped to R101's 256/512/1024/2048; both networks are
    dilated, so the maps of a tap have the same h×w). The teacher's map is detached.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w). Returns a float32 scalar.

    Weight 10 with KD on (T = 1, weight 1): CIRKD's recipe (`losses/fitnet.py`, `train_kd/train_fitnet.sh`),
    which published no mIoU for it.

    Paper: Romero, Ballas, Kahou, Chassang, Gatta, Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015,
    arXiv:1412.6550.
    """

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        super().__init__()
        self.adapter = FeatureAdapter(student_channels, teacher_channels)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        owner = type(self).__name__
        _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
        _checks.adapter_channels(owner, self.adapter, student_features, teacher_features)
        if student_features.shape[0] == 0:
            return _checks.empty_batch(student_features, self.adapter.conv.weight)
        work = torch.promote_types(student_features.dtype, torch.float32)
        # outside autocast: a squared difference summed over millions of elements is no job for bfloat16
        with autocast_off(student_features.device.type):
            projected = F.conv2d(student_features.to(work), self.adapter.conv.weight.to(work))
            return (projected - teacher_features.detach().to(work)).square().mean()
