"""`python -m kdray.train --job JOB [key=value ...]`: distil one student from the job's teacher.

Prints the mIoU at each evaluation; writes checkpoints and the best student under run.output_dir, and records the
run in MLflow (kind train: params, dataset inputs, metrics, the best checkpoint, a description) in the store a sweep
uses: --tracking-uri, else tracking.uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db; --no-tracking records nothing.
`--resume DIR` continues an interrupted run from its checkpoint directory (and its MLflow run).
`--dry-run` validates the job, checks the data tree and the weight files, prints the plan and stops: nothing is
trained and no model is built. `--check-data` reads every mask of both splits first (a normal start reads a
few), then goes on (with --dry-run: stops after the plan).
"""

from __future__ import annotations

import time
from pathlib import Path

from kdray.cli import default_job, job_parser, run_main, sigterm_as_ctrl_c, tracking_arguments
from kdray.config import Job, job_hash, load_job
from kdray.contract import miou_metric_key
from kdray.data import split_name
from kdray.data.tune_split import summarize_tune_split, tune_split_on
from kdray.engine import train
from kdray.engine.inputs import check_losses, check_weights, open_splits
from kdray.losses.objective import config_formula, method_label
from kdray.models.public import find_public


def plan(job: Job, sizes: dict[str, int]) -> str:
    d, o, r = job.data, job.optim, job.run
    per_worker = d.batch_size // r.workers
    lines = [f"job {job.name} (hash {job_hash(job)}): {method_label(job.losses)} student {job.student.arch}"]
    where = f" at {d.root}" if d.root else ""
    evaluated = f"the tune split of {split_name(d, 'train')}" if tune_split_on(d) else split_name(d, "val")
    lines.append(f"data: {d.dataset}{where}; train on {split_name(d, 'train')} ({sizes['train']} images), "
                 f"evaluate on {evaluated} ({sizes['val']} images), {d.num_classes} classes")
    if tune_split_on(d):
        t, summary = d.tune_split, summarize_tune_split(d)
        lines.append(f"  tune split: {100 * t.fraction:g}% of {split_name(d, 'train')} ({summary.tune_size} images, "
                     f"seed {t.seed}), evaluated instead of {split_name(d, 'val')}; digest {summary.digest[:12]}")
    window = "whole images" if d.eval_mode == "whole" else f"sliding windows {d.eval_crop or d.crop}"
    lines.append(f"  train crop {d.crop[0]}x{d.crop[1]}, random scale {d.scale_range[0]}-{d.scale_range[1]}, "
                 f"flip {d.flip}; evaluation: {window}, single scale, batch {d.eval_batch_size}")
    if tuple(d.eval_scales) != (1.0,) or d.eval_flip:
        lines.append(f"  at the end, the best weights also at scales {list(d.eval_scales)}"
                     f"{' with flips' if d.eval_flip else ''}: {miou_metric_key(d.eval_scales, d.eval_flip)}")
    lines.append(f"  normalize: order {d.normalize.order}, mean {list(d.normalize.mean)}, std {list(d.normalize.std)}")
    for key, path in (("teacher.checkpoint", job.teacher.checkpoint), ("student.backbone_weights",
                                                                         job.student.backbone_weights)):
        entry = find_public(path)
        if path is not None and (key != "teacher.checkpoint" or job.distills):
            lines.append(f"{key}: {path}" + (f" (public: {entry.note})" if entry else ""))
    lines.append(f"models: teacher {job.teacher.arch} (width {job.teacher.width}), student {job.student.arch} "
                 f"(width {job.student.width})" if job.distills else f"model: student {job.student.arch}")
    lines.append(f"loss: {config_formula(job.losses)}")
    epochs = o.iterations * d.batch_size / max(sizes["train"], 1)
    lines.append(f"optim: SGD lr {o.lr:g}, momentum {o.momentum:g}, weight decay {o.weight_decay:g}, poly power "
                 f"{o.poly_power:g}; {o.iterations} iterations ({epochs:.1f} epochs), evaluate every "
                 f"{o.eval_interval}")
    if o.time_budget_s:
        lines.append(f"  time budget: {o.time_budget_s:g} s of training (optim.time_budget_s): the run ends complete "
                     "where it runs out, evaluated there, the schedule cut")
    gpus = r.workers * r.gpus_per_worker
    lines.append(f"batch: {d.batch_size} per iteration = {r.workers} worker(s) x {per_worker} images")
    lines.append(f"resources: {r.workers} worker(s) x ({r.gpus_per_worker:g} GPU, {r.cpus_per_worker:g} CPU) = "
                 f"{gpus:g} GPU(s), {r.workers * r.cpus_per_worker:g} CPU(s); amp {r.amp}; "
                 f"{d.loader_workers} loader process(es) per worker")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m kdray.train", __doc__)
    parser.add_argument("--resume", metavar="DIR", help="a run's checkpoint directory to continue from")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the job, check data and weight files, print the plan; train nothing")
    parser.add_argument("--check-data", action="store_true", help="read and check every mask before starting")
    tracking_arguments(parser)
    args = parser.parse_args(argv)
    job = load_job(args.job or default_job(), args.overrides)
    sizes = open_splits(job, full=args.check_data)
    notes = check_weights(job)
    if job.sweep.time_budget_s:
        notes.append(f"sweep.time_budget_s={job.sweep.time_budget_s:g} bounds a sweep (python -m kdray.sweep); one "
                     "training ignores it: optim.time_budget_s is a run's budget")
    check_losses(job)
    if args.dry_run:
        print(plan(job, sizes))
        for note in notes:
            print(f"note: {note}")
        print("dry run: the job is valid and its data and weight files are in place; nothing was trained")
        return 0
    for note in notes:
        print(f"note: {note}")

    if args.resume:
        out = Path(args.resume).resolve().parent
    else:
        out = Path(job.run.output_dir) / job.name / f"student-{time.strftime('%Y%m%d-%H%M%S')}"
    if job.distills:
        print(f"teacher: {job.teacher.checkpoint}")
    print(f"outputs: {out}")
    if args.no_tracking:
        result = train(job, out, role="student", resume=args.resume)
    else:
        from kdray.orchestration.single import train_tracked

        with sigterm_as_ctrl_c():  # `kill` ends the run as Ctrl+C does: its MLflow run KILLED
            result = train_tracked(job, out, resume=args.resume, tracking_uri=args.tracking_uri)
    print(f"{method_label(job.losses)} student {job.student.arch}: final mIoU {100 * result.final_miou:.2f}, "
          f"best {100 * result.best_miou:.2f} at iteration {result.best_iteration}, {result.wall_s:.0f} s; "
          f"outputs in {out}")
    key = miou_metric_key(job.data.eval_scales, job.data.eval_flip)
    if key in result.final_scores:
        print(f"the best weights at scales {list(job.data.eval_scales)}{' with flips' if job.data.eval_flip else ''}: "
              f"{key} {100 * result.final_scores[key]:.2f}")
    return 0


if __name__ == "__main__":
    run_main(main)
