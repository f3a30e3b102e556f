"""A search over several objectives (`objectives:` in a space): what the space accepts and refuses, the study
Optuna is told (one direction per objective, every objective's value), the Pareto front the confirmation stage
takes first, and the summary's columns. Driven without a Ray cluster (Tune calls these same methods)."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import yaml

from kdray import contract
from kdray.config import load_job
from kdray.errors import ConfigError
from kdray.orchestration.confirm import candidates, pareto_front
from kdray.orchestration.outcome import FINISHED, SweepOutcome, TrialSummary, summary_table
from kdray.orchestration.search import KdraySearch
from kdray.space import load_space

REPO = Path(__file__).resolve().parents[1]
DEMO = load_job(REPO / "jobs" / "demo.yaml")
PARETO = REPO / "search_spaces" / "pareto_demo.yaml"
TWO = [{"metric": "val/miou", "mode": "max"}, {"metric": "student/latency_ms", "mode": "min"}]


def space_file(tmp_path, **changes):
    data = yaml.safe_load(PARETO.read_text())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_shipped_pareto_space_searches_the_student_for_miou_and_latency():
    space = load_space(PARETO, DEMO)
    assert space.multi_objective and space.objectives == (("val/miou", "max"), ("student/latency_ms", "min"))
    assert (space.metric, space.mode, space.scheduler.kind) == ("val/miou", "max", "none")
    assert {d.key for d in space.dimensions} >= {"student.arch", "student.width"}


@pytest.mark.parametrize(("changes", "error"), [
    ({"objectives": TWO[:1]}, "objectives: got .*one objective: use metric and mode"),
    ({"metric": "val/miou"}, "metric: a space with objectives takes its metric and mode from them"),
    ({"objectives": [TWO[0], {"metric": "student/latency", "mode": "min"}]},
     r"objectives\[1\].metric: got 'student/latency' \(did you mean student/latency_ms"),
    ({"objectives": [TWO[0], {"metric": "val/miou", "mode": "min"}]}, "each metric once"),
    ({"objectives": [TWO[0], {"metric": "student/params", "mode": "smallest"}]},
     r"objectives\[1\].mode: got 'smallest'; expected max or min"),
    ({"objectives": [TWO[0], {"metric": "student/params"}]}, r"objectives\[1\]: got .*expected \{metric: M"),
    ({"scheduler": {"kind": "asha", "grace_period": 1}},
     "scheduler: asha stops trials by one metric, and this search has 2 objectives: set scheduler kind none"),
    ({"overrides": {"run.latency_repeats": 0}},
     "student/latency_ms is an objective, but run.latency_repeats is 0"),
])
def test_a_bad_objective_is_refused_with_its_key(tmp_path, changes, error):
    with pytest.raises(ConfigError, match=error):
        load_space(space_file(tmp_path, **changes), DEMO)


def test_the_study_has_a_direction_per_objective_and_is_told_every_value():
    space = load_space(PARETO, DEMO)
    search = KdraySearch(space=space.define_by_run(), metric=["val/miou", "student/latency_ms"], mode=["max", "min"],
                         seed=0)
    for trial in ("a", "b", "c"):
        assert search.suggest(trial) is not None
    done = {contract.ITERATION: 600, contract.ITERATIONS_TOTAL: 600}
    search.on_trial_result("a", {"val/miou": 0.2, "student/latency_ms": 3.0, contract.ITERATION: 150,
                                 contract.ITERATIONS_TOTAL: 600})  # no intermediate values for several objectives
    search.on_trial_complete("a", {"val/miou": 0.3, "student/latency_ms": 2.5, **done})
    search.on_trial_complete("b", {"val/miou": 0.4, "student/latency_ms": math.nan, **done})
    search.on_trial_complete("c", None, error=True)
    study = search._ot_study
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert trials[0].values == pytest.approx([0.3, 2.5]) and trials[0].intermediate_values == {}


def _naive_front(points, modes):
    """Dominance spelled out with loops: p is off the front when some q is no worse everywhere, better somewhere."""
    out = []
    for i, p in enumerate(points):
        dominated = False
        for j, q in enumerate(points):
            if i == j:
                continue
            no_worse, better = True, False
            for a, b, mode in zip(q, p, modes):
                if (a < b if mode == "max" else a > b):
                    no_worse = False
                if (a > b if mode == "max" else a < b):
                    better = True
            dominated = dominated or (no_worse and better)
        out.append(not dominated)
    return out


@pytest.mark.parametrize("seed", range(5))
def test_the_front_matches_dominance_spelled_out(seed):
    rng = random.Random(seed)
    points = [(rng.choice([0.1, 0.2, 0.3]), rng.choice([1.0, 2.0, 3.0]), rng.random()) for _ in range(12)]
    points += points[:2]  # equal points: neither dominates the other
    for modes in itertools.product(("max", "min"), repeat=3):
        assert pareto_front(points, modes) == _naive_front(points, modes)


def _trial(trial_id, miou, latency, x):
    return TrialSummary(trial_id, "KD", 0, {"losses.kd.weight": x}, miou, miou, 600, FINISHED,
                        objectives=(miou, latency))


def test_the_confirmation_takes_the_front_first_then_the_rest_by_the_first_objective():
    trials = [_trial("best", 0.40, 9.0, 1.0),  # front: the most accurate
              _trial("dominated", 0.35, 9.5, 2.0),  # slower and worse than "best"
              _trial("fast", 0.20, 1.0, 3.0),  # front: the fastest
              _trial("middle", 0.30, 4.0, 4.0),  # front
              _trial("no-latency", 0.39, math.nan, 5.0)]  # no value of the second objective: behind the front
    objectives = (("val/miou", "max"), ("student/latency_ms", "min"))
    chosen = candidates(trials, 5, "max", objectives)
    assert [c.trial_id for c in chosen] == ["best", "middle", "fast", "no-latency", "dominated"]
    assert [c.trial_id for c in candidates(trials, 2, "max", objectives)] == ["best", "middle"]
    assert [c.trial_id for c in candidates(trials, 2, "max")] == ["best", "no-latency"]  # one objective: by mIoU


def test_the_summary_shows_the_other_objectives(tmp_path):
    outcome = SweepOutcome("s", tmp_path, "u", "e", "p", [_trial("a", 0.4, 9.0, 1.0), _trial("b", 0.2, 1.25, 2.0)],
                           1.0, objectives=(("val/miou", "max"), ("student/latency_ms", "min")))
    text = summary_table(outcome)
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert header[-4:] == ["last val/miou", "student/latency_ms", "iteration", "status"]
    assert "| 1.25 |" in text and "| 9 |" in text
