"""The public checkpoints of the segmentation-KD literature that kdray loads as they are (no key mapping).

Contract of an entry: `file` is the name the file is published under; a job names its path (`teacher.checkpoint`
for a `segmenter`, `student.backbone_weights` or `teacher.backbone_weights` for a `backbone`); kdray never
downloads it. Loading is strict (`load_segmenter_weights` / `load_backbone_weights`): a file that does not fit
`arch` exactly is refused with the keys that differ. `normalize` is the input normalisation the job must use
so the network sees what it was trained on, as `data.normalize` values (0..1 pixel scale, then
`(x - mean) / std` in `order`).

Where the numbers come from. CIRKD (github.com/winycg/CIRKD, dataset/cityscapes.py, voc.py, camvid.py, ade20k.py)
reads images with `cv2.imread` (BGR, 0..255) and computes `image - [104.00698793, 116.66876762, 122.67891434]`,
with no division by a std, for training and evaluation alike. On kdray's 0..1 scale that is mean = m / 255 and
std = 1 / 255 in BGR order. Its ResNet students are fine-tuned from the deep-stem ImageNet files under that
same input; those files come from CSAIL's semantic-segmentation-pytorch (sceneparsing.csail.mit.edu, model
`pretrained_resnet`), whose own ImageNet normalisation is not published with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

CIRKD_MEAN_BGR_255 = (104.00698793, 116.66876762, 122.67891434)


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    order: Literal["rgb", "bgr"]

    def as_job(self) -> dict[str, object]:
        """The `data.normalize` section to put in a job."""
        return {"mean": list(self.mean), "std": list(self.std), "order": self.order}

    def matches(self, mean: tuple[float, ...], std: tuple[float, ...], order: str, rel: float = 1e-4) -> bool:
        close = all(abs(a - b) <= rel * max(abs(a), abs(b), 1e-12) for a, b in zip((*self.mean, *self.std),
                                                                               (*mean, *std)))
        return close and order == self.order


CIRKD_INPUT = Normalization(tuple(m / 255 for m in CIRKD_MEAN_BGR_255), (1 / 255,) * 3, "bgr")  # type: ignore[arg-type]


@dataclass(frozen=True)
class PublicCheckpoint:
    file: str  # published file name
    kind: Literal["segmenter", "backbone"]  # which loader reads it, through which job key
    arch: str  # kdray arch of a segmenter; for a backbone, the backbone name (any `<head>_<backbone>` fits)
    num_classes: int | None  # segmenters only
    aux: bool  # whether the file carries the auxiliary FCN head (`auxlayer.*`)
    normalize: Normalization
    dataset: str | None
    source: str
    verified: bool  # its key/shape list is in tests/data/cirkd_keys and a fabricated copy loads in the tests
    note: str = ""


_CIRKD = "github.com/winycg/CIRKD README (Google Drive links), model code at commit 2d8ad0f"
PUBLIC_CHECKPOINTS: dict[str, PublicCheckpoint] = {c.file: c for c in (
    PublicCheckpoint("deeplabv3_resnet101_citys_best_model.pth", "segmenter", "deeplabv3_resnet101", 19, True,
                     CIRKD_INPUT, "cityscapes", _CIRKD, True, "the CIRKD teacher: 78.07 mIoU on Cityscapes val"),
    PublicCheckpoint("resnet18-imagenet.pth", "backbone", "resnet18", None, False, CIRKD_INPUT, None, _CIRKD, True,
                     "deep-stem ImageNet ResNet-18; the 1000-way fc is dropped on loading"),
    PublicCheckpoint("resnet101-imagenet.pth", "backbone", "resnet101", None, False, CIRKD_INPUT, None, _CIRKD, True,
                     "deep-stem ImageNet ResNet-101; the 1000-way fc is dropped on loading"),
    PublicCheckpoint("deeplabv3_resnet101_pascal_aug_best_model.pth", "segmenter", "deeplabv3_resnet101", 21, True,
                     CIRKD_INPUT, "voc", _CIRKD, False,
                     "the CIRKD VOC teacher (77.67 mIoU); no key list here, so whether it has the 2d8ad0f layout is "
                     "untested: strict loading will say"),
    PublicCheckpoint("deeplabv3_resnet101_camvid_best_model.pth", "segmenter", "deeplabv3_resnet101", 11, True,
                     CIRKD_INPUT, "camvid", _CIRKD, False,
                     "the CIRKD CamVid teacher (69.84 mIoU); no key list here, so whether it has the 2d8ad0f layout "
                     "is untested: strict loading will say"),
    PublicCheckpoint("deeplabv3_resnet101_ade20k_best_model.pth", "segmenter", "deeplabv3_resnet101", 150, True,
                     CIRKD_INPUT, "ade20k", "github.com/winycg/CIRKD README (Baidu Cloud link)", False,
                     "the CIRKD ADE20K teacher (42.70 mIoU); no key list here, so whether it has the 2d8ad0f layout "
                     "is untested: strict loading will say"),
)}


def find_public(path: str | Path | None) -> PublicCheckpoint | None:
    """The registry entry whose published file name is the name of `path`, if any."""
    return None if path is None else PUBLIC_CHECKPOINTS.get(Path(path).name)


def mismatches(key: str, path: str | Path | None, arch: str, num_classes: int, mean: tuple[float, ...],
               std: tuple[float, ...], order: str) -> list[str]:
    """Why the public file named by job key `key` does not suit this job (empty if it does or is not public)."""
    entry = find_public(path)
    if entry is None:
        return []
    problems = []
    if entry.kind == "segmenter":
        if arch != entry.arch:
            problems.append(f"{key}: {entry.file} is a {entry.arch}, the job's arch is {arch}")
        if num_classes != entry.num_classes:
            problems.append(f"{key}: {entry.file} has {entry.num_classes} classes, the job {num_classes}")
    elif not arch.endswith(f"_{entry.arch}"):
        problems.append(f"{key}: {entry.file} is a {entry.arch} backbone, the job's arch is {arch}")
    if not entry.normalize.matches(mean, std, order):
        n = entry.normalize
        problems.append(f"{key}: {entry.file} expects data.normalize order {n.order}, mean {_fmt(n.mean)}, std "
                        f"{_fmt(n.std)} (kdray/models/public.py); the job has order {order}, mean {_fmt(mean)}, "
                        f"std {_fmt(std)}")
    return problems


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.7g}" for v in values) + "]"
