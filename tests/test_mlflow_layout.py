"""What a researcher finds in MLflow: the experiment's kind, each run's active params and searched knobs, its data
as dataset inputs (digest, sizes), its description, the sweep's best trial on the sweep's run, the teacher's run
beside (not under) the sweep that trained it, and `kdray.train` / `kdray.teacher` recorded as runs.

A temporary SQLite store each; no Ray. The two trainings on the synthetic demo are a few iterations long (slow).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

import kdray.teacher
import kdray.train
from kdray import contract
from kdray.cli import default_job
from kdray.config import flatten, load_job, to_dict
from kdray.data.manifest import run_manifests, split_manifest
from kdray.orchestration.record import (
    active_params,
    log_datasets,
    record_best,
    searched_keys,
    sweep_note,
    trial_note,
    ui_url,
)
from kdray.orchestration.tracking import Tracker
from kdray.space import ROW_KEY, load_space

REPO = Path(__file__).resolve().parents[1]
DEMO_SPACE = REPO / "search_spaces" / "demo.yaml"
TINY = ["optim.iterations=2", "optim.eval_interval=1", "optim.log_interval=1", "data.batch_size=4",
        "data.eval_batch_size=4", "data.synthetic.train_length=16", "data.synthetic.val_length=4",
        "run.latency_repeats=0", "run.threads=1"]


def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


# -- the experiment ------------------------------------------------------------------------------------------------

def test_an_experiment_kdray_creates_or_reuses_is_a_model_training_one_unless_it_has_a_kind(tmp_path):
    uri = store(tmp_path)
    client = MlflowClient(uri)
    made = Tracker(uri, "made").experiment_id
    plain = client.create_experiment("plain")  # an experiment from before kdray tagged them
    chosen = client.create_experiment("chosen", tags={contract.EXPERIMENT_KIND: "genai_development"})
    for name in ("plain", "chosen"):
        Tracker(uri, name)
    kinds = {eid: client.get_experiment(eid).tags.get(contract.EXPERIMENT_KIND) for eid in (made, plain, chosen)}
    assert kinds == {made: "custom_model_development", plain: "custom_model_development",
                     chosen: "genai_development"}  # a kind someone chose is kept
    # MLflow 3.17's UI opens on its GenAI overview whatever the kind: the description on top of it says where to go
    assert "Choose **Model training**" in client.get_experiment(made).tags[contract.NOTE]
    client.set_experiment_tag(plain, contract.NOTE, "mine")
    Tracker(uri, "plain")
    assert client.get_experiment(plain).tags[contract.NOTE] == "mine"


def test_the_ui_link_opens_the_run_table_in_the_model_training_view():
    assert ui_url("sqlite:////x/mlflow.db", "3") == \
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
    assert ui_url("http://10.0.0.5:5000/", "3", "abc") == \
        "http://10.0.0.5:5000/#/experiments/3/runs/abc?workflowType=machine_learning"


# -- params --------------------------------------------------------------------------------------------------------

def test_params_are_the_active_config_each_loss_keeping_its_toggle():
    job = load_job(default_job(), ["losses.kd.enabled=true", "losses.kd.temperature=4"])
    params = active_params(job)
    assert params["losses.kd.temperature"] == 4 and "losses.kd.weight" in params
    assert params["losses.i2ckd.enabled"] is False and not any(k.startswith("losses.i2ckd.") and k !=
                                                               "losses.i2ckd.enabled" for k in params)
    assert all(f"losses.{name}.enabled" in params for name in job.losses.sections())
    assert "data.synthetic.train_length" in params and not any(k.startswith("data.folder.") for k in params)
    assert set(active_params(job, ["losses.i2ckd.margin"])) - set(params) == {"losses.i2ckd.margin"}  # searched
    assert len(params) < len(flatten(to_dict(job))) - 40  # the 14 losses' options and the folder dataset's are out
    # a teacher's run: CE and its own settings, not the student's
    teacher = active_params(job, role="teacher")
    assert "losses.ce.weight" in teacher and "teacher.width" in teacher
    assert not any(k.startswith(("student.", "data.tune_split.", "losses.kd.")) for k in teacher)


def test_the_searched_knobs_are_the_sampled_ones_or_a_rows_keys_and_the_seed(tmp_path):
    job = load_job(default_job())
    space = load_space(DEMO_SPACE, job)
    config = {"losses.kd.enabled": True, "losses.kd.weight": 2.0, "losses.kd.temperature": 3.0,
              "losses.i2ckd.enabled": False}
    assert searched_keys(space, config) == ["losses.kd.weight", "losses.kd.temperature", "losses.i2ckd.enabled"]
    ablation = tmp_path / "abl.yaml"
    ablation.write_text("name: abl\nseeds: [0, 1]\nrows:\n  - {name: CE}\n"
                        "  - {name: KD, set: {losses.kd.enabled: true}}\n")
    rows = load_space(ablation, job)
    assert searched_keys(rows, {ROW_KEY: "KD", "run.seed": 1}) == ["losses.kd.enabled", "run.seed"]
    assert searched_keys(rows, {ROW_KEY: "CE", "run.seed": 1}) == ["run.seed"]


# -- data ----------------------------------------------------------------------------------------------------------

def test_a_generated_dataset_is_digested_by_its_settings_and_the_tune_split_carves_the_training_split():
    job = load_job(default_job(), ["data.synthetic.train_length=100", "data.synthetic.val_length=10"])
    train, val = run_manifests(job.data)
    assert (train.name, train.size, train.source, train.files) == ("synthetic/train", 100, "synthetic", False)
    assert (val.name, val.size, val.role) == ("synthetic/val", 10, "val")
    assert split_manifest(job.data, "train") == train and len(train.digest) == 64  # the same settings, the same
    other = load_job(default_job(), ["data.synthetic.train_length=100", "data.synthetic.val_length=10",
                                     "data.synthetic.seed=1"])
    assert split_manifest(other.data, "train").digest != train.digest
    carved = load_job(default_job(), ["data.synthetic.train_length=100", "data.tune_split.fraction=0.1"])
    left, held = run_manifests(carved.data)
    assert (left.name, left.size) == ("synthetic/train (minus tune split)", 90)
    assert (held.name, held.size, held.split) == ("synthetic/train (tune split)", 10, "train")
    with pytest.raises(ValueError, match="role"):
        split_manifest(job.data, "test")


def folder_tree(root: Path, stems: list[str]) -> None:
    for split in ("train", "val"):
        for stem in stems:
            for kind, mode in (("images", "RGB"), ("masks", "L")):
                path = root / split / kind / f"{stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((8, 8, 3) if mode == "RGB" else (8, 8), np.uint8), mode).save(path)


def test_a_file_dataset_is_digested_by_its_sorted_image_paths_wherever_its_root_is(tmp_path):
    folder = ["data.dataset=folder", "data.num_classes=2", "data.folder.class_names=[a, b]", "data.crop=[8, 8]"]
    for root in ("here", "there"):
        folder_tree(tmp_path / root, ["b", "a", "c"])
    here = load_job(default_job(), [*folder, f"data.root={tmp_path / 'here'}"])
    there = load_job(default_job(), [*folder, f"data.root={tmp_path / 'there'}"])
    train = split_manifest(here.data, "train")
    paths = sorted(f"train/images/{s}.png" for s in "abc")
    assert train.digest == hashlib.sha256(json.dumps(paths).encode()).hexdigest()
    assert (train.name, train.size, train.files, train.source) == ("folder/train", 3, True, str(tmp_path / "here"))
    assert split_manifest(there.data, "train").digest == train.digest  # the root's own path does not count
    (tmp_path / "there" / "train" / "images" / "c.png").unlink()
    (tmp_path / "there" / "train" / "masks" / "c.png").unlink()
    assert split_manifest(there.data, "train").digest != train.digest


def test_a_runs_data_are_dataset_inputs_with_digest_sizes_and_what_the_run_did_with_them(tmp_path):
    job = load_job(default_job(), ["data.synthetic.train_length=100", "data.synthetic.val_length=10"])
    tracker = Tracker(store(tmp_path), "data")
    run_id = tracker.start_run("r", {})
    assert log_datasets(tracker, run_id, job.data) is None
    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    train, val = run_manifests(job.data)
    seen = {i.dataset.name: (i.dataset.digest, json.loads(i.dataset.profile), {t.key: t.value for t in i.tags})
            for i in inputs}
    assert seen["synthetic/train"][0] == train.digest[:16] and seen["synthetic/val"][0] == val.digest[:16]
    assert seen["synthetic/train"][1] == {"images": 100, "split": "train", "source": "synthetic",
                                          "sha256": train.digest, "digest of": "generator settings"}
    assert seen["synthetic/val"][1]["images"] == 10
    assert seen["synthetic/train"][2] == {contract.DATA_CONTEXT: "training"}
    assert seen["synthetic/val"][2] == {contract.DATA_CONTEXT: "evaluation"}
    # data that cannot be opened leave the run without inputs, never stop it
    missing = load_job(default_job(), ["data.dataset=folder", "data.num_classes=2", "data.folder.class_names=[a, b]",
                                       f"data.root={tmp_path / 'nowhere'}"])
    assert "DataError" in log_datasets(tracker, tracker.start_run("s", {}), missing.data)


# -- descriptions --------------------------------------------------------------------------------------------------

def test_a_trials_description_says_its_method_formula_seed_stage_and_sweep():
    job = load_job(default_job(), ["losses.kd.enabled=true", "losses.kd.weight=3.2", "losses.kd.temperature=4",
                                   "run.seed=1"])
    tags = {contract.STAGE: contract.STAGE_CONFIRM, contract.CONFIRMS: "t_3", contract.SEARCH_RANK: "1"}
    note = trial_note(job, tags, ["losses.kd.weight"], "20260101-000000", "c_4", "7", "p1")
    assert note.startswith("**KD student deeplabv3_resnet18 (width 0.125) distilled from deeplabv3_resnet18 "
                           "(width 0.5)**: L = 1·CE + 3.2·KD (KD: temperature=4); seed 1, 600 iterations on "
                           "synthetic/train, scored on synthetic/val.")
    assert ("Trial c_4, confirmation stage (re-runs search trial t_3, rank 1 of the search) of "
            "[sweep 20260101-000000](#/experiments/7/runs/p1?workflowType=machine_learning).") in note


def test_a_sweeps_description_states_its_plan_and_where_its_report_is():
    job = load_job(default_job())
    space = load_space(DEMO_SPACE, job)
    note = sweep_note(job, space, "s1", "/runs/demo/sweeps/sweep-s1/report", 15, "`/t.pt`")
    assert note.startswith("**Sweep s1** of job `demo` (synthetic): space `demo`, a search, 15 trial(s) planned.")
    assert "- space demo (search): 6 trials, metric val/miou (max)" in note
    assert "- scheduler: synchronous halving" in note and "- then: confirmation of the top 2" in note
    assert "Teacher: `/t.pt`." in note
    assert "\n\nReport: `/runs/demo/sweeps/sweep-s1/report`" in note and "Written when the sweep ends." in note
    ended = sweep_note(job, space, "s1", "/r", 15, ended="6 finished, 3 stopped early")
    assert "Ended: 6 finished, 3 stopped early." in ended and "Teacher" not in ended


def test_a_sweeps_description_does_without_row_formulas_it_cannot_work_out(tmp_path, monkeypatch):
    import kdray.space
    from kdray.errors import ConfigError

    def plan_lines(space, job):  # as when a row's formula re-imports a plugin file this process cannot reach
        raise ConfigError("plugins: my_loss.py: no such file")

    monkeypatch.setattr(kdray.space, "plan_lines", plan_lines)
    ablation = tmp_path / "abl.yaml"
    ablation.write_text("name: abl\nseeds: [0]\nrows:\n  - {name: CE}\n"
                        "  - {name: KD, set: {losses.kd.enabled: true}}\n")
    job = load_job(default_job())
    note = sweep_note(job, load_space(ablation, job), "s1", "/r", 2)
    assert "- space abl (ablation): 2 trials, metric val/miou (max)" in note
    assert "- row 'KD': {'losses.kd.enabled': True}" in note and "- row 'CE': (the job as it is)" in note


# -- the sweep's best trial ----------------------------------------------------------------------------------------

def test_the_sweeps_run_shows_its_best_finished_trial_confirmations_first(tmp_path):
    tracker = Tracker(store(tmp_path), "best")
    parent = tracker.start_run("sweep", {contract.KIND: "sweep", contract.SWEEP_ID: "s1",
                                         contract.NOTE: "**Sweep s1**: the plan."})
    knobs = {contract.SEARCHED: "losses.kd.weight,losses.kd.temperature", contract.STAGE: contract.STAGE_SEARCH,
             contract.METHOD: "KD", contract.EVAL_SPLIT: "tune"}

    def trial(trial_id, best, status="FINISHED", **tags):
        run_id = tracker.trial_run("s1", trial_id, parent, trial_id, {**knobs, **tags},
                                   {"losses.kd.weight": 2.0, "losses.kd.temperature": 4.0, "optim.lr": 0.1})
        tracker.run_logger(run_id).log_metrics({contract.VAL_BEST_MIOU: best}, 100)
        tracker.end_run(run_id, status)
        return run_id

    assert record_best(tracker, "s1", parent) is None  # nothing finished yet
    a = trial("t_0", 0.6)
    trial("t_1", 0.9, **{contract.STOPPED_EARLY: "true"})  # stopped early: not a complete record
    trial("t_2", 0.95, "FAILED")
    assert record_best(tracker, "s1", parent) == a
    run = tracker.client.get_run(parent)
    assert run.data.metrics[contract.VAL_BEST_MIOU] == 0.6
    assert run.data.tags[contract.BEST_RUN] == a and run.data.tags[contract.BEST_TRIAL] == "t_0"
    assert json.loads(run.data.tags[contract.BEST_PARAMS]) == {"losses.kd.weight": "2.0",
                                                                "losses.kd.temperature": "4.0"}
    note = run.data.tags[contract.NOTE]
    assert note.startswith("**Sweep s1**: the plan.\n\n**Best trial** (of 1 finished): ")
    assert f"[trial t_0](#/experiments/{tracker.experiment_id}/runs/{a}?workflowType=machine_learning)" in note
    assert "on the tune split; `losses.kd.weight` = 2, `losses.kd.temperature` = 4." in note
    c = trial("c_0", 0.55, **{contract.STAGE: contract.STAGE_CONFIRM, contract.EVAL_SPLIT: "val",
                              contract.SEARCHED: "losses.kd.weight,run.seed"})
    assert record_best(tracker, "s1", parent) == c  # scored on val: ranks before the search's tune-split scores
    note = tracker.tags(parent)[contract.NOTE]
    assert note.count("**Best trial**") == 1 and "[trial c_0]" in note and "on val" in note
    assert note.startswith("**Sweep s1**: the plan.\n\n**Best trial** (of 2 finished)")  # second, always
    history = tracker.client.get_metric_history(parent, contract.VAL_BEST_MIOU)
    assert [(m.step, m.value) for m in history] == [(1, 0.6), (2, 0.55)]


# -- the teacher a sweep trains ------------------------------------------------------------------------------------

def test_the_teacher_a_sweep_trains_stands_beside_the_sweeps_run_and_links_to_it(tmp_path, monkeypatch):
    import contextlib

    import kdray.orchestration.teacher_run as teacher_run
    import kdray.orchestration.workers as workers

    target = tmp_path / "teacher.pt"
    job = load_job(default_job(), [f"teacher.checkpoint={target}", "data.tune_split.fraction=0.1"])

    def fit(job, **kwargs):  # stands for the Ray Train run
        target.write_bytes(b"weights")

    monkeypatch.setattr(workers, "fit", fit)
    monkeypatch.setattr(teacher_run, "TeacherProgress",
                        lambda *a, **k: contextlib.nullcontext(type("P", (), {"callback": None})()))
    tracker = Tracker(store(tmp_path), "teacher")
    parent = tracker.start_run("sweep-s1", {contract.KIND: "sweep", contract.SWEEP_ID: "s1"})
    teacher_run.train_teacher(job, tracker, tracker.uri, tmp_path, lambda line: None, sweep=("s1", parent))
    run_id = tracker.find_run(**{contract.KIND: "teacher"})
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert contract.PARENT not in run.data.tags and run.data.tags[contract.TRAINED_FOR_SWEEP] == "s1"
    assert f"[sweep s1](#/experiments/{tracker.experiment_id}/runs/{parent}?workflowType=machine_learning)" in \
        run.data.tags[contract.NOTE]
    assert not any(k.startswith(("student.", "data.tune_split.")) for k in run.data.params)
    names = {i.dataset.name for i in run.inputs.dataset_inputs}
    assert names == {"synthetic/train", "synthetic/val"}  # the teacher trains on the whole training split


def test_a_sweeps_teacher_row_is_the_latest_finished_run_of_its_file(tmp_path):
    from kdray.reporting.runs import sweep_teachers

    client = MlflowClient(store(tmp_path))
    eid = client.create_experiment("t")
    ids = []
    for status in ("FINISHED", "KILLED"):  # a `kdray.teacher --force` retraining interrupted after the first
        run_id = client.create_run(eid, tags={contract.KIND: "teacher", contract.TEACHER_CHECKPOINT: "/w/a.pt"})
        client.set_terminated(run_id.info.run_id, status)
        ids.append(run_id.info.run_id)
    found = [client.get_run(i) for i in ids]
    assert [r.info.run_id for r in sweep_teachers(found, {contract.TEACHER_CHECKPOINT: "/w/a.pt"})] == ids[:1]


# -- kdray.train and kdray.teacher ---------------------------------------------------------------------------------

def one_run(uri: str, kind: str):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`{contract.KIND}` = '{kind}'")
    assert len(runs) == 1
    return client, runs[0]


@pytest.mark.parametrize(("error", "status"), [(RuntimeError("the loss is NaN"), "FAILED"),
                                               (KeyboardInterrupt(), "KILLED")])
def test_a_training_that_raises_or_is_interrupted_never_leaves_its_run_running(tmp_path, monkeypatch, error,
                                                                                status):
    import kdray.engine

    def train(*args, **kwargs):
        raise error

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kdray.engine, "train", train)
    with pytest.raises(type(error)):
        kdray.train.main(["--tracking-uri", str(tmp_path / "m.db"), *TINY])
    _, run = one_run(store(tmp_path).replace("mlflow.db", "m.db"), "train")
    assert run.info.status == status
    assert run.data.tags[contract.FAILURE] == ("RuntimeError: the loss is NaN" if status == "FAILED" else "interrupted")


@pytest.mark.slow
def test_kdray_train_is_a_run_laid_out_as_a_trial(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert kdray.train.main(TINY) == 0  # the default store: ./mlflow.db, as a sweep's
    client, run = one_run(store(tmp_path), "train")
    assert run.info.status == "FINISHED" and run.data.tags[contract.METHOD] == "CE"
    assert client.get_experiment(run.info.experiment_id).name == "demo"
    assert [m.step for m in client.get_metric_history(run.info.run_id, contract.VAL_MIOU)] == [1, 2]
    assert contract.TRAIN_LOSS_TOTAL in run.data.metrics and contract.VAL_BEST_MIOU in run.data.metrics
    assert "losses.kd.enabled" in run.data.params and "losses.kd.weight" not in run.data.params
    assert run.data.tags[contract.NOTE].startswith("**CE-only student deeplabv3_resnet18 (width 0.125)**: L = 1·CE; "
                                                   "seed 0, 2 iterations")
    assert "A single run of `python -m kdray.train`" in run.data.tags[contract.NOTE]
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"synthetic/train", "synthetic/val"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, contract.BEST_CHECKPOINT_ARTIFACT_DIR)] == \
        ["checkpoints/best_student.pt"]
    assert [a.path for a in client.list_artifacts(run.info.run_id, "config")] == [contract.JOB_ARTIFACT]
    # what a trial's run shows: each evaluation's picture (step = iteration), the best predictions, the model
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    assert {int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")} == {1, 2}
    assert [a.path for a in client.list_artifacts(run.info.run_id, contract.PREDICTIONS_ARTIFACT_DIR)] == \
        [f"{contract.PREDICTIONS_ARTIFACT_DIR}/{contract.BEST_PREDICTIONS_FILE}"]
    best = max(client.get_metric_history(run.info.run_id, contract.VAL_MIOU), key=lambda m: (m.value, -m.step)).step
    assert [o.step for o in run.outputs.model_outputs] == [best]
    assert client.get_logged_model(run.outputs.model_outputs[0].model_id).name == contract.STUDENT_MODEL_NAME


@pytest.mark.slow
def test_kdray_teacher_is_a_teacher_run_a_later_sweeps_report_can_take(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "teacher.pt"
    uri = store(tmp_path)
    assert kdray.teacher.main(["--tracking-uri", uri, f"teacher.checkpoint={target}", "teacher.iterations=2",
                               "teacher.width=0.125", *TINY]) == 0
    client, run = one_run(uri, "teacher")
    assert run.info.status == "FINISHED" and target.is_file()
    assert run.data.tags[contract.TEACHER_CHECKPOINT] == str(target) and contract.PARENT not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, contract.VAL_MIOU)] == [1, 2]
    assert run.data.tags[contract.NOTE].startswith("**teacher deeplabv3_resnet18 (width 0.125)**: L = 1·CE; seed 0, "
                                                   "2 iterations on synthetic/train, scored on synthetic/val.")
    assert [a.path for a in client.list_artifacts(run.info.run_id, contract.BEST_CHECKPOINT_ARTIFACT_DIR)] == \
        ["checkpoints/best_teacher.pt"]
