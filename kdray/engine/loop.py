"""The training loop of a run (a student distilled from a frozen teacher, or a teacher trained with CE), or of a
trial pack (K students of one job, differing in their losses only, trained together), on one process or on every
rank of a data-parallel group.

    for i in start..iterations-1:
        lr = lr0 * (1 - i/iterations)^power                    # poly schedule, per iteration
        one batch; one teacher forward (eval, no grad)         # shared by the pack's members
        for each member still in the pack (its own RNG stream):
            student forward; total = sum_k w_k * loss_k; backward, step    # adapters train with the student
            each loss-owned optimizer's step (the holistic loss's discriminator, on detached logits)
            every eval_interval: mIoU on the val split -> report(evaluation, checkpoint_dir)
                             with the run's costs (`kdray.engine.cost`): the student's, and training's so far;
                             data.preview_images val images predicted and drawn -> preview(iteration, picture);
                             a true return from report: the member leaves (early stopping)
    at the end (data.eval_scales / data.eval_flip set): each complete member's best weights scored once more,
    multi-scale -> log

Why a member trains as it would alone: the batches come from a sampler indexed by iteration with its own seeded
augmentation (no draw from torch's global RNG), and the teacher draws nothing (eval mode, no dropout); so the
global RNG is each member's alone once it is swapped in and out around the member's work (CPU, and the device's on
CUDA), and its initial weights are drawn from `run.seed` after the teacher is built, as in a solo run. The one
condition is the arithmetic: a forward of the teacher on the same batch gives the same logits bit for bit on the
CPU and, with deterministic kernels, on a GPU.

The loop knows nothing of Ray or MLflow: orchestration passes `report` and `log` callables. What it reports is
spelled by `kdray.contract`: a typed `Evaluation` per evaluation, metric names for the training log.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdray import contract
from kdray.config import Job, LossesConfig, job_hash
from kdray.config.loading import flatten, to_dict
from kdray.config.schema import TuneSplitConfig
from kdray.contract import Evaluation
from kdray.data import IterationBatchSampler, build_dataset, class_names
from kdray.engine.checkpoint import load_checkpoint, save_checkpoint
from kdray.engine.cost import (
    ChargedClock,
    TrainingCost,
    device_meter,
    evaluation_size,
    forward_flops,
    inference_latency,
    parameter_count,
    run_cost,
)
from kdray.engine.distributed import RankContext, gather_objects, mean_over_ranks
from kdray.engine.evaluate import evaluate, evaluation_loader, judge
from kdray.engine.previews import PreviewSet
from kdray.engine.progress import Progress
from kdray.engine.scoring import score_best_weights
from kdray.engine.sliding import window_of
from kdray.engine.step import TrainStep, autocast_for, shared_teacher_forward
from kdray.errors import CheckpointError, ConfigError, KdrayError, ResourceError
from kdray.losses.inputs import STUDENT_AUX_LOGITS
from kdray.losses.objective import reads_input
from kdray.models import Segmenter, build_model, load_segmenter_weights
from kdray.models.weights import read_state_dict

# report(evaluation, checkpoint_dir): every rank, after each evaluation; the directory on the main rank only; a true
# return on any rank ends the run there (early stopping)
Report = Callable[[Evaluation, "str | None"], "bool | None"]
Log = Callable[[dict[str, float]], None]
# decide(evaluations): every rank, after the evaluations of one iteration of a pack (member index -> Evaluation);
# the indices of the members that stop there
Decide = Callable[[dict[int, Evaluation]], "set[int] | list[int]"]
# preview(iteration, picture): the main rank, after each evaluation; picture is `kdray.rendering.render_predictions`'
# uint8 (H, W, 3) RGB rows (image | ground truth | student | teacher | errors) of the job's preview images
Preview = Callable[[int, Any], None]


class NonFiniteLossError(KdrayError):
    """A loss term became NaN or infinite; the run stops at once rather than train on garbage."""

    def __init__(self, term: str, iteration: int, value: float):
        super().__init__(f"loss term {term!r} is {value} at iteration {iteration}")
        self.term, self.iteration, self.value = term, iteration, value


_SPENT = "time budget spent"  # the ranks' training seconds, averaged with the step's losses (not a loss)


@dataclass
class RunResult:
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)  # Evaluation.metrics() of each evaluation
    best_miou: float = float("nan")
    best_iteration: int = -1
    wall_s: float = 0.0
    output_dir: Path | None = None
    best_weights: Path | None = None  # the best evaluation's student (or teacher) state dict
    time_budget_reached: bool = False  # optim.time_budget_s ended the run at `iterations` (in this session or before)
    iteration_seconds: list[float] = field(default_factory=list)  # wall seconds of each iteration this call ran
    # a complete run's best weights under data.eval_scales / eval_flip (`kdray.engine.scoring.score_best_weights`:
    # e.g. val/miou_ms_flip and val/iou_ms_flip/<class>); empty when the job evaluates single scale only
    final_scores: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # its report ended it early (a search's early stopping)
    failure: str | None = None  # in a pack of several: why it left the pack failed (a non-finite loss)

    @property
    def final_miou(self) -> float:
        return self.history[-1][contract.VAL_MIOU] if self.history else float("nan")


@dataclass
class PackMember:
    """One student of a trial pack (`train_pack`), or the one run of `train`: its job and where its run goes.

    `report(evaluation, checkpoint_dir)`: every rank, after each of this member's evaluations; a true return on
    any rank ends this member there (early stopping: its run is `RunResult.stopped`). `log(metrics)`: the main rank,
    every `optim.log_interval` iterations. `preview(iteration, picture)`: the main rank, at each evaluation, with
    data.preview_images > 0. `resume`: a checkpoint directory of this member's run to continue from.
    `left(state, reason)`: every rank, when the member leaves a pack before its end: `stopped` (its report or the
    pack's decide), `complete` (its time budget ran out: evaluated there, scored at the pack's end) or `failed` (a
    non-finite loss; `reason` says which), so that the caller's record of the pack says so at once."""

    job: Job
    output_dir: str | Path
    report: Report | None = None
    log: Log | None = None
    preview: Preview | None = None
    resume: str | Path | None = None
    left: Callable[[str, str | None], None] | None = None


def pack_difference(first: Job, other: Job) -> str | None:
    """Why `other` cannot train in one pack with `first`, or None when it can: the first setting (a dotted key, both
    values) where they differ outside `losses`. Members share the data pipeline, the seed (so the batches and the
    initial weights), the student, the schedule and the teacher; only their losses may differ."""
    a, b = (flatten(to_dict(replace(job, losses=LossesConfig()))) for job in (first, other))
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key}: {a.get(key)!r} and {b.get(key)!r}"
    return None


def check_pack(jobs: list[Job]) -> None:
    """ConfigError unless `jobs` (at least one) can train as one pack: equal outside `losses` (`pack_difference`)."""
    if not jobs:
        raise ConfigError("a pack needs at least one member")
    for index, job in enumerate(jobs[1:], start=1):
        difference = pack_difference(jobs[0], job)
        if difference is not None:
            raise ConfigError(f"pack member {index} differs from member 0 outside losses ({difference}); the members "
                              f"of a pack share data, seed, student, schedule and teacher and differ in losses only")


def student_aux(job: Job) -> bool:
    """Whether the student is built with the auxiliary FCN head: `student.aux`, and some term uses its logits
    (CE with `aux_weight` > 0, or a loss requiring them: `losses.dist.aux_weight`, `losses.dkd.aux_weight`)."""
    ce = job.losses.ce
    used = (ce.enabled and ce.aux_weight > 0) or reads_input(job.losses, STUDENT_AUX_LOGITS, required=True)
    return job.student.aux and used


def load_teacher(job: Job, device: torch.device) -> Segmenter:
    """The frozen teacher: eval mode, no gradients, weights from `teacher.checkpoint` (strict)."""
    if job.teacher.checkpoint is None:
        raise CheckpointError("teacher.checkpoint: distillation needs trained teacher weights; train them with "
                              "`python -m kdray.teacher --job <job>` or name a checkpoint file")
    # Teacher checkpoints come with or without the auxiliary head; build the model that matches, so that
    # loading stays strict about everything else. The file is read once.
    state = read_state_dict(job.teacher.checkpoint)
    teacher = build_model(job.teacher.arch, job.data.num_classes,
                          aux=any(k.startswith("auxlayer.") for k in state), width=job.teacher.width)
    load_segmenter_weights(teacher, job.teacher.checkpoint, state=state)
    teacher.eval().requires_grad_(False)
    return teacher.to(device)


def role_model(job: Job, role: str) -> tuple[Segmenter, LossesConfig, int]:
    """What a role trains: (model, losses, iterations). The student of a distillation job with the job's losses,
    or its teacher with CE alone for `job.teacher_iterations`. Draws the model's initial weights from torch's RNG."""
    ce = job.losses.ce
    if role == "teacher":
        cfg = job.teacher
        model = build_model(cfg.arch, job.data.num_classes, aux=ce.aux_weight > 0, width=cfg.width,
                            backbone_weights=cfg.backbone_weights)
        return model, LossesConfig(ce=replace(ce, enabled=True)), job.teacher_iterations
    cfg = job.student
    model = build_model(cfg.arch, job.data.num_classes, aux=student_aux(job), width=cfg.width,
                        backbone_weights=cfg.backbone_weights)
    return model, job.losses, job.optim.iterations


def train(job: Job, output_dir: str | Path, *, role: str = "student", ctx: RankContext | None = None,
          report: Report | None = None, log: Log | None = None, resume: str | Path | None = None,
          progress: bool = True, stop_after: int | None = None, preview: Preview | None = None) -> RunResult:
    """Train one run of `job` and return its evaluation history: `train_pack` with one member.

    `report(evaluation, checkpoint_dir)` is called on every rank after each evaluation (the same number of
    times on each, as Ray Train requires) with a `kdray.contract.Evaluation`; when its `is_best`, the main rank
    has just written its weights to `<output_dir>/best_<role>.pt`. `checkpoint_dir` is the directory of a
    resumable checkpoint on the main rank and None elsewhere; a true return ends the run there (`stopped`).
    `log(metrics)` is called on the main rank every `optim.log_interval` iterations (keys from `kdray.contract`).
    `resume` names a checkpoint directory to continue from. `stop_after` ends the run early after that iteration
    (a test's stand-in for an interruption).
    With data.preview_images > 0 the main rank predicts those val images at each evaluation (`kdray.engine.previews`)
    and calls `preview(iteration, picture)` before `report`; at a best evaluation it also writes their predictions to
    `<output_dir>/best_predictions.npz` (`kdray.rendering.write_predictions`), with or without `preview`.
    A student run with `optim.time_budget_s` ends after the iteration that brings the mean over ranks of their
    training seconds (`TrainingCost.training_seconds`) to the budget: it evaluates there, its Evaluation says
    `time_budget_reached`, and `RunResult.iterations` is the iteration reached (resumed from there, it runs nothing).
    A complete run of a job with data.eval_scales other than [1.0] or data.eval_flip then scores its best weights
    once that way (every rank), calls `log` with those metrics at the last iteration and returns them as
    `RunResult.final_scores`. A non-finite loss raises NonFiniteLossError.
    """
    member = PackMember(job, output_dir, report=report, log=log, preview=preview, resume=resume)
    return train_pack([member], role=role, ctx=ctx, progress=progress, stop_after=stop_after)[0]


def train_pack(members: list[PackMember], *, role: str = "student", ctx: RankContext | None = None,
               progress: bool = True, stop_after: int | None = None, decide: Decide | None = None) -> list[RunResult]:
    """Train the students of a trial pack together, one `RunResult` each (in `members`' order): one data pipeline
    and one teacher forward per batch (`shared_teacher_forward`), each member with its own student, objective,
    optimizers, loss-owned state, RNG stream, evaluations, checkpoint and callbacks, so that each trains exactly as
    its solo `train` would (see the module's docstring for the one condition).

    The members' jobs must be equal outside `losses` (ConfigError otherwise, `check_pack`); resumed members must
    resume from the same iteration (CheckpointError otherwise). A member leaves the pack when its `report` returns
    true (`stopped`), when its time budget is spent (`time_budget_reached`) or when a loss of its becomes
    non-finite: alone (one member) that raises NonFiniteLossError as `train` always did; in a larger pack the member
    ends with `failure` set and the others go on. The pack ends when every member has left or at the last
    iteration. `decide(evaluations)`: called on every rank after the members' evaluations of one iteration (member
    index -> its Evaluation, after each member's `report`) with the indices of the members to stop there (the
    union over ranks is taken): a pack's early stopping that compares its members, who reach each evaluation
    together. On a GPU, a pack of several raises ResourceError after its first member's first step when its
    estimated memory does not fit the device (`pack_memory_verdict`), before the other students' steps allocate
    their gradients, optimizer state and activations.
    Costs: with one member, the process's clocks as in any run; with more, each member is billed its own steps,
    evaluations and checkpoints, and an equal share of what served several (the batch's loading among all active
    members, the teacher forward among those that distil, the setup among all) (`ChargedClock`).
    """
    t_start = time.perf_counter()
    ctx = ctx or RankContext.current()
    device = ctx.device
    check_pack([m.job for m in members])
    job = members[0].job
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    meter = device_meter(device)
    shared_start = meter()
    # the teacher first: its build draws from the RNG, and each member's draws must start from the seed alone
    distilling = role == "student" and any(m.job.distills for m in members)
    teacher = load_teacher(job, device) if distilling else None

    # a tuning split is the student's search's: a teacher trains on the whole training split and is scored on val
    data = job.data if role == "student" else replace(job.data, tune_split=TuneSplitConfig())
    train_set, val_set = build_dataset(data, "train"), build_dataset(data, "val")
    val_loader = evaluation_loader(val_set, job.data.eval_batch_size, ctx, job.data.loader_workers)
    names = class_names(job.data)
    clocks = [ChargedClock() for _ in members] if len(members) > 1 else None
    trainees = [_Trainee(m, role, teacher if m.job.distills else None, ctx, val_set, names, val_loader,
                         clock=clocks[index] if clocks else None,
                         label=f"[{index + 1}/{len(members)}] " if len(members) > 1 else "", progress=progress)
                for index, m in enumerate(members)]
    starts = {t.start for t in trainees}
    if len(starts) > 1:
        raise CheckpointError("the pack's members resume from different iterations ("
                              + ", ".join(f"{t.output_dir}: {t.start}" for t in trainees)
                              + "); a pack continues from one iteration: resume each from a checkpoint of it")
    start = starts.pop()
    if clocks:  # the teacher, the data and every member's setup, in equal shares
        for clock in clocks:
            clock.charge(max(0.0, meter() - shared_start) / len(clocks))

    iterations = trainees[0].iterations
    stop = min(iterations, stop_after) if stop_after is not None else iterations
    sampler = IterationBatchSampler(len(train_set), job.data.batch_size, ctx.rank, ctx.world_size,
                                    job.run.seed, start, stop)
    # The loaders get their own generators: creating an iterator draws a seed, and drawing it from the global
    # RNG would shift dropout on a resumed run.
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=job.data.loader_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(job.run.seed))
    active = [t for t in trainees if t.begin(stop)]
    # what the teacher and every student's weights hold on the GPU before any step (the memory check's base)
    base_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    batches = iter(loader)
    for i in range(start, stop):
        if not active:
            break
        lr = job.optim.lr * (1 - i / iterations) ** job.optim.poly_power
        timed = active[0].cost.times_teacher_next
        if timed:
            active[0].cost.synchronize()
        wall, device_time = time.perf_counter(), meter()
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        data_wall, data_device = time.perf_counter() - wall, meter() - device_time
        if timed:
            active[0].cost.synchronize()
        wall, device_time = time.perf_counter(), meter()
        views = shared_teacher_forward([t.step for t in active], images)
        if timed:
            active[0].cost.synchronize()
        teacher_wall, teacher_device = time.perf_counter() - wall, meter() - device_time
        readers = sum(t.step.teacher is not None for t in active)
        evaluations: dict[int, Evaluation] = {}
        for t, view in zip(active, views):
            served = t.step.teacher is not None
            shared_wall = data_wall / len(active) + (teacher_wall / readers if served else 0.0)
            if t.clock is not None:
                t.clock.charge(data_device / len(active) + (teacher_device / readers if served else 0.0))
            with t.own_rng(), t.charged(meter):
                evaluation = None
                try:
                    evaluation = t.iteration(i, lr, images, labels, view, shared_wall,
                                             teacher_wall / readers if served and timed else None)
                except NonFiniteLossError as exc:
                    if len(members) == 1:
                        raise
                    t.fail(exc)
            if i == start and t is active[0] and len(active) > 1 and device.type == "cuda":
                check_pack_memory(len(active), base_bytes, device)  # measured on the first step, before the others
            if evaluation is not None:
                evaluations[trainees.index(t)] = evaluation
        if decide is not None and evaluations:
            leaving = set().union(*gather_objects(set(decide(evaluations)), ctx))
            for index in sorted(leaving):
                if index in evaluations and trainees[index].running:
                    trainees[index].leave_stopped()
        active = [t for t in active if t.running]

    for t in trainees:
        with t.own_rng(), t.charged(meter):
            t.finish()
    wall_s = time.perf_counter() - t_start
    return [t.result(wall_s) for t in trainees]


def pack_memory_verdict(students: int, peak_bytes: int, base_bytes: int, capacity_bytes: int) -> str | None:
    """Why a pack of `students` does not fit a device of `capacity_bytes`, or None when it does, on the estimate
    `base_bytes + students x (peak_bytes - base_bytes)`: `base_bytes` is what the device holds before any step (the
    teacher's and every student's weights), `peak_bytes` its peak over the first iteration's teacher forward and the
    first student's step, so `peak - base` is what one student's step adds (its gradients and optimizer state, which
    stay, and its activations, which go). An upper bound: the students' activations do not coexist."""
    per_step = max(0, peak_bytes - base_bytes)
    need = base_bytes + students * per_step
    if need <= capacity_bytes:
        return None
    fits = max(1, (capacity_bytes - base_bytes) // per_step) if per_step else students
    gib = 2 ** 30
    return (f"a pack of {students} students needs up to {need / gib:.1f} GiB ({base_bytes / gib:.2f} GiB of weights, "
            f"teacher and students, + {students} x {per_step / gib:.2f} GiB that a student's step adds, measured on "
            f"the first); the device has {capacity_bytes / gib:.1f} GiB: set pack_size to at most {fits}")


def check_pack_memory(students: int, base_bytes: int, device: torch.device) -> None:
    """ResourceError (`pack_memory_verdict`) when a pack of `students` would not fit `device` (CUDA), measured after
    its first member's first step."""
    verdict = pack_memory_verdict(students, torch.cuda.max_memory_allocated(device), base_bytes,
                                  torch.cuda.get_device_properties(device).total_memory)
    if verdict is not None:
        raise ResourceError(verdict)


class _Trainee:
    """One member's run inside `train_pack`: its model and optimisation state (`TrainStep`), RNG stream, costs,
    best and history, output, callbacks and progress line."""

    def __init__(self, member: PackMember, role: str, teacher: Segmenter | None, ctx: RankContext, val_set: Any,
                 names: list[str], val_loader: DataLoader, *, clock: ChargedClock | None, label: str,
                 progress: bool) -> None:
        job, device = member.job, ctx.device
        self.job, self.role, self.ctx, self.label = job, role, ctx, label
        self.output_dir = Path(member.output_dir)
        self.report, self.log, self.preview, self.left = member.report, member.log, member.preview, member.left
        self.names, self.val_loader, self.clock, self.teacher = names, val_loader, clock, teacher
        torch.manual_seed(job.run.seed)  # identical initial weights on every rank, and for each member as if alone
        model, losses, self.iterations = role_model(job, role)
        self.step = TrainStep.build(job, model, teacher, losses, ctx)
        self.digest = job_hash(job) + ("" if role == "student" else "-teacher")
        self.start, self.best, self.history = 0, (float("-inf"), -1), []
        state: dict[str, Any] = {}
        if member.resume is not None:
            state = load_checkpoint(member.resume, self.digest)
            step = self.step
            step.model.load_state_dict(state["model"])
            step.objective.load_state_dict(state["objective"])
            step.optimizer.load_state_dict(state["optimizer"])
            for name, owned in step.owned_optimizers.items():
                owned.load_state_dict(state["owned_optimizers"][name])
            step.scaler.load_state_dict(state["scaler"])
            self.start, self.best, self.history = state["iteration"], tuple(state["best"]), list(state["history"])
            rng = state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0]
            torch.set_rng_state(rng["cpu"])
            if device.type == "cuda" and rng.get("cuda") is not None:
                torch.cuda.set_rng_state(rng["cuda"], device)
        else:
            torch.manual_seed(job.run.seed * 1000 + ctx.rank)  # dropout differs across ranks, as in any DDP run
        self.previews = PreviewSet.of(job, val_set, device, lambda: autocast_for(job, device)) \
            if ctx.is_main else None
        self.progress = progress and ctx.is_main
        # what the student costs to run (the main rank measures; every rank reports it) and what training spends
        self.student = student_costs(job, model, device) if role == "student" and ctx.is_main else {}
        self.cost = TrainingCost(device) if clock is None else TrainingCost(device, wall_clock=clock, cpu_clock=clock)
        if "cost" in state:
            self.cost.load_state_dict(state["cost"][ctx.rank] if ctx.rank < len(state["cost"]) else state["cost"][0])
        # a student run's time budget: the ranks stop together, on the mean of their training seconds
        self.budget = job.optim.time_budget_s if role == "student" else 0.0
        # resumed from the evaluation the budget ended the run at (the checkpoint says so: every rank reads the same)
        self.out_of_time = bool(self.budget) and bool(state.get("time_budget_reached"))
        self.done = self.start  # the last iteration trained
        self.running = False
        self.stopped = False
        self.failure: str | None = None
        self.final: dict[str, float] = {}
        self._rng = self._read_rng()
        self._window: dict[str, float] = {}
        self._window_n, self._window_t, self._window_images = 0, time.perf_counter(), 0

    # -- the member's RNG stream and device time -------------------------------------------------------------

    def _read_rng(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = self.ctx.device
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def own_rng(self) -> Iterator[None]:
        """Torch's RNG (CPU, and the device's on CUDA) set to this member's stream inside, and kept on leaving."""
        cpu, cuda = self._rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.ctx.device)
        try:
            yield
        finally:
            self._rng = self._read_rng()

    @contextlib.contextmanager
    def charged(self, meter: Callable[[], float]) -> Iterator[None]:
        """What runs inside is this member's alone: its device time goes to its clock (in a pack)."""
        begun = meter()
        try:
            yield
        finally:
            if self.clock is not None:
                self.clock.charge(max(0.0, meter() - begun))

    # -- the run ---------------------------------------------------------------------------------------------

    def begin(self, stop: int) -> bool:
        """Announce the run (from the start); whether it trains (False: resumed after its time budget ran out)."""
        step, job = self.step, self.job
        self.show = Progress(stop, self.start, enabled=self.progress)
        if self.ctx.is_main and self.start == 0:
            arch = job.teacher.arch if self.role == "teacher" else job.student.arch
            self.show.message(f"{self.label}{self.role} {arch}: {step.objective.formula()}, {self.iterations} "
                              f"iterations, global batch {job.data.batch_size} over {self.ctx.world_size} worker(s)")
        self.step.model.train()
        self.stop = stop
        self.running = not self.out_of_time and self.start < stop
        if self.out_of_time:
            self.stop = self.start
        return self.running

    def iteration(self, i: int, lr: float, images: torch.Tensor, labels: torch.Tensor, view: Any,
                  shared_seconds: float, teacher_seconds: float | None) -> Evaluation | None:
        """Train iteration `i` on the pack's batch and teacher view; log, evaluate and report when due (the
        evaluation, if one was made, is returned).
        `shared_seconds`: this member's share of the batch's loading and teacher forward (wall),
        `teacher_seconds` its share of the teacher forward when this iteration times it."""
        ctx, cost, budget = self.ctx, self.cost, self.budget
        begun = time.perf_counter()
        self.step.set_lr(lr)
        total, parts = self.step(images, labels, view)
        spent = cost.training_seconds(ongoing=shared_seconds + time.perf_counter() - begun)
        budget_clock = {_SPENT: torch.tensor(spent, device=ctx.device)} if budget else {}
        values = mean_over_ranks({**parts, "total": total, **budget_clock}, ctx)
        if cost.times_teacher_next:  # the iteration is a timed one: its wall time is the kernels'
            cost.synchronize()
        cost.step(shared_seconds + time.perf_counter() - begun, teacher_seconds)
        done = self.done = i + 1
        self.out_of_time = bool(budget) and values.pop(_SPENT) >= budget and done < self.stop
        for name, value in values.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(name, done, value)
            self._window[name] = self._window.get(name, 0.0) + value
        self._window_n += 1
        self._window_images += images.shape[0] * ctx.world_size
        if done % self.job.optim.log_interval == 0 or done == self.stop or self.out_of_time:
            self._log_window(done, lr)
        evaluation = None
        if done % self.job.optim.eval_interval == 0 or done == self.iterations or self.out_of_time:
            evaluation, stop = self._evaluate(done)
            if stop:
                self.leave_stopped()
        if self.out_of_time:
            self.show.message(f"{self.label}time budget of {budget:g} s (optim.time_budget_s) reached at iteration "
                              f"{done} of {self.iterations}: the run ends here")
            self.stop = done
            if self.left is not None:
                self.left("complete", None)
        self.running = not (self.out_of_time or self.stopped) and done < self.stop
        return evaluation

    def leave_stopped(self) -> None:
        """End here, stopped by the search (early stopping): no more training, no final scoring."""
        self.stopped, self.running = True, False
        self.show.message(f"{self.label}stopped at iteration {self.done} by its search (early stopping)")
        if self.left is not None:
            self.left("stopped", None)

    def fail(self, exc: NonFiniteLossError) -> None:
        """Leave the pack after a non-finite loss: the run ends failed, the others go on."""
        self.failure, self.running = str(exc), False
        self.show.message(f"{self.label}failed: {exc}")
        if self.left is not None:
            self.left("failed", str(exc))

    def _log_window(self, done: int, lr: float) -> None:
        window, n = self._window, self._window_n
        elapsed = time.perf_counter() - self._window_t
        metrics = {contract.train_loss_key(k): v / n for k, v in window.items()}
        metrics.update({contract.TRAIN_LR: lr,
                        contract.TRAIN_IMAGES_PER_S: self._window_images / max(elapsed, 1e-9),
                        contract.ITERATION: done})
        if self.ctx.is_main:
            if self.log is not None:
                self.log(metrics)
            terms = " ".join(f"{k} {v / n:.3f}" for k, v in window.items() if k != "total")
            self.show.update(done, f"{self.label}loss {metrics[contract.TRAIN_LOSS_TOTAL]:.3f} ({terms}) "
                                   f"{metrics[contract.TRAIN_IMAGES_PER_S]:.0f} img/s")
        self._window, self._window_n, self._window_t, self._window_images = {}, 0, time.perf_counter(), 0

    def _evaluate(self, done: int) -> tuple[Evaluation, bool]:
        """Evaluate, keep the best weights, checkpoint, preview and report: the evaluation, and whether the report
        stops this member."""
        job, ctx, step, role, device = self.job, self.ctx, self.step, self.role, self.ctx.device
        model = step.model
        result = evaluate(model, self.val_loader, job.data.num_classes, job.data.ignore_index, ctx,
                          autocast_for(job, device) if job.run.amp != "none" else None, window_of(job.data))
        spent = gather_objects({"student": self.student, "training": self.cost.as_metrics(),
                                "state": self.cost.state_dict()}, ctx)
        judged = judge(done, result, self.names, self.best[0])  # best: restored on resume
        if judged.is_best:
            self.best = (judged.miou, done)
        self.history.append(judged.metrics())  # the scores; the costs (timings) go with the report only
        evaluation = replace(judged, cost={**spent[0]["student"], **run_cost([r["training"] for r in spent])},
                             time_budget_reached=self.out_of_time)
        rng_states = gather_objects(
            {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, ctx)
        checkpoint_dir = None
        if ctx.is_main:
            if self.previews is not None:
                best_path = self.output_dir / contract.BEST_PREDICTIONS_FILE if evaluation.is_best else None
                picture = self.previews.update(model, self.teacher, done, evaluation.miou, best_path=best_path,
                                               render=self.preview is not None)
                if picture is not None and self.preview is not None:
                    self.preview(done, picture)
            if evaluation.is_best:
                _save_weights(model, self.output_dir / f"best_{role}.pt")
            checkpoint_dir = str(save_checkpoint(self.output_dir / "checkpoint", {
                "job_hash": self.digest, "role": role, "iteration": done,
                "model": model.state_dict(), "objective": step.objective.state_dict(),
                "optimizer": step.optimizer.state_dict(),
                "owned_optimizers": {name: o.state_dict() for name, o in step.owned_optimizers.items()},
                "scaler": step.scaler.state_dict(), "rng": rng_states, "best": list(self.best),
                "history": self.history, "cost": [r["state"] for r in spent],
                "time_budget_reached": self.out_of_time,
            }))
            self.show.message(f"{self.label}eval @ {done}: mIoU {100 * evaluation.miou:.2f}  "
                              f"(best {100 * self.best[0]:.2f} @ {self.best[1]})")
        verdict = self.report(evaluation, checkpoint_dir) if self.report is not None else None
        return evaluation, any(gather_objects(bool(verdict), ctx))  # the ranks leave together

    def finish(self) -> None:
        """A complete run (its last iteration, or its time budget, reached): its best weights once more, under the
        job's multi-scale protocol, logged at the last iteration."""
        if self.failure is not None or self.stopped:
            return
        if not (self.done == self.iterations or self.out_of_time):
            return
        job, device = self.job, self.ctx.device
        self.final = score_best_weights(job, self.step.model, self.output_dir / f"best_{self.role}.pt",
                                        self.val_loader, self.ctx,
                                        autocast_for(job, device) if job.run.amp != "none" else None)
        if self.final and self.ctx.is_main:
            self.show.message(self.label + ", ".join(f"{k} {100 * v:.2f}" for k, v in self.final.items()
                                                     if k.startswith(contract.VAL_MIOU))
                              + f" (the best weights, iteration {self.best[1]})")
            if self.log is not None:
                self.log({**self.final, contract.ITERATION: self.done})

    def result(self, wall_s: float) -> RunResult:
        best_path = self.output_dir / f"best_{self.role}.pt"
        return RunResult(self.done, self.history, self.best[0] if self.best[1] >= 0 else float("nan"),
                         self.best[1], wall_s, self.output_dir, best_path if best_path.exists() else None,
                         time_budget_reached=self.out_of_time, iteration_seconds=list(self.cost.session_seconds),
                         final_scores=self.final, stopped=self.stopped, failure=self.failure)


def student_costs(job: Job, model: nn.Module, device: torch.device) -> dict[str, float]:
    """The student's parameters, FLOPs per image at the job's evaluation size and, unless run.latency_repeats is
    0, its inference latency (batch 1, the run's device and precision): `kdray.contract`'s STUDENT_* metrics."""
    height, width = evaluation_size(job.data)
    out = {contract.STUDENT_PARAMS: float(parameter_count(model)),
           contract.STUDENT_GFLOPS: forward_flops(model, height, width) / 1e9}
    if job.run.latency_repeats:
        autocast = (lambda: autocast_for(job, device)) if job.run.amp != "none" else contextlib.nullcontext
        latency = inference_latency(model.to(device), height, width, device, autocast=autocast,
                                    repeats=job.run.latency_repeats)
        out[contract.STUDENT_LATENCY_MS] = latency.median_ms
    return out


def _save_weights(model: nn.Module, path: Path) -> None:
    """Plain state dict (loadable with `kdray.models.load_segmenter_weights`), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
