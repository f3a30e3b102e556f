"""What the papers' models cost, counted by `kdray.engine.cost`, next to the figures CIRKD's line of work
publishes; and the demo student's inference latency on this machine.

    python benchmarks/cost.py                      # both sections, about a minute on a CPU
    python benchmarks/cost.py --quick              # a smoke run: one size, 2 short latency runs
    python benchmarks/cost.py --device cuda --latency-job jobs/cityscapes_dl101_to_dl18.yaml

Section 1 (no compute: FLOPs are counted on the meta device): teacher deeplabv3_resnet101 and students
deeplabv3_resnet18 and pspnet_resnet18 at width 1, 19 classes, at 512x1024 (CIRKD's training crop) and
1024x2048 (a whole Cityscapes image, CIRKD's evaluation), batch 1, eval mode (no auxiliary head):
- params (M): `parameter_count` / 1e6, the auxiliary head included (built with aux=True, as trained);
- GFLOPs: `forward_flops` / 1e9, torch.utils.flop_counter's convention, a multiply-add = 2 FLOPs;
- GMACs: the same / 2, the multiply-adds papers usually call "FLOPs";
- CIRKD-style GMACs: a hand re-implementation of the counter of CIRKD's code (utils/flops.py of
  github.com/winycg/CIRKD, `cal_multi_adds`): Conv2d and Linear leaves only, one per multiply-add, a
  convolution's output size taken as `(H + 2p - k) // s + 1` (dilation ignored, so dilated convolutions are
  over-counted), the auxiliary head run as CIRKD's models run it in eval mode. It shows where the published
  figures come from;
- published: params and FLOPs as a table quoting CIRKD (Yang et al., CVPR 2022, Table of Cityscapes results)
  gives them, resolution not stated there. The CIRKD README (github.com/winycg/CIRKD) publishes mIoU only.

Section 2: the latency job's student (jobs/demo.yaml by default, built as the job builds it) at the job's
evaluation size (`evaluation_size`), in the job's precision, on --device: --repeats separate calls of
`inference_latency` (each --warmup untimed runs, then --latency-repeats timed ones), each call's median, min and
max, and the spread of the medians over the calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray.config import load_job  # noqa: E402
from kdray.engine.cost import (  # noqa: E402
    evaluation_size,
    forward_flops,
    inference_latency,
    meta_copy,
    parameter_count,
)
from kdray.engine.step import autocast_for  # noqa: E402
from kdray.models import build_model  # noqa: E402

ARCHS = ("deeplabv3_resnet101", "deeplabv3_resnet18", "pspnet_resnet18")
SIZES = ((512, 1024), (1024, 2048))
# Published (params M, "FLOPs" G) as found; no resolution is stated next to them. Source: a third-party README
# table (the RLD method's, in the public GitHub corpus) quoting the CIRKD paper's Cityscapes table (T:
# DeepLabv3-Res101 61.1M 2371.7G; S: DeepLabv3-Res18 13.6M 572.0G; S: PSPNet-Res18 12.9M 507.4G). Not checked
# against the paper's PDF (arXiv:2204.06986), which the search did not reach.
PUBLISHED = {
    "deeplabv3_resnet101": (61.1, 2371.7),
    "deeplabv3_resnet18": (13.6, 572.0),
    "pspnet_resnet18": (12.9, 507.4),
}
PUBLISHED_SOURCE = ("CIRKD (Yang et al., CVPR 2022, arXiv:2204.06986) Cityscapes table, as quoted by a third-party "
                    "README; resolution not stated")


def cirkd_style_macs(model: nn.Module, height: int, width: int) -> int:
    """Multiply-adds as CIRKD's `cal_multi_adds` counts them (see the module docstring), on a meta copy: for each
    Conv2d `Cin * Cout * kh * kw * Hout' * Wout' // groups` with `Hout' = (H + 2 * pad - kh) // stride + 1`, for
    each Linear its weight's element count; nothing else. The auxiliary head runs (`aux=True`)."""
    counted = meta_copy(model).eval()
    total = 0

    def count(module: nn.Module, inputs: tuple, _output) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            x = inputs[0]
            out_h = (x.shape[2] + 2 * module.padding[0] - module.kernel_size[0]) // module.stride[0] + 1
            out_w = (x.shape[3] + 2 * module.padding[1] - module.kernel_size[1]) // module.stride[1] + 1
            total += (module.in_channels * module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                      * out_h * out_w // module.groups)
        else:
            total += module.weight.numel()

    for module in counted.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            module.register_forward_hook(count)
    with torch.no_grad():
        counted(torch.empty(1, 3, height, width, device="meta"), aux=True)
    return total


def model_table(archs: list[str], sizes: list[tuple[int, int]], classes: int) -> None:
    print(f"# Model cost, {classes} classes, batch 1, eval mode, width 1; torch {torch.__version__}; FLOPs counted "
          f"on the meta device (torch.utils.flop_counter, a multiply-add = 2 FLOPs)")
    print(f"# published: {PUBLISHED_SOURCE}")
    print("| model | params (M) | size | kdray GFLOPs | kdray GMACs | CIRKD-style GMACs | published params (M) "
          "| published FLOPs (G) |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in archs:
        model = build_model(arch, classes, aux=True)
        params = parameter_count(model) / 1e6
        published = PUBLISHED.get(arch) if classes == 19 else None
        for height, width in sizes:
            flops = forward_flops(model, height, width)
            cirkd = cirkd_style_macs(model, height, width)
            pub_params, pub_flops = (f"{published[0]:.1f}", f"{published[1]:.1f}") if published else ("n/a", "n/a")
            print(f"| {arch} | {params:.2f} | {height}x{width} | {flops / 1e9:.1f} | {flops / 2e9:.1f} | "
                  f"{cirkd / 1e9:.1f} | {pub_params} | {pub_flops} |")


def latency_table(job_path: str, device: torch.device, calls: int, warmup: int, repeats: int) -> None:
    job = load_job(job_path)
    height, width = evaluation_size(job.data)
    torch.manual_seed(0)
    model = build_model(job.student.arch, job.data.num_classes, aux=job.student.aux,
                        width=job.student.width).to(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    results = [inference_latency(model, height, width, device, autocast=autocast_for(job, device),
                                 warmup=warmup, repeats=repeats) for _ in range(calls)]
    medians = [r.median_ms for r in results]
    print()
    print(f"# Inference latency of {job.name}'s student {job.student.arch} width {job.student.width:g} "
          f"({parameter_count(model) / 1e6:.3f} M params, {forward_flops(model, height, width) / 1e9:.4f} GFLOPs), "
          f"1x3x{height}x{width} (the job's evaluation size), amp {job.run.amp}, {where}")
    print(f"# {calls} calls of inference_latency, each {warmup} warm-up then {repeats} timed runs")
    print("| call | median ms | min ms | max ms |")
    print("|---|---|---|---|")
    for i, r in enumerate(results, start=1):
        print(f"| {i} | {r.median_ms:.3f} | {r.min_ms:.3f} | {r.max_ms:.3f} |")
    middle = statistics.median(medians)
    print(f"# spread of the {calls} medians: {min(medians):.3f} .. {max(medians):.3f} ms, median {middle:.3f} ms, "
          f"(max - min) / median = {100 * (max(medians) - min(medians)) / middle:.1f} %")


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    try:
        return int(height), int(width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HEIGHTxWIDTH, e.g. 512x1024, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(SIZES), help="HEIGHTxWIDTH ...")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--latency-job", default="jobs/demo.yaml", help="the job whose student is timed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu), for the latency")
    parser.add_argument("--repeats", type=int, default=5, help="calls of inference_latency (default 5)")
    parser.add_argument("--latency-repeats", type=int, default=20, help="timed runs per call (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per call (default 3)")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: first size only, 2 calls of 1 warm-up and 3 timed runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.quick:
        args.sizes, args.repeats, args.warmup, args.latency_repeats = args.sizes[:1], 2, 1, 3
    model_table(args.archs, args.sizes, args.classes)
    if not args.skip_latency:
        latency_table(args.latency_job, device, args.repeats, args.warmup, args.latency_repeats)


if __name__ == "__main__":
    main()
