"""Resource checks before anything waits: a request the cluster cannot meet fails now, with a message.

(Ray retries a placement group that can never be satisfied forever, silently.)
"""

from __future__ import annotations

import math
import os

from kdray.config import Job
from kdray.errors import ResourceError

TRIAL_CPU = 0.01  # the trial function only waits on its Train workers, which take their own resources


def per_trial(job: Job) -> dict[str, float]:
    r = job.run
    return {"CPU": r.workers * r.cpus_per_worker, "GPU": r.workers * r.gpus_per_worker}


def check_fits(job: Job, cluster: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Raise ResourceError unless one trial's workers fit the cluster (total and per node)."""
    r = job.run
    need = per_trial(job)
    have_gpu, have_cpu = cluster.get("GPU", 0.0), cluster.get("CPU", 0.0)
    if need["GPU"] > have_gpu:
        raise ResourceError(f"run.gpus_per_worker={r.gpus_per_worker} x run.workers={r.workers} asks for "
                            f"{need['GPU']:g} GPU(s); the cluster has {have_gpu:g}. Set run.gpus_per_worker=0 to "
                            "train on CPUs, or start a cluster with GPUs (ray up cluster.yaml)")
    if need["CPU"] + TRIAL_CPU > have_cpu + 1e-9:
        raise ResourceError(f"run.cpus_per_worker={r.cpus_per_worker} x run.workers={r.workers} asks for "
                            f"{need['CPU']:g} CPU(s), plus {TRIAL_CPU:g} for the trial that waits on them; the "
                            f"cluster has {have_cpu:g}. Lower run.cpus_per_worker (fractions are fine, e.g. "
                            f"{max(0.05, math.floor((have_cpu - TRIAL_CPU) / r.workers * 20) / 20):g}) or run.workers")
    fits_somewhere = any(node.get("CPU", 0) >= r.cpus_per_worker and node.get("GPU", 0) >= r.gpus_per_worker
                         for node in nodes)
    if nodes and not fits_somewhere:
        raise ResourceError(f"no node offers one worker's {r.cpus_per_worker:g} CPU and {r.gpus_per_worker:g} GPU "
                            f"(largest node: {max(n.get('CPU', 0) for n in nodes):g} CPU, "
                            f"{max(n.get('GPU', 0) for n in nodes):g} GPU)")


def concurrency(job: Job, cluster: dict[str, float], requested: int | None) -> int:
    """How many trials run at once: the space's choice, else as many as the cluster holds (at least 1)."""
    if requested is not None:
        return requested
    need = per_trial(job)
    fit_cpu = math.floor((cluster.get("CPU", 0.0) + 1e-9) / (need["CPU"] + TRIAL_CPU))
    fit_gpu = math.floor((cluster.get("GPU", 0.0) + 1e-9) / need["GPU"]) if need["GPU"] else fit_cpu
    return max(1, min(fit_cpu, fit_gpu))


def local_resources() -> dict[str, float]:
    """What an embedded Ray would see on this machine (for --dry-run without a cluster)."""
    try:
        import torch

        gpus = float(torch.cuda.device_count())
    except Exception:  # no usable CUDA runtime: no GPUs
        gpus = 0.0
    return {"CPU": float(os.cpu_count() or 1), "GPU": gpus}
