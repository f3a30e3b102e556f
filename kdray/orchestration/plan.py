"""A sweep's plan, checked before anything starts: the job and space, every kind of trial job the space can
produce, their data trees, weight files and resources, the MLflow store; `dry_run` prints it.

The driver holds `Job` objects: the job file is read and built once (`prepare`), and every other job is that one
with a change (`kdray.config.override`).
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdray.config import AUTO, Job, job_from_dict, override, parse_override, read_yaml
from kdray.data.registry import dataset_spec
from kdray.data.tune_split import summarize_tune_split, tune_split_on
from kdray.engine.inputs import check_losses, check_teacher_training, check_weights, open_splits
from kdray.errors import CheckpointError, ConfigError, DataError, PreflightError, ResourceError
from kdray.orchestration.confirm import TUNE_SPLIT_OFF, add_baseline_row, ce_only_overrides
from kdray.orchestration.confirm import describe as describe_confirmation
from kdray.orchestration.resources import check_fits, concurrency, local_resources, per_trial
from kdray.orchestration.resume import load_state, resumed_space_file
from kdray.orchestration.tracking import resolve_tracking_uri
from kdray.space import (
    SEED_KEY,
    Confirm,
    Dimension,
    SearchSpace,
    check_scheduler,
    load_space,
    plan_lines,
    probe_values,
)

# A smoke test's overrides; each dataset adds its own (`DatasetSpec.smoke_overrides`: the synthetic one shrinks).
SMOKE = {"optim.iterations": 4, "optim.eval_interval": 2, "optim.log_interval": 2, "teacher.iterations": 4}
RESOURCE_KEYS = ("run.workers", "run.cpus_per_worker", "run.gpus_per_worker")
TEACHER_TRAINING = "the teacher's training"  # where a problem of the teacher's own job comes from


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
    study_storage: str | None = None  # a search's Optuna storage URL (default: sqlite in the sweep's folder)
    extend: int | None = None  # with resume: search this many more trials, then confirm the new best ones


def prepare(request: SweepRequest) -> tuple[Job, Job, SearchSpace]:
    """The job every trial starts from (overrides applied, paths absolute), that job with the space's overrides,
    and the validated space: everything checked, nothing run."""
    data = read_yaml(request.job_path)
    data.setdefault("name", Path(request.job_path).stem)
    user = dict(parse_override(o) for o in request.overrides)
    overrides = dict(user)
    smoke: dict[str, Any] = {}
    if request.smoke_test:
        job = job_from_dict(data, overrides)
        smoke = {**SMOKE, **dataset_spec(job.data.dataset).smoke_overrides}
        overrides = {**smoke, **overrides}
        teacher = job.teacher.checkpoint
        # never cache a 4-iteration teacher as the real one (an `auto` teacher has its own key for it)
        if teacher and _named_teacher(data, overrides) != AUTO and not Path(teacher).is_file():
            overrides.setdefault("teacher.checkpoint", str(Path(job.run.output_dir) / job.name / "smoke-teacher.pt"))
    # Built from the file's data, once: paths become absolute against the directory the sweep runs in (trials
    # rebuild the job inside Tune's own working directories), and an `auto` teacher resolves with the smoke
    # settings in place.
    base = job_from_dict(data, overrides)
    space = load_space(request.space_path, base)
    refuse_shadowed_overrides(user, space, request.space_path)
    if request.study_storage is not None:
        check_study_storage(request.study_storage, space, request.space_path)
    if request.smoke_test:
        _shrink(space, smoke)
    job = override(base, space.overrides)
    if not request.smoke_test:  # a smoke test cuts the iterations to check the pipeline, not to stop trials
        check_scheduler(space, job, Path(request.space_path).name)
    return base, job, space


def check_study_storage(url: str, space: SearchSpace, space_path: str) -> None:
    """--study-storage names a database URL, and the space searches (an ablation has no study): ConfigError."""
    if space.kind != "search":
        raise ConfigError(f"--study-storage {url}: the space {space_path} is an ablation (rows x seeds), which has "
                          "no Optuna study; leave the flag out")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(\+[A-Za-z0-9_]+)?://.*", url):  # dialect[+driver]://...
        raise ConfigError(f"--study-storage {url}: not a database URL; expected e.g. sqlite:////abs/path/optuna.db "
                          "or postgresql://user@host/db")


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
    if space.match is not None:  # matched: measured briefly, and no row past the smoke test's iterations
        space.match = replace(space.match, iterations=2, warmup=1)
    if space.kind == "search":
        space.num_samples = min(space.num_samples, 2)
        if space.confirm is not None:  # the pipeline checked end to end: one configuration, one seed
            space.confirm = Confirm(1, space.confirm.seeds[:1])


def trial_jobs(space: SearchSpace, base: Job) -> list[tuple[str, Job]]:
    """Every kind of trial job the space can produce from `base`, each with where it comes from (for errors).

    Ablation: one per row, in the space's order. Search: the base (overrides and fixed keys); every combination
    of the ends of the searched resource keys (what a trial asks of the cluster is their product); every other
    searched key at each end of its range or each of its choices, one at a time (what data, weights and losses a
    trial uses).
    """
    if space.kind == "ablation":
        return [(f"row {name!r}", override(base, {**space.overrides, **settings})) for name, settings in space.rows]
    fixed = {**space.overrides, **{d.key: d.args[0] for d in space.dimensions
                                   if d.kind == "fixed" and d.condition is None}}
    jobs = [("the space's fixed settings", override(base, fixed))]
    searched = [d for d in space.dimensions if d.kind != "fixed"]
    resource = [d for d in searched if d.key in RESOURCE_KEYS]
    for combo in itertools.product(*(probe_values(d) for d in resource)) if resource else ():
        settings = {d.key: v for d, v in zip(resource, combo)}
        jobs.append((", ".join(f"space {k}={v!r}" for k, v in settings.items()),
                     override(base, {**fixed, **_conditions(resource), **settings})))
    for d in searched:
        if d.key not in RESOURCE_KEYS:
            jobs += [(f"space {d.key}={v!r}", override(base, {**fixed, **_conditions([d]), d.key: v}))
                     for v in probe_values(d)]
    # after the search: the CE-only student, and the configurations again on the whole training split
    jobs.append(("the CE-only baseline", override(base, {**fixed, **ce_only_overrides(j for _, j in jobs)})))
    if getattr(getattr(jobs[0][1].data, "tune_split", None), "fraction", 0):
        jobs.append(("the confirmation stage (tuning split off)", override(jobs[0][1], {TUNE_SPLIT_OFF: 0.0})))
    return jobs


def _conditions(dimensions: list[Dimension]) -> dict[str, Any]:
    return {d.condition[0]: d.condition[1] for d in dimensions if d.condition is not None}


def check_inputs(jobs: list[tuple[str, Job]], train_teacher: bool) -> list[str]:
    """The data-tree, weight and loss pre-flight checks of `kdray.train --dry-run`, once for each distinct data,
    teacher/student and losses setting among `jobs`; DataError/CheckpointError/PreflightError on the first
    problem, naming where it comes from when the space (not the job) makes it. Returns the weight notes,
    without repeats."""
    seen_data: list[Any] = []
    seen_weights: list[tuple] = []  # config dataclasses compare by value
    seen_losses: list[tuple] = []
    notes: list[str] = []
    for where, job in jobs:
        weights = (job.teacher, job.student, job.data.num_classes, job.data.normalize, job.distills)
        losses = (job.losses, job.teacher, job.student, job.data.num_classes, job.data.crop, job.data.ignore_index,
                  job.data.batch_size // job.run.workers)
        try:
            if job.data not in seen_data:
                seen_data.append(job.data)
                open_splits(job)
            if weights not in seen_weights:
                seen_weights.append(weights)
                notes += [n for n in check_weights(job, teacher_will_be_trained=train_teacher) if n not in notes]
            if losses not in seen_losses:
                seen_losses.append(losses)
                check_losses(job)
        except (ConfigError, DataError, CheckpointError, PreflightError) as err:
            if len(jobs) == 1 or where == jobs[0][0]:
                raise
            # a fix the message suggests as an override is refused for a key the row sets: say where it lives
            row = where.startswith("row ")
            home = "; the row's settings come from the space file: change them there" if row else ""
            raise type(err)(f"{where}: {err}{home}") from None
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


def exists(path: str | None) -> bool:
    return bool(path) and Path(path).is_file()


@dataclass
class Plan:
    """A sweep as checked before anything starts: what every later step reads."""

    base: Job  # the job every trial starts from (overrides applied, paths absolute); the teacher's own job
    job: Job  # the job with the space's overrides
    space: SearchSpace
    space_path: str
    jobs: list[tuple[str, Job]]  # every kind of trial job the space can produce (trial_jobs)
    needs_teacher: bool
    train_teacher: bool  # the teacher file is missing and the sweep trains it first
    uri: str
    experiment: str
    notes: list[str]
    matched: list | None = None  # a matched ablation's rows (kdray.orchestration.matching), once measured

    @property
    def teacher_job(self) -> Job:
        """The job without the space's overrides: what the teacher's own training runs (on the whole training
        split: a tuning split is the student's search's)."""
        if getattr(getattr(self.base.data, "tune_split", None), "fraction", 0):
            return override(self.base, {TUNE_SPLIT_OFF: 0.0})
        return self.base

    def resource_jobs(self) -> list[tuple[str, Job]]:
        """The trial jobs, and the teacher's training when the sweep does it: what the cluster must fit."""
        return self.jobs + ([(TEACHER_TRAINING, self.base)] if self.train_teacher else [])


def make_plan(request: SweepRequest, state: dict[str, Any] | None, sweep_dir: Path | None) -> Plan:
    """The plan of a new sweep (`state` None) or of the interrupted one `state` describes."""
    if state is not None:
        base = job_from_dict(state["job_data"])  # the state file's JSON: rebuilt once
        space = load_space(resumed_space_file(state, sweep_dir), base)
        if state.get("num_samples"):
            space.num_samples = state["num_samples"]
        if "confirm_settings" in state:  # as the sweep started (a smoke test's are cut): extensions confirm alike
            kept = state["confirm_settings"]
            space.confirm = Confirm(kept["top_k"], tuple(kept["seeds"])) if kept else None
        job, space_path = override(base, space.overrides), state["space_path"]
    else:
        base, job, space = prepare(request)
        space_path = request.space_path
    if space.kind == "ablation" and tune_split_on(override(base, space.overrides).data):
        raise ConfigError(f"data.tune_split.fraction={override(base, space.overrides).data.tune_split.fraction}: "
                          f"{space_path} is an ablation, whose tables would then be scored on held-out training "
                          "images, not on val; the tuning split is for a search (its confirmation stage reports on "
                          "val): set data.tune_split.fraction=0 or leave it out")
    swept = [(f"space: {d.key}", d.key) for d in space.dimensions if d.key.startswith("sweep.")]
    swept += [(f"rows ({name}): set.{k}", k) for name, settings in space.rows for k in settings
              if k.startswith("sweep.")]
    if swept:
        where, key = swept[0]
        raise ConfigError(f"{space_path}: {where} is the sweep's own setting, not a trial's: set it in the space's "
                          f"overrides or on the command line ({key}=...)")
    searched = [d.key for d in space.dimensions if d.key.startswith("data.tune_split.") and d.kind != "fixed"]
    if searched:
        raise ConfigError(f"{space_path}: space: {searched[0]} is searched: the trials would each be scored on other "
                          "held-out images, and their scores would not compare; fix it in the space's overrides "
                          "(e.g. data.tune_split.fraction: 0.1)")
    baseline = add_baseline_row(space, base) if space.kind == "ablation" else None
    matched = None
    if space.match is not None and (state or {}).get("matched"):  # measured when the sweep started: kept
        from kdray.orchestration.matching import apply, from_state

        matched = from_state(state["matched"])
        apply(space, matched)
    jobs = trial_jobs(space, base)
    # an ablation needs the teacher when some row distils (trial_jobs gives the rows' jobs); a search may
    # switch on any loss
    needs_teacher = space.kind != "ablation" or any(j.distills for _, j in jobs)
    may_train = request.train_teacher or (state or {}).get("train_teacher") or _auto_teacher(request, state)
    teacher = base.teacher.checkpoint
    if not may_train and not exists(teacher) and any(j.distills for _, j in jobs):
        raise CheckpointError(f"teacher.checkpoint: {teacher}: no such file; train it first (kdray teacher --job "
                              f"{request.job_path}), pass --train-teacher, or name another file")
    train_teacher = needs_teacher and may_train and not exists(teacher)
    teacher_training = [(TEACHER_TRAINING, base)] if train_teacher else []
    notes = ([baseline] if baseline else []) + check_inputs(jobs + teacher_training, train_teacher=may_train)
    if train_teacher:
        notes += check_teacher_training(base)
    uri = resolve_tracking_uri(request.tracking_uri or (state or {}).get("tracking_uri") or job.tracking.uri)
    return Plan(base, job, space, space_path, jobs, needs_teacher, train_teacher, uri,
                job.tracking.experiment or job.name, notes, matched)


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
    """The sweep's store, usable (`kdray.store.check_store`): a tracking server that does not answer is a ConfigError
    now, not minutes of retries after Ray started; a SQLite file may not exist yet (the sweep creates it)."""
    from kdray.store import check_store as check

    check(uri)


def dry_run(request: SweepRequest) -> list[str]:
    """Validate everything a sweep would check before starting (job, space, overrides, data tree, weight files,
    the MLflow store, and every trial configuration against this machine when no cluster is named); the plan,
    as lines. With `resume`: the plan of the interrupted sweep as it would continue."""
    state, sweep_dir = load_state(request) if request.resume else (None, None)
    plan = make_plan(request, state, sweep_dir)
    job, space, jobs = plan.job, plan.space, plan.jobs
    check_store(plan.uri)
    local = not (request.address or os.environ.get("RAY_ADDRESS"))
    cluster = local_resources() if local else None
    lines = [f"resuming sweep {state['sweep_id']} from {sweep_dir}"] if state else []
    if request.extend is not None:
        lines.append(f"extending it by {request.extend} search trial(s) from its Optuna study, then confirming the "
                     "configurations that are then among the best and were not confirmed before")
    lines += [f"job {job.name}: student {job.student.arch} (width {job.student.width:g}), teacher "
              f"{job.teacher.arch} (width {job.teacher.width:g}), {job.optim.iterations} iterations, "
              f"global batch {job.data.batch_size} = {job.run.workers} worker(s) x "
              f"{job.data.batch_size // job.run.workers}"]
    lines += plan_lines(space, job)
    if space.pack_size > 1:
        from kdray.orchestration.pack import pack_lines

        lines += pack_lines(space)
    if tune_split_on(job.data):
        t, held = job.data.tune_split, summarize_tune_split(job.data)
        lines.append(f"  tuning split: {100 * t.fraction:g}% of the training split held out ({held.tune_size} "
                     f"images, seed {t.seed}, digest {held.digest[:12]}): the trials train on {held.train_size} "
                     "and are scored there, not on val")
    if job.optim.time_budget_s:
        most = "its matched iterations" if space.match is not None else f"{job.optim.iterations} iterations"
        lines.append(f"  time budget per trial: {job.optim.time_budget_s:g} s of training (optim.time_budget_s): a "
                     f"trial ends complete where it runs out, evaluated there, at most {most}")
    if state is not None:  # what is left of it: the stages it recorded, ended or not
        from kdray.orchestration.stages import stage_lines, sweep_stages

        lines.append("stages, in order:")
        lines += stage_lines(sweep_stages(state, space), space, sweep_dir)
    elif space.kind == "search":
        lines.append(f"  {describe_confirmation(space, job)}")
    if job.sweep.time_budget_s:
        lines.append(f"time budget of the sweep: {job.sweep.time_budget_s:g} s (sweep.time_budget_s): it then stops "
                     "as Ctrl+C stops it, exit code 4; --resume continues it")
    if space.match is not None:
        from kdray.orchestration.matching import match_lines

        if plan.matched is not None:
            lines += match_lines(space, plan.matched, "when the sweep started")
        else:
            m = space.match
            budget = f"{m.device_seconds:g} device-seconds each" if m.device_seconds is not None else \
                f"what row {m.row!r} takes for its {job.optim.iterations} iterations"
            lines.append(f"equal device-seconds (match): every row trains for {budget}; each row's seconds per "
                         f"iteration are measured when the sweep starts (median of {m.iterations} after "
                         f"{m.warmup} warm-up, on one worker's resources), its iterations follow from them")
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
        check_resources(plan.resource_jobs(), cluster, [cluster], plan.space_path)
        lines.append(f"this machine: {cluster['CPU']:g} CPU, {cluster['GPU']:g} GPU -> every trial fits; "
                     f"{concurrency(largest(jobs), cluster, space.max_concurrent_trials)} trial(s) at once")
    else:
        lines.append("cluster resources are checked when the sweep connects (--address / RAY_ADDRESS)")
    if plan.needs_teacher:
        teacher = plan.teacher_job.teacher.checkpoint
        how = "missing: the sweep trains it first" if plan.train_teacher else "present, checked"
        lines.append(f"teacher weights: {teacher} ({how})")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"MLflow store: {plan.uri}; sweep folders under {Path(job.run.output_dir) / job.name / 'sweeps'}")
    if space.kind == "search":
        lines.append(f"Optuna study: {request.study_storage or 'optuna.db in the sweep folder'}")
    lines.append("dry run: job, space, data tree, weight files and store are valid; nothing was started")
    return lines
