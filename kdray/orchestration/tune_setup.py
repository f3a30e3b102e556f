"""Ray Tune for a sweep: Ray itself, the Tuner (Optuna + ASHA for a search, a grid of rows x seeds for an
ablation), running the trials, and what became of each.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdray import contract
from kdray.config import Job, override, to_dict
from kdray.contract import STAGE_CONFIRM, STAGE_SEARCH
from kdray.errors import ConfigError
from kdray.losses.objective import method_label
from kdray.orchestration.outcome import (
    FAILED,
    FINISHED,
    INTERRUPTED,
    NOT_STARTED,
    STOPPED_EARLY,
    SweepOutcome,
    TrialSummary,
    best_first,
    close_open_runs,
    failure_reason,
    in_stage_order,
)
from kdray.orchestration.plan import SMOKE, exists, largest
from kdray.orchestration.progress import SweepProgress, TrialLabel, quiet_ray_output, tune_verbosity
from kdray.orchestration.resources import TRIAL_CPU, concurrency
from kdray.orchestration.resume import mark_ended, save_state
from kdray.orchestration.stages import (
    Stage,
    StageResult,
    confirmation_stage,
    make_stage,
    planned_total,
    sweep_stages,
)
from kdray.orchestration.teacher_run import record_teacher, train_teacher
from kdray.orchestration.tracking import Tracker
from kdray.plugins import read_sources
from kdray.space import ROW_KEY, SEED_KEY, SearchSpace

if TYPE_CHECKING:
    from kdray.orchestration.plan import Plan, SweepRequest


def start_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = quiet_ray_output(verbose, local=not address)  # Ray's, Tune's and MLflow's start-up notices
    if address:
        ray.init(address=address, log_to_driver=False, **kwargs)
    else:
        ray.init(log_to_driver=False, runtime_env=pinned_runtime_env(), **kwargs)


def pin_ray_address() -> None:
    """Ray's worker setup hook: every worker of an embedded Ray names its own cluster in RAY_ADDRESS. Ray
    Train's placement-group cleaner looks the cluster up without an address, which fails ("Found multiple active
    Ray instances") when another Ray runs on the same machine; the finished trials' CPUs are then never given
    back and the sweep waits forever for its next trial."""
    import ray

    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def pinned_runtime_env() -> dict[str, Any]:
    """`ray.init(runtime_env=...)` of an embedded Ray: its workers run `pin_ray_address`. A new dict every call:
    Ray writes into the one it is given, and refuses it in a later `ray.init` of the same process."""
    return {"worker_process_setup_hook": pin_ray_address}


def param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    if space.kind == "ablation" and space.pack_size > 1:
        from kdray.orchestration.pack import PACK_KEY, grid_packs

        return {PACK_KEY: tune.grid_search(grid_packs(space))}
    if space.kind == "ablation":
        rows = [name for name, _ in space.rows]
        return {ROW_KEY: tune.grid_search(rows), SEED_KEY: tune.grid_search(list(space.seeds))}
    return {}


def tune_config(space: SearchSpace, job: Job, limit: int, storage: str | None = None, study_name: str = "kdray",
                halving_state: str | None = None):
    """Tune's settings for the space: a grid of rows x seeds, or Optuna (its study in `storage`, a database URL,
    under `study_name`; in memory when None) with ASHA, or synchronous halving behind a BracketGate, when the
    space asks (its state kept in the file `halving_state`, for a restore: Tune does not save the scheduler; a
    file already there is from an experiment Tune never saved, and is removed; keep it out of the experiment
    folder, see SyncHalving)."""
    from ray import tune

    if space.kind == "ablation":
        return tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=1, max_concurrent_trials=limit)
    from kdray.orchestration.search import KdraySearch

    metric, mode = (space.metric, space.mode) if not space.multi_objective else \
        ([m for m, _ in space.objectives], [d for _, d in space.objectives])
    search = KdraySearch(space=space.define_by_run(), metric=metric, mode=mode, seed=space.seed,
                         sampler=space.sampler, constant_liar=space.pack_size > 1,
                         points_to_evaluate=space.points_to_evaluate or None, study_name=study_name,
                         storage=study_storage(storage) if storage else None)
    if space.pack_size > 1:  # Optuna proposes each pack's members; its scheduler's rule runs inside the pack
        from kdray.orchestration.pack import PackSearch, pack_count

        return tune.TuneConfig(metric=space.metric, mode=space.mode,
                               search_alg=PackSearch(search, space.pack_size, space.num_samples),
                               num_samples=pack_count(space), max_concurrent_trials=limit)
    scheduler = None
    if space.scheduler.kind == "asha":
        from ray.tune.schedulers import ASHAScheduler

        grace = min(space.scheduler.grace_period * job.optim.eval_interval, job.optim.iterations)
        # the reported iteration, not Tune's training_iteration, which restarts at 1 after a restore
        scheduler = ASHAScheduler(time_attr=contract.ITERATION, max_t=job.optim.iterations, grace_period=grace,
                                  reduction_factor=space.scheduler.reduction_factor)
    elif space.scheduler.kind == "sync_halving":  # rungs decided on whole brackets: the same stops every run
        from kdray.orchestration.halving import BracketGate, SyncHalving

        grace = min(space.scheduler.grace_period * job.optim.eval_interval, job.optim.iterations)
        bracket = min(space.scheduler.bracket or space.num_samples, space.num_samples)
        if halving_state:  # a new experiment: tune_config is not called for a restored one
            Path(halving_state).unlink(missing_ok=True)
        scheduler = SyncHalving(num_samples=space.num_samples, max_t=job.optim.iterations, grace_period=grace,
                                reduction_factor=space.scheduler.reduction_factor, bracket_size=bracket,
                                max_concurrent=limit, state_path=halving_state)
        search = BracketGate(search, bracket, max_concurrent=limit)  # Tune's ConcurrencyLimiter defers to it
    return tune.TuneConfig(metric=space.metric, mode=space.mode, search_alg=search, scheduler=scheduler,
                           num_samples=space.num_samples, max_concurrent_trials=limit)


def study_storage(url: str):
    """Optuna's RDB storage at `url`; ConfigError naming the flag when Optuna cannot open it."""
    import optuna

    try:
        return optuna.storages.RDBStorage(url)
    except Exception as err:  # SQLAlchemy's errors: a bad URL, a missing driver, a database that does not answer
        raise ConfigError(f"--study-storage {url}: Optuna cannot open it: {str(err).splitlines()[0]}") from None


def study_states(config) -> dict[str, int]:
    """The search's Optuna trial states by count ({} for an ablation, or a resumed sweep whose searcher Tune
    restored out of reach)."""
    search = getattr(config, "search_alg", None) if config is not None else None
    while search is not None and not hasattr(search, "trial_states"):  # a ConcurrencyLimiter, a BracketGate
        search = getattr(search, "searcher", None)
    return search.trial_states() if search is not None else {}


def stored_study_states(storage: str, study_name: str) -> dict[str, int]:
    """The trial states of the study `study_name` in `storage` by count; {} when it cannot be read."""
    import optuna

    from kdray.orchestration.search import state_counts

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except Exception:  # a study that was never created, a database gone: nothing to report
        return {}
    return state_counts(study)


def run_trials(request: SweepRequest, plan: Plan, tracker: Tracker, state: dict[str, Any], sweep_dir: Path,
               cluster: dict[str, float], say) -> SweepOutcome:
    """The teacher first when the sweep needs it, then the sweep's stages on Tune in order (`sweep_stages`: the
    ablation grid; or a search, its confirmation stage, and any extension's search and confirmation), each one
    that ended before collected, not run again; the outcome, with the report written and the sweep's runs
    closed (or left resumable when interrupted)."""
    from kdray.orchestration.budget import BUDGET_SPENT, start_budget

    space = plan.space
    sweep_id, parent = state["sweep_id"], state["parent_run_id"]
    budget = plan.job.sweep.time_budget_s
    deadline = start_budget(budget)
    if budget:
        say(f"time budget: {budget:g} s (sweep.time_budget_s); when it runs out the sweep stops as Ctrl+C stops it, "
            "and --resume continues it")
    if plan.train_teacher:
        train_teacher(plan.teacher_job, tracker, plan.uri, sweep_dir, say, smoke=request.smoke_test,
                      sweep=(sweep_id, parent))
    elif plan.needs_teacher and exists(plan.teacher_job.teacher.checkpoint):
        record_teacher(plan.teacher_job, tracker, say)

    if space.match is not None and plan.matched is None:
        measure_match(plan, tracker, parent, sweep_dir, say, smoke=request.smoke_test)

    from kdray.orchestration.trial import SweepContext

    # the trials' edge: Tune ships the job as plain data, and each trial builds its Job from it once
    context = SweepContext(sweep_id, parent, plan.uri, plan.experiment, str(sweep_dir), to_dict(plan.base),
                           read_sources(plan.base.plugins))
    limit = concurrency(largest(plan.jobs), cluster, space.max_concurrent_trials)
    stages = sweep_stages(state, space)
    trials: list[TrialSummary] = []
    searched: list[TrialSummary] = []  # every search stage's trials: where confirmation candidates come from
    never_created = 0
    i = 0
    while i < len(stages):
        record = stages[i]
        stage = make_stage(record, space, plan.base)
        if record["name"] == STAGE_CONFIRM and not record["rows"]:  # every chosen one was confirmed before
            result = StageResult([], False, 0)
        elif record.get("ended"):
            result = StageResult(stage_trials(stage, plan, tracker, context, sweep_dir), False, 0)
        elif deadline.passed:  # the stage does not begin: --resume begins it
            BUDGET_SPENT.set()
            result = StageResult([], True, stage.space.trial_count)
        else:
            result = run_stage(stage, request=request, plan=plan, tracker=tracker, context=context,
                               sweep_dir=sweep_dir, limit=limit, say=say,
                               study_storage=state.get("study_storage"))
        trials.extend(result.trials)
        never_created += result.never_created
        if result.interrupted:  # Tune saved its state; --resume reopens the runs and continues
            spent = BUDGET_SPENT.is_set()
            outcome = SweepOutcome(sweep_id, sweep_dir, plan.uri, plan.experiment, parent, trials, 0.0, True,
                                   never_created=never_created, metric=space.metric, mode=space.mode,
                                   objectives=space.objectives,
                                   budget_spent=spent)
            why = f"time budget of {budget:g} s spent" if spent else "interrupted"
            close_open_runs(tracker, sweep_id, parent, True, f"{why}: {outcome.counts()}")
            say(f"sweep {'stopped: its ' + why if spent else why} ({outcome.counts()}): resume it with "
                f"python -m kdray.sweep --resume {sweep_dir}")
            return outcome
        if not record.get("ended"):
            record["ended"] = True
            if record["name"] == STAGE_SEARCH:
                report_study_states(result.config, tracker, parent, f"sweep-{sweep_id}", say)
        if record["name"] == STAGE_SEARCH:
            searched.extend(result.trials)
            if i + 1 == len(stages):  # a search is followed by the confirmation of its best configurations
                stages.append(confirmation_stage(space, plan.base, searched, stages))
                tracker.set_tags(parent, {contract.TRIALS_PLANNED: str(planned_total(stages, space))})
                rows = stages[-1]["rows"]
                say("confirmation: " + (f"{', '.join(r['name'] for r in rows)} x seeds {stages[-1]['seeds']}"
                                        if rows else "every chosen configuration was confirmed before"))
        save_state(sweep_dir, {"stages": stages})
        i += 1
    outcome = SweepOutcome(sweep_id, sweep_dir, plan.uri, plan.experiment, parent,
                           in_stage_order(trials, space.mode), 0.0, False, never_created=never_created,
                           metric=space.metric, mode=space.mode, objectives=space.objectives)
    from kdray.reporting import write_report

    close_open_runs(tracker, sweep_id, None, False, "the sweep ended with this trial's run still open")
    mark_ended(sweep_dir, outcome.counts())
    report = write_report(plan.uri, plan.experiment, sweep_id, sweep_dir / "report",
                          formats=("md", "tex", "csv", "parquet"), log_artifacts=True)
    outcome.report_markdown = report.markdown
    outcome.verdict = report.verdict
    describe_ended(plan, tracker, state, sweep_dir, stages, outcome.counts())
    if outcome.exit_code:
        tracker.set_tags(parent, {contract.FAILURE: outcome.counts()})
        tracker.end_run(parent, "FAILED")
    else:
        tracker.clear_tag(parent, contract.FAILURE)
        tracker.end_run(parent, "FINISHED")
    return outcome


def describe_ended(plan: Plan, tracker: Tracker, state: dict[str, Any], sweep_dir: Path,
                   stages: list[dict[str, Any]], counts: str) -> None:
    """The sweep's description as it ended (its plan with the stages it ran, its trials' counts, where its report
    is) and its best trial (`record_best`), on the sweep's run."""
    from kdray.orchestration.record import record_best, sweep_note
    from kdray.orchestration.resume import teacher_line

    parent = state["parent_run_id"]
    note = sweep_note(plan.job, plan.space, state["sweep_id"], str(sweep_dir / "report"),
                      planned_total(stages, plan.space) if plan.space.kind == "search" else plan.space.trial_count,
                      teacher_line(plan), ended=counts)
    tracker.set_tags(parent, {contract.NOTE: note})
    record_best(tracker, state["sweep_id"], parent)


def measure_match(plan: Plan, tracker: Tracker, parent: str, sweep_dir: Path, say, smoke: bool = False) -> None:
    """A matched ablation's rows, measured on Ray and given their iterations (`kdray.orchestration.matching`):
    applied to the plan's space, kept in the state file and on the sweep's run, and said."""
    from kdray.orchestration.matching import apply, derive, match_lines, match_tag, measure_rows, to_state

    space = plan.space
    say(f"measuring each row's seconds per iteration for equal device-seconds ({len(space.rows)} row(s), one at a "
        "time)")
    seconds = measure_rows(space, plan.base, on_ray=True)
    plan.matched = derive(space, plan.base, seconds, cap=SMOKE["optim.iterations"] if smoke else None)
    apply(space, plan.matched)
    save_state(sweep_dir, {"matched": to_state(plan.matched)})
    tracker.set_tags(parent, {contract.MATCH: match_tag(plan.matched)})
    for line in match_lines(space, plan.matched, "on one worker's resources of each row"):
        say(line)


def run_stage(stage: Stage, *, request: SweepRequest, plan: Plan, tracker: Tracker, context, sweep_dir: Path,
              limit: int, say, study_storage: str | None = None) -> StageResult:
    """Run one stage's trials on Tune to their end (or Ctrl+C): a new Tune experiment in `sweep_dir/<folder>`, or
    the one already there, restored with its unfinished and errored trials."""
    from ray import tune

    from kdray.orchestration.budget import TimeBudget
    from kdray.orchestration.trial import INTERRUPTED as CTRL_C
    from kdray.orchestration.trial import InterruptWatch, MlflowStatusCallback

    space = stage.space
    trainable = stage_trainable(stage, context)
    path = sweep_dir / stage.folder
    config = None
    if path.exists() and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        callbacks = [InterruptWatch(), TimeBudget(), MlflowStatusCallback(plan.uri, plan.experiment, context.sweep_id),
                     SweepProgress(tune_trial_count(space), space.metric, space.mode,
                                   label=TrialLabel(space, plan.base),
                                   say=say)]
        storage = None
        if space.kind == "search":
            storage = study_storage or request.study_storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
            tracker.set_tags(context.parent_run_id, {contract.STUDY_STORAGE: storage})
        config = tune_config(space, plan.job, limit, storage, f"sweep-{context.sweep_id}", f"{path}.sync_halving.json")
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space),
            tune_config=config,
            run_config=tune.RunConfig(
                name=stage.folder, storage_path=str(sweep_dir), callbacks=callbacks,
                # Train restarts dead workers from their checkpoint; a trial that failed stays failed
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=tune_verbosity(request.verbose),
            ),
        )
    what = {"search": "search trial(s)", "confirm": "confirmation trial(s)"}.get(stage.name, "trial(s)")
    packs = f" in {tune_trial_count(space)} pack(s) of up to {space.pack_size}" if space.pack_size > 1 else ""
    say(f"running {space.trial_count} {what}{packs}, at most {limit} {'pack' if packs else 'trial'}(s) at a time")
    CTRL_C.clear()
    grid = tuner.fit()
    trials, interrupted = summaries(grid, space, plan.base, tracker, context.sweep_id, CTRL_C.is_set(), stage.name)
    return StageResult(trials, interrupted, max(0, space.trial_count - len(trials)), config)


def tune_trial_count(space: SearchSpace) -> int:
    """How many Tune trials a stage's space makes: its trials, or its packs (`pack_size` > 1)."""
    if space.pack_size > 1:
        from kdray.orchestration.pack import pack_count

        return pack_count(space)
    return space.trial_count


def stage_trainable(stage: Stage, context):
    """The Tune trainable of a stage's trials: `run_trial` (or, with pack_size > 1, `run_pack_trial`) with the
    stage's space and tags, one CPU slot."""
    from ray import tune

    if stage.space.pack_size > 1:
        from kdray.orchestration.pack_trial import run_pack_trial as trainable
    else:
        from kdray.orchestration.trial import run_trial as trainable

    return tune.with_resources(partial(trainable, space=stage.space, sweep=context, stage_tags=stage.tags),
                               {"cpu": TRIAL_CPU})


def stage_trials(stage: Stage, plan: Plan, tracker: Tracker, context, sweep_dir: Path) -> list[TrialSummary]:
    """The trials of a stage that already ended, as its Tune experiment kept them (nothing is run)."""
    from ray import tune

    grid = tune.Tuner.restore(str(sweep_dir / stage.folder), trainable=stage_trainable(stage, context)).get_results()
    return summaries(grid, stage.space, plan.base, tracker, context.sweep_id, False, stage.name)[0]


def report_study_states(config, tracker: Tracker, parent: str, study_name: str, say) -> None:
    """How the Optuna study saw the search's trials (a stopped one is PRUNED, not COMPLETE with a truncated
    score): a tag on the sweep's run and a line. From the searcher when this process started the search, else
    (a resumed sweep) from the study's storage."""
    storage = tracker.tags(parent).get(contract.STUDY_STORAGE, "")
    states = study_states(config) or (stored_study_states(storage, study_name) if storage else {})
    if states:
        shown = " ".join(f"{state}={count}" for state, count in sorted(states.items()))
        tracker.set_tags(parent, {contract.STUDY_STATES: shown})
        say(f"Optuna study: {shown}" + (f" (optuna-dashboard {storage})" if storage else ""))


def summaries(grid, space: SearchSpace, base: Job, tracker: Tracker, sweep_id: str,
              ctrl_c: bool = False, stage: str = "") -> tuple[list[TrialSummary], bool]:
    """Each trial Tune created, best first, with what became of it; and whether the sweep was interrupted
    (`ctrl_c`, or a trial still pending, running or paused when `fit` returned). `base`: the job every trial
    starts from.

    After Ctrl+C, Tune ends the running trials TERMINATED: a trial short of its iterations then counts as
    stopped early only if the scheduler said so first (its run carries STOPPED_EARLY), else as interrupted.
    """
    from kdray.orchestration.pack import is_pack

    out, interrupted = [], ctrl_c
    for trial, result in zip(tune_trials(grid), grid):
        config = trial.config or {}
        if is_pack(config):
            members, pending = pack_summaries(trial, result, space, base, ctrl_c, stage)
            out += members
            interrupted = interrupted or pending
            continue
        job = _trial_job(base, space, config)
        history = result.metrics_dataframe
        series = history[space.metric].dropna().tolist() if history is not None and space.metric in history else []
        last = series[-1] if series else float("nan")
        best = (max(series) if space.mode == "max" else min(series)) if series else float("nan")
        metrics = trial.last_result or {}
        done = int(metrics.get(contract.ITERATION, 0))
        total = int(metrics.get(contract.ITERATIONS_TOTAL, 0))
        if trial.status == "ERROR":
            status = f"{FAILED}: {failure_reason(result.error)}"
        elif trial.status == "TERMINATED":
            run_id = tracker.find_run(**{contract.SWEEP_ID: sweep_id, contract.TRIAL_ID: trial.trial_id})
            if run_id is not None and not done:  # Tune holds no result for it: the run's evaluations say how far
                done = tracker.last_step(run_id, contract.VAL_MIOU)  # (never past a scheduler's stop: Tune saw it)
            if not total:  # (a job the space cannot build raises its error here)
                total = (job or override(base, space.trial_overrides(config))).optim.iterations
            scheduled = run_id is not None and tracker.tags(run_id).get(contract.STOPPED_EARLY) == "true"
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
        label = config.get(ROW_KEY) or (method_label(job.losses) if job is not None else "?")
        params = {k: v for k, v in config.items() if k != ROW_KEY}
        values = tuple(_number(metrics.get(m)) for m, _ in space.objectives) if space.multi_objective else ()
        out.append(TrialSummary(trial.trial_id, label, int(config.get(SEED_KEY, 0)), params, last, best, done,
                                status, stage, scored_on(job), values))
    return best_first(out, space.mode), interrupted


def pack_summaries(trial, result, space: SearchSpace, base: Job, ctrl_c: bool, stage: str
                   ) -> tuple[list[TrialSummary], bool]:
    """A pack trial's members, each summarised as a solo trial would be (from its part of the pack's results: its
    state, metrics and failure), and whether the pack was still pending or running when `fit` returned."""
    from kdray.orchestration.pack import COMPLETE, STATE, STOPPED, member_id, member_key, member_result, members_of
    from kdray.orchestration.pack import FAILED as MEMBER_FAILED
    from kdray.orchestration.pack import FAILURE as MEMBER_FAILURE

    pending = trial.status not in ("TERMINATED", "ERROR")
    history = result.metrics_dataframe
    last_result = trial.last_result or {}
    pack_error = failure_reason(result.error) if trial.status == "ERROR" else None
    out = []
    for index, config in enumerate(members_of(trial.config)):
        mid = member_id(trial.trial_id, index)
        job = _trial_job(base, space, config)
        metrics = member_result(last_result, index)
        column = member_key(index, space.metric)
        series = history[column].dropna().tolist() if history is not None and column in history else []
        last = series[-1] if series else float("nan")
        best = (max(series) if space.mode == "max" else min(series)) if series else float("nan")
        done = int(metrics.get(contract.ITERATION, 0))
        state = metrics.get(STATE)
        if state == COMPLETE:
            status = FINISHED
        elif state == STOPPED:
            status = STOPPED_EARLY
        elif state == MEMBER_FAILED:
            status = f"{FAILED}: {metrics.get(MEMBER_FAILURE) or 'the member failed'}"
        elif pack_error is not None:
            status = f"{FAILED}: {pack_error}"
        elif pending or ctrl_c:
            status = INTERRUPTED if done else NOT_STARTED
        else:
            status = f"{FAILED}: the pack ended before this member did"
        label = config.get(ROW_KEY) or (method_label(job.losses) if job is not None else "?")
        params = {k: v for k, v in config.items() if k != ROW_KEY}
        values = tuple(_number(metrics.get(m)) for m, _ in space.objectives) if space.multi_objective else ()
        out.append(TrialSummary(mid, label, int(config.get(SEED_KEY, job.run.seed if job else 0)), params, last,
                                best, done, status, stage, scored_on(job), values))
    return out, pending


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def scored_on(job: Job | None) -> str:
    """What a trial's val/* metrics measure: "tune split" (held-out training images), or the val split's name;
    "" for a trial whose job cannot be built."""
    if job is None:
        return ""
    from kdray.data.tune_split import TUNE, eval_split

    split = eval_split(job.data)
    return "tune split" if split == TUNE else split


def _trial_job(base: Job, space: SearchSpace, config: dict[str, Any]) -> Job | None:
    """The job of one trial; None for a config the space can no longer build (the trial failed on it)."""
    try:
        return override(base, space.trial_overrides(config))
    except (ConfigError, KeyError):
        return None


def tune_trials(grid) -> list:
    """Tune's Trial objects behind a ResultGrid, in the grid's order (their status is not on the Results)."""
    return list(grid._experiment_analysis.trials)
