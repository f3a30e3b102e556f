"""The training loop for one run (a student distilled from a frozen teacher, or a teacher trained with CE),
on one process or on every rank of a data-parallel group.

    for i in start..iterations-1:
        lr = lr0 * (1 - i/iterations)^power                    # poly schedule, per iteration
        teacher forward (eval, no grad)   student forward      # same precision (autocast) for both
        total = sum_k w_k * loss_k        backward, step        # adapters train with the student
        each loss-owned optimizer's step (the holistic loss's discriminator, on detached logits)
        every eval_interval: mIoU on the val split -> report(evaluation, checkpoint_dir)
                             with the run's costs (`kdray.engine.cost`): the student's, and training's so far;
                             data.preview_images val images predicted and drawn -> preview(iteration, picture)
    at the end (data.eval_scales / data.eval_flip set): the best weights scored once more, multi-scale -> log

The loop knows nothing of Ray or MLflow: orchestration passes `report` and `log` callables. What it reports is
spelled by `kdray.contract`: a typed `Evaluation` per evaluation, metric names for the training log.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from kdray import contract
from kdray.config import Job, LossesConfig, job_hash
from kdray.config.schema import TuneSplitConfig
from kdray.contract import Evaluation
from kdray.data import IterationBatchSampler, build_dataset, class_names
from kdray.engine.checkpoint import load_checkpoint, save_checkpoint
from kdray.engine.cost import (
    TrainingCost,
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
from kdray.engine.step import TrainStep, autocast_for
from kdray.errors import CheckpointError, KdrayError
from kdray.losses.inputs import STUDENT_AUX_LOGITS
from kdray.losses.objective import reads_input
from kdray.models import Segmenter, build_model, load_segmenter_weights
from kdray.models.weights import read_state_dict

# report(evaluation, checkpoint_dir): every rank, after each evaluation; the directory on the main rank only
Report = Callable[[Evaluation, "str | None"], None]
Log = Callable[[dict[str, float]], None]
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

    @property
    def final_miou(self) -> float:
        return self.history[-1][contract.VAL_MIOU] if self.history else float("nan")


@dataclass
class _Setup:
    """What a role trains: the student of a distillation job, or its teacher with CE alone."""

    model: Any
    losses: LossesConfig
    iterations: int
    teacher: Segmenter | None


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


def _setup(job: Job, role: str, device: torch.device) -> _Setup:
    ce = job.losses.ce
    if role == "teacher":
        cfg = job.teacher
        model = build_model(cfg.arch, job.data.num_classes, aux=ce.aux_weight > 0, width=cfg.width,
                            backbone_weights=cfg.backbone_weights)
        losses = LossesConfig(ce=replace(ce, enabled=True))
        return _Setup(model, losses, job.teacher_iterations, None)
    cfg = job.student
    model = build_model(cfg.arch, job.data.num_classes, aux=student_aux(job), width=cfg.width,
                        backbone_weights=cfg.backbone_weights)
    teacher = load_teacher(job, device) if job.distills else None
    return _Setup(model, job.losses, job.optim.iterations, teacher)


def train(job: Job, output_dir: str | Path, *, role: str = "student", ctx: RankContext | None = None,
          report: Report | None = None, log: Log | None = None, resume: str | Path | None = None,
          progress: bool = True, stop_after: int | None = None, preview: Preview | None = None) -> RunResult:
    """Train one run of `job` and return its evaluation history.

    `report(evaluation, checkpoint_dir)` is called on every rank after each evaluation (the same number of
    times on each, as Ray Train requires) with a `kdray.contract.Evaluation`; when its `is_best`, the main rank
    has just written its weights to `<output_dir>/best_<role>.pt`. `checkpoint_dir` is the directory of a
    resumable checkpoint on the main rank and None elsewhere. `log(metrics)` is called on the main rank every
    `optim.log_interval` iterations (keys from `kdray.contract`). `resume` names a checkpoint directory to
    continue from. `stop_after` ends the run early after that iteration (a test's stand-in for an interruption).
    With data.preview_images > 0 the main rank predicts those val images at each evaluation (`kdray.engine.previews`)
    and calls `preview(iteration, picture)` before `report`; at a best evaluation it also writes their predictions to
    `<output_dir>/best_predictions.npz` (`kdray.rendering.write_predictions`), with or without `preview`.
    A student run with `optim.time_budget_s` ends after the iteration that brings the mean over ranks of their
    training seconds (`TrainingCost.training_seconds`) to the budget: it evaluates there, its Evaluation says
    `time_budget_reached`, and `RunResult.iterations` is the iteration reached (resumed from there, it runs nothing).
    A complete run of a job with data.eval_scales other than [1.0] or data.eval_flip then scores its best weights
    once that way (every rank), calls `log` with those metrics at the last iteration and returns them as
    `RunResult.final_scores`.
    """
    t_start = time.perf_counter()
    ctx = ctx or RankContext.current()
    device = ctx.device
    output_dir = Path(output_dir)
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    torch.manual_seed(job.run.seed)  # identical initial weights on every rank

    setup = _setup(job, role, device)
    step = TrainStep.build(job, setup.model, setup.teacher, setup.losses, ctx)
    model, objective, optimizer, owned_optimizers, scaler = (step.model, step.objective, step.optimizer,
                                                             step.owned_optimizers, step.scaler)
    optim_cfg = job.optim

    digest = job_hash(job) + ("" if role == "student" else "-teacher")
    start, best, history = 0, (float("-inf"), -1), []
    if resume is not None:
        state = load_checkpoint(resume, digest)
        model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        for name, owned in owned_optimizers.items():
            owned.load_state_dict(state["owned_optimizers"][name])
        scaler.load_state_dict(state["scaler"])
        start, best, history = state["iteration"], tuple(state["best"]), list(state["history"])
        rng = state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
    else:
        torch.manual_seed(job.run.seed * 1000 + ctx.rank)  # dropout differs across ranks, as in any DDP run

    iterations = setup.iterations
    stop = min(iterations, stop_after) if stop_after is not None else iterations
    # a tuning split is the student's search's: a teacher trains on the whole training split and is scored on val
    data = job.data if role == "student" else replace(job.data, tune_split=TuneSplitConfig())
    train_set, val_set = build_dataset(data, "train"), build_dataset(data, "val")
    sampler = IterationBatchSampler(len(train_set), job.data.batch_size, ctx.rank, ctx.world_size,
                                    job.run.seed, start, stop)
    # The loaders get their own generators: creating an iterator draws a seed, and drawing it from the global
    # RNG would shift dropout on a resumed run.
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=job.data.loader_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(job.run.seed))
    val_loader = evaluation_loader(val_set, job.data.eval_batch_size, ctx, job.data.loader_workers)
    names = class_names(job.data)
    previews = PreviewSet.of(job, val_set, device, lambda: autocast_for(job, device)) if ctx.is_main else None

    show = Progress(stop, start, enabled=progress and ctx.is_main)
    if ctx.is_main and start == 0:
        show.message(f"{role} {job.teacher.arch if role == 'teacher' else job.student.arch}: "
                     f"{objective.formula()}, {iterations} iterations, global batch {job.data.batch_size} "
                     f"over {ctx.world_size} worker(s)")
    # what the student costs to run (the main rank measures; every rank reports it) and what training spends
    student = student_costs(job, setup.model, device) if role == "student" and ctx.is_main else {}
    cost = TrainingCost(device)
    if resume is not None and "cost" in state:
        cost.load_state_dict(state["cost"][ctx.rank] if ctx.rank < len(state["cost"]) else state["cost"][0])
    step.teacher_timer = cost.teacher
    # a student run's time budget: the ranks stop together, on the mean of their training seconds
    budget = job.optim.time_budget_s if role == "student" else 0.0
    # resumed from the evaluation the budget ended the run at (the checkpoint says so: every rank reads the same)
    out_of_time = bool(budget) and resume is not None and bool(state.get("time_budget_reached"))
    if out_of_time:
        stop = start
    model.train()
    window: dict[str, float] = {}
    window_n, window_t, window_images = 0, time.perf_counter(), 0
    batches = iter(loader)
    for i in range(start, stop):
        with cost.iteration():  # the whole iteration: the batch's loading included, the evaluation not
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            lr = optim_cfg.lr * (1 - i / iterations) ** optim_cfg.poly_power
            step.set_lr(lr)
            total, parts = step(images, labels)
            budget_clock = {_SPENT: torch.tensor(cost.training_seconds(), device=device)} if budget else {}
            values = mean_over_ranks({**parts, "total": total, **budget_clock}, ctx)
        done = i + 1
        out_of_time = bool(budget) and values.pop(_SPENT) >= budget and done < stop
        for name, value in values.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(name, i + 1, value)
            window[name] = window.get(name, 0.0) + value
        window_n += 1
        window_images += images.shape[0] * ctx.world_size

        if done % optim_cfg.log_interval == 0 or done == stop or out_of_time:
            elapsed = time.perf_counter() - window_t
            metrics = {contract.train_loss_key(k): v / window_n for k, v in window.items()}
            metrics.update({contract.TRAIN_LR: lr,
                            contract.TRAIN_IMAGES_PER_S: window_images / max(elapsed, 1e-9),
                            contract.ITERATION: done})
            if ctx.is_main:
                if log is not None:
                    log(metrics)
                terms = " ".join(f"{k} {v / window_n:.3f}" for k, v in window.items() if k != "total")
                show.update(done, f"loss {metrics[contract.TRAIN_LOSS_TOTAL]:.3f} ({terms}) "
                                  f"{metrics[contract.TRAIN_IMAGES_PER_S]:.0f} img/s")
            window, window_n, window_t, window_images = {}, 0, time.perf_counter(), 0

        if done % optim_cfg.eval_interval == 0 or done == iterations or out_of_time:
            result = evaluate(model, val_loader, job.data.num_classes, job.data.ignore_index, ctx,
                              autocast_for(job, device) if job.run.amp != "none" else None, window_of(job.data))
            spent = gather_objects({"student": student, "training": cost.as_metrics(), "state": cost.state_dict()},
                                   ctx)
            judged = judge(done, result, names, best[0])  # best: restored on resume
            if judged.is_best:
                best = (judged.miou, done)
            history.append(judged.metrics())  # the scores; the costs (timings) go with the report only
            evaluation = replace(judged, cost={**spent[0]["student"], **run_cost([r["training"] for r in spent])},
                                 time_budget_reached=out_of_time)
            rng_states = gather_objects(
                {"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, ctx)
            checkpoint_dir = None
            if ctx.is_main:
                if previews is not None:
                    best_path = output_dir / contract.BEST_PREDICTIONS_FILE if evaluation.is_best else None
                    picture = previews.update(model, setup.teacher, done, evaluation.miou, best_path=best_path,
                                              render=preview is not None)
                    if picture is not None and preview is not None:
                        preview(done, picture)
                if evaluation.is_best:
                    _save_weights(model, output_dir / f"best_{role}.pt")
                checkpoint_dir = str(save_checkpoint(output_dir / "checkpoint", {
                    "job_hash": digest, "role": role, "iteration": done,
                    "model": model.state_dict(), "objective": objective.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "owned_optimizers": {name: o.state_dict() for name, o in owned_optimizers.items()},
                    "scaler": scaler.state_dict(), "rng": rng_states, "best": list(best), "history": history,
                    "cost": [r["state"] for r in spent], "time_budget_reached": out_of_time,
                }))
                show.message(f"eval @ {done}: mIoU {100 * evaluation.miou:.2f}  "
                             f"(best {100 * best[0]:.2f} @ {best[1]})")
            if report is not None:
                report(evaluation, checkpoint_dir)
        if out_of_time:
            show.message(f"time budget of {budget:g} s (optim.time_budget_s) reached at iteration {done} of "
                         f"{iterations}: the run ends here")
            stop = done
            break

    best_path = output_dir / f"best_{role}.pt"
    final: dict[str, float] = {}
    if stop == iterations or out_of_time:  # complete: its best weights once more, under the job's multi-scale protocol
        final = score_best_weights(job, model, best_path, val_loader, ctx,
                                   autocast_for(job, device) if job.run.amp != "none" else None)
        if final and ctx.is_main:
            show.message(", ".join(f"{k} {100 * v:.2f}" for k, v in final.items() if k.startswith(contract.VAL_MIOU))
                         + f" (the best weights, iteration {best[1]})")
            if log is not None:
                log({**final, contract.ITERATION: stop})
    return RunResult(stop, history, best[0] if best[1] >= 0 else float("nan"), best[1],
                     time.perf_counter() - t_start, output_dir, best_path if best_path.exists() else None,
                     time_budget_reached=out_of_time, iteration_seconds=list(cost.session_seconds),
                     final_scores=final)


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
