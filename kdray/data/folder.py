"""A user's own data: one folder per split, images and masks paired by file stem.

    <root>/<split>/images/<stem>.{jpg,jpeg,png,webp,bmp,tif,tiff}
    <root>/<split>/masks/<stem>.{png,bmp,tif,tiff}

A mask is a single-channel (grey or palette) image of the same size as its image, holding class ids
0..K-1, where K is the number of names in `data.folder.class_names`, and `data.ignore_index` (usually 255)
for pixels that count nowhere. Lossless formats only: JPEG would blur the ids, so a masks/<stem>.jpg (.jpeg,
.webp, or a MATLAB .mat) in place of an image's mask is named as such. Images and masks are read as viewers
show them (EXIF orientation applied; see files.py). The job names the splits (`data.train_split`,
`data.val_split`; train and val unless set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kdray.config.options import require
from kdray.data.files import (
    SAMPLE_MASKS,
    FileSegmentation,
    LabelCodec,
    Sample,
    existing_dir,
    existing_root,
    pair_by_key,
    ranges,
    stand_in_error,
)
from kdray.data.registry import DatasetRequest, register_dataset
from kdray.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
LAYOUT = "<split>/images/ and <split>/masks/ with matching file stems"


@dataclass
class FolderOptions:
    """The `data.folder` section; only read when `data.dataset` is folder."""

    class_names: tuple[str, ...] | None = None  # one name per class id, in id order; sets K = data.num_classes

    def check(self, prefix: str) -> None:
        names = self.class_names
        shown = list(names) if names is not None else None
        require(names is not None and len(names) >= 2, f"{prefix}.class_names", shown,
                "the folder dataset needs one name per class id, in id order (at least 2)")
        require(len(set(names)) == len(names) and all(n.strip() for n in names), f"{prefix}.class_names", shown,
                "names must be non-empty and distinct")


def _build(request: DatasetRequest) -> FolderSegmentation:
    return FolderSegmentation(request.root, request.split, request.options.class_names or (), request.ignore_index,
                              request.sample_check)


# Any <root>/<split> folder is a split; images may be of any size. The masks hold data.ignore_index itself.
@register_dataset("folder", class_names="class_names", paper_splits=("train", "val"), options=FolderOptions,
                  build=_build)
class FolderSegmentation(FileSegmentation):
    dataset = "folder"

    def __init__(self, root: str | Path, split: str, class_names: Sequence[str], ignore_index: int = 255,
                 sample_check: int = SAMPLE_MASKS):
        root = existing_root(root, self.dataset, LAYOUT)
        image_dir = existing_dir(root / split / "images", f"the {split} images")
        mask_dir = existing_dir(root / split / "masks", f"the {split} masks")
        images = _by_stem(image_dir, IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}): the {split} split is empty")
        masks = _by_stem(mask_dir, MASK_SUFFIXES)
        missing = [(mask_dir / f"{stem}.png",) for stem in images if stem not in masks]
        if missing and (stand_in := stand_in_error(missing, len(images))):
            raise stand_in
        pairs = pair_by_key(images, masks, "mask", lambda p: f"{mask_dir / p.stem}.png",
                            lambda p: f"{image_dir / p.stem}.<jpg|png|...>")
        void = ignore_index if ignore_index >= 0 else None
        values = [*range(len(class_names)), *([void] if void is not None else [])]
        codec = LabelCodec.class_ids(len(class_names), void, ignore_index,
                                     f"class ids and ignore value ({ranges(values)})")
        samples = [Sample(image, mask, codec) for image, mask in pairs]
        super().__init__(samples, split, class_names, ignore_index, sample_check)


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            raise DataError(f"{path}: {found[path.stem].name} has the same stem; each stem must name one file")
        found[path.stem] = path
    return found
