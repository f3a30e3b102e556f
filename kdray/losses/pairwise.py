"""SKD's pair-wise loss: match the cosine-similarity graph between feature-map nodes."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdray.losses import _checks


def pool_nodes(features: Tensor, patch: int) -> Tensor:
    """Max-pool `patch×patch` windows (stride patch, ceil mode) into nodes: (N, C, h, w) -> (N, C, M).

    Ceil mode keeps the last partial row/column of windows, so no pixel is dropped on maps whose side is not
    a multiple of `patch` (e.g. 65×129). `patch=1` returns every pixel as a node.
    """
    if patch > 1:
        features = F.max_pool2d(features, kernel_size=patch, stride=patch, ceil_mode=True)
    return features.flatten(2)


def spatial_affinity(nodes: Tensor) -> Tensor:
    """`A = F̂ᵀF̂`: cosine similarity between the M nodes of each image. (N, C, M) -> (N, M, M)."""
    unit = F.normalize(nodes, dim=1)
    return unit.transpose(1, 2) @ unit


class PairwiseAffinity(nn.Module):
    """SKD pair-wise: `L = (1/(N·M·M)) Σ_n Σ_{a,b} (A_T[n,a,b] − A_S[n,a,b])²`.

    `A_X = F̂_Xᵀ F̂_X` (M×M per image), where the M nodes come from max-pooling f_X with a `patch×patch`
    window (stride = patch, ceil mode) and each node's channel vector is L2-normalised. Affinities are M×M
    whatever the channel count, so C_S may differ from C_T and there is no adapter. Memory is N·M² floats:
    keep the default patch 2 (or larger) on full-size maps.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w). Returns a scalar.

    Paper: Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic Segmentation",
    CVPR 2019, arXiv:1903.04197.
    """

    def __init__(self, patch: int = 2) -> None:
        super().__init__()
        self.patch = _checks.positive_int(type(self).__name__, "patch", patch)

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        owner = type(self).__name__
        _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
        a_s = spatial_affinity(pool_nodes(student_features, self.patch))
        a_t = spatial_affinity(pool_nodes(teacher_features.detach(), self.patch))
        return F.mse_loss(a_s, a_t)
