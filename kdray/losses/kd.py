"""Pixel-wise knowledge distillation on the score maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses.inputs import LABELS_AT_LOGITS, STUDENT_LOGITS, TEACHER_LOGITS
from kdray.losses.labels import downsample_labels
from kdray.losses.registry import LossConfig, register_loss
from kdray.losses.softmax_kl import softmax_kl
from kdray.losses.standardize import standardize_logits

REDUCTIONS = ("pixel_mean", "element_mean")




@dataclass
class KDConfig(LossConfig):
    """`losses.kd`: see `PixelwiseKD`."""

    temperature: float = option(1.0, above=0)
    reduction: Literal["pixel_mean", "element_mean"] = "pixel_mean"
    mask_ignore: bool = False
    standardize: bool = False  # logit standardization (Sun et al., CVPR 2024) of both maps first


def _kd_reads(cfg: KDConfig) -> dict:
    reads = {"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS}
    return {**reads, "labels": LABELS_AT_LOGITS} if cfg.mask_ignore else reads


@register_loss("kd", position=10, config=KDConfig, label="KD", reads=_kd_reads)
class PixelwiseKD(nn.Module):
    """Hinton's KD applied independently at every pixel of the score map.

    With `p_X,i = softmax(z_X,i / T)` over the K classes at pixel i:

    - `reduction="pixel_mean"` (default): `L = T² · (1/P) Σ_i Σ_k p_T,i[k] (log p_T,i[k] − log p_S,i[k])`
    - `reduction="element_mean"`: `L = (1/(P·K)) Σ_i Σ_k ...` without T² (the IFVD/CWD-code convention,
      used with weight 10)

    where P = N·h·w, or with `mask_ignore=True` the number of pixels whose `y↓` is not `ignore_index` (the
    sum then runs over those pixels only; 0 when there are none). The T² keeps the gradient's scale roughly
    independent of T (Hinton et al., section 2). The log-probabilities are taken in the log-sum-exp form
    `(z − max)/T − log Σ exp((z − max)/T)`, as `log_softmax` takes them, never as the log of a softmax
    (`softmax_kl`).

    With `standardize=True` each pixel's logits, of student and teacher separately, are first replaced by
    `(z − mean_k z) / (std_k z + 1e-7)` (`standardize_logits`); the loss then runs unchanged, T and T² kept.
    That makes it invariant to `z → a·z + b` per pixel (a > 0). The published setting (classification only)
    is T = 2 with weight 9; no segmentation setting is published.

    Shapes: student_logits, teacher_logits (N, K, h, w); labels (N, h, w) or (N, H, W) int64, needed only
    with `mask_ignore`. Returns a scalar.

    Papers: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning
    Workshop, arXiv:1503.02531; pixel-wise use for segmentation: Liu et al., "Structured Knowledge
    Distillation for Semantic Segmentation", CVPR 2019, arXiv:1903.04197; standardization: Sun, Ren, Li, Wang,
    Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024, arXiv:2403.01427.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        reduction: str = "pixel_mean",
        mask_ignore: bool = False,
        ignore_index: int = 255,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.temperature = _checks.number(owner, "temperature", temperature, positive=True)
        self.reduction = _checks.choice(owner, "reduction", reduction, REDUCTIONS)
        self.mask_ignore = _checks.boolean(owner, "mask_ignore", mask_ignore)
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)
        self.standardize = _checks.boolean(owner, "standardize", standardize)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None) -> Tensor:
        owner = type(self).__name__
        _checks.same_shape(owner, "student_logits", student_logits, "teacher_logits", teacher_logits)
        if self.mask_ignore and labels is not None:
            _checks.label_map(owner, labels, "student_logits", student_logits)
        if student_logits.shape[0] == 0:
            return _checks.empty_batch(student_logits)
        if self.standardize:
            student_logits, teacher_logits = standardize_logits(student_logits), standardize_logits(teacher_logits)
        t = self.temperature
        factor = t * t if self.reduction == "pixel_mean" else 1.0 / student_logits.shape[1]  # or the mean over K
        if self.mask_ignore:
            if labels is None:
                raise ValueError(f"{owner}: mask_ignore=True needs labels")
            valid = downsample_labels(labels, student_logits.shape[-2:]) != self.ignore_index  # (N, h, w)
            count = valid.sum().clamp_min(1)  # all pixels ignored: 0 / 1 = 0
            count = count.to(torch.promote_types(student_logits.dtype, torch.float32))  # the loss's dtype
            return softmax_kl(
                student_logits, teacher_logits, dim=1, weight=valid.unsqueeze(1), temperature=t, scale=factor / count
            )
        count = student_logits.numel() // student_logits.shape[1]  # N·h·w
        return softmax_kl(student_logits, teacher_logits, dim=1, temperature=t, scale=factor / count)
