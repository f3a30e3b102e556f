"""CamVid in the SegNet version: 11 classes, 360x480 images (367 train, 101 val, 233 test).

    <root>/{train,val,test}/<seq>_<frame>.png            e.g. 0001TP_006690.png
    <root>/{trainannot,valannot,testannot}/<seq>_<frame>.png

An annotation has the image's file name in the split's `annot` folder and holds indices 0..10 (the classes
below) or 11 (void, read as the ignore value); a lossy .jpg or a .mat file in an annotation's place is named
as such. `trainval` is train and val together. The papers train on train and report the test split.
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
    pair_by_key,
    stand_in_error,
)
from kdray.data.registry import register_dataset
from kdray.errors import DataError

CLASS_NAMES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian",
               "bicyclist")
# SegNet's colours of the 11 classes (alexgkendall/SegNet-Tutorial, Scripts/test_segmentation_camvid.py), in the
# order above; its void ("Unlabelled") is black, as kdray draws ignored pixels.
PALETTE = ((128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
           (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
VOID = 11
LAYOUT = "train/, trainannot/, val/, valannot/, test/ and testannot/"


# The papers report CamVid on its test split.
@register_dataset("camvid", class_names=CLASS_NAMES, splits=("train", "val", "test", "trainval"),
                  paper_splits=("train", "test"), void=VOID, image_size=(360, 480), palette=PALETTE)
class CamVid(FileSegmentation):
    dataset = "camvid"

    def __init__(self, root: str | Path, split: str = "train", ignore_index: int = 255,
                 sample_check: int = SAMPLE_MASKS):
        root = existing_root(root, self.dataset, LAYOUT)
        codec = LabelCodec.class_ids(len(CLASS_NAMES), VOID, ignore_index, f"CamVid labels (0..{VOID}, {VOID} = void)")
        samples = []
        for part in ("train", "val") if split == "trainval" else (split,):
            image_dir = existing_dir(root / part, f"the CamVid {part} images")
            mask_dir = existing_dir(root / f"{part}annot", f"the CamVid {part} labels")
            images = {p.name: p for p in image_dir.glob("*.png")}
            if not images:
                raise DataError(f"{image_dir}: no *.png images: the CamVid {part} split is empty")
            masks = {p.name: p for p in mask_dir.glob("*.png")}
            missing = [(mask_dir / name,) for name in images if name not in masks]
            if missing and (stand_in := stand_in_error(missing, len(images))):
                raise stand_in
            pairs = pair_by_key(images, masks, "label", lambda p, d=mask_dir: str(d / p.name),
                                lambda p, d=image_dir: str(d / p.name))
            samples += [Sample(image, mask, codec) for image, mask in pairs]
        super().__init__(samples, split, CLASS_NAMES, ignore_index, sample_check)
