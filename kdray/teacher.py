"""`python -m kdray.teacher --job JOB [key=value ...]`: train a job's teacher with CE and save its weights.

The weights go to the job's `teacher.checkpoint` (the best evaluation), where distillation runs load them;
`teacher.checkpoint: auto` (the demo's) is a per-user cache, keyed by the settings that determine the teacher.
The training is recorded in MLflow as a teacher run (as a sweep's teacher is), in the store a sweep uses:
--tracking-uri, else tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db; --no-tracking records nothing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from kdray.cli import default_job, job_parser, run_main, sigterm_as_ctrl_c, tracking_arguments
from kdray.config import load_job
from kdray.engine import train
from kdray.engine.inputs import check_teacher_training, open_splits


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m kdray.teacher", __doc__)
    parser.add_argument("--force", action="store_true", help="retrain even if teacher.checkpoint exists")
    tracking_arguments(parser)
    args = parser.parse_args(argv)
    job = load_job(args.job or default_job(), args.overrides)
    target = job.teacher.checkpoint
    if target is None:
        parser.error("the job has no teacher.checkpoint: name the file the teacher should be saved to")
    if Path(target).exists() and not args.force:
        print(f"teacher weights already at {target}; pass --force to train again")
        return 0
    open_splits(job)  # a wrong data tree or backbone file stops here, in seconds, not after the model is built
    for note in check_teacher_training(job):
        print(f"note: {note}")
    out = Path(job.run.output_dir) / job.name / f"teacher-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"teacher weights: {target}\noutputs: {out}")
    if args.no_tracking:
        result = train(job, out, role="teacher")
    else:
        from kdray.orchestration.single import train_tracked

        with sigterm_as_ctrl_c():  # `kill` ends the run as Ctrl+C does: its MLflow run KILLED
            result = train_tracked(job, out, role="teacher", tracking_uri=args.tracking_uri,
                                   command="python -m kdray.teacher")
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.best_weights, target)
    print(f"teacher {job.teacher.arch} (width {job.teacher.width}): best mIoU {100 * result.best_miou:.2f} "
          f"at iteration {result.best_iteration}, {result.wall_s:.0f} s; weights saved to {target}")
    return 0


if __name__ == "__main__":
    run_main(main)
