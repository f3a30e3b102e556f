"""The pure parts of benchmarks/search_efficiency.py: spend curves, checkpoints, the verdict, ASHA's expected spend
and the grid (no Ray, no training)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "search_efficiency.py"
spec = importlib.util.spec_from_file_location("search_efficiency", PATH)
se = sys.modules["search_efficiency"] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
spec.loader.exec_module(se)


def trial(name, end, steps, finished, score, **config):
    return se.TrialRecord(name, end, steps, finished, score, config)


def test_spend_curve_orders_by_end_counts_stopped_trials_and_keeps_the_best_finished():
    trials = [trial("c", 3.0, 150, True, 60.0, x=3), trial("a", 1.0, 50, False, 70.0, x=1),
              trial("b", 2.0, 150, True, 55.0, x=2), trial("d", 4.0, 50, False, math.nan, x=4),
              trial("e", 5.0, 150, True, 58.0, x=5)]
    curve = se.spend_curve(trials)
    assert [p.spent for p in curve] == [50, 200, 350, 400, 550]
    # the stopped trial's higher score never counts: only full-length trials are best-so-far
    assert [p.best.name if p.best else None for p in curve] == [None, "b", "c", "c", "c"]
    assert math.isnan(curve[0].score) and curve[-1].score == 60.0


def test_best_at_takes_the_last_point_within_the_budget():
    curve = se.spend_curve([trial("a", 1, 100, True, 50.0), trial("b", 2, 100, True, 60.0)])
    assert se.best_at(curve, 150).best.name == "a" and se.best_at(curve, 150).spent == 100
    assert se.best_at(curve, 200).best.name == "b"
    assert se.best_at(curve, 1e9).spent == 200
    empty = se.best_at(curve, 99)
    assert empty.best is None and empty.spent == 0 and math.isnan(empty.score)
    assert se.best_at([], 100).best is None


def test_budget_fraction():
    assert se.budget_fraction(540, 1800) == pytest.approx(0.3)
    assert math.isnan(se.budget_fraction(10, 0))


def test_verdict_counts_repetitions_within_the_tolerance():
    assert se.goal_met(-0.3, 0.3) and se.goal_met(0.5, 0.3)
    assert not se.goal_met(-0.31, 0.3) and not se.goal_met(None, 0.3) and not se.goal_met(math.nan, 0.3)
    line = se.verdict([-0.1, 0.2, -0.2], 0.3, 0.3)
    assert ": met, in 3 of 3 repetition(s)" in line and "+0.20" in line
    assert ": partly met, in 1 of 2" in se.verdict([-0.1, None], 0.3, 0.3)
    assert "none finished" in se.verdict([-0.1, None], 0.3, 0.3)
    assert ": not met, in 0 of 1" in se.verdict([-1.0], 0.3, 0.3)
    assert ": not met, in 0 of 0" in se.verdict([], 0.3, 0.3)


def test_asha_milestones_as_kdray_sets_up_ray_asha():
    assert se.asha_milestones(150, 50, 1, 3.0) == [50]  # the rung at 150 is the end: it stops nothing
    assert se.asha_milestones(600, 150, 1, 3.0) == [150, 450]
    assert se.asha_milestones(600, 150, 1, 2.0) == [150, 300]
    assert se.asha_milestones(4, 2, 1, 3.0) == [2]
    assert se.asha_milestones(100, 50, 2, 3.0) == []  # grace as long as the trial


def test_asha_expected_costs_and_samples_for_budget():
    costs = se.asha_expected_costs(20, 150, [50], 3.0, sims=300)
    assert costs[0] == 150  # the first trial at a rung always continues
    assert 50 < sum(costs[10:]) / 10 < 150 * 0.6  # later ones mostly stop at the rung
    n, spent = se.samples_for_budget(1800, 150, [50], 3.0, sims=300)
    assert spent >= 1800 and sum(se.asha_expected_costs(n - 1, 150, [50], 3.0, sims=300)) < 1800
    assert se.samples_for_budget(300, 150, [], 3.0) == (2, 300.0)  # no early stopping: budget / iterations


def test_grid_presets_and_sizes():
    assert se.grid_sizes("default") == (3, 2, 2) and se.grid_sizes("2x3x1") == (2, 3, 1)
    for bad in ("3x2", "axbxc", "1x1x3", "0x1x1", "tiny"):
        with pytest.raises(ValueError):
            se.grid_sizes(bad)
    rows = se.grid_rows("default")
    assert len(rows) == 12 and len({name for name, _ in rows}) == 12
    weights = sorted({r[se.KD_WEIGHT] for _, r in rows})
    assert weights == [0.316, 1.0, 3.162] and sorted({r[se.KD_T] for _, r in rows}) == [1.0, 4.0]
    assert all(0.1 <= w <= 10 for w in weights)
    kd = {se.KD_ON: True, se.KD_WEIGHT: 1.0, se.KD_T: 1.0}
    assert se.grid_rows("quick") == [("KD w1 T1", {**kd, se.I2CKD_ON: False}),
                                     ("KD w1 T1 + I2CKD", {**kd, se.I2CKD_ON: True})]


def test_config_identity_and_names():
    a = {se.KD_WEIGHT: 0.1 + 0.2, se.KD_ON: True}
    assert se.config_key(a) == se.config_key({se.KD_ON: True, se.KD_WEIGHT: 0.3})
    assert se.describe({se.KD_ON: True, se.KD_WEIGHT: 2.4137, se.KD_T: 5.31, se.I2CKD_ON: True,
                        se.I2CKD_WEIGHT: 0.0512, se.I2CKD_MARGIN: 1.2}) == "KD w2.41 T5.31 + I2CKD w0.0512 m1.2"
    assert se.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)
    assert se.mean_std([1.0]) == (1.0, 0.0, 1) and se.mean_std([])[2] == 0


def test_progress_keeps_ended_sweeps_for_a_run_cut_short_and_sets_aside_other_settings(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "progress.json"
    outcome = SimpleNamespace(sweep_id="s1", experiment="demo", tracking_uri="sqlite:///x.db", wall_s=12.5,
                              trials=[1, 2, 3])
    first = se.Progress(path, "shape A")
    assert first.get("tpe-seed0") is None
    first.put("tpe-seed0", outcome, {"t1": {"losses.kd.weight": 0.5, "losses.i2ckd.enabled": True}})
    again, configs = se.Progress(path, "shape A").get("tpe-seed0")
    assert (again.sweep_id, again.experiment, again.tracking_uri, again.wall_s, again.trials) == \
        ("s1", "demo", "sqlite:///x.db", 12.5, 3)
    assert configs == {"t1": {"losses.kd.weight": 0.5, "losses.i2ckd.enabled": True}}
    assert se.Progress(path, "shape B").get("tpe-seed0") is None  # other settings: a fresh start
    assert path.with_suffix(".stale").is_file() and not path.exists()
    assert se._count(3) == 3 and se._count([1, 2]) == 2
