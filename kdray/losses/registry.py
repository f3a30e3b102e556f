"""The loss registry: every loss kdray can train with, each declared once, next to its `nn.Module`.

A loss is a file holding three things:

    @dataclass
    class MyLossConfig(LossConfig):              # the job's `losses.my_loss` section
        temperature: float = option(4.0, above=0)

    @register_loss("my_loss", config=MyLossConfig, label="MY",
                   reads={"student_logits": STUDENT_LOGITS, "teacher_logits": TEACHER_LOGITS})
    class MyLoss(nn.Module):
        def __init__(self, temperature: float = 4.0): ...
        def forward(self, student_logits, teacher_logits) -> Tensor: ...   # an unweighted scalar

The contract:

- **name** is the key under `losses` in a job (`losses.my_loss.enabled=true`) and in MLflow's
  `train/loss/<name>`; unique across built-ins and plugins.
- **config** subclasses `LossConfig` (`enabled`, `weight`); each option has its type (the loader checks it)
  and, for numbers, its range written once with `kdray.config.options.option`; rules tying options together go
  in a `check(prefix)` method. The job is validated from it before any compute.
- **label** names the loss in tables and formulas (`Loss = 1 * CE + 1 * MY`).
- **position** orders the losses in the job's `losses` section, the objective's terms, the formula and the method
  label (`KD+I2CKD`, the MLflow tag reports group by, so it must not change between versions): ascending, ties by
  name. The built-ins hold 0-80 (CE, KD, CWD, ACE, PA, HO, IFVD, CSC, I2CKD, in steps of 10); the default 1000
  puts a plugin's loss after them.
- **reads** maps forward arguments to the step's tensors (`kdray.losses.inputs`: logits, features of a named
  tap, labels at full or logits size, images), or is a function of the config giving that mapping (an input
  needed only under some option). A loss reading any teacher tensor makes the run load a teacher; a features
  input of a tap other than `head` makes the engine capture that layer, on the student or the teacher.
- **build** makes the module from the config and a `LossContext` (class count, ignore value, channel counts of
  the taps, to size adapters). Default: the class called with the config's options (all but `enabled`,
  `weight` and the options marked `option(..., constructor=False)`) plus those of `num_classes`, `ignore_index`,
  `student_channels`, `teacher_channels` (of the `head` tap) and `seed` (the run's) its signature names.
- **owned** (optional, `OwnedStep`): parameters of the loss trained by an optimizer of their own, stepped after
  the student's (the holistic loss's discriminator). Everything else the module owns (adapters) trains with
  the student.
- **graphable** (optional; a bool or a function of the config): whether the loss may be replayed as a CUDA graph
  (`run.cuda_graphs`). False for a loss with host-side control flow, random draws or collectives (CIRKD's memory);
  a run enabling one computes all its losses eagerly.

The module returns an unweighted scalar; the objective multiplies it by the config's `term_weight()`. No
gradient may flow into a teacher input: the engine's carry none (the teacher runs without autograd), and a
loss detaches them itself so that it keeps this when called on its own (the harness checks it). The losses'
state (adapters, discriminator, buffers such as CIRKD's queues, and `get_extra_state()` such as a generator's
state) is in the objective's state dict, so it is in every checkpoint and a resumed run continues it; the
pre-flight check restores it after its trial call. A plugin file
registers its losses the same way (`plugins:` in a job); one registry-wide test harness
(`kdray.testing.check_loss`) holds every registered loss to this contract.

Edge cases, the same for every loss: an empty batch (N = 0) gives exactly 0.0 (float32), still connected to
the student's inputs so that backward runs and gives zero gradients (`_checks.empty_batch`; the owned step's
loss likewise, connected to its parameters); labels with every pixel ignored give exactly 0.0 from every loss
that reads labels, unless it registers `labelled_only=False` (a term over all pixels whatever their label, as
CIRKD's mini-batch relations: all-ignore labels then give a finite value). Labels that are not (N, H, W) int64
with the batch's N raise one `PreflightError` naming the loss and the shapes (`_checks.label_map`), and the
module pickles (Ray ships it).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdray.config.options import check_options, not_for_constructor, option
from kdray.errors import ConfigError
from kdray.losses.inputs import HEAD, StepInput

__all__ = ["LOSSES", "LossConfig", "LossContext", "LossSpec", "OwnedStep", "loss_order", "loss_spec",
           "register_loss"]


@dataclass
class LossConfig:
    """What every `losses.<name>` section has: whether the loss is on, and its weight in the objective."""

    enabled: bool = False
    weight: float = option(1.0, at_least=0)

    def term_weight(self) -> float:
        """The weight of this loss's term in the student's objective."""
        return self.weight


@dataclass(frozen=True)
class LossContext:
    """What a loss is built against: the task and the channel counts of the taps it may read."""

    num_classes: int
    ignore_index: int
    student_channels: Mapping[str, int]  # tap -> C
    teacher_channels: Mapping[str, int]  # tap -> C; empty without a teacher
    seed: int = 0  # the run's seed (`run.seed`), for a loss drawing at random: the same on every rank

    def student(self, tap: str = HEAD) -> int:
        return self.student_channels[tap]

    def teacher(self, tap: str = HEAD) -> int | None:
        return self.teacher_channels.get(tap)


Reads = Mapping[str, StepInput]


@dataclass(frozen=True)
class OwnedStep:
    """Parameters a loss trains with an optimizer of its own, after each student step.

    parameters(module) -> the parameters (excluded from the student's optimizer);
    optimizer(parameters, config) -> the optimizer;
    loss: the name of the module's method returning the scalar to minimise, called with `reads` (detached);
    label: its name in logs (`train/loss/<label>`);
    graphable(config): whether `loss` may be replayed as a CUDA graph (no randomness, no double backward).
    """

    label: str
    parameters: Callable[[nn.Module], Iterable[nn.Parameter]]
    optimizer: Callable[[list[nn.Parameter], Any], torch.optim.Optimizer]
    loss: str
    reads: Reads | Callable[[Any], Reads]
    graphable: Callable[[Any], bool] = lambda config: False

    def inputs(self, config: Any) -> dict[str, StepInput]:
        return dict(self.reads(config) if callable(self.reads) else self.reads)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss (see the module docstring for each field's contract)."""

    name: str
    label: str
    module: type[nn.Module]
    config: type[LossConfig]
    reads: Reads | Callable[[Any], Reads]
    build: Callable[[Any, LossContext], nn.Module] | None = None
    owned: OwnedStep | None = None
    position: int = 1000
    graphable: bool | Callable[[Any], bool] = True
    labelled_only: bool = True

    def inputs(self, config: Any) -> dict[str, StepInput]:
        """`{forward argument: StepInput}` under `config`."""
        return dict(self.reads(config) if callable(self.reads) else self.reads)

    def all_inputs(self, config: Any) -> list[StepInput]:
        """Every tensor the loss and its owned step read under `config`."""
        owned = list(self.owned.inputs(config).values()) if self.owned is not None else []
        return [*self.inputs(config).values(), *owned]

    def is_graphable(self, config: Any) -> bool:
        """Whether the loss's forward and backward may be replayed as a CUDA graph under `config`."""
        return bool(self.graphable(config) if callable(self.graphable) else self.graphable)

    def needs_teacher(self, config: Any) -> bool:
        return any(i.side == "teacher" for i in self.all_inputs(config))

    def taps(self, config: Any, side: str) -> set[str]:
        """The layers of `side` (student/teacher) the loss reads features of."""
        return {i.tap for i in self.all_inputs(config) if i.side == side and i.tap is not None}

    def make(self, config: Any, context: LossContext) -> nn.Module:
        """The loss module for `config` (validated already)."""
        if self.build is not None:
            return self.build(config, context)
        skip = {"enabled", "weight", *not_for_constructor(type(config))}
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}
        accepted = inspect.signature(self.module).parameters
        offered = {"num_classes": context.num_classes, "ignore_index": context.ignore_index,
                   "student_channels": context.student(), "teacher_channels": context.teacher(),
                   "seed": context.seed}
        options.update({k: v for k, v in offered.items() if k in accepted})
        return self.module(**options)

    def check(self, config: Any) -> None:
        """The config's option ranges, then that the inputs it reads are arguments of the module's forward
        (and of the owned loss's method): ConfigError naming the loss otherwise."""
        check_options(config, f"losses.{self.name}")
        self.check_arguments(self.inputs(config), self.owned.inputs(config) if self.owned is not None else None)

    def check_arguments(self, reads: dict[str, StepInput], owned_reads: dict[str, StepInput] | None) -> None:
        calls = [("forward", self.module.forward, reads)]
        if self.owned is not None and owned_reads is not None:
            calls.append((self.owned.loss, getattr(self.module, self.owned.loss, None), owned_reads))
        for method, function, wanted in calls:
            if function is None:
                raise ConfigError(f"losses.{self.name}: {self.module.__name__} has no method {method!r}")
            parameters = inspect.signature(function).parameters
            if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                continue
            takes = [n for n in parameters if n != "self"]
            for argument, value in wanted.items():
                if not isinstance(value, StepInput):
                    raise ConfigError(f"losses.{self.name}: reads[{argument!r}] is {value!r}, not a StepInput "
                                      "(kdray.losses.inputs: STUDENT_LOGITS, student_features('backbone.layer3'), ...)")
                if argument not in takes:
                    raise ConfigError(f"losses.{self.name}: reads names the argument {argument!r}, but "
                                      f"{self.module.__name__}.{method} takes {', '.join(takes)}")


LOSSES: dict[str, LossSpec] = {}  # name -> spec, in registration order (built-ins first, then plugins)


def register_loss(name: str, *, config: type[LossConfig], label: str, reads: Reads | Callable[[Any], Reads],
                  build: Callable[[Any, LossContext], nn.Module] | None = None,
                  owned: OwnedStep | None = None,
                  position: int = 1000,
                  graphable: bool | Callable[[Any], bool] = True,
                  labelled_only: bool = True) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering an `nn.Module` as the loss `name` (see the module docstring).

    Raises ConfigError when `name` is not an identifier, is taken by another module, or `config` is not a
    `LossConfig` dataclass. Registering the same class again (a plugin imported twice) is a no-op.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"register_loss: the name {name!r} must be an identifier (it is a config key)")
    if not (isinstance(config, type) and issubclass(config, LossConfig)):
        raise ConfigError(f"register_loss({name!r}): config must be a dataclass subclassing LossConfig")
    if "__dataclass_fields__" not in vars(config):
        raise ConfigError(f"register_loss({name!r}): {config.__name__} needs @dataclass (without it, its options "
                          "are not options)")

    def register(cls: type[nn.Module]) -> type[nn.Module]:
        previous = LOSSES.get(name)
        if previous is not None and _qualified(previous.module) != _qualified(cls):
            raise ConfigError(f"register_loss: the loss name {name!r} is taken by {_where(previous.module)}; "
                              f"{_where(cls)} needs another name")
        for other in LOSSES.values():
            if other.name != name and other.label == label:
                raise ConfigError(f"register_loss({name!r}): the label {label!r} is taken by the loss {other.name!r} "
                                  "(labels name methods in tables and MLflow tags): choose another")
        spec = LossSpec(name, label, cls, config, reads, build, owned, position, graphable, labelled_only)
        if not callable(reads):
            spec.check_arguments(dict(reads), None)
        LOSSES[name] = spec
        return cls

    return register


def loss_order() -> list[str]:
    """The registered names by position, then name: the order of sections, terms and labels."""
    return sorted(LOSSES, key=lambda name: (LOSSES[name].position, name))


def loss_spec(name: str) -> LossSpec:
    """The registered loss `name`; ConfigError with a did-you-mean otherwise."""
    if name in LOSSES:
        return LOSSES[name]
    close = difflib.get_close_matches(name, list(LOSSES), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"losses.{name}: no such loss{hint}; registered: {', '.join(LOSSES)}")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _where(cls: type) -> str:
    """`kdray.losses.kd.PixelwiseKD`, or for a plugin's class `MyKD in /path/my_loss.py`."""
    if cls.__module__.startswith("kdray_plugin_"):
        try:
            return f"{cls.__qualname__} in {inspect.getfile(cls)}"
        except (TypeError, OSError):
            pass
    return _qualified(cls)
