"""The losses' forward and backward, and the discriminator's loss, as CUDA graphs (`run.cuda_graphs`).

On a GPU the distillation losses are bound by launching work, not by doing it: at the papers' shape on an H100,
I2CKD dispatches ~300 operators for 0.2 ms of kernels and takes 4 ms. Captured once with
`torch.cuda.make_graphed_callables`, a step replays one graph for the losses' forward and one for their
backward, whatever the number of losses (I2CKD alone: 0.25 ms); the hinge discriminator's loss likewise (its
step: 13–15 ms eager, 2.1 ms replayed). The student, the teacher, the optimisers' steps and the WGAN-GP
discriminator (random mixing, double backward) stay eager. Checked (tests/test_gpu.py) on one GPU in float32
and under AMP, and on two data-parallel ranks sharing one GPU (gloo: DDP, SyncBatchNorm and the all-reduces of
the adapters and the discriminator around the graphs), which train what eager ranks train; not yet with nccl
over several GPUs (the lent machines have one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdray.losses.holistic import AdversarialDistillation
from kdray.losses.objective import DistillationObjective, StepTensors


class _Graph:
    """`module(*tensors)` replayed from CUDA graphs, captured at the first call.

    Later calls with other shapes, dtypes or gradient needs run `module` eagerly. The capture runs `module` a
    few times (warm-up, then the capture itself); every buffer of `state` it updates (spectral-norm vectors,
    BatchNorm statistics) is put back afterwards, so a graphed run holds the state of an eager one. Outputs are
    views of the graph's buffers, rewritten by the next call.
    """

    def __init__(self, module: nn.Module, state: nn.Module):
        self.module, self.state = module, state
        self._replay: Callable | None = None
        self._signature = None

    def __call__(self, *tensors: Tensor):
        signature = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in tensors)
        if self._replay is None:
            saved = [buffer.detach().clone() for buffer in self.state.buffers()]
            # The sample tensors become the graph's input buffers, which every call copies its tensors into:
            # fresh leaves, not this step's tensors (those would keep the step's autograd graph alive).
            static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in tensors)
            self._replay = torch.cuda.make_graphed_callables(self.module, static, allow_unused_input=True)
            with torch.no_grad():
                for buffer, value in zip(self.state.buffers(), saved, strict=True):
                    buffer.copy_(value)
            self._signature = signature
        elif signature != self._signature:
            return self.module(*tensors)
        return self._replay(*tensors)


class _ObjectiveCall(nn.Module):
    """The objective as a function of the step's tensors (those present), returning (total, *terms).

    Only the parameters trained with the student (the adapters) are this module's, so only they are inputs of
    the graph: the discriminator, frozen in the student's adversarial term, is read as it stands. Were its
    parameters inputs too, the step's autograd graph would hold accumulators for them on the default stream,
    and capturing the discriminator's own loss would then fail.
    """

    def __init__(self, objective: DistillationObjective, fields: tuple[str, ...]):
        super().__init__()
        self.student_side = nn.ParameterList(objective.student_side_parameters())
        self.__dict__["objective"] = objective  # not a submodule: its discriminator stays out of the inputs
        self.fields = fields

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        present = dict(zip(self.fields, tensors, strict=True))
        step = StepTensors(**{name: present.get(name) for name in StepTensors._fields})
        total, parts = self.objective(step)
        return (total, *parts.values())


class GraphedObjective:
    """Callable like the objective, `(StepTensors) -> (total, {term: value})`, by graph replay.

    Which of the step's tensors are present is fixed at the first call (a training run's are); the losses run
    outside autocast, as they do in the engine.
    """

    def __init__(self, objective: DistillationObjective):
        self.objective = objective
        self.terms = tuple(objective.terms)
        self._graphs: dict[tuple[str, ...], _Graph] = {}

    def __call__(self, tensors: StepTensors) -> tuple[Tensor, dict[str, Tensor]]:
        fields = tuple(name for name in StepTensors._fields if getattr(tensors, name) is not None)
        if fields not in self._graphs:
            self._graphs[fields] = _Graph(_ObjectiveCall(self.objective, fields), self.objective)
        total, *parts = self._graphs[fields](*(getattr(tensors, name) for name in fields))
        return total, dict(zip(self.terms, parts, strict=True))


class _DiscriminatorLoss(nn.Module):
    def __init__(self, adversarial: AdversarialDistillation):
        super().__init__()
        self.adversarial = adversarial

    def forward(self, teacher_logits: Tensor, student_logits: Tensor, *images: Tensor) -> Tensor:
        return self.adversarial.discriminator_loss(teacher_logits, student_logits, *images)


class GraphedDiscriminatorLoss:
    """`adversarial.discriminator_loss(teacher_logits, student_logits, images)` by graph replay for the hinge
    objective; WGAN-GP (random mixing weights, a gradient penalty through a double backward) runs eagerly."""

    def __init__(self, adversarial: AdversarialDistillation):
        self.adversarial = adversarial
        self._graph = _Graph(_DiscriminatorLoss(adversarial), adversarial)
        self._uses_images = adversarial.conditioning == "logits+image"

    def __call__(self, teacher_logits: Tensor, student_logits: Tensor, images: Tensor | None = None) -> Tensor:
        if self.adversarial.objective != "hinge":
            return self.adversarial.discriminator_loss(teacher_logits, student_logits, images)
        extra = (images,) if self._uses_images else ()
        return self._graph(teacher_logits.detach(), student_logits.detach(), *extra)
