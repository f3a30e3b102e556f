"""CIRKD: cross-image relational distillation, the mini-batch pixel relations plus the memory contrast."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from kdray.config.options import option
from kdray.errors import ConfigError, PreflightError
from kdray.losses import _checks
from kdray.losses.cirkd_batch import minibatch_pixel_relations
from kdray.losses.cirkd_memory import MemoryContrast
from kdray.losses.inputs import LABELS_AT_LOGITS, STUDENT_FEATURES, TEACHER_FEATURES
from kdray.losses.registry import LossConfig, register_loss


@dataclass
class CIRKDConfig(LossConfig):
    """`losses.cirkd`: see `CIRKD`. Defaults: CIRKD's `train_cirkd.py` (Cityscapes)."""

    weight_batch: float = option(1.0, at_least=0)
    weight_pixel: float = option(0.1, at_least=0)
    weight_region: float = option(0.1, at_least=0)
    batch_temperature: float = option(0.1, above=0)
    pool: int = option(1, at_least=1)
    pixel_memory_size: int = option(20000, at_least=1)
    region_memory_size: int = option(2000, at_least=1)
    pixel_contrast_size: int = option(4096, at_least=1)
    region_contrast_size: int = option(1024, at_least=1)
    pixels_per_class: int = option(16, at_least=1)
    contrast_temperature: float = option(0.1, above=0)
    contrast_kd_temperature: float = option(1.0, above=0)
    enqueue_mode: Literal["class", "cirkd_code"] = "class"

    def uses_memory(self) -> bool:
        return self.weight_pixel > 0 or self.weight_region > 0

    def check(self, prefix: str) -> None:
        if self.enabled and self.weight_batch == 0 and not self.uses_memory():
            raise ConfigError(f"{prefix}: weight_batch, weight_pixel and weight_region are all 0, so the loss is 0; "
                              f"give one of them a weight > 0 or set {prefix}.enabled=false")


@register_loss("cirkd", position=130, config=CIRKDConfig, label="CIRKD",
               reads={"student_features": STUDENT_FEATURES, "teacher_features": TEACHER_FEATURES,
                      "labels": LABELS_AT_LOGITS},
               # the memory's enqueue loops on the host over the batch's classes, draws and all-gathers
               graphable=lambda config: not config.uses_memory(),
               labelled_only=False)  # the mini-batch relations count every pixel, labelled or not
class CIRKD(nn.Module):
    """CIRKD's distillation terms on the head features:

        L = weight_batch · L_batch + weight_pixel · L_p + weight_region · L_r

    L_batch: the mini-batch pixel-to-pixel relations (`minibatch_pixel_relations`, τ = `batch_temperature`,
    `pool`); L_p, L_r: the memory-based pixel-to-pixel and pixel-to-region contrast (`MemoryContrast`: its
    queues of `pixel_memory_size` and `region_memory_size` teacher vectors per class, `pixels_per_class`
    enqueued per image and class, `pixel_contrast_size` and `region_contrast_size` keys drawn over the classes,
    τ = `contrast_temperature`, T_c = `contrast_kd_temperature`, `enqueue_mode`; its projection head trains with
    the student). With weight_pixel = weight_region = 0 there is no memory (no queues, no projection head).
    The job's `weight` multiplies the whole.

    The published recipe: CE (+0.4 aux) + KD (T = 1, weight 1) + this loss at its defaults (1, 0.1, 0.1); DL-R18
    76.38 mIoU (its baseline 74.21), PSP-R18 74.73 (72.55) on Cityscapes val with the DL-R101 teacher. Its VOC
    script uses 0.01 for both memory weights. The queues are float32, (Lp + Lr)·K·C_T·4 bytes: 0.39 GiB for
    Cityscapes (K = 19) with C_T = 256 at the default sizes; checkpoints carry them.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w), labels (N, h, w) int64 at the
    score map's size. Returns a float32 scalar.

    Paper: C. Yang, H. Zhou, Z. An, X. Jiang, Y. Xu, Q. Zhang, "Cross-Image Relational Knowledge Distillation
    for Semantic Segmentation", CVPR 2022, arXiv:2204.06986 (code: winycg/CIRKD).
    """

    def __init__(self, num_classes: int, student_channels: int, teacher_channels: int, *,
                 weight_batch: float = 1.0, weight_pixel: float = 0.1, weight_region: float = 0.1,
                 batch_temperature: float = 0.1, pool: int = 1, pixel_memory_size: int = 20000,
                 region_memory_size: int = 2000, pixel_contrast_size: int = 4096, region_contrast_size: int = 1024,
                 pixels_per_class: int = 16, contrast_temperature: float = 0.1,
                 contrast_kd_temperature: float = 1.0, enqueue_mode: str = "class", ignore_index: int = 255,
                 seed: int = 0) -> None:
        super().__init__()
        owner = type(self).__name__
        self.weight_batch = _checks.number(owner, "weight_batch", weight_batch)
        self.weight_pixel = _checks.number(owner, "weight_pixel", weight_pixel)
        self.weight_region = _checks.number(owner, "weight_region", weight_region)
        self.batch_temperature = _checks.number(owner, "batch_temperature", batch_temperature, positive=True)
        self.pool = _checks.positive_int(owner, "pool", pool)
        self.memory = MemoryContrast(
            num_classes, student_channels, teacher_channels, pixel_memory_size=pixel_memory_size,
            region_memory_size=region_memory_size, pixel_contrast_size=pixel_contrast_size,
            region_contrast_size=region_contrast_size, pixels_per_class=pixels_per_class,
            temperature=contrast_temperature, kd_temperature=contrast_kd_temperature, enqueue_mode=enqueue_mode,
            ignore_index=ignore_index, seed=seed, owner="losses.cirkd",
        ) if self.weight_pixel > 0 or self.weight_region > 0 else None

    def forward(self, student_features: Tensor, teacher_features: Tensor, labels: Tensor) -> Tensor:
        owner = type(self).__name__
        _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
        _checks.label_map(owner, labels, "student_features", student_features)
        total = student_features.float().sum() * 0.0  # every weight 0: exactly 0, still connected
        pooled = [-(-size // self.pool) for size in student_features.shape[-2:]]  # ceil: partial windows count
        if self.weight_batch > 0 and self.pool > 1 and pooled == [1, 1]:
            raise PreflightError(f"losses.cirkd: pool={self.pool} leaves one position of the "
                                 f"{tuple(student_features.shape[-2:])} feature maps, where the mini-batch relations "
                                 "are 0; lower pool")
        if self.weight_batch > 0:
            total = total + self.weight_batch * minibatch_pixel_relations(
                student_features, teacher_features, temperature=self.batch_temperature, pool=self.pool)
        if self.memory is not None:
            pixel, region = self.memory(student_features, teacher_features, labels)
            total = total + self.weight_pixel * pixel + self.weight_region * region
        return total
