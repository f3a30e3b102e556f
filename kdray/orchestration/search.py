"""The search's Optuna side: a sampler whose settings are written out, and trials told to the study as they ended.

Ray's `OptunaSearch` tells the study COMPLETE, with the last reported score, for every trial that returns,
including those ASHA stopped at a low rung, so TPE learns from truncated scores as if they were final; and it
leaves the sampler to Optuna's version default (Optuna 5 turned on multivariate TPE and the constant liar), so
the same space and seed proposed other trials on another Optuna. `KdraySearch` tells a trial

- COMPLETE with its metric when it reached its last iteration (`iterations_total`),
- PRUNED when it ended short of it (the scheduler stopped it; its evaluations are the trial's intermediate
  values, stepped by the training iteration),
- FAIL when it raised or reported no finite metric,

and leaves a trial cut short by Ctrl+C running in the study, so that a resumed sweep continues it.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import tempfile
from typing import Any

from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.searcher import Searcher
from ray.tune.search.util import _set_search_properties_backwards_compatible

from kdray import contract
from kdray.orchestration.sampler import make_sampler


class KdraySearch(OptunaSearch):
    """`OptunaSearch` with a sampler of `kdray.orchestration.sampler` (TPE unless `sampler="random"`) and the trial
    states of the module docstring. With `metric` and `mode` lists (several objectives) the study has one direction
    per objective and a completed trial is told every objective's last value (no intermediate values: Optuna keeps
    none for several objectives)."""

    def __init__(self, *, seed: int, sampler: str = "tpe", constant_liar: bool = False, **kwargs: Any):
        super().__init__(sampler=make_sampler(sampler, seed, constant_liar), **kwargs)
        self._reported: dict[str, set[int]] = {}  # trial id -> the iterations told as intermediate values

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """An evaluation: the trial's intermediate value at its training iteration (Tune's own counter restarts
        after a restore), each iteration once."""
        if isinstance(self.metric, list):  # Optuna keeps no intermediate values for several objectives
            return
        value, step = result.get(self.metric), result.get(contract.ITERATION)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials or not _finite(value) or step is None:
            return
        reported = self._reported.setdefault(trial_id, set())
        if int(step) not in reported:
            self._ot_trials[trial_id].report(float(value), int(step))
            reported.add(int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        from optuna.trial import TrialState

        from kdray.orchestration.trial import INTERRUPTED

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or {}
        value = [result.get(m) for m in self.metric] if isinstance(self.metric, list) else result.get(self.metric)
        done, total = result.get(contract.ITERATION, 0), result.get(contract.ITERATIONS_TOTAL, 0)
        short = bool(total) and done < total
        if short and not error and INTERRUPTED.is_set():
            return  # Ctrl+C, not the scheduler: the trial goes on when the sweep is resumed
        if not error:
            self.on_trial_result(trial_id, result)  # Tune hands the last evaluation to this call alone
        trial = self._ot_trials[trial_id]
        if error or not all(map(_finite, value if isinstance(value, list) else [value])):
            self._ot_study.tell(trial, state=TrialState.FAIL)
        elif short:
            self._ot_study.tell(trial, state=TrialState.PRUNED)
        else:
            told = [float(v) for v in value] if isinstance(value, list) else float(value)
            self._ot_study.tell(trial, told, state=TrialState.COMPLETE)
        self._completed_trials.add(trial_id)

    def trial_states(self) -> dict[str, int]:
        """How many of the study's trials are in each state (`COMPLETE`, `PRUNED`, `FAIL`, `RUNNING`, ...)."""
        return state_counts(self._ot_study)


def state_counts(study) -> dict[str, int]:
    """An Optuna study's trials by state name, counted."""
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def save_wrapped(path: str, state: dict, searcher) -> None:
    """A searcher wrapper's save (`kdray.orchestration.halving.BracketGate`, `kdray.orchestration.pack.PackSearch`):
    its own `state` and the wrapped `searcher`'s own save, in the one file Tune gives it."""
    with tempfile.TemporaryDirectory() as tmp:
        inner = os.path.join(tmp, "searcher.pkl")
        searcher.save(inner)
        with open(inner, "rb") as f:
            data = f.read()
    with open(path, "wb") as f:
        pickle.dump({"wrapper": state, "searcher": data}, f)


def restore_wrapped(path: str, searcher) -> dict:
    """The reverse of `save_wrapped`: restores the wrapped `searcher` and returns the wrapper's own state."""
    with open(path, "rb") as f:
        saved = pickle.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        inner = os.path.join(tmp, "searcher.pkl")
        with open(inner, "wb") as f:
            f.write(saved["searcher"])
        searcher.restore(inner)
    return saved.get("wrapper", saved.get("gate"))


class WrappedSearcher(Searcher):
    """A searcher that wraps another (`self.searcher`, as Ray's ConcurrencyLimiter does): the search properties, the
    metric and mode are the wrapped one's; its own state (every attribute but the wrapped searcher) is saved with the
    wrapped searcher's own save, in the one file Tune gives it (`save_wrapped`). Subclasses decide what to propose
    and what to pass on: `kdray.orchestration.halving.BracketGate`, `kdray.orchestration.pack.PackSearch`."""

    def __init__(self, searcher: Searcher):
        if not isinstance(searcher, Searcher):
            raise ValueError(f"searcher: got {type(searcher).__name__}; expected a ray.tune Searcher")
        self.searcher = searcher
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec) -> bool:
        return _set_search_properties_backwards_compatible(self.searcher.set_search_properties, metric, mode,
                                                           config, **spec)

    @property
    def metric(self):
        return self.searcher.metric

    @property
    def mode(self):
        return self.searcher.mode

    def get_state(self) -> dict:
        state = self.__dict__.copy()
        del state["searcher"]
        return copy.deepcopy(state)

    def set_state(self, state: dict) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        save_wrapped(checkpoint_path, self.get_state(), self.searcher)

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(restore_wrapped(checkpoint_path, self.searcher))
