"""A sweep's time budget (`sweep.time_budget_s`): its deadline, the Tune callback that stops the run as Ctrl+C
does, the exit code, and the checks before anything starts. The whole path through Ray is
tests/test_sweep.py::test_a_sweep_its_time_budget_stops_resumes_with_every_trial_exactly_once."""

from __future__ import annotations

import math
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch
import yaml

from kdray.errors import ConfigError
from kdray.orchestration import budget
from kdray.orchestration.outcome import INTERRUPTED, NOT_STARTED, SweepOutcome, TrialSummary
from kdray.orchestration.plan import SweepRequest, dry_run
from kdray.orchestration.trial import INTERRUPTED as CTRL_C

DEMO = str(Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture
def handler(monkeypatch):
    """The process's SIGINT handler, replaced by a recorder (as Tune's would be called)."""
    calls = []
    monkeypatch.setattr(signal, "getsignal", lambda signum: lambda s, frame: calls.append(s))
    yield calls
    CTRL_C.clear()
    budget.BUDGET_SPENT.clear()
    budget.start_budget(0)


def test_no_budget_never_passes():
    deadline = budget.start_budget(0)
    assert deadline.at == math.inf and not deadline.passed and deadline.left_s() == math.inf


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_a_budget_must_be_finite_and_not_negative(bad):
    with pytest.raises(ValueError, match="sweep.time_budget_s"):
        budget.start_budget(bad)


def test_the_callback_stops_the_run_as_ctrl_c_once_the_deadline_passed_and_only_once(handler):
    clock = Clock()
    deadline = budget.start_budget(60, clock)
    watch = budget.TimeBudget()
    watch.on_step_begin(0, [])
    clock.now += 59.9
    watch.on_step_begin(1, [])
    assert handler == [] and not budget.BUDGET_SPENT.is_set() and deadline.left_s() == pytest.approx(0.1)
    clock.now += 0.1
    watch.on_step_begin(2, [])
    watch.on_step_begin(3, [])  # Tune takes a few steps to wind down: one stop is enough
    assert handler == [signal.SIGINT] and budget.BUDGET_SPENT.is_set() and CTRL_C.is_set()
    # Tune pickles its callbacks with the experiment: a restored run watches afresh, against this process's budget
    again = pickle.loads(pickle.dumps(watch))
    again.on_step_begin(0, [])
    assert handler == [signal.SIGINT, signal.SIGINT]
    budget.start_budget(60, clock)  # a new sweep (or a resumed one) starts its budget afresh
    assert not budget.BUDGET_SPENT.is_set()


def test_off_the_main_thread_the_callback_leaves_the_stop_to_the_main_thread(handler):
    clock = Clock()
    budget.start_budget(1, clock)
    clock.now += 5
    thread = threading.Thread(target=budget.TimeBudget().on_step_begin, args=(0, []))
    thread.start()
    thread.join()
    assert handler == [] and not budget.BUDGET_SPENT.is_set()


def test_a_sweep_its_budget_stopped_exits_4_and_ctrl_c_130(tmp_path):
    trials = [TrialSummary("a", "CE", 0, {}, 0.5, 0.5, 2, INTERRUPTED),
              TrialSummary("b", "KD", 0, {}, math.nan, math.nan, 0, NOT_STARTED)]
    assert SweepOutcome("s", tmp_path, "u", "e", "p", trials, 1.0, interrupted=True, budget_spent=True).exit_code == 4
    assert SweepOutcome("s", tmp_path, "u", "e", "p", trials, 1.0, interrupted=True).exit_code == 130


@pytest.fixture()
def teacher_file(tmp_path):
    """Weights of the demo job's teacher (random): the checks read them, nothing trains."""
    from kdray.config import load_job
    from kdray.models import build_model

    job = load_job(DEMO)
    path = tmp_path / "teacher.pt"
    torch.save(build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width).state_dict(), path)
    return str(path)


def _space(tmp_path, **more):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"name": "abl", "seeds": [0], "rows": [{"name": "CE"}], **more}))
    return str(path)


def test_the_plan_states_both_budgets(tmp_path, teacher_file):
    lines = dry_run(SweepRequest(DEMO, _space(tmp_path), [f"teacher.checkpoint={teacher_file}",
                                                              "sweep.time_budget_s=7200", "optim.time_budget_s=90"]))
    text = "\n".join(lines)
    assert "time budget of the sweep: 7200 s (sweep.time_budget_s): it then stops as Ctrl+C stops it, exit code 4" \
        in text
    assert "time budget per trial: 90 s of training (optim.time_budget_s)" in text


def test_a_budget_is_checked_before_anything_starts(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match=r"sweep.time_budget_s: got -5.0.*finite and >= 0"):
        dry_run(SweepRequest(DEMO, _space(tmp_path), [f"teacher.checkpoint={teacher_file}",
                                                          "sweep.time_budget_s=-5"]))
    searched = tmp_path / "search.yaml"
    searched.write_text(yaml.safe_dump({"name": "s", "num_samples": 2, "space": {
        "losses.kd.enabled": True, "sweep.time_budget_s": {"choice": [60, 120]}}}))
    with pytest.raises(ConfigError, match="space: sweep.time_budget_s is the sweep's own setting, not a trial's"):
        dry_run(SweepRequest(DEMO, str(searched), [f"teacher.checkpoint={teacher_file}"]))


def test_a_row_cannot_set_the_sweeps_budget(tmp_path, teacher_file):
    space = _space(tmp_path, rows=[{"name": "CE"}, {"name": "KD", "set": {"losses.kd.enabled": True,
                                                                         "sweep.time_budget_s": 60}}])
    with pytest.raises(ConfigError, match=r"rows \(KD\): set.sweep.time_budget_s is the sweep's own setting"):
        dry_run(SweepRequest(DEMO, space, [f"teacher.checkpoint={teacher_file}"]))


def test_the_training_plan_states_a_runs_budget():
    from kdray.config import load_job
    from kdray.train import plan

    job = load_job(DEMO, ["optim.time_budget_s=120"])
    assert "  time budget: 120 s of training (optim.time_budget_s)" in plan(job, {"train": 10, "val": 2})
    assert "time budget" not in plan(load_job(DEMO), {"train": 10, "val": 2})


def test_the_sweeps_budget_is_no_trial_setting_in_the_plan_and_a_training_says_it_ignores_it(tmp_path, capsys):
    from kdray import train
    from kdray.config import load_job
    from kdray.space import load_space, plan_lines

    job = load_job(DEMO)
    space = load_space(_space(tmp_path, overrides={"sweep.time_budget_s": 60, "run.threads": 1}), job)
    assert "  fixed for every trial: run.threads=1" in plan_lines(space, job)
    assert train.main(["--job", DEMO, "--dry-run", "sweep.time_budget_s=5"]) == 0
    assert "note: sweep.time_budget_s=5 bounds a sweep (python -m kdray.sweep); one training ignores it" \
        in capsys.readouterr().out
