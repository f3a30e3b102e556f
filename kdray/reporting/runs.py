"""Read one sweep of an MLflow experiment into Arrow tables: one row per run, and the val/miou history.

Every name comes from `kdray.contract`. Only the MLflow client's public API is used, so any
tracking URI works (a SQLite file, a tracking server). `search_runs` gives each metric's last value; the best
value over a run needs the metric's history, one `get_metric_history` call per run (a local SQLite store answers
each quickly, a tracking server adds a network round trip to each; `benchmarks/report.py` measures both), so
histories are read only when asked for, and from a server by several threads.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
from mlflow import MlflowClient
from mlflow.entities import Metric, Run, ViewType
from mlflow.exceptions import MlflowException

from kdray import contract
from kdray.contract import iou_metric_key, resolve_tracking_uri
from kdray.errors import ConfigError
from kdray.store import check_store

T = TypeVar("T")

# run states, as the tables count them
FINISHED = "finished"  # status FINISHED, not stopped early, with a val/miou: the only runs averaged
EARLY_STOPPED = "early_stopped"  # stopped by the scheduler (STOPPED_EARLY=true): counted, not averaged
FAILED = "failed"  # status FAILED: excluded, listed with its reason
NOT_STARTED = "not_started"  # NOT_STARTED=true (status FAILED or KILLED): the trial never ran; excluded, listed
INTERRUPTED = "interrupted"  # KILLED without STOPPED_EARLY (Ctrl+C, a lost worker): excluded, listed
UNFINISHED = "unfinished"  # RUNNING (or SCHEDULED): still running, or ended without a status; excluded, listed
NO_VALUE = "no_value"  # FINISHED without any val/miou: excluded, listed
EXCLUDED_STATES = (EARLY_STOPPED, FAILED, NOT_STARTED, INTERRUPTED, UNFINISHED, NO_VALUE)  # report order
STATE_LABELS = {FINISHED: "finished", EARLY_STOPPED: "early-stopped", FAILED: "failed", NOT_STARTED: "not started",
                INTERRUPTED: "interrupted", UNFINISHED: "unfinished", NO_VALUE: "no value"}

_PAGE = 50_000  # the most runs MLflow returns per search page
_TAG_COLUMNS = {  # column -> tag
    "trial_id": contract.TRIAL_ID, "method": contract.METHOD, "row": contract.ROW,
    "teacher_arch": contract.TEACHER_ARCH,
    "student_arch": contract.STUDENT_ARCH, "dataset": contract.DATASET, "formula": contract.FORMULA,
    "failure": contract.FAILURE, "stage": contract.STAGE, "confirms": contract.CONFIRMS,
    "search_rank": contract.SEARCH_RANK, "search_score": contract.SEARCH_SCORE,
    "search_iteration": contract.SEARCH_ITERATION, "eval_split": contract.EVAL_SPLIT,
    "stopped_at": contract.STOPPED_AT,
}
_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
_REMOTE_THREADS = 8
IOU_COLUMN = "iou."  # + class name (the true one, from the CLASSES tag): the per-class IoU of the last evaluation
PARAM_COLUMN = "params."  # + flattened config key
# What a run cost (kdray.contract.COST_METRICS): the runs-table column of each metric, its last logged value, in the
# metric's own unit (see the contract), named after that unit.
COST_PARAMS = "cost.params"  # student/params: the student's parameters, a count (not millions)
COST_GFLOPS = "cost.gflops"  # student/gflops: one forward pass of one image, 1e9 FLOPs (a multiply-add counts 2)
COST_LATENCY_MS = "cost.latency_ms"  # student/latency_ms: batch-1 inference on the run's device, milliseconds
COST_S_PER_ITERATION = "cost.s_per_iteration"  # train/s_per_iteration: wall seconds per training iteration
COST_DEVICE_SECONDS = "cost.device_seconds"  # train/device_seconds: GPU-seconds (or CPU-seconds) the run spent
COST_PEAK_MEMORY_MIB = "cost.peak_memory_mib"  # train/peak_memory_mib: a rank's peak device memory, MiB
COST_TEACHER_SHARE = "cost.teacher_share"  # train/teacher_share: the teacher forward's share of a step (0..1)
COST_COLUMNS = {contract.STUDENT_PARAMS: COST_PARAMS, contract.STUDENT_GFLOPS: COST_GFLOPS,
                contract.STUDENT_LATENCY_MS: COST_LATENCY_MS, contract.TRAIN_S_PER_ITERATION: COST_S_PER_ITERATION,
                contract.TRAIN_DEVICE_SECONDS: COST_DEVICE_SECONDS,
                contract.TRAIN_PEAK_MEMORY_MIB: COST_PEAK_MEMORY_MIB,
                contract.TRAIN_TEACHER_SHARE: COST_TEACHER_SHARE}  # metric -> column
COST_DEVICE_COLUMN = "cost.device"  # tag kdray.cost.device: where the costs were measured (cpu, the GPU's name)


def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else the SQLite file `mlflow.db` in the working directory: the sweep's default."""
    return resolve_tracking_uri(None)


def open_client(tracking_uri: str) -> MlflowClient:
    """A client for the store, checked first (`kdray.store.check_store`: ConfigError for a store that cannot be
    read; a SQLite file that does not exist is one, as MLflow would create it empty)."""
    tracking_uri = resolve_tracking_uri(tracking_uri)  # as the sweep reads it: a bare path, a relative SQLite file
    check_store(tracking_uri, must_exist=True)
    return MlflowClient(tracking_uri)


@dataclass(frozen=True)
class SweepData:
    """One sweep as Arrow tables.

    runs:     the sweep's trial runs, one row each, ordered as the sweep generated them (natural order of
              the trial id, then start time); columns: run_id, run_name, status, state, order, trial_id, method,
              row, seed, teacher_arch, student_arch, dataset, formula, failure, params_m, teacher_params_m,
              start_time, end_time, miou_last, pixel_acc_last, miou_best, best_step, last_step, n_evals,
              `iou.<class>` (last evaluation), `params.<key>` (the flattened config, strings), stopped_at (the
              iteration the scheduler stopped the run at; see `cut_at_stop`).
              Cost columns, only when at least one run logged a cost metric or the cost-device tag (runs recorded
              before kdray logged costs give the table they always gave): cost.params (a count),
              cost.gflops (1e9 FLOPs, one image), cost.latency_ms (batch-1 inference), cost.s_per_iteration
              (wall seconds), cost.device_seconds (GPU- or CPU-seconds of the whole run),
              cost.peak_memory_mib (MiB), cost.teacher_share (0..1): each metric's last logged value, null where
              the run logged none; cost.device (the tag: cpu, or the GPU's name, with the precision).
              state: one of FINISHED, EARLY_STOPPED, FAILED, NOT_STARTED, INTERRUPTED, UNFINISHED, NO_VALUE.
    teachers: the experiment's teacher runs (KIND=teacher), same columns.
    history:  run_id, step, value of val/miou for every run in `runs` and `teachers` (None when not read;
              then miou_best, best_step, last_step and n_evals are null).
    """

    tracking_uri: str
    experiment: str
    experiment_id: str
    sweep_run_id: str
    sweep_tags: dict[str, str]
    runs: pa.Table
    teachers: pa.Table
    history: pa.Table | None
    classes: tuple[str, ...]  # the class names, in class-id order (see `class_keys`)
    space_text: str | None = None  # the space file the sweep logged (config/space.yaml), when readable
    class_keys: dict[str, str] = field(default_factory=dict)  # class name -> its per-class IoU metric key

    @property
    def smoke_test(self) -> bool:
        """The sweep ran with --smoke-test (tag SMOKE_TEST=true): a few iterations per trial, not a result."""
        return is_smoke_test(self.sweep_tags)

    @property
    def sweep_id(self) -> str:
        return self.sweep_tags.get(contract.SWEEP_ID, self.sweep_run_id)

    @property
    def space_kind(self) -> str:
        """`ablation` or `search`: the tag, else `ablation` when the trials carry row names."""
        kind = self.sweep_tags.get(contract.SPACE_KIND)
        if kind:
            return kind
        return "ablation" if any(self.runs.column("row").to_pylist()) else "search"


def find_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        known = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"no experiment {name!r} in the MLflow store; experiments there: "
                          f"{', '.join(known) or 'none'}")
    return experiment.experiment_id


def _quoted(value: str, what: str) -> str:
    if not re.fullmatch(r"[\w.:/+-]+", value):
        raise ConfigError(f"{what} {value!r} has characters outside letters, digits and . : / + - _")
    return f"'{value}'"


def search_all(client: MlflowClient, experiment_id: str, filter_string: str,
               order_by: list[str] | None = None) -> list[Run]:
    """Every active run that matches, page by page."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, ViewType.ACTIVE_ONLY, _PAGE, order_by, token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_smoke_test(tags: dict[str, str]) -> bool:
    """The sweep run's tags say it was a --smoke-test sweep."""
    return _is_true(tags.get(contract.SMOKE_TEST))


def _is_true(tag: str | None) -> bool:
    return (tag or "").strip().lower() == "true"


def _sweep_list(sweeps: list[Run]) -> str:
    known = [r.data.tags.get(contract.SWEEP_ID, r.info.run_id) for r in sweeps]
    return f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}"


def latest_sweep(sweeps: list[Run], experiment: str) -> Run:
    """The latest started sweep that is not a smoke test (`sweeps` latest first)."""
    real = [r for r in sweeps if not is_smoke_test(r.data.tags)]
    if not real:
        raise ConfigError(f"experiment {experiment!r} has only smoke-test sweeps (tag {contract.SMOKE_TEST}=true): "
                          f"pass --sweep to report one of them: {_sweep_list(sweeps)}")
    return real[0]


def find_sweep(client: MlflowClient, experiment_id: str, experiment: str, sweep_id: str | None) -> Run:
    """The sweep's parent run: the one with that sweep id (smoke tests included), or, when no id is given, the
    latest started one that is not a smoke test."""
    sweeps = search_all(client, experiment_id, f"tags.`{contract.KIND}` = 'sweep'",
                        order_by=["attributes.start_time DESC"])
    if not sweeps:
        raise ConfigError(f"experiment {experiment!r} has no sweep run (tag {contract.KIND}=sweep): "
                          "run `python -m kdray.sweep` first")
    if sweep_id is None:
        return latest_sweep(sweeps, experiment)
    for run in sweeps:
        if run.data.tags.get(contract.SWEEP_ID) == sweep_id:
            return run
    raise ConfigError(f"no sweep {sweep_id!r} in experiment {experiment!r}; sweeps there, latest first: "
                      f"{_sweep_list(sweeps)}")


def run_state(status: str, tags: dict[str, str], has_value: bool = True) -> str:
    """The run's state (see the constants above) from its MLflow status, its tags and whether it logged val/miou."""
    if _is_true(tags.get(contract.NOT_STARTED)):
        return NOT_STARTED
    if status == "FAILED":
        return FAILED
    if _is_true(tags.get(contract.STOPPED_EARLY)):
        return EARLY_STOPPED
    if status == "KILLED":
        return INTERRUPTED
    if status != "FINISHED":
        return UNFINISHED
    return FINISHED if has_value else NO_VALUE


def natural_key(text: str) -> tuple:
    """`trial_9` before `trial_10`: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", text) if part)


def _number(text: str | None, cast=float):
    try:
        return cast(text) if text not in (None, "") else None
    except ValueError:
        return None


def tagged_classes(run: Run) -> list[str] | None:
    """The true class names the run recorded in its CLASSES tag (a JSON list, class-id order); None without one
    (runs logged before the tag existed) or when it is not a list of names."""
    text = run.data.tags.get(contract.CLASSES)
    try:
        names = json.loads(text) if text is not None else None
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return names


def class_keys(runs: list[Run]) -> dict[str, str]:
    """Class name -> its per-class IoU metric key, in class-id order: the true names of the first run with a
    CLASSES tag (the key is `iou_metric_key(name)`, as MLflow refuses some characters in metric names; or
    `val/iou/<name>` where only that was logged, by sweeps before the sanitised keys), then, for `val/iou/` keys
    no tagged name explains (runs without the tag), the key's suffix as the name."""
    logged = {key: None for run in runs for key in run.data.metrics if key.startswith(contract.VAL_IOU_PREFIX)}
    names = next((n for n in map(tagged_classes, runs) if n is not None), None)
    keys = {name: _key_of(name, logged) for name in names or []}
    known = set(keys.values())
    for key in logged:
        if key not in known:
            keys.setdefault(key[len(contract.VAL_IOU_PREFIX):], key)
    return keys


def _key_of(name: str, logged: dict[str, None]) -> str:
    key, literal = iou_metric_key(name), contract.VAL_IOU_PREFIX + name
    return literal if key not in logged and literal in logged else key


def shared_keys(keys: dict[str, str]) -> dict[str, list[str]]:
    """Metric keys that several class names map to ({key: names}): whose IoU it holds cannot be told."""
    names: dict[str, list[str]] = {}
    for name, key in keys.items():
        names.setdefault(key, []).append(name)
    return {key: group for key, group in names.items() if len(group) > 1}


def attributable(keys: dict[str, str]) -> dict[str, str]:
    """`keys` without the classes whose metric key another class shares."""
    shared = shared_keys(keys)
    return {name: key for name, key in keys.items() if key not in shared}


def runs_table(runs: list[Run]) -> tuple[pa.Table, dict[str, str]]:
    """Runs as an Arrow table (columns as in `SweepData.runs`, without the history columns) and the classes,
    name -> per-class IoU metric key, in class-id order (`class_keys`). The cost columns are there only when one
    of `runs` logged a cost metric or the cost-device tag."""
    runs = sorted(runs, key=lambda r: (_number(r.data.tags.get(contract.ROW_INDEX), int) or 0,
                                       natural_key(r.data.tags.get(contract.TRIAL_ID, "")), r.info.start_time or 0,
                                       r.info.run_id))
    keys = class_keys(runs)
    readable = attributable(keys)
    param_keys: dict[str, None] = {}
    for run in runs:
        for key in run.data.params:
            param_keys.setdefault(key)
    costs = any(contract.COST_DEVICE in run.data.tags or not run.data.metrics.keys().isdisjoint(COST_COLUMNS)
                for run in runs)
    rows = []
    for order, run in enumerate(runs):
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        state = run_state(run.info.status, tags, contract.VAL_MIOU in metrics)
        row = {"run_id": run.info.run_id, "run_name": run.info.run_name, "status": run.info.status,
               "state": state, "order": order}
        row.update({column: tags.get(tag) for column, tag in _TAG_COLUMNS.items()})
        row.update({
            "seed": _number(tags.get(contract.SEED), int),
            "params_m": _number(tags.get(contract.PARAMS_M)),
            "teacher_params_m": _number(tags.get(contract.TEACHER_PARAMS_M)),
            "start_time": run.info.start_time, "end_time": run.info.end_time,
            "miou_last": metrics.get(contract.VAL_MIOU), "pixel_acc_last": metrics.get(contract.VAL_PIXEL_ACC),
        })
        if costs:
            row.update({column: metrics.get(metric) for metric, column in COST_COLUMNS.items()})
            row[COST_DEVICE_COLUMN] = tags.get(contract.COST_DEVICE)
        row.update({IOU_COLUMN + c: metrics.get(readable[c]) if c in readable else None for c in keys})
        row.update({PARAM_COLUMN + k: params.get(k) for k in param_keys})
        rows.append(row)
    schema = pa.schema(
        [(c, pa.string()) for c in ("run_id", "run_name", "status", "state")] + [("order", pa.int64())]
        + [(c, pa.string()) for c in _TAG_COLUMNS]
        + [("seed", pa.int64()), ("params_m", pa.float64()), ("teacher_params_m", pa.float64()),
           ("start_time", pa.timestamp("ms")), ("end_time", pa.timestamp("ms")),
           ("miou_last", pa.float64()), ("pixel_acc_last", pa.float64())]
        + ([(c, pa.float64()) for c in COST_COLUMNS.values()] + [(COST_DEVICE_COLUMN, pa.string())] if costs else [])
        + [(IOU_COLUMN + c, pa.float64()) for c in keys] + [(PARAM_COLUMN + k, pa.string()) for k in param_keys])
    return pa.Table.from_pylist(rows, schema=schema), keys


def eval_splits(data: SweepData) -> set[str]:
    """What the runs' val/* metrics measured (tag kdray.eval_split: `tune`, or a val split's name); empty for runs
    recorded before the tag existed."""
    if "eval_split" not in data.runs.column_names:
        return set()
    return {s for s in data.runs.column("eval_split").to_pylist() if s}


def _is_local(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("sqlite:", "file:", "/")) or "://" not in tracking_uri


def histories(client: MlflowClient, tracking_uri: str, pairs: list[tuple[str, str]]) -> list[list[Metric]]:
    """The history of each (run id, metric key), one `get_metric_history` call each (MLflow's client has no bulk
    call). Against a tracking server each call waits mostly on the network, so remote stores are read by several
    threads, which overlap those waits; a local store is read in turn (threads only contend)."""
    def one(pair: tuple[str, str]) -> list[Metric]:
        return client.get_metric_history(*pair)

    if _is_local(tracking_uri) or len(pairs) < 2:
        return [one(p) for p in pairs]
    with ThreadPoolExecutor(_REMOTE_THREADS) as pool:
        return list(pool.map(one, pairs))


def read_history(client: MlflowClient, tracking_uri: str, run_ids: list[str], key: str = contract.VAL_MIOU
                 ) -> pa.Table:
    """run_id, step, value of one metric for each run, ordered by run then step."""
    ids, steps, values = [], [], []
    for run_id, points in zip(run_ids, histories(client, tracking_uri, [(r, key) for r in run_ids])):
        points = sorted(points, key=lambda m: (m.step, m.timestamp))
        ids.extend([run_id] * len(points))
        steps.extend(m.step for m in points)
        values.extend(m.value for m in points)
    return pa.table({"run_id": pa.array(ids, pa.string()), "step": pa.array(steps, pa.int64()),
                     "value": pa.array(values, pa.float64())})


def cut_at_stop(runs: pa.Table, history: pa.Table | None) -> tuple[pa.Table, pa.Table | None]:
    """A run the scheduler stopped (column stopped_at, from the STOPPED_AT tag) is its record up to that iteration:
    evaluations its workers logged after it, before the stop reached them, are dropped from `history`, and its
    last-evaluation columns (miou_last, pixel_acc_last, `iou.<class>`), which would be theirs, become the value at
    the stop (miou_last, from the history) or null (the others; an early-stopped run is counted, never averaged).
    Without a history the run's columns are kept."""
    stops = {run_id: int(at) for run_id, at in zip(runs.column("run_id").to_pylist(),
                                                   runs.column("stopped_at").to_pylist())
             if at not in (None, "") and str(at).isdigit()}
    if not stops or history is None:
        return runs, history
    ids, steps = history.column("run_id").to_pylist(), history.column("step").to_pylist()
    keep = [run_id not in stops or step <= stops[run_id] for run_id, step in zip(ids, steps)]
    outran = {run_id for run_id, kept in zip(ids, keep) if not kept}
    if not outran:
        return runs, history
    history = history.filter(pa.array(keep))
    at_stop = {run_id: value for run_id, value in zip(*(history.column(c).to_pylist() for c in ("run_id", "value")))
               if run_id in outran}  # the history is ordered by step: the last kept value wins
    rows = runs.column("run_id").to_pylist()
    for name in runs.column_names:
        if name == "miou_last" or name == "pixel_acc_last" or name.startswith(IOU_COLUMN):
            old = runs.column(name).to_pylist()
            new = [(at_stop.get(r) if name == "miou_last" else None) if r in outran else v for r, v in zip(rows, old)]
            runs = runs.set_column(runs.column_names.index(name), name, pa.array(new, pa.float64()))
    return runs, history


def _with_history(table: pa.Table, history: pa.Table | None) -> pa.Table:
    """Add miou_best (max over evaluations), best_step (its first step), last_step and n_evals."""
    per_run: dict[str, list[tuple[int, float]]] = {}
    if history is not None:
        for run_id, step, value in zip(*(history.column(c).to_pylist() for c in ("run_id", "step", "value"))):
            per_run.setdefault(run_id, []).append((step, value))
    best, best_step, last_step, n_evals = [], [], [], []
    for run_id in table.column("run_id").to_pylist():
        points = per_run.get(run_id)
        if not points:
            best.append(None)
            best_step.append(None)
            last_step.append(None)
            n_evals.append(None if history is None else 0)
            continue
        step, value = max(points, key=lambda p: (p[1], -p[0]))  # earliest step among equal maxima
        best.append(value)
        best_step.append(step)
        last_step.append(points[-1][0])
        n_evals.append(len(points))
    for name, values, kind in (("miou_best", best, pa.float64()), ("best_step", best_step, pa.int64()),
                               ("last_step", last_step, pa.int64()), ("n_evals", n_evals, pa.int64())):
        table = table.append_column(name, pa.array(values, kind))
    return table


def read_sweep(tracking_uri: str, experiment: str, sweep_id: str | None = None, *,
               history: bool = True) -> SweepData:
    """The sweep's trial runs (and the experiment's teacher runs) as Arrow tables.

    sweep_id: the sweep's id (tag kdray.sweep_id); None reads the latest sweep of the experiment.
    history:  read every run's val/miou history (needed for `value="best"` and the curves).
    Raises ConfigError for an unknown store, experiment or sweep, or a sweep without trial runs.
    """
    client = open_client(tracking_uri)
    try:
        experiment_id = find_experiment(client, experiment)
        sweep = find_sweep(client, experiment_id, experiment, sweep_id)
        sweep_tags = dict(sweep.data.tags)
        sid = sweep_tags.get(contract.SWEEP_ID)
        if sid is None:
            raise ConfigError(f"sweep run {sweep.info.run_id} has no {contract.SWEEP_ID} tag: cannot find its trials")
        trials = search_all(client, experiment_id, f"tags.`{contract.SWEEP_ID}` = {_quoted(sid, 'sweep id')} "
                                                   f"and tags.`{contract.KIND}` = 'trial'")
        if not trials:
            raise ConfigError(f"sweep {sid!r} of experiment {experiment!r} has no trial runs yet")
        teachers = sweep_teachers(search_all(client, experiment_id, f"tags.`{contract.KIND}` = 'teacher'"), sweep_tags)
        runs, keys = runs_table(trials)
        teacher_runs, _ = runs_table(teachers)
        space_text = None
        if sweep_tags.get(contract.SPACE_KIND) != "ablation":
            space_text = read_text_artifact(client, sweep.info.run_id, contract.SPACE_ARTIFACT)
        miou = None
        if history:
            ids = runs.column("run_id").to_pylist() + teacher_runs.column("run_id").to_pylist()
            miou = read_history(client, tracking_uri, ids)
    except MlflowException as err:
        raise ConfigError(f"cannot read MLflow store {tracking_uri}: {err.message.splitlines()[0]}") from err
    runs, miou = cut_at_stop(runs, miou)
    return SweepData(tracking_uri=tracking_uri, experiment=experiment, experiment_id=experiment_id,
                     sweep_run_id=sweep.info.run_id, sweep_tags=sweep_tags, runs=_with_history(runs, miou),
                     teachers=_with_history(teacher_runs, miou), history=miou, classes=tuple(keys),
                     space_text=space_text, class_keys=keys)


def sweep_teachers(teachers: list[Run], sweep_tags: dict[str, str]) -> list[Run]:
    """The teacher run(s) of the sweep's own teacher.

    A sweep that names its teacher's weights file (tag TEACHER_CHECKPOINT on the sweep's run) gets the latest
    run of that file only, the latest FINISHED one when there is one (a `kdray.teacher --force` retraining that
    failed or was interrupted wrote no file): other teachers of the experiment (another width, a smoke test's
    4-iteration one, an earlier file at the same path) are not its teacher. An older sweep without the tag gets
    every teacher run that is not a smoke test's.
    """
    path = sweep_tags.get(contract.TEACHER_CHECKPOINT)
    if path is None:
        return [r for r in teachers if r.data.tags.get(contract.SMOKE_TEST) != "true"]
    same = [r for r in teachers if r.data.tags.get(contract.TEACHER_CHECKPOINT) == path]
    done = [r for r in same if r.info.status == "FINISHED"]
    return sorted(done or same, key=lambda r: r.info.start_time or 0)[-1:]


def read_artifact(client: MlflowClient, run_id: str, path: str, read: Callable[[Path], T],
                  errors: tuple[type[BaseException], ...] = ()) -> T | None:
    """`read(local copy)` of a run's artifact, or None when it is missing or unreadable (MlflowException, OSError,
    or one of `errors`). MLflow's per-download progress bar is kept off stderr for the call."""
    quiet = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"  # MLflow draws a progress bar on stderr for every download
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return read(Path(client.download_artifacts(run_id, path, tmp)))
    except (MlflowException, OSError, *errors):
        return None
    finally:
        if quiet is None:
            del os.environ[_PROGRESS_BAR]
        else:
            os.environ[_PROGRESS_BAR] = quiet


def read_text_artifact(client: MlflowClient, run_id: str, path: str) -> str | None:
    """A text artifact of a run, or None when it is missing or unreadable."""
    return read_artifact(client, run_id, path, Path.read_text)


def read_iou_at(tracking_uri: str, steps: dict[str, int], keys: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per-class IoU of each run at one step (the step of its best mIoU): {run_id: {class: IoU}}.

    keys: class name -> metric key (`SweepData.class_keys`); classes that share a key are not read.
    """
    readable = attributable(keys)
    triples = [(run_id, name, key) for run_id in steps for name, key in readable.items()]
    pairs = [(run_id, key) for run_id, _, key in triples]
    result: dict[str, dict[str, float]] = {run_id: {} for run_id in steps}
    for (run_id, name, _), points in zip(triples, histories(open_client(tracking_uri), tracking_uri, pairs)):
        at = [m.value for m in sorted(points, key=lambda m: m.timestamp) if m.step == steps[run_id]]
        if at:
            result[run_id][name] = at[-1]
    return result
