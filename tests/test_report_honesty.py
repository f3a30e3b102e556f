"""`kdray.report` tells the truth about a sweep: it only reads MLflow unless told to log, skips smoke tests unless
named, writes numbers as numbers, shows the true class names, shows every knob value as the space produced it,
and lists every run it left out, with its state.

The MLflow store is written by hand with `MlflowClient` (one SQLite file for the module), params as
`kdray.orchestration.tracking` stores them: `str()` of the flattened job config, after the job's types applied
(a float field given `2` holds `2.0`, a tuple field holds a list).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from optuna.distributions import FloatDistribution

from kdray import contract
from kdray.errors import ConfigError
from kdray.metrics import iou_metric_key
from kdray.report import main
from kdray.reporting import build_tables, read_sweep, write_report
from kdray.reporting.runs import read_iou_at
from kdray.reporting.search import format_param
from kdray.reporting.space import Outside, active_params, categorical, infer_knobs, parse, resolve
from kdray.reporting.tables import best_runs

STEPS = (100, 200)
SPACE_YAML = """name: every-kind
metric: val/miou
mode: max
num_samples: 6
space:
  data.crop: {choice: [[512, 1024], [768, 768]]}
  data.scale_range: {choice: [[0.5, 2], [1, 1]]}
  adversarial.weight: {choice: [null, 0.001]}
  data.val_split: {choice: ["1", "2"]}
  optim.lr: {choice: [1.0e-4, 0.001]}
  optim.name: {choice: [adam, sgd]}
  optim.momentum: {uniform: [0.5, 0.99], if: {optim.name: sgd}}
  model.width: {choice: [1, 2]}
  model.depth: {int: [1, 4], if: {model.width: 2}}
  run.flag: {choice: [0, 1]}
  run.extra: {loguniform: [1.0e-5, 1.0e-2], if: run.flag}
  losses.kd.enabled: {choice: [true, false]}
  losses.kd.weight: {loguniform: [0.1, 10.0], if: losses.kd.enabled}
  losses.kd.temperature: {uniform: [1.0, 8.0], if: {data.val_split: "1"}}
  run.seed: 0
"""
KNOBS = ["data.crop", "data.scale_range", "adversarial.weight", "data.val_split", "optim.lr", "optim.name",
         "optim.momentum", "model.width", "model.depth", "run.flag", "run.extra", "losses.kd.enabled",
         "losses.kd.weight", "losses.kd.temperature"]
DEFAULTS = {"optim.momentum": 0.9, "model.depth": 2, "run.extra": 0.001, "losses.kd.weight": 1.0,
            "losses.kd.temperature": 4.0, "run.seed": 0, "data.root": "/data/folder"}
# trial -> (its job config values as the job holds them: floats where the field is a float, lists for tuples;
# val mIoU); knobs whose condition fails still hold their default in the job, and must show as inactive
KINDS = {
    "k_0": ({"data.crop": [512, 1024], "data.scale_range": [0.5, 2.0], "adversarial.weight": None,
             "data.val_split": "1", "optim.lr": 0.0001, "optim.name": "sgd", "optim.momentum": 0.95,
             "model.width": 2.0, "model.depth": 3, "run.flag": 1, "run.extra": 0.00025, "losses.kd.enabled": True,
             "losses.kd.weight": 2.5, "losses.kd.temperature": 6.0}, 0.80),
    "k_1": ({"data.crop": [768, 768], "data.scale_range": [1.0, 1.0], "adversarial.weight": 0.001,
             "data.val_split": "2", "optim.lr": 0.001, "optim.name": "adam", "model.width": 1.0, "run.flag": 0,
             "losses.kd.enabled": False}, 0.70),
    "k_2": ({"data.crop": [512, 1024], "data.scale_range": [1.0, 1.0], "adversarial.weight": None,
             "data.val_split": "2", "optim.lr": 0.001, "optim.name": "sgd", "optim.momentum": 0.5,
             "model.width": 1.0, "run.flag": 1, "run.extra": 1e-05, "losses.kd.enabled": True,
             "losses.kd.weight": 0.1}, 0.75),
    "k_3": ({"data.crop": [768, 768], "data.scale_range": [0.5, 2.0], "adversarial.weight": 0.001,
             "data.val_split": "1", "optim.lr": 0.0001, "optim.name": "adam", "model.width": 2.0, "model.depth": 1,
             "run.flag": 0, "losses.kd.enabled": True, "losses.kd.weight": 50.0,
             "losses.kd.temperature": 1.0}, 0.65),
    "k_4": ({"data.crop": [512, 1024], "data.scale_range": [0.5, 2.0], "adversarial.weight": None,
             "data.val_split": "1", "optim.lr": 0.001, "optim.name": "adam", "model.width": 1.0, "run.flag": 1,
             "run.extra": 0.01, "losses.kd.enabled": False, "losses.kd.temperature": 8.0}, 0.72),
}
# what each trial's row shows, knob by knob: the values as the space file wrote them, — where inactive
SHOWN = {
    "k_0": ["[512, 1024]", "[0.5, 2]", "null", '"1"', "0.0001", "sgd", "0.95", "2", "3", "1", "0.00025", "true",
            "2.5", "6"],
    "k_1": ["[768, 768]", "[1, 1]", "0.001", '"2"', "0.001", "adam", "—", "1", "—", "0", "—", "false", "—", "—"],
    "k_2": ["[512, 1024]", "[1, 1]", "null", '"2"', "0.001", "sgd", "0.5", "1", "—", "1", "1e-05", "true", "0.1",
            "—"],
    "k_3": ["[768, 768]", "[0.5, 2]", "0.001", '"1"', "0.0001", "adam", "—", "2", "1", "0", "—", "true", "50‡",
            "1"],
}
# the same trials as the space produced them (what Optuna's study and the report's `Trial.params` hold)
PRODUCED = {
    "k_0": {"data.crop": [512, 1024], "data.scale_range": [0.5, 2], "adversarial.weight": None,
            "data.val_split": "1", "optim.lr": 0.0001, "optim.name": "sgd", "optim.momentum": 0.95,
            "model.width": 2, "model.depth": 3, "run.flag": 1, "run.extra": 0.00025, "losses.kd.enabled": True,
            "losses.kd.weight": 2.5, "losses.kd.temperature": 6.0},
    "k_1": {"data.crop": [768, 768], "data.scale_range": [1, 1], "adversarial.weight": 0.001,
            "data.val_split": "2", "optim.lr": 0.001, "optim.name": "adam", "model.width": 1, "run.flag": 0,
            "losses.kd.enabled": False},
}
NAMES = ["road", "crack (large)", "person+rider", "tv/monitor", "a(b", "a)b"]  # the last two share a key
EXCLUDED = {  # trial -> (status, extra tags, val mIoU history)
    "x_0": ("FAILED", {contract.FAILURE: "CUDA out of memory"}, [0.4]),
    "x_1": ("FAILED", {contract.NOT_STARTED: "true", contract.FAILURE: "no GPU left for the trial"}, []),
    "x_2": ("KILLED", {contract.NOT_STARTED: "true"}, []),
    "x_3": ("KILLED", {}, [0.5]),
    "x_4": ("RUNNING", {}, [0.55]),
    "x_5": ("FINISHED", {}, []),
    "x_6": ("FINISHED", {contract.STOPPED_EARLY: "true"}, [0.6, 0.62]),  # stopped by the scheduler
}


class Store:
    """A SQLite MLflow store written by hand."""

    def __init__(self, path):
        self.uri = f"sqlite:///{path}"
        self.client = MlflowClient(self.uri)
        self.artifacts = (path.parent / "artifacts").as_uri()
        self.clock = 1_000_000

    def experiment(self, name):
        return self.client.create_experiment(name, artifact_location=self.artifacts)

    def run(self, eid, tags, values=(), params=None, status="FINISHED", iou=None):
        """A run with val/miou `values` at STEPS, per-class IoU {metric key: offset} added to each, and params
        stored as `kdray.orchestration.tracking.log_params` stores them (str of each value)."""
        self.clock += 1000
        run_id = self.client.create_run(eid, start_time=self.clock, tags=tags).info.run_id
        metrics = []
        for i, (step, v) in enumerate(zip(STEPS, values)):
            metrics.append(Metric(contract.VAL_MIOU, v, self.clock + i, step))
            metrics += [Metric(key, v + off, self.clock + i, step) for key, off in (iou or {}).items()]
        self.client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in (params or {}).items()])
        if status != "RUNNING":
            self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        return run_id

    def sweep(self, eid, sweep_id, kind="search", **tags):
        return self.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: sweep_id, contract.SPACE: sweep_id,
                              contract.SPACE_KIND: kind, **tags})


def trial_tags(sweep_id, trial_id, method="KD", seed=0, **extra):
    return {contract.KIND: "trial", contract.SWEEP_ID: sweep_id, contract.TRIAL_ID: trial_id, contract.METHOD: method,
            contract.SEED: str(seed), contract.TEACHER_ARCH: "deeplabv3_resnet101",
            contract.STUDENT_ARCH: "deeplabv3_resnet18", **extra}


def history(last):
    return [last - 0.05, last]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    # a search sweep with every kind of knob value, every kind of excluded run, and class names MLflow refuses
    eid = s.experiment("honest")
    s.search = s.sweep(eid, "kinds")
    s.client.log_text(s.search, SPACE_YAML, contract.SPACE_ARTIFACT)
    classes = {contract.CLASSES: json.dumps(NAMES)}
    offsets = {iou_metric_key(n): 0.01 * i for i, n in enumerate(NAMES)}
    s.kinds = {}
    for trial, (values, miou) in KINDS.items():
        params = {**DEFAULTS, **values}
        s.kinds[trial] = s.run(eid, trial_tags("kinds", trial, **classes), history(miou), params, iou=offsets)
    s.excluded = {}
    for trial, (status, extra, values) in EXCLUDED.items():
        tags = trial_tags("kinds", trial, **classes, **extra)
        if trial == "x_2":  # a trial that never started may carry no method either
            del tags[contract.METHOD]
        params = {} if contract.NOT_STARTED in extra else {**DEFAULTS, **KINDS["k_1"][0]}
        s.excluded[trial] = s.run(eid, tags, values, params, status, iou=offsets)
    # the same trials without the space file: knobs inferred from the params (lists, None, text)
    s.bare = s.sweep(eid, "bare")
    for trial, (values, miou) in KINDS.items():
        s.run(eid, trial_tags("bare", trial), history(miou), {**DEFAULTS, **values})
    # a real sweep, then a later smoke test
    eid = s.experiment("smoky")
    s.real = s.sweep(eid, "real", kind="ablation")
    for seed in (0, 1):
        s.run(eid, trial_tags("real", f"r_{seed}", "CE", seed, **{contract.ROW: "CE"}), history(0.7 + seed / 100))
    s.smoke = s.sweep(eid, "smoke", kind="ablation", **{contract.SMOKE_TEST: "true"})
    s.run(eid, trial_tags("smoke", "s_0", "CE", 0, **{contract.ROW: "CE"}), history(0.1))
    eid = s.experiment("only-smoke")
    s.sweep(eid, "smoke-1", kind="ablation", **{contract.SMOKE_TEST: "True"})
    # runs of sweeps before the sanitised keys: no CLASSES tag (names from the keys), or the tag with raw keys
    eid = s.experiment("legacy")
    s.sweep(eid, "untagged", kind="ablation")
    s.run(eid, trial_tags("untagged", "u_0", **{contract.ROW: "KD"}), history(0.7),
          iou={"val/iou/road": 0.1, "val/iou/car": -0.1})
    s.sweep(eid, "raw-keys", kind="ablation")
    s.run(eid, trial_tags("raw-keys", "w_0",
                          **{contract.ROW: "KD", contract.CLASSES: json.dumps(["tv/monitor", "car"])}),
          history(0.7), iou={"val/iou/tv/monitor": 0.1, "val/iou/car": -0.1})
    # a trial the scheduler stopped at step 100 whose workers logged step 200 before the stop reached them
    eid = s.experiment("outran")
    s.sweep(eid, "outran")
    s.outran = s.run(eid, trial_tags("outran", "o_0", **{contract.STOPPED_EARLY: "true", contract.STOPPED_AT: "100"}),
                     [0.3, 0.6], {**DEFAULTS, **KINDS["k_1"][0]}, "FINISHED", iou={"val/iou/road": 0.0})
    s.run(eid, trial_tags("outran", "o_1"), [0.5, 0.55], {**DEFAULTS, **KINDS["k_1"][0]}, iou={"val/iou/road": 0.0})
    return s


def by_name(tables):
    return {t.name: t for t in tables}


def snapshot(client, experiment_ids):
    """Everything MLflow holds about the experiments' runs: status, tags, params, metrics, artifacts."""
    runs = client.search_runs(experiment_ids)
    return {r.info.run_id: (r.info.status, r.data.tags, r.data.params, r.data.metrics,
                            sorted(f.path for f in client.list_artifacts(r.info.run_id)))
            for r in runs}


# 1. read-only unless --log

def test_report_only_reads_mlflow_unless_told_to_log(store, tmp_path, capsys):
    eid = store.client.get_experiment_by_name("smoky").experiment_id
    experiments = sorted(e.name for e in store.client.search_experiments())
    before = snapshot(store.client, [eid])
    assert main(["--experiment", "smoky", "--sweep", "real", "--tracking-uri", store.uri, "--out",
                 str(tmp_path / "a"), "--format", "md,csv,parquet,tex"]) == 0
    write_report(store.uri, "smoky", "real", tmp_path / "b", formats=("md", "csv"), plots=False)
    assert snapshot(store.client, [eid]) == before  # not one tag, param, metric or artifact more
    assert sorted(e.name for e in store.client.search_experiments()) == experiments
    assert "logged under" not in capsys.readouterr().out
    assert main(["--experiment", "smoky", "--sweep", "real", "--tracking-uri", store.uri, "--out",
                 str(tmp_path / "c"), "--no-plots", "--log"]) == 0
    assert f"logged under report/ of run {store.real}" in capsys.readouterr().out
    assert [f.path for f in store.client.list_artifacts(store.real, contract.REPORT_ARTIFACT_DIR)] == [
        "report/report.md"]


# 2. smoke tests

def test_latest_sweep_skips_smoke_tests(store):
    assert read_sweep(store.uri, "smoky", history=False).sweep_id == "real"  # the smoke test started later


def test_a_named_smoke_test_is_reported_and_marked(store, tmp_path):
    data = read_sweep(store.uri, "smoky", "smoke")
    assert data.smoke_test and not read_sweep(store.uri, "smoky", "real", history=False).smoke_test
    tables, _ = build_tables(data, "last")
    assert all(t.caption.startswith("SMOKE TEST (tag kdray.smoke_test=true)") for t in tables)
    result = write_report(store.uri, "smoky", "smoke", tmp_path, formats=("md", "tex"), plots=False)
    assert result.markdown.startswith("# kdray report: smoky, sweep smoke (smoke test)\n\n**SMOKE TEST")
    assert r"\caption{SMOKE TEST" in (tmp_path / "ablation.tex").read_text()
    assert "SMOKE" not in write_report(store.uri, "smoky", "real", tmp_path / "r", plots=False).markdown


def test_only_smoke_tests_is_a_one_line_error(store):
    with pytest.raises(ConfigError, match=r"^experiment 'only-smoke' has only smoke-test sweeps \(tag "
                                          r"kdray.smoke_test=true\): pass --sweep to report one of them: smoke-1$"):
        read_sweep(store.uri, "only-smoke")
    with pytest.raises(ConfigError, match="sweep 'smoke-1' of experiment 'only-smoke' has no trial runs yet"):
        read_sweep(store.uri, "only-smoke", "smoke-1")  # named, it is found


# 3. numbers as numbers

def test_csv_and_parquet_hold_numbers_markdown_the_formatted_cells(store, tmp_path):
    result = write_report(store.uri, "honest", "kinds", tmp_path, formats=("md", "csv", "parquet"), plots=False)
    for path in tmp_path.glob("*.csv"):
        text = path.read_text()
        assert "±" not in text and "%" not in text and "—" not in text and "†" not in text, path.name
    methods = pa_csv.read_csv(tmp_path / "methods.csv")  # a CSV reader sees numbers (80.0 is written 80)
    for column in ("miou_pct_mean", "miou_pct_std", "best_miou_pct", "n", "n_failed", "n_not_started"):
        kind = methods.schema.field(column).type
        assert pa.types.is_floating(kind) or pa.types.is_integer(kind), column
    typed = pq.read_table(tmp_path / "methods.parquet").schema
    for column in ("miou_pct_mean", "miou_pct_std", "best_miou_pct", "params_m"):
        assert typed.field(column).type == pa.float64(), column
    assert typed.field("n").type == typed.field("n_not_started").type == pa.int64()
    kd = next(r for r in methods.to_pylist() if r["method"] == "KD")
    assert kd["miou_pct_mean"] == pytest.approx(100 * 0.724) and kd["n"] == 5  # unrounded
    shown = next(r for r in result.tables["methods"].rows if r[1] == "KD")
    assert shown[3] == f"{100 * 0.724:.2f} ± {kd['miou_pct_std']:.2f}"  # the Markdown keeps the formatted cell
    # knobs: typed as their distribution, unrounded; null where inactive
    top = pq.read_table(tmp_path / "search_top.parquet")
    types = {f.name: f.type for f in top.schema}
    assert types["params.optim.momentum"] == pa.float64() and types["params.model.depth"] == pa.int64()
    assert types["params.losses.kd.enabled"] == pa.bool_() and types["params.optim.lr"] == pa.float64()
    assert types["params.data.val_split"] == pa.string() and types["params.model.width"] == pa.int64()
    rows = {r["trial_id"]: r for r in top.to_pylist()}
    assert rows["k_0"]["params.run.extra"] == 0.00025 and rows["k_1"]["params.optim.momentum"] is None
    assert rows["k_0"]["params.data.crop"] == "[512, 1024]" and rows["k_0"]["params.adversarial.weight"] == "null"
    assert rows["k_1"]["params.adversarial.weight"] == "0.001" and rows["k_0"]["params.data.val_split"] == "1"
    csv_top = {r["trial_id"]: r for r in pa_csv.read_csv(tmp_path / "search_top.csv").to_pylist()}
    assert csv_top["k_0"]["params.losses.kd.weight"] == 2.5 and csv_top["k_0"]["params.losses.kd.enabled"] is True
    # a column with no value at all keeps its type
    excluded = pq.read_table(tmp_path / "excluded.parquet")
    assert excluded.schema.field("miou_last_pct").type == pa.float64()


def test_precise_knob_values_are_not_rounded_in_the_files(store):
    data = read_sweep(store.uri, "honest", "kinds", history=False)
    best = by_name(build_tables(data, "last")[0])["search_best"]
    assert best.data.column("params.run.extra").to_pylist() == [0.00025]
    assert dict(best.rows)["run.extra"] == "0.00025"


# 4. class names MLflow refuses in metric names

def test_true_class_names_from_the_classes_tag(store):
    data = read_sweep(store.uri, "honest", "kinds")
    assert data.classes == tuple(NAMES)
    assert data.class_keys["crack (large)"] == "val/iou/crack _large_"
    table = by_name(build_tables(data, "last")[0])["per_class"]
    rows = {r[0]: r[1:] for r in table.rows}
    assert [r[0] for r in table.rows] == [*NAMES, "mIoU", "Run"]
    assert rows["Run"][0] == "k_0" and rows["mIoU"][0] == "80.00"
    for i, name in enumerate(NAMES[:4]):
        assert rows[name][0] == f"{100 * (0.80 + 0.01 * i):.2f}", name
    assert rows["a(b"][0] == rows["a)b"][0] == "—"  # one key for two classes: not attributed to either
    assert any("a(b, a)b share the metric key `val/iou/a_b`" in n for n in table.notes)
    runs = data.runs.to_pylist()
    assert runs[0]["iou.person+rider"] == pytest.approx(0.82)
    # value="best": read at the best step through the same keys
    steps = {run_id: step for _, run_id, step in best_runs(data, "best")}
    iou = read_iou_at(store.uri, steps, data.class_keys)
    assert iou[store.kinds["k_0"]]["crack (large)"] == pytest.approx(0.81)
    assert "a(b" not in iou[store.kinds["k_0"]]
    best = by_name(build_tables(data, "best", iou_at_best=iou)[0])["per_class"]
    assert {r[0]: r[1] for r in best.rows}["tv/monitor"] == "83.00"


def test_runs_without_the_classes_tag_keep_the_key_names(store):
    untagged = read_sweep(store.uri, "legacy", "untagged", history=False)
    assert set(untagged.classes) == {"road", "car"}
    raw = read_sweep(store.uri, "legacy", "raw-keys", history=False)
    assert raw.classes == ("tv/monitor", "car") and raw.class_keys["tv/monitor"] == "val/iou/tv/monitor"
    assert raw.runs.column("iou.tv/monitor").to_pylist() == [pytest.approx(0.8)]


# 5. every kind of knob value, as the space produced it

@pytest.mark.parametrize("value", [None, True, False, 0, -3, 12, 1.5, 2.0, 0.0001, 1e-05, 1e20, [512, 1024],
                                   [0.5, 2.0], ["a", "b"], [], "adam", "a b", "(x)"])
def test_parse_reads_back_what_str_stored(value):
    got = parse(str(value))
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(("text", "choices", "expected"), [
    ("1", ["1", "2"], "1"),  # text that looks like a number: the string choice
    ("1.0", [1, 2], 1),  # a float field given the int choice 1
    ("[0.5, 2.0]", [[0.5, 2], [1, 1]], [0.5, 2]),
    ("None", [None, 0.001], None),
    ("0.0001", [0.0001, 0.001], 0.0001),
    ("True", [True, False], True),
    ("None", ["None", None], None),  # ambiguous under str(): the non-string one (see kdray.reporting.space)
    ("1", [1, "1"], 1),
])
def test_a_stored_choice_is_the_choice_the_space_made(text, choices, expected):
    got = resolve(text, categorical(choices))
    assert got == expected and type(got) is type(expected)


def test_a_value_outside_its_distribution_is_kept_not_made_inactive():
    assert resolve("50.0", FloatDistribution(0.1, 10.0)) == Outside(50.0)
    assert resolve("sgdw", categorical(["adam", "sgd"])) == Outside("sgdw")
    assert format_param(Outside(50.0)) == "50‡"


def test_search_tables_show_each_value_as_the_space_produced_it(store):
    data = read_sweep(store.uri, "honest", "kinds", history=False)
    tables, search = build_tables(data, "last", top_k=10)
    assert search.space_source == "the sweep's space file" and list(search.space) == KNOBS
    trials = {t.label: t for t in search.trials}
    for trial, produced in PRODUCED.items():
        assert trials[trial].params == produced
        assert {k: type(v) for k, v in trials[trial].params.items()} == {k: type(v) for k, v in produced.items()}
    assert trials["k_3"].params["losses.kd.weight"] == Outside(50.0)
    top = by_name(tables)["search_top"]
    assert top.header[4:] == KNOBS
    rows = {r[1]: r[4:] for r in top.rows}
    for trial, shown in SHOWN.items():
        assert rows[trial] == shown, trial
    assert any(n.startswith("‡ a value the space file's distribution cannot hold") for n in top.notes)
    best = dict(by_name(tables)["search_best"].rows)
    assert best["Trial"] == "k_0" and [best[k] for k in KNOBS] == SHOWN["k_0"]
    imp = by_name(tables)["importance"]  # list and None choices do not stop the importance
    assert set(imp.data.column("param").to_pylist()) == set(KNOBS)


def test_conditions_follow_the_sweep(store):
    space = build_tables(read_sweep(store.uri, "honest", "kinds", history=False), "last")[1].space
    stored = {k: str(v) for k, v in {**DEFAULTS, **KINDS["k_0"][0]}.items()}
    # `if: run.flag` on a 0/1 choice holds when it is 1 (1 == True, as sample_config compares)
    assert "run.extra" in active_params(stored, space)
    assert "run.extra" not in active_params({**stored, "run.flag": "0"}, space)
    # `if: {model.width: 2}` holds for the float 2.0 the job stored; `if: {data.val_split: "1"}` for the text "1"
    assert active_params(stored, space)["model.depth"] == 3
    assert "losses.kd.temperature" not in active_params({**stored, "data.val_split": "2"}, space)
    # a toggle stored as "True" / "False"
    assert "losses.kd.weight" not in active_params({**stored, "losses.kd.enabled": "False"}, space)


def test_knobs_inferred_without_a_space_file_take_lists_and_none(store):
    data = read_sweep(store.uri, "honest", "bare", history=False)
    knobs = infer_knobs(data.runs)
    assert knobs["data.crop"].distribution.choices == ([512, 1024], [768, 768])
    assert set(knobs["adversarial.weight"].distribution.choices) == {None, 0.001}
    split = knobs["data.val_split"].distribution  # without the space file, text "1" reads as the number 1
    assert (split.low, split.high) == (1, 2)
    rows = {r[1]: r for r in by_name(build_tables(data, "last")[0])["search_top"].rows}
    header = by_name(build_tables(data, "last")[0])["search_top"].header
    assert rows["k_0"][header.index("data.crop")] == "[512, 1024]"
    assert rows["k_0"][header.index("adversarial.weight")] == "null"


# 6. every run left out is listed, with its state

def test_every_run_left_out_is_listed_with_its_state(store):
    data = read_sweep(store.uri, "honest", "kinds")
    tables = by_name(build_tables(data, "last")[0])
    table = tables["excluded"]
    states = {r[0]: r[4] for r in table.rows}
    assert states == {"x_0": "failed", "x_1": "not started", "x_2": "not started", "x_3": "interrupted",
                      "x_4": "unfinished", "x_5": "no value", "x_6": "early-stopped"}
    reasons = {r[0]: r[5] for r in table.rows}
    assert reasons["x_0"] == "CUDA out of memory" and reasons["x_1"] == "no GPU left for the trial"
    assert reasons["x_2"] == "the trial never started (tag kdray.not_started); no reason recorded"
    assert reasons["x_3"].startswith("status KILLED, not stopped by the scheduler: interrupted; last mIoU 50.00")
    assert reasons["x_4"].startswith("status RUNNING: still running")
    assert reasons["x_5"] == "status FINISHED, but no val mIoU was ever logged"
    assert table.caption.startswith("The 7 of 12 trial runs of sweep `kinds` left out of the means: 1 early-stopped, "
                                    "1 failed, 2 not started, 1 interrupted, 1 unfinished, 1 no value.")
    assert table.data.column("state").to_pylist() == ["failed", "not_started", "not_started", "interrupted",
                                                      "unfinished", "no_value", "early_stopped"]
    # the methods table counts them on their method; the one without a method gets its own row
    methods = {r[1]: r[-1] for r in tables["methods"].rows}
    assert methods["KD"] == "1 early-stopped, 1 failed, 1 not started, 1 interrupted, 1 unfinished, 1 no value"
    assert methods["—"] == "1 not started"
    assert any(n.endswith("This sweep: 1 early-stopped, 1 failed, 2 not started, 1 interrupted, 1 unfinished, "
                          "1 no value of 12 trial runs.") for n in tables["methods"].notes)
    # the search summary says how many it left out
    assert "left out: 1 failed, 2 not started, 1 interrupted, 1 unfinished, 1 no value" in tables["search_top"].caption
    assert {r[1] for r in tables["search_top"].rows} == {*KINDS, "x_6"}  # scored: finished and early-stopped


def test_report_header_counts_every_state(store, tmp_path):
    result = write_report(store.uri, "honest", "kinds", tmp_path)  # with the plots: lists, null and ‡ values drawn
    assert {"parallel_coordinates.png", "importance.png"} <= {p.name for p in result.files}
    text = result.markdown
    assert ("12 trial runs: 5 finished, 1 early-stopped, 1 failed, 2 not started, 1 interrupted, 1 unfinished, "
            "1 no value.") in text


def test_a_stopped_run_is_its_record_up_to_the_stop_not_what_its_workers_logged_after(store):
    data = read_sweep(store.uri, "outran", "outran")
    rows = {r["trial_id"]: r for r in data.runs.to_pylist()}
    stopped, finished = rows["o_0"], rows["o_1"]
    assert stopped["state"] == "early_stopped" and stopped["stopped_at"] == "100"
    assert (stopped["miou_last"], stopped["miou_best"], stopped["last_step"], stopped["n_evals"]) == (0.3, 0.3, 100, 1)
    assert stopped["iou.road"] is None and stopped["pixel_acc_last"] is None  # step 200's, not the stop's
    history = list(zip(data.history.column("run_id").to_pylist(), data.history.column("step").to_pylist()))
    assert (store.outran, 200) not in history and (store.outran, 100) in history
    assert (finished["miou_last"], finished["last_step"], finished["iou.road"]) == (0.55, 200, 0.55)
    reasons = {r[0]: r[5] for r in by_name(build_tables(data, "last")[0])["excluded"].rows}
    assert reasons["o_0"].startswith("stopped early by the scheduler at iteration 100; last mIoU 30.00")


def test_a_matched_ablations_tables_say_each_row_trained_for_its_own_iterations(tmp_path):
    s = Store(tmp_path / "mlflow.db")
    eid = s.experiment("matched")
    match = json.dumps([{"row": "CE", "iterations": 1200}, {"row": "KD", "iterations": 600}])
    s.sweep(eid, "m", kind="ablation", **{contract.MATCH: match})
    for row in ("CE", "KD"):
        s.run(eid, trial_tags("m", f"t_{row}", row, **{contract.ROW: row}), history(0.5))
    tables = by_name(build_tables(read_sweep(s.uri, "matched", "m"), "last")[0])
    expected = "Rows trained at equal device-seconds (the space's match), each for its own iterations: CE 1200, KD 600."
    assert expected in tables["ablation"].notes and expected in tables["methods"].notes
