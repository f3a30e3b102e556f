"""CIRKD's mini-batch pixel-to-pixel relations: each image's pixels compared with every image's of the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdray.losses import _checks
from kdray.losses._precision import autocast_off


def minibatch_pixel_relations(student_features: Tensor, teacher_features: Tensor, *, temperature: float = 0.1,
                              pool: int = 1) -> Tensor:
    """The mini-batch pixel-to-pixel distillation term of CIRKD.

    Each map is optionally average-pooled (`pool` × `pool` windows with stride `pool`, partial windows at the
    right and bottom edges averaging their in-bounds positions) to M = h'·w' positions, and every position's
    feature is L2-normalised over channels: `e = f / max(‖f‖₂, 1e-12)`, giving E_X,a (M × C_X) per image a. For
    every ordered pair (a, b) of the batch's images, a = b included, `S_X,ab = E_X,a E_X,bᵀ` (M × M), and

        L = (1/N²) Σ_ab (1/M) Σ_p KL(softmax(S_T,ab[p, :] / τ) ‖ softmax(S_S,ab[p, :] / τ))

    with τ = `temperature` (CIRKD: 0.1) and no τ² factor. Only similarities within each network are compared,
    so the channel counts may differ and there is no adapter. The pairs are taken one at a time: at the paper's
    64 × 128 maps an M × M float32 matrix is 256 MiB.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w); returns a float32 scalar (float64
    for float64 inputs); N = 0 gives exactly 0 connected to the student's features. The teacher is detached.
    The pairs are the rank's own batch: CIRKD's all-gather for this term is commented out in its code.

    Paper: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation
    for Semantic Segmentation", CVPR 2022, arXiv:2204.06986 (code: winycg/CIRKD, `losses/cirkd_mini_batch.py`).
    """
    owner = "minibatch_pixel_relations"
    _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
    if student_features.shape[0] == 0:
        return _checks.empty_batch(student_features)
    n = student_features.shape[0]
    work = torch.promote_types(student_features.dtype, torch.float32)
    with autocast_off(student_features.device.type):
        student = _pixel_embeddings(student_features.to(work), pool)  # (N, M, C_S)
        teacher = _pixel_embeddings(teacher_features.detach().to(work), pool)  # (N, M, C_T)
        m = student.shape[1]
        total = student.new_zeros(())
        for a in range(n):
            for b in range(n):
                log_q = F.log_softmax(student[a] @ student[b].T / temperature, dim=1)
                log_p = F.log_softmax(teacher[a] @ teacher[b].T / temperature, dim=1)
                total = total + (log_p.exp() * (log_p - log_q)).sum()
        return total / (n * n * m)


def _pixel_embeddings(features: Tensor, pool: int) -> Tensor:
    """(N, C, h, w) -> (N, M, C): pooled if asked, each position's vector normalised over channels."""
    if pool > 1:
        features = F.avg_pool2d(features, pool, stride=pool, ceil_mode=True, count_include_pad=False)
    return F.normalize(features.flatten(2).transpose(1, 2), dim=2)
