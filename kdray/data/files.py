"""What the datasets read from disk share: (image, mask) file pairs, label decoding through a lookup table, and
the checks that stop a bad tree before training starts.

Each loader (cityscapes.py, voc.py, camvid.py, ade20k.py, folder.py) finds its pairs in its own layout and hands
them to `FileSegmentation`, which
- on construction reads a few masks spread over the split (`sample_check`), so a wrong tree fails in seconds;
- `check()` reads every mask (the `--check-data` scan): single channel, the same size as its image, and
  only values its `LabelCodec` knows; the first bad file stops it with a `DataError` naming file and value;
- on every item decodes the mask through the codec, refusing unknown values there too, so a bad file that the
  sample missed still fails with its name rather than as a crash inside the loss.

Files are read with PIL. For masks, `np.array(Image.open(p))` yields the raw ids of a grey PNG and the palette
indices of a palette PNG alike. (torchvision.io decodes images faster, but its decoders are deprecated since
torchvision 0.29.)

What a file may hold, and how it is read (the item, the sample check and `check()` share each rule):
- Every file, image or mask, is read upright, as image viewers show it: its EXIF orientation (2..8) is applied
  (the table of `PIL.ImageOps.exif_transpose`), and sizes come out of the header already oriented (5..8 swap
  height and width) without decoding the pixels. A phone photo stored sideways with Orientation 6 is thus read
  the way the annotator saw it when drawing its mask. A mask is oriented by its own tag, if it has one: a tool
  that copies the photo's EXIF into the mask also copies its stored pixel grid, so both agree when both are
  turned. In a PNG only an eXIf chunk before the pixel data counts (one after it would take a full decode to
  find, and the size checks read headers only). PIL turns TIFFs itself, so kdray leaves those to it.
- Images must have 8 bits per channel (`IMAGE_MODES`): converting a 16-bit or float image to RGB clamps every
  value above 255, so those are refused with a DataError rather than silently flattened.
- A mask must have one channel. 8-, 16- and 32-bit integer masks and float masks holding whole numbers decode
  alike; a fractional or NaN float value, or an id the codec does not know, is a DataError naming it.
- A lossy image (.jpg, .jpeg, .webp) or a MATLAB file (.mat) where a mask should be is named as such
  (`stand_in_error`) rather than reported as a missing mask.
- A DataError raised while a DataLoader worker process reads an item reaches the main process as kdray's one
  line (`WorkerDataError`), not as the worker's traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info
from torchvision import tv_tensors

from kdray.errors import DataError

# How many masks a normal start reads per split (first, middle, last); `--check-data` reads them all.
SAMPLE_MASKS = 3

Progress = Callable[[int, int], None]  # (masks checked so far, total)

# PIL modes with 8 bits per channel, which `convert("RGB")` keeps; it clamps 16-bit and float values to 255.
IMAGE_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr")
ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transpose that shows the stored pixels upright (PIL.ImageOps.exif_transpose's table).
# Applied here rather than through exif_transpose so that items and header checks act on the same tag
# (exif_transpose would also find a PNG's late eXIf chunk once decoded), and unturned images are not copied.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SWAPS_SIDES = (5, 6, 7, 8)
# Formats whose PIL reader applies the orientation itself: Pillow's TIFF reader reports the upright size at open
# and turns the pixels as it loads them, so turning them again would undo it.
_ORIENTED_BY_PIL = ("TIFF",)
# What PIL raises for a file it cannot read; the bomb error (a huge image) is none of the others.
_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)
# Files found where a mask should be that cannot be one: suffix -> what it is and what to do.
NOT_MASKS = {
    ".jpg": "lossy (it blurs the class ids along every edge), convert to PNG",
    ".jpeg": "lossy (it blurs the class ids along every edge), convert to PNG",
    ".webp": "usually lossy (it blurs the class ids along every edge), convert to PNG",
    ".mat": "a MATLAB file (SBD's .mat format): convert it to an index PNG",
}


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
        self.indices(raw, path)

    def decode(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """(H, W) int64 class ids (or the ignore value) of the raw mask `raw`, checked first."""
        return self.lut[self.indices(raw, path)]

    def indices(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """`raw` (H, W) of any integer or float dtype as an integer array to index the table with, every value
        checked; `check` and `decode` both go through here, so a mask that passes the scan also decodes.

        DataError naming `path` and the first bad value: more than one channel, a fractional or NaN float, a
        negative, too large or unknown id.
        """
        if raw.ndim != 2:
            raise DataError(f"{path}: a mask must be a single-channel image of label ids (grey or palette PNG); "
                            f"this one has shape {raw.shape}")
        if raw.dtype == np.uint8:  # the usual case: a histogram is much faster than np.unique
            present = np.bincount(raw.ravel(), minlength=256)
            self._refuse(np.flatnonzero((present > 0) & ~self.valid[:256]), path)
            return raw
        values = np.unique(raw)
        if raw.dtype.kind == "f":
            # nan != nan and round(inf) == inf, hence both tests
            fractional = values[~np.isfinite(values) | (values != np.round(values))]
            if fractional.size:
                raise DataError(f"{path}: mask value {float(fractional[0]):g} is not an integer class id: a float "
                                f"mask may hold only whole numbers, the {self.what}")
        # compared in the file's own dtype first, so that no cast can wrap a huge or negative value into range
        inside = (values >= 0) & (values < len(self.lut))
        self._refuse(values[~inside | ~self.valid[np.where(inside, values, 0).astype(np.int64)]], path)
        return raw.astype(np.int64) if raw.dtype.kind == "f" else raw

    def _refuse(self, bad: np.ndarray, path: Path) -> None:
        """DataError naming the first of the sorted raw values `bad`, if any."""
        if bad.size:
            more = f" ({bad.size} bad values in this file)" if bad.size > 1 else ""
            raise DataError(f"{path}: mask value {int(bad[0])} is not one of the {self.what}{more}")


class Sample(NamedTuple):
    image: Path
    mask: Path
    codec: LabelCodec


class ImageHeader(NamedTuple):
    size: tuple[int, int]  # (height, width) upright, as viewers show the image
    orientation: int  # the EXIF orientation applied to get there, 1 when none


class WorkerDataError(DataError):
    """A DataError raised while a DataLoader worker process reads an item.

    torch hands a worker's exception to the main process as `type(err)(text)`, text being the lines "Caught
    <type> in DataLoader worker process N.", "Original Traceback ..." and the worker's traceback, which ends in
    "<module>.<type>: <message>". This constructor keeps only <message>, so the user sees kdray's one line
    instead of the worker's traceback; a message of any other form is kept whole.
    """

    def __init__(self, message: str):
        super().__init__(_worker_message(message))


def _worker_message(text: str) -> str:
    if not text.startswith("Caught "):
        return text
    marker = f"\n{WorkerDataError.__module__}.{WorkerDataError.__qualname__}: "
    at = text.rfind(marker)
    return text[at + len(marker):].strip() if at >= 0 else text


def orientation(im: Image.Image) -> int:
    """The EXIF orientation 2..8 of an opened file, from its header alone; 1 when it has none (or a value outside
    1..8, which viewers ignore too). In a PNG only an eXIf chunk before the pixel data counts: asking PIL about
    one after it decodes the whole image, and the size checks must stay header reads."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    value = im.getexif().get(ORIENTATION)
    return value if value in _UPRIGHT else 1


def _to_turn(im: Image.Image, turn: int) -> int:
    """The part of orientation `turn` that kdray must still apply to `im` (1: none)."""
    return 1 if im.format in _ORIENTED_BY_PIL else turn


def _upright(im: Image.Image) -> Image.Image:
    method = _UPRIGHT.get(_to_turn(im, orientation(im)))
    return im if method is None else im.transpose(method)


def _check_image_mode(im: Image.Image, path: Path) -> None:
    if im.mode not in IMAGE_MODES:
        raise DataError(f"{path}: image mode {im.mode} is not 8 bits per channel (reading it as RGB would clamp "
                        f"every value above 255); convert the image to 8-bit RGB or grey, e.g. scaling 16-bit "
                        f"values by 255/65535; readable modes: {', '.join(IMAGE_MODES)}")


def read_mask(path: Path) -> np.ndarray:
    """The raw (H, W) label array of a mask file, upright (palette indices for a palette PNG; uint8, uint16,
    int32 or float32 by the file's mode). DataError when unreadable or not single-channel."""
    try:
        with Image.open(path) as im:
            if len(im.getbands()) != 1:
                raise DataError(f"{path}: a mask must be a single-channel image of label ids (grey or palette "
                                f"PNG); this one is {im.mode} with {len(im.getbands())} channels")
            raw = np.array(_upright(im))
    except _UNREADABLE as err:
        raise DataError(f"{path}: cannot read this mask: {err}") from None
    return raw.astype(np.uint8) if raw.dtype == bool else raw


def read_image(path: Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB, upright. DataError when unreadable or not 8 bits per channel."""
    try:
        with Image.open(path) as im:
            _check_image_mode(im, path)
            rgb = _upright(im)
            if rgb.mode != "RGB":  # convert() copies even when it has nothing to do
                rgb = rgb.convert("RGB")
            return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    except _UNREADABLE as err:
        raise DataError(f"{path}: cannot read this image: {err}") from None


def image_header(path: Path) -> ImageHeader:
    """The upright size and orientation from the file header, without decoding the pixels; DataError when
    unreadable or not 8 bits per channel, as `read_image` would raise."""
    try:
        with Image.open(path) as im:
            _check_image_mode(im, path)
            turn = orientation(im)
            w, h = im.size
            swap = _to_turn(im, turn) in _SWAPS_SIDES
    except _UNREADABLE as err:
        raise DataError(f"{path}: cannot read this image: {err}") from None
    return ImageHeader((w, h) if swap else (h, w), turn)


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) upright, from the file header."""
    return image_header(path).size


def size_mismatch(mask: Path, mask_size: tuple[int, ...], image: Path, header: ImageHeader) -> DataError:
    """The error for a mask of (H, W) `mask_size` whose image has another upright size; it names the EXIF
    orientation when the image has one, since the stored pixels then differ from what the file shows."""
    (mh, mw), (h, w) = mask_size[:2], header.size
    message = f"{mask}: mask is {mh}x{mw} but its image {image} is {h}x{w}"
    if header.orientation == 1:
        return DataError(message)
    stored = f"; stored {w}x{h}" if header.orientation in _SWAPS_SIDES else ""
    return DataError(f"{message} upright (its EXIF orientation {header.orientation} is applied{stored}): kdray "
                     f"reads images as viewers show them, so draw the mask on the image as shown")


def stand_in_error(expected: Sequence[Sequence[Path]], total: int) -> DataError | None:
    """For images without their mask, `expected` holding per image the paths its mask could have: the error
    naming the first lossy image or MATLAB file (`NOT_MASKS`) that has such a path's name with its own suffix,
    counting the images with one; None when there is none, and the caller reports the missing masks."""
    listings: dict[Path, dict[str, Path]] = {}  # each folder listed once, however many masks are missing
    found: list[tuple[Path, Path]] = []
    for paths in expected:
        for path in paths:
            if path.parent not in listings:
                listings[path.parent] = _stand_ins(path.parent)
            if path.stem in listings[path.parent]:
                found.append((listings[path.parent][path.stem], path))
                break
    if not found:
        return None
    stand_in, path = found[0]
    more = f" ({len(found)} of {total} images have such a file instead of their mask)" if len(found) > 1 else ""
    return DataError(f"{stand_in}: found a {stand_in.suffix} mask: {NOT_MASKS[stand_in.suffix.lower()]} "
                     f"(expected {path}){more}")


def _stand_ins(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in NOT_MASKS and p.is_file()}


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
        """DataError naming the file when the image or mask cannot be read, the sizes differ or a mask value is
        not a label; in a DataLoader worker process a `WorkerDataError`, so the main process gets one line."""
        try:
            return self._item(self.samples[index])
        except DataError as err:
            if get_worker_info() is None:
                raise
            raise WorkerDataError(str(err)) from None

    def _item(self, sample: Sample) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image = read_image(sample.image)
        raw = read_mask(sample.mask)
        if raw.shape[:2] != tuple(image.shape[-2:]):
            # the header is read again only here, to say whether an EXIF orientation is involved
            raise size_mismatch(sample.mask, raw.shape, sample.image, image_header(sample.image))
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
        """What `__getitem__` would refuse in sample `index`, reading the image's header only (its mode and
        upright size) and the mask whole."""
        sample = self.samples[index]
        raw = read_mask(sample.mask)
        sample.codec.check(raw, sample.mask)
        header = image_header(sample.image)
        if raw.shape != header.size:
            raise size_mismatch(sample.mask, raw.shape, sample.image, header)
