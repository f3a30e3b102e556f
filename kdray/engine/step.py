"""One training iteration: forward of student and teacher, the objective, the student's step, the discriminator's.

    with autocast:  student forward            teacher forward (no grad)
    total, parts = objective(...)              # the first call runs the pre-flight check
    scaler.scale(total).backward(); step       # adapters step with the student
    discriminator step on detached logits      # adversarial loss only
    (with run.cuda_graphs: the objective and the hinge discriminator loss, forward and backward, by replay of
    CUDA graphs)

Shared by the training loop and `benchmarks/step.py`, so that what the benchmark times is what a run does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdray.config import Job, LossesConfig
from kdray.engine.distributed import RankContext, average_gradients
from kdray.engine.graphs import GraphedDiscriminatorLoss, GraphedObjective
from kdray.losses.objective import DistillationObjective, StepTensors


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
    d_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler
    job: Job
    ctx: RankContext
    checked: bool = False
    losses: Callable[[StepTensors], tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    discriminator_loss: Callable[..., torch.Tensor] | None = None
    # the parameter lists the step all-reduces on several ranks, collected once from the objective
    adapters: list[nn.Parameter] = field(init=False)
    d_params: list[nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.adapters = self.objective.student_side_parameters()
        self.d_params = self.objective.discriminator_parameters()
        graphs = self.job.run.cuda_graphs and self.ctx.device.type == "cuda"
        if self.losses is None:
            self.losses = GraphedObjective(self.objective) if graphs else self.objective
        adversarial = self.objective.adversarial
        if self.discriminator_loss is None and adversarial is not None:
            self.discriminator_loss = GraphedDiscriminatorLoss(adversarial) if graphs \
                else adversarial.discriminator_loss

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
        objective = DistillationObjective(
            losses, num_classes=job.data.num_classes, student_channels=model.feature_channels,
            teacher_channels=teacher.feature_channels if teacher is not None else None,
            ignore_index=job.data.ignore_index,
        ).to(device)
        trained: nn.Module = model
        if ctx.distributed:
            if device.type == "cuda":  # the papers' 2 images per GPU need batch statistics over all GPUs
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        o = job.optim
        params = [p for p in [*model.parameters(), *objective.student_side_parameters()] if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        d_optimizer = None
        if objective.discriminator_parameters():
            adv = job.losses.adversarial
            d_optimizer = torch.optim.Adam(objective.discriminator_parameters(), lr=adv.d_lr, betas=adv.d_betas)
        scaler = torch.amp.GradScaler(device.type, enabled=job.run.amp == "fp16")
        return cls(model, trained, teacher, objective, optimizer, d_optimizer, scaler, job, ctx)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One iteration on a batch already on the device; returns the total loss and its named terms (the
        discriminator's loss among them when it steps), to be read before the next call."""
        if self.job.run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.job, self.ctx.device):
            student_out = self.trained(images)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.teacher(images)
            else:
                teacher_out = None
        objective = self.objective
        tensors = objective.step_tensors(student_out, teacher_out, labels, images)
        if not self.checked:
            objective.preflight(tensors)
            self.checked = True
        total, parts = self.losses(tensors)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        average_gradients(self.adapters, self.ctx)
        self.scaler.step(self.optimizer)
        self.scaler.update()

        if self.d_optimizer is not None:
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss = self.discriminator_loss(tensors.teacher_logits, tensors.student_logits.detach(), images)
            d_loss.backward()
            average_gradients(self.d_params, self.ctx)
            self.d_optimizer.step()
            parts = {**parts, "discriminator": d_loss.detach()}
        return total, parts
