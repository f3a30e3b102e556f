"""A sweep: Ray Tune runs the space's trials (Optuna samples them, ASHA stops weak ones; or every ablation
row x seed), each trial a Ray Train run, every trial an MLflow child run of the sweep's parent run.

`run_sweep` is the entry; each concern has its module:

    plan.py         the request, the job and space, every trial job, the checks before anything starts, --dry-run
    resume.py       the sweep folder and its state file: starting a sweep, finding and checking one to resume
    teacher_run.py  the teacher's training (or scoring) inside a sweep
    tune_setup.py   Ray, the Tuner (Optuna/ASHA or the ablation grid), running the trials, what became of each
    trial.py        one trial: its job, its MLflow run, its Ray Train workers; the MLflow status callback
    pack.py         trial packs (pack_size): Optuna's members of a pack, the grid's packs, halving inside a pack
    pack_trial.py   one pack trial: its members' runs, and the workers training them as one engine pack
    outcome.py      trial statuses, failure reasons, the summary table, closing the runs
    record.py       what a run shows in MLflow: active params, searched knobs, dataset inputs, descriptions, and
                    the sweep's best trial on the sweep's run
"""

from __future__ import annotations

import os
import time

from kdray import contract
from kdray.orchestration.outcome import SweepOutcome, close_open_runs, reason, summary_table
from kdray.orchestration.plan import SweepRequest, check_resources, check_store, dry_run, make_plan, prepare
from kdray.orchestration.progress import echo
from kdray.orchestration.record import ui_url
from kdray.orchestration.resources import local_resources
from kdray.orchestration.resume import load_state, start_sweep, write_state
from kdray.orchestration.stages import planned_total, stage_lines, sweep_stages
from kdray.orchestration.tracking import Tracker
from kdray.orchestration.tune_setup import run_trials, start_ray

__all__ = ["SweepOutcome", "SweepRequest", "check_store", "dry_run", "prepare", "run_sweep", "summary_table"]


def run_sweep(request: SweepRequest, say=echo) -> SweepOutcome:
    """Run (or resume) a sweep to the end and return its trials, best first.

    Everything that can be checked without Ray is checked before Ray starts and before anything is written to
    MLflow: the job, the space, the overrides, the data tree, the weight files, and (on an embedded Ray) every
    trial configuration against this machine. Whatever way the sweep ends, no MLflow run it opened is left
    RUNNING: trials end FINISHED (those the scheduler stopped early too, tagged so), FAILED, or KILLED when they
    were cut short; the sweep's own run FINISHED, FAILED (a trial failed) or KILLED (interrupted; `--resume`
    reopens them).
    """
    t0 = time.perf_counter()
    state, sweep_dir = load_state(request) if request.resume else (None, None)
    plan = make_plan(request, state, sweep_dir)
    check_store(plan.uri)
    if not (request.address or os.environ.get("RAY_ADDRESS")):
        local = local_resources()
        check_resources(plan.resource_jobs(), local, [local], plan.space_path)  # before an embedded Ray starts

    import ray

    say(f"MLflow store: {plan.uri} (experiment {plan.experiment!r}); open it with: "
        f"mlflow ui --backend-store-uri {plan.uri}")
    if plan.needs_teacher:
        say(f"teacher: {plan.teacher_job.teacher.checkpoint}" + (" (missing: trained first)"
                                                                 if plan.train_teacher else ""))
    for note in plan.notes:
        say(f"note: {note}")
    start_ray(request.address, request.verbose)
    cluster = ray.cluster_resources()
    check_resources(plan.resource_jobs(), cluster, [n["Resources"] for n in ray.nodes() if n.get("Alive")],
                    plan.space_path)
    tracker = Tracker(plan.uri, plan.experiment)
    say(f"its runs in the MLflow UI, once `mlflow ui` serves the store: {ui_url(plan.uri, tracker.experiment_id)}")
    if state is None:
        state, sweep_dir = start_sweep(request, plan, tracker)
    else:  # reopened: how it ended last time no longer holds
        tracker.client.update_run(state["parent_run_id"], status="RUNNING")
        tracker.clear_tag(state["parent_run_id"], contract.FAILURE)
        if request.extend is not None:  # its stage recorded before anything runs (an interrupted one resumes)
            write_state(sweep_dir, state)
            tracker.set_tags(state["parent_run_id"],
                             {contract.TRIALS_PLANNED: str(planned_total(sweep_stages(state, plan.space), plan.space))})
            say(f"extending sweep {state['sweep_id']} by {request.extend} search trial(s) from its Optuna study")
    sweep_id, parent = state["sweep_id"], state["parent_run_id"]
    stages = sweep_stages(state, plan.space)
    if request.resume and plan.space.kind == "search":
        say(f"sweep {sweep_id}: {planned_total(stages, plan.space)} trial(s) planned in its stages so far, of space "
            f"{plan.space.name!r}; folder {sweep_dir}")
        for line in stage_lines(stages, plan.space, sweep_dir):
            say(line)
    else:
        say(f"sweep {sweep_id}: {plan.space.trial_count} trial(s) of space {plan.space.name!r}; folder {sweep_dir}")
    try:
        outcome = run_trials(request, plan, tracker, state, sweep_dir, cluster, say)
    except BaseException as err:  # Ctrl+C outside Tune's own handling, SIGTERM, or a bug: close what it opened
        # Ray's core answers SIGTERM with sys.exit(1): like Ctrl+C, an interruption (KILLED, resumable)
        stopped = isinstance(err, (KeyboardInterrupt, SystemExit))
        close_open_runs(tracker, sweep_id, parent, stopped, "terminated" if isinstance(err, SystemExit)
                        else reason(err))
        raise
    outcome.wall_s = time.perf_counter() - t0
    outcome.experiment_id = tracker.experiment_id
    return outcome
