"""The supervised term: per-pixel cross-entropy at input resolution."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses.inputs import LABELS, STUDENT_AUX_LOGITS, STUDENT_LOGITS, optional
from kdray.losses.labels import check_labels_on_cpu
from kdray.losses.registry import LossConfig, register_loss


def _pixel_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    # Divide by max(#valid, 1) ourselves: F.cross_entropy's "mean" is 0/0 = NaN on an all-ignore crop.
    valid = (labels != ignore_index).sum().clamp_min(1)
    return total / valid




@dataclass
class CrossEntropyConfig(LossConfig):
    """`losses.ce`: see `SegmentationCrossEntropy`; the one loss enabled by default."""

    enabled: bool = True
    aux_weight: float = option(0.4, at_least=0)


@register_loss("ce", position=0, config=CrossEntropyConfig, label="CE",
               reads={"logits": STUDENT_LOGITS, "labels": LABELS, "aux_logits": optional(STUDENT_AUX_LOGITS)})
class SegmentationCrossEntropy(nn.Module):
    """`L_CE = CE(up(z_S), y) + aux_weight · CE(up(z_aux), y)`.

    `CE(z, y) = -(1/|valid|) Σ_{i: y_i ≠ ignore} log softmax(z_i)[y_i]`, where `up` resizes logits bilinearly
    (align_corners=False) to the labels' H×W. An all-ignore batch gives 0 with zero gradients. Labels outside
    0..K-1 and the ignore value raise DataError (checked here on the CPU, once per step by the objective).

    Shapes: logits (N, K, h, w), labels (N, H, W) int64, aux_logits (N, K, h', w') or None (then no aux term).
    The auxiliary FCN head on layer3 with weight 0.4 is the PSPNet recipe (Zhao et al., "Pyramid Scene Parsing
    Network", CVPR 2017, arXiv:1612.01105) that the CIRKD benchmark (Yang et al., CVPR 2022, arXiv:2204.06986)
    uses for its ResNet students.
    """

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = 255) -> None:
        super().__init__()
        owner = type(self).__name__
        self.aux_weight = _checks.number(owner, "aux_weight", aux_weight)
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)

    def forward(self, logits: Tensor, labels: Tensor, aux_logits: Tensor | None = None) -> Tensor:
        _checks.label_map(type(self).__name__, labels, "logits", logits)
        check_labels_on_cpu(labels, logits.shape[1], self.ignore_index)  # not torch's IndexError deep inside
        loss = _pixel_cross_entropy(logits, labels, self.ignore_index)
        if aux_logits is not None and self.aux_weight > 0:
            loss = loss + self.aux_weight * _pixel_cross_entropy(aux_logits, labels, self.ignore_index)
        return loss
