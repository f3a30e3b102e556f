"""An example kdray plugin: a distillation loss defined outside the package, in one file.

    kdray train --job jobs/demo.yaml plugins=[examples/custom_loss/probability_mse.py] \
        losses.prob_mse.enabled=true losses.prob_mse.weight=2

Importing this file registers the loss `prob_mse`; from then on `losses.prob_mse.*` is a section of every job
that names this file under `plugins:` (options, command-line overrides, search-space keys, report labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdray.losses import STUDENT_LOGITS, TEACHER_LOGITS, LossConfig, option, register_loss


@dataclass
class ProbabilityMSEConfig(LossConfig):
    """`losses.prob_mse`: the job's options for `ProbabilityMSE` (`enabled` and `weight` come from LossConfig).
    Each range is written once, here; kdray checks a job against it before any compute."""

    weight: float = option(1.0, at_least=0)
    temperature: float = option(2.0, above=0)


@register_loss("prob_mse", config=ProbabilityMSEConfig, label="PMSE",
               reads={"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS})
class ProbabilityMSE(nn.Module):
    """Squared distance between the softened class distributions of student and teacher at every pixel.

        L = (1/P) Σ_i ‖softmax(z_S,i / T) − softmax(z_T,i / T)‖²,   P = N·h·w

    Bounded (each pixel contributes at most 2), so unlike KL it never explodes on a confident wrong teacher.
    An empty batch gives 0 (connected to the student's logits, so backward still runs).

    Shapes: student_logits, teacher_logits (N, K, h, w), any float dtype. Returns a float32 scalar; the teacher's
    logits are detached here.

    Source: an illustration for kdray's plugin interface; probability-matching losses of this kind go back to
    Ba and Caruana, "Do Deep Nets Really Need to be Deep?", NIPS 2014 (which matched logits by L2).
    """

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"ProbabilityMSE: student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ")
        pixels = student_logits.numel() // max(student_logits.shape[1], 1)
        if pixels == 0:
            return student_logits.sum() * 0.0
        # float32 whatever the inputs (under autocast a network's outputs may come in bf16/fp16)
        p_s = torch.softmax(student_logits.float() / self.temperature, dim=1)
        p_t = torch.softmax(teacher_logits.detach().float() / self.temperature, dim=1)
        return (p_s - p_t).square().sum() / pixels
