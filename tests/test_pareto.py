"""Cost metrics in the report: the `cost.*` columns of the runs table, the cost columns of the methods table and of
the search summary (means over the averaged runs, devices in the notes, never averaged across devices), the
`pareto` table and figure, and the non-dominance function against a naive reference. No Ray.

The store (one SQLite file for the module) holds a teacher run, an ablation sweep whose runs logged costs (rows on
one device, a row without costs, a row whose two seeds ran on two devices, a row of another student, a row with
costs from only some of its runs, a failed run with absurd costs that must not count), a confirmed search sweep
with costs, and a sweep recorded before costs were logged.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from matplotlib.image import imread
from test_report import Store, by_name, config, history, trial_tags

from kdray import contract
from kdray.reporting import build_tables, read_sweep, render, write_report
from kdray.reporting.costs import significant
from kdray.reporting.pareto import non_dominated
from kdray.reporting.runs import COST_COLUMNS

EXPERIMENT = "costs"
CPU, GPU = "cpu fp32", "NVIDIA H200 bf16"
SMALL = "deeplabv3_resnet18@0.5x"
TEACHER = "deeplabv3_resnet101"
PAIR = f"{TEACHER} → deeplabv3_resnet18"


def cost(gflops, latency, s_it, device_s, peak, params=13.6e6, share=0.3, device=CPU):
    """The cost metrics of one run (None: not logged) and its device (None: no tag)."""
    metrics = {contract.STUDENT_PARAMS: params, contract.STUDENT_GFLOPS: gflops,
               contract.STUDENT_LATENCY_MS: latency, contract.TRAIN_S_PER_ITERATION: s_it,
               contract.TRAIN_DEVICE_SECONDS: device_s, contract.TRAIN_PEAK_MEMORY_MIB: peak,
               contract.TRAIN_TEACHER_SHARE: share}
    return {k: v for k, v in metrics.items() if v is not None}, device


# ablation: row -> (method, student arch, per seed: (last val mIoU, costs or None))
ROWS = {
    "Student (CE)": ("CE", None, {0: (0.70, cost(20.0, 40.0, 0.5, 100.0, 1000.0)),
                                  1: (0.72, cost(20.0, 42.0, 0.7, 140.0, 1100.0))}),
    "+KD": ("KD", None, {0: (0.74, cost(20.0, 44.0, 0.8, 160.0, 1500.0)),
                         1: (0.76, cost(20.0, 46.0, 1.0, 200.0, 1700.0)),
                         2: (0.75, None)}),  # costs from 2 of its 3 runs
    "+KD small": ("KD", SMALL, {0: (0.60, cost(5.0, 10.0, 0.2, 40.0, 400.0, params=3.4e6)),
                                1: (0.62, cost(5.0, 12.0, 0.2, 40.0, 400.0, params=3.4e6))}),
    "+I2CKD": ("I2CKD", None, {0: (0.73, None), 1: (0.73, None)}),  # no costs at all
    "+KD+I2CKD": ("KD+I2CKD", None, {0: (0.77, cost(20.0, 50.0, 1.2, 240.0, 2000.0)),
                                     1: (0.79, cost(20.0, 5.0, 0.1, 20.0, 3000.0, device=GPU))}),
}
ABSURD = cost(999.0, 9999.0, 99.0, 9999.0, 99999.0)  # the failed CE run's: never in a mean

# confirmed search: row -> (method, search trial, rank, per seed: (val mIoU, costs))
CONFIRMED = {
    "Student (CE)": ("CE", None, None, {0: (0.70, cost(20.0, 40.0, 0.5, 100.0, 1000.0)),
                                        1: (0.71, cost(20.0, 42.0, 0.5, 100.0, 1000.0))}),
    "Search #1": ("KD+I2CKD", "t_0", 1, {0: (0.76, cost(20.0, 44.0, 0.9, 180.0, 1800.0)),
                                         1: (0.77, cost(20.0, 46.0, 0.9, 180.0, 1800.0))}),
    "Search #2": ("KD", "t_1", 2, {0: (0.73, cost(20.0, 45.0, 0.8, 160.0, 1500.0)),
                                   1: (0.75, cost(20.0, 4.0, 0.1, 20.0, 2500.0, device=GPU))}),
}
SEARCHED = {"t_0": ("KD+I2CKD", 0.74), "t_1": ("KD", 0.72)}
SPACE_YAML = """name: cost-search
num_samples: 2
space:
  losses.kd.enabled: true
  losses.kd.weight: {loguniform: [0.1, 10.0]}
confirm: {top_k: 2, seeds: [0, 1]}
"""


def log_costs(s: Store, run_id: str, costs) -> None:
    if costs is None:
        return
    metrics, device = costs
    for key, value in metrics.items():
        s.client.log_metric(run_id, key, value, step=0)
    if device is not None:
        s.client.set_tag(run_id, contract.COST_DEVICE, device)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    eid = s.client.create_experiment(EXPERIMENT, artifact_location=s.artifacts)
    s.run(eid, {contract.KIND: "teacher", contract.TEACHER_ARCH: TEACHER, contract.PARAMS_M: "61.1000"},
          history(0.80, 0.80), name="teacher")
    # a sweep recorded before kdray logged costs
    s.plain = s.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: "plain-1", contract.SPACE: "plain",
                          contract.SPACE_KIND: "ablation"})
    for r, (row, method) in enumerate((("Student (CE)", "CE"), ("+KD", "KD"))):
        for seed in (0, 1):
            s.run(eid, trial_tags("plain-1", f"p_{2 * r + seed}", method, seed, **{contract.ROW: row}),
                  history(0.70 + r / 20 + seed / 100, 0.70 + r / 20 + seed / 100), params=config(seed))
    # the ablation with costs
    s.abl = s.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: "abl-c", contract.SPACE: "cost-ablation",
                        contract.SPACE_KIND: "ablation"})
    number = 0
    for row, (method, student, seeds) in ROWS.items():
        extra = {contract.ROW: row}
        if student:
            extra.update({contract.STUDENT_ARCH: student, contract.PARAMS_M: "3.4000"})
        for seed, (value, costs) in seeds.items():
            run_id = s.run(eid, trial_tags("abl-c", f"a_{number}", method, seed, **extra), history(value, value),
                           params=config(seed))
            log_costs(s, run_id, costs)
            number += 1
    failed = s.run(eid, trial_tags("abl-c", f"a_{number}", "CE", 9, **{contract.ROW: "Student (CE)",
                                                                      contract.FAILURE: "CUDA out of memory"}),
                   [0.5], params=config(9), status="FAILED")
    log_costs(s, failed, ABSURD)
    # a confirmed search with costs
    s.srch = s.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: "srch-c", contract.SPACE: "cost-search",
                         contract.SPACE_KIND: "search"})
    s.client.log_text(s.srch, SPACE_YAML, contract.SPACE_ARTIFACT)
    for trial, (method, value) in SEARCHED.items():
        s.run(eid, trial_tags("srch-c", trial, method, 0, **{contract.STAGE: contract.STAGE_SEARCH}),
              history(value, value), params=config(0, kd=True))
    number = 0
    for index, (row, (method, trial, rank, seeds)) in enumerate(CONFIRMED.items()):
        tags = {contract.STAGE: contract.STAGE_CONFIRM, contract.ROW: row, contract.ROW_INDEX: str(index)}
        if trial:
            tags.update({contract.CONFIRMS: trial, contract.SEARCH_RANK: str(rank),
                         contract.SEARCH_SCORE: repr(SEARCHED[trial][1]), contract.SEARCH_ITERATION: "300"})
        for seed, (value, costs) in seeds.items():
            run_id = s.run(eid, trial_tags("srch-c", f"c_{number}", method, seed, **tags), history(value, value),
                           params=config(seed, kd=trial is not None))
            log_costs(s, run_id, costs)
            number += 1
    return s


@pytest.fixture(scope="module")
def ablation(store):
    return by_name(build_tables(read_sweep(store.uri, EXPERIMENT, "abl-c"), "last")[0])


@pytest.fixture(scope="module")
def search(store):
    return by_name(build_tables(read_sweep(store.uri, EXPERIMENT, "srch-c"), "last")[0])


def mean_of(row, index, seeds=None):
    """The mean of one cost (`cost()`'s metric order) over a row's seeds that logged costs."""
    keys = list(cost(0, 0, 0, 0, 0)[0])
    values = [c[0][keys[index]] for s, (_, c) in row.items() if c is not None and (seeds is None or s in seeds)]
    return float(np.mean(values))


# non-dominance


def naive_front(points):
    """O(n²): a point is on the front when no other point is at most as costly, at least as good, and strictly
    better in one of the two."""
    return [not any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in points)
            for p in points]


def test_non_dominated_matches_the_naive_reference_on_random_points_with_ties():
    rng = random.Random(7)
    for trial in range(400):
        n = rng.randint(0, 25)
        span = rng.choice([2, 4, 10])  # small grids: many equal costs, equal values and duplicate points
        points = [(float(rng.randint(0, span)), float(rng.randint(0, span))) for _ in range(n)]
        if trial % 3 == 0:
            points += rng.sample(points, min(len(points), 3))  # exact duplicates
            rng.shuffle(points)
        assert non_dominated(points) == naive_front(points), points
    for _ in range(100):  # continuous values: ties only by construction
        points = [(rng.random(), rng.random()) for _ in range(rng.randint(1, 40))]
        assert non_dominated(points) == naive_front(points)


def test_non_dominated_edge_cases():
    assert non_dominated([]) == []
    assert non_dominated([(1.0, 0.5)]) == [True]
    assert non_dominated([(1.0, 0.5), (1.0, 0.5)]) == [True, True]  # duplicates do not dominate each other
    assert non_dominated([(1.0, 0.5), (1.0, 0.6)]) == [False, True]  # same cost, better value
    assert non_dominated([(1.0, 0.5), (2.0, 0.5)]) == [True, False]  # same value, lower cost
    assert non_dominated([(3.0, 0.9), (1.0, 0.5), (2.0, 0.7), (2.5, 0.6)]) == [True, True, True, False]
    with pytest.raises(ValueError, match="not finite"):
        non_dominated([(1.0, float("nan"))])


def test_significant_digits_without_exponent():
    assert [significant(v) for v in (0.01234, 1.234, 41.0, 123.4, 12345.6, 0.0, None)] == [
        "0.0123", "1.23", "41.0", "123", "12346", "0", "—"]


# the runs table


def test_every_cost_metric_of_the_contract_has_a_column():
    assert list(COST_COLUMNS) == list(contract.COST_METRICS)
    assert len(set(COST_COLUMNS.values())) == len(COST_COLUMNS)


def test_cost_metrics_become_columns_of_the_runs_table(store):
    data = read_sweep(store.uri, EXPERIMENT, "abl-c")
    names = ["cost.params", "cost.gflops", "cost.latency_ms", "cost.s_per_iteration", "cost.device_seconds",
             "cost.peak_memory_mib", "cost.teacher_share", "cost.device"]
    assert all(c in data.runs.column_names for c in names)
    runs = {r["trial_id"]: r for r in data.runs.to_pylist()}
    assert runs["a_0"]["cost.gflops"] == 20.0 and runs["a_0"]["cost.latency_ms"] == 40.0
    assert runs["a_0"]["cost.params"] == 13.6e6 and runs["a_0"]["cost.peak_memory_mib"] == 1000.0
    assert runs["a_0"]["cost.teacher_share"] == pytest.approx(0.3) and runs["a_0"]["cost.device"] == CPU
    assert runs["a_10"]["cost.device"] == GPU  # +KD+I2CKD, seed 1
    assert runs["a_4"]["cost.gflops"] is None and runs["a_4"]["cost.device"] is None  # +KD seed 2: no costs
    # runs recorded before costs were logged: no cost column at all
    plain = read_sweep(store.uri, EXPERIMENT, "plain-1")
    assert not any(c.startswith("cost.") for c in plain.runs.column_names)


# the methods table


def test_methods_table_cost_columns_and_means(ablation):
    table = ablation["methods"]
    assert table.header == ["Teacher → Student", "Method", "Params (M)", "mIoU (%)", "n", "GFLOPs", "Latency (ms)",
                            "s / iteration", "Device-s / run", "Peak memory (MiB)", "Best run", "Excluded"]
    assert table.align == "llrrrrrrrrll"
    shown = {(r[0], r[1]): dict(zip(table.header, r)) for r in table.rows}
    ce = shown[(PAIR, "CE")]
    rows = ROWS["Student (CE)"][2]
    assert ce["GFLOPs"] == "20.0" and ce["Latency (ms)"] == significant(mean_of(rows, 2)) == "41.0"
    assert ce["s / iteration"] == "0.600" and ce["Device-s / run"] == "120" and ce["Peak memory (MiB)"] == "1050"
    assert ce["n"] == "2" and ce["Excluded"] == "1 failed"  # the failed run's absurd costs are not in the mean
    kd = shown[(PAIR, "KD")]
    assert kd["n"] == "3" and kd["Latency (ms)"] == "45.0" and kd["Peak memory (MiB)"] == "1600"
    small = shown[(f"{TEACHER} → {SMALL}", "KD")]
    assert small["GFLOPs"] == "5.00" and small["Latency (ms)"] == "11.0" and small["Params (M)"] == "3.4"
    # two devices in one row: the device-dependent costs are not averaged; GFLOPs are
    both = shown[(PAIR, "KD+I2CKD")]
    assert both["GFLOPs"] == "20.0"
    assert [both[h] for h in ("Latency (ms)", "s / iteration", "Device-s / run", "Peak memory (MiB)")] == ["—"] * 4
    # no costs: dashes; the teacher logged none either
    assert [shown[(PAIR, "I2CKD")][h] for h in ("GFLOPs", "Latency (ms)")] == ["—", "—"]
    assert shown[(PAIR, "Teacher")]["GFLOPs"] == "—"
    records = {(r["student_arch"], r["method"]): r for r in table.data.to_pylist()}
    ce_rec = records[("deeplabv3_resnet18", "CE")]
    assert ce_rec["latency_ms_mean"] == pytest.approx(41.0) and ce_rec["params_mean"] == pytest.approx(13.6e6)
    assert ce_rec["cost_n"] == 2 and ce_rec["cost_device"] == CPU
    assert ce_rec["teacher_share_mean"] == pytest.approx(0.3)  # in the files, not a column of the cells
    mixed = records[("deeplabv3_resnet18", "KD+I2CKD")]
    assert mixed["latency_ms_mean"] is None and mixed["gflops_mean"] == 20.0
    assert mixed["cost_device"] == f"{CPU}; {GPU}"
    assert records[("deeplabv3_resnet18", "I2CKD")]["cost_n"] == 0
    assert records[("deeplabv3_resnet18", "I2CKD")]["cost_device"] is None


def test_methods_table_notes_name_the_devices(ablation):
    table = ablation["methods"]
    notes = " ".join(table.notes)
    assert f"Costs measured on 2 devices (`{CPU}`: CE [" in notes and f"`{GPU}`: KD+I2CKD [{PAIR}]" in notes
    assert (f"KD+I2CKD [{PAIR}]: its runs' costs were measured on several devices, `{CPU}` (1 run), `{GPU}` "
            "(1 run): its Latency (ms), s / iteration, Device-s / run, Peak memory (MiB) are not averaged across "
            "devices (—).") in table.notes
    assert f"KD [{PAIR}]: costs from 2 of its 3 averaged runs (the others logged none)." in table.notes
    assert (f"No costs logged by the runs of: Teacher [{PAIR}], I2CKD [{PAIR}], Teacher [{TEACHER} → {SMALL}] "
            "(—).") in table.notes
    assert "1e9 FLOPs" in table.caption and "batch 1" in table.caption and "MiB" in table.caption
    assert table.notes[-1].startswith("Early-stopped runs are counted")  # the exclusion note stays last


def test_a_sweep_without_costs_keeps_its_methods_table(store):
    tables = by_name(build_tables(read_sweep(store.uri, EXPERIMENT, "plain-1"), "last")[0])
    table = tables["methods"]
    assert "pareto" not in tables
    assert table.header == ["Teacher → Student", "Method", "Params (M)", "mIoU (%)", "n", "Best run", "Excluded"]
    text = render.markdown(table)
    assert "GFLOPs" not in text and "Costs" not in text and "device" not in text
    assert not any(k.endswith("_mean") and k != "miou_pct_mean" for k in table.data.column_names)


# the search summary


def test_search_summary_cost_columns(search):
    table = search["search_summary"]
    assert table.header == ["Rank", "Row", "Method", "Search score (%, val)", "Confirmed mIoU (%)", "n",
                            "Params (M)", "GFLOPs", "Latency (ms)", "s / iteration", "Device-s / run",
                            "Peak memory (MiB)", "vs CE-only (pp)", "p (Welch)", "Search trial", "Excluded"]
    assert len(table.align) == len(table.header)
    assert [r[1] for r in table.rows] == ["Search #1", "Search #2", "Student (CE)"]  # by confirmed mean
    shown = {r[1]: dict(zip(table.header, r)) for r in table.rows}
    assert shown["Search #1"]["Latency (ms)"] == "45.0" and shown["Search #1"]["Params (M)"] == "13.6"
    assert shown["Search #1"]["Device-s / run"] == "180" and shown["Student (CE)"]["s / iteration"] == "0.500"
    assert shown["Search #2"]["GFLOPs"] == "20.0" and shown["Search #2"]["Latency (ms)"] == "—"
    assert table.notes[0].startswith("Winner: Search #1")  # the verdict stays first
    assert any(n.startswith("Search #2: its runs' costs were measured on several devices") for n in table.notes)
    assert any(n.startswith("Costs measured on 2 devices") for n in table.notes)
    records = {r["row"]: r for r in table.data.to_pylist()}
    assert records["Search #1"]["latency_ms_mean"] == pytest.approx(45.0)
    assert records["Search #2"]["latency_ms_mean"] is None


# the Pareto table and figure


def test_pareto_table_of_the_ablation(ablation):
    table = ablation["pareto"]
    assert list(ablation).index("pareto") == list(ablation).index("methods") + 1
    assert table.header == ["Teacher → Student", "Method", "mIoU (%)", "n", "GFLOPs", "Front (GFLOPs)",
                            "Latency (ms)", "Front (latency)"]
    shown = {(r[0], r[1]): dict(zip(table.header, r)) for r in table.rows}
    small, ce, kd, both = ((f"{TEACHER} → {SMALL}", "KD"), (PAIR, "CE"), (PAIR, "KD"), (PAIR, "KD+I2CKD"))
    assert list(shown) == [small, ce, kd, both]  # by GFLOPs, then latency; I2CKD has no costs: left out
    # GFLOPs: the small student (5) and the best of the 20-GFLOPs rows (KD+I2CKD) are the front
    assert [shown[k]["Front (GFLOPs)"] for k in (small, ce, kd, both)] == ["yes", "no", "no", "yes"]
    # latency on the CPU: 11 ms 61 %, 41 ms 71 %, 45 ms 75 %: each buys mIoU; KD+I2CKD ran on two devices
    assert [shown[k]["Front (latency)"] for k in (small, ce, kd, both)] == ["yes", "yes", "yes", "—"]
    assert shown[both]["Latency (ms)"] == "—" and shown[small]["Latency (ms)"] == "11.0"
    mean, std = np.mean([0.77, 0.79]), np.std([0.77, 0.79], ddof=1)
    assert shown[both]["mIoU (%)"] == f"{100 * mean:.2f} ± {100 * std:.2f}"
    assert f"Latency measured on `{CPU}`." in table.notes
    assert ("Left out of the GFLOPs front: I2CKD [deeplabv3_resnet101 → deeplabv3_resnet18] (no GFLOPs logged)."
            in table.notes)
    latency = next(n for n in table.notes if n.startswith("Left out of the latency front"))
    assert "I2CKD [" in latency and f"KD+I2CKD [{PAIR}] (its runs measured latency on several devices " \
        f"(`{CPU}`, `{GPU}`))" in latency
    records = {(r["student_arch"], r["method"]): r for r in table.data.to_pylist()}
    assert records[("deeplabv3_resnet18", "KD+I2CKD")]["latency_front"] is None
    assert records[("deeplabv3_resnet18", "KD+I2CKD")]["gflops_front"] is True
    assert records[(SMALL, "KD")]["latency_device"] == CPU and records[(SMALL, "KD")]["gflops"] == 5.0


def test_pareto_table_of_a_confirmed_search(search):
    table = search["pareto"]
    assert list(search)[:3] == ["search_summary", "methods", "pareto"]
    shown = {r[1]: dict(zip(table.header, r)) for r in table.rows}
    assert set(shown) == {"CE", "KD", "KD+I2CKD"}  # the confirmation rows, as the methods table groups them
    assert [shown[m]["Front (GFLOPs)"] for m in ("CE", "KD", "KD+I2CKD")] == ["no", "no", "yes"]
    assert [shown[m]["Front (latency)"] for m in ("CE", "KD", "KD+I2CKD")] == ["yes", "—", "yes"]
    assert shown["KD"]["n"] == "2" and shown["KD+I2CKD"]["mIoU (%)"].startswith("76.50")


def test_write_report_writes_and_logs_the_pareto_table_and_figure(store, tmp_path):
    result = write_report(store.uri, EXPERIMENT, "abl-c", tmp_path, formats=("md", "tex", "csv"),
                          log_artifacts=True)
    names = {p.name for p in result.files}
    assert {"pareto.png", "pareto.tex", "pareto.csv", "methods.tex"} <= names
    image = imread(tmp_path / "pareto.png")
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side
    assert "### Pareto front" in result.markdown and "![pareto](pareto.png)" in result.markdown
    assert r"Front (GFLOPs)" in (tmp_path / "pareto.tex").read_text()
    logged = {f.path for f in store.client.list_artifacts(store.abl, contract.REPORT_ARTIFACT_DIR)}
    assert {"report/pareto.png", "report/pareto.tex", "report/report.md"} <= logged


def test_a_sweep_without_costs_has_no_pareto_files(store, tmp_path):
    result = write_report(store.uri, EXPERIMENT, "plain-1", tmp_path, formats=("md", "csv"))
    names = {p.name for p in result.files}
    assert "pareto.png" not in names and "pareto.csv" not in names and "pareto" not in result.tables
    assert "GFLOPs" not in result.markdown and "Pareto" not in result.markdown
