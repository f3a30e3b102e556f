"""`teacher.checkpoint: auto`: a teacher kdray trains itself, kept in a per-user cache keyed by what it is.

The file is `<cache>/teachers/<job name>-<teacher arch>-<key>.pt`, where `<cache>` is `$KDRAY_CACHE_DIR`, else
`$XDG_CACHE_HOME/kdray`, else `~/.cache/kdray`, and `<key>` digests every setting that determines the teacher's
weights: the data, the teacher's own section, the optimiser (but `optim.iterations` when `teacher.iterations` is
set), the CE term, the run's seed and precision (not the worker count: the global batch is the same). The same
job from any directory finds the same teacher; a job that would train a different one gets another file. The
built-in demo uses it: its teacher trains once per machine and user.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from kdray.config.schema import Job

AUTO = "auto"
_TEACHER_KEYS = ("data.", "teacher.", "optim.", "losses.ce.", "run.seed", "run.amp")
# how a teacher is scored once more at its end (data.eval_*: multi-scale, flips) does not change its weights
_IGNORED = ("teacher.checkpoint", "data.loader_workers", "optim.log_interval", "data.eval_scales", "data.eval_flip",
            "data.preview_images")  # ... nor which val images its evaluations render
# a search's tuning split (the teacher trains on the whole training split) and a student run's time budget
_STUDENT_ONLY = ("data.tune_split.", "optim.time_budget_s")


def cache_dir() -> Path:
    explicit = os.environ.get("KDRAY_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache").resolve() / "kdray"


def teacher_key(job: Job) -> str:
    """A 12-hex digest of the settings that determine the weights `kdray.teacher` would train for `job`."""
    from kdray.config import weight_settings

    flat = weight_settings(job)
    # the teacher trains for `job.teacher_iterations`: optim.iterations counts only when it is that
    ignored = _IGNORED + (("optim.iterations",) if job.teacher.iterations is not None else ())
    kept = {k: v for k, v in flat.items()
            if k.startswith(_TEACHER_KEYS) and k not in ignored and not k.startswith(_STUDENT_ONLY)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_teacher_path(job: Job) -> str:
    return str(cache_dir() / "teachers" / f"{job.name}-{job.teacher.arch}-{teacher_key(job)}.pt")
