"""What the datasets read from disk share: (image, mask) file pairs, label decoding through a lookup table, and
the checks that stop a bad tree before training starts.

Each loader (cityscapes.py, voc.py, camvid.py, folder.py) finds its pairs in its own layout and hands them to
`FileSegmentation`, which
- on construction reads a few masks spread over the split (`sample_check`), so a wrong tree fails in seconds;
- `check()` reads every mask (the `--check-data` scan): single channel, the same size as its image, and
  only values its `LabelCodec` knows; the first bad file stops it with a `DataError` naming file and value;
- on every item decodes the mask through the codec, refusing unknown values there too, so a bad file that the
  sample missed still fails with its name rather than as a crash inside the loss.

Files are read with PIL. For masks, `np.array(Image.open(p))` yields the raw ids of a grey PNG and the palette
indices of a palette PNG alike. (torchvision.io decodes images faster, but its decoders are deprecated since
torchvision 0.29.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from kdray.errors import DataError

# How many masks a normal start reads per split (first, middle, last); `--check-data` reads them all.
SAMPLE_MASKS = 3

Progress = Callable[[int, int], None]  # (masks checked so far, total)


class LabelCodec:
    """Raw mask values to class ids through a lookup table; a value outside the table is an error.

    mapping: raw value -> class id (or the ignore value) for every raw value a valid mask may hold.
    what: the valid raw values in words, for error messages, e.g. "Cityscapes labelIds 0..33".
    """

    def __init__(self, mapping: dict[int, int], what: str):
        size = max(256, max(mapping) + 1)
        self.lut = np.zeros(size, np.int64)
        self.valid = np.zeros(size, bool)
        for raw, cls in mapping.items():
            self.lut[raw], self.valid[raw] = cls, True
        self.what = what

    @classmethod
    def class_ids(cls, num_classes: int, void: int | None, ignore_index: int, what: str) -> LabelCodec:
        """Masks that hold the class ids 0..K-1 themselves, plus one `void` raw value read as `ignore_index`
        (none when `void` is None)."""
        mapping = {k: k for k in range(num_classes)}
        if void is not None:
            mapping[void] = ignore_index
        return cls(mapping, what)

    def check(self, raw: np.ndarray, path: Path) -> None:
        """DataError naming `path` and the first value of `raw` (H, W) that is not a valid label."""
        if raw.ndim != 2:
            raise DataError(f"{path}: a mask must be a single-channel image of label ids (grey or palette PNG); "
                            f"this one has shape {raw.shape}")
        if raw.dtype == np.uint8:  # the usual case: a histogram is much faster than np.unique
            present = np.bincount(raw.ravel(), minlength=256)
            bad = np.flatnonzero((present > 0) & ~self.valid[:256])
        else:
            values = np.unique(raw).astype(np.int64)
            inside = (values >= 0) & (values < len(self.lut))
            bad = values[~inside | ~self.valid[np.where(inside, values, 0)]]
        if bad.size:
            more = f" ({bad.size} bad values in this file)" if bad.size > 1 else ""
            raise DataError(f"{path}: mask value {int(bad[0])} is not one of the {self.what}{more}")

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """(H, W) int64 class ids (or the ignore value) of the raw mask `raw`, checked first."""
        self.check(raw, path)
        return self.lut[raw]


class Sample(NamedTuple):
    image: Path
    mask: Path
    codec: LabelCodec


def read_mask(path: Path) -> np.ndarray:
    """The raw label array of a mask file (palette indices for a palette PNG)."""
    try:
        with Image.open(path) as im:
            raw = np.array(im)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read this mask: {err}") from None
    return raw.astype(np.uint8) if raw.dtype == bool else raw


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB."""
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read this image: {err}") from None


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read this image: {err}") from None
    return h, w


def ranges(values: Iterable[int]) -> str:
    """`[0, 1, 2, 3, 255]` -> `"0..3, 255"`."""
    out: list[str] = []
    run: list[int] = []
    for v in sorted(set(values)):
        if run and v != run[-1] + 1:
            out.append(f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(v)
    if run:
        out.append(f"{run[0]}..{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def existing_root(root: str | Path | None, dataset: str, layout: str) -> Path:
    """`root` as a Path, or a DataError saying what was expected there."""
    if root is None:
        raise DataError(f"data.root: not set; the {dataset} dataset needs the directory holding {layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data.root: {path} does not exist or is not a directory; the {dataset} dataset expects "
                        f"{layout} there (see the README section on real datasets)")
    return path


def existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: no such directory ({what})")
    return path


def unpaired(orphans: Sequence[Path], total: int, kind: str, partner: str, expected: Callable[[Path], str]
             ) -> DataError:
    """The error for files of one `kind` without their `partner`: names the first and counts them all."""
    first = orphans[0]
    return DataError(f"{first}: this {kind} has no {partner} (expected {expected(first)}); "
                     f"{len(orphans)} of {total} {kind}s have none")


def pair_by_key(images: dict[Any, Path], masks: dict[Any, Path], mask_kind: str,
                expected_mask: Callable[[Path], str], expected_image: Callable[[Path], str]) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of the files that share a key (a name or a stem), in key order; a DataError for an
    image without its mask or a mask without its image (`mask_kind` names masks in it: "label", "mask")."""
    missing = [p for key, p in sorted(images.items()) if key not in masks]
    if missing:
        raise unpaired(missing, len(images), "image", mask_kind, expected_mask)
    orphans = [p for key, p in sorted(masks.items()) if key not in images]
    if orphans:
        raise unpaired(orphans, len(masks), mask_kind, "image", expected_image)
    return [(images[key], masks[key]) for key in sorted(images)]


def spread(n: int, k: int) -> list[int]:
    """Up to `k` indices spread evenly over 0..n-1, first and last included."""
    k = min(k, n)
    if k <= 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


class FileSegmentation(Dataset):
    """Items are `(image, mask)`: `tv_tensors.Image` uint8 (3, H, W) and `tv_tensors.Mask` int64 (H, W)
    holding class ids 0..K-1 and `ignore_index`.

    samples: the split's file pairs, each with the codec of its mask format (sorted, so the order is stable).
    sample_check: how many masks to check now (spread over the split); 0 checks none.
    """

    dataset = "files"  # the name errors and plans use

    def __init__(self, samples: list[Sample], split: str, class_names: Sequence[str], ignore_index: int,
                 sample_check: int = SAMPLE_MASKS):
        self.samples, self.split = samples, split
        self.class_names = tuple(class_names)
        self.ignore_index = ignore_index
        self.check(spread(len(samples), sample_check))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        sample = self.samples[index]
        image = read_image(sample.image)
        raw = read_mask(sample.mask)
        if raw.shape[:2] != tuple(image.shape[-2:]):
            raise DataError(f"{sample.mask}: mask is {raw.shape[0]}x{raw.shape[1]} but its image {sample.image} "
                            f"is {image.shape[-2]}x{image.shape[-1]}")
        mask = sample.codec.decode(raw, sample.mask)
        return tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(mask))

    def check(self, indices: Iterable[int] | None = None, progress: Progress | None = None,
              workers: int = 1) -> int:
        """Check the masks at `indices` (default: all) against their codec and their image's size.

        `progress(done, total)` is called after each mask; `workers` threads read in parallel (PIL decodes
        without holding the GIL). Returns the number checked; raises DataError at the first bad file.
        """
        chosen = list(range(len(self.samples)) if indices is None else indices)
        if workers > 1 and len(chosen) > 1:
            with ThreadPoolExecutor(workers) as pool:
                for done, _ in enumerate(pool.map(self._check_one, chosen), start=1):
                    if progress is not None:
                        progress(done, len(chosen))
        else:
            for done, index in enumerate(chosen, start=1):
                self._check_one(index)
                if progress is not None:
                    progress(done, len(chosen))
        return len(chosen)

    def _check_one(self, index: int) -> None:
        sample = self.samples[index]
        raw = read_mask(sample.mask)
        sample.codec.check(raw, sample.mask)
        size = image_size(sample.image)
        if raw.shape != size:
            raise DataError(f"{sample.mask}: mask is {raw.shape[0]}x{raw.shape[1]} but its image {sample.image} "
                            f"is {size[0]}x{size[1]}")
