"""An ablation at equal device-seconds (`match:` in the space): parsing, the arithmetic against a by-hand
reference, the rows it writes, a row that cannot be timed, and the timing itself on a tiny job. The whole path
through Ray is tests/test_sweep.py's ablation test."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from kdray.config import job_from_dict, load_job
from kdray.errors import ConfigError, MatchError
from kdray.orchestration.matching import apply, derive, from_state, match_lines, measure_rows, to_state
from kdray.space import load_space, parse_space

REPO = Path(__file__).resolve().parents[1]
DEMO = load_job(REPO / "jobs" / "demo.yaml")  # 600 iterations, an evaluation every 150 (4 evaluations)


def space(tmp_path, match, rows=None, **more):
    rows = rows or [{"name": "CE"}, {"name": "KD", "set": {"losses.kd.enabled": True}},
                    {"name": "KD x2", "set": {"losses.kd.enabled": True, "run.workers": 2}}]
    path = tmp_path / "matched.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "seeds": [0], "rows": rows, "match": match, **more}))
    return load_space(path, DEMO)


def naive(budget, seconds, workers, job_iterations=600, eval_interval=150):
    """The rule written out once more: iterations = round(budget / (workers x s)), evaluations as many as the
    job's, an interval rounded up."""
    iterations = max(1, int(math.floor(budget / (workers * seconds) + 0.5)))
    evaluations = job_iterations // eval_interval
    return iterations, -(-iterations // evaluations)


def test_each_row_gets_the_iterations_its_measured_seconds_fit_in_the_budget(tmp_path):
    s = space(tmp_path, {"row": "KD"})
    seconds = {"CE": 0.2, "KD": 0.5, "KD x2": 0.3}
    matched = derive(s, DEMO, seconds)
    budget = 0.5 * 1 * 600  # KD's seconds at the job's iterations
    assert [(m.row, m.iterations, m.eval_interval) for m in matched] == [
        ("CE", *naive(budget, 0.2, 1)), ("KD", 600, 150), ("KD x2", *naive(budget, 0.3, 2))]
    assert [m.device_seconds for m in matched] == pytest.approx([300.0, 300.0, 300.0], rel=0.01)
    fixed = derive(space(tmp_path, {"device_seconds": 45}), DEMO, seconds)
    assert [m.iterations for m in fixed] == [naive(45, 0.2, 1)[0], naive(45, 0.5, 1)[0], naive(45, 0.3, 2)[0]]
    assert [m.iterations for m in derive(s, DEMO, seconds, cap=4)] == [4, 4, 4]  # a smoke test's
    assert derive(space(tmp_path, {"device_seconds": 0.01}), DEMO, seconds)[0].iterations == 1  # never none


def test_the_rows_carry_their_iterations_and_the_plan_says_them(tmp_path):
    s = space(tmp_path, {"row": "KD"})
    matched = derive(s, DEMO, {"CE": 0.25, "KD": 0.5, "KD x2": 0.5})
    apply(s, matched)
    assert s.trial_overrides({"kdray.row": "CE", "run.seed": 0})["optim.iterations"] == 1200
    assert s.trial_overrides({"kdray.row": "CE", "run.seed": 0})["optim.eval_interval"] == 300
    assert s.trial_overrides({"kdray.row": "KD x2", "run.seed": 0})["optim.iterations"] == 300
    lines = match_lines(s, matched, "here")
    assert lines[0].startswith("equal device-seconds: 300.0 per trial (row 'KD' at the job's iterations)")
    assert "  row 'CE': 0.25 s/iteration x 1 worker(s) -> 1200 iterations, evaluation every 300" in lines
    assert from_state(to_state(matched)) == matched  # what a resumed sweep reads back


def test_a_row_that_cannot_be_timed_keeps_its_iterations_unless_it_sets_the_budget(tmp_path):
    s = space(tmp_path, {"row": "KD"})
    why = "loss term 'kd' is nan at iteration 1"
    matched = derive(s, DEMO, {"CE": 0.2, "KD": 0.5, "KD x2": why})
    assert (matched[2].iterations, matched[2].unmeasured, math.isnan(matched[2].s_per_iteration)) == (600, why, True)
    assert f"  row 'KD x2': not timed ({why}): at its job's 600 iterations" in match_lines(s, matched, "here")
    with pytest.raises(MatchError, match="match.row: 'KD' sets the budget, but its training iteration could not"):
        derive(s, DEMO, {"CE": 0.2, "KD": why, "KD x2": 0.3})


@pytest.mark.parametrize(("match", "error"), [
    ({"device_seconds": 60, "row": "KD"}, "give one of device_seconds and row"),
    ({}, "give one of device_seconds and row"),
    ({"row": "kd"}, "match.row: got 'kd' \\(did you mean KD"),
    ({"device_seconds": -5}, "match.device_seconds: got -5; expected seconds > 0"),
    ({"device_seconds": 60, "budget": 3}, "unknown key\\(s\\) budget"),
    ({"row": "KD", "measure": {"iterations": 0}}, "match.measure.iterations: got 0; expected an integer >= 1"),
    ("KD", "expected {device_seconds: SECONDS} or {row: NAME}"),
])
def test_a_bad_match_is_refused_with_its_key(tmp_path, match, error):
    with pytest.raises(ConfigError, match=error):
        space(tmp_path, match)


def test_a_match_leaves_no_row_its_own_iterations(tmp_path):
    rows = [{"name": "CE"}, {"name": "long", "set": {"optim.iterations": 9000}}]
    with pytest.raises(ConfigError, match=r"rows\[1\] \(long\).set.optim.iterations: a matched ablation derives"):
        space(tmp_path, {"row": "CE"}, rows=rows)
    with pytest.raises(ConfigError, match="overrides.optim.eval_interval: a matched ablation derives"):
        space(tmp_path, {"row": "CE"}, overrides={"optim.eval_interval": 10})
    with pytest.raises(ConfigError, match=r"match: unknown key for a search space \(match is an ablation's"):
        parse_space("space: {losses.kd.weight: {uniform: [0, 1]}}\nmatch: {row: CE}\n")


def test_rows_are_timed_on_their_own_jobs_and_a_diverging_one_says_why(tmp_path, teacher_file):
    tiny = job_from_dict({"name": "tiny", "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4,
                                                   "synthetic": {"image_size": 32, "train_length": 16,
                                                                 "val_length": 4}},
                          "teacher": {"arch": "deeplabv3_resnet18", "width": 0.125, "checkpoint": teacher_file},
                          "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
                          "optim": {"iterations": 4, "eval_interval": 2}, "run": {"threads": 1}})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "seeds": [0], "match": {"row": "KD", "measure": {
        "iterations": 2, "warmup": 1}}, "rows": [
        {"name": "KD", "set": {"losses.kd.enabled": True}},
        {"name": "diverges", "set": {"losses.kd.enabled": True, "optim.lr": 1.0e30, "optim.momentum": 0.0}}]}))
    s = load_space(path, tiny)
    seconds = measure_rows(s, tiny, on_ray=False)
    assert seconds["KD"] > 0 and "at iteration" in seconds["diverges"]
    matched = derive(s, tiny, seconds)
    assert [(m.row, m.iterations, m.unmeasured is None) for m in matched] == [("KD", 4, True),
                                                                              ("diverges", 4, False)]
