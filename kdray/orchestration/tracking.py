"""MLflow for sweeps: the store, the experiment, the sweep's parent run, and one child run per trial.

Every write goes through `MlflowClient` with explicit run ids (never the fluent "active run"), so the driver,
the trial actors and rank 0 of each trial's workers can all write to the same runs. A trial's run is looked up
by its trial id before one is created: a restored or retried trial continues its own run.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdray import contract
from kdray.contract import resolve_tracking_uri

__all__ = ["RunLogger", "Tracker", "resolve_tracking_uri", "retrying"]  # the store's URI: kdray.contract

T = TypeVar("T")
_MAX_PARAM = 6000  # MLflow's limit on a param value's length
_FILTER_SAFE = re.compile(r"[\w.:/+@ -]*")  # tag values that stand in a search filter's quotes as they are
EXPERIMENT_NOTE = ("Model-training runs of kdray (knowledge distillation for semantic segmentation): each sweep is a "
                   "parent run with its trials nested under it; teacher runs and single `kdray train` runs stand "
                   "beside them. Choose **Model training** in the sidebar's switch (or **Training runs**) to see "
                   "them: the GenAI overview shows traces, which kdray does not log.")


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
    """The sweep's view of one MLflow experiment (created when missing, restored when deleted), tagged
    `mlflow.experimentKind = custom_model_development` unless it has a kind already: a model-training experiment,
    for the MLflow UIs that choose an experiment's view by that tag. MLflow 3.17's UI does not: it opens every
    experiment in the view of its sidebar's GenAI / Model training switch, GenAI until the browser's user picks
    the other (see `kdray.orchestration.record`); the experiment's description, which that GenAI overview shows
    on top, says so (EXPERIMENT_NOTE, unless the experiment has a description already)."""

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
        tags = found.tags if found is not None else {}
        # a kind or description someone chose since is kept
        for key, value in ((contract.EXPERIMENT_KIND, contract.EXPERIMENT_KIND_TRAINING),
                           (contract.NOTE, EXPERIMENT_NOTE)):
            if key not in tags:
                retrying(lambda key=key, value=value: self.client.set_experiment_tag(self.experiment_id, key, value))

    def find_run(self, **tags: str) -> str | None:
        """The id of the newest run carrying all these tags, if any.

        Only values made of filter-safe characters go into MLflow's search filter; any other value (a path with
        an apostrophe or a quote, which the filter grammar cannot escape) is compared here, on the runs the
        safe part of the filter returns.
        """
        safe = {k: v for k, v in tags.items() if _FILTER_SAFE.fullmatch(str(v))}
        rest = {k: str(v) for k, v in tags.items() if k not in safe}
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in safe.items())
        token = None
        while True:
            page = retrying(lambda page_token=token: self.client.search_runs(
                [self.experiment_id], filter_string=query, max_results=1 if not rest else 1000,
                order_by=["attributes.start_time DESC"], page_token=page_token))
            for run in page:
                if all(run.data.tags.get(k) == v for k, v in rest.items()):
                    return run.info.run_id
            token = page.token
            if not rest or not token:
                return None

    def start_run(self, name: str, tags: dict[str, str]) -> str:
        run = retrying(lambda: self.client.create_run(self.experiment_id, run_name=name, tags=tags))
        return run.info.run_id

    def trial_run(self, sweep_id: str, trial_id: str, parent_run_id: str, name: str, tags: dict[str, str],
                  params: dict[str, Any]) -> str:
        """The trial's run: found by (sweep, trial) id, else created as a child of the sweep's run."""
        run_id = self.find_run(**{contract.SWEEP_ID: sweep_id, contract.TRIAL_ID: trial_id})
        if run_id is not None:
            retrying(lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        all_tags = {contract.PARENT: parent_run_id, contract.KIND: "trial", contract.SWEEP_ID: sweep_id,
                    contract.TRIAL_ID: trial_id, **tags}
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

    def clear_tag(self, run_id: str, key: str) -> None:
        """Remove `key` from the run's tags if it is there (a stale failure reason, say)."""
        if key in self.tags(run_id):
            retrying(lambda: self.client.delete_tag(run_id, key))

    def last_step(self, run_id: str, metric: str) -> int:
        """The largest step (iteration) at which the run logged `metric`; 0 when it never did."""
        return max((m.step for m in retrying(lambda: self.client.get_metric_history(run_id, metric))), default=0)

    def running_runs(self, sweep_id: str) -> list[str]:
        """The ids of the sweep's trial runs whose status is still RUNNING."""
        query = (f"tags.`{contract.SWEEP_ID}` = '{sweep_id}' and tags.`{contract.KIND}` = 'trial' "
                 "and attributes.status = 'RUNNING'")
        runs = retrying(lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000))
        return [run.info.run_id for run in runs]


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

    def log_image(self, image: Any, key: str, step: int) -> None:
        """An image of the run at `step` (the iteration), shown by MLflow's UI under `key` with a step slider.

        `image`: uint8 (H, W, 3) RGB (or what `MlflowClient.log_image` takes). MLflow 3 stores it as the artifacts
        `images/<key>+step+<step>+timestamp+<ms>+<uuid>.png` and a compressed `...+compressed.webp` (a '/' in the
        key becomes '~'; the key may hold letters, digits, '_', '-', '.', ' ' and '/') and tags the run
        `mlflow.loggedImages`. Logged synchronously, so it is in the store when this returns."""
        retrying(lambda: self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True))

    def set_tags(self, tags: dict[str, str]) -> None:
        retrying(lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))
