"""The job: what one distillation (or teacher) run trains, as typed dataclasses.

Every field has the default of the published recipe (CIRKD / I2CKD; loss docstrings cite theirs) unless a comment
says otherwise. The loss sections' option names are the constructor arguments of the loss modules in
`kdray.losses`, so `losses.kd.temperature=4` reaches `PixelwiseKD(temperature=4)` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DATASETS = ("synthetic", "cityscapes", "voc", "camvid", "folder")
# The (train, evaluation) splits the papers use, taken when data.train_split / data.val_split are not set.
# CamVid is reported on its test split.
PAPER_SPLITS = {"synthetic": ("train", "val"), "cityscapes": ("train", "val"), "voc": ("train_aug", "val"),
                "camvid": ("train", "test"), "folder": ("train", "val")}

HINGE_STUDENT_WEIGHT = 0.001  # SKD's w_adv: the student's adversarial term under the hinge objective


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
class SyntheticConfig:
    """The built-in procedural dataset (kdray.data.synthetic); only read when `data.dataset` is synthetic."""

    image_size: int = 64
    train_length: int = 4096
    val_length: int = 256
    seed: int = 0


@dataclass
class FolderConfig:
    """A user's own data (kdray.data.folder): `<root>/<split>/images/<stem>.<ext>` paired with
    `<root>/<split>/masks/<stem>.png` holding class ids 0..K-1 and `data.ignore_index`. Only read when
    `data.dataset` is folder."""

    class_names: tuple[str, ...] | None = None  # one name per class id, in id order; sets K = data.num_classes


@dataclass
class DataConfig:
    dataset: Literal["synthetic", "cityscapes", "voc", "camvid", "folder"] = "synthetic"
    root: str | None = None
    # The splits trained on and evaluated on; None takes the papers' choice (PAPER_SPLITS above):
    # cityscapes train/val, voc train_aug/val, camvid train/test, folder train/val.
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
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)


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


@dataclass
class LossConfig:
    enabled: bool = False
    weight: float = 1.0

    def term_weight(self) -> float:
        """The weight of this loss's term in the student's objective."""
        return self.weight


@dataclass
class CrossEntropyConfig(LossConfig):
    enabled: bool = True
    aux_weight: float = 0.4


@dataclass
class KDConfig(LossConfig):
    temperature: float = 1.0
    reduction: Literal["pixel_mean", "element_mean"] = "pixel_mean"
    mask_ignore: bool = False


@dataclass
class CWDConfig(LossConfig):
    weight: float = 3.0
    temperature: float = 4.0
    on: Literal["logits", "features", "both"] = "logits"
    feature_scale: float = 50.0 / 3.0  # at weight 3 the feature term carries the published 50


@dataclass
class ACEConfig(LossConfig):
    rule: Literal["replace", "average"] = "replace"
    temperature: float = 1.0


@dataclass
class PairwiseConfig(LossConfig):
    weight: float = 10.0
    patch: int = 2


@dataclass
class AdversarialConfig(LossConfig):
    # The student's term `−weight · mean D(z_S)`. None: the spec's, w_adv = 0.001 under hinge, and under
    # wgan_gp w_d, the discriminator's own weight (`d_weight`, 0.1), whatever it is set to.
    weight: float | None = None
    conditioning: Literal["logits", "logits+image"] = "logits"
    objective: Literal["hinge", "wgan_gp"] = "hinge"
    d_weight: float = 0.1
    gp_weight: float = 10.0
    d_lr: float = 4e-4
    d_betas: tuple[float, float] = (0.9, 0.99)

    def term_weight(self) -> float:
        if self.weight is not None:
            return self.weight
        return self.d_weight if self.objective == "wgan_gp" else HINGE_STUDENT_WEIGHT


@dataclass
class IFVDConfig(LossConfig):
    weight: float = 20.0


@dataclass
class CSCConfig(LossConfig):
    weight: float = 10.0
    patch: int = 2
    gamma: float = 1.0


@dataclass
class I2CKDConfig(LossConfig):
    margin: float = 0.5
    scope: Literal["batch", "image"] = "batch"
    negatives: Literal["student", "teacher"] = "student"
    mining: Literal["all", "hardest"] = "all"
    normalize: bool = True
    distance: Literal["l2", "squared_l2"] = "l2"


@dataclass
class LossesConfig:
    ce: CrossEntropyConfig = field(default_factory=CrossEntropyConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    cwd: CWDConfig = field(default_factory=CWDConfig)
    ace: ACEConfig = field(default_factory=ACEConfig)
    pairwise: PairwiseConfig = field(default_factory=PairwiseConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    ifvd: IFVDConfig = field(default_factory=IFVDConfig)
    csc: CSCConfig = field(default_factory=CSCConfig)
    i2ckd: I2CKDConfig = field(default_factory=I2CKDConfig)

    def enabled(self) -> dict[str, LossConfig]:
        """The enabled losses by name, in declaration order."""
        return {name: cfg for name, cfg in vars(self).items() if cfg.enabled}


@dataclass
class OptimConfig:
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    iterations: int = 40000
    eval_interval: int = 4000
    log_interval: int = 50


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


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: sqlite:///<cwd>/mlflow.db, or $MLFLOW_TRACKING_URI when set
    experiment: str | None = None  # None: the job's name


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

    @property
    def distills(self) -> bool:
        """True when some enabled loss needs the teacher (anything but CE)."""
        return any(name != "ce" for name in self.losses.enabled())
