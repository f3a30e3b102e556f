"""The tensors a training step offers the losses, by name, and the `StepTensors` that carry them.

A loss declares what it reads as `{forward argument: StepInput}` (`kdray.losses.registry`); the objective looks
each input up in the step's `StepTensors` and calls the loss with those keyword arguments.

    name                              shape            what
    student.logits / teacher.logits   (N, K, h, w)     class scores at output stride 8 (h = ceil(H/8))
    student.aux_logits                (N, K, h, w)     the student's auxiliary FCN head (training mode; or absent)
    teacher.aux_logits                (N, K, h, w)     the teacher's auxiliary FCN head: computed (in eval mode)
                                                       only when some enabled loss reads it; absent when the
                                                       teacher has no auxiliary head
    student.features[TAP]             (N, C, h', w')   the output of layer TAP (`kdray.models.tap_names`);
    teacher.features[TAP]                              TAP `head` is the map the classifier reads
    labels                            (N, H, W) int64  the batch's labels, ignore value `data.ignore_index`
    labels.at_logits                  (N, h, w) int64  the labels resized to the logits by nearest neighbour
    images                            (N, 3, H, W)     the normalised input images

Teacher tensors carry no gradient. Every floating tensor is float32 (the losses run in full precision, also
under autocast).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from kdray.errors import ConfigError

HEAD = "head"  # the tap of the map the classifier reads (`SegmenterOutput.features`)
_PLAIN_KEYS = ("student.logits", "teacher.logits", "student.aux_logits", "teacher.aux_logits", "labels",
               "labels.at_logits", "images")
_FEATURES = re.compile(r"(student|teacher)\.features\[[^\s\[\]]+\]")


def _is_step_key(key: object) -> bool:
    return isinstance(key, str) and (key in _PLAIN_KEYS or _FEATURES.fullmatch(key) is not None)


@dataclass(frozen=True)
class StepInput:
    """One tensor of the step: `key` is its name in the table above (`student.features[backbone.layer3]`).

    `required=False` (see `optional`): the loss accepts None for it (the auxiliary logits, absent from models
    without an auxiliary head); a required input the step lacks stops the run at the pre-flight check.
    """

    key: str
    required: bool = True

    def __post_init__(self) -> None:
        if not _is_step_key(self.key):
            close = difflib.get_close_matches(str(self.key), [*_PLAIN_KEYS, "student.features[head]",
                                                              "teacher.features[head]"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"step input {self.key!r}: not a tensor of the step{hint}; valid: "
                              f"{', '.join(_PLAIN_KEYS)}, student.features[TAP], teacher.features[TAP] "
                              "(TAP: a layer, see kdray.models.tap_names)")

    @property
    def side(self) -> str | None:
        """`student`, `teacher`, or None for the data (labels, images)."""
        head = self.key.split(".", 1)[0]
        return head if head in ("student", "teacher") else None

    @property
    def tap(self) -> str | None:
        """The layer name of a features input, else None."""
        return self.key[self.key.index("[") + 1:-1] if "[" in self.key else None

    @property
    def kind(self) -> str:
        """`logits`, `aux_logits`, `features`, `labels`, `labels.at_logits` or `images`."""
        return self.key.split("[", 1)[0].removeprefix("student.").removeprefix("teacher.")

    def __str__(self) -> str:
        return self.key


def optional(value: StepInput) -> StepInput:
    """`value`, which the loss accepts as None when the step lacks it."""
    return StepInput(value.key, required=False)


def student_features(tap: str = HEAD) -> StepInput:
    """The student's features at layer `tap` (`head`: the map before the classifier)."""
    return StepInput(f"student.features[{tap}]")


def teacher_features(tap: str = HEAD) -> StepInput:
    """The teacher's features at layer `tap` (`head`: the map before the classifier)."""
    return StepInput(f"teacher.features[{tap}]")


STUDENT_LOGITS = StepInput("student.logits")
TEACHER_LOGITS = StepInput("teacher.logits")
STUDENT_AUX_LOGITS = StepInput("student.aux_logits")
TEACHER_AUX_LOGITS = StepInput("teacher.aux_logits")
STUDENT_FEATURES = student_features()
TEACHER_FEATURES = teacher_features()
LABELS = StepInput("labels")
LABELS_AT_LOGITS = StepInput("labels.at_logits")
IMAGES = StepInput("images")


class StepTensors(Mapping[str, torch.Tensor]):
    """The tensors of one step by input key; an input the step does not have (no teacher, no auxiliary head in
    evaluation mode) is absent, and `get` gives None for it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor | None]):
        self._tensors = {key: value for key, value in tensors.items() if value is not None}

    def __getitem__(self, key: str | StepInput) -> torch.Tensor:
        return self._tensors[str(key)]

    def get(self, key: str | StepInput, default: torch.Tensor | None = None) -> torch.Tensor | None:  # type: ignore[override]
        return self._tensors.get(str(key), default)

    def __contains__(self, key: object) -> bool:
        return str(key) in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def replace(self, changes: Mapping[str | StepInput, torch.Tensor | None]) -> StepTensors:
        """A copy with the tensors of `changes` set (None: removed)."""
        return StepTensors({**self._tensors, **{str(k): v for k, v in changes.items()}})

    def describe(self) -> str:
        """`student.logits (2, 8, 4, 4), ...`: the shapes, for error messages."""
        return ", ".join(f"{key} {tuple(t.shape)}" for key, t in self._tensors.items())
