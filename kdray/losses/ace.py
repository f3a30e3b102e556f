"""Adaptive cross-entropy: the teacher's soft target where it is right, the label where it is wrong."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.inputs import LABELS_AT_LOGITS, STUDENT_LOGITS, TEACHER_LOGITS
from kdray.losses.labels import check_labels_on_cpu, downsample_labels
from kdray.losses.registry import LossConfig, register_loss
from kdray.losses.softmax_kl import LOG2_E, shifted_exponentials

LN_2 = math.log(2.0)

RULES = ("replace", "average")




@dataclass
class ACEConfig(LossConfig):
    """`losses.ace`: see `AdaptiveCrossEntropy`."""

    rule: Literal["replace", "average"] = "replace"
    temperature: float = option(1.0, above=0)


@register_loss("ace", position=30, config=ACEConfig, label="ACE",
               reads={"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS, "labels": LABELS_AT_LOGITS})
class AdaptiveCrossEntropy(nn.Module):
    """ACE: `L = -(1/|V|) Σ_{i ∈ V} Σ_k q_i[k] log softmax(z_S,i / T)[k]`, V = pixels with `y↓_i ≠ ignore`.

    With `p_T,i = softmax(z_T,i / T)` and the teacher right at i when `argmax_k z_T,i[k] == y↓_i`:

    - `rule="replace"` (default): `q_i = p_T,i` where the teacher is right, else `onehot(y↓_i)`;
    - `rule="average"`: `q_i = (p_T,i + onehot(y↓_i)) / 2` where the teacher is right, else `onehot(y↓_i)`.

    No T² factor (as in docs/losses.md); 0 when every pixel is ignored. ACE subsumes CE, so a job that enables
    it normally disables CE, explicitly.

    Shapes: student_logits, teacher_logits (N, K, h, w); labels (N, h, w) or (N, H, W) int64 (resized to
    `y↓` by nearest neighbour), each a class in 0..K-1 or `ignore_index`: `DataError` otherwise (checked on the
    CPU, see `labels.check_labels_on_cpu`; the objective checks them once per step on any device).
    Returns a scalar.

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
        _checks.label_map(owner, labels, "student_logits", student_logits)
        labels = downsample_labels(labels, student_logits.shape[-2:])
        check_labels_on_cpu(labels, student_logits.shape[1], self.ignore_index)
        return _AdaptiveCrossEntropyMean.apply(
            student_logits, teacher_logits.detach(), labels, self.temperature, self.rule, self.ignore_index
        )


class _AdaptiveCrossEntropyMean(torch.autograd.Function):
    """`−(1/|V|) Σ_i Σ_k q_i[k] log p_S,i[k]` with its gradient written out:
    `∂/∂z_S,i = (Σ_k q_i[k] · p_S,i − q_i) / (T |V|)`, |V| = max(1, #pixels with y↓ ≠ ignore).

    q_i = a_i p_T,i + b_i onehot(y↓_i) with per-pixel weights: replace a = [right], b = [labelled ∧ wrong];
    average a = [right]/2, b = [labelled] − [right]/2 (right: the teacher's argmax is y↓_i; labelled: y↓_i
    in [0, K) and not ignored; Σ_k q_i[k] = a_i + b_i = [labelled]).

    Neither log-softmax is written out. With the shifted scores `s̃ = (z_S − max_k z_S)/T`, `Z_S = Σ_k exp(s̃_k)`
    and `log p_S[k] = s̃_k − log Z_S`, the sum is `Σ_i [labelled_i] log Z_S,i − Σ_i Σ_k q_i[k] s̃_i,k`: one dot
    product of the targets with s̃ and a per-pixel `log`. The targets q are built once, in the buffer of the
    teacher's `exp((z_T − max)/T)`: scaled in place by `a / Z_T`, then b added at the labels by `scatter_add_`;
    they are also the gradient's second term. Exponentials are `exp2` of scores scaled by log₂e
    (`shifted_exponentials` says why); shifted and scaled scores are made in one broadcast `add`. No `gather`
    (on CPU it costs as much as KD's whole forward over this strided class axis), no chain of autograd nodes,
    three (N, K, h, w) tensors.
    Half-precision inputs are computed in float32.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, rule, ignore_index):
        dtype = student.dtype
        num_classes = student.shape[1]
        with autocast_off(student.device.type):
            student = student.to(torch.promote_types(dtype, torch.float32))  # half precision computed in float32
            teacher = teacher.to(student.dtype)
            index = labels.clamp(0, num_classes - 1)  # the label's class where labelled, a class otherwise
            labelled = index == labels  # y↓ in [0, K)
            if 0 <= ignore_index < num_classes:  # otherwise no ignored pixel is in [0, K)
                labelled &= labels != ignore_index
            base2 = LOG2_E / temperature  # scores over T, in units of ln 2

            target, teacher_top = shifted_exponentials(teacher, 1, temperature)  # Z_T · p_T
            right = (class_argmax(teacher, teacher_top) == labels) & labelled  # argmax is invariant to T
            soft_weight = right.to(student.dtype)  # a
            if rule == "average":
                soft_weight.mul_(0.5)
            labelled = labelled.to(student.dtype)  # as numbers from here: cheaper in arithmetic than booleans
            label_weight = labelled - soft_weight  # b = [labelled] − a
            target.mul_((soft_weight / target.sum(dim=1)).unsqueeze(1))  # a p_T
            target.scatter_add_(1, index.unsqueeze(1), label_weight.unsqueeze(1))  # q = a p_T + b onehot(y↓)

            shifted = torch.add(student.amax(dim=1, keepdim=True) * -base2, student, alpha=base2)  # s̃ / ln 2
            target_term = torch.dot(target.flatten(), shifted.flatten())  # Σ_i Σ_k q_i[k] s̃_i,k / ln 2
            student_exp = shifted.exp2_()  # Z_S · p_S, in the shifted scores' buffer
            student_norm = student_exp.sum(dim=1)  # Z_S ≥ 1
            student_weight = labelled / student_norm  # [labelled] / Z_S
            count = (labels != ignore_index).sum().clamp_min(1)  # |V|
            mean = student_norm.log_().mul_(labelled).sum().sub_(target_term, alpha=LN_2).div_(count)
        ctx.save_for_backward(student_exp, student_weight, target, count)
        ctx.input_dtype, ctx.temperature = dtype, temperature
        return mean

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        student_exp, student_weight, target, count = ctx.saved_tensors
        scale = grad_total / (count * ctx.temperature)  # ∂L/∂mean / (T |V|)
        grad = student_exp * (student_weight * scale).unsqueeze(1)  # [labelled] p_S · ∂L/∂mean / (T |V|)
        grad.addcmul_(target, scale, value=-1)  # − q · ∂L/∂mean / (T |V|)
        return grad.to(ctx.input_dtype), None, None, None, None, None


def class_argmax(logits: Tensor, top: Tensor | None = None) -> Tensor:
    """`logits.argmax(dim=1)` (the first class of the highest score, as torch breaks ties), from `amax`.

    logits: (N, K, h, w) -> (N, h, w) int64; top: `logits.amax(dim=1, keepdim=True)` when the caller has it.
    The maxima are marked (as float32 1s: torch's CPU comparison is slower writing booleans than floats), each
    mark weighted by K − k (K for the first class, 1 for the last), and the largest weight found by a max over
    the class axis: on CPU an order of magnitude faster than argmax, whose kernel walks the strided class axis
    one pixel at a time (README, Performance).
    A NaN score makes no class the first maximum: the result is then K.
    """
    num_classes = logits.shape[1]
    if top is None:
        top = logits.amax(dim=1, keepdim=True)
    rank = _ranks(num_classes, logits.device)
    marks = torch.eq(logits, top, out=torch.empty(logits.shape, device=logits.device, dtype=torch.float32))
    return num_classes - marks.mul_(rank).amax(dim=1).long()


@functools.lru_cache(maxsize=16)
def _ranks(num_classes: int, device: torch.device) -> Tensor:
    """(1, K, 1, 1) float32 K − k, made once per class count and device (read only)."""
    return torch.arange(num_classes, 0, -1, device=device, dtype=torch.float32).view(1, -1, 1, 1)
