"""What a segmentation student costs: its size, its compute per image, its inference latency, and what its
training run spends (wall time per iteration, device time, peak memory, the teacher forward's share).

    student = student_cost(model, height, width, device, autocast_for(job, device))   # once, at the start
    cost = TrainingCost(device)                     # one per rank; cost.load_state_dict(...) on resume
    for i in ...:
        with cost.iteration():
            ...                                     # the step; its teacher forward inside `with cost.teacher():`
    log(cost.as_metrics())                          # at each evaluation; state_dict() into the checkpoint

The metric names, units and conventions are `kdray.contract`'s (STUDENT_PARAMS ... TRAIN_TEACHER_SHARE,
COST_DEVICE). Plain PyTorch: nothing here knows of Ray or MLflow, so the loop, a benchmark and a test use the
same numbers.
"""

from __future__ import annotations

import contextlib
import copy
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdray import contract

__all__ = [
    "ChargedClock",
    "Latency",
    "TrainingCost",
    "cost_device",
    "device_meter",
    "evaluation_size",
    "forward_flops",
    "inference_latency",
    "meta_copy",
    "parameter_count",
    "run_cost",
    "student_cost",
]

Autocast = contextlib.AbstractContextManager | Callable[[], contextlib.AbstractContextManager]


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """`value` if it is an int >= `minimum` (bool refused), else ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule's training flag, so that a mixed state (a frozen BN inside a training model) comes back
    exactly as it was, which `model.train(was_training)` would not do."""
    return [(module, module.training) for module in model.modules()]


def _restore_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    for module, training in flags:
        module.training = training


def parameter_count(model: nn.Module) -> int:
    """The number of scalar parameters of `model`: `sum(p.numel() for p in model.parameters())`.

    Every parameter counts, trainable or frozen; a parameter shared by two modules counts once (what
    `parameters()` yields). Buffers (BatchNorm's running statistics) are not parameters and do not count. The
    auxiliary head counts when the model has one: it is part of the trained student, though inference skips it.
    """
    return sum(p.numel() for p in model.parameters())


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers live on the meta device (shapes, no storage): the
    real tensors are mapped to meta ones in deepcopy's memo, so no real storage is ever copied."""
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer.detach().to("meta")
    return copy.deepcopy(model, memo)


def _count_flops(model: nn.Module, images: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    return int(counter.get_total_flops())


def forward_flops(model: nn.Module, height: int, width: int, channels: int = 3, *, meta: bool = True) -> int:
    """FLOPs of one forward pass of ONE image (batch 1, `channels` x `height` x `width`) in eval mode.

    Counted by `torch.utils.flop_counter.FlopCounterMode`, whose convention is one multiply-add = 2 FLOPs: a
    convolution costs `2 * Cin/groups * Cout * kh * kw * Hout * Wout`, a linear layer `2 * in * out` (per
    image); papers that write "FLOPs" for multiply-adds (GMACs) report half this number. The counter counts
    matrix products, convolutions and attention only: bias additions, BatchNorm, ReLU, pooling, bilinear
    interpolation, softmax and other element-wise operations are not counted. For these models that is
    negligible (a few elements' work per output element, against hundreds of multiply-adds per output element of
    a convolution).

    Eval mode is inference: Dropout is the identity and the auxiliary head of a `Segmenter` is skipped. The
    logits are counted at the model's output stride; the up-sampling to the input size is not counted either.

    meta=True (default) counts on a copy of `model` on the meta device with a meta input: shapes only, so
    DeepLabV3-ResNet101 at 1024x2048 costs neither compute nor memory, and `model` itself is not touched. Should
    the model hold an operation the meta device lacks (NotImplementedError), or with meta=False, the model runs
    for real on the device of its first parameter (CPU when it has none), in eval mode and without gradients,
    and its training flags are restored afterwards. Both give the same count.

    Returns an int (FLOPs, not GFLOPs). ValueError when height, width or channels is not an integer >= 1.
    """
    _positive_int("height", height)
    _positive_int("width", width)
    _positive_int("channels", channels)
    if meta:
        try:
            counted = meta_copy(model).eval()
            return _count_flops(counted, torch.empty(1, channels, height, width, device="meta"))
        except NotImplementedError:
            pass  # an operation without a meta kernel: count on the real model
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
    flags = _training_flags(model)
    try:
        model.eval()
        return _count_flops(model, torch.zeros(1, channels, height, width, device=device))
    finally:
        _restore_flags(flags)


@dataclass(frozen=True)
class Latency:
    """Inference time of one image, in milliseconds, over `repeats` timed runs (after the warm-up)."""

    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


def _context_factory(autocast: Autocast) -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument callable giving the context to run each forward in: `autocast` itself when it is a
    context manager (torch.autocast and nullcontext instances may be entered again after each exit), else
    `autocast` is taken to be the factory (e.g. the class `contextlib.nullcontext`)."""
    if isinstance(autocast, contextlib.AbstractContextManager):
        return lambda: autocast
    if callable(autocast):
        return autocast
    raise ValueError(f"autocast must be a context manager or a callable returning one, got {autocast!r}")


def inference_latency(
    model: nn.Module,
    height: int,
    width: int,
    device: torch.device | str,
    *,
    autocast: Autocast = contextlib.nullcontext,
    warmup: int = 3,
    repeats: int = 10,
    channels: int = 3,
) -> Latency:
    """Wall time of the forward pass of one image (batch 1, `channels` x `height` x `width`), as inference runs
    it: eval mode, `torch.inference_mode()`, inside `autocast` (the precision the run trains and evaluates in:
    pass `kdray.engine.step.autocast_for(job, device)`; a context manager, or a callable returning one).

    `warmup` untimed runs first (cuDNN's algorithm choice, the allocator's growth, lazy initialisation), then
    `repeats` runs, each timed alone with `time.perf_counter`; on CUDA each is enclosed by
    `torch.cuda.synchronize(device)`, so that the time is the kernels' and not only their launch. Returns the
    median, minimum and maximum in milliseconds (`Latency`). The input is a fixed random image made with a private
    generator (the global RNG is not drawn from). The model must already be on `device` (it is not moved); its
    training flags (every submodule's) are restored afterwards, also when the forward raises.

    ValueError, naming the argument, when height, width, channels or repeats is not an integer >= 1, warmup not an
    integer >= 0, `device` is the meta device, or a parameter of `model` is on another device than `device`.
    """
    _positive_int("height", height)
    _positive_int("width", width)
    _positive_int("channels", channels)
    _positive_int("warmup", warmup, minimum=0)
    _positive_int("repeats", repeats)
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("device: latency cannot be measured on the meta device")
    for name, param in model.named_parameters():
        if param.device.type != device.type or (device.index is not None and param.device.index != device.index):
            raise ValueError(f"device: the model's parameter {name!r} is on {param.device}, not on {device}; "
                             f"move the model first")
    context = _context_factory(autocast)
    cuda = device.type == "cuda"
    images = torch.randn(1, channels, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    flags = _training_flags(model)
    times_ms: list[float] = []
    try:
        model.eval()
        with torch.inference_mode():
            for run in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                with context():
                    model(images)
                if cuda:
                    torch.cuda.synchronize(device)
                if run >= warmup:
                    times_ms.append((time.perf_counter() - start) * 1e3)
    finally:
        _restore_flags(flags)
    return Latency(statistics.median(times_ms), min(times_ms), max(times_ms), repeats)


def cost_device(device: torch.device | str, precision: str) -> str:
    """The COST_DEVICE tag: where costs were measured and in which precision, e.g. "cpu, amp none" or
    "NVIDIA H100 80GB HBM3, amp bf16" (`precision` is the job's run.amp)."""
    device = torch.device(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{where}, amp {precision}"


def evaluation_size(data: Any) -> tuple[int, int]:
    """(height, width) of what one evaluation forward sees for a job's `data` section (`kdray.config.DataConfig`):
    with `eval_mode: slide` the window (`eval_crop`, else `crop`); with `whole` the dataset's largest image (its
    registered `image_size`: 1024x2048 for Cityscapes, 64x64 for the demo's synthetic data), or the training
    crop for a dataset that declares no size (a folder of images of any size)."""
    from kdray.data import dataset_spec  # here, so that the cost functions do not load the data package

    if data.eval_mode == "slide":
        return tuple(data.eval_crop or data.crop)
    spec = dataset_spec(data.dataset)
    largest = spec.largest_image(spec.options_of(data))
    return tuple(largest) if largest is not None else tuple(data.crop)


def student_cost(model: nn.Module, height: int, width: int, device: torch.device | str,
                 autocast: Autocast = contextlib.nullcontext, *, warmup: int = 3, repeats: int = 10
                 ) -> dict[str, float]:
    """The student's three costs in one call, keyed by the contract's names:

    - STUDENT_PARAMS: `parameter_count(model)` (a count);
    - STUDENT_GFLOPS: `forward_flops(model, height, width) / 1e9` (2 FLOPs per multiply-add, on the meta device);
    - STUDENT_LATENCY_MS: `inference_latency(...).median_ms` on `device` inside `autocast`.

    `height` x `width` should be the job's evaluation size (`evaluation_size(job.data)`). The model must be on
    `device`. ValueError as `inference_latency`.
    """
    latency = inference_latency(model, height, width, device, autocast=autocast, warmup=warmup, repeats=repeats)
    return {
        contract.STUDENT_PARAMS: float(parameter_count(model)),
        contract.STUDENT_GFLOPS: forward_flops(model, height, width) / 1e9,
        contract.STUDENT_LATENCY_MS: latency.median_ms,
    }


def _peak_resident_mb() -> float:
    """This process's peak resident set size, MiB: `ru_maxrss` is in KiB on Linux, in bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class TrainingCost:
    """What one rank of a training run has spent so far; resumable through `state_dict()`.

    - `s_per_iteration`: mean wall seconds per iteration, `sum(step seconds) / iterations`, over the iterations
      recorded (with `iteration()` or `step()`).
    - `device_seconds`: device time since this object was made, plus what a loaded state carried. With a CUDA
      `device`: GPU-seconds, `wall seconds x gpus` (`gpus`: the GPUs this process drives, 1 per rank under DDP).
      Otherwise: CPU-seconds, this process's CPU time (user + system, `time.process_time()`) since it was made:
      all its threads count, DataLoader worker processes do not. Either way it counts everything the rank did
      meanwhile (steps, evaluation, checkpoints), and it is this rank's share: the caller sums it over ranks for
      the run's figure (TRAIN_DEVICE_SECONDS).
    - `peak_memory_mb()`: CUDA: `torch.cuda.max_memory_allocated(device)`, the caching allocator's peak of
      allocated tensor memory (less than nvidia-smi shows); CPU: the process's peak resident set
      (`getrusage(RUSAGE_SELF).ru_maxrss`). MiB (2**20 bytes), and never less than a loaded state's peak.
    - `teacher_share`: `sum(teacher forward seconds) / sum(step seconds)` over the iterations whose teacher forward
      was timed, in [0, 1] when the teacher runs inside the step; None when none was.

    Timing the teacher on CUDA needs a `torch.cuda.synchronize` before and after its forward (and around the
    step, so that both times are the kernels'), which stalls the launch queue; so only every `teacher_every`-th
    iteration is timed that way (default 20 on CUDA, every iteration on the CPU, where nothing is queued). The
    other iterations run unsynchronised: their wall time can include work queued by the previous iteration,
    which evens out in the mean (and the loop's per-iteration `.item()` synchronises anyway).

    Clocks are injectable for tests: `wall_clock` (default `time.perf_counter`), `cpu_clock`
    (`time.process_time`) and `synchronize` (`torch.cuda.synchronize(device)` on CUDA, nothing otherwise).
    ValueError when gpus < 1 or teacher_every < 1.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        gpus: int = 1,
        teacher_every: int | None = None,
        wall_clock: Callable[[], float] = time.perf_counter,
        cpu_clock: Callable[[], float] = time.process_time,
        synchronize: Callable[[], None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.gpus = _positive_int("gpus", gpus)
        self.teacher_every = _positive_int("teacher_every", teacher_every if teacher_every is not None
                                           else (20 if self.cuda else 1))
        self._wall, self._cpu = wall_clock, cpu_clock
        if synchronize is None:
            synchronize = (lambda: torch.cuda.synchronize(self.device)) if self.cuda else (lambda: None)
        self._synchronize = synchronize
        self._wall_start, self._cpu_start = wall_clock(), cpu_clock()
        # totals carried from a loaded state (a resumed run), then this session's sums
        self._carried_device_seconds = 0.0
        self._carried_peak_mb = 0.0
        self.iterations = 0
        self.step_seconds = 0.0
        self.timed_step_seconds = 0.0  # the steps of the iterations whose teacher forward was timed
        self.teacher_seconds = 0.0
        self.session_seconds: list[float] = []  # each iteration recorded by this object (not a loaded state's)
        self._current: dict[str, Any] | None = None  # the iteration `iteration()` is timing

    # -- recording -------------------------------------------------------------------------------------------

    def step(self, seconds: float, teacher_seconds: float | None = None) -> None:
        """Record one iteration measured by the caller: its wall `seconds` and, when timed, its teacher forward's
        `teacher_seconds` (part of `seconds`). ValueError for a negative or non-finite time."""
        for name, value in (("seconds", seconds), ("teacher_seconds", teacher_seconds)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.iterations += 1
        self.step_seconds += seconds
        self.session_seconds.append(seconds)
        if teacher_seconds is not None:
            self.timed_step_seconds += seconds
            self.teacher_seconds += teacher_seconds

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """Time the enclosed training iteration. On an iteration whose teacher is to be timed (every
        `teacher_every`-th recorded one, the first included) the step is synchronised before and after
        (CUDA); a `teacher()` inside it then times the teacher forward. Not recorded when the block raises."""
        if self._current is not None:
            raise RuntimeError("TrainingCost.iteration() is already timing an iteration")
        timed = self.iterations % self.teacher_every == 0
        if timed:
            self._synchronize()
        start = self._wall()
        self._current = {"timed": timed, "teacher": None, "start": start}
        try:
            yield
            if timed:
                self._synchronize()
            seconds = self._wall() - start
            self.step(seconds, self._current["teacher"] if timed else None)
        finally:
            self._current = None

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        """Time the enclosed teacher forward, when the enclosing `iteration()` is a timed one (else a no-op, at no
        cost); several teacher blocks in one iteration add up. Outside `iteration()` it does nothing."""
        current = self._current
        if current is None or not current["timed"]:
            yield
            return
        self._synchronize()
        start = self._wall()
        yield
        self._synchronize()
        current["teacher"] = (current["teacher"] or 0.0) + self._wall() - start

    @property
    def times_teacher_next(self) -> bool:
        """Whether the next recorded iteration is one whose teacher forward is timed (every `teacher_every`-th)."""
        return self.iterations % self.teacher_every == 0

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA), so that a wall time read next is the kernels'; nothing on the
        CPU. For callers timing an iteration themselves (`step()`), as a trial pack does."""
        self._synchronize()

    # -- what has been spent ---------------------------------------------------------------------------------

    def training_seconds(self, ongoing: float = 0.0) -> float:
        """Wall seconds of the iterations recorded (a loaded state's included), plus the current one's so far:
        inside `iteration()` its own timing, else `ongoing` (the caller's, when it times iterations itself for
        `step()`). What a run's time budget (`optim.time_budget_s`) counts."""
        current = self._current
        return self.step_seconds + (self._wall() - current["start"] if current is not None else ongoing)

    @property
    def s_per_iteration(self) -> float | None:
        """Mean wall seconds per iteration over those recorded; None before the first."""
        return self.step_seconds / self.iterations if self.iterations else None

    @property
    def device_seconds(self) -> float:
        """GPU-seconds (CUDA) or CPU-seconds of this rank so far, a loaded state's included (see the class)."""
        spent = (self._wall() - self._wall_start) * self.gpus if self.cuda else self._cpu() - self._cpu_start
        return self._carried_device_seconds + spent

    def peak_memory_mb(self) -> float:
        """Peak device memory of this rank, MiB: CUDA allocated, else CPU resident (see the class)."""
        current = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else _peak_resident_mb()
        return max(current, self._carried_peak_mb)

    @property
    def teacher_share(self) -> float | None:
        """Teacher forward seconds / step seconds over the iterations where the teacher was timed; None when it
        never was (no teacher, or no timed iteration yet)."""
        if self.timed_step_seconds <= 0:
            return None
        return self.teacher_seconds / self.timed_step_seconds

    def as_metrics(self) -> dict[str, float]:
        """This rank's training costs keyed by the contract's names: TRAIN_DEVICE_SECONDS and
        TRAIN_PEAK_MEMORY_MIB always, TRAIN_S_PER_ITERATION once an iteration was recorded, TRAIN_TEACHER_SHARE once
        a teacher forward was timed. Device seconds are this rank's: sum them over ranks for the run's."""
        out = {contract.TRAIN_DEVICE_SECONDS: self.device_seconds,
               contract.TRAIN_PEAK_MEMORY_MIB: self.peak_memory_mb()}
        if self.s_per_iteration is not None:
            out[contract.TRAIN_S_PER_ITERATION] = self.s_per_iteration
        if self.teacher_share is not None:
            out[contract.TRAIN_TEACHER_SHARE] = self.teacher_share
        return out

    # -- resume ----------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, float]:
        """The totals so far (plain floats, for a checkpoint): a run resumed from them continues its sums."""
        return {
            "device_seconds": self.device_seconds,
            "peak_memory_mb": self.peak_memory_mb(),
            "iterations": float(self.iterations),
            "step_seconds": self.step_seconds,
            "timed_step_seconds": self.timed_step_seconds,
            "teacher_seconds": self.teacher_seconds,
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue from a `state_dict()`: its totals are added to this object's own (normally none yet), and its
        device seconds are carried, so that `device_seconds` goes on from the checkpoint instead of from zero.
        KeyError for a missing key."""
        self._carried_device_seconds += float(state["device_seconds"])
        self._carried_peak_mb = max(self._carried_peak_mb, float(state["peak_memory_mb"]))
        self.iterations += int(state["iterations"])
        self.step_seconds += float(state["step_seconds"])
        self.timed_step_seconds += float(state["timed_step_seconds"])
        self.teacher_seconds += float(state["teacher_seconds"])


class ChargedClock:
    """A clock that moves only when charged: the device time billed to one member of a trial pack.

    Members share an iteration's data loading and teacher forward, so no process clock is any one member's; the
    pack measures each stretch with `device_meter` and charges it (split among the members it served, or whole to
    the member it was for) to the members' clocks, which their `TrainingCost`s read as their wall or CPU clock.
    Seconds; never negative (ValueError for a negative or non-finite charge)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def charge(self, seconds: float) -> None:
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a charge must be a finite number of seconds >= 0, got {seconds!r}")
        self.seconds += seconds

    def __call__(self) -> float:
        return self.seconds


def device_meter(device: torch.device | str) -> Callable[[], float]:
    """The clock `TrainingCost` counts device time with on `device`: wall seconds (`time.perf_counter`) on CUDA,
    this process's CPU seconds (`time.process_time`) otherwise."""
    return time.perf_counter if torch.device(device).type == "cuda" else time.process_time


def run_cost(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """A run's training costs from its ranks' `TrainingCost.as_metrics()` (rank 0 first): device seconds summed
    over ranks (the run's GPU- or CPU-seconds), the peak memory of the rank that used most, and the mean over
    ranks of seconds per iteration and of the teacher's share (each over the ranks that have it). {} for no
    ranks."""
    out: dict[str, float] = {}
    for key in {k for rank in per_rank for k in rank}:
        values = [rank[key] for rank in per_rank if key in rank]
        if key == contract.TRAIN_DEVICE_SECONDS:
            out[key] = float(sum(values))
        elif key == contract.TRAIN_PEAK_MEMORY_MIB:
            out[key] = float(max(values))
        else:
            out[key] = float(statistics.fmean(values))
    return out
