"""Time of one training iteration, through the engine's own step (`kdray.engine.step.TrainStep`): the teacher's
forward, the student's forward and backward, the objective, the SGD step and, with the adversarial loss, the
discriminator's step. Per precision (`run.amp`), memory layout (`run.channels_last`) and set of losses.

    python benchmarks/step.py --device cuda                     # paper shape, every amp and layout
    python benchmarks/step.py --shape demo                      # CPU, the demo's shape
    python benchmarks/step.py --device cuda --amp bf16 --recipes ce kd

Shapes (per process, i.e. per GPU):
- paper: 2 × 3 × 512 × 1024 crops, K=19, teacher deeplabv3_resnet101 (width 1), student deeplabv3_resnet18
  (width 1) with its auxiliary head: CIRKD's 2 images per GPU.
- demo: jobs/demo.yaml's 16 × 3 × 64 × 64 crops, K=8, teacher deeplabv3_resnet101 at width 0.25, student
  deeplabv3_resnet18 at width 0.25.

Weights are random (the time of a step does not depend on them); the batch is random and stays on the device,
so data loading is not in the figure. Time: median over --repeats iterations after --warmup (the first ones
run cuDNN's autotuning and the allocator's growth), each synchronised. Peak memory (CUDA): the allocator's
peak over the timed iterations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray.config import job_from_dict  # noqa: E402
from kdray.engine.distributed import RankContext  # noqa: E402
from kdray.engine.step import TrainStep  # noqa: E402
from kdray.models import build_model  # noqa: E402

SHAPES = {
    "paper": {"n": 2, "crop": (512, 1024), "k": 19, "teacher_width": 1.0, "student_width": 1.0},
    "demo": {"n": 16, "crop": (64, 64), "k": 8, "teacher_width": 0.25, "student_width": 0.25},
}
# Which losses are on, as `losses.*` overrides (CE with its auxiliary term is always on).
RECIPES = {
    "ce": [],
    "kd": ["losses.kd.enabled=true"],
    "i2ckd": ["losses.kd.enabled=true", "losses.i2ckd.enabled=true"],
    # CIRKD's recipe of the SKD/IFVD/CWD baselines: KD 1, pair-wise 10, IFVD 20, CWD (logits, T=4) 3, HO 0.001
    "cirkd": ["losses.kd.enabled=true", "losses.pairwise.enabled=true", "losses.pairwise.weight=10",
              "losses.ifvd.enabled=true", "losses.ifvd.weight=20", "losses.cwd.enabled=true",
              "losses.cwd.weight=3", "losses.cwd.temperature=4", "losses.adversarial.enabled=true",
              "losses.adversarial.weight=0.001"],
}

# One loss each, added to the "kd" recipe by --marginal (the published weights; ACE next to CE, as a cost).
ADDED = {
    "cwd": ["losses.cwd.enabled=true"], "ace": ["losses.ace.enabled=true"],
    "pairwise": ["losses.pairwise.enabled=true"], "adversarial": ["losses.adversarial.enabled=true"],
    "ifvd": ["losses.ifvd.enabled=true"], "csc": ["losses.csc.enabled=true"], "i2ckd": ["losses.i2ckd.enabled=true"],
    "fitnet": ["losses.fitnet.enabled=true"], "at": ["losses.at.enabled=true"],
    "at_stages": ["losses.at.enabled=true", "losses.at.taps=[backbone.layer2,backbone.layer3,backbone.layer4]"],
    "dist": ["losses.dist.enabled=true"], "dkd": ["losses.dkd.enabled=true"],
    "cirkd": ["losses.cirkd.enabled=true"],
}


def make_step(shape: dict, overrides: list[str], amp: str, channels_last: bool, device: torch.device,
              teacher: torch.nn.Module | None = None, cuda_graphs: bool = False) -> TrainStep:
    """The engine's step for a job with these `losses.*` overrides; `teacher` reuses a built one."""
    job = job_from_dict({
        "data": {"num_classes": shape["k"], "crop": list(shape["crop"]), "batch_size": shape["n"],
                 "synthetic": {"image_size": max(shape["crop"])}},  # never read: only for validation
        "teacher": {"arch": "deeplabv3_resnet101", "width": shape["teacher_width"]},
        "student": {"arch": "deeplabv3_resnet18", "width": shape["student_width"], "aux": True},
    }, overrides)
    # past validation, which allows these only with run.gpus_per_worker > 0 (a Ray setting, not used here)
    job.run.amp, job.run.channels_last, job.run.cuda_graphs = amp, channels_last, cuda_graphs
    torch.manual_seed(0)
    student = build_model("deeplabv3_resnet18", shape["k"], aux=True, width=shape["student_width"]).train()
    if not job.distills:  # as in a run: no teacher forward for CE alone
        teacher = None
    elif teacher is None:
        teacher = build_model("deeplabv3_resnet101", shape["k"], width=shape["teacher_width"]).to(device)
        calibrate_batch_norm(teacher, shape, device)
        teacher = teacher.eval().requires_grad_(False)
    return TrainStep.build(job, student, teacher, job.losses, RankContext(device=device))


def calibrate_batch_norm(model: torch.nn.Module, shape: dict, device: torch.device) -> None:
    """Running statistics from a few batches, as a trained teacher has: with a fresh network's identity
    statistics, 101 layers of residual sums overflow float16 in eval mode (a NaN loss under fp16 AMP)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(shape["n"], 3, *shape["crop"], device=device))


def make_batch(shape: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    height, width = shape["crop"]
    images = torch.randn(shape["n"], 3, height, width, generator=g)
    labels = torch.randint(0, shape["k"], (shape["n"], height, width), generator=g)
    labels[torch.rand(shape["n"], height, width, generator=g) < 0.1] = 255
    return images.to(device), labels.to(device)


def time_once(step: TrainStep, batch, device: torch.device) -> float:
    """Milliseconds of one synchronised iteration; a non-finite loss stops the benchmark."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    total, _ = step(*batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) * 1e3
    if not torch.isfinite(total):
        raise SystemExit(f"non-finite loss {total.item()} in the timed steps")
    return elapsed


def time_step(step: TrainStep, shape: dict, device: torch.device, warmup: int, repeats: int):
    """(median ms, peak MB or None) of `step` on one random batch."""
    batch = make_batch(shape, device)
    for _ in range(warmup):
        step(*batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = [time_once(step, batch, device) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return statistics.median(times), peak


def marginal_costs(shape: dict, device: torch.device, amp: str, warmup: int, repeats: int, cuda_graphs: bool):
    """[(loss, base ms, added ms)]: what each distillation loss adds to a CE + KD iteration, the two steps timed
    in alternation (one iteration of each, `repeats` times) so that a drift of the machine hits both; the added
    time is the median of the pairs' differences."""
    base = make_step(shape, RECIPES["kd"], amp, False, device, cuda_graphs=cuda_graphs)
    batch = make_batch(shape, device)
    rows = []
    for name, overrides in ADDED.items():
        other = make_step(shape, RECIPES["kd"] + overrides, amp, False, device, teacher=base.teacher,
                          cuda_graphs=cuda_graphs)
        for _ in range(warmup):
            base(*batch)
            other(*batch)
        pairs = [(time_once(base, batch, device), time_once(other, batch, device)) for _ in range(repeats)]
        rows.append((name, statistics.median(a for a, _ in pairs), statistics.median(b - a for a, b in pairs)))
        print(f"+{name}: {rows[-1][1]:.1f} ms {rows[-1][2]:+.2f} ms", file=sys.stderr, flush=True)
        del other
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--shape", choices=list(SHAPES), help="default: paper on cuda, demo on cpu")
    parser.add_argument("--amp", nargs="+", choices=["none", "bf16", "fp16"],
                        help="default: all three on cuda, none on cpu")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "channels_last"],
                        help="default: both on cuda, nchw on cpu")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--cuda-graphs", action="store_true", help="run.cuda_graphs=true in every step")
    parser.add_argument("--marginal", action="store_true",
                        help="instead: what each loss adds to a CE + KD iteration (first --amp, nchw), alternating")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        parser.error("--cuda-graphs: CUDA graphs need --device cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    shape_name = args.shape or ("paper" if device.type == "cuda" else "demo")
    amps = args.amp or (["none", "bf16", "fp16"] if device.type == "cuda" else ["none"])
    layouts = args.layouts or (["nchw", "channels_last"] if device.type == "cuda" else ["nchw"])
    shape = SHAPES[shape_name]
    if device.type == "cuda":
        # torch's defaults, stated: TF32 in cuDNN convolutions, full float32 in matrix products
        name = f"{torch.cuda.get_device_name(device)}, cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, " \
               f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}, cuda_graphs={args.cuda_graphs}"
    else:
        name = f"cpu, {torch.get_num_threads()} threads"

    if args.marginal:
        repeats = max(args.repeats, 20)
        rows = marginal_costs(shape, device, amps[0], args.warmup, repeats, args.cuda_graphs)
        print(f"# What one loss adds to an iteration of CE + KD (teacher fwd, student fwd+bwd, SGD step), {name}, "
              f"torch {torch.__version__}, amp {amps[0]}, nchw")
        print(f"# shape {shape_name}: {shape['n']}×3×{shape['crop'][0]}×{shape['crop'][1]}, K={shape['k']}; "
              f"medians of {repeats} iterations of each step, taken in alternation, after {args.warmup} warm-up")
        print("| added loss | CE + KD ms | added ms (median of differences) | added % |")
        print("|---|---|---|---|")
        for loss, base_ms, added in rows:
            print(f"| {loss} | {base_ms:.1f} | {added:+.2f} | {100 * added / base_ms:+.1f} |")
        return

    rows = []
    for recipe in args.recipes:
        for amp in amps:
            for layout in layouts:
                step = make_step(shape, RECIPES[recipe], amp, layout == "channels_last", device,
                                 cuda_graphs=args.cuda_graphs)
                ms, peak = time_step(step, shape, device, args.warmup, args.repeats)
                rows.append((recipe, amp, layout, ms, shape["n"] / ms * 1e3, peak))
                print(f"{recipe} {amp} {layout}: {ms:.1f} ms", file=sys.stderr, flush=True)
                del step
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    print(f"# One training iteration (teacher fwd, student fwd+bwd, losses, SGD step, D step when on), {name}, "
          f"torch {torch.__version__}")
    print(f"# shape {shape_name}: {shape['n']}×3×{shape['crop'][0]}×{shape['crop'][1]}, K={shape['k']}, teacher "
          f"deeplabv3_resnet101 width {shape['teacher_width']:g}, student deeplabv3_resnet18 width "
          f"{shape['student_width']:g} + aux head; median of {args.repeats} after {args.warmup} warm-up")
    print("# recipes: " + "; ".join(f"{k}: CE" + "".join(" + " + o.split(".")[1] for o in v if "enabled" in o)
                                    for k, v in RECIPES.items() if k in args.recipes))
    print("| losses | amp | layout | ms / iteration | images / s | peak MB |")
    print("|---|---|---|---|---|---|")
    for recipe, amp, layout, ms, ips, peak in rows:
        print(f"| {recipe} | {amp} | {layout} | {ms:.1f} | {ips:.1f} | {'-' if peak is None else f'{peak:.0f}'} |")


if __name__ == "__main__":
    main()
