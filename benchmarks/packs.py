"""What a trial pack saves: seconds per member-iteration of K students trained as one pack (`kdray.engine.train_pack`:
one data pipeline, one teacher forward per batch) against the same K students trained one after another (`train`),
for K = 1, 2, 4, 8, measured in the same process, through the engine's own loop.

    python benchmarks/packs.py                          # CPU, the demo job
    python benchmarks/packs.py --device cuda --shape paper
    python benchmarks/packs.py --sizes 1 4 --iterations 30

Shapes:
- demo: jobs/demo.yaml as it is (16 × 3 × 64 × 64 crops of the synthetic set, generated in the loader; teacher
  deeplabv3_resnet18 at width 0.5, student deeplabv3_resnet18 at width 0.125, K=8 classes, run.threads 2).
- paper: 2 × 3 × 512 × 1024 crops of synthetic 1024-pixel images (one GPU's share of CIRKD's batch of 8), teacher
  deeplabv3_resnet101 and student deeplabv3_resnet18 at width 1 with its auxiliary head, 19 classes.

The members are a sweep's: member m distils with KD at weight 0.5·(m+1), every other one with I2CKD added (what
a search over the KD weight and the I2CKD toggle proposes). Weights are random: a teacher's forward costs the same
whatever it learnt. Each run trains --iterations iterations and evaluates once at the end (on a val split cut to
one batch); the figure is the loop's own per-iteration record (`RunResult.iteration_seconds`: a member's own step
plus its share of the batch's loading and the teacher forward), summed over the members for each iteration,
median over the iterations after the first --warmup, divided by K. Solo: the same for each member's solo run,
summed over the members. Device time is wall time here: on a GPU the seconds of the one device; on the CPU the
seconds of the run.threads threads the run drives.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray.cli import default_job  # noqa: E402
from kdray.config import load_job, override  # noqa: E402
from kdray.engine import PackMember, RankContext, train, train_pack  # noqa: E402
from kdray.models import build_model  # noqa: E402

SHAPES = {
    "demo": {},
    "paper": {"data.crop": [512, 1024], "data.num_classes": 19, "data.batch_size": 2, "data.eval_batch_size": 2,
              "data.scale_range": [1.0, 1.0],
              "data.synthetic": {"image_size": 1024, "train_length": 64, "val_length": 2},
              "teacher.arch": "deeplabv3_resnet101", "teacher.width": 1.0,
              "student.arch": "deeplabv3_resnet18", "student.width": 1.0},
}


def member_losses(m: int) -> dict:
    """Member m's losses: KD at weight 0.5·(m+1), I2CKD on for odd m."""
    return {"losses.kd.enabled": True, "losses.kd.weight": 0.5 * (m + 1), "losses.i2ckd.enabled": m % 2 == 1}


def per_member_iteration(results: list, warmup: int) -> float:
    """Median over iterations (after `warmup`) of the members' summed seconds, divided by the member count."""
    iterations = min(len(r.iteration_seconds) for r in results)
    totals = [sum(r.iteration_seconds[i] for r in results) for i in range(warmup, iterations)]
    return statistics.median(totals) / len(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--shape", choices=list(SHAPES), help="default: paper on cuda, demo on cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="pack sizes K")
    parser.add_argument("--iterations", type=int, default=40, help="iterations per run (default 40)")
    parser.add_argument("--warmup", type=int, default=5, help="first iterations left out (default 5)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape_name = args.shape or ("paper" if device.type == "cuda" else "demo")
    with tempfile.TemporaryDirectory(prefix="kdray-packs-") as scratch:
        base = load_job(default_job())
        shape = SHAPES[shape_name]
        teacher_file = Path(scratch) / "teacher.pt"
        torch.manual_seed(0)
        num_classes = shape.get("data.num_classes", 8)
        torch.save(build_model(shape.get("teacher.arch", "deeplabv3_resnet18"), num_classes, aux=False,
                               width=shape.get("teacher.width", 0.5)).state_dict(), teacher_file)
        base = load_job(default_job(), {**shape, "optim.iterations": args.iterations,
                                        "optim.eval_interval": args.iterations, "optim.log_interval": args.iterations,
                                        "data.preview_images": 0, "run.latency_repeats": 0,
                                        "run.output_dir": scratch, "teacher.checkpoint": str(teacher_file)})
        base = override(base, {"data.synthetic.val_length": base.data.eval_batch_size})
        ctx = RankContext(device=device)
        rows = []
        for k in args.sizes:
            jobs = [override(base, member_losses(m)) for m in range(k)]
            started = time.perf_counter()
            packed = train_pack([PackMember(job, Path(scratch) / f"pack{k}-{m}") for m, job in enumerate(jobs)],
                                ctx=ctx, progress=False)
            pack_wall = time.perf_counter() - started
            started = time.perf_counter()
            solo = [train(job, Path(scratch) / f"solo{k}-{m}", ctx=ctx, progress=False) for m, job in enumerate(jobs)]
            solo_wall = time.perf_counter() - started
            pack_s = per_member_iteration(packed, args.warmup)
            solo_s = statistics.fmean(per_member_iteration([r], args.warmup) for r in solo)
            rows.append((k, pack_s, solo_s, pack_wall, solo_wall))
            print(f"K={k}: pack {1e3 * pack_s:.1f} ms, solo {1e3 * solo_s:.1f} ms per member-iteration",
                  file=sys.stderr, flush=True)
    b = base
    print(f"# Trial packs on {device} ({torch.get_num_threads()} threads), shape {shape_name}: "
          f"{b.data.batch_size}×3×{b.data.crop[0]}×{b.data.crop[1]}, {b.data.num_classes} classes, teacher "
          f"{b.teacher.arch}@{b.teacher.width:g}, student {b.student.arch}@{b.student.width:g}; "
          f"{args.iterations} iterations a run, median after {args.warmup}")
    print("| K | pack s / member-iteration | solo s / member-iteration | pack / solo | pack run wall s | "
          "K solo runs wall s |")
    print("|---|---|---|---|---|---|")
    for k, pack_s, solo_s, pack_wall, solo_wall in rows:
        print(f"| {k} | {pack_s:.4f} | {solo_s:.4f} | {pack_s / solo_s:.2f} | {pack_wall:.1f} | {solo_wall:.1f} |")


if __name__ == "__main__":
    main()
