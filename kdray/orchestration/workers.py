"""Ray Train: one run of the engine on `run.workers` data-parallel workers (nccl on GPU, gloo on CPU).

`train_per_worker` is the plain loop plus three bridges: Ray's checkpoint to resume from, each evaluation to
`ray.train.report` (every rank, the same number of times; rank 0 attaches the checkpoint), and rank 0's
metrics to the trial's MLflow run.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
from ray.train import Checkpoint, CheckpointConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from kdray.config import Job
from kdray.engine import NonFiniteLossError, RankContext, load_checkpoint, train
from kdray.orchestration import layout
from kdray.orchestration.tracking import RunLogger

# What goes to Tune with each evaluation (the scheduler and searcher need the metric and the iteration);
# per-class IoU and the training terms go to MLflow only.
_TUNE_KEYS = ("iteration", *layout.TUNE_METRICS)


def train_per_worker(config: dict[str, Any]) -> None:
    job: Job = config["job"]
    role: str = config["role"]
    context = ray.train.get_context()
    ctx = RankContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if ctx.is_main and config["run_id"] else None
    scratch = Path(tempfile.mkdtemp(prefix=f"kdray-{role}-"))

    reported = []

    def report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        reported.append(metrics["iteration"])
        step = int(metrics["iteration"])
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, step)
            if metrics[layout.VAL_MIOU] == metrics["val/best_miou"]:  # the engine just wrote these weights
                logger.log_artifact(scratch / f"best_{role}.pt", layout.BEST_CHECKPOINT_ARTIFACT_DIR)
        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(tune_metrics(metrics), checkpoint=checkpoint)

    def tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
        return {**{k: metrics[k] for k in _TUNE_KEYS if k in metrics}, "iterations_total": config["iterations"]}

    def log(metrics: dict[str, float]) -> None:
        if logger is not None:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "iteration"}, int(metrics["iteration"]))

    resume = ray.train.get_checkpoint()
    try:
        with resume.as_directory() if resume is not None else contextlib.nullcontext(None) as resume_dir:
            if resume_dir is not None and logger is not None:
                logger.set_tags({layout.RESUMED_FROM: str(load_checkpoint(resume_dir)["iteration"])})
            result = train(job, scratch, role=role, ctx=ctx, report=report, log=log, resume=resume_dir,
                           progress=False)
        if not reported and result.history:
            # Resumed from the final checkpoint: nothing was left to run, so tell Tune (again, on every rank) where
            # the run ended; otherwise the restored trial would look stopped early.
            ray.train.report(tune_metrics(result.history[-1]))
        if role == "teacher" and ctx.is_main and result.best_weights is not None:
            target = Path(job.teacher.checkpoint)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.best_weights, target)
    except NonFiniteLossError as err:
        # Every rank saw the same averaged loss and stops here together. Ending normally (rather than raising)
        # keeps Ray Train from restarting the workers on a run that would diverge again; the trial reads the
        # reason from its MLflow run and fails.
        if logger is not None:
            logger.set_tags({layout.FAILURE: str(err)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def scaling_config(job: Job) -> ScalingConfig:
    r = job.run
    resources = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker:
        resources["GPU"] = r.gpus_per_worker
    return ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources)


def fit(job: Job, *, role: str, run_id: str | None, tracking_uri: str, name: str, storage_path: str,
        max_failures: int = 2, callbacks: list | None = None) -> ray.train.Result:
    """Run the engine for `job` on Ray Train workers and wait for it. `name` must be stable across restarts:
    a restarted trial finds its checkpoint by it."""
    iterations = (job.teacher.iterations or job.optim.iterations) if role == "teacher" else job.optim.iterations
    trainer = TorchTrainer(
        train_per_worker,
        train_loop_config={"job": job, "role": role, "run_id": run_id, "tracking_uri": tracking_uri,
                           "iterations": iterations},
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
