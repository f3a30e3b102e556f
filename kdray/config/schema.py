"""The job: what one distillation (or teacher) run trains, as typed dataclasses.

Every field has the default of the published recipe (CIRKD / I2CKD; loss docstrings cite theirs) unless a comment
says otherwise. The `losses` section is filled from the loss registry: each loss declares its options (the
constructor arguments of its module, so `losses.kd.temperature=4` reaches `PixelwiseKD(temperature=4)`) in its
own file under `kdray/losses/`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from kdray.config.options import RegistrySections


@dataclass
class NormalizeConfig:
    """Input normalisation; part of the job so a teacher trained elsewhere sees the inputs it was trained on.

    The image is scaled to 0..1, put in `order`, then `(x - mean) / std` per channel (in that order). A model
    trained on `x_255 - m_255` (0..255 pixels, mean subtraction only, as CIRKD's checkpoints) is served exactly
    by `mean = m_255 / 255` and `std = 1 / 255`; `kdray.models.public` lists the numbers of each public file.
    """

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, on the 0..1 pixel scale
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    order: Literal["rgb", "bgr"] = "rgb"


@dataclass
class TuneSplitConfig:
    """A held-out part of the training split that the run evaluates on instead of the val split, so that a
    hyper-parameter search does not select on the split it reports (`kdray.data.tune_split`)."""

    fraction: float = 0.0  # share of the training split's images held out, 0 <= fraction < 1; 0: off
    seed: int = 0  # picks which images; independent of run.seed, so every trial holds out the same ones


@dataclass(eq=False, repr=False)
class DataConfig(RegistrySections):
    """The `data` section: which dataset is read and how, plus one sub-section per registered dataset that has
    options (`kdray.data.register_dataset`), each that dataset's options dataclass, declared in its own file under
    `kdray/data/` (`data.<dataset>.<option>`). Only the selected dataset's options are read and checked."""

    section_kind = "dataset"

    dataset: str = "synthetic"  # a registered dataset's name (a built-in one, or a plugin's); default: the demo's
    root: str | None = None
    # The splits trained on and evaluated on; None takes the papers' choice (the dataset's `paper_splits`).
    train_split: str | None = None
    val_split: str | None = None
    num_classes: int = 8
    ignore_index: int = 255
    crop: tuple[int, int] = (64, 64)  # (height, width) of the training crop
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    batch_size: int = 16  # global batch: split evenly across run.workers
    eval_batch_size: int = 1  # per worker; the papers evaluate whole images one at a time
    loader_workers: int = 0  # DataLoader processes per training worker
    # Evaluation: `whole` runs each full-resolution image at once (the papers); `slide` runs overlapping
    # eval_crop windows every eval_stride pixels and averages their logits (for GPUs short of memory).
    eval_mode: Literal["whole", "slide"] = "whole"
    eval_crop: tuple[int, int] | None = None  # (height, width) of a window; None: data.crop
    eval_stride: tuple[int, int] | None = None  # None: two thirds of the window
    # The papers' "MS + flip" (`kdray.engine.multiscale`): softmax scores averaged over the image resized by each
    # scale and, with eval_flip, over its mirror image too. val/miou stays the single-scale score every evaluation
    # reports and runs select on; with other settings than these defaults, a run's best weights are scored this way
    # once more at its end (val/miou_ms_flip, val/miou_ms or val/miou_flip), as `python -m kdray.evaluate` does.
    eval_scales: tuple[float, ...] = (1.0,)  # e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]; each > 0 and <= 4, once
    eval_flip: bool = False
    # How many val images each evaluation renders as image | ground truth | student | teacher | errors (logged on the
    # run as the `predictions` image, the iteration its step): a fixed set, the same for every run and seed of the
    # job (`kdray.rendering.preview_indices`). 0: none. The best evaluation's predictions are kept for the report.
    preview_images: int = 4
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    tune_split: TuneSplitConfig = field(default_factory=TuneSplitConfig)

    @classmethod
    def registered_sections(cls) -> dict[str, type]:
        from kdray.data import DATASETS  # the built-ins register on import; plugins when a job imports them

        return {name: DATASETS[name].options for name in sorted(DATASETS) if DATASETS[name].options is not None}


@dataclass
class ModelConfig:
    arch: str = "deeplabv3_resnet18"
    width: float = 1.0  # channel multiplier; < 1 gives the small CPU variants of the same architecture
    aux: bool = True  # auxiliary FCN head on layer3 (used by CE's aux term)
    backbone_weights: str | None = None  # ImageNet backbone file; never downloaded


@dataclass
class TeacherConfig:
    arch: str = "deeplabv3_resnet101"
    width: float = 1.0
    checkpoint: str | None = None  # trained teacher weights; `python -m kdray.teacher` writes here; `auto`: the
    # per-user cache (kdray/config/cache.py), keyed by the settings that determine the teacher
    backbone_weights: str | None = None  # only for training the teacher
    iterations: int | None = None  # teacher training length; None: optim.iterations


@dataclass(init=False, eq=False, repr=False)
class LossesConfig(RegistrySections):
    """The `losses` section: one sub-section per registered loss (`kdray.losses.register_loss`), each
    that loss's config dataclass, declared in the loss's own file: `losses.kd.temperature`, `losses.i2ckd.margin`, ...
    A loss is trained when its `enabled` is true; `ce` is the one enabled by default."""

    section_kind = "loss"

    def __init__(self, **sections: Any):
        for name, section in sections.items():
            if name not in type(self).registered_sections():
                from kdray.losses.registry import loss_spec

                loss_spec(name)  # ConfigError with a did-you-mean
            self.__dict__[name] = section
        self.__post_init__()

    @classmethod
    def registered_sections(cls) -> dict[str, type]:
        import kdray.losses  # noqa: F401  # plugins register when a job imports them
        from kdray.losses.registry import LOSSES, loss_order  # importing kdray.losses registers the built-ins

        return {name: LOSSES[name].config for name in loss_order()}

    def enabled(self) -> dict[str, Any]:
        """The enabled losses by name, in the registry's order (`LossSpec.position`): the order of the
        objective's terms, of its formula and of the method label."""
        return {name: cfg for name, cfg in self.sections().items() if cfg.enabled}


@dataclass
class OptimConfig:
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    iterations: int = 40000
    eval_interval: int = 4000
    log_interval: int = 50
    # A student run's wall-clock budget, seconds: it stops after the iteration that brings its training time to
    # this (the iterations' wall time summed over the run and its resumes, batch loading included; evaluations,
    # checkpoints and start-up not), evaluates there and ends complete. The poly schedule stays over `iterations`.
    # 0: no budget. The teacher's training ignores it.
    time_budget_s: float = 0.0


@dataclass
class RunConfig:
    workers: int = 1  # data-parallel Ray Train workers (one process each)
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast for student and teacher (GPU runs)
    channels_last: bool = False
    cuda_graphs: bool = False  # the losses' forward and backward replayed as CUDA graphs (GPU runs)
    seed: int = 0
    threads: int = 0  # torch intra-op threads per worker; 0 leaves torch's default
    output_dir: str = "runs"  # each run writes under <output_dir>/<job name>/...
    latency_repeats: int = 10  # timed inference runs of the student (batch 1) whose median it logs; 0: not timed


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<cwd>/mlflow.db, or $MLFLOW_TRACKING_URI when set
    experiment: str | None = None  # None: the job's name
    # Each trial's best student as an MLflow model too (mlflow.pytorch.log_model, a model page with signature and
    # input example; a few CPU-seconds at a run's end); false: only its checkpoint artifact.
    log_model: bool = True


@dataclass
class SweepConfig:
    # A whole sweep's wall-clock budget, seconds, counted from when its teacher and trials start: when it runs out,
    # the sweep stops as Ctrl+C stops it (the running trials keep their checkpoints; `--resume` continues it, with
    # the budget afresh) and exits 4. 0: no budget. What a sweep runs, not what a trial trains: not in any digest.
    time_budget_s: float = 0.0


@dataclass
class Job:
    name: str = "job"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Python files or importable modules that register losses or datasets (`kdray.plugins`); imported before the
    # rest of the job is read, on the driver and on every worker. Paths are resolved against the working directory.
    plugins: tuple[str, ...] = ()

    def __reduce__(self):
        """A job with plugins pickles as its plain data and the text of its plugin files, and unpickles by
        importing those first (`kdray.plugins`): a Ray task or worker on a node without the files could not
        otherwise unpickle the config classes a plugin defines. Other jobs pickle as any dataclass."""
        if not self.plugins:
            return object.__reduce__(self)
        from kdray.config.loading import to_dict
        from kdray.plugins import read_sources

        return _job_with_plugins, (to_dict(self), read_sources(self.plugins))

    def __deepcopy__(self, memo: dict) -> Job:
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        for key, value in vars(self).items():
            setattr(copied, key, copy.deepcopy(value, memo))
        return copied

    @property
    def teacher_iterations(self) -> int:
        """How long the teacher trains: `teacher.iterations`, else `optim.iterations`."""
        return self.teacher.iterations if self.teacher.iterations is not None else self.optim.iterations

    @property
    def distills(self) -> bool:
        """True when some enabled loss reads a teacher tensor (every distillation loss; not CE)."""
        from kdray.losses import LOSSES

        return any(LOSSES[name].needs_teacher(cfg) for name, cfg in self.losses.enabled().items())


def _job_with_plugins(data: dict[str, Any], sources: dict[str, str]) -> Job:
    from kdray.config import job_from_dict

    return job_from_dict(data, plugin_sources=sources)
