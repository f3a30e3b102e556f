"""What became of a sweep and of each of its trials: statuses, failure reasons as values, the summary table,
and closing the MLflow runs a sweep leaves open however it ends.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray import contract
from kdray.orchestration.tracking import Tracker
from kdray.space import SEED_KEY

# What a trial can end as, in the summary table. The sweep's exit code (`SweepOutcome.exit_code`, listed in
# `kdray sweep --help`) is 0 only when every trial finished or was stopped early, 130 when interrupted (4 when by
# the sweep's time budget), else 1.
FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED, NOT_STARTED = ("finished", "stopped early", "failed", "interrupted",
                                                             "not started")


class TrialFailed(RuntimeError):
    """A trial ended as a failure on purpose (a non-finite loss, a config its space cannot build, its workers'
    error); `reason` is the one line its run's FAILURE tag and the sweep's summary show."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def reason(err: BaseException) -> str:
    """The last line of an error's text (a worker's own exception, under Ray's wrapping), without the dotted
    class path Ray puts before it (`kdray.errors.DataError: ...` -> `DataError: ...`)."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else type(err).__name__
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", last)


def worker_reason(err: BaseException) -> str:
    """Why a Ray Train run failed, from the exception a worker raised: Train keeps it whole in the error's
    `worker_failures` (the text of the error itself is a truncated snippet, cut mid-word). `Name: message`, the
    lowest rank's; `reason(err)` when no worker exception is at hand."""
    failures = getattr(err, "worker_failures", None) or {}
    if failures:
        exc = failures[min(failures)]
        for attribute in ("_base_exc", "cause"):  # Train's traceback wrapper, Ray's task-error wrapper
            exc = getattr(exc, attribute, None) or exc
        message = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
    return reason(err)


def is_trial_failure(err: object) -> bool:
    """Whether `err` is a `TrialFailed` (Ray re-raises a remote exception as an instance of its class, with the
    original as `cause`)."""
    return isinstance(err, TrialFailed) or isinstance(getattr(err, "cause", None), TrialFailed)


def failure_reason(err: BaseException | str | None, default: str = "the trial failed") -> str:
    """Why a trial failed, as its summary says it: a `TrialFailed`'s own reason, else the last line of the error
    Tune kept (`reason`); without the dotted class path either way."""
    if err is None or (isinstance(err, str) and not err.strip()):
        return default
    if isinstance(err, str):  # Tune's text trace, when the error itself could not be pickled
        return reason(RuntimeError(err))
    if is_trial_failure(err):
        return reason(err if isinstance(err, TrialFailed) else err.cause)  # type: ignore[attr-defined]
    return reason(err)


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
    stage: str = ""  # a search sweep's: search | confirm (kdray.orchestration.confirm)
    scored_on: str = ""  # what its metric measured: "tune split", or the val split's name ("" unknown)
    objectives: tuple[float, ...] = ()  # a multi-objective search's: each objective's last value (NaN: none)

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
    verdict: str | None = None  # a search's winner, by its confirmed mean, and whether its gains exceed seed noise
    metric: str = contract.VAL_MIOU  # what ranks the trials, and which way
    mode: str = "max"
    budget_spent: bool = False  # interrupted by its time budget (sweep.time_budget_s), not by Ctrl+C
    objectives: tuple[tuple[str, str], ...] = ()  # a multi-objective search's (metric, mode) pairs
    experiment_id: str = ""  # the MLflow experiment's id (for the UI's links)

    @property
    def complete(self) -> bool:
        """The sweep ran to its end (every trial ended, one way or another)."""
        return not self.interrupted

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 4 if self.budget_spent else 130
        return 0 if all(t.ok for t in self.trials) and not self.never_created else 1

    def counts(self) -> str:
        """`"3 finished, 1 stopped early, 1 failed"`: every status that occurs, in a fixed order."""
        order = (FINISHED, STOPPED_EARLY, FAILED, INTERRUPTED, NOT_STARTED)
        tally = {s: sum(t.status.split(":")[0] == s for t in self.trials) for s in order}
        tally[NOT_STARTED] += self.never_created
        return ", ".join(f"{n} {s}" for s, n in tally.items() if n)


def summary_table(outcome: SweepOutcome) -> str:
    """The results as a Markdown table, best first; trials Tune never created are counted under it.

    A search sweep's trials come stage by stage: every search trial first (an extension's with the first
    search's, ranked together), then the confirmation trials, ranked within their stage. A `scored on` column
    appears when the trials' metric was measured on different splits (a search on a tuning split, its
    confirmation on val): those scores do not compare across it."""
    from kdray.reporting.render import markdown_table

    metric, mode = outcome.metric, outcome.mode
    staged = any(t.stage for t in outcome.trials)
    trials = in_stage_order(outcome.trials, mode)
    splits = {t.scored_on for t in trials if t.scored_on}
    scored = len(splits) > 1
    keys = sorted({k for t in trials if t.stage != "confirm" for k in t.params if k != SEED_KEY})
    others = [m for m, _ in outcome.objectives[1:]]  # a multi-objective search's other objectives, last values
    head = ["rank", *(["stage"] if staged else []), "trial", "row / method", "seed", *keys,
            *(["scored on"] if scored else []), f"best {metric}", f"last {metric}", *others, "iteration", "status"]
    rows, rank = [], {}
    for t in trials:  # ranked within each kind of stage
        rank[t.stage] = rank.get(t.stage, 0) + 1
        confirm = t.stage == "confirm"  # a confirmation row's values are its search trial's: its row names it
        rows.append([str(rank[t.stage]), *([t.stage] if staged else []), t.trial_id, t.label, str(t.seed),
                     *("" if confirm else _fmt(t.params.get(k, "")) for k in keys),
                     *([t.scored_on] if scored else []), _pct(t.best), _pct(t.last),
                     *(_value(t.objectives, i + 1) for i in range(len(others))), str(t.iteration), t.status])
    text = markdown_table(head, rows, "r" + "l" * staged + "llr" + "l" * len(keys) + "l" * scored + "rr"
                          + "r" * len(others) + "rl")
    if scored:
        text += ("\n\nThe search trials were scored on the tuning split (held-out training images), the "
                 "confirmation trials on val: compare scores within a stage only.")
    if outcome.never_created:
        text += f"\n\n{outcome.never_created} more trial(s) of the space never started."
    return text


def in_stage_order(trials: list[TrialSummary], mode: str = "max") -> list[TrialSummary]:
    """A search sweep's trials as the summary shows them: every search trial, best first (an extension's ranked
    with the first search's), then the confirmation trials in the order their stages ranked them. Trials
    without stages (an ablation) as they are."""
    if not any(t.stage for t in trials):
        return list(trials)
    return [*best_first([t for t in trials if t.stage != "confirm"], mode),
            *[t for t in trials if t.stage == "confirm"]]


def selection_key(trial: Any, mode: str = "max") -> tuple:
    """How a search ranks its trials, for its confirmation stage (`kdray.orchestration.confirm.candidates`) and
    its summary alike: the longer run first (a finished trial before one stopped early), then the last value (the
    score it was selected by; highest first for mode max), ties by trial id."""
    sign = -1 if mode == "max" else 1
    return -trial.iteration, sign * trial.last, trial.trial_id


def best_first(trials: list[TrialSummary], mode: str = "max") -> list[TrialSummary]:
    """`trials` in the order the search selects by (`selection_key`): those that finished or were stopped early
    with a finite last value, then the others (failed, interrupted, never scored) in the order they came."""
    scored = [t.ok and math.isfinite(t.last) for t in trials]
    ranked = sorted((t for t, ok in zip(trials, scored) if ok), key=lambda t: selection_key(t, mode))
    return [*ranked, *(t for t, ok in zip(trials, scored) if not ok)]


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _value(values: tuple[float, ...], i: int) -> str:
    """Objective `i` of a trial, 4 significant digits; blank when it has none (a confirmation row)."""
    return f"{values[i]:.4g}" if i < len(values) and math.isfinite(values[i]) else ""


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def close_open_runs(tracker: Tracker, sweep_id: str, parent: str | None, interrupted: bool, why: str) -> None:
    """End every trial run of the sweep still RUNNING (and the sweep's run, when given): KILLED when the sweep
    was interrupted (resumable), FAILED otherwise, with the reason."""
    status = "KILLED" if interrupted else "FAILED"
    for run_id in tracker.running_runs(sweep_id):
        if not interrupted:
            tracker.set_tags(run_id, {contract.FAILURE: why[:5000]})
        tracker.end_run(run_id, status)
    if parent is not None:
        tracker.set_tags(parent, {contract.FAILURE: why[:5000]})
        tracker.end_run(parent, status)
