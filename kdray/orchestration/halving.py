"""Synchronous successive halving: early stopping whose decisions do not depend on which trial got there first.

ASHA decides each trial's fate the moment it reaches a rung, against whichever trials happened to reach that rung
before it; with several trials running at once, the order in which results arrive decides which trials are
stopped, and two runs of the same seeded search crown different winners. `SyncHalving` takes each decision on a
complete rung instead:

- Trials are numbered in the order Tune adds them (0, 1, ...; the searcher's order) and grouped into **brackets**
  of `bracket_size` consecutive trials (default: all `num_samples` in one bracket; the last bracket holds the
  remainder when `num_samples` is not a multiple).
- Rungs lie at `grace_period * reduction_factor**k` iterations (k = 0, 1, ... while below `max_t`), counted in the
  reported `iteration` (`kdray.contract.ITERATION`: Tune's `training_iteration` restarts after a restore).
- A trial whose result reaches a rung records its metric there (its first result at or past the rung). If its
  bracket has not decided that rung yet, the trial is PAUSED (its resources go to the next trial).
- The rung is decided once every trial of the bracket still alive at it has recorded; a trial that errors, or ends
  or is stopped before it records, leaves that rung's population. The top `ceil(n / reduction_factor)` of the `n`
  recorded (by metric, in the sweep's mode; a missing or non-finite metric ranks last; ties go to the lower trial
  number) are promoted: paused ones are resumed, the others stopped (a paused loser ends TERMINATED with its last
  result, as ASHA's stopped trials do). A trial past the last rung runs to `max_t`.

Every decision is a function of the reported values alone, never of their timing. `BracketGate` does the same for
the searcher: it proposes the first trial of bracket b only once every trial of the earlier brackets has ended, so
the sampler proposes bracket b knowing exactly brackets < b. It also caps the trials running at once without
counting the paused ones (Tune's `ConcurrencyLimiter` counts a paused trial as running, which would leave a
bracket larger than the cap waiting forever on trials never started).

Both hold trial ids, numbers and values only (no controller, no Trial objects), so Tune can pickle them.

Tune 2.60 does not save the scheduler with the experiment (it pickles it once, into `tuner.pkl`, when the Tuner is
created), and a restored experiment re-adds its trials ordered by their last result's time. `SyncHalving` given a
`state_path` therefore keeps its own state there, a small JSON file rewritten (atomically) whenever it changes: the
trials' numbers, each rung's records and decision, the trials that left. A scheduler built on (or unpickled
next to) that file takes it up again: a restored trial keeps its number whatever order it is re-added in, the
ended ones count as left, the decisions taken stand, and a restored trial that was paused on a rung is paused
again (Tune re-adds it PENDING): still waiting, it waits; promoted, it resumes; a loser, it is stopped unstarted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import TYPE_CHECKING, Any

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler
from ray.tune.search.searcher import Searcher

from kdray import contract
from kdray.orchestration.search import WrappedSearcher

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

_PAUSED, _PENDING, _RUNNING, _TERMINATED, _ERROR = "PAUSED", "PENDING", "RUNNING", "TERMINATED", "ERROR"


def milestones(grace_period: float, max_t: float, reduction_factor: float) -> tuple[float, ...]:
    """The rungs: `grace_period * reduction_factor**k` for k = 0, 1, ... while below `max_t`."""
    out, k = [], 0
    while grace_period * reduction_factor**k < max_t:
        out.append(grace_period * reduction_factor**k)
        k += 1
    return tuple(out)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: got {value!r}; expected an integer >= 1" + (" or None" if allow_none else ""))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _set_status(trial, status: str) -> None:
    """A trial's status, before Tune files it (on_trial_add runs before add_trial sorts the trial by status)."""
    if callable(getattr(trial, "set_status", None)):
        trial.set_status(status)
    else:
        trial.status = status


def _searcher_hook(tune_controller, hook: str, trial_id: str) -> None:
    """Tell the sweep's searcher (BracketGate, maybe inside a ConcurrencyLimiter) that a trial paused or resumed:
    Ray's own hook for this (`on_pause`/`on_unpause`, as its BOHB scheduler uses them)."""
    searcher = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
    method = getattr(searcher, hook, None)
    if callable(method):
        method(trial_id)


class SyncHalving(FIFOScheduler):
    """Synchronous successive halving with decisions on complete rungs (the rule of the module docstring).

    Args:
        num_samples: the trials Tune will add (the space's `num_samples`).
        max_t: the iterations of a whole trial.
        grace_period: the first rung, in iterations.
        reduction_factor: eta: a rung keeps the top ceil(n / eta).
        bracket_size: trials per bracket (None: all `num_samples`; larger than `num_samples`: clipped).
        max_concurrent: at most this many trials running when resuming promoted ones (None: no cap; new trials are
            capped by the searcher, `BracketGate`).
        time_attr: the reported progress key (the iteration, not Tune's training_iteration).
        metric, mode: usually set by Tune from the TuneConfig.
        state_path: a JSON file the scheduler keeps its state in (read back when it exists: a restored sweep);
            None: in memory only. Keep it out of the top level of Tune's experiment folder: a restore copies the
            `.json`/`.pkl` files there into Tune's driver staging folder and uploads them back at each experiment
            checkpoint, putting the restored (older) copy over the one the scheduler keeps writing.
    """

    _supports_buffered_results = False  # one result at a time: a PAUSE must land on the result that reached a rung

    def __init__(self, *, num_samples: int, max_t: int, grace_period: float = 1, reduction_factor: float = 2,
                 bracket_size: int | None = None, max_concurrent: int | None = None,
                 time_attr: str = contract.ITERATION, metric: str | None = None, mode: str | None = None,
                 state_path: str | os.PathLike | None = None):
        _positive_int("num_samples", num_samples)
        _positive_int("bracket_size", bracket_size, allow_none=True)
        _positive_int("max_concurrent", max_concurrent, allow_none=True)
        if not _finite(max_t) or max_t <= 0:
            raise ValueError(f"max_t: got {max_t!r}; expected a number > 0")
        if not _finite(grace_period) or grace_period <= 0:
            raise ValueError(f"grace_period: got {grace_period!r}; expected a number > 0")
        if not _finite(reduction_factor) or reduction_factor <= 1:
            raise ValueError(f"reduction_factor: got {reduction_factor!r}; expected a number > 1")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode: got {mode!r}; expected min or max")
        super().__init__()
        self._metric, self._mode = metric, mode
        self._time_attr = time_attr
        self.num_samples, self.max_t = num_samples, max_t
        self.reduction_factor = float(reduction_factor)
        self.bracket_size = min(bracket_size or num_samples, num_samples)
        self.milestones = milestones(grace_period, max_t, self.reduction_factor)
        self.max_concurrent = max_concurrent
        self._number: dict[str, int] = {}  # trial id -> its number, in Tune's order
        self._ids: dict[int, str] = {}
        self._level: dict[str, int] = {}  # trial id -> the rung it is heading for (len(milestones): past the last)
        self._latest: dict[str, tuple[float, float]] = {}  # trial id -> (time, metric) of its last result
        self._records: dict[tuple[int, int], dict[int, float]] = {}  # (bracket, rung) -> {number: metric}
        self._promoted: dict[tuple[int, int], tuple[int, ...]] = {}  # decided rungs -> the numbers promoted
        self._left: set[int] = set()  # numbers of the trials that errored, ended or were stopped
        self._paused: set[str] = set()  # paused on an undecided rung
        self._resume: set[str] = set()  # promoted while paused: handed back by choose_trial_to_run
        self.stopped: dict[int, float] = {}  # number -> the rung (iterations) it was stopped at, for the record
        self.state_path = os.fspath(state_path) if state_path is not None else None
        self._written: str | None = None  # the state last written to state_path
        self._loaded = False  # state_path read (at construction, or at first use after unpickling)
        self._reconcile_due = False  # loaded from a file: Tune is re-adding the restored trials
        self._ensure_loaded()

    # the state file --------------------------------------------------------------------------------------------

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._loaded, self._written = False, None  # the file (if any) is newer than the pickle: read it at first use

    def _settings(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "bracket_size": self.bracket_size,
                "milestones": list(self.milestones)}

    def _state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "settings": self._settings(),
            "numbers": self._number,
            "levels": self._level,
            "latest": {t: list(latest) for t, latest in sorted(self._latest.items())},
            "records": [[b, r, [[n, v] for n, v in sorted(values.items())]]
                        for (b, r), values in sorted(self._records.items())],
            "promoted": [[b, r, list(kept)] for (b, r), kept in sorted(self._promoted.items())],
            "left": sorted(self._left),
            "stopped": [[n, rung] for n, rung in sorted(self.stopped.items())],
        }

    def _save(self) -> None:
        """Write the state to state_path when it changed: a temporary file next to it, then os.replace."""
        if self.state_path is None:
            return
        text = json.dumps(self._state(), sort_keys=True)
        if text == self._written:
            return
        folder = os.path.dirname(os.path.abspath(self.state_path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".sync_halving.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.state_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self._written = text

    def _ensure_loaded(self) -> None:
        """Take up the state in state_path, once, when the file exists (it replaces what is in memory)."""
        if self._loaded:
            return
        self._loaded = True
        if self.state_path is None or not os.path.exists(self.state_path):
            return
        with open(self.state_path) as f:
            text = f.read()
        try:
            state = json.loads(text)
            settings = state["settings"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.state_path}: not a SyncHalving state file ({err})") from None
        if settings != self._settings():
            raise ValueError(f"{self.state_path}: the state of a SyncHalving with {settings}; this one has "
                             f"{self._settings()} (remove the file to start the halving afresh)")
        self._number = {t: int(n) for t, n in state["numbers"].items()}
        self._ids = {n: t for t, n in self._number.items()}
        self._level = {t: int(r) for t, r in state["levels"].items()}
        self._records = {(b, r): {int(n): float(v) for n, v in values} for b, r, values in state["records"]}
        self._promoted = {(b, r): tuple(kept) for b, r, kept in state["promoted"]}
        self._left = set(state["left"])
        self.stopped = {int(n): rung for n, rung in state["stopped"]}
        self._latest = {t: (float(time), float(value)) for t, (time, value) in state["latest"].items()}
        self._paused, self._resume = set(), set()  # Tune re-adds a paused trial PENDING: on_trial_add pauses it
        self._written = text
        self._reconcile_due = True
        logger.info("SyncHalving: took up %s (%d trials, %d rungs decided)", self.state_path, len(self._number),
                    len(self._promoted))

    def _reconcile(self, tune_controller) -> None:
        """Once, after a load, when Tune has re-added the restored trials: a trial the file knows that Tune did
        not re-add (its experiment state was older than the file) is forgotten when it holds the last number and
        recorded nothing, else it counts as left, so that no rung waits for it; then the re-added paused trials
        whose rung is decided are resumed or stopped."""
        if not self._reconcile_due:
            return
        self._reconcile_due = False
        present = {t.trial_id for t in tune_controller.get_trials()}
        for number in sorted((n for t, n in self._number.items() if t not in present), reverse=True):
            trial_id = self._ids[number]
            untouched = (number not in self._left and number not in self.stopped
                         and not any(number in values for values in self._records.values()))
            if untouched and number == len(self._number) - 1:
                logger.warning("SyncHalving: trial %s (number %d) is not in the restored experiment: forgotten",
                               trial_id, number)
                del self._number[trial_id], self._ids[number], self._level[trial_id]
            else:
                logger.warning("SyncHalving: trial %s (number %d) is not in the restored experiment: it leaves",
                               trial_id, number)
                self._leave_id(tune_controller, trial_id)
        self._settle(tune_controller, None)

    # Tune's settings -----------------------------------------------------------------------------------------

    def set_search_properties(self, metric: str | None, mode: str | None, **spec) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    @property
    def mode(self) -> str | None:
        return self._mode

    # the rule --------------------------------------------------------------------------------------------------

    def bracket_of(self, number: int) -> int:
        return number // self.bracket_size

    def _members(self, bracket: int, rung: int) -> tuple[int, ...]:
        """The trials a rung waits for: the whole bracket at the first rung, the promoted of the rung below after."""
        if rung == 0:
            first = bracket * self.bracket_size
            return tuple(range(first, min(first + self.bracket_size, self.num_samples)))
        return self._promoted[(bracket, rung - 1)]

    def ranking(self, values: dict[int, float]) -> list[int]:
        """Trial numbers best first: by metric in the mode, a non-finite or missing metric last, ties by number."""
        sign = -1.0 if self._mode == "max" else 1.0
        return sorted(values, key=lambda n: (0, sign * values[n], n) if _finite(values[n]) else (1, 0.0, n))

    def _decide(self, bracket: int, rung: int) -> bool:
        """Take the rung's decision if every trial still alive at it has recorded; whether it is taken."""
        key = (bracket, rung)
        if key in self._promoted:
            return True
        if (bracket, rung - 1) not in self._promoted and rung > 0:
            return False
        records = self._records.setdefault(key, {})
        if any(n not in records and n not in self._left for n in self._members(bracket, rung)):
            return False
        alive = {n: v for n, v in records.items() if n not in self._left}
        keep = math.ceil(len(alive) / self.reduction_factor)
        self._promoted[key] = tuple(sorted(self.ranking(alive)[:keep]))
        for n in alive:
            if n not in self._promoted[key]:
                self.stopped[n] = self.milestones[rung]
        logger.debug("bracket %d rung %g: promoted %s of %s", bracket, self.milestones[rung], self._promoted[key],
                     sorted(alive))
        return True

    def _advance(self, trial_id: str) -> str:
        """Record the trial's latest result at each rung it reached (deciding them when complete): CONTINUE past
        them, PAUSE on an undecided one, STOP when it lost one."""
        number = self._number[trial_id]
        bracket = self.bracket_of(number)
        while True:
            rung = self._level[trial_id]
            time, value = self._latest.get(trial_id, (0.0, float("nan")))
            if rung >= len(self.milestones) or time < self.milestones[rung]:
                return TrialScheduler.CONTINUE
            self._records.setdefault((bracket, rung), {}).setdefault(number, value)
            self._decide(bracket, rung)
            promoted = self._promoted.get((bracket, rung))
            if promoted is None:
                return TrialScheduler.PAUSE
            if number not in promoted:
                return TrialScheduler.STOP
            self._level[trial_id] = rung + 1

    def _settle(self, tune_controller, current: str | None) -> None:
        """Act on the decisions taken, until none is left to act on: resume the promoted paused trials, stop the
        paused losers (`current`, the trial whose result is being handled, gets its action from on_trial_result)."""
        changed = True
        while changed:
            changed = False
            for trial_id in sorted(self._paused, key=self._number.__getitem__):
                if trial_id == current or trial_id not in self._paused:
                    continue
                action = self._advance(trial_id)
                if action == TrialScheduler.PAUSE:
                    continue
                changed = True
                self._paused.discard(trial_id)
                trial = self._trial(tune_controller, trial_id)
                if action == TrialScheduler.CONTINUE:
                    self._resume.add(trial_id)
                    _searcher_hook(tune_controller, "on_unpause", trial_id)
                else:
                    self._left.add(self._number[trial_id])
                    if trial is not None and trial.status not in (_TERMINATED, _ERROR):
                        tune_controller.stop_trial(trial)  # Tune: TERMINATED, the searcher told it completed

    @staticmethod
    def _trial(tune_controller, trial_id: str) -> Trial | None:
        return next((t for t in tune_controller.get_trials() if t.trial_id == trial_id), None)

    # Tune's calls ----------------------------------------------------------------------------------------------

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        if self._metric is None or self._mode is None:
            raise ValueError("SyncHalving needs a metric and a mode: pass them to it or to tune.TuneConfig")
        self._ensure_loaded()
        try:
            self._add(tune_controller, trial)
        finally:
            self._save()

    def _add(self, tune_controller, trial: Trial) -> None:
        trial_id = trial.trial_id
        if trial_id in self._number and not self._reconcile_due:  # re-added after a recovered failure
            return  # (it left on the error): it keeps its number
        if trial_id in self._number:  # re-added by a restored experiment: it keeps its number
            if trial.status in (_TERMINATED, _ERROR):  # ended, it leaves
                self._leave_id(tune_controller, trial_id)
            elif self._advance(trial_id) == TrialScheduler.CONTINUE:  # it runs on from its checkpoint
                _searcher_hook(tune_controller, "on_unpause", trial_id)
            else:  # it was paused on a rung (Tune re-adds it PENDING): paused again, _reconcile settles it
                _set_status(trial, _PAUSED)
                self._paused.add(trial_id)
                _searcher_hook(tune_controller, "on_pause", trial_id)
            return
        self._reconcile(tune_controller)  # a new trial: every restored one was re-added before it
        number = len(self._number)
        self._number[trial.trial_id], self._ids[number] = number, trial.trial_id
        self._level[trial.trial_id] = 0
        if number >= self.num_samples:
            logger.warning("trial %s is number %d of num_samples=%d: no bracket holds it, it runs to max_t",
                           trial.trial_id, number, self.num_samples)
            self._level[trial.trial_id] = len(self.milestones)
        if trial.status in (_TERMINATED, _ERROR):  # a restored sweep's ended trial
            self._left.add(number)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._ensure_loaded()
        self._reconcile(tune_controller)
        try:
            return self._result(tune_controller, trial, result)
        finally:
            self._save()

    def _result(self, tune_controller, trial: Trial, result: dict) -> str:
        trial_id = trial.trial_id
        if trial_id not in self._number:
            return TrialScheduler.CONTINUE
        self._resume.discard(trial_id)
        time = result.get(self._time_attr)
        if not _finite(time):
            return TrialScheduler.CONTINUE
        value = result.get(self._metric)
        self._latest[trial_id] = (float(time), float(value) if _finite(value) else float("nan"))
        self._advance(trial_id)  # records it at the rungs it reached, deciding those it completes
        self._settle(tune_controller, trial_id)  # which may promote paused trials onto this one's next rung
        action = self._advance(trial_id)
        if action == TrialScheduler.PAUSE:
            if trial_id not in self._paused:
                self._paused.add(trial_id)
                _searcher_hook(tune_controller, "on_pause", trial_id)
        else:
            if trial_id in self._paused:  # a result after a pause Tune did not carry out: the rung is decided now
                self._paused.discard(trial_id)
                _searcher_hook(tune_controller, "on_unpause", trial_id)
            if action == TrialScheduler.STOP:
                self._left.add(self._number[trial_id])
        return action

    def _leave(self, tune_controller, trial: Trial) -> None:
        self._ensure_loaded()
        self._reconcile(tune_controller)
        try:
            self._leave_id(tune_controller, trial.trial_id)
        finally:
            self._save()

    def _leave_id(self, tune_controller, trial_id: str) -> None:
        """The trial errored, ended or was stopped: it leaves the population of every rung not decided yet."""
        number = self._number.get(trial_id)
        if number is None or number in self._left:
            return
        self._left.add(number)
        self._paused.discard(trial_id)
        self._resume.discard(trial_id)
        bracket = self.bracket_of(number)
        rung = self._level.get(trial_id, 0)
        if rung < len(self.milestones) and self._decide(bracket, rung):
            self._settle(tune_controller, trial_id)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._leave(tune_controller, trial)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._leave(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._leave(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        """A pending trial first (Tune starts those anyway), then a promoted paused one, lowest number first,
        while fewer than `max_concurrent` trials run."""
        self._ensure_loaded()
        if self._reconcile_due:
            self._reconcile(tune_controller)
            self._save()
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == _PENDING:
                return trial
        running = sum(1 for t in trials if t.status == _RUNNING and t.trial_id not in self._paused)
        if self.max_concurrent is not None and running >= self.max_concurrent:
            return None
        waiting = [t for t in trials if t.status == _PAUSED and t.trial_id in self._resume]
        return min(waiting, key=lambda t: self._number[t.trial_id]) if waiting else None

    def decisions(self) -> dict[tuple[int, float], tuple[int, ...]]:
        """(bracket, rung in iterations) -> the trial numbers promoted there."""
        self._ensure_loaded()
        return {(b, self.milestones[r]): kept for (b, r), kept in sorted(self._promoted.items())}

    def debug_string(self) -> str:
        return (f"Using SyncHalving: rungs {[f'{m:g}' for m in self.milestones]}, brackets of {self.bracket_size}, "
                f"{len(self.stopped)} stopped, {len(self._paused)} paused")


class BracketGate(WrappedSearcher):
    """A searcher wrapper (like Ray's ConcurrencyLimiter) that proposes bracket b's first trial only once every
    trial of brackets < b has completed, and caps the trials running at once, paused ones not counted.

    `suggest` returns None ("not now": Tune asks again later) while it waits, the wrapped searcher's answer
    otherwise (Searcher.FINISHED included). A trial Tune stops while paused completes without a result; the gate
    hands the wrapped searcher that trial's last result instead (so Optuna records it PRUNED, not FAILED).
    """

    def __init__(self, searcher: Searcher, bracket_size: int, max_concurrent: int | None = None):
        _positive_int("bracket_size", bracket_size)
        _positive_int("max_concurrent", max_concurrent, allow_none=True)
        super().__init__(searcher)
        self.bracket_size = bracket_size
        self.max_concurrent = max_concurrent
        self.order: dict[str, int] = {}  # trial id -> the order it was proposed in
        self.completed: set[str] = set()
        self.paused: set[str] = set()
        self.last_results: dict[str, dict] = {}

    def running(self) -> int:
        return sum(1 for t in self.order if t not in self.completed and t not in self.paused)

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.max_concurrent is not None and self.running() >= self.max_concurrent:
            return None
        number = len(self.order)
        earlier = self.bracket_of(number) * self.bracket_size
        if sum(1 for t in self.completed if self.order[t] < earlier) < earlier:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.order[trial_id] = number
        return suggestion

    def bracket_of(self, number: int) -> int:
        return number // self.bracket_size

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.order and trial_id not in self.completed:
            self.last_results[trial_id] = dict(result)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is None and not error:  # stopped while paused: Tune hands no result
            result = self.last_results.get(trial_id)
        if trial_id in self.order:
            self.completed.add(trial_id)
        self.paused.discard(trial_id)
        self.last_results.pop(trial_id, None)
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def on_pause(self, trial_id: str) -> None:
        if trial_id in self.order and trial_id not in self.completed:
            self.paused.add(trial_id)
        hook = getattr(self.searcher, "on_pause", None)
        if callable(hook):
            hook(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.paused.discard(trial_id)
        hook = getattr(self.searcher, "on_unpause", None)
        if callable(hook):
            hook(trial_id)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """A ConcurrencyLimiter around the gate (Tune's max_concurrent_trials) leaves the cap to it: the gate's
        cap does not count paused trials."""
        self.max_concurrent = max_concurrent
        return True

    def add_evaluated_point(self, parameters, value, error=False, pruned=False, intermediate_values=None):
        return self.searcher.add_evaluated_point(parameters, value, error, pruned, intermediate_values)
