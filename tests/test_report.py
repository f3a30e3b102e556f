"""`kdray.report` on a fabricated MLflow store: every number of every table, captions, the handling of failed and
early-stopped runs, last vs best, the files and plots, the artifacts on the sweep run, and bad input.

The store (one SQLite file for the module) holds a teacher run, an ablation sweep (3 rows x 3 seeds, plus a
failed, an early-stopped and an interrupted run, and a row with only early-stopped runs) and a later search
sweep (8 Optuna-style trials, one early-stopped, one failed) whose space file is logged on its parent run.
"""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import optuna
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
from optuna.trial import create_trial

from kdray import contract
from kdray.errors import ConfigError
from kdray.report import main
from kdray.reporting import build_tables, read_sweep, write_report
from kdray.reporting.runs import histories, natural_key, read_iou_at
from kdray.reporting.space import infer_knobs
from kdray.reporting.tables import best_runs

STEPS = (100, 200, 300)
CLASSES = ("road", "sidewalk", "car")  # not alphabetical: the tables keep the logged order
OFFSETS = {"road": 0.10, "sidewalk": 0.0, "car": -0.10}  # per-class IoU = mIoU + offset, at every evaluation
ARCHS = {contract.TEACHER_ARCH: "deeplabv3_resnet101", contract.STUDENT_ARCH: "deeplabv3_resnet18",
         contract.PARAMS_M: "13.6000", contract.DATASET: "synthetic"}

# ablation: row -> method, then per seed (last, best) of val/miou over the three evaluations
CE_RUNS = {0: (0.70, 0.71), 1: (0.72, 0.73), 2: (0.71, 0.74)}
KD_RUNS = {0: (0.73, 0.735), 1: (0.74, 0.76), 2: (0.75, 0.75)}
KDI_RUNS = {0: (0.76, 0.77), 1: (0.75, 0.78), 2: (0.77, 0.77)}
I2CKD_STOPPED = {0: [0.55, 0.58], 1: [0.50, 0.56]}  # histories of the only (early-stopped) runs of row +I2CKD
TEACHER = (0.78, 0.80)

# search: trial -> (kd.weight, i2ckd.enabled, i2ckd.margin, state, last, best)
SEARCH = {
    "s_0": (1.0, True, 0.5, "FINISHED", 0.74, 0.75),
    "s_1": (0.2, False, 0.5, "FINISHED", 0.70, 0.70),
    "s_2": (5.0, True, 1.5, "FINISHED", 0.78, 0.785),
    "s_3": (0.5, True, 0.3, "FINISHED", 0.72, 0.73),
    "s_4": (2.0, False, 0.5, "FINISHED", 0.71, 0.72),
    "s_5": (0.12, True, 1.9, "STOPPED", 0.60, 0.60),
    "s_6": (8.0, False, 0.5, "FAILED", None, None),
    "s_7": (3.0, True, 1.0, "FINISHED", 0.76, 0.80),
}
SPACE_YAML = """name: tiny-search
metric: val/miou
mode: max
num_samples: 8
space:
  losses.kd.enabled: true
  losses.kd.weight: {loguniform: [0.1, 10.0]}
  losses.i2ckd.enabled: {choice: [true, false]}
  losses.i2ckd.margin: {uniform: [0.1, 2.0], if: losses.i2ckd.enabled}
"""


def history(last: float, best: float) -> list[float]:
    """Three evaluations whose last is `last` and maximum `best` (at step 200 when best > last)."""
    return [last - 0.05, best, last] if best > last else [last - 0.10, last - 0.05, last]


class Store:
    def __init__(self, path):
        self.uri = f"sqlite:///{path}"
        self.client = MlflowClient(self.uri)
        self.artifacts = (path.parent / "artifacts").as_uri()  # not ./mlruns of the working directory
        self.clock = 1_000_000

    def run(self, experiment_id, tags, values=(), steps=STEPS, params=None, status="FINISHED", name=None):
        self.clock += 1000
        run = self.client.create_run(experiment_id, start_time=self.clock, tags=tags, run_name=name)
        metrics = []
        for i, (step, v) in enumerate(zip(steps, values)):
            metrics.append(Metric(contract.VAL_MIOU, v, self.clock + i, step))
            metrics += [Metric(contract.VAL_IOU_PREFIX + c, v + OFFSETS[c], self.clock + i, step) for c in CLASSES]
        self.client.log_batch(run.info.run_id, metrics=metrics,
                              params=[Param(k, str(v)) for k, v in (params or {}).items()])
        self.client.set_terminated(run.info.run_id, status, end_time=self.clock + 500)
        return run.info.run_id


def trial_tags(sweep_id, trial_id, method, seed, **extra):
    return {contract.KIND: "trial", contract.SWEEP_ID: sweep_id, contract.TRIAL_ID: trial_id, contract.METHOD: method,
            contract.SEED: str(seed), **ARCHS, **extra}


def config(seed, kd=False, i2ckd=False, **more):
    """A trial's params as kdray logs them: the options of a disabled loss are left out, its `enabled` stays."""
    params = {"losses.kd.enabled": kd, "losses.i2ckd.enabled": i2ckd, "losses.kd.weight": 1.0,
              "losses.i2ckd.margin": 0.5, "run.seed": seed, "data.root": "/data/synthetic", **more}
    off = [f"losses.{name}." for name, on in (("kd", kd), ("i2ckd", i2ckd)) if not on]
    return {k: v for k, v in params.items() if k.endswith(".enabled") or not k.startswith(tuple(off))}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    eid = s.client.create_experiment("kdtest", artifact_location=s.artifacts)
    s.teacher = s.run(eid, {contract.KIND: "teacher", contract.TEACHER_ARCH: "deeplabv3_resnet101",
                            contract.PARAMS_M: "61.1000"}, history(*TEACHER), name="teacher")
    s.abl = s.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: "abl-1", contract.SPACE: "tiny-ablation",
                        contract.SPACE_KIND: "ablation", contract.METRIC: contract.VAL_MIOU, contract.MODE: "max"})
    rows = [("Student (CE)", "CE", CE_RUNS, {}), ("+KD", "KD", KD_RUNS, {"kd": True}),
            ("+KD+I2CKD", "KD+I2CKD", KDI_RUNS, {"kd": True, "i2ckd": True})]
    # created in reverse row order: the tables must follow the trial ids (natural order), not creation time
    for r, (row, method, runs, flags) in reversed(list(enumerate(rows))):
        for seed, (last, best) in runs.items():
            s.run(eid, trial_tags("abl-1", f"abl_{5 * r + seed}", method, seed, **{contract.ROW: row}),
                  history(last, best), params=config(seed, **flags))
    s.failed = s.run(eid, trial_tags("abl-1", "abl_8", "KD", 3, **{contract.ROW: "+KD",
                                                                   contract.FAILURE: "CUDA out of memory"}),
                     [0.5], params=config(3, kd=True), status="FAILED")
    s.stopped = s.run(eid, trial_tags("abl-1", "abl_13", "KD+I2CKD", 3, **{contract.ROW: "+KD+I2CKD",
                                                                           contract.STOPPED_EARLY: "true"}),
                      [0.60, 0.62], params=config(3, kd=True, i2ckd=True))  # stopped: FINISHED, tagged
    s.interrupted = s.run(eid, trial_tags("abl-1", "abl_3", "CE", 3, **{contract.ROW: "Student (CE)"}),
                          [0.65], params=config(3), status="KILLED")
    for seed, values in I2CKD_STOPPED.items():
        s.run(eid, trial_tags("abl-1", f"abl_{15 + seed}", "I2CKD", seed, **{contract.ROW: "+I2CKD",
                                                                             contract.STOPPED_EARLY: "true"}),
              values, params=config(seed, i2ckd=True))
    s.search = s.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: "srch-1", contract.SPACE: "tiny-search",
                           contract.SPACE_KIND: "search", contract.METRIC: contract.VAL_MIOU, contract.MODE: "max"})
    s.client.log_text(s.search, SPACE_YAML, contract.SPACE_ARTIFACT)
    s.search_runs = {}
    for trial, (w, en, m, state, last, best) in SEARCH.items():
        extra = {contract.STOPPED_EARLY: "true"} if state == "STOPPED" else {}
        if state == "FAILED":
            extra[contract.FAILURE] = "loss is NaN at iteration 120"
        values = history(last, best) if last is not None else []
        if state == "STOPPED":
            values = values[:2]
            values[-1] = last  # stopped after two evaluations, at `last`
        status = {"STOPPED": "FINISHED"}.get(state, state)  # a stopped trial ends FINISHED, tagged
        s.search_runs[trial] = s.run(eid, trial_tags("srch-1", trial, "KD+I2CKD" if en else "KD", 0, **extra),
                                     values, params=config(0, kd=True, i2ckd=en, **{"losses.kd.weight": w,
                                                                                    "losses.i2ckd.margin": m}),
                                     status=status)
    s.client.create_experiment("empty", artifact_location=s.artifacts)
    return s


def cells(table):
    return {row[0]: dict(zip(table.header, row)) for row in table.rows}


def stats(values):
    return np.mean(values), np.std(values, ddof=1)


@pytest.fixture(scope="module")
def ablation_last(store):
    return build_tables(read_sweep(store.uri, "kdtest", "abl-1"), "last")[0]


def by_name(tables):
    return {t.name: t for t in tables}


def test_natural_order_of_trial_ids():
    assert sorted(["abl_10", "abl_5", "abl_15", "abl_0"], key=natural_key) == ["abl_0", "abl_5", "abl_10", "abl_15"]


def test_read_sweep_gives_an_arrow_table_with_states_and_history(store):
    data = read_sweep(store.uri, "kdtest", "abl-1")
    assert data.sweep_id == "abl-1" and data.space_kind == "ablation" and data.classes == CLASSES
    runs = {r["run_id"]: r for r in data.runs.to_pylist()}
    assert runs[store.failed]["state"] == "failed" and runs[store.failed]["failure"] == "CUDA out of memory"
    assert runs[store.stopped]["state"] == "early_stopped" and runs[store.stopped]["last_step"] == 200
    assert runs[store.interrupted]["state"] == "interrupted"
    assert data.runs.num_rows == 3 * 3 + 3 + 2
    assert data.runs.column("trial_id").to_pylist()[:5] == ["abl_0", "abl_1", "abl_2", "abl_3", "abl_5"]
    ce1 = next(r for r in runs.values() if r["trial_id"] == "abl_1")
    assert ce1["miou_last"] == pytest.approx(0.72) and ce1["miou_best"] == pytest.approx(0.73)
    assert ce1["best_step"] == 200 and ce1["n_evals"] == 3 and ce1["params.run.seed"] == "1"
    assert ce1["iou.car"] == pytest.approx(0.62) and ce1["params_m"] == pytest.approx(13.6)
    assert data.history.num_rows == sum(r["n_evals"] for r in runs.values()) + 3  # + the teacher's


@pytest.mark.parametrize("value", ["last", "best"])
def test_ablation_table_numbers(store, value):
    tables = by_name(build_tables(read_sweep(store.uri, "kdtest", "abl-1"), value)[0])
    table = tables["ablation"]
    pick = 0 if value == "last" else 1
    rows = {r["row"]: r for r in table.data.to_pylist()}
    ce_mean = None
    for row, runs in (("Student (CE)", CE_RUNS), ("+KD", KD_RUNS), ("+KD+I2CKD", KDI_RUNS)):
        mean, std = stats([v[pick] for v in runs.values()])
        ce_mean = mean if ce_mean is None else ce_mean
        got = rows[row]
        assert got["miou_pct_mean"] == pytest.approx(100 * mean) and got["miou_pct_std"] == pytest.approx(100 * std)
        assert got["n"] == 3 and got["seeds"] == [0, 1, 2] and not got["from_stopped"]
        shown = cells(table)[row]
        assert shown["mIoU (%)"] == f"{100 * mean:.2f} ± {100 * std:.2f}" and shown["n"] == "3"
        if row == "Student (CE)":
            assert got["gain_pp"] is None and shown["Gain (pp)"] == "—"
        else:
            assert got["gain_pp"] == pytest.approx(100 * (mean - ce_mean))
            assert shown["Gain (pp)"] == f"{100 * (mean - ce_mean):+.2f}"
    # the row built only from early-stopped runs: its mean, a dagger, a footnote
    stopped = [h[-1] if value == "last" else max(h) for h in I2CKD_STOPPED.values()]
    mean, std = stats(stopped)
    assert rows["+I2CKD"]["from_stopped"] and rows["+I2CKD"]["n"] == 2
    assert rows["+I2CKD"]["miou_pct_mean"] == pytest.approx(100 * mean)
    assert cells(table)["+I2CKD"]["mIoU (%)"] == f"{100 * mean:.2f} ± {100 * std:.2f}†"
    assert cells(table)["+I2CKD"]["Gain (pp)"].endswith("†")
    assert any(n.startswith("† built only from early-stopped runs") for n in table.notes)
    # the teacher on top, from its own run
    assert table.rows[0][0] == "Teacher (deeplabv3_resnet101)"
    assert rows["Teacher (deeplabv3_resnet101)"]["miou_pct_mean"] == pytest.approx(100 * TEACHER[pick])
    assert table.rows[0][2] == f"{100 * TEACHER[pick]:.2f}" and table.rows[0][3] == "1"
    # order: teacher, CE, then the rows in the order of their first trial id
    assert [r[0] for r in table.rows][1:] == ["Student (CE)", "+KD", "+KD+I2CKD", "+I2CKD"]
    # excluded runs are counted on their row, never averaged
    assert cells(table)["+KD"]["Excluded"] == "1 failed" and rows["+KD"]["n_failed"] == 1
    assert cells(table)["+KD+I2CKD"]["Excluded"] == "1 early-stopped"
    assert cells(table)["Student (CE)"]["Excluded"] == "1 interrupted"
    which = "the last evaluation" if value == "last" else "the best evaluation"
    assert which in table.caption and "sample std (ddof=1)" in table.caption
    assert "n = 3 seeds (0, 1, 2)" in table.caption and "sweep `abl-1`" in table.caption
    assert "excluded from the mean" in " ".join(table.notes)


def test_method_table_numbers_and_best_run(store, ablation_last):
    table = by_name(ablation_last)["methods"]
    rows = {r["method"]: r for r in table.data.to_pylist()}
    assert [r[1] for r in table.rows] == ["Teacher", "CE", "KD", "KD+I2CKD", "I2CKD"]
    assert all(r[0] == "deeplabv3_resnet101 → deeplabv3_resnet18" for r in table.rows)
    assert cells_by_method(table)["Teacher"]["Params (M)"] == "61.1"
    assert cells_by_method(table)["KD"]["Params (M)"] == "13.6" and rows["KD"]["params_m"] == pytest.approx(13.6)
    for method, runs in (("CE", CE_RUNS), ("KD", KD_RUNS), ("KD+I2CKD", KDI_RUNS)):
        mean, std = stats([v[0] for v in runs.values()])
        assert rows[method]["miou_pct_mean"] == pytest.approx(100 * mean)
        assert rows[method]["miou_pct_std"] == pytest.approx(100 * std) and rows[method]["n"] == 3
        best_seed = max(runs, key=lambda s: runs[s][0])
        assert rows[method]["best_miou_pct"] == pytest.approx(100 * runs[best_seed][0])
    # best CE run: seed 1 (0.72), trial abl_1; best KD+I2CKD: seed 2 (0.77), trial abl_12
    assert cells_by_method(table)["CE"]["Best run"] == "72.00 (abl_1)"
    assert cells_by_method(table)["KD+I2CKD"]["Best run"] == "77.00 (abl_12)"
    assert cells_by_method(table)["I2CKD"]["Best run"] == "58.00 (abl_15)†"


def cells_by_method(table):
    return {row[1]: dict(zip(table.header, row)) for row in table.rows}


def test_best_value_changes_the_best_run(store):
    table = by_name(build_tables(read_sweep(store.uri, "kdtest", "abl-1"), "best")[0])["methods"]
    # best evaluations: CE seed 2 (0.74) beats seed 1 (0.73)
    assert cells_by_method(table)["CE"]["Best run"] == "74.00 (abl_2)"
    assert cells_by_method(table)["Teacher"]["mIoU (%)"] == "80.00"


def test_per_class_iou_last_and_best(store, ablation_last):
    table = by_name(ablation_last)["per_class"]
    assert table.header == ["Class", "Teacher", "CE", "KD", "KD+I2CKD", "I2CKD†"]
    assert [r[0] for r in table.rows] == [*CLASSES, "mIoU", "Run"]
    shown = {r[0]: r[1:] for r in table.rows}
    best_last = {"Teacher": TEACHER[0], "CE": 0.72, "KD": 0.75, "KD+I2CKD": 0.77, "I2CKD†": 0.58}
    for c in CLASSES:
        assert shown[c] == [f"{100 * (v + OFFSETS[c]):.2f}" for v in best_last.values()]
    assert shown["Run"] == ["teacher", "abl_1", "abl_7", "abl_12", "abl_15"]
    long = table.data.to_pylist()
    assert len(long) == 5 * len(CLASSES)
    assert next(r for r in long if r["label"] == "CE" and r["class"] == "car")["iou_pct"] == pytest.approx(62.0)

    data = read_sweep(store.uri, "kdtest", "abl-1")
    steps = {run_id: step for _, run_id, step in best_runs(data, "best")}
    tables = by_name(build_tables(data, "best", iou_at_best=read_iou_at(store.uri, steps, data.class_keys))[0])
    shown = {r[0]: r[1:] for r in tables["per_class"].rows}
    best_best = {"Teacher": TEACHER[1], "CE": 0.74, "KD": 0.76, "KD+I2CKD": 0.78, "I2CKD†": 0.58}
    for c in CLASSES:
        assert shown[c] == [f"{100 * (v + OFFSETS[c]):.2f}" for v in best_best.values()]
    assert shown["Run"] == ["teacher", "abl_2", "abl_6", "abl_11", "abl_15"]
    assert "the evaluation of its best mIoU" in tables["per_class"].caption


def test_excluded_runs_are_listed_with_reasons(store, ablation_last):
    table = by_name(ablation_last)["excluded"]
    reasons = {r[0]: r[-1] for r in table.rows}
    assert reasons["abl_8"] == "CUDA out of memory"
    assert reasons["abl_13"] == "stopped early by the scheduler at iteration 200; last mIoU 62.00"
    assert reasons["abl_3"] == ("status KILLED, not stopped by the scheduler: interrupted; last mIoU 65.00 at "
                                "iteration 100")
    assert {r[0]: r[4] for r in table.rows}["abl_3"] == "interrupted"
    assert set(reasons) == {"abl_3", "abl_8", "abl_13", "abl_15", "abl_16"}


def test_search_summary(store):
    data = read_sweep(store.uri, "kdtest")  # the latest sweep: the search
    assert data.sweep_id == "srch-1" and data.space_kind == "search"
    tables, search = build_tables(data, "last", top_k=3)
    tables = by_name(tables)
    assert "ablation" not in tables
    assert search.space_source == "the sweep's space file"
    assert list(search.space) == ["losses.kd.weight", "losses.i2ckd.enabled", "losses.i2ckd.margin"]
    assert search.space["losses.kd.weight"].distribution.log
    best = dict(tables["search_best"].rows)
    assert best["Trial"] == "s_2" and best["val mIoU (%)"] == "78.00" and best["losses.kd.weight"] == "5"
    assert best["losses.i2ckd.margin"] == "1.5"
    top = tables["search_top"]
    assert [r[1] for r in top.rows] == ["s_2", "s_7", "s_0"] and top.rows[1][2] == "76.00"
    # a disabled loss's knob is inactive, not its default value
    s1 = next(t for t in search.trials if t.label == "s_1")
    assert s1.params == {"losses.kd.weight": 0.2, "losses.i2ckd.enabled": False}
    # the early-stopped trial ranks with a dagger; the failed one takes no part
    assert [t.label for t in search.trials][-1] == "s_5" and "s_6" not in [t.label for t in search.trials]
    full = by_name(build_tables(data, "last", top_k=10)[0])["search_top"]
    assert full.rows[-1][:4] == ["7", "s_5", "60.00†", "early_stopped"]
    imp = tables["importance"]
    assert "PED-ANOVA" in imp.caption and "best 4 of 7 trials" in imp.caption
    assert sum(imp.data.column("importance").to_pylist()) == pytest.approx(1.0)
    # the same numbers as Optuna gives on a study built by hand from the fabricated trials
    dists = {"losses.kd.weight": FloatDistribution(0.1, 10.0, log=True),
             "losses.i2ckd.enabled": CategoricalDistribution([True, False]),
             "losses.i2ckd.margin": FloatDistribution(0.1, 2.0)}
    study = optuna.create_study(direction="maximize")
    for w, en, m, state, last, _ in SEARCH.values():
        if state != "FAILED":
            params = {"losses.kd.weight": w, "losses.i2ckd.enabled": en, **({"losses.i2ckd.margin": m} if en else {})}
            study.add_trial(create_trial(params=params, distributions={k: dists[k] for k in params}, value=last))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=0.5))
    got = dict(zip(imp.data.column("param").to_pylist(), imp.data.column("importance").to_pylist()))
    assert got == pytest.approx(expected) and [r[0] for r in imp.rows] == list(expected)
    # methods of a search sweep: n counts configurations, the failed trial is counted
    methods = cells_by_method(tables["methods"])
    mean, std = stats([0.74, 0.78, 0.72, 0.76])
    assert methods["KD+I2CKD"]["mIoU (%)"] == f"{100 * mean:.2f} ± {100 * std:.2f}"
    assert methods["KD+I2CKD"]["Excluded"] == "1 early-stopped" and methods["KD"]["Excluded"] == "1 failed"
    assert "n counts configurations" in tables["methods"].caption
    # best over evaluations: s_7 (0.80) overtakes s_2 (0.785)
    best = dict(by_name(build_tables(data, "best")[0])["search_best"].rows)
    assert best["Trial"] == "s_7" and best["val mIoU (%)"] == "80.00"


def test_write_report_writes_every_format_and_plot_and_logs_them(store, tmp_path):
    out = tmp_path / "report"
    result = write_report(store.uri, "kdtest", "srch-1", out, formats=("md", "tex", "csv", "parquet"),
                          log_artifacts=True)
    names = {p.name for p in result.files}
    for table in ("methods", "search_best", "search_top", "importance", "per_class", "excluded"):
        assert {f"{table}.tex", f"{table}.csv", f"{table}.parquet"} <= names
    assert {"report.md", "runs.csv", "runs.parquet", "history.parquet", "miou_vs_iteration.png",
            "parallel_coordinates.png", "importance.png"} <= names
    for png in out.glob("*.png"):
        assert png.stat().st_size > 0 and imread(png).ndim == 3
    text = (out / "report.md").read_text()
    assert text == result.markdown and "| Rank | Trial | mIoU (%) |" in text and "![importance](importance.png)" in text
    tex = (out / "methods.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex and r"$\rightarrow$" in tex
    parquet = pq.read_table(out / "methods.parquet")
    assert parquet.equals(result.tables["methods"].data)
    assert pa_csv.read_csv(out / "methods.csv").num_rows == parquet.num_rows
    logged = {f.path for f in store.client.list_artifacts(store.search, contract.REPORT_ARTIFACT_DIR)}
    assert {"report/report.md", "report/importance.png", "report/methods.tex"} <= logged


def test_ablation_report_markdown_and_curves(store, tmp_path):
    result = write_report(store.uri, "kdtest", "abl-1", tmp_path, value="best")  # writes nothing to MLflow
    assert [p.name for p in result.files] == ["miou_vs_iteration.png", "report.md"]
    assert imread(tmp_path / "miou_vs_iteration.png").shape[0] > 100
    assert "best evaluation" in result.markdown and "| Teacher (deeplabv3_resnet101) | teacher | 80.00 |" in \
        result.markdown
    assert store.client.list_artifacts(store.abl, contract.REPORT_ARTIFACT_DIR) == []


def test_csv_joins_the_seed_lists(store, tmp_path):
    write_report(store.uri, "kdtest", "abl-1", tmp_path, formats=("csv",), plots=False)
    table = pa_csv.read_csv(tmp_path / "ablation.csv")
    rows = dict(zip(table.column("row").to_pylist(), table.column("seeds").to_pylist()))
    assert rows["+KD"] == "0;1;2"


def test_bad_input_is_a_config_error(store, tmp_path):
    with pytest.raises(ConfigError, match="no experiment 'nope'.*kdtest"):
        read_sweep(store.uri, "nope")
    with pytest.raises(ConfigError, match="no sweep 'zzz' in experiment 'kdtest'.*srch-1, abl-1"):
        read_sweep(store.uri, "kdtest", "zzz")
    with pytest.raises(ConfigError, match="has no sweep run"):
        read_sweep(store.uri, "empty")
    with pytest.raises(ConfigError, match="no MLflow store at"):
        read_sweep(f"sqlite:///{tmp_path}/missing.db", "kdtest")
    with pytest.raises(ConfigError, match="unknown report format 'html'"):
        write_report(store.uri, "kdtest", formats=("html",))


def test_command_line(store, tmp_path, capsys):
    from kdray.cli import run_main

    assert main(["--experiment", "kdtest", "--sweep", "abl-1", "--tracking-uri", store.uri, "--out", str(tmp_path),
                 "--format", "md,tex", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# kdray report: kdtest, sweep abl-1") and (tmp_path / "ablation.tex").is_file()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ["--experiment", "nope", "--tracking-uri", store.uri])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()  # the store it reads (first line), then one error line
    assert err[0].startswith("MLflow store: ") and len(err) == 2 and err[1].startswith("error: no experiment 'nope'")


def test_knobs_inferred_from_params_when_the_space_file_is_missing(store):
    knobs = infer_knobs(read_sweep(store.uri, "kdtest", "srch-1", history=False).runs)
    assert set(knobs) == {"losses.kd.weight", "losses.i2ckd.enabled", "losses.i2ckd.margin"}  # not seed, not paths
    weight, margin = knobs["losses.kd.weight"].distribution, knobs["losses.i2ckd.margin"].distribution
    assert weight.log and (weight.low, weight.high) == (0.12, 5.0)  # the failed trial's 8.0 is not counted
    assert knobs["losses.i2ckd.margin"].condition == ("losses.i2ckd.enabled", True) and (margin.low, margin.high) == (
        0.3, 1.9)


def test_remote_stores_read_histories_in_threads():
    class Client:
        def __init__(self):
            self.threads = set()

        def get_metric_history(self, run_id, key):
            self.threads.add(threading.get_ident())
            time.sleep(0.01)
            return [Metric(key, float(run_id), 0, 100)]

    pairs = [(str(i), contract.VAL_MIOU) for i in range(32)]
    remote, local = Client(), Client()
    assert [h[0].value for h in histories(remote, "http://tracking:5000", pairs)] == list(range(32))
    assert [h[0].value for h in histories(local, "sqlite:////tmp/x.db", pairs)] == list(range(32))
    assert len(remote.threads) > 1 and len(local.threads) == 1


# the methods table of sweep abl-1 (--value last) as kdray wrote it before runs logged cost metrics: a sweep without
# them must keep it byte for byte
METHODS_MARKDOWN_BEFORE_COSTS = (
    "### Methods\n"
    "\n"
    "Methods: val mIoU (%) at the last evaluation of each run, mean ± sample std (ddof=1) over the "
    "finished runs of each row, n = 3 seeds (0, 1, 2); sweep `abl-1` (space tiny-ablation), experiment "
    "`kdtest`. Params: the student's parameters (the teacher's on teacher rows), millions.\n"
    "\n"
    "| Teacher → Student | Method | Params (M) | mIoU (%) | n | Best run | Excluded |\n"
    "|:---|:---|---:|---:|---:|:---|:---|\n"
    "| deeplabv3_resnet101 → deeplabv3_resnet18 | Teacher | 61.1 | 78.00 | 1 | 78.00 (teacher) | — |\n"
    "| deeplabv3_resnet101 → deeplabv3_resnet18 | CE | 13.6 | 71.00 ± 1.00 | 3 | 72.00 (abl_1) | 1 "
    "interrupted |\n"
    "| deeplabv3_resnet101 → deeplabv3_resnet18 | KD | 13.6 | 74.00 ± 1.00 | 3 | 75.00 (abl_7) | 1 "
    "failed |\n"
    "| deeplabv3_resnet101 → deeplabv3_resnet18 | KD+I2CKD | 13.6 | 76.00 ± 1.00 | 3 | 77.00 (abl_12) | "
    "1 early-stopped |\n"
    "| deeplabv3_resnet101 → deeplabv3_resnet18 | I2CKD | 13.6 | 57.00 ± 1.41† | 2 | 58.00 (abl_15)† | — "
    "|\n"
    "\n"
    "† built only from early-stopped runs (stopped by the scheduler before the full budget): their "
    "values at stopping, not comparable with rows of finished runs.  \n"
    "Early-stopped runs are counted but excluded from the mean; failed, not-started, interrupted and "
    "unfinished (still running) runs, and finished runs without a val mIoU, are excluded; all are listed "
    "in the excluded-runs table. This sweep: 3 early-stopped, 1 failed, 1 interrupted of 14 trial runs.  "
    "\n"
)


def test_a_sweep_without_cost_metrics_keeps_its_tables_byte_for_byte(store, ablation_last, tmp_path):
    from kdray.reporting.render import markdown

    assert markdown(by_name(ablation_last)["methods"]) == METHODS_MARKDOWN_BEFORE_COSTS
    assert "pareto" not in by_name(ablation_last)
    data = read_sweep(store.uri, "kdtest", "abl-1")
    assert not any(c.startswith("cost.") for c in data.runs.column_names)
    result = write_report(store.uri, "kdtest", "srch-1", tmp_path, formats=("md", "csv"))
    assert "GFLOPs" not in result.markdown and "Latency" not in result.markdown and "Pareto" not in result.markdown
    assert not (tmp_path / "pareto.png").exists() and not (tmp_path / "pareto.csv").exists()
