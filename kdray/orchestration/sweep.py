"""A sweep: Ray Tune runs the space's trials (Optuna samples them, ASHA stops weak ones; or every ablation
row x seed), each trial a Ray Train run, every trial an MLflow child run of the sweep's parent run.

The sweep's own folder (`<run.output_dir>/<job>/sweeps/sweep-<id>/`) holds Tune's experiment state and
`kdray_sweep.json` (the job, space and MLflow ids), so `--resume` restores it with nothing else given.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kdray import __version__
from kdray.config import AUTO, Job, apply_overrides, job_from_dict, parse_override, read_yaml, to_dict, to_yaml
from kdray.engine.inputs import check_teacher_training, check_weights, open_splits
from kdray.errors import CheckpointError, ConfigError, DataError, ResourceError
from kdray.losses.objective import method_label
from kdray.metrics import iou_metric_key
from kdray.orchestration import layout
from kdray.orchestration.progress import (
    SweepProgress,
    TeacherProgress,
    TrialLabel,
    echo,
    quiet_ray_output,
    tune_verbosity,
)
from kdray.orchestration.resources import TRIAL_CPU, check_fits, concurrency, local_resources, per_trial
from kdray.orchestration.space import ROW_KEY, SEED_KEY, Dimension, SearchSpace, load_space, plan_lines, probe_values
from kdray.orchestration.tracking import Tracker, resolve_tracking_uri

STATE_FILE = "kdray_sweep.json"
SPACE_COPY = "space"  # the sweep folder's copy of its space file: what --resume runs, and checks the file against

# What a trial can end as, in the summary table. The sweep's exit code (`SweepOutcome.exit_code`, listed in
# `kdray sweep --help`) is 0 only when every trial finished or was stopped early, 130 when interrupted, else 1.
FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED, NOT_STARTED = ("finished", "stopped early", "failed", "interrupted",
                                                             "not started")



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
    verbose: bool = False  # show Ray's and Tune's own output


@dataclass
class TrialSummary:
    trial_id: str
    label: str
    seed: int
    params: dict[str, Any]
    last: float
    best: float
    iteration: int
    status: str  # finished | stopped early | failed: <reason> | interrupted | not started

    @property
    def ok(self) -> bool:
        return self.status in (FINISHED, STOPPED_EARLY)


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    trials: list[TrialSummary]
    wall_s: float
    interrupted: bool = False
    report_markdown: str | None = None  # the tables of kdray.report, also logged on the sweep's run
    never_created: int = 0  # trials of the space that Tune had not even created when the sweep stopped

    @property
    def complete(self) -> bool:
        """The sweep ran to its end (every trial ended, one way or another)."""
        return not self.interrupted

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 0 if all(t.ok for t in self.trials) and not self.never_created else 1

    def counts(self) -> str:
        """`"3 finished, 1 stopped early, 1 failed"`: every status that occurs, in a fixed order."""
        order = (FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED, NOT_STARTED)
        tally = {s: sum(t.status.split(":")[0] == s for t in self.trials) for s in order}
        tally[NOT_STARTED] += self.never_created
        return ", ".join(f"{n} {s}" for s, n in tally.items() if n)


SMOKE = {"optim.iterations": 4, "optim.eval_interval": 2, "optim.log_interval": 2}
SMOKE_SYNTHETIC = {"data.synthetic.train_length": 64, "data.synthetic.val_length": 16, "teacher.iterations": 4}
RESOURCE_KEYS = ("run.workers", "run.cpus_per_worker", "run.gpus_per_worker")


def prepare(request: SweepRequest) -> tuple[dict[str, Any], Job, SearchSpace]:
    """Job data with overrides, the validated job, the validated space: everything checked, nothing run."""
    data = read_yaml(request.job_path)
    data.setdefault("name", Path(request.job_path).stem)
    user = dict(parse_override(o) for o in request.overrides)
    overrides = dict(user)
    smoke: dict[str, Any] = {}
    if request.smoke_test:
        job = job_from_dict(data, overrides)
        smoke = {**SMOKE, **(SMOKE_SYNTHETIC if job.data.dataset == "synthetic" else {})}
        overrides = {**smoke, **overrides}
        teacher = job.teacher.checkpoint
        # never cache a 4-iteration teacher as the real one (an `auto` teacher has its own key for it)
        if teacher and _named_teacher(data, overrides) != AUTO and not Path(teacher).is_file():
            overrides.setdefault("teacher.checkpoint", str(Path(job.run.output_dir) / job.name / "smoke-teacher.pt"))
    # Resolved once, here: paths become absolute against the directory the sweep runs in, because trials
    # rebuild the job inside Tune's own working directories.
    data = to_dict(job_from_dict(apply_overrides(data, overrides)))
    space = load_space(request.space_path, job_from_dict(data), data)
    refuse_shadowed_overrides(user, space, request.space_path)
    if request.smoke_test:
        _shrink(space, smoke)
    return data, job_from_dict(data, space.overrides), space  # the job as every trial starts from it


def refuse_shadowed_overrides(overrides: dict[str, Any], space: SearchSpace, space_path: str) -> None:
    """A command-line override of a key the space sets would be silently replaced in every trial: refuse it."""
    owners: dict[str, str] = {}
    for name, settings in space.rows:
        owners.update({key: f"sets it in row {name!r}" for key in settings})
    if space.kind == "ablation":
        owners[SEED_KEY] = f"runs every seed of seeds: {list(space.seeds)}"
    for d in space.dimensions:
        fixed = d.kind == "fixed"
        owners[d.key] = "fixes it in its space: section" if fixed else f"searches it ({d.kind} {list(d.args)})"
    owners.update({key: "fixes it in its overrides: section" for key in space.overrides})
    for key, value in overrides.items():
        if key in owners:
            raise ConfigError(f"{key}={value!r}: the space {space_path} {owners[key]}, so this override would be "
                              "ignored; change the value in the space file (or a copy of it) instead")


def _shrink(space: SearchSpace, smoke: dict[str, Any]) -> None:
    """--smoke-test: the few iterations win over what the space fixes; at most two samples of a search."""
    space.overrides.update({k: v for k, v in smoke.items() if k in space.overrides})
    space.rows = tuple((name, {**settings, **{k: v for k, v in smoke.items() if k in settings}})
                       for name, settings in space.rows)
    if space.kind == "search":
        space.num_samples = min(space.num_samples, 2)


def trial_jobs(space: SearchSpace, data: dict[str, Any]) -> list[tuple[str, Job]]:
    """Every kind of trial job the space can produce, each with where it comes from (for error messages).

    Ablation: one per row. Search: the base (overrides and fixed keys); every combination of the ends of the
    searched resource keys (what a trial asks of the cluster is their product); every other searched key at
    each end of its range or each of its choices, one at a time (what data, weights and losses a trial uses).
    """
    if space.kind == "ablation":
        return [(f"row {name!r}", job_from_dict(data, {**space.overrides, **settings}))
                for name, settings in space.rows]
    base = {**space.overrides, **{d.key: d.args[0] for d in space.dimensions
                                  if d.kind == "fixed" and d.condition is None}}
    jobs = [("the space's fixed settings", job_from_dict(data, base))]
    searched = [d for d in space.dimensions if d.kind != "fixed"]
    resource = [d for d in searched if d.key in RESOURCE_KEYS]
    for combo in itertools.product(*(probe_values(d) for d in resource)) if resource else ():
        settings = {d.key: v for d, v in zip(resource, combo)}
        jobs.append((", ".join(f"space {k}={v!r}" for k, v in settings.items()),
                     job_from_dict(data, {**base, **_conditions(resource), **settings})))
    for d in searched:
        if d.key not in RESOURCE_KEYS:
            jobs += [(f"space {d.key}={v!r}", job_from_dict(data, {**base, **_conditions([d]), d.key: v}))
                     for v in probe_values(d)]
    return jobs


def _conditions(dimensions: list[Dimension]) -> dict[str, Any]:
    return {d.condition[0]: d.condition[1] for d in dimensions if d.condition is not None}


def check_inputs(jobs: list[tuple[str, Job]], train_teacher: bool) -> list[str]:
    """The data-tree and weight checks of `kdray.train --dry-run`, once for each distinct data, teacher and
    student setting among `jobs`; DataError/CheckpointError on the first problem, naming where it comes from
    when the space (not the job) makes it. Returns the weight notes, without repeats."""
    seen_data, seen_weights, notes = set(), set(), []
    for where, job in jobs:
        d = to_dict(job)
        data_key = json.dumps(d["data"], sort_keys=True)
        weights_key = json.dumps([d["teacher"], d["student"], d["data"]["num_classes"], d["data"]["normalize"],
                                  job.distills], sort_keys=True)
        try:
            if data_key not in seen_data:
                seen_data.add(data_key)
                open_splits(job)
            if weights_key not in seen_weights:
                seen_weights.add(weights_key)
                notes += [n for n in check_weights(job, teacher_will_be_trained=train_teacher) if n not in notes]
        except (DataError, CheckpointError) as err:
            if len(jobs) == 1 or where == jobs[0][0]:
                raise
            raise type(err)(f"{where}: {err}") from None
    return notes


def check_resources(jobs: list[tuple[str, Job]], cluster: dict[str, float], nodes: list[dict[str, float]],
                    space_path: str) -> None:
    """ResourceError (exit code 3) naming the space and the row or key of the first trial that cannot run."""
    for where, job in jobs:
        try:
            check_fits(job, cluster, nodes)
        except ResourceError as err:
            raise ResourceError(f"{Path(space_path).name}: {where}: {err}") from None


def largest(jobs: list[tuple[str, Job]]) -> Job:
    """The trial job that asks the most of the cluster (GPUs first, then CPUs): it sets how many run at once."""
    return max((job for _, job in jobs), key=lambda j: (per_trial(j)["GPU"], per_trial(j)["CPU"]))


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
    """The newest sweep folder under `root` that did not run to its end (interrupted, or stopped by an error)."""
    sweeps = sorted(p for p in root.glob("sweep-*") if (p / STATE_FILE).is_file())
    open_ = [p for p in sweeps if not json.loads((p / STATE_FILE).read_text()).get("ended")]
    if not open_:
        ended = f" ({len(sweeps)} sweep(s) there ran to their end)" if sweeps else ""
        raise ConfigError(f"--resume: no interrupted sweep to resume under {root}{ended}")
    return open_[-1]


def _mark_ended(sweep_dir: Path, counts: str) -> None:
    """Record in the sweep's state file that it ran to its end: --resume continues only interrupted sweeps."""
    file = sweep_dir / STATE_FILE
    file.write_text(json.dumps({**json.loads(file.read_text()), "ended": counts}, indent=1))


def dry_run(request: SweepRequest) -> list[str]:
    """Validate everything a sweep would check before starting (job, space, overrides, data tree, weight files,
    the MLflow store, and every trial configuration against this machine when no cluster is named); the plan,
    as lines. With `resume`: the plan of the interrupted sweep as it would continue."""
    state, sweep_dir = _load_state(request) if request.resume else (None, None)
    plan = _plan(request, state, sweep_dir)
    job, space, jobs, teacher_job = plan.job, plan.space, plan.jobs, plan.teacher_job
    check_store(plan.uri)
    local = not (request.address or os.environ.get("RAY_ADDRESS"))
    cluster = local_resources() if local else None
    lines = [f"resuming sweep {state['sweep_id']} from {sweep_dir}"] if state else []
    lines += [f"job {job.name}: student {job.student.arch} (width {job.student.width:g}), teacher "
              f"{job.teacher.arch} (width {job.teacher.width:g}), {job.optim.iterations} iterations, "
              f"global batch {job.data.batch_size} = {job.run.workers} worker(s) x "
              f"{job.data.batch_size // job.run.workers}"]
    lines += plan_lines(space, job)
    asks = {}
    for where, trial_job in jobs:
        r = trial_job.run
        asks.setdefault(f"{r.workers} worker(s) x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU), "
                        f"{'nccl' if r.gpus_per_worker else 'gloo'}", where)
    if len(asks) == 1:
        lines.append(f"resources per trial: {next(iter(asks))}")
    else:
        lines.append("resources per trial, by what the space sets:")
        lines += [f"  {where}: {what}" for what, where in asks.items()]
    if cluster is not None:
        extra = [("the teacher's training", teacher_job)] if plan.train_teacher else []
        check_resources(jobs + extra, cluster, [cluster], plan.space_path)
        lines.append(f"this machine: {cluster['CPU']:g} CPU, {cluster['GPU']:g} GPU -> every trial fits; "
                     f"{concurrency(largest(jobs), cluster, space.max_concurrent_trials)} trial(s) at once")
    else:
        lines.append("cluster resources are checked when the sweep connects (--address / RAY_ADDRESS)")
    if plan.needs_teacher:
        teacher = teacher_job.teacher.checkpoint
        how = "missing: the sweep trains it first" if plan.train_teacher else "present, checked"
        lines.append(f"teacher weights: {teacher} ({how})")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"MLflow store: {plan.uri}; sweep folders under {Path(job.run.output_dir) / job.name / 'sweeps'}")
    lines.append("dry run: job, space, data tree, weight files and store are valid; nothing was started")
    return lines


def _exists(path: str | None) -> bool:
    return bool(path) and Path(path).is_file()


@dataclass
class _Plan:
    """A sweep as checked before anything starts: what every later step reads."""

    data: dict[str, Any]  # the job data every trial starts from (overrides applied, paths absolute)
    job: Job  # the job with the space's overrides
    space: SearchSpace
    space_path: str
    jobs: list[tuple[str, Job]]  # every kind of trial job the space can produce (trial_jobs)
    teacher_job: Job  # the job without the space's overrides: the teacher's own training
    needs_teacher: bool
    train_teacher: bool  # the teacher file is missing and the sweep trains it first
    uri: str
    experiment: str
    notes: list[str]


def _plan(request: SweepRequest, state: dict[str, Any] | None, sweep_dir: Path | None) -> _Plan:
    if state is not None:
        data = state["job_data"]
        space = load_space(_resumed_space_file(state, sweep_dir), job_from_dict(data), data)
        if state.get("num_samples"):
            space.num_samples = state["num_samples"]
        job, space_path = job_from_dict(data, space.overrides), state["space_path"]
    else:
        data, job, space = prepare(request)
        space_path = request.space_path
    jobs = trial_jobs(space, data)
    teacher_job = job_from_dict(data)
    needs_teacher = _needs_teacher(data, space)
    may_train = request.train_teacher or (state or {}).get("train_teacher") or _auto_teacher(request, state)
    teacher = teacher_job.teacher.checkpoint
    if not may_train and not _exists(teacher) and any(j.distills for _, j in jobs):
        raise CheckpointError(f"teacher.checkpoint: {teacher}: no such file; train it first (kdray teacher --job "
                              f"{request.job_path}), pass --train-teacher, or name another file")
    train_teacher = needs_teacher and may_train and not _exists(teacher)
    teacher_training = [("the teacher's training", teacher_job)] if train_teacher else []
    notes = check_inputs(jobs + teacher_training, train_teacher=may_train)
    if train_teacher:
        notes += check_teacher_training(teacher_job)
    uri = resolve_tracking_uri(request.tracking_uri or (state or {}).get("tracking_uri") or job.tracking.uri)
    return _Plan(data, job, space, space_path, jobs, teacher_job, needs_teacher, train_teacher, uri,
                 job.tracking.experiment or job.name, notes)


def _named_teacher(data: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """`teacher.checkpoint` as the job file and its overrides write it, before paths are resolved."""
    return overrides.get("teacher.checkpoint", (data.get("teacher") or {}).get("checkpoint"))


def _auto_teacher(request: SweepRequest, state: dict[str, Any] | None) -> bool:
    """The job leaves its teacher to kdray (`teacher.checkpoint: auto`): the sweep may train it."""
    if state is not None:
        return False
    overrides = dict(parse_override(o) for o in request.overrides)
    return _named_teacher(read_yaml(request.job_path), overrides) == AUTO


def check_store(uri: str) -> None:
    """A tracking server that does not answer is a ConfigError now, not minutes of retries after Ray started."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10) as answer:
            answer.read()
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"tracking URI {uri}: no MLflow server answers there ({reason}); start it, or pass "
                          "another --tracking-uri") from None


def run_sweep(request: SweepRequest, say=echo) -> SweepOutcome:
    """Run (or resume) a sweep to the end and return its trials, best first.

    Everything that can be checked without Ray is checked before Ray starts and before anything is written to
    MLflow: the job, the space, the overrides, the data tree, the weight files, and (on an embedded Ray) every
    trial configuration against this machine. Whatever way the sweep ends, no MLflow run it opened is left
    RUNNING: trials that were cut short end KILLED, the sweep's own run FINISHED, FAILED (a trial failed) or
    KILLED (interrupted; `--resume` reopens them).
    """
    t0 = time.perf_counter()
    state, sweep_dir = _load_state(request) if request.resume else (None, None)
    plan = _plan(request, state, sweep_dir)
    check_store(plan.uri)
    resource_jobs = plan.jobs + ([("the teacher's training", plan.teacher_job)] if plan.train_teacher else [])
    if not (request.address or os.environ.get("RAY_ADDRESS")):
        local = local_resources()
        check_resources(resource_jobs, local, [local], plan.space_path)  # before an embedded Ray starts

    import ray

    say(f"MLflow store: {plan.uri} (experiment {plan.experiment!r}); open it with: "
        f"mlflow ui --backend-store-uri {plan.uri}")
    if plan.needs_teacher:
        say(f"teacher: {plan.teacher_job.teacher.checkpoint}" + (" (missing: trained first)"
                                                                 if plan.train_teacher else ""))
    for note in plan.notes:
        say(f"note: {note}")
    _start_ray(request.address, request.verbose)
    cluster = ray.cluster_resources()
    check_resources(resource_jobs, cluster, [n["Resources"] for n in ray.nodes() if n.get("Alive")],
                    plan.space_path)
    tracker = Tracker(plan.uri, plan.experiment)
    if state is None:
        state, sweep_dir = _start_sweep(request, plan, tracker)
    else:  # reopened: how it ended last time no longer holds
        tracker.client.update_run(state["parent_run_id"], status="RUNNING")
        tracker.clear_tag(state["parent_run_id"], layout.FAILURE)
    sweep_id, parent = state["sweep_id"], state["parent_run_id"]
    say(f"sweep {sweep_id}: {plan.space.trial_count} trial(s) of space {plan.space.name!r}; folder {sweep_dir}")
    try:
        outcome = _run_trials(request, plan, tracker, sweep_id, sweep_dir, parent, cluster, say)
    except BaseException as err:  # Ctrl+C outside Tune's own handling, SIGTERM, or a bug: close what it opened
        # Ray's core answers SIGTERM with sys.exit(1): like Ctrl+C, an interruption (KILLED, resumable)
        stopped = isinstance(err, (KeyboardInterrupt, SystemExit))
        _close_open_runs(tracker, sweep_id, parent, stopped, "terminated" if isinstance(err, SystemExit)
                         else _reason(err))
        raise
    outcome.wall_s = time.perf_counter() - t0
    return outcome


def _start_sweep(request: SweepRequest, plan: _Plan, tracker: Tracker) -> tuple[dict[str, Any], Path]:
    """The sweep's folder (with a copy of its space and its state file) and its MLflow run: the state."""
    job, space = plan.job, plan.space
    sweep_id = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(job.run.output_dir) / job.name / "sweeps" / f"sweep-{sweep_id}"
    sweep_dir.mkdir(parents=True, exist_ok=False)
    copy = sweep_dir / SPACE_COPY / Path(plan.space_path).name
    copy.parent.mkdir()
    copy.write_text(space.source)
    tags = {layout.KIND: "sweep", layout.SWEEP_ID: sweep_id, layout.SPACE: space.name,
            layout.SPACE_KIND: space.kind, layout.METRIC: space.metric, layout.MODE: space.mode,
            layout.GIT_COMMIT: _git_commit(), layout.VERSION: __version__, layout.DATASET: job.data.dataset}
    if request.smoke_test:
        tags[layout.SMOKE_TEST] = "true"
    if plan.needs_teacher:  # the report's teacher row is this file's run, no other teacher of the experiment
        tags[layout.TEACHER_CHECKPOINT] = str(plan.teacher_job.teacher.checkpoint)
    tags[layout.TRIALS_PLANNED] = str(space.trial_count)
    parent = tracker.start_run(f"sweep-{sweep_id}", tags)
    state = {"sweep_id": sweep_id, "parent_run_id": parent, "tracking_uri": plan.uri, "experiment": plan.experiment,
             "job_data": plan.data, "space_path": str(Path(plan.space_path).resolve()), "space_file": str(copy),
             "space_sha256": _sha(space.source), "num_samples": space.num_samples,
             "train_teacher": plan.train_teacher}
    try:
        (sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        tracker.log_text(parent, to_yaml(job), layout.JOB_ARTIFACT)
        tracker.log_text(parent, space.source, layout.SPACE_ARTIFACT)
    except BaseException as err:
        tracker.set_tags(parent, {layout.FAILURE: _reason(err)[:5000]})
        tracker.end_run(parent, "FAILED")
        raise
    return state, sweep_dir


def _run_trials(request: SweepRequest, plan: _Plan, tracker: Tracker, sweep_id: str, sweep_dir: Path, parent: str,
                cluster: dict[str, float], say) -> SweepOutcome:
    from ray import tune

    space = plan.space
    if plan.train_teacher:
        _train_teacher(plan.teacher_job, tracker, plan.uri, sweep_dir, say, smoke=request.smoke_test)
    elif plan.needs_teacher and _exists(plan.teacher_job.teacher.checkpoint):
        _record_teacher(plan.teacher_job, tracker, say)

    from kdray.orchestration.trial import INTERRUPTED, InterruptWatch, MlflowStatusCallback, SweepContext, run_trial

    context = SweepContext(sweep_id, parent, plan.uri, plan.experiment, str(sweep_dir), plan.data)
    trainable = tune.with_resources(partial(run_trial, space=space, sweep=context), {"cpu": TRIAL_CPU})
    limit = concurrency(largest(plan.jobs), cluster, space.max_concurrent_trials)
    callbacks = [InterruptWatch(), MlflowStatusCallback(plan.uri, plan.experiment, sweep_id),
                 SweepProgress(space.trial_count, space.metric, space.mode, label=TrialLabel(space, plan.data),
                               say=say)]
    if request.resume:
        tuner = tune.Tuner.restore(str(sweep_dir / "tune"), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(space),
            tune_config=_tune_config(space, plan.job, limit),
            run_config=tune.RunConfig(
                name="tune", storage_path=str(sweep_dir), callbacks=callbacks,
                # Train restarts dead workers from their checkpoint; a trial that failed stays failed
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=tune_verbosity(request.verbose),
            ),
        )
    say(f"running {space.trial_count} trial(s), at most {limit} at a time")
    INTERRUPTED.clear()
    grid = tuner.fit()
    trials, interrupted = _summaries(grid, space, plan.data, tracker, sweep_id, INTERRUPTED.is_set())
    never_created = max(0, space.trial_count - len(trials))
    outcome = SweepOutcome(sweep_id, sweep_dir, plan.uri, plan.experiment, parent, trials, 0.0, interrupted,
                           never_created=never_created)
    if interrupted:  # Tune saved its state; --resume reopens the runs and continues
        _close_open_runs(tracker, sweep_id, parent, True, f"interrupted: {outcome.counts()}")
        say(f"sweep interrupted ({outcome.counts()}): resume it with python -m kdray.sweep --resume {sweep_dir}")
        return outcome
    from kdray.reporting import write_report

    _close_open_runs(tracker, sweep_id, None, False, "the sweep ended with this trial's run still open")
    _mark_ended(sweep_dir, outcome.counts())
    report = write_report(plan.uri, plan.experiment, sweep_id, sweep_dir / "report",
                          formats=("md", "tex", "csv", "parquet"), log_artifacts=True)
    outcome.report_markdown = report.markdown
    if outcome.exit_code:
        tracker.set_tags(parent, {layout.FAILURE: outcome.counts()})
        tracker.end_run(parent, "FAILED")
    else:
        tracker.clear_tag(parent, layout.FAILURE)
        tracker.end_run(parent, "FINISHED")
    return outcome


def _close_open_runs(tracker: Tracker, sweep_id: str, parent: str | None, interrupted: bool, reason: str) -> None:
    """End every trial run of the sweep still RUNNING (and the sweep's run, when given): KILLED when the sweep
    was interrupted (resumable), FAILED otherwise, with the reason."""
    status = "KILLED" if interrupted else "FAILED"
    for run_id in tracker.running_runs(sweep_id):
        if not interrupted:
            tracker.set_tags(run_id, {layout.FAILURE: reason[:5000]})
        tracker.end_run(run_id, status)
    if parent is not None:
        tracker.set_tags(parent, {layout.FAILURE: reason[:5000]})
        tracker.end_run(parent, status)


def _reason(err: BaseException) -> str:
    """The last line of an error's text (a worker's own exception, under Ray's wrapping), without the dotted
    class path Ray puts before it (`kdray.errors.DataError: ...` -> `DataError: ...`)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", last)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _load_state(request: SweepRequest) -> tuple[dict[str, Any], Path]:
    if request.overrides:
        raise ConfigError(f"--resume continues a sweep exactly as it started; overrides are refused here (got "
                          f"{' '.join(request.overrides)}): start a new sweep to change the job")
    if request.resume == "latest":
        data = read_yaml(request.job_path)
        data.setdefault("name", Path(request.job_path).stem)
        job = job_from_dict(data)
        sweep_dir = _latest_sweep(Path(job.run.output_dir) / job.name / "sweeps")
    else:
        sweep_dir = Path(request.resume).resolve()
    file = sweep_dir / STATE_FILE
    if not file.is_file():
        raise ConfigError(f"--resume: {sweep_dir} is not a kdray sweep folder (no {STATE_FILE})")
    state = json.loads(file.read_text())
    if state.get("ended"):
        raise ConfigError(f"--resume: sweep {state['sweep_id']} ran to its end ({state['ended']}); --resume "
                          "continues an interrupted sweep: start a new sweep to run trials again")
    return state, sweep_dir


def _resumed_space_file(state: dict[str, Any], sweep_dir: Path) -> str:
    """The space the sweep started with (its copy in the sweep folder); refused when the space file the sweep
    was started from has changed since, because Tune's saved trials name rows and keys of the old one."""
    original = Path(state["space_path"])
    copy = state.get("space_file")
    if not copy or not Path(copy).is_file():  # a sweep from before kdray kept a copy: the file as it is now
        return str(original)
    started = state.get("space_sha256") or _sha(Path(copy).read_text())
    if original.is_file():
        now = _sha(original.read_text())
        if now != started:
            raise ConfigError(f"--resume: the space file {original} changed since sweep {state['sweep_id']} started "
                              f"(sha256 {started[:12]} then, {now[:12]} now); a sweep resumes the space it started "
                              f"with: restore the file (a copy is in {copy}) or start a new sweep")
    return copy


def _start_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = quiet_ray_output(verbose, local=not address)  # Ray's, Tune's and MLflow's start-up notices
    if address:
        ray.init(address=address, log_to_driver=False, **kwargs)
    else:
        ray.init(log_to_driver=False, **kwargs)


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


def _train_teacher(job: Job, tracker: Tracker, uri: str, sweep_dir: Path, say, smoke: bool = False) -> None:
    from kdray.config import flatten, to_dict
    from kdray.models import build_model
    from kdray.orchestration.workers import fit

    model = build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    tags = _teacher_tags(job, params_m)
    if smoke:
        tags[layout.SMOKE_TEST] = "true"
    run_id = tracker.start_run(f"teacher-{job.teacher.arch}", tags)
    tracker.log_params(run_id, flatten(to_dict(job)))
    say(f"training the teacher {job.teacher.arch} (width {job.teacher.width:g}) -> {job.teacher.checkpoint}")
    try:
        with TeacherProgress(job.teacher.iterations or job.optim.iterations, say,
                             name=f"teacher {job.teacher.arch}") as progress:
            fit(job, role="teacher", run_id=run_id, tracking_uri=uri, name="teacher", storage_path=str(sweep_dir),
                callbacks=[progress.callback])
    except BaseException as err:  # Ctrl+C too: the teacher's run never stays RUNNING
        tracker.set_tags(run_id, {layout.FAILURE: _reason(err)[:5000]})
        tracker.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
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
    metrics.update({iou_metric_key(n): v for n, v in zip(class_names(job.data), result["iou"])})
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
    try:
        tracker.run_logger(run_id).log_metrics(metrics, 0)
    except BaseException as err:
        tracker.set_tags(run_id, {layout.FAILURE: _reason(err)[:5000]})
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")


def _summaries(grid, space: SearchSpace, job_data: dict[str, Any], tracker: Tracker, sweep_id: str,
               ctrl_c: bool = False) -> tuple[list[TrialSummary], bool]:
    """Each trial Tune created, best first, with what became of it; and whether the sweep was interrupted
    (`ctrl_c`, or a trial still pending, running or paused when `fit` returned).

    After Ctrl+C, Tune ends the running trials TERMINATED: a trial short of its iterations then counts as
    stopped early only if the scheduler said so first (its run carries STOPPED_EARLY), else as interrupted.
    """
    out, interrupted = [], ctrl_c
    for trial, result in zip(_tune_trials(grid), grid):
        config = trial.config or {}
        history = result.metrics_dataframe
        series = history[space.metric].dropna().tolist() if history is not None and space.metric in history else []
        last = series[-1] if series else float("nan")
        best = (max(series) if space.mode == "max" else min(series)) if series else float("nan")
        metrics = trial.last_result or {}
        done, total = int(metrics.get("iteration", 0)), int(metrics.get("iterations_total", 0))
        if trial.status == "ERROR":
            status = f"{FAILED}: {_reason(result.error) if result.error is not None else 'the trial failed'}"
        elif trial.status == "TERMINATED":
            run_id = tracker.find_run(**{layout.SWEEP_ID: sweep_id, layout.TRIAL_ID: trial.trial_id})
            if run_id is not None:  # a trial restored from its final checkpoint reports nothing new to Tune
                done = max(done, tracker.last_step(run_id, layout.VAL_MIOU))
            total = total or job_from_dict(job_data, space.trial_overrides(config)).optim.iterations
            scheduled = run_id is not None and tracker.tags(run_id).get(layout.STOPPED_EARLY) == "true"
            if done >= total:
                status = FINISHED
            elif ctrl_c and not scheduled:
                status = INTERRUPTED if done else NOT_STARTED
            elif not done:
                status = f"{FAILED}: it ended without reporting an evaluation"
            else:
                status = STOPPED_EARLY
        else:  # PENDING, RUNNING or PAUSED when fit returned: the sweep was interrupted
            interrupted = True
            status = INTERRUPTED if done or series else NOT_STARTED
        label = config.get(ROW_KEY) or _method(job_data, space, config)
        params = {k: v for k, v in config.items() if k != ROW_KEY}
        out.append(TrialSummary(trial.trial_id, label, int(config.get(SEED_KEY, 0)), params, last, best, done,
                                status))
    sign = -1 if space.mode == "max" else 1
    out.sort(key=lambda t: (math.isnan(t.best), sign * (t.best if not math.isnan(t.best) else 0)))
    return out, interrupted


def _tune_trials(grid) -> list:
    """Tune's Trial objects behind a ResultGrid, in the grid's order (their status is not on the Results)."""
    return list(grid._experiment_analysis.trials)


def _method(job_data: dict[str, Any], space: SearchSpace, config: dict[str, Any]) -> str:
    try:
        return method_label(job_from_dict(job_data, space.trial_overrides(config)).losses)
    except (ConfigError, KeyError):  # a config the space can no longer build: the trial failed on it
        return "?"


def summary_table(outcome: SweepOutcome, metric: str = "val/miou") -> str:
    """The results, best first, as a Markdown table; trials Tune never created are counted under it."""
    keys = sorted({k for t in outcome.trials for k in t.params if k != SEED_KEY})
    head = ["rank", "trial", "row / method", "seed", *keys, f"best {metric}", f"last {metric}", "iteration", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(outcome.trials, 1):
        cells = [str(i), t.trial_id, t.label, str(t.seed), *(_fmt(t.params.get(k, "")) for k in keys),
                 _pct(t.best), _pct(t.last), str(t.iteration), t.status]
        lines.append("| " + " | ".join(cells) + " |")
    if outcome.never_created:
        lines.append(f"\n{outcome.never_created} more trial(s) of the space never started.")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"
