"""Attention transfer: the student's spatial attention maps, at one or more taps, matched to the teacher's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.config.options import option, require
from kdray.errors import ConfigError, PreflightError
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.inputs import HEAD, StepInput, student_features, teacher_features
from kdray.losses.registry import LossConfig, LossContext, register_loss


@dataclass
class ATConfig(LossConfig):
    """`losses.at`: see `AttentionTransfer`."""

    weight: float = option(10000.0, at_least=0)
    # what the loss reads: the layers whose attention maps are compared, one term each
    taps: tuple[str, ...] = option((HEAD,), constructor=False)
    p: float = option(2.0, above=0)

    def check(self, prefix: str) -> None:
        key, shown = f"{prefix}.taps", list(self.taps)
        require(len(self.taps) >= 1, key, shown, "name at least one layer, e.g. [head]")
        repeated = sorted({tap for tap in self.taps if self.taps.count(tap) > 1})
        require(not repeated, key, shown, f"each layer at most once; repeated: {', '.join(repeated)}")


def _argument(side: str, index: int) -> str:
    """The forward argument of the `index`-th tap's map of `side` (student/teacher)."""
    return f"{side}_{index}"


def _reads(config: ATConfig) -> dict[str, StepInput]:
    reads: dict[str, StepInput] = {}
    for i, tap in enumerate(config.taps):
        reads[_argument("student", i)] = student_features(tap)
        reads[_argument("teacher", i)] = teacher_features(tap)
    return reads


def _build(config: ATConfig, context: LossContext) -> AttentionTransfer:
    return AttentionTransfer(config.taps, config.p)


def attention_map(features: Tensor, p: float) -> Tensor:
    """`a(f) = normalize((1/C) Σ_c |f_c|^p)` over the h·w positions of each image. (N, C, h, w) -> (N, h·w)."""
    magnitude = features.abs()
    if p >= 1:
        powered = magnitude.square() if p == 2 else magnitude.pow(p)
    else:
        # d|f|^p/df is infinite at f = 0 for p < 1, and ReLU maps are full of exact zeros: autograd would give
        # inf·0 = NaN there. The value is kept exactly; the gradient at those zeros is taken as 0.
        nonzero = magnitude > 0
        powered = torch.where(nonzero, torch.where(nonzero, magnitude, 1.0).pow(p), 0.0)
    return F.normalize(powered.mean(dim=1).flatten(1), dim=1)


@register_loss("at", position=100, config=ATConfig, label="AT", reads=_reads, build=_build)
class AttentionTransfer(nn.Module):
    """AT: `L = Σ_taps mean over N·h·w of (a(f_S) − a(f_T))²`, `a(f) = normalize((1/C) Σ_c |f_c|^p)`.

    Per image, a(f) is the channel mean of |f|^p at each position, L2-normalised over the h·w positions (the
    sum over channels would give the same map). Only maps are compared, so C_S and C_T may differ and there is
    no adapter; the student's and teacher's maps of a tap must have the same h×w. The teacher is detached.

    Forward arguments: `student_<i>` and `teacher_<i>`, the maps of `taps[i]` (the registry's `reads` names
    them), each (N, C, h_i, w_i), C_S for the student and C_T for the teacher. Returns a float32 scalar.

    Scale: the mean over positions makes each term scale as 1/(h·w) (a unit map's squared entries sum to 2 at
    most); CIRKD's weight 10000 (`losses/at.py`, `train_kd/train_at.sh`, head feature only, with KD on, no mIoU
    published) suits its 64×128 maps, and other map sizes want it rescaled. The paper sums stage groups with
    weight β/2, β = 1000, and p = 2.

    Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of
    Convolutional Neural Networks via Attention Transfer", ICLR 2017, arXiv:1612.03928.
    """

    def __init__(self, taps: tuple[str, ...] = (HEAD,), p: float = 2.0) -> None:
        super().__init__()
        owner = type(self).__name__
        if not taps or not all(isinstance(t, str) for t in taps):
            raise ConfigError(f"{owner}: taps={taps!r} is not valid; expected one or more layer names")
        self.taps = tuple(taps)
        self.p = _checks.number(owner, "p", p, positive=True)

    def forward(self, **maps: Tensor) -> Tensor:
        owner = type(self).__name__
        expected = [_argument(side, i) for i in range(len(self.taps)) for side in ("student", "teacher")]
        if sorted(maps) != sorted(expected):
            raise PreflightError(f"{owner}: got the maps {sorted(maps)}, expected {expected} (a student and a "
                                 f"teacher map for each of the taps {list(self.taps)})")
        pairs = [(maps[_argument("student", i)], maps[_argument("teacher", i)]) for i in range(len(self.taps))]
        for tap, (student, teacher) in zip(self.taps, pairs, strict=True):
            _checks.same_grid(owner, f"student {tap}", student, f"teacher {tap}", teacher)
        if pairs[0][0].shape[0] == 0:
            return _checks.empty_batch(*(student for student, _ in pairs))
        # outside autocast: the normalisation's sum of squares over thousands of positions needs float32
        with autocast_off(pairs[0][0].device.type):
            terms = []
            for student, teacher in pairs:
                work = torch.promote_types(student.dtype, torch.float32)
                a_s = attention_map(student.to(work), self.p)
                a_t = attention_map(teacher.detach().to(work), self.p)
                terms.append((a_s - a_t).square().mean())
            return torch.stack(terms).sum()
