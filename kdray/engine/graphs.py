"""The losses' forward and backward, and the discriminator's loss, as CUDA graphs (`run.cuda_graphs`).

On a GPU the distillation losses are bound by launching work, not by doing it: a loss dispatches a few hundred
small operators from Python, and the host's time per operator exceeds the kernels' (the README's Performance
section has the measured figures; `benchmarks/profile_losses.py` and `benchmarks/losses.py` print them).
Captured once with `torch.cuda.make_graphed_callables`, a step replays one graph for the losses' forward and one
for their backward, whatever the number of losses, so their cost falls to that of their kernels; the hinge
discriminator's loss likewise. The student, the teacher, the optimisers' steps and the WGAN-GP
discriminator (random mixing, double backward) stay eager. Checked (tests/test_gpu.py) on one GPU in float32
and under AMP, and on two data-parallel ranks sharing one GPU (gloo: DDP, SyncBatchNorm and the all-reduces of
the adapters and the discriminator around the graphs), which train what eager ranks train; not yet with nccl
over several GPUs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from kdray.losses.inputs import StepTensors
from kdray.losses.objective import DistillationObjective
from kdray.losses.registry import LOSSES


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
    """The objective as a function of the step's tensors (those present, by key), returning (total, *terms).

    Only the parameters trained with the student (the adapters) are this module's, so only they are inputs of
    the graph: parameters a loss trains with its own optimizer (the discriminator, frozen in the student's
    adversarial term) are read as they stand. Were they inputs too, the step's autograd graph would hold
    accumulators for them on the default stream, and capturing the discriminator's own loss would then fail.
    """

    def __init__(self, objective: DistillationObjective, keys: tuple[str, ...]):
        super().__init__()
        self.student_side = nn.ParameterList(objective.student_side_parameters())
        self.__dict__["objective"] = objective  # not a submodule: the owned parameters stay out of the inputs
        self.keys = keys

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        total, parts = self.objective(StepTensors(dict(zip(self.keys, tensors, strict=True))))
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
        keys = tuple(tensors)
        if keys not in self._graphs:
            self._graphs[keys] = _Graph(_ObjectiveCall(self.objective, keys), self.objective)
        total, *parts = self._graphs[keys](*(tensors[key] for key in keys))
        return total, dict(zip(self.terms, parts, strict=True))


class _OwnedLossCall(nn.Module):
    """A loss's owned loss as a function of the step's tensors; its owned parameters (what the graph's backward
    differentiates, the inputs being detached) are this module's."""

    def __init__(self, objective: DistillationObjective, name: str, keys: tuple[str, ...]):
        super().__init__()
        self.owned = nn.ParameterList(objective.owned_parameters(name))
        self.__dict__["objective"] = objective
        self.name, self.keys = name, keys

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.objective.owned_loss(self.name, StepTensors(dict(zip(self.keys, tensors, strict=True))))


class GraphedOwnedLoss:
    """`objective.owned_loss(name, tensors)` (the discriminator's loss) by graph replay when the loss's spec says
    it may be (`OwnedStep.graphable`: the hinge objective); otherwise eager (WGAN-GP: random mixing weights, a
    gradient penalty through a double backward)."""

    def __init__(self, objective: DistillationObjective, name: str):
        self.objective, self.name = objective, name
        owned = LOSSES[name].owned
        config = objective.configs[name]
        self._keys = tuple(str(i) for i in owned.inputs(config).values())
        self._graph = _Graph(_OwnedLossCall(objective, name, self._keys), objective.terms[name]) \
            if owned.graphable(config) else None

    def __call__(self, tensors: StepTensors) -> Tensor:
        if self._graph is None:
            return self.objective.owned_loss(self.name, tensors)
        return self._graph(*(tensors[key].detach() for key in self._keys))
