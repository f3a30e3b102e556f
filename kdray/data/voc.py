"""Pascal VOC 2012 with the SBD augmentation, 21 classes with background (10582 train_aug, 1449 val images).

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClassAug/<id>.png       grey index PNGs (SBD + VOC), for the *_aug splits
    <root>/SegmentationClass/<id>.png          palette PNGs, the original VOC labels, for every other split
    <root>/ImageSets/Segmentation/<split>.txt  one id per line (train_aug.txt, val.txt, train.txt, trainval.txt)

A split is the list file of its name. Lines may also be `"/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"`
(the form some train_aug.txt copies use): the first word's stem is the id. Labels are read as indices with PIL,
which serves grey and palette PNGs alike; 255 marks object boundaries and is ignored. SBD ships its labels as
MATLAB files (cls/<id>.mat); one of those (or a lossy .jpg) in place of a label PNG is named as such.
"""

from __future__ import annotations

from pathlib import Path

from kdray.data.files import (
    SAMPLE_MASKS,
    FileSegmentation,
    LabelCodec,
    Sample,
    existing_dir,
    existing_root,
    stand_in_error,
    unpaired,
)
from kdray.data.registry import register_dataset
from kdray.errors import DataError

CLASS_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_colour(index: int) -> tuple[int, int, int]:
    """The colour of class `index` in the PASCAL VOC devkit's palette (VOCdevkit `VOClabelcolormap.m`, the colour
    table of the label PNGs): bits 0, 1, 2 of the index go to the top bit of r, g, b, bits 3, 4, 5 to the next
    bit down, and so on: 0 -> (0, 0, 0), 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0), 15 -> (192, 128,
    128)."""
    r = g = b = 0
    for shift in range(8):
        r |= ((index >> (3 * shift)) & 1) << (7 - shift)
        g |= ((index >> (3 * shift + 1)) & 1) << (7 - shift)
        b |= ((index >> (3 * shift + 2)) & 1) << (7 - shift)
    return r, g, b


PALETTE = tuple(voc_colour(k) for k in range(len(CLASS_NAMES)))  # background is black, as in the devkit
LAYOUT = "JPEGImages/, SegmentationClassAug/, SegmentationClass/ and ImageSets/Segmentation/<split>.txt"


def mask_folder(split: str) -> str:
    """SBD's index PNGs for the augmented splits, the original palette PNGs otherwise."""
    return "SegmentationClassAug" if split.endswith("_aug") else "SegmentationClass"


# Any ImageSets/Segmentation/<split>.txt is a split. VOC images are at most 500x500 and differ in size, so they
# are evaluated one at a time.
@register_dataset("voc", class_names=CLASS_NAMES, paper_splits=("train_aug", "val"), void=255,
                  image_size=(500, 500), eval_batch_one=True, palette=PALETTE)
class VOCAug(FileSegmentation):
    dataset = "voc"

    def __init__(self, root: str | Path, split: str = "train_aug", ignore_index: int = 255,
                 sample_check: int = SAMPLE_MASKS):
        root = existing_root(root, self.dataset, LAYOUT)
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise DataError(f"{list_file}: no such file; the VOC {split} split is the list of its image ids")
        ids = [Path(line.split()[0]).stem for line in list_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"{list_file}: lists no image ids: the VOC {split} split is empty")
        image_dir = existing_dir(root / "JPEGImages", "the VOC images")
        mask_dir = existing_dir(root / mask_folder(split), f"the VOC labels of the {split} split")
        images = {p.stem for p in image_dir.glob("*.jpg")}
        masks = {p.stem for p in mask_dir.glob("*.png")}

        without_image = [image_dir / f"{i}.jpg" for i in ids if i not in images]
        if without_image:
            raise DataError(f"{without_image[0]}: no such image, but {list_file} lists it; "
                            f"{len(without_image)} of {len(ids)} listed ids have no image")
        without_mask = [image_dir / f"{i}.jpg" for i in ids if i not in masks]
        if without_mask and (stand_in := stand_in_error([(mask_dir / f"{p.stem}.png",) for p in without_mask],
                                                        len(ids))):
            raise stand_in
        if without_mask:
            raise unpaired(without_mask, len(ids), "image", "label",
                           lambda p: str(mask_dir / f"{p.stem}.png"))
        codec = LabelCodec.class_ids(len(CLASS_NAMES), 255, ignore_index, "VOC labels (0..20, 255)")
        samples = [Sample(image_dir / f"{i}.jpg", mask_dir / f"{i}.png", codec) for i in ids]
        super().__init__(samples, split, CLASS_NAMES, ignore_index, sample_check)
