"""The objective's forward and backward as two CUDA graphs (`run.cuda_graphs`).

On a GPU the distillation losses are bound by launching work, not by doing it: at the papers' shape on an H100,
I2CKD dispatches ~300 operators for 0.2 ms of kernels and takes 3 ms. Captured once with
`torch.cuda.make_graphed_callables`, a step replays one graph for the losses' forward and one for their
backward, whatever the number of losses (I2CKD alone: 0.25 ms). The student, the teacher and the
discriminator's own step stay eager. Checked on one GPU (tests/test_gpu.py), in float32 and under AMP; not yet
on several ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdray.losses.objective import DistillationObjective, StepTensors


class _ObjectiveCall(nn.Module):
    """The objective as a function of the step's tensors (those present), returning (total, *terms)."""

    def __init__(self, objective: DistillationObjective, fields: tuple[str, ...]):
        super().__init__()
        self.objective, self.fields = objective, fields

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        present = dict(zip(self.fields, tensors, strict=True))
        step = StepTensors(**{name: present.get(name) for name in StepTensors._fields})
        total, parts = self.objective(step)
        return (total, *parts.values())


class GraphedObjective:
    """Callable like the objective, `(StepTensors) -> (total, {term: value})`, by graph replay.

    Captured on the first call, from that call's tensors; later calls must have the same shapes, dtypes and
    gradient requirements (a training run's do: fixed crops and batch), and one that does not is computed
    eagerly. Capture runs the objective a few times (warm-up, then the capture itself): every buffer it
    updates (the discriminator's spectral-norm vectors and BatchNorm statistics) is put back afterwards, so a
    graphed run holds the state an eager one holds. The values returned are views of the graph's output
    buffers, rewritten by the next call. Loss terms run outside autocast (they do in the engine).
    """

    def __init__(self, objective: DistillationObjective):
        self.objective = objective
        self.terms = tuple(objective.terms)
        self._call = None
        self._signature = None

    def __call__(self, tensors: StepTensors) -> tuple[Tensor, dict[str, Tensor]]:
        signature = _signature(tensors)
        if self._call is None:
            self._capture(tensors, signature)
        elif signature != self._signature:
            return self.objective(tensors)
        fields = self._signature[0]
        total, *parts = self._call(*(getattr(tensors, name) for name in fields))
        return total, dict(zip(self.terms, parts, strict=True))

    def _capture(self, tensors: StepTensors, signature) -> None:
        fields = signature[0]
        saved = [buffer.detach().clone() for buffer in self.objective.buffers()]
        # The sample tensors become the graph's input buffers, which every call copies its tensors into: fresh
        # leaves, not this step's tensors (those would keep the step's whole autograd graph alive).
        static = tuple(_leaf_copy(getattr(tensors, name)) for name in fields)
        self._call = torch.cuda.make_graphed_callables(
            _ObjectiveCall(self.objective, fields), static,
            allow_unused_input=True,  # the adversarial term's discriminator is frozen in the student's term
        )
        with torch.no_grad():
            for buffer, value in zip(self.objective.buffers(), saved, strict=True):
                buffer.copy_(value)
        self._signature = signature


def _leaf_copy(tensor: Tensor) -> Tensor:
    return tensor.detach().clone().requires_grad_(tensor.requires_grad)


def _signature(tensors: StepTensors):
    """What a capture depends on: which tensors are present, and their shapes, dtypes and gradient needs."""
    present = tuple(name for name in StepTensors._fields if getattr(tensors, name) is not None)
    layout = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in (getattr(tensors, n) for n in present))
    return present, layout
