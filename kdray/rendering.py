"""Pictures of predictions: which val images a job previews, how a row of them is drawn, and the file that keeps the
best evaluation's predictions for the report. Plain numpy and PIL (no torch, no MLflow), so that the engine, which
renders at each evaluation, and the report, which composes a sweep's figure from the kept files, share it.

    preview_indices(len(val), 4)        -> the job's preview items, e.g. [17, 90, 141, 230]: fixed per job
    render_predictions(images, labels, student, teacher, palette, ignore_index, titled=True)
                                        -> uint8 (H, W, 3), a row per image: image | truth | student | teacher | errors,
                                           under a strip naming the columns
    write_predictions / read_predictions  <output_dir>/best_predictions.npz (kdray.contract.BEST_PREDICTIONS_FILE)

Colours: a class id k is drawn in `palette[k]` (the dataset's, `kdray.data.class_palette`); a pixel of no class
(the ignore value, or any id outside 0..K-1) is black (`IGNORE_COLOUR`). The error map is black where the student
is right, red where it is wrong, and grey where the ground truth is the ignore value (nothing to be wrong about).
Every panel of a row has the size its image is displayed at (`display_size`): wider than MAX_PANEL_WIDTH pixels is
shrunk to it, narrower than MIN_PANEL_WIDTH is enlarged by a whole factor (nearest neighbour), so that the 64x64
demo images stay visible and a 1024x2048 Cityscapes row is 512 pixels a panel, not 2048.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PREVIEW_SEED = 21  # which val items a job previews: fixed, so every run and seed of a job shows the same images
MAX_PANEL_WIDTH = 512  # pixels: wider images are shrunk to this for display
MIN_PANEL_WIDTH = 128  # pixels: narrower images are enlarged by the largest whole factor that stays within it
GAP = 4  # pixels of background between panels and between rows
BACKGROUND = (255, 255, 255)  # the gaps, and the right of a row narrower than the widest
IGNORE_COLOUR = (0, 0, 0)  # ground-truth pixels of no class (the ignore value)
CORRECT_COLOUR, WRONG_COLOUR, UNJUDGED_COLOUR = (0, 0, 0), (255, 0, 0), (128, 128, 128)  # the error map
FORMAT_VERSION = 1  # of the predictions file
TITLE_HEIGHT = 20  # pixels: the strip above the first row that names the columns (`titled`)
TITLE_COLOUR = (0, 0, 0)


def preview_indices(length: int, count: int, seed: int = PREVIEW_SEED) -> list[int]:
    """`min(count, length)` distinct item indices of a split of `length` items, increasing: a uniform draw without
    replacement by numpy's PCG64 generator seeded with `seed`. It depends on nothing but its arguments, so the
    runs of one job (whatever their run.seed) preview the same items. ValueError for a negative length or count."""
    if length < 0 or count < 0:
        raise ValueError(f"preview_indices: length {length} and count {count} must be >= 0")
    chosen = np.random.default_rng(seed).choice(length, size=min(count, length), replace=False)
    return sorted(int(i) for i in chosen)


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float], order: str = "rgb") -> np.ndarray:
    """The displayable uint8 RGB (H, W, 3) image of a normalised float (3, H, W) one: `x * std + mean` per channel
    (in the model's channel order, as data.normalize states it), channels reversed when `order` is "bgr", then
    `round(255 * clip(x, 0, 1))`. It inverts `kdray.data.transforms.eval_transforms` up to float rounding."""
    x = np.asarray(image, np.float64) * np.asarray(std, np.float64)[:, None, None]
    x = x + np.asarray(mean, np.float64)[:, None, None]
    if order == "bgr":
        x = x[::-1]
    return np.round(255 * np.clip(x, 0.0, 1.0)).astype(np.uint8).transpose(1, 2, 0)


def display_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) a panel of an image of that size is drawn at: shrunk to MAX_PANEL_WIDTH wide (the height
    scaled alike, rounded, at least 1) when wider; enlarged by f = MIN_PANEL_WIDTH // width when narrower than
    MIN_PANEL_WIDTH (f >= 2 only below half of it); else unchanged. Applying it to its own result changes nothing."""
    if width > MAX_PANEL_WIDTH:
        return max(1, round(height * MAX_PANEL_WIDTH / width)), MAX_PANEL_WIDTH
    factor = max(1, MIN_PANEL_WIDTH // max(width, 1))
    return height * factor, width * factor


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) resized to `size` (h, w): box filter (the mean of the pixels each covers) when shrinking,
    nearest neighbour when enlarging (whole factors: each pixel becomes a block); unchanged at its own size."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    shrinking = size[1] < image.shape[1]
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), resample))


def resize_labels(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) map of class ids resized to `size` (h, w) by nearest neighbour: output pixel (i, j) takes input
    pixel (floor((i + 0.5) * H / h), floor((j + 0.5) * W / w)), so ids are never blended."""
    height, width = ids.shape
    if (height, width) == tuple(size):
        return ids
    rows = np.minimum(((np.arange(size[0]) + 0.5) * height / size[0]).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * width / size[1]).astype(np.int64), width - 1)
    return ids[rows[:, None], cols[None, :]]


def colorize(ids: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """uint8 (H, W, 3): each pixel of an (H, W) class-id map in `palette[id]`; ids outside 0..K-1 (the ignore value)
    in IGNORE_COLOUR, K = len(palette)."""
    colours = np.asarray(palette, np.uint8).reshape(-1, 3)
    ids = np.asarray(ids)
    known = (ids >= 0) & (ids < len(colours))
    out = np.empty((*ids.shape, 3), np.uint8)
    out[...] = IGNORE_COLOUR
    out[known] = colours[ids[known]]
    return out


def error_map(prediction: np.ndarray, label: np.ndarray, ignore_index: int) -> np.ndarray:
    """uint8 (H, W, 3): WRONG_COLOUR where `prediction` differs from `label`, CORRECT_COLOUR where it agrees, and
    UNJUDGED_COLOUR where `label` is `ignore_index`. Both maps are (H, W) class ids of the same size."""
    prediction, label = np.asarray(prediction), np.asarray(label)
    if prediction.shape != label.shape:
        raise ValueError(f"error_map: prediction {prediction.shape} and label {label.shape} differ in size")
    out = np.empty((*label.shape, 3), np.uint8)
    out[...] = CORRECT_COLOUR
    out[prediction != label] = WRONG_COLOUR
    out[label == ignore_index] = UNJUDGED_COLOUR
    return out


def stack(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """uint8 (H_total, W_total, 3): each row's panels side by side and the rows one below the other, GAP pixels of
    BACKGROUND between panels and between rows; a row narrower than the widest is padded on its right. A panel is
    (h, w, 3) uint8; the panels of a row share their height."""
    lines = []
    for panels in rows:
        heights = {p.shape[0] for p in panels}
        if len(heights) != 1:
            raise ValueError(f"stack: the panels of a row differ in height: {sorted(heights)}")
        gap = np.empty((heights.pop(), GAP, 3), np.uint8)
        gap[...] = BACKGROUND
        parts = [part for panel in panels for part in (panel, gap)][:-1]
        lines.append(np.concatenate(parts, axis=1))
    width = max(line.shape[1] for line in lines)
    out = []
    for line in lines:
        padded = np.empty((line.shape[0] + GAP, width, 3), np.uint8)
        padded[...] = BACKGROUND
        padded[:line.shape[0], :line.shape[1]] = line
        out.append(padded)
    return np.concatenate(out, axis=0)[:-GAP]


def render_predictions(images: Sequence[np.ndarray], labels: Sequence[np.ndarray], student: Sequence[np.ndarray],
                       teacher: Sequence[np.ndarray] | None, palette: Sequence[Sequence[int]],
                       ignore_index: int, *, titled: bool = False) -> np.ndarray:
    """One row per image: image | ground truth | student | teacher | error map, uint8 (H_total, W_total, 3) RGB.
    With `titled`, a TITLE_HEIGHT strip above the rows names each column over the first row's panels (`titled_columns`):
    the picture then explains itself where it is shown alone (the MLflow UI).

    images: uint8 (H_i, W_i, 3) RGB (`denormalize`); labels: (H_i, W_i) class ids with `ignore_index`; student and
    teacher: (H_i, W_i) predicted class ids (argmax of the logits at the label's size). `teacher` None (a run without
    a teacher): no teacher column. Each row is drawn at `display_size(H_i, W_i)` (`resize_image`, `resize_labels`),
    panels and rows GAP pixels apart (`stack`). The error map is the student's (`error_map`). ValueError when the
    lists differ in length or a map is not its image's size.
    """
    count = len(images)
    if not (len(labels) == len(student) == count and (teacher is None or len(teacher) == count)) or not count:
        raise ValueError(f"render_predictions: {count} images, {len(labels)} labels, {len(student)} student and "
                         f"{'no' if teacher is None else len(teacher)} teacher predictions (one each, at least one)")
    rows = []
    for i in range(count):
        image = np.asarray(images[i], np.uint8)
        maps = [np.asarray(labels[i]), np.asarray(student[i])]
        maps += [np.asarray(teacher[i])] if teacher is not None else []
        if any(m.shape != image.shape[:2] for m in maps):
            raise ValueError(f"render_predictions: image {i} is {image.shape[:2]}, its maps "
                             f"{[m.shape for m in maps]}")
        size = display_size(*image.shape[:2])
        label, prediction, *rest = (resize_labels(m, size) for m in maps)
        panels = [resize_image(image, size), colorize(label, palette), colorize(prediction, palette)]
        panels += [colorize(rest[0], palette)] if rest else []
        panels.append(error_map(prediction, label, ignore_index))
        rows.append(panels)
    picture = stack(rows)
    if not titled:
        return picture
    names = ["image", "ground truth", "student", *(["teacher"] if teacher is not None else []), "errors (red)"]
    return titled_columns(picture, names, [panel.shape[1] for panel in rows[0]])


def titled_columns(picture: np.ndarray, names: Sequence[str], widths: Sequence[int]) -> np.ndarray:
    """`picture` (uint8 (H, W, 3)) under a TITLE_HEIGHT strip of BACKGROUND in which each name is written (PIL's
    built-in font, TITLE_COLOUR) centred over its column: columns of `widths` pixels, GAP apart, from the left.
    A name wider than its column is cut at the column's right edge."""
    strip = Image.new("RGB", (picture.shape[1], TITLE_HEIGHT), BACKGROUND)
    font = ImageFont.load_default(size=12)
    left = 0
    for name, width in zip(names, widths):
        cell = Image.new("RGB", (width, TITLE_HEIGHT), BACKGROUND)
        cell_draw = ImageDraw.Draw(cell)
        text_width = cell_draw.textlength(name, font=font)
        cell_draw.text((max(0.0, (width - text_width) / 2), TITLE_HEIGHT / 2), name, fill=TITLE_COLOUR, font=font,
                       anchor="lm")
        strip.paste(cell, (left, 0))
        left += width + GAP
    return np.concatenate([np.asarray(strip, np.uint8), picture], axis=0)


@dataclass(frozen=True)
class Predictions:
    """The previews of one evaluation, as `write_predictions` keeps them (each map at its image's display size).

    indices: the val items (`preview_indices`); images: uint8 (h, w, 3) RGB; labels, student, teacher: (h, w) int32
    class ids (labels with `ignore_index`); teacher None when the run had none; palette: uint8 (K, 3); iteration and
    miou (a fraction) of the evaluation.
    """

    indices: tuple[int, ...]
    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    student: tuple[np.ndarray, ...]
    teacher: tuple[np.ndarray, ...] | None
    palette: np.ndarray
    ignore_index: int
    iteration: int
    miou: float

    def same_images(self, other: Predictions) -> bool:
        """Whether `other` previews the same items with the same pixels and ground truth (runs of one job do; a run
        evaluated on another split, or another job, does not)."""
        return (self.indices == other.indices and len(self.images) == len(other.images)
                and all(np.array_equal(a, b) for a, b in zip(self.images, other.images))
                and all(np.array_equal(a, b) for a, b in zip(self.labels, other.labels)))

    def render(self, titled: bool = True) -> np.ndarray:
        """The rows `render_predictions` draws of these predictions, under the columns' names unless not `titled`."""
        return render_predictions(self.images, self.labels, self.student, self.teacher, self.palette,
                                  self.ignore_index, titled=titled)


def fit_for_display(image: np.ndarray, *maps: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """`image` (uint8 (H, W, 3)) and each (H, W) map (None stays None) at `display_size(H, W)`."""
    size = display_size(*image.shape[:2])
    return (resize_image(image, size), *(None if m is None else resize_labels(np.asarray(m), size) for m in maps))


def write_predictions(path: str | Path, predictions: Predictions) -> Path:
    """Write `predictions` to `path` (a compressed .npz, written to a temporary name then renamed, so a reader never
    sees half a file): arrays `image_<i>`, `label_<i>`, `student_<i>` and, with a teacher, `teacher_<i>` for each
    preview i, and `indices`, `palette`, `ignore_index`, `iteration`, `miou`, `version` (FORMAT_VERSION)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "version": np.asarray(FORMAT_VERSION), "indices": np.asarray(predictions.indices, np.int64),
        "palette": np.asarray(predictions.palette, np.uint8), "ignore_index": np.asarray(predictions.ignore_index),
        "iteration": np.asarray(predictions.iteration), "miou": np.asarray(predictions.miou, np.float64)}
    for i in range(len(predictions.indices)):
        arrays[f"image_{i}"] = np.asarray(predictions.images[i], np.uint8)
        arrays[f"label_{i}"] = np.asarray(predictions.labels[i], np.int32)
        arrays[f"student_{i}"] = np.asarray(predictions.student[i], np.int32)
        if predictions.teacher is not None:
            arrays[f"teacher_{i}"] = np.asarray(predictions.teacher[i], np.int32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


def read_predictions(path: str | Path) -> Predictions:
    """What `write_predictions` wrote. ValueError when the file is not such a file (not an .npz, a key missing, a
    newer format)."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: not a kdray predictions file ({type(err).__name__}: {err})") from err
    try:
        version = int(arrays["version"])
        if version > FORMAT_VERSION:
            raise ValueError(f"{path}: predictions file format {version}, newer than this kdray reads "
                             f"({FORMAT_VERSION})")
        count = len(arrays["indices"])
        teacher = "teacher_0" in arrays
        return Predictions(
            tuple(int(i) for i in arrays["indices"]), tuple(arrays[f"image_{i}"] for i in range(count)),
            tuple(arrays[f"label_{i}"] for i in range(count)), tuple(arrays[f"student_{i}"] for i in range(count)),
            tuple(arrays[f"teacher_{i}"] for i in range(count)) if teacher else None, arrays["palette"],
            int(arrays["ignore_index"]), int(arrays["iteration"]), float(arrays["miou"]))
    except KeyError as err:
        raise ValueError(f"{path}: not a kdray predictions file (no array {err})") from err
