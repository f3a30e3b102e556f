"""The training objective: a weighted sum of the enabled losses, with a named breakdown for logging.

    L = w_ce * CE + w_kd * KD + w_i2ckd * I2CKD + ...   (the job's `losses` section says which and how much)

Each loss module takes explicit tensors; the table `_INPUTS` below says which of the step's tensors each one
reads, so the modules stay testable on their own and the objective is the one place that wires them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from kdray.config.schema import LossesConfig
from kdray.errors import PreflightError
from kdray.losses.ace import AdaptiveCrossEntropy
from kdray.losses.cross_entropy import SegmentationCrossEntropy
from kdray.losses.csc import ChannelSpatialCorrelation
from kdray.losses.cwd import ChannelWiseDistillation
from kdray.losses.holistic import AdversarialDistillation
from kdray.losses.i2ckd import I2CKD
from kdray.losses.ifvd import IntraClassFeatureVariation
from kdray.losses.kd import PixelwiseKD
from kdray.losses.labels import check_labels, downsample_labels
from kdray.losses.pairwise import PairwiseAffinity


class StepTensors(NamedTuple):
    """What one training step offers the losses. Teacher tensors carry no gradient."""

    student_logits: torch.Tensor  # (N, K, h, w)
    student_features: torch.Tensor  # (N, C_S, h, w)
    student_aux_logits: torch.Tensor | None  # (N, K, h', w') or None
    teacher_logits: torch.Tensor | None  # (N, K, h, w)
    teacher_features: torch.Tensor | None  # (N, C_T, h, w)
    labels: torch.Tensor  # (N, H, W) int64, ignore 255
    labels_small: torch.Tensor  # (N, h, w): labels resized to the logits by nearest neighbour (score-map losses;
    # the feature losses resize `labels` to their maps themselves: one nearest resize, never two in a row)
    images: torch.Tensor  # (N, 3, H, W), normalised


# name -> (module class, display name, which tensors it reads, how it is called)
_Call = Callable[[nn.Module, StepTensors], torch.Tensor]
_LOSSES: dict[str, tuple[type[nn.Module], str, str, _Call]] = {
    "ce": (SegmentationCrossEntropy, "CE", "",
           lambda m, t: m(t.student_logits, t.labels, t.student_aux_logits)),
    "kd": (PixelwiseKD, "KD", "logits",
           lambda m, t: m(t.student_logits, t.teacher_logits, t.labels_small)),
    "cwd": (ChannelWiseDistillation, "CWD", "logits+features",
            lambda m, t: m(t.student_logits, t.teacher_logits, t.student_features, t.teacher_features)),
    "ace": (AdaptiveCrossEntropy, "ACE", "logits",
            lambda m, t: m(t.student_logits, t.teacher_logits, t.labels_small)),
    "pairwise": (PairwiseAffinity, "PA", "features",
                 lambda m, t: m(t.student_features, t.teacher_features)),
    "adversarial": (AdversarialDistillation, "HO", "logits",
                    lambda m, t: m(t.student_logits, t.images)),
    "ifvd": (IntraClassFeatureVariation, "IFVD", "features",
             lambda m, t: m(t.student_features, t.teacher_features, t.labels)),
    "csc": (ChannelSpatialCorrelation, "CSC", "features",
            lambda m, t: m(t.student_features, t.teacher_features)),
    "i2ckd": (I2CKD, "I2CKD", "features",
              lambda m, t: m(t.student_features, t.teacher_features, t.labels)),
}
# Config keys that configure the engine around a loss rather than the loss module itself.
_NOT_MODULE_ARGS = {"enabled", "weight", "d_lr", "d_betas"}


def loss_formula(weights: dict[str, float]) -> str:
    """`Loss = 1 * CE + 1 * KD + 1 * I2CKD` for the enabled losses' weights, as logged with every run."""
    return "Loss = " + " + ".join(f"{w:g} * {_LOSSES[n][1]}" for n, w in weights.items())


def config_formula(losses: LossesConfig) -> str:
    """`loss_formula` of a job's losses section, without building the modules."""
    return loss_formula({name: cfg.term_weight() for name, cfg in losses.enabled().items()})


def method_label(losses: LossesConfig) -> str:
    """`CE`, `KD+I2CKD`, ...: the enabled distillation terms, as the papers' tables name a row."""
    names = [_LOSSES[n][1] for n in losses.enabled() if n != "ce"]
    return "+".join(names) if names else "CE"


class DistillationObjective(nn.Module):
    """Builds the enabled losses from the config and sums them with their weights.

    Trainable parts (feature adapters) are ordinary parameters of this module and go to the student's
    optimizer; the adversarial loss's discriminator is trained separately (see `discriminator_parameters`).
    """

    def __init__(self, losses: LossesConfig, *, num_classes: int, student_channels: int,
                 teacher_channels: int | None, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        context = {"num_classes": num_classes, "student_channels": student_channels,
                   "teacher_channels": teacher_channels, "ignore_index": ignore_index}
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for name, cfg in losses.enabled().items():
            cls = _LOSSES[name][0]
            options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_MODULE_ARGS}
            accepted = inspect.signature(cls).parameters
            options.update({k: v for k, v in context.items() if k in accepted})
            self.terms[name] = cls(**options)
            self.weights[name] = cfg.term_weight()

    @property
    def needs_teacher(self) -> bool:
        return any(_LOSSES[n][2] for n in self.terms)

    @property
    def adversarial(self) -> AdversarialDistillation | None:
        return self.terms["adversarial"] if "adversarial" in self.terms else None  # type: ignore[return-value]  # noqa: SIM401

    def discriminator_parameters(self) -> list[nn.Parameter]:
        adv = self.adversarial
        return list(adv.discriminator.parameters()) if adv is not None else []

    def student_side_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the student (adapters): everything but the discriminator."""
        skip = {id(p) for p in self.discriminator_parameters()}
        return [p for p in self.parameters() if id(p) not in skip]

    def forward(self, t: StepTensors) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss (scalar) and each term before weighting, by config name."""
        parts = {name: _LOSSES[name][3](module, t) for name, module in self.terms.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts  # type: ignore[return-value]

    def step_tensors(self, student: Any, teacher: Any | None, labels: torch.Tensor, images: torch.Tensor
                     ) -> StepTensors:
        """Pack model outputs (float32: losses are computed in full precision even under autocast).

        The labels are checked here, once per step and for every loss: `DataError` naming a value outside
        0..K-1 that is not the ignore value (`check_labels`: one min/max, one device sync; here, outside the
        CUDA graph that may replay the losses).
        """
        check_labels(labels, self.num_classes, self.ignore_index)

        def f32(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.float()

        return StepTensors(
            f32(student.logits), f32(student.features), f32(student.aux_logits),
            f32(teacher.logits) if teacher is not None else None,
            f32(teacher.features) if teacher is not None else None,
            labels, downsample_labels(labels, student.logits.shape[-2:]), images,
        )

    def preflight(self, t: StepTensors) -> None:
        """Check that every enabled loss can run on these shapes; PreflightError naming the loss otherwise.

        Runs in eval mode so that it leaves no trace (the discriminator's BatchNorm statistics and spectral-norm
        vectors would otherwise move, and a resumed run would drift from an uninterrupted one).
        """
        was_training = self.training
        self.eval()
        try:
            self._preflight(t)
        finally:
            self.train(was_training)

    def _preflight(self, t: StepTensors) -> None:
        for name, module in self.terms.items():
            reads = _LOSSES[name][2]
            pairs = []
            if "logits" in reads:
                pairs.append(("logits", t.student_logits, t.teacher_logits, slice(1, None)))
            if "features" in reads and (name != "cwd" or module.on != "logits"):
                pairs.append(("features", t.student_features, t.teacher_features, slice(2, None)))
            for what, s, te, dims in pairs:
                if te is None:
                    raise PreflightError(f"losses.{name}: needs the teacher's {what}, but no teacher is loaded")
                if s.shape[dims] != te.shape[dims]:
                    sizes = "class/spatial" if what == "logits" else "spatial"
                    raise PreflightError(f"losses.{name}: student {what} {tuple(s.shape)} and teacher {what} "
                                         f"{tuple(te.shape)} differ in their {sizes} size")
            try:
                with torch.no_grad():
                    value = _LOSSES[name][3](module, t)
                if isinstance(module, AdversarialDistillation):
                    _preflight_discriminator(module, t)
            except (RuntimeError, ValueError, PreflightError) as err:
                shapes = (f"student logits {_shape(t.student_logits)}, features {_shape(t.student_features)}; "
                          f"teacher logits {_shape(t.teacher_logits)}, features {_shape(t.teacher_features)}")
                raise PreflightError(f"losses.{name}: cannot run on {shapes}: {err}") from None
            if value.dim() != 0:
                raise PreflightError(f"losses.{name}: returned shape {tuple(value.shape)}, expected a scalar")

    def formula(self) -> str:
        return loss_formula(self.weights)

    def __str__(self) -> str:
        return self.formula()


def _preflight_discriminator(module: AdversarialDistillation, t: StepTensors) -> None:
    """The discriminator's own loss, which the engine runs after each student step (WGAN-GP's penalty needs
    autograd): computed and dropped, in a forked RNG so that its α draw leaves the run's random stream alone."""
    devices = [t.student_logits.device] if t.student_logits.is_cuda else []
    grad_mode = torch.enable_grad() if module.objective == "wgan_gp" else torch.no_grad()
    with torch.random.fork_rng(devices=devices), grad_mode:
        module.discriminator_loss(t.teacher_logits, t.student_logits.detach(), t.images)


def _shape(x: torch.Tensor | None) -> str:
    return "none" if x is None else str(tuple(x.shape))
