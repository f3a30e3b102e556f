"""`teacher.checkpoint: auto`: the demo's teacher lives in a per-user cache, keyed by what determines it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdray.config import load_job
from kdray.config.cache import cache_dir

DEMO = Path(__file__).resolve().parents[1] / "jobs" / "demo.yaml"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDRAY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_demo_teacher_is_in_the_cache_whatever_the_directory(tmp_path, monkeypatch, cache):
    paths = []
    for where in ("a", "b"):
        (tmp_path / where).mkdir()
        monkeypatch.chdir(tmp_path / where)
        paths.append(load_job(DEMO).teacher.checkpoint)
    assert paths[0] == paths[1]
    assert Path(paths[0]).parent == cache / "teachers" and Path(paths[0]).name.startswith("demo-deeplabv3_resnet18-")


@pytest.mark.parametrize("override", ["teacher.width=0.25", "teacher.iterations=10", "data.num_classes=8",
                                      "data.synthetic.seed=3", "optim.lr=0.1", "run.seed=1", "losses.ce.aux_weight=0"])
def test_a_setting_that_changes_the_teacher_changes_the_file(override):
    base = load_job(DEMO).teacher.checkpoint
    changed = load_job(DEMO, [override]).teacher.checkpoint
    assert (changed != base) == (override != "data.num_classes=8")  # the demo already has 8 classes


@pytest.mark.parametrize("override", ["losses.kd.enabled=true", "student.width=0.25", "run.output_dir=/elsewhere",
                                      "optim.log_interval=7", "tracking.experiment=x", "run.workers=2",
                                      # the demo teacher trains for its own teacher.iterations, not the student's
                                      "optim.iterations=100", "optim.time_budget_s=60", "sweep.time_budget_s=600"])
def test_settings_that_leave_the_teacher_alone_keep_the_file(override):
    assert load_job(DEMO, [override]).teacher.checkpoint == load_job(DEMO).teacher.checkpoint


def test_an_explicit_path_is_kept(tmp_path):
    assert load_job(DEMO, [f"teacher.checkpoint={tmp_path}/t.pt"]).teacher.checkpoint == f"{tmp_path}/t.pt"


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KDRAY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == (tmp_path / "xdg" / "kdray").resolve()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == (tmp_path / "home" / ".cache" / "kdray").resolve()


def test_without_its_own_iterations_a_teacher_trains_for_optim_iterations():
    job = ["teacher.iterations=null"]
    assert load_job(DEMO, [*job, "optim.iterations=100"]).teacher.checkpoint != load_job(DEMO, job).teacher.checkpoint
