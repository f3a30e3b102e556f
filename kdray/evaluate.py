"""`python -m kdray.evaluate --job JOB --checkpoint C [--role student|teacher] [key=value ...]`: score a checkpoint.

Builds the job's student (or, with `--role teacher`, its teacher), loads C strictly (kdray's `best_student.pt` or
`best_teacher.pt`, a run's checkpoint directory, or a public CIRKD file; the job's data.normalize must be the one
the weights were trained with) and scores it on the job's val split twice: single scale (`val/miou`, what runs
select on) and under data.eval_scales / data.eval_flip (`val/miou_ms_flip`, ...); it prints a table of mIoU, pixel
accuracy and seconds. `--role teacher` without `--checkpoint` scores the job's teacher.checkpoint.

`--export DIR` (Cityscapes jobs) instead writes the predictions of the `--split` images (test, the default, or
val) for the benchmark server: `DIR/<city>/<city>_<seq>_<frame>_leftImg8bit.png`, one 8-bit PNG of labelIds per
image at its full resolution, under the job's scales and flips (zip DIR to upload it).

Runs in this process, on `--device` (default: cuda when there is a GPU, else cpu); no Ray, nothing logged.
Exit codes: 0 done; 2 bad input (job, override, checkpoint, data), with one line naming it.
"""

from __future__ import annotations

import time

import torch

from kdray.cli import default_job, job_parser, run_main
from kdray.config import load_job
from kdray.contract import arch_label
from kdray.data import split_name
from kdray.data.tune_split import tune_split_on
from kdray.engine.distributed import RankContext
from kdray.engine.export import EXPORT_DATASET, export_cityscapes
from kdray.engine.multiscale import is_single_scale
from kdray.engine.scoring import SINGLE_SCALE, job_protocol, load_for_evaluation, score_model
from kdray.engine.step import autocast_for
from kdray.errors import ConfigError
from kdray.models.public import mismatches

ROLES = ("student", "teacher")
EXPORT_SPLITS = ("test", "val")


def device_of(name: str | None) -> torch.device:
    """`--device`: the named torch device, else cuda when a GPU is visible, else cpu; ConfigError naming it when it
    is not a device here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: got {name!r}; a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: got {name!r}; no GPU is visible to torch here (use cpu)")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m kdray.evaluate", __doc__)
    parser.add_argument("--checkpoint", metavar="C",
                        help="weights to score: a weights file (best_student.pt, a CIRKD .pth) or a run's checkpoint "
                             "directory (default with --role teacher: the job's teacher.checkpoint)")
    parser.add_argument("--role", choices=ROLES, default="student",
                        help="which of the job's models the weights are for (default: student)")
    parser.add_argument("--export", metavar="DIR",
                        help="write the --split images' predictions as labelId PNGs for the Cityscapes benchmark "
                             "server instead of scoring")
    parser.add_argument("--split", choices=EXPORT_SPLITS, default=None,
                        help="with --export: the Cityscapes split to predict (default: test)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)
    job = load_job(args.job or default_job(), args.overrides)
    if args.split is not None and args.export is None:
        raise ConfigError(f"--split: got {args.split!r}; it picks the images --export predicts (scores are always "
                          f"on the job's val split)")
    if args.export is not None and job.data.dataset != EXPORT_DATASET:
        raise ConfigError(f"--export: writes predictions in the Cityscapes benchmark server's layout (labelId PNGs); "
                          f"this job's data.dataset is {job.data.dataset!r}")
    checkpoint = args.checkpoint or (job.teacher.checkpoint if args.role == "teacher" else None)
    if checkpoint is None:
        raise ConfigError(f"--checkpoint: not given; name the weights to score: a kdray.train run writes "
                          f"{job.run.output_dir}/{job.name}/student-<time>/best_student.pt, a sweep's trials write "
                          f"theirs under {job.run.output_dir}/{job.name}/sweeps/; --role teacher scores the job's "
                          f"teacher.checkpoint without one")
    device = device_of(args.device)
    if job.run.threads:
        torch.set_num_threads(job.run.threads)
    cfg = job.teacher if args.role == "teacher" else job.student
    n = job.data.normalize
    for note in mismatches("--checkpoint", checkpoint, cfg.arch, job.data.num_classes, n.mean, n.std, n.order):
        print(f"note: {note}")
    model = load_for_evaluation(job, args.role, checkpoint, device)
    autocast = autocast_for(job, device) if job.run.amp != "none" and device.type == "cuda" else None
    print(f"{args.role} {arch_label(cfg.arch, cfg.width)} ({job.data.num_classes} classes) from {checkpoint}, "
          f"on {device}")
    scales, flip = job_protocol(job.data)
    d = job.data
    window = "whole images" if d.eval_mode == "whole" else f"sliding windows {list(d.eval_crop or d.crop)}"
    protocol = f"scales {list(scales)}{', with flips' if flip else ''}, {window}"

    if args.export is not None:
        split = args.split or "test"
        start = time.perf_counter()
        written = export_cityscapes(job, model, split, args.export, device, autocast)
        print(f"{len(written)} {split} predictions ({protocol}) written under {args.export} in "
              f"{time.perf_counter() - start:.1f} s: <city>/<city>_<seq>_<frame>_leftImg8bit.png, labelIds")
        return 0

    evaluated = "the tune split of " + split_name(job.data, "train") if tune_split_on(job.data) \
        else split_name(job.data, "val")
    print(f"scoring on {job.data.dataset} {evaluated}: {protocol}")
    protocols = [SINGLE_SCALE] if is_single_scale(scales, flip) else [SINGLE_SCALE, (scales, flip)]
    scores = score_model(job, model, RankContext(device=device), protocols, autocast)
    width = max(len("metric"), *(len(s.metric) for s in scores))
    print(f"{'metric':<{width}}  {'mIoU':>6}  {'pixel acc':>9}  {'seconds':>8}")
    for s in scores:
        print(f"{s.metric:<{width}}  {100 * s.miou:6.2f}  {100 * s.pixel_acc:9.2f}  {s.seconds:8.1f}")
    if len(scores) == 1:
        print("('data.eval_scales=[0.5,0.75,1.0,1.25,1.5,1.75]' data.eval_flip=true adds the papers' MS + flip score)")
    return 0


if __name__ == "__main__":
    run_main(main)
