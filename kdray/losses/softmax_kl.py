"""KL divergence between two softmax distributions, with its gradient written out (shared by KD and CWD)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

LOG2_E = 1.0 / math.log(2.0)


def probabilities(log_p: Tensor) -> Tensor:
    """`exp(log_p)`, computed as `2^(log_p · log₂e)`: a new tensor of log_p's shape and dtype.

    torch's CPU `exp2` kernel runs about 3× faster than its `exp` (0.05 against 0.15 ms on 2×19×64×128
    float32, 2 threads); the scaling costs one cheap pass. For log-probabilities (≤ 0) the absolute error stays
    below 6e-8 in float32 (measured on [−104, 0] against a float64 exp; `exp` itself: 3e-8).
    """
    return (log_p * LOG2_E).exp2_()


class _SoftmaxKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, dim: int, weight: Tensor | None, temperature: float, scale) -> Tensor:
        dtype = student.dtype
        with torch.autocast(student.device.type, enabled=False):
            student = student.to(torch.promote_types(dtype, torch.float32))  # half precision computed in float32
            teacher = teacher.to(student.dtype)
            if temperature != 1:
                student, teacher = student / temperature, teacher / temperature
            log_p_s = torch.log_softmax(student, dim)
            log_p_t = torch.log_softmax(teacher, dim)
            p_t = probabilities(log_p_t)
            pointwise = log_p_t.sub_(log_p_s)  # log p_T − log p_S, in the teacher's buffer
            if weight is not None:
                pointwise.mul_(weight)
            total = torch.dot(p_t.reshape(-1), pointwise.reshape(-1)) * scale
        ctx.save_for_backward(log_p_s, p_t, weight)
        ctx.input_dtype, ctx.temperature, ctx.scale = dtype, temperature, scale
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        log_p_s, p_t, weight = ctx.saved_tensors
        # (p_S − p_T) · scale · ∂L/∂total / T
        grad = probabilities(log_p_s).sub_(p_t).mul_(grad_total * ctx.scale / ctx.temperature)
        if weight is not None:
            grad.mul_(weight)
        return grad.to(ctx.input_dtype), None, None, None, None, None


def softmax_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    dim: int,
    weight: Tensor | None = None,
    temperature: float = 1.0,
    scale: float | Tensor = 1.0,
) -> Tensor:
    """`scale · Σ_j w_j Σ_k p_T,j[k] (log p_T,j[k] − log p_S,j[k])`, `p_X,j = softmax(x_X,j / T)` along `dim`.

    student_logits, teacher_logits: the same shape; `dim` is the axis each distribution runs over (the classes
    for pixel-wise KD, the positions for CWD); j runs over every other index. weight: optional, broadcastable
    to the inputs and constant along `dim` (KD's mask of non-ignored pixels), 1 when None. scale: a number or a
    0-d tensor (a mean's 1/count, T²), applied inside so that no extra autograd node runs. Returns a scalar; no
    gradient flows to the teacher, the weight or the scale.

    The same number as `F.kl_div(log_softmax(s), log_softmax(t), log_target=True).sum()` (× scale), with the
    gradient written out: `∂/∂s_j[k] = scale · w_j (p_S,j[k] − p_T,j[k]) / T`. One autograd node instead of five,
    two saved tensors instead of four: on 8×19×128×256 score maps (CPU) the peak memory of forward+backward
    falls from 95 to 38 MB and the time by about 15%. Half-precision inputs are computed in float32 (the
    gradient comes back in their dtype). Where p_T underflows to 0 the term is an exact 0 (log-probabilities
    stay finite). Not twice differentiable.
    """
    if weight is not None:
        weight = weight.detach().to(torch.promote_types(student_logits.dtype, torch.float32))
    if isinstance(scale, Tensor):
        scale = scale.detach()
    return _SoftmaxKL.apply(student_logits, teacher_logits.detach(), dim, weight, temperature, scale)
