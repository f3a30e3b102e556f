"""DIST: inter- and intra-class Pearson relations between the student's and the teacher's class probabilities."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kdray.config.options import option
from kdray.errors import PreflightError
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.inputs import STUDENT_AUX_LOGITS, STUDENT_LOGITS, TEACHER_AUX_LOGITS, TEACHER_LOGITS, StepInput
from kdray.losses.registry import LossConfig, register_loss
from kdray.losses.standardize import standardize_logits

SCOPES = ("batch", "image")
EPS = 1e-8  # in ρ's denominator, as DIST's code has it: a constant row or column gives ρ = 0, not 0/0


@dataclass
class DISTConfig(LossConfig):
    """`losses.dist`: see `DIST`."""

    temperature: float = option(1.0, above=0)
    beta: float = option(1.0, at_least=0)
    gamma: float = option(1.0, at_least=0)
    intra_scope: Literal["batch", "image"] = "batch"
    standardize: bool = False
    aux_weight: float = option(0.0, at_least=0)


def _reads(config: DISTConfig) -> dict[str, StepInput]:
    """The main logits; with `aux_weight` > 0 also both models' auxiliary logits (required)."""
    reads = {"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS}
    if config.aux_weight > 0:
        reads |= {"student_aux_logits": STUDENT_AUX_LOGITS, "teacher_aux_logits": TEACHER_AUX_LOGITS}
    return reads


def pearson(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """`Σ(a − ā)(b − b̄) / (‖a − ā‖·‖b − b̄‖ + 1e-8)` along `dim` (that axis removed).

    Where a or b is constant along `dim` to its float precision (a head whose logits are all equal at a pixel,
    as a narrow auxiliary head's can be after ReLU and dropout), ρ is 0/0, which the 1e-8 makes ~0, and its
    gradient there, `(b − b̄)/1e-8`, a spike of up to ~1e8 that wrecks a run: such a ρ keeps its value and passes
    no gradient (the formula has none to give: ρ is not differentiable at a constant vector).
    """
    centered_a = a - a.mean(dim=dim, keepdim=True)
    centered_b = b - b.mean(dim=dim, keepdim=True)
    # vector_norm's gradient is 0 at a zero vector (a constant column), where sqrt(Σ x²) would give NaN
    norm_a = torch.linalg.vector_norm(centered_a, dim=dim)
    norm_b = torch.linalg.vector_norm(centered_b, dim=dim)
    rho = (centered_a * centered_b).sum(dim=dim) / (norm_a * norm_b + EPS)
    flat = (norm_a <= _rounding_floor(a, dim)) | (norm_b <= _rounding_floor(b, dim))
    return torch.where(flat, rho.detach(), rho)


def _rounding_floor(x: Tensor, dim: int) -> Tensor:
    """The norm below which `x − x̄` along `dim` is rounding noise: 8·eps·√n·max|x| (n the length of `dim`)."""
    n = x.shape[dim]
    return x.detach().abs().amax(dim=dim) * (8 * torch.finfo(x.dtype).eps * math.sqrt(n))


@register_loss("dist", position=110, config=DISTConfig, label="DIST", reads=_reads)
class DIST(nn.Module):
    """DIST's relational match of the class probabilities, per pixel (inter) and per class (intra).

    With `p_X,i = softmax(z_X,i / τ)` over the K classes at pixel i, the P = N·h·w pixels of the batch are the
    rows of a P×K matrix, and `ρ(a, b) = Σ(a − ā)(b − b̄) / (‖a − ā‖·‖b − b̄‖ + 1e-8)`:

        inter = 1 − (1/P) Σ_i ρ(p_S,i,:, p_T,i,:)          (each pixel's row, over the classes)
        intra = 1 − (1/K) Σ_k ρ(p_S,:,k, p_T,:,k)          (each class's column, over all P pixels)
        L = τ² · (β · inter + γ · intra)

    `intra_scope="image"` takes the intra term per image instead: ρ per image and class over its h·w pixels,
    averaged over the N·K pairs (seg-gdkd's `per_image_intra`); at N = 1 the two scopes agree. Every pixel
    counts: DIST reads no labels. `standardize=True` first replaces each pixel's logit vector, student and
    teacher separately, by `(z − mean_k z) / (std_k z + 1e-7)` (`standardize_logits`), which makes L invariant to
    `z → a·z + b` per pixel (a > 0). Computed in float32 at least, also under autocast; the teacher is detached.

    `aux_weight` = w > 0 adds the same loss (same τ, β, γ, scope and standardization) on the auxiliary FCN
    heads' logits, `L_DIST = L(z_S, z_T) + w · L(z_S,aux, z_T,aux)`; it then reads both models' auxiliary logits,
    and a student or teacher without an auxiliary head fails the pre-flight check. Default 0 (no aux term);
    DIST's segmentation recipe (hunto/DIST_KD `segmentation/train_kd.py`) uses 1 on the main logits and 0.4 on
    the auxiliary ones.

    Shapes: student_logits, teacher_logits (N, K, h, w); student_aux_logits, teacher_aux_logits (N, K, h', w')
    or None (read only when aux_weight > 0). Returns a scalar.

    Paper: T. Huang, S. You, F. Wang, C. Qian, C. Xu, "Knowledge Distillation from A Stronger Teacher",
    NeurIPS 2022, arXiv:2205.10536 (code: hunto/DIST_KD, `segmentation/losses/dist_kd.py`; τ and τ² on both
    terms as in its classification code). Standardization: Sun et al., CVPR 2024, arXiv:2403.01427.
    """

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 intra_scope: str = "batch", standardize: bool = False, aux_weight: float = 0.0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.temperature = _checks.number(owner, "temperature", temperature, positive=True)
        self.beta = _checks.number(owner, "beta", beta)
        self.gamma = _checks.number(owner, "gamma", gamma)
        self.intra_scope = _checks.choice(owner, "intra_scope", intra_scope, SCOPES)
        self.standardize = _checks.boolean(owner, "standardize", standardize)
        self.aux_weight = _checks.number(owner, "aux_weight", aux_weight)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, student_aux_logits: Tensor | None = None,
                teacher_aux_logits: Tensor | None = None) -> Tensor:
        loss = self._relations(student_logits, teacher_logits, "student_logits", "teacher_logits")
        if self.aux_weight > 0:
            _checks.aux_pair(type(self).__name__, self.aux_weight, student_aux_logits, teacher_aux_logits)
            aux = self._relations(student_aux_logits, teacher_aux_logits, "student_aux_logits", "teacher_aux_logits")
            loss = loss + self.aux_weight * aux
        return loss

    def _relations(self, student_logits: Tensor, teacher_logits: Tensor, s_name: str, t_name: str) -> Tensor:
        """L(z_S, z_T) of the class docstring on one pair of score maps."""
        owner = type(self).__name__
        _checks.same_shape(owner, s_name, student_logits, t_name, teacher_logits)
        if student_logits.shape[0] == 0:
            return _checks.empty_batch(student_logits)
        k = student_logits.shape[1]
        if self.standardize and k < 2:
            raise PreflightError(f"{owner}: standardize=True needs K >= 2 classes, got {s_name} "
                                 f"{tuple(student_logits.shape)}")
        t = self.temperature
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        with autocast_off(student_logits.device.type):
            student = student_logits.to(dtype).flatten(2)  # (N, K, h·w)
            teacher = teacher_logits.detach().to(dtype).flatten(2)
            if self.standardize:
                student, teacher = standardize_logits(student, dim=1), standardize_logits(teacher, dim=1)
            p_s = torch.softmax(student / t, dim=1)
            p_t = torch.softmax(teacher / t, dim=1)
            inter = 1 - pearson(p_s, p_t, dim=1).mean()  # ρ per (image, pixel), over the classes
            if self.intra_scope == "image":
                intra = 1 - pearson(p_s, p_t, dim=2).mean()  # ρ per (image, class), over its pixels
            else:  # one column per class over every pixel of the batch
                intra = 1 - pearson(p_s.transpose(0, 1).reshape(k, -1), p_t.transpose(0, 1).reshape(k, -1),
                                    dim=1).mean()
            return (t * t) * (self.beta * inter + self.gamma * intra)
