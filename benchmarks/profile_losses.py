"""Where a loss's forward+backward spends its time: operator calls, kernels, host-device synchronisations.

    python benchmarks/profile_losses.py --device cuda            # paper shape
    python benchmarks/profile_losses.py --shape demo --top 5     # CPU

For each loss of `benchmarks/losses.py`'s table (same inputs and modules): the median time of one call, the
aten operator calls and (CUDA) the kernel launches per call, the host time the profiler attributes to the
operators, the device time of the kernels, and the synchronisations that CUDA's sync-debug mode reports per
call. A loss whose device time is far below its time is bound by launching work, not by doing it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import SHAPES, block_ms, clear_grads, loss_table, make_inputs  # noqa: E402


def count_syncs(step, device: torch.device) -> int:
    """Host-device synchronisations in one call, as `torch.cuda.set_sync_debug_mode('warn')` reports them."""
    if device.type != "cuda":
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile(step, device: torch.device, calls: int):
    """(aten calls, kernels, host ms, device ms, top kernels [(name, ms)]) per call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    aten_calls = sum(e.count for e in aten)
    host_ms = sum(e.self_cpu_time_total for e in aten) / 1e3
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = sum(e.count for e in kernels)
    device_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    top = sorted(((e.key, e.self_device_time_total / 1e3 / calls) for e in kernels), key=lambda kv: -kv[1])
    return aten_calls / calls, launches / calls, host_ms / calls, device_ms / calls, top


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="paper")
    parser.add_argument("--losses", nargs="+", help="names (or prefixes) of the rows to profile; default all")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--top", type=int, default=3, help="kernels to name per loss (CUDA)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    shape = SHAPES[args.shape]
    x = make_inputs(shape, device)
    rows, tops = [], []
    for name, fn, _, keys, owner in loss_table(shape, device):
        if args.losses and not any(name.startswith(p) for p in args.losses):
            continue

        def step(fn=fn, keys=keys, owner=owner):
            clear_grads(x, keys, owner)
            fn(x).backward()

        for _ in range(3):
            step()
        ms = statistics.median(block_ms(step, device, 5) for _ in range(5))
        syncs = count_syncs(step, device)
        aten, launches, host, dev, top = profile(step, device, args.calls)
        rows.append((name, ms, aten, launches, host, dev, syncs))
        tops.append((name, top[: args.top]))
        print(f"{name}: {ms:.2f} ms", file=sys.stderr, flush=True)

    print(f"# {args.device}, shape {args.shape}: {shape.describe()}; torch {torch.__version__}")
    print("| loss | ms / call | aten calls | kernels | host ms (aten) | device ms (kernels) | syncs |")
    print("|---|---|---|---|---|---|---|")
    for name, ms, aten, launches, host, dev, syncs in rows:
        print(f"| {name} | {ms:.2f} | {aten:.0f} | {launches:.0f} | {host:.2f} | {dev:.2f} | {syncs} |")
    if device.type == "cuda":
        print("\nslowest kernels per call (ms):")
        for name, top in tops:
            print(f"- {name}: " + "; ".join(f"{k[:70]} {v:.3f}" for k, v in top))


if __name__ == "__main__":
    main()
