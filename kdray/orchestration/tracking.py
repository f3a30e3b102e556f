"""MLflow for sweeps: the store, the experiment, the sweep's parent run, and one child run per trial.

Every write goes through `MlflowClient` with explicit run ids (never the fluent "active run"), so the driver,
the trial actors and rank 0 of each trial's workers can all write to the same runs. A trial's run is looked up
by its trial id before one is created: a restored or retried trial continues its own run.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdray.orchestration import layout

T = TypeVar("T")
_MAX_PARAM = 6000  # MLflow's limit on a param value's length


def resolve_tracking_uri(uri: str | None) -> str:
    """The job's URI, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working directory.

    Absolute, because Ray moves the workers' working directory.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a bare directory path: the file store
        return str(Path(uri).resolve())
    return uri


def retrying(call: Callable[[], T], attempts: int = 6) -> T:
    """SQLite allows one writer at a time; concurrent trials occasionally meet 'database is locked'."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # mlflow wraps the driver's error; retry only the lock
            if "locked" not in str(err).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.2)
    raise AssertionError("unreachable")


class Tracker:
    """The sweep's view of one MLflow experiment."""

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        found = retrying(lambda: self.client.get_experiment_by_name(experiment))
        if found is None:
            self.experiment_id = retrying(lambda: self.client.create_experiment(experiment))
        else:
            if found.lifecycle_stage == "deleted":
                retrying(lambda: self.client.restore_experiment(found.experiment_id))
            self.experiment_id = found.experiment_id
        self.experiment = experiment

    def find_run(self, **tags: str) -> str | None:
        """The id of the newest run carrying all these tags, if any."""
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = retrying(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1,
                                                        order_by=["attributes.start_time DESC"]))
        return runs[0].info.run_id if runs else None

    def start_run(self, name: str, tags: dict[str, str]) -> str:
        run = retrying(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags))
        return run.info.run_id

    def trial_run(self, sweep_id: str, trial_id: str, parent_run_id: str, name: str, tags: dict[str, str],
                  params: dict[str, Any]) -> str:
        """The trial's run: found by (sweep, trial) id, else created as a child of the sweep's run."""
        run_id = self.find_run(**{layout.SWEEP_ID: sweep_id, layout.TRIAL_ID: trial_id})
        if run_id is not None:
            retrying(lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        all_tags = {layout.PARENT: parent_run_id, layout.KIND: "trial", layout.SWEEP_ID: sweep_id,
                    layout.TRIAL_ID: trial_id, **tags}
        run_id = self.start_run(name, all_tags)
        self.log_params(run_id, params)
        return run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            retrying(lambda chunk=items[i:i + 100]: self.client.log_batch(run_id, params=chunk))

    def run_logger(self, run_id: str) -> RunLogger:
        return RunLogger(self.uri, run_id)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.run_logger(run_id).set_tags(tags)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        retrying(lambda: self.client.log_text(run_id, text, artifact_file))

    def end_run(self, run_id: str, status: str) -> None:
        retrying(lambda: self.client.set_terminated(run_id, status=status))

    def status(self, run_id: str) -> str:
        return retrying(lambda: self.client.get_run(run_id)).info.status

    def tags(self, run_id: str) -> dict[str, str]:
        return retrying(lambda: self.client.get_run(run_id)).data.tags


class RunLogger:
    """Writes to one known run (rank 0 of a trial's workers): no experiment lookup, nothing to set up."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # NaN: class never seen
        if items:
            retrying(lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        retrying(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def set_tags(self, tags: dict[str, str]) -> None:
        retrying(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))
