"""Does distillation help on the demo? CE-only, CE+KD and CE+KD+I2CKD students, 3 seeds each, same teacher.

    python benchmarks/demo_distill.py [--job jobs/demo.yaml] [--seeds 0 1 2] [key=value ...]

Plain engine, one run after another (no Ray), so the wall times are those of `python -m kdray.train`.
Trains the demo teacher first if its checkpoint is missing. Prints a table: mean +- sample std (ddof=1) of
the final val mIoU over the seeds, the best evaluation's mean, the gap to the teacher, and wall time per run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdray.config import load_job
from kdray.engine import evaluate, load_teacher, train
from kdray.engine.distributed import RankContext
from kdray.engine.evaluate import evaluation_loader

ROWS = [
    ("Student (CE)", []),
    ("+KD", ["losses.kd.enabled=true"]),
    ("+KD+I2CKD", ["losses.kd.enabled=true", "losses.i2ckd.enabled=true"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    job = load_job(args.job, args.overrides)
    teacher_path = Path(job.teacher.checkpoint)
    if not teacher_path.is_file():
        print(f"training the demo teacher -> {teacher_path}")
        t0 = time.perf_counter()
        result = train(job, Path(tempfile.mkdtemp()), role="teacher")
        teacher_path.parent.mkdir(parents=True, exist_ok=True)
        teacher_path.write_bytes(result.best_weights.read_bytes())
        print(f"teacher trained in {time.perf_counter() - t0:.0f} s")
    from kdray.data import build_dataset

    teacher = load_teacher(job, torch.device("cpu"))
    val = evaluation_loader(build_dataset(job.data, "val"), job.data.eval_batch_size, RankContext())
    teacher_miou = evaluate(teacher, val, job.data.num_classes, job.data.ignore_index, RankContext())["miou"]

    rows = []
    for name, overrides in ROWS:
        finals, bests, times = [], [], []
        for seed in args.seeds:
            run_job = load_job(args.job, [*args.overrides, *overrides, f"run.seed={seed}"])
            with tempfile.TemporaryDirectory() as out:
                result = train(run_job, out, progress=False)
            finals.append(100 * result.final_miou)
            bests.append(100 * result.best_miou)
            times.append(result.wall_s)
            print(f"{name:14s} seed {seed}: final mIoU {finals[-1]:.2f} (best {bests[-1]:.2f}), {times[-1]:.0f} s",
                  flush=True)
        rows.append((name, finals, bests, times))

    s = job.data
    print(f"\nDemo distillation: teacher {job.teacher.arch} (width {job.teacher.width:g}), student "
          f"{job.student.arch} (width {job.student.width:g}); {job.optim.iterations} iterations, batch "
          f"{s.batch_size}, crop {s.crop[0]}x{s.crop[1]}, {s.num_classes} classes, seeds {args.seeds}; "
          f"{torch.get_num_threads()} CPU threads")
    print(f"Teacher val mIoU: {100 * teacher_miou:.2f}\n")
    print("| students | final mIoU (mean ± std) | best mIoU (mean) | gap to teacher | gain over CE | s/run |")
    print("|---|---|---|---|---|---|")
    base = statistics.mean(rows[0][1])
    for name, finals, bests, times in rows:
        mean = statistics.mean(finals)
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(f"| {name} | {mean:.2f} ± {std:.2f} (n={len(finals)}) | {statistics.mean(bests):.2f} | "
              f"{mean - 100 * teacher_miou:+.2f} | {mean - base:+.2f} | {statistics.mean(times):.0f} |")


if __name__ == "__main__":
    sys.exit(main())
