"""Option and shape checks shared by the loss modules.

Option checks run in `__init__` and raise `ConfigError` naming the loss, the option, the bad value and what
would be valid, so a typo in a job file fails at construction, not at the first training step. Shape checks
run in `forward` on Python ints only (no device sync) and raise `PreflightError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch

from kdray.errors import ConfigError, PreflightError


def choice(owner: str, option: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{owner}: {option}={value!r} is not valid; expected one of {valid}")
    return value


def number(owner: str, option: str, value: object, *, positive: bool = False) -> float:
    """A real number, > 0 when `positive`, else >= 0 (bools are refused: `True` is not a temperature)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and value == value  # value == value: not NaN
    if ok:
        ok = value > 0 if positive else value >= 0
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"{owner}: {option}={value!r} is not valid; expected a real number {bound}")
    return float(value)


def positive_int(owner: str, option: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{owner}: {option}={value!r} is not valid; expected an integer >= 1")
    return value


def boolean(owner: str, option: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}: {option}={value!r} is not valid; expected true or false")
    return value


def integer(owner: str, option: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{owner}: {option}={value!r} is not valid; expected an integer")
    return value


def same_shape(owner: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise PreflightError(
            f"{owner}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape"
        )


def same_grid(owner: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Same batch size and spatial size; channel counts may differ."""
    if a.dim() != 4 or b.dim() != 4 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise PreflightError(
            f"{owner}: {name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must be (N, C, h, w) "
            "with the same N, h and w"
        )


def label_map(owner: str, labels: torch.Tensor, name: str, like: torch.Tensor) -> None:
    """Labels must be (N, H, W) int64 with the N of the map `name` (`like`) they label; any H×W (the loss resizes
    them). One `PreflightError` naming both shapes, instead of a broadcasting error deep inside the loss."""
    if labels.dim() != 3 or labels.dtype != torch.int64 or labels.shape[0] != like.shape[0]:
        raise PreflightError(
            f"{owner}: labels {tuple(labels.shape)} {labels.dtype} must be (N, H, W) int64 with the N of "
            f"{name} {tuple(like.shape)}"
        )


def aux_pair(owner: str, aux_weight: float, student: torch.Tensor | None, teacher: torch.Tensor | None) -> None:
    """With `aux_weight` > 0 a loss needs both models' auxiliary logits; one `PreflightError` naming the missing
    ones otherwise (the objective's pre-flight says which model lacks the head before this is reached)."""
    missing = [name for name, x in (("student_aux_logits", student), ("teacher_aux_logits", teacher)) if x is None]
    if missing:
        raise PreflightError(f"{owner}: aux_weight={aux_weight:g} needs student_aux_logits and teacher_aux_logits "
                             f"(the models' auxiliary heads), got None for {' and '.join(missing)}")


def empty_batch(*tensors: torch.Tensor | None) -> torch.Tensor:
    """The loss of an empty batch (N = 0): exactly 0.0, in float32 at least, and connected to `tensors` (the
    student's inputs, the adapter's weight) so that backward runs and gives them zero gradients.

    Every loss returns this when N = 0 (the contract in `kdray.losses.registry`), where its mean would be 0/0.
    """
    present = [t for t in tensors if t is not None]
    dtype = torch.promote_types(present[0].dtype, torch.float32)
    return sum(t.sum().to(dtype) for t in present) * 0.0


def adapter_channels(owner: str, adapter: torch.nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """The channels of `student_features` and `teacher_features` must be those the loss's adapter was built for
    (`adapter.student_channels` -> `adapter.teacher_channels`); one `PreflightError` naming both shapes."""
    expected = (adapter.student_channels, adapter.teacher_channels)
    if (student.shape[1], teacher.shape[1]) != expected:
        raise PreflightError(
            f"{owner}: student_features {tuple(student.shape)} and teacher_features {tuple(teacher.shape)} "
            f"must have {expected[0]} and {expected[1]} channels"
        )
