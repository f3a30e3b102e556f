"""Ray Train: one run of the engine on `run.workers` data-parallel workers (nccl on GPU, gloo on CPU).

`train_per_worker` is the plain loop plus three bridges: Ray's checkpoint to resume from, each evaluation to
`ray.train.report` (every rank, the same number of times; rank 0 attaches the checkpoint), and rank 0's
metrics to the trial's MLflow run, with each evaluation's preview picture (`contract.PREDICTIONS_IMAGE_KEY`, the
iteration its step), the best evaluation's weights and predictions as artifacts, and, when a student run ends, its
best weights as an MLflow model (`kdray.orchestration.student_model`; `tracking.log_model`). A run its time
budget (optim.time_budget_s) ended reports the iteration it reached as its ITERATIONS_TOTAL: Tune, the scheduler
and the sweep's summary see it complete. A run that stops
on purpose (a non-finite loss) returns its reason: `fit` hands it back as `Result.return_value` (rank 0's), and
the trial decides what it means.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kdray import contract
from kdray.config import Job
from kdray.contract import Evaluation
from kdray.engine import NonFiniteLossError, RankContext, load_checkpoint, train
from kdray.engine.cost import cost_device
from kdray.orchestration.student_model import log_best_student
from kdray.orchestration.tracking import RunLogger

SAMPLING_S = 10  # seconds between two samples of a trial's system metrics


class RunBridge:
    """What one run's engine callbacks send to its MLflow run, on the main rank (`logger` None elsewhere: every
    call is then a no-op): each evaluation's metrics (the iteration their step) and, at a best one, the weights
    and predictions the engine just wrote into `out_dir`; each preview picture; the training log."""

    def __init__(self, logger: RunLogger | None, out_dir: Path, role: str):
        self.logger, self.out_dir, self.role = logger, out_dir, role

    def record(self, evaluation: Evaluation) -> None:
        if self.logger is None:
            return
        self.log(evaluation.metrics())
        if evaluation.is_best:  # the engine just wrote these weights (and the previews' predictions)
            self.logger.log_artifact(self.out_dir / f"best_{self.role}.pt", contract.BEST_CHECKPOINT_ARTIFACT_DIR)
            predictions = self.out_dir / contract.BEST_PREDICTIONS_FILE
            if predictions.is_file():
                self.logger.log_artifact(predictions, contract.PREDICTIONS_ARTIFACT_DIR)
        if evaluation.time_budget_reached:  # the run is complete at this iteration
            self.logger.set_tags({contract.TIME_BUDGET_STOP: str(evaluation.iteration)})

    def preview(self, iteration: int, picture) -> None:
        if self.logger is not None:
            self.logger.log_image(picture, contract.PREDICTIONS_IMAGE_KEY, iteration)

    def log(self, metrics: dict[str, float]) -> None:
        if self.logger is not None:
            step = int(metrics[contract.ITERATION])
            self.logger.log_metrics({k: v for k, v in metrics.items() if k != contract.ITERATION}, step)


def train_per_worker(config: dict[str, Any]) -> str | None:
    """One worker's run; returns None, or why the run stopped without finishing (every rank alike)."""
    job: Job = config["job"]
    role: str = config["role"]
    context = ray.train.get_context()
    ctx = RankContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if ctx.is_main and config["run_id"] else None
    scratch = Path(tempfile.mkdtemp(prefix=f"kdray-{role}-"))
    bridge = RunBridge(logger, scratch, role)
    reported = []

    def report(evaluation: Evaluation, checkpoint_dir: str | None) -> None:
        reported.append(evaluation.iteration)
        bridge.record(evaluation)
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        total = evaluation.iteration if evaluation.time_budget_reached else config["iterations"]
        ray.train.report({**evaluation.tune_metrics(), contract.ITERATIONS_TOTAL: total}, checkpoint=checkpoint)

    resume = ray.train.get_checkpoint()
    monitor = None
    if logger is not None and role == "student":  # a trial's run: where its costs were measured, and the machine's
        logger.set_tags({contract.COST_DEVICE: cost_device(ctx.device, job.run.amp)})
        monitor = system_metrics(config["tracking_uri"], config["run_id"], resumed=resume is not None)
    try:
        with resume.as_directory() if resume is not None else contextlib.nullcontext(None) as resume_dir:
            if resume_dir is not None and logger is not None:
                logger.set_tags({contract.RESUMED_FROM: str(load_checkpoint(resume_dir)["iteration"])})
            result = train(job, scratch, role=role, ctx=ctx, report=report, log=bridge.log, resume=resume_dir,
                           progress=False, preview=bridge.preview if logger is not None else None)
        if not reported and result.history:
            # Resumed from the final checkpoint: nothing was left to run, so tell Tune (again, on every rank) where
            # the run ended; otherwise the restored trial would look stopped early.
            last = result.history[-1]
            ended = {contract.ITERATIONS_TOTAL: last[contract.ITERATION], contract.TIME_BUDGET_REACHED: 1.0} \
                if result.time_budget_reached else {contract.ITERATIONS_TOTAL: config["iterations"]}
            ray.train.report({**{k: last[k] for k in (contract.ITERATION, *contract.TUNE_METRICS)}, **ended})
        if logger is not None and role == "student" and job.tracking.log_model and result.best_iteration >= 0:
            log_best_student(config["tracking_uri"], config["run_id"], job, result.best_weights, result.best_iteration)
        if role == "teacher" and ctx.is_main and result.best_weights is not None:
            target = Path(job.teacher.checkpoint)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.best_weights, target)
    except NonFiniteLossError as err:
        # Every rank saw the same averaged loss and stops here together. Ending normally (rather than raising)
        # keeps Ray Train from restarting the workers on a run that would diverge again; the reason goes back
        # as the function's value, and the trial fails with it.
        return str(err)
    finally:
        if monitor is not None:
            stop_system_metrics(monitor)
        shutil.rmtree(scratch, ignore_errors=True)
    return None


def system_metrics(tracking_uri: str, run_id: str, resumed: bool):
    """MLflow's system-metrics monitor on the run (a thread sampling CPU and memory, GPU utilisation and memory
    where there are GPUs, logged as `system/*` metrics every SAMPLING_S seconds), started; None when MLflow cannot
    start one (the run goes on without)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SAMPLING_S, resume_logging=resumed,
                                       tracking_uri=tracking_uri)
        monitor.start()
    except Exception as err:  # an optional view of the machine never stops a trial
        logging.getLogger(__name__).warning("system metrics are off for run %s: %s", run_id, err)
        return None
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor, with one last sample taken at the end: MLflow's monitor logs its first sample only after
    a whole interval, so a run shorter than that would otherwise have none."""
    monitor.finish()
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as err:  # an optional view of the machine never fails a trial
        logging.getLogger(__name__).warning("the last system-metrics sample was not logged: %s", err)


def scaling_config(job: Job) -> ScalingConfig:
    r = job.run
    resources = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources)


def fit(job: Job, *, role: str, run_id: str | None, tracking_uri: str, name: str, storage_path: str,
        max_failures: int = 2, callbacks: list | None = None, per_worker: Callable = train_per_worker,
        loop_config: dict[str, Any] | None = None) -> ray.train.Result:
    """Run the engine for `job` on Ray Train workers and wait for it. `name` must be stable across restarts:
    a restarted trial finds its checkpoint by it. The result's `return_value` is None, or the reason the run
    stopped on purpose (see `train_per_worker`). `per_worker` and `loop_config` (added to the worker's config):
    another worker function on the same workers (a trial pack's, `kdray.orchestration.pack_trial`)."""
    iterations = job.teacher_iterations if role == "teacher" else job.optim.iterations
    trainer = TorchTrainer(
        per_worker,
        train_loop_config={"job": job, "role": role, "run_id": run_id, "tracking_uri": tracking_uri,
                           "iterations": iterations, **(loop_config or {})},
        scaling_config=scaling_config(job),
        torch_config=TorchConfig(backend="nccl" if job.run.gpus_per_worker > 0 else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
