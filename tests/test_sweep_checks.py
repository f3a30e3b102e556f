"""What a sweep checks before it starts anything, and how it reports what became of its trials.

No Ray cluster is started here: every check runs before Ray (the point of them), and the outcome logic is fed
Tune-like objects. The end-to-end sweeps are in test_sweep.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from kdray import contract
from kdray import sweep as sweep_cli
from kdray.config import job_from_dict, load_job
from kdray.errors import CheckpointError, ConfigError, DataError, ResourceError
from kdray.models import build_model
from kdray.orchestration.outcome import (
    FINISHED,
    INTERRUPTED,
    NOT_STARTED,
    STOPPED_EARLY,
    SweepOutcome,
    TrialSummary,
    close_open_runs,
    summary_table,
)
from kdray.orchestration.resume import resumed_space_file
from kdray.orchestration.sweep import SweepRequest, dry_run, prepare, run_sweep
from kdray.orchestration.tracking import Tracker
from kdray.orchestration.tune_setup import summaries as trial_summaries
from kdray.reporting.runs import EARLY_STOPPED, run_state
from kdray.space import load_space

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "demo.yaml")
DEMO_SPACE = str(REPO / "search_spaces" / "demo.yaml")


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture()
def teacher(tmp_path) -> str:
    """Weights of the demo job's teacher (random): the checks read and fit them, nothing trains."""
    job = load_job(DEMO)
    path = tmp_path / "teacher.pt"
    torch.save(build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width).state_dict(), path)
    return str(path)


def unpacked_demo() -> dict:
    """The shipped demo space trial by trial (pack_size 1): the checks here are those of any search; a packed
    one's own are asked for by a `pack_size` change."""
    return {**yaml.safe_load(Path(DEMO_SPACE).read_text()), "pack_size": 1}


def demo_space(tmp_path: Path, **changes) -> str:
    data = unpacked_demo()
    data.update(changes)
    return write(tmp_path / "space.yaml", data)


def request(space: str, *overrides: str, **kwargs) -> SweepRequest:
    return SweepRequest(DEMO, space, list(overrides), **kwargs)


# --- the space's metric -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("metric", "hint"), [("val/mIoU", "did you mean val/miou"),
                                              ("train/loss/total", "val/miou, val/pixel_acc"),
                                              ("val/iou/sky", "what trials report to Tune")])
def test_a_metric_trials_do_not_report_is_refused(tmp_path, teacher, metric, hint):
    space = demo_space(tmp_path, metric=metric)
    with pytest.raises(ConfigError, match=f"metric: got '{metric}'.*{hint}"):
        dry_run(request(space, f"teacher.checkpoint={teacher}"))


# --- resources of every trial the space can produce --------------------------------------------------------------

def test_a_searched_resource_beyond_this_machine_is_refused_naming_the_key(tmp_path, teacher):
    data = unpacked_demo()
    data["space"]["run.cpus_per_worker"] = {"uniform": [0.5, 64.0]}
    del data["points_to_evaluate"]
    space = write(tmp_path / "cpus.yaml", data)
    with pytest.raises(ResourceError, match=r"cpus.yaml: space run.cpus_per_worker=64.0: .*asks for 64 CPU") as err:
        dry_run(request(space, f"teacher.checkpoint={teacher}"))
    assert err.value.exit_code == 3


def test_an_ablation_row_beyond_this_machine_is_refused_naming_the_row(tmp_path, teacher):
    space = write(tmp_path / "rows.yaml", {
        "name": "rows", "seeds": [0], "overrides": {"run.cpus_per_worker": 0.5},
        "rows": [{"name": "CE"}, {"name": "wide", "set": {"run.workers": 64, "data.batch_size": 128}}]})
    with pytest.raises(ResourceError, match="rows.yaml: row 'wide': .*run.workers=64"):
        dry_run(request(space, f"teacher.checkpoint={teacher}"))


def test_the_dry_run_lists_each_rows_resources(tmp_path, teacher):
    space = write(tmp_path / "rows.yaml", {
        "name": "rows", "seeds": [0], "overrides": {"run.cpus_per_worker": 0.5},
        "rows": [{"name": "CE"}, {"name": "two", "set": {"run.workers": 2}}]})
    lines = dry_run(request(space, f"teacher.checkpoint={teacher}"))
    assert "  row 'CE': 1 worker(s) x (0.5 CPU, 0 GPU), gloo" in lines
    assert "  row 'two': 2 worker(s) x (0.5 CPU, 0 GPU), gloo" in lines


def test_the_sweep_command_exits_3_on_resources(tmp_path, teacher, capsys):
    space = write(tmp_path / "rows.yaml", {"name": "rows", "seeds": [0], "rows": [
        {"name": "big", "set": {"run.cpus_per_worker": 512.0}}]})
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.run_main(sweep_cli.main, ["--job", DEMO, "--space", space, "--dry-run",
                                            f"teacher.checkpoint={teacher}"])
    assert exit_.value.code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rows.yaml: row 'big'")


# --- overrides the space would silently replace ------------------------------------------------------------------

@pytest.mark.parametrize(("override", "says"), [
    ("losses.kd.weight=2", "searches it"),
    ("run.workers=2", "fixes it in its overrides: section"),
    ("losses.kd.enabled=false", "fixes it in its space: section"),
])
def test_an_override_of_a_key_the_space_sets_is_refused(override, says):
    with pytest.raises(ConfigError, match=f"{override.split('=')[0]}=.*demo.yaml {says}"):
        prepare(request(DEMO_SPACE, override))


def test_an_override_of_a_row_key_or_the_seed_in_an_ablation_is_refused(tmp_path):
    space = write(tmp_path / "abl.yaml", {"name": "abl", "seeds": [0, 1],
                                          "rows": [{"name": "+KD", "set": {"losses.kd.enabled": True}}]})
    with pytest.raises(ConfigError, match="sets it in row '\\+KD'"):
        prepare(request(space, "losses.kd.enabled=false"))
    with pytest.raises(ConfigError, match="runs every seed of seeds: \\[0, 1\\]"):
        prepare(request(space, "run.seed=3"))
    prepare(request(space, "losses.kd.weight=2"))  # a key the space leaves alone is the user's


def test_smoke_test_iterations_win_over_what_the_space_fixes(tmp_path, teacher):
    space = write(tmp_path / "long.yaml", {"name": "long", "seeds": [0], "overrides": {"optim.iterations": 2000},
                                           "rows": [{"name": "x", "set": {"optim.iterations": 3000}}]})
    _, job, parsed = prepare(request(space, f"teacher.checkpoint={teacher}", smoke_test=True))
    assert job.optim.iterations == 4 and parsed.rows[0][1]["optim.iterations"] == 4


# --- data and weight files, before Ray and before MLflow ----------------------------------------------------------

def _bad_teacher(tmp_path: Path, kind: str) -> str:
    path = tmp_path / f"{kind}.pt"
    job = load_job(DEMO)
    if kind == "missing":
        return str(path)
    if kind == "truncated":
        torch.save(build_model(job.teacher.arch, 8, width=job.teacher.width).state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "not_weights":
        torch.save({"epoch": 3}, path)
    elif kind == "five_classes":
        torch.save(build_model(job.teacher.arch, 5, width=job.teacher.width).state_dict(), path)
    return str(path)


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "teacher.checkpoint: .*missing.pt: no such file"),
    ("truncated", "teacher.checkpoint: cannot read weights file .*truncated.pt"),
    ("not_weights", "teacher.checkpoint: .*not_weights.pt does not hold a state dict"),
    ("five_classes", "teacher.checkpoint: .*five_classes.pt holds a teacher for 5 classes; the job has "
                     "data.num_classes=8"),
])
def test_a_bad_teacher_stops_dry_run_and_sweep_before_ray_and_mlflow(tmp_path, kind, message):
    import ray

    store = tmp_path / "mlflow.db"
    req = request(DEMO_SPACE, f"teacher.checkpoint={_bad_teacher(tmp_path, kind)}", tracking_uri=f"sqlite:///{store}")
    with pytest.raises(CheckpointError, match=message):
        dry_run(req)
    with pytest.raises(CheckpointError, match=message):
        run_sweep(req, say=lambda *_: None)
    assert not ray.is_initialized() and not store.exists()


def test_a_missing_data_root_stops_the_sweep_before_ray_and_mlflow(tmp_path, teacher):
    import ray

    store = tmp_path / "mlflow.db"
    overrides = ["data.dataset=folder", f"data.root={tmp_path / 'nowhere'}", "data.num_classes=8",
                 "data.folder.class_names=[a, b, c, d, e, f, g, h]", f"teacher.checkpoint={teacher}"]
    req = request(DEMO_SPACE, *overrides, tracking_uri=f"sqlite:///{store}")
    for call in (dry_run, lambda r: run_sweep(r, say=lambda *_: None)):
        with pytest.raises(DataError, match="data.root: .*nowhere does not exist"):
            call(req)
    assert not ray.is_initialized() and not store.exists()


def test_a_searched_key_that_breaks_the_inputs_is_named(tmp_path, teacher):
    data = unpacked_demo()
    data["space"]["data.num_classes"] = {"choice": [8, 5]}
    del data["points_to_evaluate"]
    space = write(tmp_path / "classes.yaml", data)
    with pytest.raises(CheckpointError, match="space data.num_classes=5: teacher.checkpoint: .*5"):
        dry_run(request(space, f"teacher.checkpoint={teacher}"))


def test_a_searched_size_a_loss_refuses_is_named_with_the_point(tmp_path, teacher):
    """A loss's own construction check (CIRKD: more contrast slots than the queue holds) fails the dry run with
    the space point that makes it, like the inputs' checks."""
    data = unpacked_demo()
    data["space"]["losses.cirkd.enabled"] = True  # a plain value: fixed
    data["space"]["losses.cirkd.pixel_memory_size"] = {"choice": [20000, 100]}
    del data["points_to_evaluate"]
    space = write(tmp_path / "cirkd.yaml", data)
    with pytest.raises(ConfigError, match=r"space losses.cirkd.pixel_memory_size=100: losses.cirkd: pixel_contrast"):
        dry_run(request(space, f"teacher.checkpoint={teacher}"))


def test_the_dry_run_of_a_search_says_where_its_study_lives(tmp_path, teacher):
    lines = dry_run(request(DEMO_SPACE, f"teacher.checkpoint={teacher}"))
    assert "Optuna study: optuna.db in the sweep folder" in lines
    url = f"sqlite:///{tmp_path}/study.db"
    assert f"Optuna study: {url}" in dry_run(request(DEMO_SPACE, f"teacher.checkpoint={teacher}", study_storage=url))


def test_a_rows_refused_setting_points_at_the_space_file(tmp_path, teacher):
    space = write(tmp_path / "rows.yaml", {"name": "rows", "seeds": [0], "rows": [
        {"name": "KD", "set": {"losses.kd.enabled": True}},
        {"name": "CIRKD small", "set": {"losses.cirkd.enabled": True, "losses.cirkd.pixel_memory_size": 100}}]})
    with pytest.raises(ConfigError, match=r"row 'CIRKD small': losses.cirkd: .*change them there"):
        dry_run(request(space, f"teacher.checkpoint={teacher}"))


# --- MLflow filters and names ----------------------------------------------------------------------------------

def test_find_run_matches_values_with_quotes(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "quotes")
    runs = {}
    for path in ("/data/o'brien/teacher.pt", '/data/say "hi"/teacher.pt', "/data/plain/teacher.pt"):
        runs[path] = tracker.start_run("teacher", {contract.KIND: "teacher", contract.TEACHER_CHECKPOINT: path})
    for path, run_id in runs.items():
        assert tracker.find_run(**{contract.KIND: "teacher", contract.TEACHER_CHECKPOINT: path}) == run_id
    assert tracker.find_run(**{contract.KIND: "teacher", contract.TEACHER_CHECKPOINT: "/data/o'brien"}) is None


@pytest.mark.parametrize("names", [["a(b", "a)b", "c"], ["x" * 300, "y", "z"]])
def test_class_names_mlflow_cannot_keep_apart_are_refused(tmp_path, names):
    with pytest.raises(ConfigError, match="data.folder.class_names"):
        job_from_dict(yaml.safe_load(Path(DEMO).read_text()),
                      ["data.dataset=folder", f"data.root={tmp_path}", "data.num_classes=3",
                       f"data.folder.class_names={json.dumps(names)}"])


# --- resume ----------------------------------------------------------------------------------------------------

def _started_sweep(tmp_path: Path) -> tuple[dict, Path, Path]:
    original = tmp_path / "abl.yaml"
    write(original, {"name": "abl", "seeds": [0], "rows": [{"name": "+KD", "set": {"losses.kd.enabled": True}}]})
    sweep_dir = tmp_path / "sweep-1"
    copy = sweep_dir / "space" / original.name
    copy.parent.mkdir(parents=True)
    copy.write_text(original.read_text())
    import hashlib

    state = {"sweep_id": "1", "space_path": str(original), "space_file": str(copy),
             "space_sha256": hashlib.sha256(original.read_text().encode()).hexdigest()}
    return state, sweep_dir, original


def test_resume_runs_the_space_it_started_with(tmp_path):
    state, sweep_dir, original = _started_sweep(tmp_path)
    assert resumed_space_file(state, sweep_dir) == state["space_file"]
    original.unlink()  # moved away since: the copy still runs
    assert resumed_space_file(state, sweep_dir) == state["space_file"]


def test_resume_after_the_space_changed_is_refused_with_both_hashes(tmp_path):
    state, sweep_dir, original = _started_sweep(tmp_path)
    original.write_text(original.read_text().replace("+KD", "KD renamed"))
    with pytest.raises(ConfigError, match=r"changed since sweep 1 started \(sha256 [0-9a-f]{12} then, "
                                          r"[0-9a-f]{12} now\)"):
        resumed_space_file(state, sweep_dir)


def test_resume_with_overrides_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="--resume continues a sweep exactly as it started"):
        run_sweep(request(DEMO_SPACE, "losses.kd.weight=2", resume=str(tmp_path)), say=lambda *_: None)


def test_a_trial_whose_config_cannot_be_built_leaves_a_failed_run(tmp_path, monkeypatch):
    import ray.tune

    from kdray.orchestration.trial import SweepContext, TrialFailed, run_trial

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "abl.yaml", {"name": "abl", "seeds": [0], "rows": [{"name": "CE"}]})
    data = yaml.safe_load(Path(DEMO).read_text())
    parsed = load_space(space, job_from_dict(data))
    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0001"))
    context = SweepContext("s1", "parent", uri, "exp", str(tmp_path), data)
    with pytest.raises(TrialFailed, match="KeyError"):
        run_trial({"kdray.row": "renamed row", "run.seed": 0}, space=parsed, sweep=context)
    tracker = Tracker(uri, "exp")
    run_id = tracker.find_run(**{contract.SWEEP_ID: "s1", contract.TRIAL_ID: "t0001"})
    assert run_id is not None and tracker.status(run_id) == "FAILED"
    assert "renamed row" in tracker.tags(run_id)[contract.FAILURE]


# --- what became of each trial ------------------------------------------------------------------------------------

class _Trial:
    def __init__(self, trial_id, status, config, last_result=None, error=None):
        self.trial_id, self.status, self.config, self.last_result = trial_id, status, config, last_result or {}
        self._error = error

    def get_error(self):
        return self._error


class _Grid(list):
    """What `summaries` reads of a ResultGrid: the results, and Tune's trials behind them."""

    def __init__(self, trials):
        super().__init__(SimpleNamespace(metrics_dataframe=None, error=t._error, metrics=t.last_result)
                         for t in trials)
        self._experiment_analysis = SimpleNamespace(trials=trials)


def test_each_trial_gets_the_status_it_earned(tmp_path):
    space = write(tmp_path / "abl.yaml", {"name": "abl", "seeds": [0, 1, 2, 3, 4], "rows": [{"name": "CE"}]})
    data = yaml.safe_load(Path(DEMO).read_text())
    parsed = load_space(space, job_from_dict(data))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    config = {"kdray.row": "CE", "run.seed": 0}
    full = {"iteration": 600, "iterations_total": 600}
    trials = [_Trial("a", "TERMINATED", config, full),
              _Trial("b", "TERMINATED", {**config, "run.seed": 1}, {"iteration": 150, "iterations_total": 600}),
              _Trial("c", "ERROR", {**config, "run.seed": 2}, error=RuntimeError("Traceback\nValueError: boom")),
              _Trial("d", "RUNNING", {**config, "run.seed": 3}, {"iteration": 150, "iterations_total": 600}),
              _Trial("e", "PENDING", {**config, "run.seed": 4})]
    summaries, interrupted = trial_summaries(_Grid(trials), parsed, job_from_dict(data), tracker, "s1")
    status = {t.trial_id: t.status for t in summaries}
    assert status == {"a": FINISHED, "b": STOPPED_EARLY, "c": "failed: ValueError: boom", "d": INTERRUPTED,
                      "e": NOT_STARTED}
    assert interrupted
    outcome = SweepOutcome("s1", tmp_path, "uri", "exp", "p", summaries, 1.0, interrupted)
    assert outcome.exit_code == 130
    assert outcome.counts() == "1 finished, 1 stopped early, 1 failed, 1 interrupted, 1 not started"


def test_a_trial_restored_from_its_final_checkpoint_is_finished(tmp_path):
    """Tune's last result can predate the restore; the run's MLflow history says it ran every iteration."""
    space = write(tmp_path / "abl.yaml", {"name": "abl", "seeds": [0], "rows": [{"name": "CE"}]})
    data = yaml.safe_load(Path(DEMO).read_text())
    parsed = load_space(space, job_from_dict(data))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    run_id = tracker.trial_run("s1", "a", "p", "a", {}, {})
    tracker.run_logger(run_id).log_metrics({contract.VAL_MIOU: 0.5}, 600)
    trial = _Trial("a", "TERMINATED", {"kdray.row": "CE", "run.seed": 0}, {})
    summaries, interrupted = trial_summaries(_Grid([trial]), parsed, job_from_dict(data), tracker, "s1")
    assert [t.status for t in summaries] == [FINISHED] and not interrupted


def test_a_trial_the_scheduler_stopped_stays_stopped_though_its_workers_logged_past_the_stop(tmp_path):
    """Workers train on until Tune's stop reaches them: the run's MLflow history may go past the iteration the
    scheduler decided on (here 2 of 4, then 4 logged); the trial was stopped at 2, and its run says so."""
    from kdray.orchestration.trial import MlflowStatusCallback

    space = write(tmp_path / "abl.yaml", {"name": "abl", "seeds": [0], "rows": [{"name": "CE"}]})
    data = yaml.safe_load(Path(DEMO).read_text())
    parsed = load_space(space, job_from_dict(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp")
    run_id = tracker.trial_run("s1", "a", "p", "a", {}, {})
    for step, value in ((2, 0.1), (4, 0.3)):
        tracker.run_logger(run_id).log_metrics({contract.VAL_MIOU: value}, step)
    trial = _Trial("a", "TERMINATED", {"kdray.row": "CE", "run.seed": 0}, {"iteration": 2, "iterations_total": 4})
    MlflowStatusCallback(uri, "exp", "s1").on_trial_complete(0, [], trial)
    tags = tracker.tags(run_id)
    # it ended as it should (FINISHED, not a red cross in MLflow's UI), its stop in its tags and description
    assert tracker.status(run_id) == "FINISHED"
    assert tags[contract.STOPPED_EARLY] == "true" and tags[contract.STOPPED_AT] == "2"
    assert "Stopped early by the scheduler at iteration 2 of 4" in tags[contract.NOTE]
    assert run_state(tracker.status(run_id), tags) == EARLY_STOPPED  # the report's reading
    summaries, interrupted = trial_summaries(_Grid([trial]), parsed, job_from_dict(data), tracker, "s1")
    assert [(t.status, t.iteration) for t in summaries] == [(STOPPED_EARLY, 2)] and not interrupted


@pytest.mark.parametrize(("statuses", "code"), [([FINISHED, STOPPED_EARLY], 0), ([FINISHED, "failed: x"], 1),
                                                ([FINISHED, NOT_STARTED], 1)])
def test_exit_code_is_zero_only_when_every_trial_ran(tmp_path, statuses, code):
    trials = [TrialSummary(str(i), "CE", 0, {}, 0.5, 0.5, 4, s) for i, s in enumerate(statuses)]
    assert SweepOutcome("s", tmp_path, "u", "e", "p", trials, 1.0).exit_code == code


def test_trials_tune_never_created_count_as_not_started(tmp_path):
    trials = [TrialSummary("a", "CE", 0, {}, 0.5, 0.5, 4, FINISHED)]
    outcome = SweepOutcome("s", tmp_path, "u", "e", "p", trials, 1.0, never_created=2)
    assert outcome.exit_code == 1 and outcome.counts() == "1 finished, 2 not started"
    assert "2 more trial(s) of the space never started" in summary_table(outcome)


def test_closing_leaves_no_run_running(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    parent = tracker.start_run("sweep", {contract.KIND: "sweep"})
    ids = [tracker.trial_run("s1", t, parent, t, {}, {}) for t in ("a", "b")]
    tracker.end_run(ids[0], "FINISHED")
    close_open_runs(tracker, "s1", parent, interrupted=True, why="interrupted")
    assert [tracker.status(i) for i in ids] == ["FINISHED", "KILLED"] and tracker.status(parent) == "KILLED"
    assert tracker.running_runs("s1") == []


def test_a_completed_trial_loses_a_stale_failure_tag(tmp_path):
    from kdray.orchestration.trial import MlflowStatusCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "cb")
    run_id = tracker.trial_run("s1", "a", "p", "a", {}, {})
    tracker.set_tags(run_id, {contract.FAILURE: "worker group torn down"})  # left by a killed driver's teardown
    MlflowStatusCallback(uri, "cb", "s1").on_trial_complete(0, [], _Trial("a", "TERMINATED", {},
                                                                        {"iteration": 4, "iterations_total": 4}))
    assert tracker.status(run_id) == "FINISHED" and contract.FAILURE not in tracker.tags(run_id)


def test_backbone_files_are_checked_before_anything_starts(tmp_path, teacher):
    bad = tmp_path / "backbone.pth"
    bad.write_bytes(b"not a weights file")
    with pytest.raises(CheckpointError, match="student.backbone_weights: cannot read weights file .*backbone.pth"):
        dry_run(request(DEMO_SPACE, f"teacher.checkpoint={teacher}", f"student.backbone_weights={bad}"))
    # the teacher's backbone matters only when the sweep trains the teacher
    missing = tmp_path / "nowhere" / "teacher.pt"
    with pytest.raises(CheckpointError, match="teacher.backbone_weights: .*backbone.pth"):
        run_sweep(request(DEMO_SPACE, f"teacher.checkpoint={missing}", f"teacher.backbone_weights={bad}",
                          train_teacher=True, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"), say=lambda *_: None)
    assert not (tmp_path / "m.db").exists()


def test_after_ctrl_c_a_trial_tune_ended_short_is_interrupted_unless_the_scheduler_stopped_it(tmp_path):
    space = write(tmp_path / "abl.yaml", {"name": "abl", "seeds": [0, 1, 2, 3], "rows": [{"name": "CE"}]})
    data = yaml.safe_load(Path(DEMO).read_text())
    parsed = load_space(space, job_from_dict(data))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp")
    scheduled = tracker.trial_run("s1", "b", "p", "b", {}, {})
    tracker.set_tags(scheduled, {contract.STOPPED_EARLY: "true"})
    config = {"kdray.row": "CE", "run.seed": 0}
    trials = [_Trial("a", "TERMINATED", config, {"iteration": 600, "iterations_total": 600}),
              _Trial("b", "TERMINATED", {**config, "run.seed": 1}, {"iteration": 150, "iterations_total": 600}),
              _Trial("c", "TERMINATED", {**config, "run.seed": 2}, {"iteration": 300, "iterations_total": 600}),
              _Trial("d", "TERMINATED", {**config, "run.seed": 3})]
    summaries, interrupted = trial_summaries(_Grid(trials), parsed, job_from_dict(data), tracker, "s1", ctrl_c=True)
    assert interrupted
    assert {t.trial_id: t.status for t in summaries} == {"a": FINISHED, "b": STOPPED_EARLY, "c": INTERRUPTED,
                                                         "d": NOT_STARTED}


def test_interrupt_watch_notes_ctrl_c_and_hands_it_to_tune():
    import os
    import signal

    from kdray.orchestration.trial import INTERRUPTED, InterruptWatch

    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))  # stands for Tune's
    try:
        INTERRUPTED.clear()
        watch = InterruptWatch()
        watch.on_step_begin(0, [])
        watch.on_step_begin(1, [])  # wraps once
        os.kill(os.getpid(), signal.SIGINT)
        assert INTERRUPTED.is_set() and seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
        INTERRUPTED.clear()


# --- found by trying it as a new user ------------------------------------------------------------------------

def test_a_job_with_an_auto_teacher_may_train_it_and_a_named_missing_one_says_how(tmp_path):
    lines = dry_run(request(DEMO_SPACE))  # jobs/demo.yaml: teacher.checkpoint auto, not trained yet
    assert any("(missing: the sweep trains it first)" in line for line in lines)
    with pytest.raises(CheckpointError, match="no such file; train it first .* pass --train-teacher"):
        dry_run(request(DEMO_SPACE, f"teacher.checkpoint={tmp_path / 'absent.pt'}"))


def test_a_tracking_server_that_does_not_answer_stops_the_sweep_before_ray(teacher):
    import ray

    from kdray.orchestration.sweep import check_store

    with pytest.raises(ConfigError, match="http://127.0.0.1:1: no MLflow server answers there"):
        check_store("http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="no MLflow server answers"):
        dry_run(request(DEMO_SPACE, f"teacher.checkpoint={teacher}", tracking_uri="http://127.0.0.1:1"))
    assert not ray.is_initialized()


def _sweep_folder(root: Path, sweep_id: str, ended: str | None = None) -> Path:
    folder = root / f"sweep-{sweep_id}"
    folder.mkdir(parents=True)
    state = {"sweep_id": sweep_id, "job_data": {}, "space_path": DEMO_SPACE}
    if ended:
        state["ended"] = ended
    (folder / "kdray_sweep.json").write_text(json.dumps(state))
    return folder


def test_resume_continues_interrupted_sweeps_only(tmp_path):
    from kdray.orchestration.resume import latest_sweep, load_state

    root = tmp_path / "sweeps"
    interrupted = _sweep_folder(root, "1")
    ended = _sweep_folder(root, "2", ended="1 finished, 1 failed")
    assert latest_sweep(root) == interrupted
    with pytest.raises(ConfigError, match="sweep 2 ran to its end \\(1 finished, 1 failed\\)"):
        load_state(request(DEMO_SPACE, resume=str(ended)))
    with pytest.raises(ConfigError, match="no interrupted sweep to resume .*1 sweep\\(s\\) there ran to their end"):
        latest_sweep(_sweep_folder(tmp_path / "other", "3", ended="2 finished").parent)


def test_a_choice_of_1e_minus_4_is_a_number(tmp_path, teacher):
    data = unpacked_demo()
    data["space"]["losses.kd.weight"] = {"choice": ["1e-4", "1e-2"]}  # as YAML 1.1 reads `[1e-4, 1e-2]`
    data["points_to_evaluate"][0]["losses.kd.weight"] = 0.0001
    space = write(tmp_path / "choice.yaml", data)
    job_data = yaml.safe_load(Path(DEMO).read_text())
    parsed = load_space(space, job_from_dict(job_data))
    assert next(d for d in parsed.dimensions if d.key == "losses.kd.weight").args == (1e-4, 1e-2)


def test_a_seed_torch_cannot_take_is_refused():
    with pytest.raises(ConfigError, match="run.seed: got 99999999999999999999"):
        load_job(DEMO, ["run.seed=99999999999999999999"])


def test_failure_reasons_lose_the_dotted_class_path():
    from kdray.orchestration.outcome import reason

    err = RuntimeError("Traceback (most recent call last):\n  ...\nkdray.errors.DataError: a.png: mask value 9")
    assert reason(err) == "DataError: a.png: mask value 9"
    assert reason(ValueError("plain words: kept")) == "plain words: kept"


def test_the_report_shows_only_the_sweeps_own_teacher_and_counts_trials_without_a_run(tmp_path):
    from mlflow import MlflowClient

    from kdray.reporting.runs import sweep_teachers
    from kdray.reporting.write import unrun_note

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("t")
    runs = []
    for path, smoke in (("/w/a.pt", False), ("/w/a.pt", False), ("/w/b.pt", False), ("/w/s.pt", True)):
        tags = {contract.KIND: "teacher", contract.TEACHER_CHECKPOINT: path, **({contract.SMOKE_TEST: "true"} if smoke
                                                                           else {})}
        runs.append(client.create_run(exp, tags=tags))
    found = [client.get_run(r.info.run_id) for r in runs]
    assert [r.info.run_id for r in sweep_teachers(found, {contract.TEACHER_CHECKPOINT: "/w/a.pt"})] == \
        [runs[1].info.run_id]  # the latest run of its own file
    assert len(sweep_teachers(found, {})) == 3  # an older sweep: every teacher but the smoke test's
    data = SimpleNamespace(sweep_tags={contract.TRIALS_PLANNED: "3", contract.FAILURE: "interrupted: 1 finished"},
                           runs=SimpleNamespace(num_rows=1))
    assert "2 of the 3 trials the space plans have no run: they never started" in unrun_note(data)[0]


def test_a_worker_failure_reason_is_the_workers_own_exception_not_trains_truncated_snippet():
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2.api.exceptions import WorkerGroupError

    from kdray.errors import PreflightError
    from kdray.orchestration.outcome import worker_reason

    first = PreflightError("losses.boom: cannot run on student.logits (2, 8, 4, 4): channels")
    err = WorkerGroupError("[Rank 0 Error Snippet]: ...ightError: losses.boom: cannot run",
                           {1: UserExceptionWithTraceback(PreflightError("rank 1"), "tb"),
                            0: UserExceptionWithTraceback(first, "Traceback ...")})
    assert worker_reason(err) == f"PreflightError: {first}"
    assert worker_reason(RuntimeError("a\nkdray.errors.DataError: label value 9")) == "DataError: label value 9"


# --- the confirmation stage's neighbours: --extend, --resume, the tuning split in an ablation ------------------

def _ended_sweep(tmp_path: Path, kind: str = "search") -> Path:
    """A sweep folder as a finished sweep leaves it (its state file and its space's copy), nothing run."""
    folder = tmp_path / "sweep-1"
    (folder / "space").mkdir(parents=True)
    copy = folder / "space" / "space.yaml"
    source = Path(DEMO_SPACE).read_text() if kind == "search" else \
        yaml.safe_dump({"name": "abl", "seeds": [0], "rows": [{"name": "CE"}]})
    copy.write_text(source)
    state = {"sweep_id": "1", "parent_run_id": "p", "space_path": str(copy), "space_file": str(copy),
             "ended": "2 finished", "stages": [{"name": kind if kind == "search" else "ablation", "folder": "tune",
                                                "ended": True}]}
    (folder / "kdray_sweep.json").write_text(json.dumps(state))
    return folder


@pytest.mark.parametrize("n", [0, -2])
def test_extend_counts_at_least_one_trial(tmp_path, n):
    from kdray.orchestration.resume import load_state

    with pytest.raises(ConfigError, match=rf"--extend {n}: expected a number of trials >= 1"):
        load_state(request(DEMO_SPACE, resume=str(_ended_sweep(tmp_path)), extend=n))


def test_extend_appends_a_search_stage_seeded_anew_and_an_ablation_has_none(tmp_path):
    from kdray.orchestration.resume import load_state

    state, _ = load_state(request(DEMO_SPACE, resume=str(_ended_sweep(tmp_path)), extend=3))
    assert "ended" not in state
    assert state["stages"][-1] == {"name": "search", "folder": "tune-extend1", "num_samples": 3, "seed": 1,
                                   "extension": 1}
    with pytest.raises(ConfigError, match="is an ablation .* no search to extend"):
        load_state(request(DEMO_SPACE, resume=str(_ended_sweep(tmp_path / "a", "ablation")), extend=2))
    with pytest.raises(ConfigError, match="ran to its end .* add --extend N"):
        load_state(request(DEMO_SPACE, resume=str(_ended_sweep(tmp_path / "b"))))


def test_resume_refuses_a_space_and_extend_needs_resume(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.main(["--resume", str(tmp_path), "--space", DEMO_SPACE, "--dry-run"])
    assert exit_.value.code == 2 and "--space is refused here" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        sweep_cli.main(["--extend", "2", "--dry-run"])
    assert exit_.value.code == 2 and "name it with --resume" in capsys.readouterr().err


def test_an_ablation_on_a_tuning_split_is_refused(tmp_path, teacher):
    space = write(tmp_path / "abl.yaml", {"seeds": [0], "rows": [{"name": "CE"}, {"name": "KD", "set": {
        "losses.kd.enabled": True}}]})
    with pytest.raises(ConfigError, match=r"data.tune_split.fraction=0.1: .* is an ablation, whose tables would "
                                          r"then be scored on held-out training images"):
        dry_run(request(space, "data.tune_split.fraction=0.1", f"teacher.checkpoint={teacher}"))
    assert any("tuning split" in line for line in dry_run(request(
        demo_space(tmp_path), f"teacher.checkpoint={teacher}")))  # the demo search selects on one


# --- a scheduler that could never stop a trial ----------------------------------------------------------------

@pytest.mark.parametrize(("scheduler", "overrides", "message"), [
    ({"kind": "asha", "grace_period": 2}, ["optim.iterations=300", "optim.eval_interval=150"],
     r"scheduler.grace_period: got 2 evaluation\(s\) = 300 iterations, which the trials \(optim.iterations=300, "
     r"optim.eval_interval=150\) reach only at their end: .* expected 1..1, or scheduler kind none"),
    ({"kind": "sync_halving", "grace_period": 1}, ["optim.iterations=100", "optim.eval_interval=100"],
     r"scheduler: sync_halving needs an evaluation before the last, .* lower optim.eval_interval"),
    ({"kind": "sync_halving", "grace_period": 1, "bracket": 1}, ["optim.iterations=300", "optim.eval_interval=100"],
     r"scheduler.bracket: sync_halving decides among 1 trial\(s\) at a time and would never stop one"),
])
def test_a_scheduler_that_would_never_stop_a_trial_is_refused(tmp_path, teacher, scheduler, overrides, message):
    space = demo_space(tmp_path, scheduler=scheduler, overrides={"run.workers": 1})
    with pytest.raises(ConfigError, match=rf"space.yaml: {message}"):
        dry_run(request(space, *overrides, f"teacher.checkpoint={teacher}"))
    # one evaluation less in the grace period is a scheduler that can act; a smoke test is not held to it
    dry_run(request(space, *overrides, f"teacher.checkpoint={teacher}", smoke_test=True))


@pytest.mark.parametrize(("changes", "message"), [
    ({"pack_size": 3, "scheduler": {"kind": "sync_halving", "grace_period": 1, "bracket": 6}},
     r"scheduler.bracket: got 6 with pack_size 3: a pack is its own bracket .* leave bracket out, or set pack_size 1"),
    ({"pack_size": 3, "num_samples": 1, "points_to_evaluate": [], "confirm": None,
      "scheduler": {"kind": "asha", "grace_period": 1}},
     r"num_samples: got 1: asha runs inside each pack, and a pack of 1 trial would never stop one"),
])
def test_a_packed_search_whose_scheduler_could_not_act_inside_its_packs_is_refused(tmp_path, teacher, changes,
                                                                                   message):
    space = demo_space(tmp_path, **changes)
    with pytest.raises(ConfigError, match=rf"space.yaml: {message}"):
        dry_run(request(space, f"teacher.checkpoint={teacher}"))
    # the pack is the bracket: without one, packs of 3 halve
    ok = demo_space(tmp_path, pack_size=3, scheduler={"kind": "sync_halving", "grace_period": 1})
    assert any("inside each pack (the pack is the bracket)" in line
               for line in dry_run(request(ok, f"teacher.checkpoint={teacher}")))


def test_asha_over_a_single_trial_is_refused(tmp_path, teacher):
    space = demo_space(tmp_path, num_samples=1, scheduler={"kind": "asha", "grace_period": 1}, confirm=None)
    with pytest.raises(ConfigError, match=r"num_samples: asha decides among 1 trial\(s\)"):
        dry_run(request(space, "optim.iterations=300", "optim.eval_interval=100", f"teacher.checkpoint={teacher}"))


def test_a_scalar_for_a_settings_block_says_how_to_set_one_key(teacher):
    with pytest.raises(ConfigError, match=r"data.tune_split: got 0.03; expected a mapping of fraction, seed \(one "
                                          r"of them on the command line: data.tune_split.fraction=0.03\)"):
        dry_run(request(DEMO_SPACE, "data.tune_split=0.03", f"teacher.checkpoint={teacher}"))


# --- the summary table of a search with stages ------------------------------------------------------------------

def _summary(tid: str, stage: str, best: float, scored_on: str, label: str = "KD") -> TrialSummary:
    return TrialSummary(tid, label, 0, {"losses.kd.weight": 1.0} if stage == "search" else {}, best, best, 4,
                        FINISHED, stage, scored_on)


def test_the_summary_ranks_every_search_trial_together_and_says_where_each_was_scored(tmp_path):
    """After `--extend`, the trials come stage by stage (search, confirm, extension); the table ranks the
    extension's search trials with the first search's, then the confirmation trials, and names the split."""
    trials = [_summary("a", "search", 0.30, "tune split"), _summary("b", "search", 0.10, "tune split"),
              _summary("c", "confirm", 0.25, "val", "Search #1 (a)"), _summary("d", "search", 0.40, "tune split")]
    text = summary_table(SweepOutcome("s", tmp_path, "u", "e", "p", trials, 1.0))
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:] if line.startswith("| ")]
    assert [(r[0], r[1], r[2]) for r in rows] == [("1", "search", "d"), ("2", "search", "a"), ("3", "search", "b"),
                                                  ("1", "confirm", "c")]
    head = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    assert [r[head.index("scored on")] for r in rows] == ["tune split"] * 3 + ["val"]
    assert "scored on the tuning split" in text
    same = [_summary("a", "search", 0.3, "val"), _summary("c", "confirm", 0.25, "val")]  # one split: no column
    assert "scored on" not in summary_table(SweepOutcome("s", tmp_path, "u", "e", "p", same, 1.0))
    low = SweepOutcome("s", tmp_path, "u", "e", "p", trials[:2], 1.0, mode="min")  # lower is better
    assert [line.split("|")[3].strip() for line in summary_table(low).splitlines()[2:4]] == ["b", "a"]


def test_a_resumed_sweeps_stages_are_listed_with_what_is_left(tmp_path):
    from kdray.orchestration.stages import stage_lines

    space = load_space(DEMO_SPACE, load_job(DEMO))
    stages = [{"name": "search", "folder": "tune", "ended": True},
              {"name": "confirm", "folder": "confirm", "ended": True, "seeds": [0, 1],
               "rows": [{"name": "Student (CE)"}, {"name": "Search #1 (x)"}]},
              {"name": "search", "folder": "tune-extend1", "num_samples": 2, "seed": 1, "extension": 1}]
    lines = stage_lines(stages, space, tmp_path)
    assert lines[:3] == [f"  search, folder tune/: {space.num_samples} trial(s), ended",
                         "  confirm, folder confirm/: 4 trial(s), ended",
                         "  search (extension 1), folder tune-extend1/: 2 trial(s), sampler seed 1, no point "
                         "first, to run"]
    top_k, seeds = space.confirm.top_k, len(space.confirm.seeds)
    assert lines[3] == (f"  then: confirmation of its best configurations not confirmed before (at most {top_k} x "
                        f"{seeds} trial(s), chosen when the search ends)")
    (tmp_path / "tune-extend1").mkdir()  # its Tune experiment began: an interrupted stage
    assert stage_lines(stages, space, tmp_path)[2].endswith("no point first, interrupted: it continues, its ended "
                                                           "trials kept")
    stages.append({"name": "confirm", "folder": "confirm-extend1", "seeds": [0, 1], "rows": [{"name": "S"}]})
    assert stage_lines(stages, space, tmp_path)[3] == \
        "  confirm (extension 1), folder confirm-extend1/: 2 trial(s), to run"


# --- system metrics of a trial's run ------------------------------------------------------------------------

def test_a_run_shorter_than_one_sampling_interval_still_gets_its_system_metrics(tmp_path):
    """MLflow's monitor logs after a whole interval (10 s); the trial's own stop takes a last sample."""
    from mlflow import MlflowClient

    from kdray.orchestration.workers import stop_system_metrics, system_metrics

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("x")).info.run_id
    monitor = system_metrics(uri, run, resumed=False)
    assert monitor is not None
    stop_system_metrics(monitor)
    metrics = client.get_run(run).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0


def test_a_tuning_split_is_set_key_by_key_and_never_searched(tmp_path, teacher):
    section = write(tmp_path / "section.yaml", {"num_samples": 2, "overrides": {"data.tune_split": {
        "fraction": 0.1, "seed": 0}}, "space": {"losses.kd.enabled": True}})
    with pytest.raises(ConfigError, match=r"overrides.data.tune_split: 'data.tune_split' is a section of the job, "
                                          r"not a key: set its keys one by one, e.g. data.tune_split.fraction"):
        dry_run(request(section, f"teacher.checkpoint={teacher}"))
    searched = write(tmp_path / "searched.yaml", {"num_samples": 2, "space": {
        "losses.kd.enabled": True, "data.tune_split.fraction": {"uniform": [0.05, 0.2]}}})
    with pytest.raises(ConfigError, match=r"data.tune_split.fraction is searched: the trials would each be scored "
                                          r"on other held-out images"):
        dry_run(request(searched, f"teacher.checkpoint={teacher}"))
