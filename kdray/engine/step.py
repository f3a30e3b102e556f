"""One training iteration: forward of student and teacher, the objective, the student's step, the discriminator's.

    with autocast:  student forward            teacher forward (no grad)
    total, parts = objective(...)              # the first call runs the pre-flight check
    scaler.scale(total).backward(); step       # adapters step with the student
    each loss-owned optimizer's step           # the discriminator's (holistic loss) on detached logits
    (with run.cuda_graphs: the objective and the hinge discriminator loss, forward and backward, by replay of
    CUDA graphs)

The layers some enabled loss reads features of (`backbone.layer3`, ...) are captured by forward hooks on
student and teacher (`kdray.models.FeatureTaps`); none are hooked when no loss asks.

Shared by the training loop and `benchmarks/step.py`, so that what the benchmark times is what a run does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdray.config import Job, LossesConfig
from kdray.engine.distributed import RankContext, average_gradients
from kdray.engine.graphs import GraphedObjective, GraphedOwnedLoss
from kdray.losses.inputs import TEACHER_AUX_LOGITS, StepTensors
from kdray.losses.objective import DistillationObjective, required_taps
from kdray.models.taps import FeatureTaps, tap_channels


def autocast_for(job: Job, device: torch.device) -> contextlib.AbstractContextManager:
    """The mixed-precision context `run.amp` asks for (a no-op context for `none`)."""
    if job.run.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if job.run.amp == "bf16" else torch.float16)


@dataclass
class TrainStep:
    """The optimisation state of a run and its iteration; `model` is the plain student (what checkpoints hold),
    `trained` the module the forward goes through (DDP-wrapped on several ranks)."""

    model: nn.Module
    trained: nn.Module
    teacher: nn.Module | None
    objective: DistillationObjective
    optimizer: torch.optim.Optimizer
    owned_optimizers: dict[str, torch.optim.Optimizer]  # loss name -> the optimizer of its own parameters
    scaler: torch.amp.GradScaler
    job: Job
    ctx: RankContext
    checked: bool = False
    losses: Callable[[StepTensors], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    # loss name -> its owned loss as a function of the step's tensors (graph-replayed where it may be)
    owned_losses: dict[str, Callable[[StepTensors], torch.Tensor]] = field(default_factory=dict)
    # a context the teacher's forward runs in, to time it (`kdray.engine.cost.TrainingCost.teacher`); none by default
    teacher_timer: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # the parameter lists the step all-reduces on several ranks, collected once from the objective
    adapters: list[nn.Parameter] = field(init=False)
    owned_params: dict[str, list[nn.Parameter]] = field(init=False)
    student_taps: FeatureTaps | None = field(init=False)
    teacher_taps: FeatureTaps | None = field(init=False)
    # whether the teacher's forward runs its auxiliary head: only when an enabled loss reads `teacher.aux_logits`
    # (`losses.dist.aux_weight`, `losses.dkd.aux_weight`), so other runs cost nothing more; decided once
    teacher_aux: bool = field(init=False)

    def __post_init__(self) -> None:
        self.adapters = self.objective.student_side_parameters()
        self.owned_params = {name: self.objective.owned_parameters(name) for name in self.owned_optimizers}
        # a loss with host-side control flow, draws or collectives (CIRKD's memory) keeps the whole objective eager
        graphs = self.job.run.cuda_graphs and self.ctx.device.type == "cuda" and self.objective.graphable()
        if self.losses is None:
            self.losses = GraphedObjective(self.objective) if graphs else self.objective
        for name in self.owned_optimizers:
            if name not in self.owned_losses:
                self.owned_losses[name] = GraphedOwnedLoss(self.objective, name) if graphs \
                    else (lambda t, name=name: self.objective.owned_loss(name, t))
        self.teacher_aux = self.objective.reads(TEACHER_AUX_LOGITS)
        # the layers the built losses read (a teacher's own training builds CE alone, whatever the job enables)
        student_taps = required_taps(self.objective.configs, "student")
        teacher_taps = required_taps(self.objective.configs, "teacher")
        self.student_taps = FeatureTaps(self.model, sorted(student_taps)) if student_taps else None
        self.teacher_taps = FeatureTaps(self.teacher, sorted(teacher_taps)) \
            if teacher_taps and self.teacher is not None else None

    @classmethod
    def build(cls, job: Job, model: nn.Module, teacher: nn.Module | None, losses: LossesConfig,
              ctx: RankContext) -> TrainStep:
        """Move the student to the device (channels-last if asked), wrap it for data parallelism on several
        ranks, and make the objective, the student's SGD (with the losses' adapters) and the discriminator's Adam.
        The teacher is expected frozen and on the device already."""
        device = ctx.device
        model = model.to(device)
        if job.run.channels_last:
            model = model.to(memory_format=torch.channels_last)
            teacher = teacher.to(memory_format=torch.channels_last) if teacher is not None else None
        taps = {"student": {tap: tap_channels(model, tap) for tap in required_taps(losses, "student")}}
        if teacher is not None:
            taps["teacher"] = {tap: tap_channels(teacher, tap) for tap in required_taps(losses, "teacher")}
        objective = DistillationObjective(
            losses, num_classes=job.data.num_classes, student_channels=model.feature_channels,
            teacher_channels=teacher.feature_channels if teacher is not None else None,
            ignore_index=job.data.ignore_index, tap_channels=taps, seed=job.run.seed,
        ).to(device)
        trained: nn.Module = model
        if ctx.distributed:
            if device.type == "cuda":  # the papers' 2 images per GPU need batch statistics over all GPUs
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        o = job.optim
        params = [p for p in [*model.parameters(), *objective.student_side_parameters()] if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        owned = {name: step.optimizer(objective.owned_parameters(name), cfg)
                 for name, step, _, cfg in objective.owned_steps()}
        scaler = torch.amp.GradScaler(device.type, enabled=job.run.amp == "fp16")
        return cls(model, trained, teacher, objective, optimizer, owned, scaler, job, ctx)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def teacher_forward(self, images: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor] | None]:
        """The frozen teacher's output on a batch and the features this step's losses tap from it
        (`shared_teacher_forward` of this step alone); (None, None) without a teacher."""
        return shared_teacher_forward([self], images)[0]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 teacher: tuple[Any, dict[str, torch.Tensor] | None] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One iteration on a batch already on the device; returns the total loss and its named terms (the
        discriminator's loss among them when it steps), to be read before the next call. `teacher`: the
        `teacher_forward` of this batch when it was run already; by default the step runs it after the student's."""
        if self.job.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.job, self.ctx.device):
            student_out = self.trained(images)
            student_taps = self.student_taps.collect(student_out) if self.student_taps is not None else None
        teacher_out, teacher_taps = teacher if teacher is not None else self.teacher_forward(images)
        objective = self.objective
        tensors = objective.step_tensors(student_out, teacher_out, labels, images, student_taps, teacher_taps)
        if not self.checked:
            objective.preflight(tensors)
            self.checked = True
        total, parts = self.losses(tensors)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        average_gradients(self.adapters, self.ctx)
        self.scaler.step(self.optimizer)
        self.scaler.update()

        for name, optimizer in self.owned_optimizers.items():
            optimizer.zero_grad(set_to_none=True)
            owned_loss = self.owned_losses[name](tensors)
            owned_loss.backward()
            average_gradients(self.owned_params[name], self.ctx)
            optimizer.step()
            parts = {**parts, self.objective.owned_label(name): owned_loss.detach()}
        return total, parts


TeacherView = tuple[Any, "dict[str, torch.Tensor] | None"]  # a teacher's output and one step's taps of it


def shared_teacher_forward(steps: list[TrainStep], images: torch.Tensor) -> list[TeacherView]:
    """One forward of the teacher the `steps` share, on a batch they share, and each step's view of it: the output
    (with the aux head's logits when any step's losses read them) and the features that step's losses tap (each
    step's hooks on the teacher fire in the one forward; each collects its own). A step without a teacher (a CE
    student among distilled ones) gets (None, None), and so does every step when none has one.

    No grad, the run's precision (`run.amp` of the first step: steps that share a teacher share a run), timed by
    the first distilling step's `teacher_timer`. The teacher is in eval mode and draws no random numbers, so running
    it once, before the students' forwards, changes nothing of what each step computes: the shared forward is how a
    trial pack trains several students against one teacher forward. ValueError when the steps hold different
    teachers.
    """
    distilling = [step for step in steps if step.teacher is not None]
    if not distilling:
        return [(None, None) for _ in steps]
    first = distilling[0]
    if any(step.teacher is not first.teacher for step in distilling):
        raise ValueError("shared_teacher_forward: the steps hold different teachers")
    if first.job.run.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    aux = any(step.teacher_aux for step in distilling)
    with autocast_for(first.job, first.ctx.device), first.teacher_timer(), torch.no_grad():
        output = first.teacher(images, aux=True) if aux else first.teacher(images)
    return [(None, None) if step.teacher is None
            else (output, step.teacher_taps.collect(output) if step.teacher_taps is not None else None)
            for step in steps]
