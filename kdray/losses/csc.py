"""Channel and spatial correlation: match both the position graph and the channel graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.inputs import STUDENT_FEATURES, TEACHER_FEATURES
from kdray.losses.pairwise import pool_nodes, spatial_affinity_distance
from kdray.losses.registry import LossConfig, register_loss


def channel_affinity(nodes: Tensor) -> Tensor:
    """`A_ch = F̃F̃ᵀ`: cosine similarity between channels over the M positions. (N, C, M) -> (N, C, C)."""
    unit = F.normalize(nodes, dim=2)
    return unit @ unit.transpose(1, 2)




@dataclass
class CSCConfig(LossConfig):
    """`losses.csc`: see `ChannelSpatialCorrelation`."""

    weight: float = option(10.0, at_least=0)
    patch: int = option(2, at_least=1)
    gamma: float = option(1.0, at_least=0)


@register_loss("csc", position=70, config=CSCConfig, label="CSC",
               reads={"student_features": STUDENT_FEATURES, "teacher_features": TEACHER_FEATURES})
class ChannelSpatialCorrelation(nn.Module):
    """CSC: `L = mean (A_sp,S − A_sp,T)² + γ · mean (A_ch,S − A_ch,T)²`.

    The student feature goes through the adapter (1×1 conv C_S → C_T, owned here), then both features are
    max-pooled with a `patch×patch` window (stride patch, ceil mode; `patch=1`: no pooling) into M nodes.
    Per image: `A_sp = F̂ᵀF̂` (M×M, each position's channel vector L2-normalised) and `A_ch = F̃F̃ᵀ`
    (C_T×C_T, each channel's vector over positions L2-normalised). The means run over N·M·M and N·C_T·C_T.
    The spatial term goes through C_T×C_T Gram matrices when M > 1.5·C_T (see `spatial_affinity_distance`).

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w). Returns a scalar.

    Paper: Park & Heo, "Knowledge Distillation for Semantic Segmentation Using Channel and Spatial
    Correlations and Adaptive Cross Entropy", Sensors 20(16):4616, 2020, doi:10.3390/s20164616.
    """

    def __init__(self, student_channels: int, teacher_channels: int, patch: int = 2, gamma: float = 1.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.patch = _checks.positive_int(owner, "patch", patch)
        self.gamma = _checks.number(owner, "gamma", gamma)
        self.adapter = FeatureAdapter(student_channels, teacher_channels)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        if student_features.shape[0] == 0:
            return _checks.empty_batch(student_features, self.adapter.conv.weight)
        projected = self.adapter(student_features)
        _checks.same_shape(
            type(self).__name__, "adapter(student_features)", projected, "teacher_features", teacher_features
        )
        nodes_s = pool_nodes(projected, self.patch)
        nodes_t = pool_nodes(teacher_features.detach(), self.patch)
        spatial = spatial_affinity_distance(nodes_s, nodes_t)
        channel = F.mse_loss(channel_affinity(nodes_s), channel_affinity(nodes_t))
        return spatial + self.gamma * channel
