"""SKD's pair-wise loss: match the cosine-similarity graph between feature-map nodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.inputs import STUDENT_FEATURES, TEACHER_FEATURES
from kdray.losses.registry import LossConfig, register_loss


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


def gram_is_cheaper(student_channels: int, teacher_channels: int, nodes: int) -> bool:
    """Whether `spatial_affinity_distance` is cheaper through the C×C Gram matrices than through the M×M
    affinities: M·(C_S² + C_S·C_T + C_T²) against M²·(C_S + C_T) multiply-adds per image."""
    c_s, c_t = student_channels, teacher_channels
    return c_s * c_s + c_s * c_t + c_t * c_t < nodes * (c_s + c_t)


def spatial_affinity_distance(student_nodes: Tensor, teacher_nodes: Tensor, via: str = "auto") -> Tensor:
    """`(1/(N·M²)) Σ_n ‖A_S,n − A_T,n‖²_F` with `A_X = F̂_Xᵀ F̂_X` (see `spatial_affinity`).

    student_nodes (N, C_S, M), teacher_nodes (N, C_T, M) -> scalar. Two exact ways to the same number:

    - `via="affinity"`: build both M×M matrices and take their squared difference: N·M² floats of memory
      and M²·(C_S + C_T) multiply-adds per image;
    - `via="gram"`: expand the square, `‖F̂_SᵀF̂_S − F̂_TᵀF̂_T‖² = ‖F̂_S F̂_Sᵀ‖² − 2‖F̂_S F̂_Tᵀ‖² + ‖F̂_T F̂_Tᵀ‖²`
      (`tr(XᵀX YᵀY) = ‖X Yᵀ‖²`), three Gram matrices of C_S×C_S, C_S×C_T and C_T×C_T: no M×M tensor at all,
      M·(C_S² + C_S·C_T + C_T²) multiply-adds. The three terms are large and nearly cancel once the student
      is close to the teacher, so this form runs in float64 (also under autocast): in float32 its relative
      error grows to ~1e-1 at a mean squared difference of 1e-8; through float64 it is 2e-8 there (float32
      inputs, 2×256×2048 nodes), the rounding of the float32 result itself.
    - `via="auto"` (default): the cheaper of the two by `gram_is_cheaper` (on 64×128 maps pooled by 2,
      M = 2048 nodes with C_S=128, C_T=256: the Gram form, 7× fewer multiply-adds and no 32 MB matrices).
    """
    n, c_s, m = student_nodes.shape
    c_t = teacher_nodes.shape[1]
    if via == "auto":
        via = "gram" if gram_is_cheaper(c_s, c_t, m) else "affinity"
    if via == "affinity":
        return F.mse_loss(spatial_affinity(student_nodes), spatial_affinity(teacher_nodes))
    if via != "gram":
        raise ValueError(f"spatial_affinity_distance: via must be one of 'auto', 'affinity', 'gram', got {via!r}")
    with autocast_off(student_nodes.device.type):
        unit_s = F.normalize(student_nodes.double(), dim=1)
        unit_t = F.normalize(teacher_nodes.double(), dim=1)
        total = (
            (unit_s @ unit_s.transpose(1, 2)).square().sum()
            - 2 * (unit_s @ unit_t.transpose(1, 2)).square().sum()
            + (unit_t @ unit_t.transpose(1, 2)).square().sum()
        )
        # Rounding can leave a tiny negative where the affinities agree to the last bit.
        mean = total.clamp_min(0) / (n * m * m)
    return mean.to(torch.promote_types(student_nodes.dtype, torch.float32))




@dataclass
class PairwiseConfig(LossConfig):
    """`losses.pairwise`: see `PairwiseAffinity`."""

    weight: float = option(10.0, at_least=0)
    patch: int = option(2, at_least=1)


@register_loss("pairwise", position=40, config=PairwiseConfig, label="PA",
               reads={"student_features": STUDENT_FEATURES, "teacher_features": TEACHER_FEATURES})
class PairwiseAffinity(nn.Module):
    """SKD pair-wise: `L = (1/(N·M·M)) Σ_n Σ_{a,b} (A_T[n,a,b] − A_S[n,a,b])²`.

    `A_X = F̂_Xᵀ F̂_X` (M×M per image), where the M nodes come from max-pooling f_X with a `patch×patch`
    window (stride = patch, ceil mode) and each node's channel vector is L2-normalised. Affinities are M×M
    whatever the channel count, so C_S may differ from C_T and there is no adapter. When M exceeds the channel
    counts (full-size maps) the loss is computed through C×C Gram matrices and no M×M matrix is ever built
    (`spatial_affinity_distance`), so memory does not grow with M², and patch 1 is affordable.

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
        if student_features.shape[0] == 0:
            return _checks.empty_batch(student_features)
        nodes_s = pool_nodes(student_features, self.patch)
        nodes_t = pool_nodes(teacher_features.detach(), self.patch)
        return spatial_affinity_distance(nodes_s, nodes_t)
