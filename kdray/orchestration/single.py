"""`python -m kdray.train` and `python -m kdray.teacher` as MLflow runs: the engine on this process, recorded as a
sweep's trial is (`kdray.orchestration.record`), in the store a sweep would use.

    run   kind=train (a student) or kind=teacher, in the job's experiment (tracking.experiment, else its name)
          tags: a trial's (method, seed, models, dataset, classes, formula, what val/* measures) or a teacher's
          (its TEACHER_CHECKPOINT: a later sweep's report takes it as its teacher row), OUTPUT_DIR, description
          params: the active job config; inputs: the training and evaluation data; artifact config/job.yaml
          metrics: each `log_interval` window's training terms and each evaluation's scores (step = iteration),
          and `checkpoints/best_<role>.pt` whenever an evaluation is the best so far

The run ends FINISHED when training completes, FAILED (reason in FAILURE) when it raises, KILLED on Ctrl+C (or
SIGTERM, which the commands turn into Ctrl+C); it is never left RUNNING. `--resume DIR` of `kdray.train`
continues the run of that output folder (found by its OUTPUT_DIR tag), reopened RUNNING. The engine knows nothing of
MLflow: it gets `report` and `log` callables.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kdray import contract
from kdray.config import Job, to_yaml
from kdray.config.schema import TuneSplitConfig
from kdray.contract import Evaluation, resolve_tracking_uri
from kdray.losses.objective import config_formula, method_label
from kdray.orchestration.outcome import reason
from kdray.orchestration.record import (
    active_params,
    log_datasets,
    run_note,
    run_tags,
    teacher_tags,
    ui_url,
)
from kdray.orchestration.tracking import Tracker


class SingleRun:
    """One tracked run of the engine: `start` opens (or, resuming, reopens) its MLflow run, `report` and `log` are
    the engine's callables, `end` closes it. `role` is "student" (kind train) or "teacher"."""

    def __init__(self, job: Job, role: str, output_dir: Path, tracking_uri: str | None = None,
                 command: str = "python -m kdray.train"):
        self.job, self.role, self.output_dir, self.command = job, role, Path(output_dir).resolve(), command
        self.uri = resolve_tracking_uri(tracking_uri or job.tracking.uri)
        self.tracker: Tracker | None = None
        self.run_id: str | None = None
        self._logger = None

    def start(self, resumed: bool = False) -> str:
        """Open the run (checking a tracking server answers first) and return its id. With `resumed`, the run of
        the same output folder is reopened when there is one."""
        from kdray.orchestration.plan import check_store

        check_store(self.uri)
        job, role = self.job, self.role
        self.tracker = tracker = Tracker(self.uri, job.tracking.experiment or job.name)
        kind = "teacher" if role == "teacher" else "train"
        found = None
        if resumed:
            found = tracker.find_run(**{contract.KIND: kind, contract.OUTPUT_DIR: str(self.output_dir)})
        if found is not None:
            tracker.client.update_run(found, status="RUNNING")
            tracker.clear_tag(found, contract.FAILURE)
            self.run_id = found
        else:
            self.run_id = tracker.start_run(self._name(), self._tags())
            tracker.log_params(self.run_id, active_params(job, role=role))
            tracker.log_text(self.run_id, to_yaml(job), contract.JOB_ARTIFACT)
            data = job.data if role == "student" else replace(job.data, tune_split=TuneSplitConfig())
            log_datasets(tracker, self.run_id, data)
        self._logger = tracker.run_logger(self.run_id)
        return self.run_id

    def _name(self) -> str:
        if self.role == "teacher":
            return f"teacher-{self.job.teacher.arch}"
        return f"{method_label(self.job.losses)}-s{self.job.run.seed}-{self.output_dir.name}"

    def _tags(self) -> dict[str, str]:
        job = self.job
        where = f"A single run of `{self.command}`; outputs in `{self.output_dir}`"
        if self.role == "teacher":
            from kdray.models import build_model

            model = build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width)
            tags = teacher_tags(job, sum(p.numel() for p in model.parameters()) / 1e6)
            where += f", weights saved to `{job.teacher.checkpoint}`"
        else:
            tags = {contract.KIND: "train", **run_tags(job), contract.FORMULA: config_formula(job.losses)}
        tags[contract.OUTPUT_DIR] = str(self.output_dir)
        tags[contract.NOTE] = run_note(job, self.role, where)
        return tags

    @property
    def link(self) -> str:
        """The run's address in the MLflow UI (`kdray.orchestration.record.ui_url`)."""
        return ui_url(self.uri, self.tracker.experiment_id, self.run_id)

    def report(self, evaluation: Evaluation, checkpoint_dir: str | None) -> None:
        """The engine's `report`: the evaluation's metrics at its iteration, the best weights when it is the best."""
        metrics = evaluation.metrics()
        step = int(metrics.pop(contract.ITERATION))
        self._logger.log_metrics(metrics, step)
        if evaluation.is_best:  # the engine has just written them (and the preview images' predictions)
            self._logger.log_artifact(self.output_dir / f"best_{self.role}.pt", contract.BEST_CHECKPOINT_ARTIFACT_DIR)
            predictions = self.output_dir / contract.BEST_PREDICTIONS_FILE
            if predictions.is_file():
                self._logger.log_artifact(predictions, contract.PREDICTIONS_ARTIFACT_DIR)
        if evaluation.time_budget_reached:
            self._logger.set_tags({contract.TIME_BUDGET_STOP: str(evaluation.iteration)})

    def preview(self, iteration: int, picture) -> None:
        """The engine's `preview`: the evaluation's picture under the trial runs' image key, the iteration as step."""
        self._logger.log_image(picture, contract.PREDICTIONS_IMAGE_KEY, iteration)

    def log(self, metrics: dict[str, float]) -> None:
        """The engine's `log`: a window's training metrics (or the final multi-scale scores) at their iteration."""
        step = int(metrics[contract.ITERATION])
        self._logger.log_metrics({k: v for k, v in metrics.items() if k != contract.ITERATION}, step)

    def end(self, error: BaseException | None = None) -> str:
        """Close the run: FINISHED without `error`, KILLED for a KeyboardInterrupt, else FAILED with its reason (a
        FAILURE tag). Returns the status."""
        status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        if error is not None:
            why = reason(error) if status == "KILLED" else f"{type(error).__name__}: {reason(error)}"
            self.tracker.set_tags(self.run_id, {contract.FAILURE: why[:5000]})
        self.tracker.end_run(self.run_id, status)
        return status


def train_tracked(job: Job, output_dir: Path, *, role: str = "student", resume: str | None = None,
                  tracking_uri: str | None = None, command: str = "python -m kdray.train", say=print):
    """`kdray.engine.train` of `job` into `output_dir`, recorded as a `SingleRun` as a trial's run is (with the
    evaluations' preview pictures and, for a student, its best weights as an MLflow model); returns the engine's
    RunResult.
    Whatever ends the training (an error, Ctrl+C) ends the run first, then goes on up."""
    from kdray.engine import train

    run = SingleRun(job, role, output_dir, tracking_uri, command)
    run.start(resumed=resume is not None)
    say(f"MLflow run {run.run_id} in {run.uri} (experiment {job.tracking.experiment or job.name!r}): {run.link}")
    try:
        result = train(job, output_dir, role=role, resume=resume, report=run.report, log=run.log,
                       preview=run.preview)
        if role == "student" and job.tracking.log_model and result.best_iteration >= 0:
            from kdray.orchestration.student_model import log_best_student

            log_best_student(run.uri, run.run_id, job, result.best_weights, result.best_iteration)
    except BaseException as err:
        run.end(err)
        raise
    run.end()
    return result
