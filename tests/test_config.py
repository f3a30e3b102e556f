"""Job config: YAML + overrides into typed dataclasses; every bad value stops the load with key, value, rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdray.config import Job, job_from_dict, job_hash, load_job, parse_override, to_dict, to_yaml
from kdray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_published_recipe():
    job = job_from_dict({})
    assert (job.optim.lr, job.optim.momentum, job.optim.weight_decay, job.optim.poly_power) == (0.02, 0.9, 1e-4, 0.9)
    assert job.losses.ce.enabled and job.losses.ce.aux_weight == 0.4
    assert (job.losses.cwd.weight, job.losses.cwd.temperature) == (3.0, 4.0)
    assert job.losses.pairwise.weight == 10 and job.losses.ifvd.weight == 20
    assert (job.losses.adversarial.term_weight(), job.losses.adversarial.d_weight) == (0.001, 0.1)
    assert job.losses.i2ckd.margin == 0.5 and job.losses.i2ckd.normalize is True
    assert job.teacher.arch == "deeplabv3_resnet101"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], 0.001),  # hinge: w_adv
        (["losses.adversarial.objective=wgan_gp"], 0.1),  # WGAN-GP: the student's term is −w_d · mean D(z_S)
        (["losses.adversarial.objective=wgan_gp", "losses.adversarial.d_weight=0.3"], 0.3),  # follows w_d
        (["losses.adversarial.objective=wgan_gp", "losses.adversarial.weight=0.02"], 0.02),  # set: as set
        (["losses.adversarial.weight=0.05"], 0.05),
        (["losses.adversarial.weight=0"], 0.0),
    ],
)
def test_the_adversarial_student_weight_follows_the_objective(overrides, expected):
    job = job_from_dict({}, ["losses.adversarial.enabled=true", *overrides])
    assert job.losses.adversarial.term_weight() == expected
    from kdray.losses.objective import DistillationObjective

    objective = DistillationObjective(job.losses, num_classes=5, student_channels=8, teacher_channels=16)
    assert objective.weights["adversarial"] == expected
    assert f"{expected:g} * HO" in objective.formula()


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump({"losses": {"kd": {"enabled": True}}}))
    job = load_job(path, ["losses.kd.weight=0.5", "losses.i2ckd.enabled=true", "data.crop=[32, 48]",
                          "optim.iterations=10", "teacher.checkpoint=null", "run.seed=3"])
    assert job.name == "j"
    assert job.losses.kd.enabled and job.losses.kd.weight == 0.5 and isinstance(job.losses.kd.weight, float)
    assert job.losses.i2ckd.enabled
    assert job.data.crop == (32, 48)
    assert job.optim.iterations == 10 and job.run.seed == 3 and job.teacher.checkpoint is None


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_from_dict({"teacher": {"checkpoint": "runs/t.pt"}, "run": {"output_dir": "out"}})
    assert job.teacher.checkpoint == str(tmp_path.resolve() / "runs/t.pt")
    assert job.run.output_dir == str(tmp_path.resolve() / "out")


def test_roundtrip_through_yaml():
    job = job_from_dict({"losses": {"kd": {"enabled": True, "temperature": 4}}, "data": {"crop": [32, 32]}})
    again = job_from_dict(yaml.safe_load(to_yaml(job)))
    assert again == job and job_hash(again) == job_hash(job)


def test_hash_ignores_tracking_but_not_training_values():
    base = job_from_dict({})
    assert job_hash(job_from_dict({"tracking": {"experiment": "x"}})) == job_hash(base)
    assert job_hash(job_from_dict({"losses": {"kd": {"enabled": True}}})) != job_hash(base)


@pytest.mark.parametrize(
    ("data", "overrides", "fragments"),
    [
        ({"optim": {"lrr": 0.1}}, [], ["optim.lrr", "unknown key", "did you mean 'lr'"]),
        ({"bogus": 1}, [], ["bogus", "unknown key"]),
        ({}, ["optim.lr=-0.1"], ["optim.lr", "-0.1", "> 0"]),
        ({}, ["optim.lr=fast"], ["optim.lr", "'fast'", "a number"]),
        ({}, ["optim.iterations=1.5"], ["optim.iterations", "1.5", "an integer"]),
        ({}, ["losses.kd.weight=-1"], ["losses.kd.weight", "-1", ">= 0"]),
        ({}, ["losses.ce.enabled=false"], ["losses", "enable at least one"]),
        ({}, ["losses.kd.reduction=sum"], ["losses.kd.reduction", "'sum'", "pixel_mean"]),
        ({}, ["losses.kd.enabled=maybe"], ["losses.kd.enabled", "'maybe'", "true/false"]),
        ({}, ["data.crop=[256, 256]"], ["data.crop", "[256, 256]", "64x64"]),
        ({}, ["data.crop=[64]"], ["data.crop", "a list of 2"]),
        ({}, ["data.scale_range=[2.0, 0.5]"], ["data.scale_range", "low <= high"]),
        ({}, ["data.batch_size=15", "run.workers=2"], ["data.batch_size", "15", "evenly"]),
        ({}, ["data.batch_size=2", "run.workers=2"], ["data.batch_size", "at least 2 images"]),
        ({}, ["data.ignore_index=3"], ["data.ignore_index", "3", "class id"]),
        ({}, ["data.dataset=imagenet"], ["data.dataset", "'imagenet'", "synthetic"]),
        ({}, ["student.arch=deeplabv3_resnet19"], ["student.arch", "deeplabv3_resnet18"]),
        ({}, ["student.width=0"], ["student.width", "> 0"]),
        ({}, ["losses.kd.temperature=0"], ["losses.kd.temperature", "> 0"]),
        ({}, ["losses.i2ckd.margin=-0.5"], ["losses.i2ckd.margin", ">= 0"]),
        ({}, ["losses.adversarial.weight=-0.1"], ["losses.adversarial.weight", "-0.1", ">= 0"]),
        ({}, ["losses.adversarial.d_weight=0"], ["losses.adversarial.d_weight", "0.0", "> 0"]),
        ({}, ["losses.adversarial.gp_weight=-1"], ["losses.adversarial.gp_weight", "-1.0", ">= 0"]),
        ({}, ["run.amp=bf16"], ["run.amp", "GPU"]),
        ({}, ["run.channels_last=true"], ["run.channels_last", "GPU"]),
        ({}, ["run.cuda_graphs=true"], ["run.cuda_graphs", "True", "GPU runs"]),
        ({}, ["optim.momentum=1.0"], ["optim.momentum", "[0, 1)"]),
        ({}, ["optim.lr"], ["optim.lr", "key.sub=value"]),
        ({}, ["optim.lr.x=1"], ["optim.lr", "expected a number"]),
    ],
)
def test_bad_values_name_key_value_and_rule(data, overrides, fragments):
    with pytest.raises(ConfigError) as err:
        job_from_dict(data, overrides)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_job(listy)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_every_shipped_job_loads():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs
    for path in jobs:
        assert isinstance(load_job(path), Job)


def test_to_dict_has_every_section():
    assert set(to_dict(Job())) == {"name", "data", "teacher", "student", "losses", "optim", "run", "tracking",
                                "sweep", "plugins"}


@pytest.mark.parametrize("module", ["kdray.train", "kdray.teacher"])
def test_command_line_bad_value_exits_2_with_one_line(module, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, "--job", str(REPO / "jobs/demo.yaml"), "optim.lr=-1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: optim.lr: got -1.0; must be > 0"]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", ["kdray.train", "kdray.teacher"])
def test_command_help(module):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--job" in proc.stdout and "key.sub=value" in proc.stdout


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_time_budget_must_be_a_finite_count_of_seconds(value):
    with pytest.raises(ConfigError, match=rf"optim.time_budget_s: got {value}.*finite and >= 0"):
        job_from_dict({"optim": {"time_budget_s": value}})


def test_a_time_budget_counts_in_the_students_digest_only_when_set_and_never_in_the_teachers():
    from kdray.config.cache import teacher_key

    plain = Job()
    assert job_hash(job_from_dict({}, ["optim.time_budget_s=0"])) == job_hash(plain)  # digests before it stand
    budgeted = job_from_dict({}, ["optim.time_budget_s=600"])
    assert job_hash(budgeted) != job_hash(plain)  # where a run stops decides its weights: no resume across it
    assert teacher_key(budgeted) == teacher_key(plain)  # the teacher's training ignores it
