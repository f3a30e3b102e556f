"""The training objective: a weighted sum of the enabled losses, with a named breakdown for logging.

    L = w_ce * CE + w_kd * KD + w_i2ckd * I2CKD + ...   (the job's `losses` section says which and how much)

Every loss comes from the registry (`kdray.losses.registry`): its spec says how to build it and which of the
step's tensors (`kdray.losses.inputs`) it reads, so the objective wires any registered loss, built-in or
plugin, the same way, and the modules stay testable on their own.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kdray.config.schema import LossesConfig
from kdray.errors import PreflightError
from kdray.losses import _checks
from kdray.losses.inputs import (
    HEAD,
    IMAGES,
    LABELS,
    LABELS_AT_LOGITS,
    STUDENT_LOGITS,
    TEACHER_LOGITS,
    StepInput,
    StepTensors,
)
from kdray.losses.labels import check_labels, downsample_labels
from kdray.losses.registry import LOSSES, LossContext, OwnedStep


def loss_formula(weights: dict[str, float]) -> str:
    """`Loss = 1 * CE + 1 * KD + 1 * I2CKD` for the enabled losses' weights, as logged with every run."""
    return "Loss = " + " + ".join(f"{w:g} * {LOSSES[n].label}" for n, w in weights.items())


def config_formula(losses: LossesConfig) -> str:
    """`loss_formula` of a job's losses section, without building the modules."""
    return loss_formula({name: cfg.term_weight() for name, cfg in losses.enabled().items()})


def method_label(losses: LossesConfig) -> str:
    """`CE`, `KD+I2CKD`, ...: the enabled distillation terms (those reading the teacher), as the papers' tables
    name a row; `CE` when there are none."""
    names = [LOSSES[n].label for n, cfg in losses.enabled().items() if LOSSES[n].needs_teacher(cfg)]
    return "+".join(names) if names else "CE"


def required_taps(losses: LossesConfig | Mapping[str, Any], side: str) -> set[str]:
    """The layers of `side` (student/teacher) whose features some enabled loss reads, `head` aside (every
    forward gives it): what the engine captures, nothing when no loss asks. `losses`: a job's section, or the
    enabled losses' configs by name."""
    enabled = losses.enabled() if isinstance(losses, LossesConfig) else losses
    taps = set()
    for name, cfg in enabled.items():
        taps |= LOSSES[name].taps(cfg, side)
    return taps - {HEAD}


def reads_input(losses: LossesConfig | Mapping[str, Any], key: str | StepInput, *, required: bool = False) -> bool:
    """Whether some enabled loss (or its owned step) reads the step input `key` (`teacher.aux_logits`, ...);
    with `required`, only as a required input: what a model must be built to give. `losses`: a job's section,
    or the enabled losses' configs by name."""
    enabled = losses.enabled() if isinstance(losses, LossesConfig) else losses
    return any(i.key == str(key) and (i.required or not required) for name, cfg in enabled.items()
               for i in LOSSES[name].all_inputs(cfg))


class DistillationObjective(nn.Module):
    """Builds the enabled losses from the config and sums them with their weights.

    Trainable parts (feature adapters) are ordinary parameters of this module and go to the student's
    optimizer; parameters a loss trains with its own optimizer (`OwnedStep`: the holistic loss's discriminator)
    are listed by `owned_steps` and kept out of `student_side_parameters`.

    student_channels / teacher_channels: C of the `head` tap; `tap_channels` gives those of other taps
    (`{"student": {tap: C}, "teacher": {tap: C}}`); seed: the run's (`run.seed`), for losses that draw.
    """

    def __init__(self, losses: LossesConfig, *, num_classes: int, student_channels: int,
                 teacher_channels: int | None, ignore_index: int = 255,
                 tap_channels: Mapping[str, Mapping[str, int]] | None = None, seed: int = 0):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        taps = tap_channels or {}
        student = {HEAD: student_channels, **taps.get("student", {})}
        teacher = {**({HEAD: teacher_channels} if teacher_channels is not None else {}), **taps.get("teacher", {})}
        context = LossContext(num_classes, ignore_index, student, teacher, seed)
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        self.configs: dict[str, Any] = {}
        self.inputs: dict[str, dict[str, StepInput]] = {}
        for name, cfg in losses.enabled().items():
            spec = LOSSES[name]
            self.terms[name] = spec.make(cfg, context)
            self.weights[name] = cfg.term_weight()
            self.configs[name] = cfg
            self.inputs[name] = spec.inputs(cfg)

    def reads(self, key: str | StepInput) -> bool:
        """Whether some enabled loss (or its owned step) reads the step input `key`, required or optional: the
        engine computes the teacher's auxiliary logits only when this holds for `teacher.aux_logits`."""
        return reads_input(self.configs, key)

    def graphable(self) -> bool:
        """Whether every enabled loss may be replayed as a CUDA graph (`LossSpec.graphable`)."""
        return all(LOSSES[name].is_graphable(cfg) for name, cfg in self.configs.items())

    def owned_steps(self) -> list[tuple[str, OwnedStep, nn.Module, Any]]:
        """`(loss name, its OwnedStep, the loss module, its config)` of each loss training parameters of its own."""
        return [(name, LOSSES[name].owned, self.terms[name], cfg) for name, cfg in self.configs.items()
                if LOSSES[name].owned is not None]

    def owned_label(self, name: str) -> str:
        """The name of loss `name`'s own loss in the logged breakdown (`discriminator`)."""
        return LOSSES[name].owned.label

    def owned_parameters(self, name: str) -> list[nn.Parameter]:
        owned = LOSSES[name].owned
        return list(owned.parameters(self.terms[name])) if owned is not None else []

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the student (adapters): everything but the losses' owned parameters."""
        skip = {id(p) for name, *_ in self.owned_steps() for p in self.owned_parameters(name)}
        return [p for p in self.parameters() if id(p) not in skip]

    def term(self, name: str, t: StepTensors) -> torch.Tensor:
        """Loss `name` on the step's tensors, unweighted."""
        return self.terms[name](**{arg: t.get(i) for arg, i in self.inputs[name].items()})

    def owned_loss(self, name: str, t: StepTensors) -> torch.Tensor:
        """The scalar loss `name`'s own optimizer minimises, on detached step tensors."""
        owned = LOSSES[name].owned
        reads = owned.inputs(self.configs[name])
        tensors = {arg: (None if (x := t.get(i)) is None else x.detach()) for arg, i in reads.items()}
        return getattr(self.terms[name], owned.loss)(**tensors)

    def forward(self, t: StepTensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (scalar) and each term before weighting, by config name."""
        parts = {name: self.term(name, t) for name in self.terms}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts  # type: ignore[return-value]

    def step_tensors(self, student: Any, teacher: Any | None, labels: torch.Tensor, images: torch.Tensor,
                     student_taps: Mapping[str, torch.Tensor] | None = None,
                     teacher_taps: Mapping[str, torch.Tensor] | None = None) -> StepTensors:
        """Pack model outputs and captured taps by input key (float32: losses are computed in full precision
        even under autocast).

        The labels are checked here, once per step and for every loss: PreflightError unless they are (N, H, W)
        int64 with the logits' N, and `DataError` naming a value outside
        0..K-1 that is not the ignore value (`check_labels`: one min/max, one device sync; here, outside the
        CUDA graph that may replay the losses).
        """
        _checks.label_map("the objective", labels, "the student's logits", student.logits)
        check_labels(labels, self.num_classes, self.ignore_index)

        def f32(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.float()

        tensors: dict[str, torch.Tensor | None] = {
            "student.logits": f32(student.logits), f"student.features[{HEAD}]": f32(student.features),
            "student.aux_logits": f32(student.aux_logits),
        }
        if teacher is not None:
            tensors.update({"teacher.logits": f32(teacher.logits), f"teacher.features[{HEAD}]": f32(teacher.features),
                            "teacher.aux_logits": f32(teacher.aux_logits)})
        for side, taps in (("student", student_taps), ("teacher", teacher_taps)):
            for tap, value in (taps or {}).items():
                tensors.setdefault(f"{side}.features[{tap}]", f32(value))
        tensors[str(LABELS)] = labels
        tensors[str(LABELS_AT_LOGITS)] = downsample_labels(labels, student.logits.shape[-2:])
        tensors[str(IMAGES)] = images
        return StepTensors(tensors)

    def preflight(self, t: StepTensors) -> None:
        """Check that every enabled loss can run on these shapes; PreflightError naming the loss otherwise.

        Leaves no trace: it runs in eval mode (the discriminator's BatchNorm statistics and spectral-norm vectors
        stay put) and puts back the state of any loss that keeps some between calls (CIRKD's queues and its
        generator), so that a resumed run, which checks again, equals an uninterrupted one.
        """
        was_training = self.training
        saved = copy.deepcopy(self.state_dict())
        self.eval()
        try:
            for name in self.terms:
                self._preflight(name, t)
        finally:
            self.train(was_training)
            self.load_state_dict(saved)

    def _preflight(self, name: str, t: StepTensors) -> None:
        spec, cfg = LOSSES[name], self.configs[name]
        reads = spec.all_inputs(cfg)
        for i in reads:
            if i.side is not None and i.required and i.key not in t:
                raise PreflightError(f"losses.{name}: needs the {i.side}'s {_what(i)}, but {_lacking(name, i, t, cfg)}")
        for i in reads:  # a student tensor and its teacher counterpart must agree where the loss compares them
            twin = i.key.replace("student.", "teacher.", 1)
            if i.side != "student" or twin not in {r.key for r in reads} or i not in t or twin not in t:
                continue
            s, te = t[i], t[twin]
            dims = slice(2, None) if i.tap is not None else slice(1, None)
            if s.shape[dims] != te.shape[dims]:
                sizes = "spatial" if i.tap is not None else "class/spatial"
                raise PreflightError(f"losses.{name}: student {_what(i)} {tuple(s.shape)} and teacher {_what(i)} "
                                     f"{tuple(te.shape)} differ in their {sizes} size")
        try:
            with torch.no_grad():
                value = self.term(name, t)
            if spec.owned is not None:
                self._preflight_owned(name, t)
        except (RuntimeError, ValueError, TypeError, PreflightError) as err:
            raise PreflightError(f"losses.{name}: cannot run on {t.describe()}: {err}") from None
        if value.dim() != 0:
            raise PreflightError(f"losses.{name}: returned shape {tuple(value.shape)}, expected a scalar")

    def _preflight_owned(self, name: str, t: StepTensors) -> None:
        """The loss's own optimizer's loss, which the engine runs after each student step: computed and dropped,
        with autograd on (WGAN-GP's penalty differentiates) and in a forked RNG so that its draws leave the
        run's random stream alone."""
        logits = t[STUDENT_LOGITS]
        devices = [logits.device] if logits.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            self.owned_loss(name, t)

    def formula(self) -> str:
        return loss_formula(self.weights)

    def __str__(self) -> str:
        return self.formula()


def _lacking(name: str, i: StepInput, t: StepTensors, cfg: Any) -> str:
    """Why the step lacks the required input `i` of loss `name`, and what to change, for the pre-flight's message."""
    if i.side == "teacher" and str(TEACHER_LOGITS) not in t:
        return "no teacher is loaded"
    if i.kind != "aux_logits":
        return "the step has none"
    option = f"losses.{name}.aux_weight" if hasattr(cfg, "aux_weight") else None
    under = f", which {option}={cfg.aux_weight:g} reads" if option else ""
    off = f"set {option}=0 or " if option else ""
    if i.side == "teacher":
        return (f"the teacher has no auxiliary head{under}: its checkpoint holds no `auxlayer.*` weights; {off}"
                "use a teacher checkpoint with the auxiliary FCN head (kdray's teachers have one unless trained with "
                "losses.ce.aux_weight=0)")
    return (f"the student has no auxiliary head{under}: {off}set student.aux=true (the student then gets the "
            "auxiliary FCN head)")


def _what(i: StepInput) -> str:
    """`logits`, `auxiliary logits`, `features` (of the head), `features of backbone.layer3`, ... for messages."""
    if i.kind == "aux_logits":
        return "auxiliary logits"
    return f"features of {i.tap}" if i.tap not in (None, HEAD) else i.kind
