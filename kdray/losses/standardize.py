"""Logit standardization: each pixel's logit vector centred and scaled before a logit loss sees it."""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-7


def standardize_logits(logits: Tensor, dim: int = 1) -> Tensor:
    """`(z − mean_k z) / (std_k z + 1e-7)` along the class axis `dim`, std with K − 1 in the denominator.

    Applied to student and teacher separately, it makes a logit loss invariant to `z → a·z + b` per pixel
    (a > 0); the loss then runs unchanged (its temperature and T² kept). Shapes: any, K = `logits.shape[dim]`
    ≥ 2; returns the same shape, in float32 at least.

    Paper: Sun, Ren, Li, Wang, Cao, "Logit Standardization in Knowledge Distillation", CVPR 2024,
    arXiv:2403.01427.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))  # moments of bf16 logits keep 8 bits
    return (z - z.mean(dim=dim, keepdim=True)) / (z.std(dim=dim, keepdim=True) + EPS)
