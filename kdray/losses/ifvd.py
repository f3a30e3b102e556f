"""Intra-class feature variation: how far each pixel's feature is from its class centre, per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.class_sums import class_sums
from kdray.losses.inputs import LABELS, STUDENT_FEATURES, TEACHER_FEATURES
from kdray.losses.labels import downsample_labels, one_hot_ignore
from kdray.losses.registry import LossConfig, register_loss


def _class_one_hot(labels: Tensor, num_classes: int | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """(N, h, w) labels -> (N, K, h·w) one-hot, zero columns at ignored pixels.

    Without `num_classes`, the rows are the label values present in the batch (torch.unique), which costs
    one host sync; with it, none.
    """
    if num_classes is None:
        valid = labels != ignore_index
        values, inverse = torch.unique(labels, return_inverse=True)
        labels, ignore_index, num_classes = torch.where(valid, inverse, -1), -1, len(values)
    return one_hot_ignore(labels, num_classes, ignore_index, dtype).flatten(2)


def prototype_similarity(features: Tensor, one_hot: Tensor, eps: float = 1e-12) -> Tensor:
    """`s_i = cos(f_i, c_{n,y↓_i})`, `c_{n,k}` the mean of image n's features of class k; 1 where ignored.

    features: (N, C, h, w); one_hot: (N, K, M) from `_class_one_hot`. Returns (N, M), in float32 at least
    (half-precision features are computed in float32). Norms are clamped at `eps` as `F.normalize` does, so
    an all-zero feature has cosine 0.

    The cosine is assembled from small pieces instead of a per-pixel copy of the centre (an (N, M, C)
    tensor): the dot products of every pixel with every prototype (N, K, M), of which each pixel keeps its
    own class's; the pixel norms (N, M); the prototype norms (N, K). One autograd node with the gradient
    written out (see `_PrototypeCosine`).
    """
    return _PrototypeCosine.apply(features, one_hot, eps)


def squared_norms(flat: Tensor, block_bytes: int = 1 << 21) -> Tensor:
    """`Σ_c flat[:, c, :]²`: (N, C, M) -> (N, M).

    On the CPU the squares are taken a block of channels at a time, so that the temporary is ~2 MB and is
    reused from one block to the next: a fresh square of the whole map (16 MB for the teacher at the papers'
    shape) is faulted in page by page on every call, which costs several times the arithmetic. On a GPU
    (a caching allocator) one square and one sum.
    """
    n, c, m = flat.shape
    step = c if flat.is_cuda else max(1, block_bytes // (n * m * flat.element_size()))
    total = flat[:, :step].square().sum(dim=1)
    for start in range(step, c, step):
        total += flat[:, start : start + step].square().sum(dim=1)
    return total


class _PrototypeCosine(torch.autograd.Function):
    """`prototype_similarity`, its gradient by hand. With `P = F Oᵀ / n_k` (prototypes as columns, n_k the
    class's pixel count), `d_i = f_i · P_{y_i}`, `q_i = max(|P_{y_i}|, eps)`, `r_i = max(|f_i|, eps)` and
    `s_i = d_i / (r_i q_i)` at labelled pixels, an upstream gradient g gives (a = g / (r q), b = g s):

    - ∂L/∂P_k = Σ_{i∈k} a_i f_i − [|P_k| ≥ eps] (Σ_{i∈k} b_i / |P_k|²) P_k;
    - ∂L/∂f_i = a_i P_{y_i} + (∂L/∂P_{y_i}) / n_{y_i} − [|f_i| ≥ eps] (b_i / |f_i|²) f_i.

    Both class-indexed terms of ∂L/∂f come out of one product `[P | ∂L/∂P / n] @ [O·a ; O]` (inner size 2K),
    so the backward runs two batched products over the features where autograd runs three, and keeps no
    intermediate of the features' size (the CPU saving over autograd on the plain formula: README, Performance).
    """

    @staticmethod
    def forward(ctx, features: Tensor, one_hot: Tensor, eps: float) -> Tensor:
        work = torch.promote_types(features.dtype, torch.float32)
        with autocast_off(features.device.type):
            flat = features.flatten(2).to(work)  # (N, C, M)
            one_hot = one_hot.to(work)  # (N, K, M)
            counts = one_hot.sum(dim=2).clamp_min(1).unsqueeze(1)  # (N, 1, K); absent classes: zero prototypes
            # (N, C, K). No gradient needed (the teacher) on the CPU: (N, K, M) @ (N, M, C), faster there than the
            # product with the features' own layout on the left (README, Performance).
            cpu_teacher = not (ctx.needs_input_grad[0] or flat.is_cuda)
            sums = (one_hot @ flat.mT).mT if cpu_teacher else class_sums(flat, one_hot)
            prototypes = sums / counts  # (N, C, K)
            own_dot = (prototypes.mT @ flat).mul_(one_hot).sum(dim=1)  # (N, M): f_i · P_{y_i}
            prototype_norm = prototypes.square().sum(dim=1).sqrt()  # (N, K)
            own_norm = (prototype_norm.unsqueeze(1) @ one_hot).squeeze(1)  # (N, M): |P_{y_i}|
            # max(|f|, eps) as sqrt(max(|f|², eps²)): the same number, several times faster than a norm over dim 1
            squared_norm = squared_norms(flat)  # (N, M)
            labelled = one_hot.sum(dim=1) > 0
            denominator = squared_norm.clamp_min(eps * eps).sqrt() * own_norm.clamp_min(eps)  # r_i q_i
            cosine = torch.where(labelled, own_dot / denominator, 1.0)
        if ctx.needs_input_grad[0]:
            saved = (flat, one_hot, labelled, prototypes, counts, prototype_norm, squared_norm, denominator, cosine)
            ctx.save_for_backward(*saved)
            ctx.eps, ctx.input_dtype, ctx.input_shape = eps, features.dtype, features.shape
        return cosine

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_cosine: Tensor):
        flat, one_hot, labelled, prototypes, counts, prototype_norm, squared_norm, denominator, cosine = (
            ctx.saved_tensors
        )
        eps = ctx.eps
        grad_cosine = grad_cosine.to(cosine.dtype)
        grad_dot = grad_cosine / denominator  # a
        grad_norms = grad_cosine * cosine  # b = −(∂L/∂r)·r = −(∂L/∂q)·q
        weighted_one_hot = one_hot * grad_dot.unsqueeze(1)  # (N, K, M); zero columns at unlabelled pixels
        grad_prototypes = class_sums(flat, weighted_one_hot)  # (N, C, K)
        class_norm_grad = (one_hot @ grad_norms.unsqueeze(-1)).squeeze(-1)  # (N, K): Σ_{i∈k} b_i
        norm_term = torch.where(prototype_norm >= eps, class_norm_grad / prototype_norm.square(), 0.0)
        grad_prototypes.sub_(prototypes * norm_term.unsqueeze(1))
        grad_flat = torch.cat([prototypes, grad_prototypes / counts], dim=2) @ torch.cat(
            [weighted_one_hot, one_hot], dim=1
        )  # (N, C, M)
        pixel_term = torch.where(labelled & (squared_norm >= eps * eps), grad_norms / squared_norm, 0.0)
        grad_flat.addcmul_(flat, pixel_term.unsqueeze(1), value=-1)
        return grad_flat.view(ctx.input_shape).to(ctx.input_dtype), None, None




@dataclass
class IFVDConfig(LossConfig):
    """`losses.ifvd`: see `IntraClassFeatureVariation`."""

    weight: float = option(20.0, at_least=0)


@register_loss("ifvd", position=60, config=IFVDConfig, label="IFVD",
               reads={"student_features": STUDENT_FEATURES, "teacher_features": TEACHER_FEATURES, "labels": LABELS})
class IntraClassFeatureVariation(nn.Module):
    """IFVD: `L = (1/(N·h·w)) Σ_{n,i} (s_S,i − s_T,i)²`, `s_X,i = cos(f_X,i, c_X,n,y↓_i)`.

    `c_X,n,k` is the mean of f_X over the pixels of image n with `y↓ = k` (prototype per image and class,
    computed for S and T separately with one batched `one_hot(y↓)ᵀ @ f`). At ignored pixels s = 1 for both,
    so they add 0 but still count in the mean. Only cosine maps are compared, so C_S may differ from C_T and
    there is no adapter.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w); labels (N, h, w) or (N, H, W)
    int64. `num_classes` is optional: without it the classes are the label values present in the batch (one
    extra host sync per call); with it, labels outside [0, num_classes) count as ignored. Returns a scalar.

    Paper: Wang, Zhou, Jiang, Bai, Xu, "Intra-class Feature Variation Distillation for Semantic Segmentation",
    ECCV 2020 (code: github.com/YukangWang/IFVD).
    """

    def __init__(self, ignore_index: int = 255, num_classes: int | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)
        if num_classes is not None:
            num_classes = _checks.positive_int(owner, "num_classes", num_classes)
        self.num_classes = num_classes

    def forward(self, student_features: Tensor, teacher_features: Tensor, labels: Tensor) -> Tensor:
        owner = type(self).__name__
        _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
        _checks.label_map(owner, labels, "student_features", student_features)
        if student_features.shape[0] == 0:
            return _checks.empty_batch(student_features)
        labels = downsample_labels(labels, student_features.shape[-2:])
        one_hot = _class_one_hot(labels, self.num_classes, self.ignore_index, student_features.dtype)
        s_s = prototype_similarity(student_features, one_hot)
        s_t = prototype_similarity(teacher_features.detach(), one_hot.to(teacher_features.dtype))
        return F.mse_loss(s_s, s_t.to(s_s.dtype))
