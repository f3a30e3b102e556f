"""A sweep: Ray Tune runs the space's trials (Optuna samples them, ASHA stops weak ones; or every ablation
row x seed), each trial a Ray Train run, every trial an MLflow child run of the sweep's parent run.

The sweep's own folder (`<run.output_dir>/<job>/sweeps/sweep-<id>/`) holds Tune's experiment state and
`kdray_sweep.json` (the job, space and MLflow ids), so `--resume` restores it with nothing else given.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kdray import __version__
from kdray.config import Job, apply_overrides, job_from_dict, parse_override, read_yaml, to_dict
from kdray.errors import ConfigError, ResourceError
from kdray.losses.objective import method_label
from kdray.orchestration import layout
from kdray.orchestration.resources import TRIAL_CPU, check_fits, concurrency, local_resources
from kdray.orchestration.space import ROW_KEY, SEED_KEY, SearchSpace, load_space, plan_lines
from kdray.orchestration.tracking import Tracker, resolve_tracking_uri

STATE_FILE = "kdray_sweep.json"


@dataclass
class SweepRequest:
    job_path: str
    space_path: str
    overrides: list[str] = field(default_factory=list)
    address: str | None = None
    tracking_uri: str | None = None
    resume: str | None = None  # a sweep folder, or "latest"
    dry_run: bool = False
    smoke_test: bool = False
    train_teacher: bool = False  # train the teacher when its checkpoint is missing


@dataclass
class TrialSummary:
    trial_id: str
    label: str
    seed: int
    params: dict[str, Any]
    last: float
    best: float
    iteration: int
    status: str  # finished | stopped early | failed: <reason>


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[TrialSummary]
    wall_s: float
    complete: bool = True
    report_markdown: str | None = None  # the tables of kdray.report, also logged on the sweep's run


SMOKE = {"optim.iterations": 4, "optim.eval_interval": 2, "optim.log_interval": 2}
SMOKE_SYNTHETIC = {"data.synthetic.train_length": 64, "data.synthetic.val_length": 16, "teacher.iterations": 4}


def prepare(request: SweepRequest) -> tuple[dict[str, Any], Job, SearchSpace]:
    """Job data with overrides, the validated job, the validated space: everything checked, nothing run."""
    data = read_yaml(request.job_path)
    data.setdefault("name", Path(request.job_path).stem)
    overrides = dict(parse_override(o) for o in request.overrides)
    if request.smoke_test:
        job = job_from_dict(data, overrides)
        smoke = {**SMOKE, **(SMOKE_SYNTHETIC if job.data.dataset == "synthetic" else {})}
        overrides = {**smoke, **overrides}
        teacher = job.teacher.checkpoint
        if teacher and not Path(teacher).is_file():  # never cache a 4-iteration teacher as the real one
            overrides.setdefault("teacher.checkpoint", str(Path(job.run.output_dir) / job.name / "smoke-teacher.pt"))
    # Resolved once, here: paths become absolute against the directory the sweep runs in, because trials
    # rebuild the job inside Tune's own working directories.
    data = to_dict(job_from_dict(apply_overrides(data, overrides)))
    space = load_space(request.space_path, job_from_dict(data), data)
    if request.smoke_test and space.kind == "search":
        space.num_samples = min(space.num_samples, 2)
    return data, job_from_dict(data, space.overrides), space  # the job as every trial starts from it


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _needs_teacher(job_data: dict[str, Any], space: SearchSpace) -> bool:
    if space.kind == "ablation":
        return any(job_from_dict(job_data, {**space.overrides, **s}).distills for _, s in space.rows)
    return True  # a search may switch on any loss


def _latest_sweep(root: Path) -> Path:
    sweeps = sorted(p for p in root.glob("sweep-*") if (p / STATE_FILE).is_file())
    if not sweeps:
        raise ConfigError(f"--resume: no sweep to resume under {root}")
    return sweeps[-1]


def dry_run(request: SweepRequest) -> list[str]:
    data, job, space = prepare(request)
    cluster = local_resources() if not (request.address or os.environ.get("RAY_ADDRESS")) else None
    lines = [f"job {job.name}: student {job.student.arch} (width {job.student.width:g}), teacher "
             f"{job.teacher.arch} (width {job.teacher.width:g}), {job.optim.iterations} iterations, "
             f"global batch {job.data.batch_size} = {job.run.workers} worker(s) x "
             f"{job.data.batch_size // job.run.workers}"]
    lines += plan_lines(space, job)
    r = job.run
    lines.append(f"resources per trial: {r.workers} worker(s) x ({r.cpus_per_worker:g} CPU, "
                 f"{r.gpus_per_worker:g} GPU), {'nccl' if r.gpus_per_worker else 'gloo'}")
    if cluster is not None:
        check_fits(job, cluster, [cluster])
        lines.append(f"this machine: {cluster['CPU']:g} CPU, {cluster['GPU']:g} GPU -> "
                     f"{concurrency(job, cluster, space.max_concurrent_trials)} trial(s) at once")
    else:
        lines.append("cluster resources are checked when the sweep connects (--address / RAY_ADDRESS)")
    teacher = job.teacher.checkpoint
    if _needs_teacher(data, space):
        state = "present" if teacher and Path(teacher).is_file() else "MISSING (trained first with --train-teacher)"
        lines.append(f"teacher weights: {teacher} ({state})")
    return lines


def run_sweep(request: SweepRequest, say=print) -> SweepOutcome:
    """Run (or resume) a sweep to the end and return its trials, best first."""
    import ray
    from ray import tune

    t0 = time.perf_counter()
    if request.resume:
        state, sweep_dir = _load_state(request)
        data, space_path = state["job_data"], state["space_path"]
        space = load_space(space_path, job_from_dict(data), data)
        if state.get("num_samples"):
            space.num_samples = state["num_samples"]
        job = job_from_dict(data, space.overrides)
    else:
        data, job, space = prepare(request)
        state = None
    uri = resolve_tracking_uri(request.tracking_uri or (state or {}).get("tracking_uri") or job.tracking.uri)
    experiment = job.tracking.experiment or job.name

    _start_ray(request.address)
    cluster = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_fits(job, cluster, nodes)
    tracker = Tracker(uri, experiment)
    say(f"MLflow store: {uri} (experiment {experiment!r}); open it with: mlflow ui --backend-store-uri {uri}")

    if state is None:
        sweep_id = time.strftime("%Y%m%d-%H%M%S")
        root = Path(job.run.output_dir) / job.name / "sweeps"
        sweep_dir = root / f"sweep-{sweep_id}"
        sweep_dir.mkdir(parents=True, exist_ok=False)
        parent = tracker.start_run(f"sweep-{sweep_id}", {
            layout.KIND: "sweep", layout.SWEEP_ID: sweep_id, layout.SPACE: space.name, layout.SPACE_KIND: space.kind,
            layout.METRIC: space.metric, layout.MODE: space.mode, layout.GIT_COMMIT: _git_commit(),
            layout.VERSION: __version__, layout.DATASET: job.data.dataset,
        })
        from kdray.config import to_yaml

        tracker.log_text(parent, to_yaml(job), layout.JOB_ARTIFACT)
        tracker.log_text(parent, space.source, layout.SPACE_ARTIFACT)
        state = {"sweep_id": sweep_id, "parent_run_id": parent, "tracking_uri": uri, "experiment": experiment,
                 "job_data": data, "space_path": str(Path(request.space_path).resolve()),
                 "num_samples": space.num_samples}
        (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    else:
        tracker.client.update_run(state["parent_run_id"], status="RUNNING")
    sweep_id, parent = state["sweep_id"], state["parent_run_id"]
    say(f"sweep {sweep_id}: {space.trial_count} trial(s) of space {space.name!r}, folder {sweep_dir}")

    # The teacher runs alone, before any trial: it takes the job's own resources (the space's overrides size the
    # trials that run side by side), so it is the same teacher `python -m kdray.teacher --job J` trains.
    teacher_job = job_from_dict(data)
    teacher = teacher_job.teacher.checkpoint
    if _needs_teacher(data, space) and not (teacher and Path(teacher).is_file()):
        if not request.train_teacher:
            raise ConfigError(f"teacher.checkpoint: {teacher} does not exist; train it first (python -m kdray.teacher "
                              f"--job {request.job_path}) or pass --train-teacher")
        check_fits(teacher_job, cluster, nodes)
        _train_teacher(teacher_job, tracker, uri, sweep_dir, say)
    elif _needs_teacher(data, space):
        _record_teacher(teacher_job, tracker, say)

    from kdray.orchestration.trial import MlflowStatusCallback, SweepContext, run_trial

    context = SweepContext(sweep_id, parent, uri, experiment, str(sweep_dir), data)
    trainable = tune.with_resources(partial(run_trial, space=space, sweep=context), {"cpu": TRIAL_CPU})
    limit = concurrency(job, cluster, space.max_concurrent_trials)
    if request.resume:
        tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(space),
            tune_config=_tune_config(space, job, limit),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir),
                callbacks=[MlflowStatusCallback(uri, experiment, sweep_id)],
                # Train restarts dead workers from their checkpoint; a trial that failed stays failed
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
    say(f"running {space.trial_count} trial(s), at most {limit} at a time")
    grid = tuner.fit()
    trials = _summaries(grid, space, data)
    complete = grid.num_terminated + grid.num_errors >= space.trial_count
    report = None
    if complete:
        from kdray.reporting import write_report

        report = write_report(uri, experiment, sweep_id, sweep_dir / "report", formats=("md", "tex", "csv", "parquet"))
        tracker.end_run(parent, "FINISHED")
    else:  # interrupted (Ctrl+C): Tune saved its state; the runs stay RUNNING until --resume continues them
        say(f"sweep interrupted: resume it with python -m kdray.sweep --resume {sweep_dir}")
    return SweepOutcome(sweep_id, sweep_dir, uri, experiment, parent, trials, time.perf_counter() - t0, complete,
                        report.markdown if report is not None else None)


def _load_state(request: SweepRequest) -> tuple[dict[str, Any], Path]:
    if request.resume == "latest":
        data, _, _ = prepare(request)
        job = job_from_dict(data)
        sweep_dir = _latest_sweep(Path(job.run.output_dir) / job.name / "sweeps")
    else:
        sweep_dir = Path(request.resume).resolve()
    file = sweep_dir / STATE_FILE
    if not file.is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a kdray sweep folder (no {STATE_FILE})")
    return json.loads(file.read_text()), sweep_dir


def _start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(log_to_driver=False)


def _param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    if space.kind == "ablation":
        rows = [name for name, _ in space.rows]
        return {ROW_KEY: tune.grid_search(rows), SEED_KEY: tune.grid_search(list(space.seeds))}
    return {}


def _tune_config(space: SearchSpace, job: Job, limit: int):
    from ray import tune

    if space.kind == "ablation":
        return tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=1, max_concurrent_trials=limit)
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch(space=space.define_by_run(), metric=space.metric, mode=space.mode, seed=space.seed,
                          points_to_evaluate=space.points_to_evaluate or None)
    scheduler = None
    if space.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = min(space.scheduler.grace_period * job.optim.eval_interval, job.optim.iterations)
        # the reported iteration, not Tune's training_iteration, which restarts at 1 after a restore
        scheduler = ASHAScheduler(time_attr="iteration", max_t=job.optim.iterations, grace_period=grace,
                                  reduction_factor=space.scheduler.reduction_factor)
    return tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search, scheduler=scheduler,
                           num_samples=space.num_samples, max_concurrent_trials=limit)


def _train_teacher(job: Job, tracker: Tracker, uri: str, sweep_dir: Path, say) -> None:
    from kdray.config import flatten, to_dict
    from kdray.models import build_model
    from kdray.orchestration.workers import fit

    model = build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    run_id = tracker.start_run(f"teacher-{job.teacher.arch}", _teacher_tags(job, params_m))
    tracker.log_params(run_id, flatten(to_dict(job)))
    say(f"training the teacher {job.teacher.arch} (width {job.teacher.width:g}) -> {job.teacher.checkpoint}")
    try:
        fit(job, role="teacher", run_id=run_id, tracking_uri=uri, name="teacher", storage_path=str(sweep_dir))
    except Exception as err:
        tracker.set_tags(run_id, {layout.FAILURE: str(err).strip().splitlines()[-1][:5000]})
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    if not Path(job.teacher.checkpoint).is_file():
        raise ResourceError(f"the teacher run ended without writing {job.teacher.checkpoint}")


def _teacher_tags(job: Job, params_m: float) -> dict[str, str]:
    from kdray.data import class_names

    return {layout.KIND: "teacher", layout.TEACHER_ARCH: layout.arch_label(job.teacher.arch, job.teacher.width),
            layout.PARAMS_M: f"{params_m:.4f}",
            layout.DATASET: job.data.dataset, layout.SEED: str(job.run.seed),
            layout.TEACHER_CHECKPOINT: str(job.teacher.checkpoint), layout.CLASSES: json.dumps(class_names(job.data))}


def _evaluate_teacher(job: Job) -> tuple[dict[str, float], float]:
    """The teacher's val metrics (as the engine reports them, at step 0) and its size in millions."""
    import torch

    from kdray.data import build_dataset, class_names
    from kdray.engine import RankContext, evaluate, load_teacher
    from kdray.engine.evaluate import evaluation_loader

    if job.run.threads:  # a Ray task starts with one intra-op thread per CPU it asked for
        torch.set_num_threads(job.run.threads)
    device = torch.device("cuda" if job.run.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
    teacher = load_teacher(job, device)
    ctx = RankContext(device=device)
    loader = evaluation_loader(build_dataset(job.data, "val"), job.data.eval_batch_size, ctx)
    result = evaluate(teacher, loader, job.data.num_classes, job.data.ignore_index, ctx)
    metrics = {layout.VAL_MIOU: result["miou"], layout.VAL_PIXEL_ACC: result["pixel_acc"]}
    metrics.update({layout.VAL_IOU_PREFIX + n: v for n, v in zip(class_names(job.data), result["iou"])})
    return metrics, sum(p.numel() for p in teacher.parameters()) / 1e6


def _record_teacher(job: Job, tracker: Tracker, say) -> None:
    """Give the experiment a teacher run for this checkpoint (the tables' top row), scoring it once if needed.

    The scoring runs as a Ray task with one worker's resources, so on a cluster it lands on a GPU node.
    """
    import ray

    if tracker.find_run(**{layout.KIND: "teacher", layout.TEACHER_CHECKPOINT: str(job.teacher.checkpoint)}):
        return
    say(f"scoring the teacher {job.teacher.checkpoint} on the val split for the report's teacher row")
    task = ray.remote(num_cpus=job.run.cpus_per_worker, num_gpus=job.run.gpus_per_worker)(_evaluate_teacher)
    metrics, params_m = ray.get(task.remote(job))
    run_id = tracker.start_run(f"teacher-{job.teacher.arch}", _teacher_tags(job, params_m))
    tracker.run_logger(run_id).log_metrics(metrics, 0)
    tracker.end_run(run_id, "FINISHED")


def _summaries(grid, space: SearchSpace, job_data: dict[str, Any]) -> list[TrialSummary]:
    out = []
    for result in grid:
        config = result.config or {}
        metrics = result.metrics or {}
        if space.kind == "ablation" and ROW_KEY not in config:  # never started (an interrupted sweep)
            continue
        history = result.metrics_dataframe
        series = history[space.metric].dropna().tolist() if history is not None and space.metric in history else []
        last = series[-1] if series else float("nan")
        best = (max(series) if space.mode == "max" else min(series)) if series else float("nan")
        done, total = metrics.get("iteration", 0), metrics.get("iterations_total", 0)
        if result.error is not None:
            status = "failed: " + str(result.error).strip().splitlines()[-1][:200]
        elif total and done < total:
            status = "stopped early"
        else:
            status = "finished"
        label = config.get(ROW_KEY) or method_label(job_from_dict(job_data, space.trial_overrides(config)).losses)
        params = {k: v for k, v in config.items() if k not in (ROW_KEY,)}
        out.append(TrialSummary(metrics.get("trial_id", "?"), label, int(config.get(SEED_KEY, 0)), params,
                                last, best, int(done), status))
    sign = -1 if space.mode == "max" else 1
    out.sort(key=lambda t: (math.isnan(t.best), sign * (t.best if not math.isnan(t.best) else 0)))
    return out


def summary_table(outcome: SweepOutcome, metric: str = "val/miou") -> str:
    """The results, best first, as a Markdown table."""
    keys = sorted({k for t in outcome.trials for k in t.params if k != SEED_KEY})
    head = ["rank", "trial", "row / method", "seed", *keys, f"best {metric}", f"last {metric}", "iteration", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(outcome.trials, 1):
        cells = [str(i), t.trial_id, t.label, str(t.seed), *(_fmt(t.params.get(k, "")) for k in keys),
                 _pct(t.best), _pct(t.last), str(t.iteration), t.status]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"
