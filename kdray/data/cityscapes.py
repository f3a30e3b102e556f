"""Cityscapes, fine annotations, 19 classes (2975 train, 500 val images of 1024x2048).

    <root>/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (if the user generated them)
    <root>/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Per image, the `labelTrainIds` file is read when it exists (values 0..18, 255), else the `labelIds` file
(values 0..33) is mapped to train ids here with the official table (cityscapesScripts `labels.py`); every
other id is ignored. Test labels are not public, so the splits are train and val; `CityscapesImages` reads a
split's images alone (the test split's, to predict them for the benchmark server: `kdray.engine.export`). A lossy
.jpg (or a .mat) with a label file's name in its place is named as such.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision import tv_tensors

from kdray.data.files import (
    SAMPLE_MASKS,
    FileSegmentation,
    LabelCodec,
    Sample,
    existing_dir,
    existing_root,
    read_image,
    stand_in_error,
    unpaired,
)
from kdray.data.registry import register_dataset
from kdray.errors import DataError

CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic_light", "traffic_sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# The official colour of each train id (cityscapesScripts, helpers/labels.py, the `color` of the label with that
# trainId), as the benchmark and the papers' figures draw them.
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# labelId -> trainId for the 19 evaluated classes; the other ids 0..33 (void, ground, parking, rail track,
# guard rail, bridge, tunnel, polegroup, caravan, trailer, ...) are ignored.
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                     26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# trainId -> labelId, its inverse: what a prediction for the benchmark server holds (cityscapesScripts scores labelIds)
TRAIN_TO_LABEL_ID = {train: label for label, train in LABEL_TO_TRAIN_ID.items()}
NUM_LABEL_IDS = 34
_IMAGE_END, _TRAIN_IDS_END, _IDS_END = "_leftImg8bit.png", "_gtFine_labelTrainIds.png", "_gtFine_labelIds.png"
LAYOUT = "leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_labelIds.png"


# Test labels are not public, so only train and val can be trained or evaluated on.
@register_dataset("cityscapes", class_names=CLASS_NAMES, splits=("train", "val"), paper_splits=("train", "val"),
                  void=255, label_map=LABEL_TO_TRAIN_ID, image_size=(1024, 2048), palette=PALETTE)
class Cityscapes(FileSegmentation):
    dataset = "cityscapes"

    def __init__(self, root: str | Path, split: str = "train", ignore_index: int = 255,
                 sample_check: int = SAMPLE_MASKS):
        root = existing_root(root, self.dataset, LAYOUT)
        image_dir = existing_dir(root / "leftImg8bit" / split, f"the Cityscapes {split} images")
        label_dir = existing_dir(root / "gtFine" / split, f"the Cityscapes {split} labels")
        images = sorted(image_dir.glob(f"*/*{_IMAGE_END}"))
        if not images:
            raise DataError(f"{image_dir}: no <city>/*{_IMAGE_END} images: the Cityscapes {split} split is empty")
        train_ids = LabelCodec.class_ids(len(CLASS_NAMES), 255, ignore_index, "Cityscapes labelTrainIds (0..18, 255)")
        label_ids = LabelCodec({i: LABEL_TO_TRAIN_ID.get(i, ignore_index) for i in range(NUM_LABEL_IDS)},
                               f"Cityscapes labelIds (0..{NUM_LABEL_IDS - 1})")

        labels = {p for p in label_dir.glob("*/*_gtFine_label*Ids.png") if p.name.endswith((_TRAIN_IDS_END, _IDS_END))}
        samples, missing, bases = [], [], set()
        for image in images:
            base = _image_base(image)
            bases.add(base)
            preferred, fallback = _label(label_dir, base, _TRAIN_IDS_END), _label(label_dir, base, _IDS_END)
            if preferred in labels:
                samples.append(Sample(image, preferred, train_ids))
            elif fallback in labels:
                samples.append(Sample(image, fallback, label_ids))
            else:
                missing.append(image)
        if missing:
            places = [(_label(label_dir, _image_base(p), _IDS_END), _label(label_dir, _image_base(p), _TRAIN_IDS_END))
                      for p in missing]
            stand_in = stand_in_error(places, len(images))  # a lossy or .mat file where the label should be
            if stand_in is not None:
                raise stand_in

            def expected_label(p: Path) -> str:
                return f"{_label(label_dir, _image_base(p), _IDS_END)} or its {_TRAIN_IDS_END[1:]}"

            raise unpaired(missing, len(images), "image", "label file", expected_label)
        orphans = sorted(p for p in labels if (p.parent.name, _base(p)) not in bases)
        if orphans:
            raise unpaired(orphans, len(labels), "label file", "image",
                           lambda p: str(image_dir / p.parent.name / f"{_base(p)}{_IMAGE_END}"))
        super().__init__(samples, split, CLASS_NAMES, ignore_index, sample_check)


def _label(label_dir: Path, base: tuple[str, str], ending: str) -> Path:
    city, stem = base
    return label_dir / city / f"{stem}{ending}"


def _image_base(image: Path) -> tuple[str, str]:
    """(city, stem) of a `*_leftImg8bit.png` image, the key its label files share."""
    return image.parent.name, image.name[: -len(_IMAGE_END)]


def _base(label: Path) -> str:
    ending = _TRAIN_IDS_END if label.name.endswith(_TRAIN_IDS_END) else _IDS_END
    return label.name[: -len(ending)]


class CityscapesImages(Dataset):
    """The images of one split without labels: the test split, whose labels are not public, or any other split
    whose predictions are wanted. Items are `(transform(image), index)`, the image a `tv_tensors.Image` uint8
    (3, H, W) (`transform` defaults to none); `paths[index]` is its file, `<root>/leftImg8bit/<split>/<city>/
    <city>_<seq>_<frame>_leftImg8bit.png`, sorted. DataError when the root or the split's folder is missing or
    holds no such image."""

    def __init__(self, root: str | Path | None, split: str = "test",
                 transform: Callable[[tv_tensors.Image], Any] | None = None):
        root = existing_root(root, "cityscapes", f"leftImg8bit/{split}/<city>/*{_IMAGE_END}")
        image_dir = existing_dir(root / "leftImg8bit" / split, f"the Cityscapes {split} images")
        self.paths = sorted(image_dir.glob(f"*/*{_IMAGE_END}"))
        if not self.paths:
            raise DataError(f"{image_dir}: no <city>/*{_IMAGE_END} images: the Cityscapes {split} split is empty")
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = tv_tensors.Image(read_image(self.paths[index]))
        return (image if self.transform is None else self.transform(image)), index
