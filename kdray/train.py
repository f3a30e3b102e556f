"""`python -m kdray.train --job JOB [key=value ...]`: distil one student from the job's teacher.

Prints the mIoU at each evaluation; writes checkpoints and the best student under run.output_dir.
`--resume DIR` continues an interrupted run from its checkpoint directory.
"""

from __future__ import annotations

import time
from pathlib import Path

from kdray.cli import default_job, job_parser, run_main
from kdray.config import load_job
from kdray.engine import train
from kdray.losses.objective import method_label


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m kdray.train", __doc__)
    parser.add_argument("--resume", metavar="DIR", help="a run's checkpoint directory to continue from")
    args = parser.parse_args(argv)
    job = load_job(args.job or default_job(), args.overrides)
    if args.resume:
        out = Path(args.resume).resolve().parent
    else:
        out = Path(job.run.output_dir) / job.name / f"student-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train(job, out, role="student", resume=args.resume)
    print(f"{method_label(job.losses)} student {job.student.arch}: final mIoU {100 * result.final_miou:.2f}, "
          f"best {100 * result.best_miou:.2f} at iteration {result.best_iteration}, {result.wall_s:.0f} s; "
          f"outputs in {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
