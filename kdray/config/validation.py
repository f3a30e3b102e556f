"""Value checks that types alone cannot express; each failure names the key, the value and what is valid."""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING

from kdray.config.schema import Job
from kdray.errors import ConfigError
from kdray.metrics import iou_metric_key

if TYPE_CHECKING:
    from kdray.data.registry import DatasetSpec


def _require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: got {value!r}; {allowed}")


def _positive(key: str, value: float) -> None:
    _require(value > 0 and math.isfinite(value), key, value, "must be > 0")


def _require_loggable_names(names: tuple[str, ...], key: str) -> None:
    """Each class's IoU is an MLflow metric named after it (`kdray.metrics.iou_metric_key`, which replaces the
    characters MLflow refuses with `_`): two names that give one key, or a key over MLflow's 250 characters,
    would make every trial fail at its first evaluation. `key` names where the names come from."""
    seen: dict[str, str] = {}
    for name in names:
        metric = iou_metric_key(name)
        _require(len(metric) <= 250, key, name,
                 f"a class name of at most {250 - len(iou_metric_key(''))} characters (it names an MLflow metric)")
        _require(metric not in seen, key, [seen.get(metric), name],
                 f"names that stay distinct once the characters MLflow refuses in metric names become '_' "
                 f"(both are logged as {metric!r}; letters, digits, _ . - and space are kept)")
        seen[metric] = name


def _validate_dataset(job: Job, spec: DatasetSpec) -> None:
    """The data rules that depend on which dataset is read (its registered spec): classes, split names, eval
    windows."""
    d = job.data
    names = spec.names(spec.options_of(d))
    if spec.strict_class_count:
        rule = (f"{spec.class_source()} lists {len(names)} classes" if isinstance(spec.class_names, str)
                else f"the {spec.name} dataset has {len(names)} classes")
        _require(d.num_classes == len(names), "data.num_classes", d.num_classes, rule)
    _require_loggable_names(names, spec.class_source() if isinstance(spec.class_names, str) else "data.dataset")
    for key in ("train_split", "val_split"):
        split = getattr(d, key)
        if split is None:
            continue
        if spec.splits is not None:
            _require(split in spec.splits, f"data.{key}", split,
                     f"the {spec.name} splits are {', '.join(spec.splits)}")
        else:
            _require(bool(split.strip()) and not any(c in split for c in "/\\") and split not in (".", ".."),
                     f"data.{key}", split, "a split name (a list file or folder name), not a path")
    if d.eval_mode == "slide":
        window = d.eval_crop or d.crop
        key = "data.eval_crop" if d.eval_crop is not None else "data.crop"
        for i, side in enumerate(window):
            _require(side >= 8, f"{key}[{i}]", side, "a sliding window side must be >= 8 (output stride 8)")
        for i, side in enumerate(d.eval_stride or ()):
            _require(1 <= side <= window[i], f"data.eval_stride[{i}]", side,
                     f"must be 1..{window[i]} (the window side), or the windows would leave gaps")


MAX_PREVIEW_IMAGES = 16  # data.preview_images: rows of the rendered predictions, which MLflow shows as one image
MAX_EVAL_SCALE = 4.0  # data.eval_scales: a 1024x2048 image at 4x is 4096x8192, already more than any GPU evaluates


def _validate_eval_scales(scales: tuple[float, ...]) -> None:
    """data.eval_scales: a non-empty list of resize factors, each finite, > 0 and <= MAX_EVAL_SCALE, none twice
    (a repeated scale would weigh twice in the average)."""
    _require(len(scales) >= 1, "data.eval_scales", list(scales),
             "a non-empty list of image scales, e.g. [1.0] (single scale) or [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]")
    for i, scale in enumerate(scales):
        _require(math.isfinite(scale) and 0 < scale <= MAX_EVAL_SCALE, f"data.eval_scales[{i}]", scale,
                 f"each scale must be > 0 and <= {MAX_EVAL_SCALE:g} (a factor the image is resized by)")
    repeated = sorted({s for s in scales if scales.count(s) > 1})
    _require(not repeated, "data.eval_scales", list(scales),
             f"each scale once ({', '.join(f'{s:g}' for s in repeated)} repeated would weigh twice in the average)")


def _validate_losses(job: Job) -> None:
    """Each loss's options against the ranges its registered config declares (`kdray.losses.registry`)."""
    from kdray.losses import LOSSES  # plain torch, same layer as the models

    sections = job.losses.sections()
    _require(bool(job.losses.enabled()), "losses", "nothing enabled", f"enable at least one of {', '.join(sections)}")
    for name, cfg in sections.items():
        LOSSES[name].check(cfg)
    _validate_taps(job)


def _validate_taps(job: Job) -> None:
    """Every layer an enabled loss reads features of must exist in the model it names (built on the meta
    device: no memory, no compute); ConfigError naming the loss, the layer and the valid ones otherwise."""
    from kdray.losses import LOSSES
    from kdray.losses.inputs import HEAD
    from kdray.models import build_model
    from kdray.models.taps import tap_names

    for side, cfg in (("student", job.student), ("teacher", job.teacher)):
        wanted = {(name, tap) for name, loss in job.losses.enabled().items()
                  for tap in LOSSES[name].taps(loss, side) if tap != HEAD}
        if not wanted:
            continue
        import torch

        with torch.device("meta"):
            valid = tap_names(build_model(cfg.arch, job.data.num_classes, aux=False, width=cfg.width))
        for name, tap in sorted(wanted):
            close = difflib.get_close_matches(tap, valid, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            _require(tap in valid, f"losses.{name}", f"{side} layer {tap}",
                     f"not a layer of {cfg.arch}{hint}; valid: {', '.join(valid)}")


def validate(job: Job) -> Job:
    """Check `job` as a whole; returns it unchanged so calls can chain."""
    d, o, r = job.data, job.optim, job.run
    _require(bool(job.name.strip()) and "/" not in job.name, "name", job.name, "a non-empty name without '/'")

    from kdray.data import dataset_spec  # the registry; plain torch, same layer as the models

    spec = dataset_spec(d.dataset)  # ConfigError with a did-you-mean for a name nothing registered

    _require(d.num_classes >= 2, "data.num_classes", d.num_classes, "must be >= 2")
    _require(d.ignore_index >= d.num_classes or d.ignore_index < 0, "data.ignore_index", d.ignore_index,
             f"must not be a class id 0..{d.num_classes - 1}; 255 is usual")
    for i, side in enumerate(d.crop):
        _require(side >= 8, f"data.crop[{i}]", side, "must be >= 8 (output stride 8)")
    lo, hi = d.scale_range
    _require(0 < lo <= hi, "data.scale_range", list(d.scale_range), "needs 0 < low <= high")
    spec.check(d)  # the dataset's own options: their ranges and rules
    if spec.needs_root:
        _require(d.root is not None, "data.root", d.root, f"the {d.dataset} dataset needs the path of its tree")
    largest = spec.largest_image(spec.options_of(d))  # None: no bound (a user's own images)
    if largest is not None:
        max_h, max_w = largest
        max_crop = (int(max_h * hi), int(max_w * hi))
        _require(d.crop[0] <= max_crop[0] and d.crop[1] <= max_crop[1], "data.crop", list(d.crop),
                 f"the {d.dataset} images are at most {max_h}x{max_w}, {max_crop[0]}x{max_crop[1]} at scale {hi}: "
                 "the crop must fit in that")
    _require(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _require(d.batch_size % r.workers == 0, "data.batch_size", d.batch_size,
             f"the global batch must split evenly over run.workers={r.workers}")
    _require(d.batch_size // r.workers >= 2, "data.batch_size", d.batch_size,
             f"each of the run.workers={r.workers} workers needs at least 2 images per step (BatchNorm)")
    _require(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "must be >= 1")
    _require(not spec.eval_batch_one or d.eval_batch_size == 1, "data.eval_batch_size", d.eval_batch_size,
             f"the {d.dataset} images differ in size, so they are evaluated one at a time: set 1")
    _validate_eval_scales(d.eval_scales)
    _require(0 <= d.preview_images <= MAX_PREVIEW_IMAGES, "data.preview_images", d.preview_images,
             f"must be 0..{MAX_PREVIEW_IMAGES} (val images rendered at each evaluation, one row each; 0: none)")
    _validate_dataset(job, spec)
    _require(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, "must be >= 0")
    for i, s in enumerate(d.normalize.std):
        _positive(f"data.normalize.std[{i}]", s)
    fraction = d.tune_split.fraction
    _require(math.isfinite(fraction) and 0 <= fraction < 1, "data.tune_split.fraction", fraction,
             "must be finite, >= 0 and < 1 (the share of the training split held out for tuning; 0: off)")

    from kdray.models import available_models  # plain torch, same layer; imported late to keep config light

    archs = available_models()
    for section in ("teacher", "student"):
        cfg = getattr(job, section)
        _positive(f"{section}.width", cfg.width)
        if cfg.arch not in archs:
            close = difflib.get_close_matches(cfg.arch, archs, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"{section}.arch: got {cfg.arch!r}{hint}; valid: {', '.join(archs)}")
    if job.teacher.iterations is not None:
        _require(job.teacher.iterations >= 1, "teacher.iterations", job.teacher.iterations, "must be >= 1")

    _validate_losses(job)

    _positive("optim.lr", o.lr)
    _require(0 <= o.momentum < 1, "optim.momentum", o.momentum, "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _require(o.poly_power >= 0, "optim.poly_power", o.poly_power, "must be >= 0")
    _require(o.iterations >= 1, "optim.iterations", o.iterations, "must be >= 1")
    _require(o.eval_interval >= 1, "optim.eval_interval", o.eval_interval, "must be >= 1")
    _require(o.log_interval >= 1, "optim.log_interval", o.log_interval, "must be >= 1")
    _require(math.isfinite(o.time_budget_s) and o.time_budget_s >= 0, "optim.time_budget_s", o.time_budget_s,
             "must be finite and >= 0 (a student run's training seconds; 0: no budget)")

    budget = job.sweep.time_budget_s
    _require(math.isfinite(budget) and budget >= 0, "sweep.time_budget_s", budget,
             "must be finite and >= 0 (a whole sweep's wall-clock seconds; 0: no budget)")

    _require(r.workers >= 1, "run.workers", r.workers, "must be >= 1")
    # seeds feed torch.manual_seed as seed * 1000 + rank, which must stay a 64-bit integer
    _require(0 <= r.seed < 2**32, "run.seed", r.seed, f"an integer from 0 to {2**32 - 1}")
    _require(r.gpus_per_worker >= 0, "run.gpus_per_worker", r.gpus_per_worker, "must be >= 0")
    _positive("run.cpus_per_worker", r.cpus_per_worker)
    _require(r.threads >= 0, "run.threads", r.threads, "must be >= 0 (0: torch's default)")
    _require(r.latency_repeats >= 0, "run.latency_repeats", r.latency_repeats,
             "must be >= 0 (timed inference runs of the student; 0: latency not measured)")
    _require(r.amp == "none" or r.gpus_per_worker > 0, "run.amp", r.amp,
             "mixed precision is for GPU runs: set run.gpus_per_worker > 0 or run.amp=none")
    _require(not r.channels_last or r.gpus_per_worker > 0, "run.channels_last", r.channels_last,
             "channels_last is for GPU runs: set run.gpus_per_worker > 0")
    _require(not r.cuda_graphs or r.gpus_per_worker > 0, "run.cuda_graphs", r.cuda_graphs,
             "CUDA graphs are for GPU runs: set run.gpus_per_worker > 0 or run.cuda_graphs=false")
    return job
