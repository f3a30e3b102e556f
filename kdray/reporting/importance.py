"""Parameter importance of a search sweep, by Optuna's PED-ANOVA on a study rebuilt from the MLflow runs.

PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator`, Optuna's default) is used because it handles the
conditional knobs of a define-by-run space and needs nothing beyond numpy; fANOVA, the alternative, fits a
scikit-learn random forest (not a kdray dependency) and drops conditional parameters. It measures how
differently each parameter is distributed among the best trials (the top quantile) than among all trials.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import create_trial

ESTIMATOR = "PED-ANOVA (optuna.importance.PedAnovaImportanceEvaluator)"
MIN_TRIALS = 4  # below this there is no "top quantile" to compare with the rest
TOP_TRIALS = 5  # PED-ANOVA's documentation asks for at least 5 trials in the top quantile


@dataclass(frozen=True)
class Importance:
    values: dict[str, float]  # knob -> importance, normalised to sum to 1 (equal when nothing differs), descending
    quantile: float  # the top quantile compared with all trials
    n_trials: int
    estimator: str = ESTIMATOR

    @property
    def n_top(self) -> int:
        return math.ceil(self.quantile * self.n_trials)

    def describe(self) -> str:
        return (f"{self.estimator}: how differently each parameter is distributed among the best {self.n_top} of "
                f"{self.n_trials} trials (target quantile {self.quantile:.2f}) than among all of them; normalised to "
                "sum to 1")


def _hashable(value: object) -> object:
    """Lists as tuples: PED-ANOVA hashes each distribution, so a choice such as [512, 1024] cannot be a list."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


def hashable_space(points: list[tuple[dict[str, object], float]], space: dict[str, BaseDistribution]
                   ) -> tuple[list[tuple[dict[str, object], float]], dict[str, BaseDistribution]]:
    """The points and the space with list choices and values as tuples (see `_hashable`)."""
    space = {k: CategoricalDistribution([_hashable(c) for c in d.choices])
             if isinstance(d, CategoricalDistribution) else d for k, d in space.items()}
    return [({k: _hashable(v) for k, v in p.items()}, value) for p, value in points], space


def rebuild_study(points: list[tuple[dict[str, object], float]], space: dict[str, BaseDistribution],
                  maximize: bool = True) -> optuna.Study:
    """An in-memory study with one COMPLETE trial per (active params, value)."""
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    study.add_trials([create_trial(params=params, distributions={k: space[k] for k in params}, value=value)
                      for params, value in points])
    return study


def param_importance(points: list[tuple[dict[str, object], float]], space: dict[str, BaseDistribution],
                     maximize: bool = True) -> Importance | None:
    """PED-ANOVA importance of each knob; None with fewer than MIN_TRIALS trials or no knob."""
    points = [(p, v) for p, v in points if v is not None and math.isfinite(v)]
    if len(points) < MIN_TRIALS or not space:
        return None
    # the top quantile holds >= TOP_TRIALS trials when there are enough, and never all of them
    quantile = min(0.5, max(0.1, TOP_TRIALS / len(points)))
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the study's creation is logged at INFO; keep the caller's output clean
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "few trials in a regime": the quantile above already bounds it
            study = rebuild_study(*hashable_space(points, space), maximize)
            values = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile),
                                           params=sorted({k for p, _ in points for k in p}))
    finally:
        logger.setLevel(level)
    values = {k: float(v) for k, v in values.items()}
    for key in space:
        values.setdefault(key, 0.0)  # a knob active in no scored trial
    return Importance(dict(sorted(values.items(), key=lambda kv: -kv[1])), quantile, len(points))
