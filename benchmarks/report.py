"""How long `kdray.report` takes on a large sweep: fabricate one in a temporary SQLite store, then time the report.

    python benchmarks/report.py                     # a search sweep of 1,000 trials, 10 evaluations each
    python benchmarks/report.py --kind ablation     # 10 rows x 100 seeds
    python benchmarks/report.py --db /tmp/bench.db  # keep the store (reused when it exists)
    # read through a tracking server backed by that store (start servers in a loopback-only network namespace):
    python benchmarks/report.py --db /tmp/bench.db --read-uri http://127.0.0.1:5055

Each run is fabricated with one `log_batch` (val/miou and per-class IoU at every evaluation, the flattened
config as params); 5% of the trials are early-stopped and 1% failed, as ASHA and a flaky cluster would leave
them. The report is timed three ways: tables only from `search_runs` (last values, no history), the default
(last values, histories for the curves) and `--value best` (histories for every cell).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from kdray import contract
from kdray.reporting import write_report

CLASSES = ("background", "road", "disc", "box", "ring", "cross", "boat", "triangle")  # the synthetic dataset's
SPACE = """name: bench-search
space:
  losses.kd.enabled: true
  losses.kd.weight: {loguniform: [0.1, 10.0]}
  losses.kd.temperature: {uniform: [1.0, 8.0]}
  losses.i2ckd.enabled: {choice: [true, false]}
  losses.i2ckd.weight: {loguniform: [0.01, 10.0], if: losses.i2ckd.enabled}
  losses.i2ckd.margin: {uniform: [0.1, 2.0], if: losses.i2ckd.enabled}
"""
METHODS = ("CE", "KD", "SKD", "IFVD", "CWD", "ACE+CSC", "I2CKD", "KD+I2CKD", "KD+CWD", "KD+IFVD")


def fabricate(uri: str, kind: str, runs: int, evals: int, seed: int = 0) -> float:
    """One sweep of `runs` trials in experiment `bench`; returns the seconds it took."""
    rng = np.random.default_rng(seed)
    client = MlflowClient(uri)
    start = time.perf_counter()
    artifacts = Path(uri[len("sqlite:///"):]).parent / "artifacts"  # next to the store, not ./mlruns
    eid = client.create_experiment("bench", artifact_location=artifacts.as_uri())
    tags = {contract.KIND: "sweep", contract.SWEEP_ID: "bench-1", contract.SPACE: f"bench-{kind}",
            contract.SPACE_KIND: kind, contract.METRIC: contract.VAL_MIOU, contract.MODE: "max"}
    parent = client.create_run(eid, tags=tags).info.run_id
    if kind == "search":
        client.log_text(parent, SPACE, contract.SPACE_ARTIFACT)
    teacher = client.create_run(eid, tags={contract.KIND: "teacher", contract.TEACHER_ARCH: "deeplabv3_resnet101",
                                           contract.PARAMS_M: "61.1"}).info.run_id
    client.log_batch(teacher, metrics=[Metric(contract.VAL_MIOU, 0.78, 0, 100 * (i + 1)) for i in range(evals)])
    client.set_terminated(teacher)
    seeds = max(runs // len(METHODS), 1)
    for i in range(runs):
        if kind == "search":
            en = bool(rng.integers(2))
            config = {"losses.kd.weight": 10 ** rng.uniform(-1, 1), "losses.kd.temperature": rng.uniform(1, 8),
                      "losses.i2ckd.enabled": en, "losses.i2ckd.weight": 10 ** rng.uniform(-2, 1) if en else 1.0,
                      "losses.i2ckd.margin": rng.uniform(0.1, 2.0) if en else 0.5, "run.seed": 0}
            method, row, seed_ = ("KD+I2CKD" if en else "KD"), None, 0
            level = 0.70 + 0.02 * en - 0.01 * abs(np.log10(config["losses.kd.weight"]))
        else:
            method, seed_ = METHODS[i // seeds % len(METHODS)], i % seeds
            row, config = method, {"run.seed": seed_}
            level = 0.70 + 0.005 * (i // seeds % len(METHODS))
        config.update({f"optim.k{j}": j for j in range(40)})  # the rest of a flattened config
        state = "stopped" if rng.random() < 0.05 else "failed" if rng.random() < 0.01 else "finished"
        n = 3 if state == "stopped" else evals
        trial_tags = {contract.KIND: "trial", contract.SWEEP_ID: "bench-1", contract.TRIAL_ID: f"bench_{i:05d}",
                      contract.METHOD: method, contract.SEED: str(seed_), contract.TEACHER_ARCH: "deeplabv3_resnet101",
                      contract.STUDENT_ARCH: "deeplabv3_resnet18", contract.PARAMS_M: "13.6", contract.PARENT: parent}
        if row:
            trial_tags[contract.ROW] = row
        if state == "stopped":
            trial_tags[contract.STOPPED_EARLY] = "true"
        if state == "failed":
            trial_tags[contract.FAILURE] = "fabricated failure"
        run_id = client.create_run(eid, tags=trial_tags).info.run_id
        curve = level * (1 - np.exp(-np.arange(1, n + 1) / 3)) + rng.normal(0, 0.005, n)
        metrics = []
        for k, value in enumerate(curve):
            step = 100 * (k + 1)
            metrics.append(Metric(contract.VAL_MIOU, float(value), k, step))
            metrics += [Metric(contract.VAL_IOU_PREFIX + c, float(value + 0.01 * j - 0.035), k, step)
                        for j, c in enumerate(CLASSES)]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in config.items()])
        client.set_terminated(run_id, "FAILED" if state == "failed" else "FINISHED")  # stopped: FINISHED, tagged
    client.set_terminated(parent)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("search", "ablation"), default="search")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--evals", type=int, default=10, help="val/miou evaluations per run")
    parser.add_argument("--db", default=None, help="SQLite file to fabricate into, or to reuse if it exists")
    parser.add_argument("--read-uri", default=None, help="read the report through this tracking URI instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(args.db).resolve() if args.db else Path(tmp) / "mlflow.db"
        uri = f"sqlite:///{db}"
        if db.exists():
            print(f"reusing the store {db}")
        else:
            MlflowClient(uri).search_experiments()  # create the schema outside the timing
            made = fabricate(uri, args.kind, args.runs, args.evals)
            print(f"fabricated a {args.kind} sweep of {args.runs} runs x {args.evals} evaluations "
                  f"({len(CLASSES)} classes) in {made:.1f} s")
        uri = args.read_uri or uri
        runs = len(MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("bench").experiment_id],
                                                 max_results=50_000)) - 2  # less the sweep and teacher runs
        cases = [("last, tables only", "last", False), ("last + plots", "last", True), ("best + plots", "best", True)]
        print(f"| {'report':<18} | runs | read (s) | tables (s) | plots (s) | write (s) | total (s) |")
        print(f"|{'-' * 20}|-----:|---------:|-----------:|----------:|----------:|----------:|")
        for label, value, plots in cases:
            start = time.perf_counter()
            result = write_report(uri, "bench", None, Path(tmp) / label.replace(" ", "_"), value=value,
                                  formats=("md", "tex", "csv", "parquet"), plots=plots)
            total = time.perf_counter() - start
            t = result.timings
            print(f"| {label:<18} | {runs} | {t['read']:8.2f} | {t['tables']:10.2f} | {t['plots']:9.2f} "
                  f"| {t['write']:9.2f} | {total:9.2f} |")


if __name__ == "__main__":
    main()
