"""What `torch.compile` (or a CUDA graph) buys each loss: set-up time, and forward+backward time eager against
compiled (graphed).

    python benchmarks/compile_losses.py --device cuda             # paper shape
    python benchmarks/compile_losses.py --shape demo --losses KD I2CKD
    python benchmarks/compile_losses.py --device cuda --graph     # torch.cuda.make_graphed_callables instead

Same inputs and modules as `benchmarks/losses.py`. Each loss's call (module and inputs) is compiled whole with
the default inductor backend (`mode` selectable: `max-autotune-no-cudagraphs`, `reduce-overhead`, ...);
compile time is the first forward+backward's wall time, graph breaks are counted by `torch._dynamo.explain`.
With `--graph` (CUDA only), each loss's forward and backward are captured as two CUDA graphs by
`torch.cuda.make_graphed_callables` (its module's parameters included): a call replays them, so no operator is
dispatched from Python at all. Times: median of 9 samples of ~25 ms each, eager and compiled (graphed) taken in
alternation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import SHAPES, block_ms, clear_grads, graphed, loss_table, make_inputs, synchronize  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", choices=list(SHAPES), default="paper")
    parser.add_argument("--losses", nargs="+", help="names (or prefixes) of the rows; default all but the floor")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: inductor's default)")
    parser.add_argument("--graph", action="store_true", help="CUDA graphs (make_graphed_callables) instead")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.graph and device.type != "cuda":
        parser.error("--graph: CUDA graphs need --device cuda")
    shape = SHAPES[args.shape]
    x = make_inputs(shape, device)
    rows = []
    for name, fn, _, keys, owner in loss_table(shape, device):
        if name.startswith("floor") or (args.losses and not any(name.startswith(p) for p in args.losses)):
            continue

        def eager_step(fn=fn, keys=keys, owner=owner):
            clear_grads(x, keys, owner)
            fn(x).backward()

        try:
            breaks = 0 if args.graph else torch._dynamo.explain(fn)(x).graph_break_count
            synchronize(device)
            start = time.perf_counter()  # set-up: capture, or compilation (at the first call)
            compiled = graphed(fn, keys, owner, x) if args.graph else torch.compile(fn, mode=args.mode, dynamic=False)

            def compiled_step(fn=compiled, keys=keys, owner=owner):
                clear_grads(x, keys, owner)
                fn(x).backward()

            compiled_step()
            synchronize(device)
            compile_s = time.perf_counter() - start
            with torch.no_grad():
                expected, got = fn(x).item(), compiled(x).item()
        except Exception as err:  # a loss dynamo cannot take is a row of the table, not the end of it
            rows.append((name, None, None, None, None, f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"))
            print(f"{name}: failed: {err}", file=sys.stderr, flush=True)
            continue
        for _ in range(2):
            eager_step()
            compiled_step()
        calls = max(1, round(25 / max(block_ms(eager_step, device, 1), 1e-3)))
        eager, fast = [], []
        for _ in range(args.repeats):
            eager.append(block_ms(eager_step, device, calls))
            fast.append(block_ms(compiled_step, device, calls))
        note = f"value {got:.6g} vs eager {expected:.6g}" if abs(got - expected) > 1e-4 * max(abs(expected), 1e-3) \
            else ""
        rows.append((name, compile_s, breaks, statistics.median(eager), statistics.median(fast), note))
        print(f"{name}: compile {compile_s:.1f} s, eager {rows[-1][3]:.3f} ms, compiled {rows[-1][4]:.3f} ms",
              file=sys.stderr, flush=True)

    method = "CUDA graphs (make_graphed_callables)" if args.graph else f"torch.compile (mode {args.mode or 'default'})"
    print(f"# {method} of each loss's forward+backward, {args.device}, "
          f"shape {args.shape}: {shape.describe()}; torch {torch.__version__}")
    print("| loss | set-up s | graph breaks | eager ms | compiled ms | speed-up | note |")
    print("|---|---|---|---|---|---|---|")
    for name, compile_s, breaks, eager, fast, note in rows:
        if compile_s is None:
            print(f"| {name} | - | - | - | - | - | {note} |")
        else:
            print(f"| {name} | {compile_s:.1f} | {breaks} | {eager:.3f} | {fast:.3f} | {eager / fast:.1f}× | {note} |")


if __name__ == "__main__":
    main()
