"""Adaptive cross-entropy: the teacher's soft target where it is right, the label where it is wrong."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdray.losses import _checks
from kdray.losses.labels import downsample_labels
from kdray.losses.softmax_kl import probabilities

RULES = ("replace", "average")


class AdaptiveCrossEntropy(nn.Module):
    """ACE: `L = -(1/|V|) Σ_{i ∈ V} Σ_k q_i[k] log softmax(z_S,i / T)[k]`, V = pixels with `y↓_i ≠ ignore`.

    With `p_T,i = softmax(z_T,i / T)` and the teacher right at i when `argmax_k z_T,i[k] == y↓_i`:

    - `rule="replace"` (default): `q_i = p_T,i` where the teacher is right, else `onehot(y↓_i)`;
    - `rule="average"`: `q_i = (p_T,i + onehot(y↓_i)) / 2` where the teacher is right, else `onehot(y↓_i)`.

    No T² factor (the spec's formula); 0 when every pixel is ignored. ACE subsumes CE, so a job that enables
    it normally disables CE, explicitly.

    Shapes: student_logits, teacher_logits (N, K, h, w); labels (N, h, w) or (N, H, W) int64 (resized to
    `y↓` by nearest neighbour). Returns a scalar.

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
        labels = downsample_labels(labels, student_logits.shape[-2:])
        total = _AdaptiveCrossEntropySum.apply(
            student_logits, teacher_logits.detach(), labels, self.temperature, self.rule, self.ignore_index
        )
        return total / (labels != self.ignore_index).sum().clamp_min(1)


class _AdaptiveCrossEntropySum(torch.autograd.Function):
    """`−Σ_i Σ_k q_i[k] log p_S,i[k]` with its gradient written out: `∂/∂z_S,i = (Σ_k q_i[k] · p_S,i − q_i) / T`.

    q_i = a_i p_T,i + b_i onehot(y↓_i) with per-pixel weights: replace a = [right], b = [labelled ∧ wrong];
    average a = [right]/2, b = [labelled] − [right]/2 (right: the teacher's argmax is y↓_i; labelled: y↓_i
    in [0, K) and not ignored; Σ_k q_i[k] = a_i + b_i = [labelled]). No one-hot tensor and no chain of autograd
    nodes: one log-softmax per side, the label's log-probability by `gather`, the label's −1 of the gradient by
    `scatter_add_`. Half-precision inputs are computed in float32.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, rule, ignore_index):
        dtype = student.dtype
        num_classes = student.shape[1]
        with torch.autocast(student.device.type, enabled=False):
            student = student.to(torch.promote_types(dtype, torch.float32))  # half precision computed in float32
            teacher = teacher.to(student.dtype)
            labelled = (labels >= 0) & (labels < num_classes)  # (N, h, w)
            if 0 <= ignore_index < num_classes:  # otherwise no ignored pixel is in [0, K)
                labelled &= labels != ignore_index
            index = torch.where(labelled, labels, 0).unsqueeze(1)  # (N, 1, h, w), any class where unlabelled
            right = (class_argmax(teacher) == labels) & labelled  # argmax is invariant to T
            scale = 1.0 / temperature
            log_p_s = torch.log_softmax(student if temperature == 1 else student * scale, dim=1)
            p_t = probabilities(torch.log_softmax(teacher if temperature == 1 else teacher * scale, dim=1))
            soft = torch.linalg.vecdot(p_t, log_p_s, dim=1)  # Σ_k p_T,i[k] log p_S,i[k]
            at_label = log_p_s.gather(1, index).squeeze(1)  # log p_S,i[y↓_i]
            soft_weight = right.to(student.dtype)
            label_weight = labelled.to(student.dtype)
            if rule == "average":
                soft_weight.mul_(0.5)
            label_weight.sub_(soft_weight)
            total = -(soft_weight * soft + label_weight * at_label).sum()
        ctx.save_for_backward(log_p_s, p_t, index, labelled, soft_weight, label_weight)
        ctx.input_dtype, ctx.scale = dtype, scale
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        log_p_s, p_t, index, labelled, soft_weight, label_weight = ctx.saved_tensors
        grad = probabilities(log_p_s)
        grad.addcmul_(p_t, soft_weight.unsqueeze(1), value=-1)  # − a_i p_T,i
        grad.scatter_add_(1, index, label_weight.unsqueeze(1).neg())  # − b_i onehot(y↓_i)
        # × Σ_k q_i[k] = [labelled] (a and b are 0 where it is 0, so the mask can come last), × ∂L/∂total / T
        grad.mul_((labelled * (grad_total * ctx.scale)).unsqueeze(1))
        return grad.to(ctx.input_dtype), None, None, None, None, None


def class_argmax(logits: Tensor) -> Tensor:
    """`logits.argmax(dim=1)` (the first class of the highest score, as torch breaks ties), from `amax`.

    logits: (N, K, h, w) -> (N, h, w) int64. The maxima are marked, each mark weighted by K − k (K for the
    first class, 1 for the last), and the largest weight found by a max over the class axis of small integers:
    three cheap passes, against 3.3 ms for argmax over that strided axis on CPU (0.14 ms on 2×19×64×128).
    A NaN score makes no class the first maximum: the result is then K.
    """
    num_classes = logits.shape[1]
    dtype = torch.uint8 if num_classes < 256 else torch.int32
    rank = torch.arange(num_classes, 0, -1, device=logits.device, dtype=dtype).view(1, -1, 1, 1)  # K − k
    is_top = logits == logits.amax(dim=1, keepdim=True)
    return num_classes - (is_top * rank).amax(dim=1).long()
