"""One pack trial (`kdray.orchestration.pack`): its members' MLflow runs, and its Ray Train workers training them as one
`kdray.engine.train_pack`.

On the workers, each member's evaluations, previews and training log go to its own run (`RunBridge`, as a solo
trial's); after each evaluation of the pack, `PackHalving` (when the space has a scheduler) stops the members below
the cut at a rung, and one Tune result carries every member's state and last metrics, with a checkpoint that
holds every member's (`PACK_FILE` says where each stands), so a restarted pack resumes its running members and
keeps the ended ones ended. A member whose loss turns non-finite fails alone: its run is tagged with the reason
and the others train on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback

from kdray import contract
from kdray.contract import Evaluation
from kdray.engine import PackMember, RankContext, train_pack
from kdray.engine.cost import cost_device
from kdray.engine.loop import NonFiniteLossError, check_pack
from kdray.errors import ResourceError
from kdray.orchestration.outcome import TrialFailed, worker_reason
from kdray.orchestration.pack import (
    COMPLETE,
    FAILED,
    FAILURE,
    RUNNING,
    STATE,
    STOPPED,
    PackHalving,
    member_id,
    member_key,
    members_of,
)
from kdray.orchestration.student_model import log_best_student
from kdray.orchestration.tracking import RunLogger, Tracker
from kdray.orchestration.trial import SweepContext, open_trial_run
from kdray.orchestration.workers import RunBridge, fit, stop_system_metrics, system_metrics
from kdray.space import SearchSpace

PACK_FILE = "pack.json"  # in a pack's checkpoint: its iteration, each member's state and last metrics


def run_pack_trial(config: dict[str, Any], *, space: SearchSpace, sweep: SweepContext,
                   stage_tags: dict[str, dict[str, str]] | None = None) -> None:
    """The Tune trainable of a pack trial. Every member's run exists before anything trains (a member whose config
    cannot be built has a FAILED run, and the pack goes on without it); raises TrialFailed when no member can run
    or the workers fail (the members still running then fail with the workers' reason)."""
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = Tracker(sweep.tracking_uri, sweep.experiment)
    members, unbuilt = [], []
    for index, member in enumerate(members_of(config)):
        try:
            job, run_id = open_trial_run(tracker, member, member_id(trial_id, index), space=space, sweep=sweep,
                                         stage_tags=stage_tags)
        except TrialFailed:
            unbuilt.append(index)
            continue
        members.append({"index": index, "job": job, "run_id": run_id})
    if not members:
        raise TrialFailed("no member of the pack could be built (each member's run says why)")
    try:
        check_pack([m["job"] for m in members])
    except Exception as err:
        for m in members:
            tracker.set_tags(m["run_id"], {contract.FAILURE: str(err)[:5000]})
        raise TrialFailed(str(err)) from err
    s = space.scheduler
    job = members[0]["job"]
    halving = None if s.kind == "none" else {
        "metric": space.metric, "mode": space.mode, "reduction_factor": s.reduction_factor,
        "grace_period": min(s.grace_period * job.optim.eval_interval, job.optim.iterations)}
    try:
        result = fit(job, role="student", run_id=None, tracking_uri=sweep.tracking_uri, name=f"train-{trial_id}",
                     storage_path=sweep.storage_path, callbacks=[TuneReportCallback()], per_worker=pack_per_worker,
                     loop_config={"members": members, "unbuilt": unbuilt, "halving": halving,
                                  "metric": space.metric, "mode": space.mode})
    except Exception as err:
        why = worker_reason(err)
        _tag_unended(tracker, members, why)
        raise TrialFailed(why) from err
    if result.return_value:  # the workers stopped on purpose (the pack does not fit its device), and said why
        why = str(result.return_value)
        _tag_unended(tracker, members, why)
        raise TrialFailed(why)


def _tag_unended(tracker: Tracker, members: list[dict[str, Any]], why: str) -> None:
    """The pack's failure, on the runs of its members that had not ended on their own (no failure of their own)."""
    for m in members:
        if tracker.status(m["run_id"]) == "RUNNING" and not tracker.tags(m["run_id"]).get(contract.FAILURE):
            tracker.set_tags(m["run_id"], {contract.FAILURE: why[:5000]})


def pack_per_worker(config: dict[str, Any]) -> str | None:
    """One worker's share of a pack trial (every rank alike; see the module's docstring); None when it ended."""
    members: list[dict[str, Any]] = config["members"]
    total: int = config["iterations"]
    uri = config["tracking_uri"]
    context = ray.train.get_context()
    ctx = RankContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())
    scratch = Path(tempfile.mkdtemp(prefix="kdray-pack-"))
    bridges = {m["index"]: RunBridge(RunLogger(uri, m["run_id"]) if ctx.is_main else None,
                                     scratch / f"m{m['index']}", "student") for m in members}
    states: dict[int, str] = {m["index"]: RUNNING for m in members}
    states.update({index: FAILED for index in config["unbuilt"]})
    reasons: dict[int, str] = {}  # member index -> why it failed
    last: dict[int, dict[str, Any]] = {}  # member index -> its last Tune metrics
    previous: list[Path] = []  # the last checkpoint folder reported (deleted once the next one is)
    reports = itertools.count()

    def left_for(index: int):
        def left(state: str, reason: str | None) -> None:
            states[index] = state
            if reason is not None:
                fail(index, reason)
        return left

    def fail(index: int, reason: str) -> None:
        states[index], reasons[index] = FAILED, reason
        if bridges[index].logger is not None:
            bridges[index].logger.set_tags({contract.FAILURE: reason[:5000]})

    def report_for(index: int):
        def report(evaluation: Evaluation, checkpoint_dir: str | None) -> None:
            bridges[index].record(evaluation)
            length = evaluation.iteration if evaluation.time_budget_reached else total
            last[index] = {**evaluation.tune_metrics(), contract.ITERATIONS_TOTAL: length}
        return report

    def pack_report(iteration: int) -> None:
        result: dict[str, Any] = {contract.ITERATION: iteration, contract.ITERATIONS_TOTAL: total}
        for index, state in sorted(states.items()):
            result[member_key(index, STATE)] = state
            if index in reasons:
                result[member_key(index, FAILURE)] = reasons[index][:5000]
            result.update({member_key(index, k): v for k, v in last.get(index, {}).items()})
        best = best_value([m.get(config["metric"]) for m in last.values()], config["mode"])
        if best is not None:
            result[config["metric"]] = best
        checkpoint = None
        if ctx.is_main:
            folder = scratch / f"pack-{next(reports)}-at-{iteration}"
            folder.mkdir()
            (folder / PACK_FILE).write_text(json.dumps({"iteration": iteration, "states": states, "last": last,
                                                         "reasons": reasons}))
            for index in states:
                own = scratch / f"m{index}" / "checkpoint"
                if own.is_dir():
                    shutil.copytree(own, folder / f"m{index}")
            checkpoint = Checkpoint.from_directory(str(folder))
        ray.train.report(result, checkpoint=checkpoint)
        for old in previous:
            shutil.rmtree(old, ignore_errors=True)
        previous[:] = [folder] if ctx.is_main else []

    monitors = []
    resume = ray.train.get_checkpoint()
    try:
        with resume.as_directory() if resume is not None else contextlib.nullcontext(None) as resume_dir:
            start = 0
            if resume_dir is not None:
                saved = json.loads((Path(resume_dir) / PACK_FILE).read_text())
                states.update({int(k): v for k, v in saved["states"].items()})
                last.update({int(k): v for k, v in saved["last"].items()})
                start = saved["iteration"]
                for index, reason in saved.get("reasons", {}).items():  # reopened runs lost their failure tag
                    if int(index) in bridges:
                        fail(int(index), reason)
            running = [m for m in members if states[m["index"]] == RUNNING]
            for m in running:
                logger = bridges[m["index"]].logger
                if logger is not None:
                    logger.set_tags({contract.COST_DEVICE: cost_device(ctx.device, m["job"].run.amp)})
                    if resume_dir is not None:
                        logger.set_tags({contract.RESUMED_FROM: str(start)})
                    monitors.append(system_metrics(uri, m["run_id"], resumed=resume_dir is not None))
            halving = PackHalving(**config["halving"], max_t=total, start=start) if config["halving"] else None

            def decide(evaluations: dict[int, Evaluation]) -> set[int]:
                # the pack's rungs are decided at its evaluations, not where a member's time budget ended it
                regular = {j: e for j, e in evaluations.items() if not e.time_budget_reached and e.iteration < total}
                stop = halving(regular) if halving is not None and regular else set()
                for j in stop:
                    states[running[j]["index"]] = STOPPED
                pack_report(max(e.iteration for e in evaluations.values()))
                return stop

            results = []
            if running:
                pack = [PackMember(m["job"], scratch / f"m{m['index']}", report=report_for(m["index"]),
                                   log=bridges[m["index"]].log, preview=bridges[m["index"]].preview,
                                   resume=Path(resume_dir) / f"m{m['index']}" if resume_dir is not None else None,
                                   left=left_for(m["index"]))
                        for m in running]
                try:
                    results = train_pack(pack, ctx=ctx, progress=False, decide=decide)
                except NonFiniteLossError as err:  # the one member left ran into a non-finite loss: it fails alone
                    fail(running[0]["index"], str(err))
                    start, running = max(start, err.iteration), []
                except ResourceError as err:  # the pack does not fit its device: no retry would change that
                    return str(err)
        ended = start
        for m, result in zip(running, results):
            index, logger = m["index"], bridges[m["index"]].logger
            ended = max(ended, result.iterations)
            if result.failure is not None:
                fail(index, result.failure)
            elif result.stopped:
                states[index] = STOPPED
            else:
                states[index] = COMPLETE
                if logger is not None and m["job"].tracking.log_model and result.best_iteration >= 0:
                    log_best_student(uri, m["run_id"], m["job"], result.best_weights, result.best_iteration)
        pack_report(ended)
    finally:
        for monitor in monitors:
            if monitor is not None:
                stop_system_metrics(monitor)
        shutil.rmtree(scratch, ignore_errors=True)
    return None


def best_value(values: list[Any], mode: str) -> float | None:
    """The best finite number among `values` in the sweep's `mode`; None when there is none."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)]
    if not finite:
        return None
    return max(finite) if mode == "max" else min(finite)
