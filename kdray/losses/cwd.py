"""Channel-wise distillation: each channel's spatial map as a distribution over positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from kdray.config.options import option
from kdray.errors import ConfigError
from kdray.losses import _checks
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.inputs import STUDENT_FEATURES, STUDENT_LOGITS, TEACHER_FEATURES, TEACHER_LOGITS
from kdray.losses.registry import LossConfig, register_loss
from kdray.losses.softmax_kl import softmax_kl

TARGETS = ("logits", "features", "both")


def channel_wise_kl(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """`T²/(N·C) Σ_{n,c} KL(softmax(t_{n,c,:}/T) || softmax(s_{n,c,:}/T))` over the h·w positions.

    student, teacher: (N, C, h, w) with the same shape; teacher already detached. Returns a scalar.
    """
    n, c = student.shape[:2]
    scale = temperature * temperature / (n * c)
    return softmax_kl(student.flatten(2), teacher.flatten(2), dim=2, temperature=temperature, scale=scale)




@dataclass
class CWDConfig(LossConfig):
    """`losses.cwd`: see `ChannelWiseDistillation`."""

    weight: float = option(3.0, at_least=0)
    temperature: float = option(4.0, above=0)
    on: Literal["logits", "features", "both"] = "logits"
    feature_scale: float = option(50.0 / 3.0, at_least=0)  # at weight 3 the feature term carries the published 50


def _cwd_reads(cfg: CWDConfig) -> dict:
    reads = {"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS}
    if cfg.on != "logits":
        reads.update(student_features=STUDENT_FEATURES, teacher_features=TEACHER_FEATURES)
    return reads


@register_loss("cwd", position=20, config=CWDConfig, label="CWD", reads=_cwd_reads)
class ChannelWiseDistillation(nn.Module):
    """CWD: `L = T²/(N·C) Σ_{n,c} KL(φ(x_T)_{n,c} || φ(x_S)_{n,c})`, `φ(x)_{n,c} = softmax(x_{n,c,:}/T)`.

    Each channel of each sample is softmax-normalised over its h·w positions, so the student learns where
    the teacher's channel activates rather than its per-pixel class distribution.

    - `on="logits"` (default): x = the logits, C = K.
    - `on="features"`: x_S = adapter(f_S) (1×1 conv C_S → C_T, owned here), x_T = f_T, C = C_T; the result
      is multiplied by `feature_scale` (default 50/3) so that at the job's default CWD weight 3 the feature
      term carries the published feature weight 50.
    - `on="both"`: logits term + feature_scale · feature term.

    Shapes: student_logits, teacher_logits (N, K, h, w); student_features (N, C_S, h, w), teacher_features
    (N, C_T, h, w), needed unless `on="logits"`. Returns a scalar.

    Paper: Shu, Liu, Gao, Yan, Shen, "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021,
    arXiv:2011.13256.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        on: str = "logits",
        student_channels: int | None = None,
        teacher_channels: int | None = None,
        feature_scale: float = 50.0 / 3.0,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.temperature = _checks.number(owner, "temperature", temperature, positive=True)
        self.on = _checks.choice(owner, "on", on, TARGETS)
        self.feature_scale = _checks.number(owner, "feature_scale", feature_scale)
        # Only build the adapter when it is used: an unused parameter would be a DDP error.
        self.adapter: FeatureAdapter | None = None
        if self.on != "logits":
            if student_channels is None or teacher_channels is None:
                raise ConfigError(
                    f"{owner}: on={on!r} needs student_channels and teacher_channels, got "
                    f"student_channels={student_channels!r}, teacher_channels={teacher_channels!r}"
                )
            self.adapter = FeatureAdapter(student_channels, teacher_channels)

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_features: Tensor | None = None,
        teacher_features: Tensor | None = None,
    ) -> Tensor:
        owner = type(self).__name__
        if student_logits.shape[0] == 0:
            weight = None if self.adapter is None else self.adapter.conv.weight
            return _checks.empty_batch(student_logits, student_features, weight)
        loss = None
        if self.on in ("logits", "both"):
            _checks.same_shape(owner, "student_logits", student_logits, "teacher_logits", teacher_logits)
            loss = channel_wise_kl(student_logits, teacher_logits.detach(), self.temperature)
        if self.adapter is not None:
            if student_features is None or teacher_features is None:
                raise ValueError(f"{owner}: on={self.on!r} needs student_features and teacher_features")
            projected = self.adapter(student_features)
            teacher_features = teacher_features.detach()
            _checks.same_shape(owner, "adapter(student_features)", projected, "teacher_features", teacher_features)
            term = self.feature_scale * channel_wise_kl(projected, teacher_features, self.temperature)
            loss = term if loss is None else loss + term
        return loss
