"""How long one training iteration of a job takes: what a budget-matched comparison derives iterations from.

`measure_iteration_seconds` runs the job's own training loop (`kdray.engine.train`: the same data, models,
losses and step) for `warmup + iterations` iterations on one process, with the per-rank batch of the job's
data-parallel run (`data.batch_size / run.workers`), no evaluation and no latency timing, and returns the median
wall seconds of the iterations after the warm-up. A rank of a DDP run does that much work per step, plus its
gradient all-reduce, which this leaves out: the figure is a rank's step time without communication.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, replace

from kdray.config import Job
from kdray.engine.distributed import RankContext


@dataclass(frozen=True)
class IterationTiming:
    """The median wall seconds of `len(samples)` timed iterations (after `warmup` untimed ones), and the samples."""

    median_s: float
    samples: tuple[float, ...]
    warmup: int

    def __str__(self) -> str:
        return f"{self.median_s:.4g} s/iteration (median of {len(self.samples)}, after {self.warmup} warm-up)"


def measure_iteration_seconds(job: Job, *, iterations: int = 10, warmup: int = 3,
                              ctx: RankContext | None = None) -> IterationTiming:
    """Time `iterations` training iterations of `job`'s student run after `warmup` (see the module docstring).
    ValueError for iterations < 1 or warmup < 0."""
    from kdray.engine.loop import train

    if iterations < 1 or warmup < 0:
        raise ValueError(f"iterations must be >= 1 and warmup >= 0, got {iterations} and {warmup}")
    total = warmup + iterations
    per_rank = job.data.batch_size // job.run.workers
    timed = replace(job,
                    data=replace(job.data, batch_size=per_rank),
                    optim=replace(job.optim, iterations=max(total, job.optim.iterations), eval_interval=10**9,
                                  log_interval=10**9, time_budget_s=0.0),
                    run=replace(job.run, workers=1, latency_repeats=0))
    with tempfile.TemporaryDirectory(prefix="kdray-calibrate-") as scratch:
        result = train(timed, scratch, ctx=ctx or RankContext.current(), progress=False, stop_after=total)
    samples = tuple(result.iteration_seconds[warmup:])
    return IterationTiming(statistics.median(samples), samples, warmup)
