"""The run contract: one module of names below every layer, imports that point down only, the typed evaluation
the engine reports, failure reasons as values, and `override` (the driver's one way to change a Job)."""

from __future__ import annotations

import ast
import math
import pickle
from pathlib import Path

import pytest

from kdray import contract
from kdray.config import job_from_dict, load_job, override, read_yaml, to_dict
from kdray.contract import Evaluation, improves
from kdray.engine.evaluate import judge
from kdray.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "kdray"
DEMO = REPO / "jobs" / "demo.yaml"


# --- imports point down only ---------------------------------------------------------------------------------------

def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports, at module level or inside a function (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module or "")
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from kdray import contract`
    return names


def sources(*parts: str) -> list[Path]:
    files = []
    for part in parts:
        target = PACKAGE / part
        files += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    assert files and all(f.is_file() for f in files), parts
    return files


def offenders(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return [f"{f.relative_to(REPO)} imports {name}" for f in files for name in sorted(imported_modules(f))
            if any(name == b or name.startswith(b + ".") for b in banned)]


def test_the_report_does_not_import_orchestration():
    assert offenders(sources("reporting"), ("kdray.orchestration",)) == []


@pytest.mark.parametrize("layer", ["engine", "models", "losses", "data", "metrics.py"])
def test_lower_layers_know_nothing_of_ray_mlflow_or_orchestration(layer):
    assert offenders(sources(layer), ("ray", "mlflow", "kdray.orchestration", "kdray.reporting")) == []


def test_the_contract_and_the_space_parser_sit_below_orchestration_and_reporting():
    banned = ("ray", "mlflow", "torch", "kdray.orchestration", "kdray.reporting", "kdray.engine")
    assert offenders(sources("contract.py", "space.py"), banned) == []
    assert {n for n in imported_modules(PACKAGE / "contract.py") if n.startswith("kdray")} <= {"kdray.errors",
                                                                                               "kdray.errors.ConfigError"}


def test_the_names_live_in_one_module():
    assert not (PACKAGE / "orchestration" / "layout.py").exists()
    assert not (PACKAGE / "orchestration" / "space.py").exists()  # one space parser: kdray/space.py
    literals = {contract.VAL_MIOU, contract.VAL_PIXEL_ACC, contract.VAL_BEST_MIOU, contract.TRAIN_LR,
                contract.TRAIN_IMAGES_PER_S, contract.TRAIN_LOSS_TOTAL}
    for path in sources("engine", "orchestration"):
        strings = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & strings, f"{path.relative_to(REPO)} spells {literals & strings} itself"


def test_one_markdown_table_writer():
    from kdray.orchestration.outcome import SweepOutcome, TrialSummary, summary_table
    from kdray.reporting.render import markdown_table

    writers = [f.relative_to(REPO).as_posix() for f in PACKAGE.rglob("*.py") if "---:" in f.read_text()
               or '"|---' in f.read_text() or "'|---" in f.read_text()]
    assert writers == ["kdray/reporting/render.py"]
    trials = [TrialSummary("t1", "KD", 0, {"losses.kd.weight": 2.0}, 0.5, 0.6, 4, "finished")]
    text = summary_table(SweepOutcome("s", Path("."), "u", "e", "p", trials, 1.0))
    assert text.splitlines()[1] == markdown_table(["a"] * 9, [], "rllr" + "l" + "rrrl").splitlines()[1]
    assert text.splitlines()[2] == "| 1 | t1 | KD | 0 | 2 | 60.00 | 50.00 | 4 | finished |"


# --- the typed evaluation ------------------------------------------------------------------------------------------

CLASSES = ("road", "tv/monitor")


def scores(miou: float, pixel_acc: float = 0.9) -> dict[str, object]:
    return {"miou": miou, "iou": [miou, float("nan")], "pixel_acc": pixel_acc}


def test_the_first_evaluation_is_the_best_so_far():
    ev = judge(3, scores(0.4), CLASSES, float("-inf"))
    assert ev == Evaluation(3, 0.4, 0.9, CLASSES, (0.4, ev.iou[1]), 0.4, True)
    assert math.isnan(ev.iou[1])


@pytest.mark.parametrize(("miou", "best", "is_best", "best_after"), [
    (0.5, 0.4, True, 0.5),
    (0.4, 0.4, False, 0.4),  # a tie keeps the earlier evaluation's weights
    (0.3, 0.4, False, 0.4),
    (float("nan"), 0.4, False, 0.4),  # NaN is never a best
    (float("nan"), float("-inf"), False, float("-inf")),
    (0.0, float("-inf"), True, 0.0),
])
def test_is_best_is_a_strict_improvement(miou, best, is_best, best_after):
    ev = judge(6, scores(miou), CLASSES, best)
    assert ev.is_best is is_best and ev.best_miou == best_after
    assert improves(miou, best) is is_best


def test_an_evaluation_as_metrics_and_as_a_tune_result():
    ev = judge(6, scores(0.5, 0.8), CLASSES, 0.6)
    metrics = ev.metrics()
    assert list(metrics) == ["iteration", "val/miou", "val/pixel_acc", "val/iou/road", "val/iou/tv_monitor",
                             "val/best_miou"]
    assert metrics["iteration"] == 6 and metrics["val/miou"] == 0.5 and metrics["val/best_miou"] == 0.6
    assert ev.tune_metrics() == {"iteration": 6, "val/miou": 0.5, "val/pixel_acc": 0.8}
    assert repr(pickle.loads(pickle.dumps(ev))) == repr(ev)  # Ray ships it (the teacher's scoring returns one)
    with pytest.raises(ValueError, match="2 class names for 1 IoU values"):
        Evaluation(1, 0.5, 0.5, CLASSES, (0.5,), 0.5, True)


def test_iou_metric_key_lives_in_the_contract_and_metrics_re_exports_it():
    from kdray.metrics import iou_metric_key

    assert iou_metric_key is contract.iou_metric_key
    assert contract.iou_metric_key("a:b") == contract.VAL_IOU_PREFIX + "a_b"


# --- failures as values --------------------------------------------------------------------------------------------

def test_a_trial_failure_carries_its_reason_through_ray_wrapping():
    from kdray.orchestration.outcome import TrialFailed, failure_reason, is_trial_failure

    failed = pickle.loads(pickle.dumps(TrialFailed("loss term 'kd' is nan at iteration 3")))
    assert failed.reason == "loss term 'kd' is nan at iteration 3"

    class Wrapped(RuntimeError):  # what Ray raises on the driver: the remote error's text, the original as `cause`
        def __init__(self, cause):
            super().__init__(f"Traceback ...\nkdray.orchestration.outcome.TrialFailed: {cause}")
            self.cause = cause

    assert is_trial_failure(Wrapped(failed)) and failure_reason(Wrapped(failed)) == failed.reason
    wrapped_data_error = RuntimeError("Traceback\nkdray.errors.DataError: a.png: mask 9")
    assert failure_reason(wrapped_data_error) == "DataError: a.png: mask 9"
    assert failure_reason("Failure # 1\nValueError: out of memory\n") == "ValueError: out of memory"
    assert failure_reason(None) == "the trial failed"


def test_the_worker_no_longer_writes_or_reads_the_failure_tag():
    for name in ("workers.py", "trial.py"):
        text = (PACKAGE / "orchestration" / name).read_text()
        assert ".tags(run_id).get(contract.FAILURE)" not in text and "contract.FAILURE not in" not in text


# --- override ------------------------------------------------------------------------------------------------------

def test_override_builds_a_new_validated_job_and_leaves_the_old_one():
    job = load_job(DEMO)
    changed = override(job, {"losses.kd.weight": 2.5, "optim.iterations": 7})
    assert changed.losses.kd.weight == 2.5 and changed.optim.iterations == 7
    assert job.losses.kd.weight != 2.5 or job.optim.iterations != 7
    assert to_dict(override(job, {})) == to_dict(job)
    with pytest.raises(ConfigError, match="losses.kd.weight"):
        override(job, {"losses.kd.weight": -1.0})
    with pytest.raises(ConfigError):
        override(job, {"optim.no_such_key": 1})


def test_override_keeps_path_resolution(tmp_path, monkeypatch):
    data = read_yaml(DEMO)
    data.setdefault("name", "demo")
    monkeypatch.chdir(tmp_path)
    job = job_from_dict(data, {"run.output_dir": "runs"})
    assert job.run.output_dir == str(tmp_path / "runs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the job's own paths stay where they were resolved; a relative path among the changes resolves here
    moved = override(job, {"teacher.checkpoint": "t.pt"})
    assert moved.run.output_dir == str(tmp_path / "runs") and moved.teacher.checkpoint == str(elsewhere / "t.pt")
    assert override(job, {}).run.output_dir == job.run.output_dir


# --- one space parser ----------------------------------------------------------------------------------------------

def test_the_report_reads_a_space_through_the_sweeps_parser():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from kdray.reporting.space import from_space_file
    from kdray.space import load_space

    path = REPO / "search_spaces" / "demo.yaml"
    sweep_space = load_space(path, load_job(DEMO))
    knobs = from_space_file(path.read_text())
    assert list(knobs) == [d.key for d in sweep_space.dimensions if d.kind != "fixed"]
    for d in sweep_space.dimensions:
        if d.kind == "fixed":
            continue
        dist = knobs[d.key].distribution
        assert knobs[d.key].condition == d.condition
        if d.kind == "choice":
            assert isinstance(dist, CategoricalDistribution) and tuple(dist.choices) == d.args
        else:
            assert isinstance(dist, FloatDistribution) and (dist.low, dist.high) == d.args
            assert dist.log == (d.kind == "loguniform")
    assert from_space_file("name: a\nseeds: [0]\nrows: [{name: CE}]\n") is None  # an ablation has no knobs
    assert from_space_file("space: [") is None


def test_the_status_callback_takes_a_trials_failure_from_its_error_not_its_tags(tmp_path):
    from types import SimpleNamespace

    import ray.cloudpickle

    from kdray.orchestration.outcome import TrialFailed
    from kdray.orchestration.tracking import Tracker
    from kdray.orchestration.trial import MlflowStatusCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "cb")
    ids = {t: tracker.trial_run("s1", t, "p", t, {}, {}) for t in ("a", "b")}
    tracker.set_tags(ids["a"], {contract.FAILURE: "loss term 'kd' is nan at iteration 3"})  # run_trial wrote it
    # Tune has written the error next to the trial on the driver, not yet in the trial's storage
    pickled = tmp_path / "error.pkl"
    pickled.write_bytes(ray.cloudpickle.dumps(TrialFailed("loss term 'kd' is nan at iteration 3")))
    text = tmp_path / "error.txt"
    text.write_text("Failure # 1\nTraceback ...\nkdray.errors.DataError: a.png: mask value 9\n")

    def trial(trial_id, **files):
        return SimpleNamespace(**{"trial_id": trial_id, "last_result": {}, "get_pickled_error": lambda: None,
                                  "get_error": lambda: None, "pickled_error_file": None, "error_file": None, **files})

    callback = MlflowStatusCallback(uri, "cb", "s1")
    callback.on_trial_error(0, [], trial("a", pickled_error_file=str(pickled)))
    callback.on_trial_error(0, [], trial("b", error_file=str(text)))
    assert [tracker.status(ids[t]) for t in "ab"] == ["FAILED", "FAILED"]
    assert tracker.tags(ids["a"])[contract.FAILURE] == "loss term 'kd' is nan at iteration 3"
    assert tracker.tags(ids["b"])[contract.FAILURE] == "kdray.errors.DataError: a.png: mask value 9"
