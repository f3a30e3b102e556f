"""Adaptive cross-entropy: the teacher's soft target where it is right, the label where it is wrong."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.losses import _checks
from kdray.losses.labels import downsample_labels, one_hot_ignore

RULES = ("replace", "average")


class AdaptiveCrossEntropy(nn.Module):
    """ACE: `L = -(1/|V|) Σ_{i ∈ V} Σ_k q_i[k] log softmax(z_S,i / T)[k]`, V = pixels with `y↓_i ≠ ignore`.

    With `p_T,i = softmax(z_T,i / T)` and the teacher right at i when `argmax_k z_T,i[k] == y↓_i`:

    - `rule="replace"` (default): `q_i = p_T,i` where the teacher is right, else `onehot(y↓_i)`;
    - `rule="average"`: `q_i = (p_T,i + onehot(y↓_i)) / 2` where the teacher is right, else `onehot(y↓_i)`.

    No T² factor (the spec's formula); 0 when every pixel is ignored. ACE subsumes CE, so a job that enables
    it normally disables CE, explicitly.

    Shapes: student_logits, teacher_logits (N, K, h, w); labels (N, h, w) or (N, H, W) int64 (resized to
    `y↓` by nearest neighbour). Returns a scalar.

    Paper: Park & Heo, "Knowledge Distillation for Semantic Segmentation Using Channel and Spatial
    Correlations and Adaptive Cross Entropy", Sensors 20(16):4616, 2020, doi:10.3390/s20164616.
    """

    def __init__(self, rule: str = "replace", temperature: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        owner = type(self).__name__
        self.rule = _checks.choice(owner, "rule", rule, RULES)
        self.temperature = _checks.number(owner, "temperature", temperature, positive=True)
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Tensor:
        owner = type(self).__name__
        _checks.same_shape(owner, "student_logits", student_logits, "teacher_logits", teacher_logits)
        teacher_logits = teacher_logits.detach()
        num_classes = student_logits.shape[1]
        labels = downsample_labels(labels, student_logits.shape[-2:])

        one_hot = one_hot_ignore(labels, num_classes, self.ignore_index, student_logits.dtype)
        one_hot = one_hot.permute(0, 3, 1, 2)  # (N, K, h, w); zero at ignored pixels
        p_t = F.softmax(teacher_logits / self.temperature, dim=1)
        if self.rule == "average":
            p_t = (p_t + one_hot) / 2
        valid = labels != self.ignore_index
        teacher_right = ((teacher_logits.argmax(dim=1) == labels) & valid).unsqueeze(1)
        target = torch.where(teacher_right, p_t, one_hot)  # all zero at ignored pixels

        log_p_s = F.log_softmax(student_logits / self.temperature, dim=1)
        return -(target * log_p_s).sum() / valid.sum().clamp_min(1)
