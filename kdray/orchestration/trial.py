"""One Tune trial: a job with the trial's overrides, trained by Ray Train workers, recorded as one MLflow run.

Also the driver-side callback that gives each trial's run its final MLflow status, since a trial the
scheduler stops is killed before it could close its own run. A trial that fails raises `TrialFailed` with its
reason: the callback and the sweep's summary take the reason from that error, not from the run's tags.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.cloudpickle
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from kdray import contract
from kdray.config import Job, job_from_dict, to_yaml
from kdray.losses.objective import config_formula
from kdray.orchestration.outcome import TrialFailed, failure_reason, is_trial_failure, worker_reason
from kdray.orchestration.pack import is_pack
from kdray.orchestration.record import (
    active_params,
    append_note,
    log_datasets,
    record_best,
    run_tags,
    searched_keys,
    trial_note,
)
from kdray.orchestration.tracking import Tracker
from kdray.orchestration.workers import fit
from kdray.space import ROW_KEY, SearchSpace

# Set when Ctrl+C reaches the driver during `Tuner.fit`. Tune turns the first one into a graceful stop that ends
# the running trials TERMINATED like any others, so their status cannot tell an interrupted trial from one the
# scheduler stopped; this can. Module-level, because a restored Tuner runs the callbacks it unpickles.
INTERRUPTED = threading.Event()

__all__ = ["INTERRUPTED", "InterruptWatch", "MlflowStatusCallback", "SweepContext", "TrialFailed", "run_trial",
           "trial_tags"]


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one sweep needs to know; plain data, pickled with the trainable."""

    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    storage_path: str  # the Tune experiment folder; each trial's Train run lives under it
    job_data: dict[str, Any]  # the job every trial starts from, as plain data: a trial builds its Job from it
    plugin_sources: dict[str, str] = field(default_factory=dict)  # the text of the job's plugin files (nodes may
    # lack them: `kdray.plugins`)
    teacher_params_m: float | None = None


def trial_tags(job: Job, space: SearchSpace, config: dict[str, Any]) -> dict[str, str]:
    """A trial run's tags: a student run's (`kdray.orchestration.record.run_tags`), its space, and its ablation
    row when it has one."""
    tags = {**run_tags(job), contract.SPACE: space.name}
    if ROW_KEY in config:
        tags[contract.ROW] = config[ROW_KEY]
        tags[contract.ROW_INDEX] = str([name for name, _ in space.rows].index(config[ROW_KEY]))
    return tags


def run_trial(config: dict[str, Any], *, space: SearchSpace, sweep: SweepContext,
              stage_tags: dict[str, dict[str, str]] | None = None) -> None:
    """The Tune trainable (wrapped with `tune.with_resources` by the sweep). `stage_tags`: tags for the runs of
    one stage, by ablation row name (a confirmation row), or under "" for every trial (`kdray.stage=search`).

    Its MLflow run exists before anything that can fail: a trial whose config the space cannot build (a row
    renamed since the sweep started, say) still leaves a FAILED run with the reason, never nothing.
    """
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = Tracker(sweep.tracking_uri, sweep.experiment)
    job, run_id = open_trial_run(tracker, config, trial_id, space=space, sweep=sweep, stage_tags=stage_tags)
    try:
        result = fit(job, role="student", run_id=run_id, tracking_uri=sweep.tracking_uri, name=f"train-{trial_id}",
                     storage_path=sweep.storage_path, callbacks=[TuneReportCallback()])
    except Exception as err:
        why = worker_reason(err)
        tracker.set_tags(run_id, {contract.FAILURE: why[:5000]})
        raise TrialFailed(why) from err
    if result.return_value:  # the workers stopped on purpose, and said why
        why = str(result.return_value)
        tracker.set_tags(run_id, {contract.FAILURE: why[:5000]})
        raise TrialFailed(why)


def open_trial_run(tracker: Tracker, config: dict[str, Any], trial_id: str, *, space: SearchSpace,
                   sweep: SweepContext, stage_tags: dict[str, dict[str, str]] | None = None) -> tuple[Job, str]:
    """A trial's job and its MLflow run (found again on a restart, else created under the sweep's run), with its
    tags, active params, description, job file and dataset inputs. A config the space cannot build leaves a FAILED
    run with the reason and raises TrialFailed. `trial_id`: the trial's, or a pack member's (`member_id`)."""
    try:
        job = job_from_dict(sweep.job_data, space.trial_overrides(config), plugin_sources=sweep.plugin_sources)
        tags = trial_tags(job, space, config)
        stage_tags = stage_tags or {}
        tags.update(stage_tags.get(config.get(ROW_KEY, ""), stage_tags.get("", {})))
    except Exception as err:
        why = f"the trial's config cannot be built: {type(err).__name__}: {err}"
        run_id = tracker.trial_run(sweep.sweep_id, trial_id, sweep.parent_run_id, name=f"trial-{trial_id}",
                                   tags={}, params={k: v for k, v in config.items()})
        tracker.set_tags(run_id, {contract.FAILURE: why[:5000]})
        tracker.end_run(run_id, "FAILED")
        raise TrialFailed(why) from err
    searched = searched_keys(space, config)
    tags[contract.SEARCHED] = ",".join(searched)
    run_id = tracker.trial_run(sweep.sweep_id, trial_id, sweep.parent_run_id,
                               name=f"{tags.get(contract.ROW, tags[contract.METHOD])}-s{job.run.seed}-{trial_id}",
                               tags=tags, params=active_params(job, searched))
    tracker.clear_tag(run_id, contract.FAILURE)  # a restarted trial starts clean (a failure is written anew)
    tracker.set_tags(run_id, {contract.FORMULA: config_formula(job.losses),
                              contract.NOTE: trial_note(job, tags, searched, sweep.sweep_id, trial_id,
                                                        tracker.experiment_id, sweep.parent_run_id)})
    tracker.log_text(run_id, to_yaml(job), contract.JOB_ARTIFACT)
    log_datasets(tracker, run_id, job.data)
    return job, run_id


class MlflowStatusCallback(ray.tune.Callback):
    """Ends each trial's MLflow run with the status it earned: FINISHED (stopped early by the scheduler too, then
    tagged STOPPED_EARLY and STOPPED_AT, and said in its description), KILLED (cut short by Ctrl+C: resumable),
    FAILED; then gives the sweep's run its best trial so far (`kdray.orchestration.record.record_best`)."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_id: str):
        self.tracking_uri, self.experiment, self.sweep_id = tracking_uri, experiment, sweep_id
        self._tracker: Tracker | None = None
        self._parent: str | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment state
        return {**self.__dict__, "_tracker": None, "_parent": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment)
        return self._tracker

    def _run_id(self, trial) -> str | None:
        return self.tracker.find_run(**{contract.SWEEP_ID: self.sweep_id, contract.TRIAL_ID: trial.trial_id})

    def _record_best(self) -> None:
        """The sweep's best trial so far, on the sweep's run (a callback pickled before it kept the run finds it)."""
        try:
            if getattr(self, "_parent", None) is None:
                self._parent = self.tracker.find_run(**{contract.KIND: "sweep", contract.SWEEP_ID: self.sweep_id})
            if self._parent is not None:
                record_best(self.tracker, self.sweep_id, self._parent)
        except Exception as err:  # a view of the results never stops the sweep (its end records the best again)
            logging.getLogger(__name__).warning("the sweep's best trial was not recorded: %s", err)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        if is_pack(getattr(trial, "config", None)):
            self._end_members(trial, None)
            return
        run_id = self._run_id(trial)
        if run_id is None:
            return
        # Tune's last result is where the trial ended, as the scheduler saw it: a trial restored from its final
        # checkpoint reports its last evaluation again (train_per_worker), while the workers of a trial the
        # scheduler stopped may have logged later evaluations to MLflow before the stop reached them.
        last = trial.last_result or {}
        done, total = last.get("iteration", 0), last.get("iterations_total", 0)
        # a trial that completes has not failed, whatever an earlier teardown wrote
        self.tracker.clear_tag(run_id, contract.FAILURE)
        if INTERRUPTED.is_set() and not (total and done >= total):
            self.tracker.end_run(run_id, "KILLED")  # cut short by Ctrl+C, not by the scheduler: --resume goes on
            return
        if total and done < total:  # the scheduler's stop: the trial ended as it should, short of its length
            self.tracker.set_tags(run_id, {contract.STOPPED_EARLY: "true", contract.STOPPED_AT: str(int(done))})
            append_note(self.tracker, run_id, f"Stopped early by the scheduler at iteration {int(done)} of "
                                              f"{int(total)}: its record ends there.")
        else:
            self.tracker.clear_tag(run_id, contract.STOPPED_EARLY)
            self.tracker.clear_tag(run_id, contract.STOPPED_AT)
        self.tracker.end_run(run_id, "FINISHED")
        self._record_best()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        if is_pack(getattr(trial, "config", None)):
            error = _trial_error(trial)
            text = str(error).strip() if error is not None else ""
            self._end_members(trial, failure_reason(error) if is_trial_failure(error) else
                              (text.splitlines()[-1] if text else "the pack failed"))
            return
        run_id = self._run_id(trial)
        if run_id is None:
            return
        error = _trial_error(trial)
        if not is_trial_failure(error):  # a TrialFailed's run has its reason already (run_trial wrote it)
            text = str(error).strip() if error is not None else ""
            why = text.splitlines()[-1] if text else "the trial failed"
            self.tracker.set_tags(run_id, {contract.FAILURE: why[:5000]})
        why = self.tracker.tags(run_id).get(contract.FAILURE, "")
        if why:
            append_note(self.tracker, run_id, f"Failed: {why[:500]}")
        self.tracker.end_run(run_id, "FAILED")


    def _end_members(self, trial, pack_failure: str | None) -> None:
        """A pack trial ended (`pack_failure`: why it failed, None when it returned): each member's run ends as its
        state in the pack's last result says (`kdray.orchestration.pack`): complete FINISHED; stopped FINISHED,
        tagged as a scheduler's stop; failed FAILED; still running KILLED after Ctrl+C, else FAILED with the pack's
        reason."""
        from kdray.orchestration.pack import COMPLETE, FAILED, STOPPED, member_id, member_result, members_of
        from kdray.orchestration.pack import FAILURE as MEMBER_FAILURE
        from kdray.orchestration.pack import STATE as MEMBER_STATE

        last = trial.last_result or {}
        for index in range(len(members_of(trial.config))):
            run_id = self.tracker.find_run(**{contract.SWEEP_ID: self.sweep_id,
                                              contract.TRIAL_ID: member_id(trial.trial_id, index)})
            if run_id is None or self.tracker.status(run_id) != "RUNNING":
                continue  # never created, or ended already (a config its space could not build)
            part = member_result(last, index)
            state, done, total = part.get(MEMBER_STATE), part.get(contract.ITERATION, 0), part.get(
                contract.ITERATIONS_TOTAL, 0)
            if state == COMPLETE:
                self.tracker.clear_tag(run_id, contract.FAILURE)
                self.tracker.end_run(run_id, "FINISHED")
            elif state == STOPPED:
                self.tracker.set_tags(run_id, {contract.STOPPED_EARLY: "true", contract.STOPPED_AT: str(int(done))})
                append_note(self.tracker, run_id, f"Stopped early by its pack's halving at iteration {int(done)} of "
                                                  f"{int(total)}: its record ends there.")
                self.tracker.end_run(run_id, "FINISHED")
            elif state == FAILED or pack_failure is not None or not INTERRUPTED.is_set():
                why = part.get(MEMBER_FAILURE) or pack_failure or "the pack ended before this member did"
                self.tracker.set_tags(run_id, {contract.FAILURE: why[:5000]})
                append_note(self.tracker, run_id, f"Failed: {why[:500]}")
                self.tracker.end_run(run_id, "FAILED")
            else:
                self.tracker.end_run(run_id, "KILLED")  # Ctrl+C: --resume goes on
        self._record_best()


def _trial_error(trial) -> BaseException | str | None:
    """The exception a trial failed with, else its text trace. Tune writes both next to the trial on the driver
    (`pickled_error_file`, `error_file`) before it calls `on_trial_error`, and copies them to the trial's storage
    (where `get_pickled_error` and `get_error` look) only later: the driver's copies first."""
    for attr, binary in (("pickled_error_file", True), ("error_file", False)):
        path = getattr(trial, attr, None)
        if isinstance(path, str) and Path(path).is_file():
            with contextlib.suppress(Exception):
                return ray.cloudpickle.loads(Path(path).read_bytes()) if binary else Path(path).read_text()
    pickled = getattr(trial, "get_pickled_error", None)
    error = pickled() if callable(pickled) else None
    return error if error is not None else trial.get_error()


class InterruptWatch(ray.tune.Callback):
    """Notes a Ctrl+C in `INTERRUPTED`, then lets Tune's own handler stop the run gracefully, as it would.

    Tune installs its SIGINT handler when `fit` starts; the first step wraps it (handlers can only be set from the
    main thread, where the Tune loop and its callbacks run).
    """

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handler = signal.getsignal(signal.SIGINT)
        if getattr(handler, "kdray_watch", False):
            return

        def watch(signum, frame):
            INTERRUPTED.set()
            if callable(handler):
                handler(signum, frame)
            elif handler != signal.SIG_IGN:
                raise KeyboardInterrupt

        watch.kdray_watch = True
        signal.signal(signal.SIGINT, watch)
