"""Typed job configuration: `load_job(path, overrides)` returns a validated `Job` or raises `ConfigError`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from kdray.config.cache import AUTO, cached_teacher_path
from kdray.config.loading import apply_overrides, build, flatten, parse_override, read_yaml, to_dict
from kdray.config.schema import (
    DataConfig,
    Job,
    LossesConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SweepConfig,
    TeacherConfig,
    TrackingConfig,
)
from kdray.config.validation import validate
from kdray.plugins import import_plugins, resolve_entries

__all__ = [
    "AUTO", "DataConfig", "Job", "LossesConfig", "ModelConfig", "OptimConfig", "RunConfig", "SweepConfig",
    "TeacherConfig", "TrackingConfig", "apply_overrides", "build", "flatten", "job_from_dict", "job_hash",
    "load_job", "override", "parse_override", "read_yaml", "to_dict", "to_yaml", "validate",
]

# Paths a job names are resolved against the directory the command runs in, once, at load: Ray moves the
# workers' working directory, so a relative path would mean something else there.
_PATH_KEYS = (
    ("data", "root"), ("teacher", "checkpoint"), ("teacher", "backbone_weights"),
    ("student", "backbone_weights"), ("run", "output_dir"),
)


def job_from_dict(data: dict[str, Any], overrides: list[str] | dict[str, Any] = (), base: Path | None = None,
                  plugin_sources: dict[str, str] | None = None) -> Job:
    """Build, resolve paths and validate a job from plain data plus `key=value` overrides.

    The job's `plugins` are imported first (`kdray.plugins`; `plugin_sources` holds the text of plugin files
    this machine may lack, as shipped with a trial)."""
    if not isinstance(overrides, dict):
        overrides = dict(parse_override(o) for o in overrides)
    data = apply_overrides(data, overrides)
    base = base or Path.cwd()
    # The plugins first: the losses and datasets they register are sections of the rest of the job.
    data["plugins"] = list(resolve_entries(data.get("plugins", ()), base))
    import_plugins(data["plugins"], plugin_sources)
    job = build(Job, data)
    for section, key in _PATH_KEYS:
        node = getattr(job, section)
        value = getattr(node, key)
        if value is not None and value != AUTO and not Path(value).expanduser().is_absolute():
            setattr(node, key, str((base / Path(value).expanduser()).resolve()))
    job = validate(job)
    if job.teacher.checkpoint == AUTO:
        job.teacher.checkpoint = cached_teacher_path(job)
    return job


def override(job: Job, changes: dict[str, Any]) -> Job:
    """A new validated job: `job` with dotted-key `changes` (`{"losses.kd.weight": 2.0}`), checked as
    `job_from_dict` checks a job; `job` itself is left as it is.

    The job's own paths are absolute already (resolved when it was built); a relative path among `changes`
    resolves against the working directory, as in `job_from_dict`. An `auto` teacher checkpoint the job
    resolved stays the file it resolved to, unless `changes` names `teacher.checkpoint` again.
    """
    return job_from_dict(to_dict(job), dict(changes))


def load_job(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> Job:
    """Read the YAML job at `path`, apply `key.sub=value` overrides, validate; ConfigError on any problem."""
    data = read_yaml(path)
    data.setdefault("name", Path(path).stem)
    return job_from_dict(data, overrides)


def to_yaml(job: Job) -> str:
    return yaml.safe_dump(to_dict(job), sort_keys=False)


# Keys that change where results go or how often they are printed, not what is trained. The multi-scale protocol
# only adds a score of the best weights at the end (runs select on the single-scale val/miou): the same weights.
# The previews only render a few val images' predictions.
_NOT_HASHED = ("plugins", "tracking", "sweep", "run.output_dir", "optim.log_interval", "data.loader_workers",
               "run.latency_repeats", "data.eval_scales", "data.eval_flip", "data.preview_images")


def weight_settings(job: Job) -> dict[str, Any]:
    """The job's settings, flattened: what its digests (`job_hash`, the teacher cache key) start from.

    A plugin's sections are in every job of a process that imported it, so they count only where they act:
    a plugin dataset's options when it is the job's dataset, a plugin loss's when it is enabled. The built-in
    sections are in every job alike and always count (digests made before plugins existed stay valid), but
    `data.tune_split` and `optim.time_budget_s` only when they are on.
    """
    from kdray.data.registry import DATASETS
    from kdray.losses.registry import LOSSES

    idle = [f"data.{name}." for name, spec in DATASETS.items()
            if _from_plugin(spec.dataset) and name != job.data.dataset]
    idle += [f"losses.{name}." for name, spec in LOSSES.items()
             if _from_plugin(spec.module) and not getattr(job.losses, name).enabled]
    if not job.data.tune_split.fraction:  # off: digests made before the tuning split existed stay valid
        idle.append("data.tune_split.")
    if not job.optim.time_budget_s:  # likewise for a run without a time budget
        idle.append("optim.time_budget_s")
    return {k: v for k, v in flatten(to_dict(job)).items() if not k.startswith(tuple(idle))}


def _from_plugin(cls: type) -> bool:
    return not (cls.__module__ == "kdray" or cls.__module__.startswith("kdray."))


def job_hash(job: Job) -> str:
    """A short digest of everything that determines the trained weights (a resume must match it)."""
    flat = {k: v for k, v in weight_settings(job).items() if not any(k.startswith(p) for p in _NOT_HASHED)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]
