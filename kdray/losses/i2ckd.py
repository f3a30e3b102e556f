"""I2CKD: class prototypes of teacher and student pulled together, other classes pushed past a margin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.class_sums import class_sums
from kdray.losses.inputs import LABELS, STUDENT_FEATURES, TEACHER_FEATURES
from kdray.losses.labels import downsample_labels, one_hot_ignore
from kdray.losses.registry import LossConfig, register_loss

SCOPES = ("batch", "image")
NEGATIVES = ("student", "teacher")
MININGS = ("all", "hardest")
DISTANCES = ("l2", "squared_l2")


def class_prototypes(
    features: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255, scope: str = "batch"
) -> tuple[Tensor, Tensor]:
    """Mean feature of each class (eq. 1 of I2CKD): `P[k] = Σ_i 1[y↓_i = k] f_i / Σ_i 1[y↓_i = k]`.

    features: (N, C, h, w); labels: (N, h, w) or (N, H, W) int64 (resized to `y↓` by nearest neighbour).
    Returns `(prototypes, present)`:

    - `scope="batch"`: sums over the whole batch: prototypes (K, C), present (K,) bool;
    - `scope="image"`: one set per image: prototypes (N, K, C), present (N, K) bool.

    Absent classes get a zero row and `present = False`. One `one_hot(y↓)ᵀ @ f` contraction, no loop.
    """
    _checks.choice("class_prototypes", "scope", scope, SCOPES)
    labels = downsample_labels(labels, features.shape[-2:])
    one_hot = one_hot_ignore(labels, num_classes, ignore_index, features.dtype).flatten(2)  # (N, K, M)
    counts = _class_counts(one_hot, scope)
    return _prototype_sums(features, one_hot, scope) / counts.clamp_min(1).unsqueeze(-1), counts > 0


def _class_counts(one_hot: Tensor, scope: str) -> Tensor:
    """Pixels of each class: (K,) for `scope="batch"`, (N, K) for "image"; one_hot (N, K, M)."""
    counts = one_hot.sum(dim=2)
    return counts.sum(dim=0) if scope == "batch" else counts


def _prototype_sums(features: Tensor, one_hot: Tensor, scope: str) -> Tensor:
    """Σ_i 1[y↓_i = k] f_i: (K, C) for `scope="batch"`, (N, K, C) for "image"; one_hot (N, K, M)."""
    sums = class_sums(features.flatten(2), one_hot).mT  # (N, K, C)
    return sums.sum(dim=0) if scope == "batch" else sums


def _distances(a: Tensor, b: Tensor, distance: str) -> Tensor:
    """`d(a[..., k, :], b[..., j, :])` for every k, j: (B, K, C) and (B, J, C) -> (B, K, J).

    d/dx sqrt(x) is infinite at 0, so a hand-made `sqrt(Σ (a − b)²)` gives NaN gradients (inf · 0) where two
    prototypes coincide (a student that copies the teacher, two classes with identical features). `cdist`'s
    backward returns 0 there instead, the subgradient that leaves the other terms alone; the direct
    (difference) form is forced, as the matrix-product form loses the small distances to cancellation.
    """
    euclidean = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
    return euclidean.square() if distance == "squared_l2" else euclidean


def triplet_prototype_loss(
    teacher_protos: Tensor,
    student_protos: Tensor,
    present: Tensor,
    margin: float = 0.5,
    negatives: str = "student",
    mining: str = "all",
    distance: str = "l2",
) -> Tensor:
    """Eq. 3 of I2CKD: `mean_{k, j≠k} max(0, d(P_T[k], P_S[k]) − d(P_T[k], P_neg[j]) + m)`.

    teacher_protos, student_protos: (K, C) or (B, K, C) (B independent groups, e.g. images); present: (K,)
    or (B, K) bool. k and j run over the present classes of a group. `P_neg` is `student_protos`
    (`negatives="student"`, as eq. 2 reads) or `teacher_protos`. `mining="all"`: mean over the K'(K'−1)
    ordered pairs; `mining="hardest"`: for each anchor k only its closest negative j (largest term), mean over
    the K' anchors. `distance`: `l2` (‖·‖₂) or `squared_l2`. Groups with fewer than two present classes are
    left out; the result is the mean over the others, 0 when there are none (still a graph node, no NaN).
    """
    owner = "triplet_prototype_loss"
    _checks.number(owner, "margin", margin)
    _checks.choice(owner, "negatives", negatives, NEGATIVES)
    _checks.choice(owner, "mining", mining, MININGS)
    _checks.choice(owner, "distance", distance, DISTANCES)
    if present.dim() == 1:
        teacher_protos, student_protos, present = teacher_protos[None], student_protos[None], present[None]
    # Distances of a few hundred prototypes are cheap: keep them in at least float32 under AMP.
    dtype = torch.promote_types(student_protos.dtype, torch.float32)
    teacher_protos, student_protos = teacher_protos.to(dtype), student_protos.to(dtype)
    negative_protos = student_protos if negatives == "student" else teacher_protos

    negative = _distances(teacher_protos, negative_protos, distance)  # (B, K, K): d(P_T[k], P_neg[j])
    if negatives == "student":  # d(P_T[k], P_S[k]) is the diagonal of d(P_T[k], P_S[j])
        positive = negative.diagonal(dim1=-2, dim2=-1)
    else:  # (B, K): each anchor against its own student prototype, as a (B·K) batch of 1×1 distances
        positive = _distances(teacher_protos.unsqueeze(-2), student_protos.unsqueeze(-2), distance)[..., 0, 0]
    hinge = (positive.unsqueeze(-1) - negative + margin).clamp_min(0)

    num_classes = present.shape[-1]
    not_self = ~torch.eye(num_classes, dtype=torch.bool, device=present.device)
    pairs = present.unsqueeze(-1) & present.unsqueeze(-2) & not_self  # (B, K, K): anchor k, negative j
    groups = (present.sum(dim=-1) >= 2).sum().clamp_min(1)  # groups with at least one pair
    # Each mean as one weighted sum (weights without gradient): fewer autograd nodes on a few hundred numbers.
    if mining == "all":
        weight = pairs / (pairs.sum(dim=(-2, -1), keepdim=True).clamp_min(1) * groups)
        return (hinge * weight).sum()
    hardest = (hinge * pairs).amax(dim=-1)  # (B, K); the hinge is ≥ 0, so a masked 0 never beats a real pair
    anchors = pairs.any(dim=-1)
    weight = anchors / (anchors.sum(dim=-1, keepdim=True).clamp_min(1) * groups)
    return (hardest * weight).sum()




@dataclass
class I2CKDConfig(LossConfig):
    """`losses.i2ckd`: see `I2CKD`."""

    margin: float = option(0.5, at_least=0)
    scope: Literal["batch", "image"] = "batch"
    negatives: Literal["student", "teacher"] = "student"
    mining: Literal["all", "hardest"] = "all"
    normalize: bool = True
    distance: Literal["l2", "squared_l2"] = "l2"


@register_loss("i2ckd", position=80, config=I2CKDConfig, label="I2CKD",
               reads={"student_features": STUDENT_FEATURES, "teacher_features": TEACHER_FEATURES, "labels": LABELS})
class I2CKD(nn.Module):
    """I2CKD: triplet loss between teacher and student class prototypes (eqs. 1-3 of the paper).

    `L = mean_{k, j≠k} max(0, d(P_T[k], P_S[k]) − d(P_T[k], P_neg[j]) + m)` over the present classes, with
    `P_X[k]` the mean of f_X over the pixels with `y↓ = k` (see `class_prototypes`), the student's feature
    first mapped to C_T by the adapter (1×1 conv, owned here), and, with `normalize=True` (default), each
    prototype L2-normalised so the margin m is scale-free. Options (defaults in brackets): `margin` [0.5],
    `negatives` student|teacher [student], `mining` all|hardest [all], `distance` l2|squared_l2 [l2],
    `scope` batch|image [batch]:

    - `scope="batch"`: one prototype per class over the whole (per-rank) batch; the loss is the mean over
      the ordered pairs (k, j) of classes present in the batch; 0 if fewer than two classes are present.
    - `scope="image"`: prototypes per image; for each image n the loss above over the classes present in
      image n; the result is the mean of these over the images with at least two present classes; 0 if none.

    Because the adapter is linear without bias, `P_S = W · mean(f_S)`: the prototypes are taken on f_S and
    then mapped by the adapter's weight, which equals averaging the adapted map but costs K·C_S·C_T instead
    of N·h·w·C_S·C_T.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w); labels (N, h, w) or
    (N, H, W) int64. Returns a scalar. The full objective of the paper (eq. 4) is `CE + λ1·KD + λ2·I2CKD`.

    Paper: Karine, Napoléon, Jridi, "I2CKD: Intra- and Inter-Class Knowledge Distillation for Semantic
    Segmentation", arXiv:2403.18490 (2024).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        margin: float = 0.5,
        scope: str = "batch",
        negatives: str = "student",
        mining: str = "all",
        normalize: bool = True,
        distance: str = "l2",
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_classes = _checks.positive_int(owner, "num_classes", num_classes)
        self.margin = _checks.number(owner, "margin", margin)
        self.scope = _checks.choice(owner, "scope", scope, SCOPES)
        self.negatives = _checks.choice(owner, "negatives", negatives, NEGATIVES)
        self.mining = _checks.choice(owner, "mining", mining, MININGS)
        self.normalize = _checks.boolean(owner, "normalize", normalize)
        self.distance = _checks.choice(owner, "distance", distance, DISTANCES)
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)
        self.adapter = FeatureAdapter(student_channels, teacher_channels)

    def forward(self, student_features: Tensor, teacher_features: Tensor, labels: Tensor) -> Tensor:
        owner = type(self).__name__
        _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
        _checks.adapter_channels(owner, self.adapter, student_features, teacher_features)
        _checks.label_map(owner, labels, "student_features", student_features)
        if student_features.shape[0] == 0:
            return _checks.empty_batch(student_features, self.adapter.conv.weight)
        labels = downsample_labels(labels, student_features.shape[-2:])
        # In float32 at least, autocast or not: a class's feature sum over thousands of pixels overflows
        # float16, and normalising an absent class's zero prototype divides by an eps that float16 rounds to 0.
        work = torch.promote_types(student_features.dtype, torch.float32)
        with autocast_off(student_features.device.type):
            one_hot = one_hot_ignore(labels, self.num_classes, self.ignore_index, work).flatten(2)
            counts = _class_counts(one_hot, self.scope)  # shared by the student's and the teacher's prototypes
            divisor = counts.clamp_min(1).unsqueeze(-1)
            student_protos = _prototype_sums(student_features.to(work), one_hot, self.scope) / divisor
            teacher_protos = _prototype_sums(teacher_features.detach().to(work), one_hot, self.scope) / divisor
            present = counts > 0
            student_protos = F.linear(student_protos, self.adapter.conv.weight.flatten(1).to(work))
            if self.normalize:
                student_protos = F.normalize(student_protos, dim=-1)
                teacher_protos = F.normalize(teacher_protos, dim=-1)
        return triplet_prototype_loss(
            teacher_protos, student_protos, present, self.margin, self.negatives, self.mining, self.distance
        )
