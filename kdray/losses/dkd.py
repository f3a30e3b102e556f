"""DKD per pixel: KD split into its target-class part (TCKD) and its non-target-class part (NCKD)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdray.config.options import option
from kdray.errors import PreflightError
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.inputs import (
    LABELS_AT_LOGITS,
    STUDENT_AUX_LOGITS,
    STUDENT_LOGITS,
    TEACHER_AUX_LOGITS,
    TEACHER_LOGITS,
    StepInput,
)
from kdray.losses.labels import check_labels_on_cpu, downsample_labels
from kdray.losses.registry import LossConfig, register_loss
from kdray.losses.standardize import standardize_logits


@dataclass
class DKDConfig(LossConfig):
    """`losses.dkd`: see `DecoupledKD`."""

    temperature: float = option(1.0, above=0)
    alpha: float = option(1.0, at_least=0)
    beta: float = option(2.0, at_least=0)
    standardize: bool = False
    aux_weight: float = option(0.0, at_least=0)


def _reads(config: DKDConfig) -> dict[str, StepInput]:
    """The main logits and y↓; with `aux_weight` > 0 also both models' auxiliary logits (required)."""
    reads = {"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS, "labels": LABELS_AT_LOGITS}
    if config.aux_weight > 0:
        reads |= {"student_aux_logits": STUDENT_AUX_LOGITS, "teacher_aux_logits": TEACHER_AUX_LOGITS}
    return reads


@register_loss("dkd", position=120, config=DKDConfig, label="DKD", reads=_reads)
class DecoupledKD(nn.Module):
    """Decoupled knowledge distillation at every valid pixel of the score map.

    At a valid pixel i (y↓_i ≠ `ignore_index`) with class g = y↓_i, `p = softmax(z_i / T)` over the K classes,
    the two-bin `b = (p_g, 1 − p_g)` and `p̂ = softmax over the K − 1 classes k ≠ g of z_i,k / T`:

        TCKD_i = KL(b_T ‖ b_S)        NCKD_i = KL(p̂_T ‖ p̂_S)
        L = T² · (α · (1/V) Σ_i TCKD_i + β · (1/V) Σ_i NCKD_i)

    V the number of valid pixels; none valid gives exactly 0 (still connected to the student's logits). KD at
    the same pixel is `T² · (TCKD_i + (1 − p_T,g) · NCKD_i)`: DKD frees NCKD from the teacher's confidence.
    `log b` comes from log-sum-exp (`z_g/T − lse(z/T)` and `lse_{k≠g}(z/T) − lse(z/T)`), never from the log
    of summed probabilities, and class g is left out of p̂ by a mask, not by the public codes' `z_g − 1000`
    (their value to float precision; clamping b, as they do, is then unnecessary). `standardize=True` first
    replaces each pixel's whole logit vector (before g is split off), student and teacher separately, by
    `(z − mean_k z) / (std_k z + 1e-7)` (`standardize_logits`). Needs K ≥ 2. Computed in float32 at least,
    also under autocast; the teacher is detached.

    `aux_weight` = w > 0 adds the same loss (same T, α, β and standardization) on the auxiliary FCN heads'
    logits, with the labels resized to their size (in kdray the auxiliary logits are at stride 8 too, h'×w' =
    h×w, so y↓ itself): `L_DKD = L(z_S, z_T, y↓) + w · L(z_S,aux, z_T,aux, y↓aux)`. It then reads both models'
    auxiliary logits, and a student or teacher without an auxiliary head fails the pre-flight check. Default 0
    (no aux term); seg-gdkd's recipe (ZaberKo/seg-gdkd `train_kd.py`) uses 1 on the main logits and 0.4 on the
    auxiliary ones.

    Shapes: student_logits, teacher_logits (N, K, h, w); labels (N, h, w) int64, or (N, H, W), resized to h×w
    by nearest neighbour; student_aux_logits, teacher_aux_logits (N, K, h', w') or None (read only when
    aux_weight > 0). Returns a scalar.

    Paper: B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang, "Decoupled Knowledge Distillation", CVPR 2022,
    arXiv:2203.08679; per pixel for segmentation as in ZaberKo/seg-gdkd `losses/distiller/dkd.py`.
    Standardization: Sun et al., CVPR 2024, arXiv:2403.01427.
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 1.0, beta: float = 2.0, standardize: bool = False,
                 ignore_index: int = 255, aux_weight: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.temperature = _checks.number(owner, "temperature", temperature, positive=True)
        self.alpha = _checks.number(owner, "alpha", alpha)
        self.beta = _checks.number(owner, "beta", beta)
        self.standardize = _checks.boolean(owner, "standardize", standardize)
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)
        self.aux_weight = _checks.number(owner, "aux_weight", aux_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                student_aux_logits: Tensor | None = None, teacher_aux_logits: Tensor | None = None) -> Tensor:
        loss = self._decoupled(student_logits, teacher_logits, labels, "student_logits", "teacher_logits")
        if self.aux_weight > 0:
            _checks.aux_pair(type(self).__name__, self.aux_weight, student_aux_logits, teacher_aux_logits)
            aux = self._decoupled(student_aux_logits, teacher_aux_logits, labels, "student_aux_logits",
                                  "teacher_aux_logits")
            loss = loss + self.aux_weight * aux
        return loss

    def _decoupled(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, s_name: str,
                   t_name: str) -> Tensor:
        """L(z_S, z_T, y) of the class docstring on one pair of score maps, y resized to their size."""
        owner = type(self).__name__
        _checks.same_shape(owner, s_name, student_logits, t_name, teacher_logits)
        _checks.label_map(owner, labels, s_name, student_logits)
        if student_logits.shape[0] == 0:
            return _checks.empty_batch(student_logits)
        k = student_logits.shape[1]
        if k < 2:
            raise PreflightError(f"{owner}: needs K >= 2 classes (a target and a non-target part), got "
                                 f"{s_name} {tuple(student_logits.shape)}")
        labels = downsample_labels(labels, student_logits.shape[-2:])
        check_labels_on_cpu(labels, k, self.ignore_index)
        valid = labels != self.ignore_index  # (N, h, w)
        target = labels.masked_fill(~valid, 0).unsqueeze(1)  # ignored pixels get class 0, then weight 0
        is_target = torch.zeros_like(student_logits, dtype=torch.bool).scatter_(1, target, True)
        t = self.temperature
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        with autocast_off(student_logits.device.type):
            student = student_logits.to(dtype)
            teacher = teacher_logits.detach().to(dtype)
            if self.standardize:
                student, teacher = standardize_logits(student, dim=1), standardize_logits(teacher, dim=1)
            tckd_s, log_hat_s = _parts(student / t, target, is_target)
            tckd_t, log_hat_t = _parts(teacher / t, target, is_target)
            tckd = (tckd_t.exp() * (tckd_t - tckd_s)).sum(dim=1)  # KL(b_T ‖ b_S), (N, h, w)
            # at g both log p̂ are 0 and p̂_T is masked to 0: the term is an exact 0 with a finite gradient
            nckd = (log_hat_t.exp().masked_fill(is_target, 0) * (log_hat_t - log_hat_s)).sum(dim=1)
            per_pixel = self.alpha * tckd + self.beta * nckd
            count = valid.sum().clamp_min(1).to(dtype)  # no valid pixel: 0 / 1
            return torch.where(valid, per_pixel, 0).sum() * ((t * t) / count)


def _parts(scaled: Tensor, target: Tensor, is_target: Tensor) -> tuple[Tensor, Tensor]:
    """From `s = z/T` (N, K, h, w): `log b` (N, 2, h, w) and `log p̂` (N, K, h, w, 0 at the target class)."""
    total = torch.logsumexp(scaled, dim=1, keepdim=True)
    others = torch.logsumexp(scaled.masked_fill(is_target, float("-inf")), dim=1, keepdim=True)  # finite: K >= 2
    log_b = torch.cat([scaled.gather(1, target) - total, others - total], dim=1)
    log_hat = (scaled - others).masked_fill(is_target, 0)
    return log_b, log_hat
