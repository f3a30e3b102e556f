"""The teacher's place in a sweep: trained first when its file is missing (a run of its own), or scored once on
the val split when it is given but has no run yet, so that the report's tables have their teacher row.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kdray import contract
from kdray.config import Job
from kdray.config.schema import TuneSplitConfig
from kdray.contract import Evaluation
from kdray.errors import ResourceError
from kdray.orchestration.outcome import reason
from kdray.orchestration.progress import TeacherProgress
from kdray.orchestration.record import (
    active_params,
    log_datasets,
    model_phrase,
    run_note,
    teacher_tags,
    ui_route,
)
from kdray.orchestration.tracking import Tracker


def train_teacher(job: Job, tracker: Tracker, uri: str, sweep_dir: Path, say, smoke: bool = False,
                  sweep: tuple[str, str] | None = None) -> None:
    """Train the job's teacher on Ray Train workers into `job.teacher.checkpoint`, as a run of its own.

    `sweep`: (sweep id, the sweep run's id) of the sweep that needs it. The teacher's run is not nested under the
    sweep's (the file serves every later sweep of the same settings): it names the sweep in TRAINED_FOR_SWEEP
    and links to its run in its description."""
    from kdray.models import build_model
    from kdray.orchestration.workers import fit

    model = build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    tags = teacher_tags(job, params_m)
    if smoke:
        tags[contract.SMOKE_TEST] = "true"
    where = f"Trained for its weights file `{job.teacher.checkpoint}`"
    if sweep is not None:
        tags[contract.TRAINED_FOR_SWEEP] = sweep[0]
        where += f", first needed by [sweep {sweep[0]}]({ui_route(tracker.experiment_id, sweep[1])})"
    tags[contract.NOTE] = run_note(job, "teacher", where)
    run_id = tracker.start_run(f"teacher-{job.teacher.arch}", tags)
    tracker.log_params(run_id, active_params(job, role="teacher"))
    log_datasets(tracker, run_id, replace(job.data, tune_split=TuneSplitConfig()))
    say(f"training the teacher {job.teacher.arch} (width {job.teacher.width:g}) -> {job.teacher.checkpoint}")
    try:
        with TeacherProgress(job.teacher_iterations, say,
                             name=f"teacher {job.teacher.arch}") as progress:
            fit(job, role="teacher", run_id=run_id, tracking_uri=uri, name="teacher", storage_path=str(sweep_dir),
                callbacks=[progress.callback])
    except BaseException as err:  # Ctrl+C too: the teacher's run never stays RUNNING
        tracker.set_tags(run_id, {contract.FAILURE: reason(err)[:5000]})
        tracker.end_run(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
    if not Path(job.teacher.checkpoint).is_file():
        raise ResourceError(f"the teacher run ended without writing {job.teacher.checkpoint}")


def evaluate_teacher(job: Job) -> tuple[Evaluation, float]:
    """The teacher's evaluation on the val split (as the engine reports one, at iteration 0) and its size in
    millions of parameters."""
    import torch

    from kdray.data import build_dataset, class_names
    from kdray.engine import RankContext, evaluate, load_teacher
    from kdray.engine.evaluate import evaluation_loader, judge

    if job.run.threads:  # a Ray task starts with one intra-op thread per CPU it asked for
        torch.set_num_threads(job.run.threads)
    device = torch.device("cuda" if job.run.gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
    teacher = load_teacher(job, device)
    ctx = RankContext(device=device)
    loader = evaluation_loader(build_dataset(job.data, "val"), job.data.eval_batch_size, ctx)
    scores = evaluate(teacher, loader, job.data.num_classes, job.data.ignore_index, ctx)
    evaluation = judge(0, scores, class_names(job.data), float("-inf"))
    return evaluation, sum(p.numel() for p in teacher.parameters()) / 1e6


def record_teacher(job: Job, tracker: Tracker, say) -> None:
    """Give the experiment a teacher run for this checkpoint (the tables' top row), scoring it once if needed.

    The scoring runs as a Ray task with one worker's resources, so on a cluster it lands on a GPU node.
    """
    import ray

    from kdray.data import split_name

    if tracker.find_run(**{contract.KIND: "teacher", contract.TEACHER_CHECKPOINT: str(job.teacher.checkpoint)}):
        return
    say(f"scoring the teacher {job.teacher.checkpoint} on the val split for the report's teacher row")
    task = ray.remote(num_cpus=job.run.cpus_per_worker, num_gpus=job.run.gpus_per_worker)(evaluate_teacher)
    evaluation, params_m = ray.get(task.remote(job))
    # what the teacher's own training would have logged of an evaluation: its scores, not the run's best so far
    metrics = {k: v for k, v in evaluation.metrics().items() if k not in (contract.ITERATION, contract.VAL_BEST_MIOU)}
    tags = teacher_tags(job, params_m)
    tags[contract.NOTE] = (f"**{model_phrase(job, 'teacher')}** from `{job.teacher.checkpoint}` (not trained here), "
                           f"scored once on {job.data.dataset}/{split_name(job.data, 'val')}: the report's teacher "
                           "row.")
    run_id = tracker.start_run(f"teacher-{job.teacher.arch}", tags)
    try:
        log_datasets(tracker, run_id, replace(job.data, tune_split=TuneSplitConfig()), trained=False)
        tracker.run_logger(run_id).log_metrics(metrics, 0)
    except BaseException as err:
        tracker.set_tags(run_id, {contract.FAILURE: reason(err)[:5000]})
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id, "FINISHED")
