"""The built-in synthetic segmentation dataset: procedural scenes, deterministic from (seed, split, index).

Each scene is a textured background, often crossed by a striped "road" band, with 2-5 objects on top. Object
classes are defined by *shape* (disc, box, ring, cross, triangle); colour is only a weak cue: each class has
a mean hue, and objects scatter around it widely enough (35 degrees) that neighbouring classes overlap. One
class needs context: a disc lying on the road is a `boat` (class 6), the same disc elsewhere is a `disc`
(class 2), with the same colours, so the label of its pixels depends on what surrounds it. Triangles and
boats are rare. A narrow student gets far on colour alone; a wide teacher also learns shape and context,
which is the gap distillation is about. No files: an item costs about a millisecond at 64x64.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from kdray.config.options import option
from kdray.data.registry import DatasetRequest, register_dataset

CLASS_NAMES = ("background", "road", "disc", "box", "ring", "cross", "boat", "triangle")
_SPLIT_SALT = {"train": 0, "val": 1}
# Which shape each drawn object gets; boats come from discs placed on the road.
_SHAPES = ("disc", "box", "ring", "cross", "triangle")
_SHAPE_P = (0.32, 0.24, 0.2, 0.16, 0.08)


@dataclass
class SyntheticOptions:
    """The `data.synthetic` section; only read when `data.dataset` is synthetic."""

    image_size: int = option(64, at_least=16)  # S: items are S x S
    train_length: int = option(4096, at_least=1)  # items in the train role's split
    val_length: int = option(256, at_least=1)  # items in the val role's split
    seed: int = option(0, at_least=0)  # numpy seeds are non-negative


def _build(request: DatasetRequest) -> SyntheticSegmentation:
    o = request.options
    length = o.train_length if request.role == "train" else o.val_length
    return SyntheticSegmentation(request.split, length=length, image_size=o.image_size, seed=o.seed)


# No files, no ignored pixels. data.num_classes is not tied to the 8 names: a search space may vary it
# (a class count the teacher file does not have is then refused by the weight checks, with the file named).
@register_dataset("synthetic", class_names=CLASS_NAMES, splits=("train", "val"), paper_splits=("train", "val"),
                  image_size=lambda o: (o.image_size, o.image_size), needs_root=False, strict_class_count=False,
                  options=SyntheticOptions, build=_build,
                  smoke_overrides={"data.synthetic.train_length": 64, "data.synthetic.val_length": 16})
class SyntheticSegmentation(Dataset):
    """Items are `(image, mask)`: `tv_tensors.Image` uint8 (3, S, S) and `tv_tensors.Mask` int64 (S, S)."""

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)
    ignore_index = 255

    def __init__(self, split: str = "train", length: int = 4096, image_size: int = 64, seed: int = 0):
        if split not in _SPLIT_SALT:
            raise ValueError(f"split must be one of {sorted(_SPLIT_SALT)}, got {split!r}")
        self.split, self.length, self.size, self.seed = split, length, image_size, seed
        yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
        self._yy, self._xx = yy, xx

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image, mask = self.render(index)
        return tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask))

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(S, S, 3) uint8 image and (S, S) int64 mask for item `index`."""
        rng = np.random.default_rng((self.seed, _SPLIT_SALT[self.split], index))
        s, yy, xx = self.size, self._yy, self._xx
        image = self._background(rng)
        mask = np.zeros((s, s), np.int64)

        road = np.zeros((s, s), bool)
        if rng.random() < 0.7:
            centre, half = rng.uniform(0.3, 0.75) * s, rng.uniform(0.12, 0.22) * s
            slope, wobble = rng.uniform(-0.4, 0.4), rng.uniform(0, 0.06) * s
            phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0.05, 0.2)
            line = centre + slope * (xx - s / 2) + wobble * np.sin(freq * xx + phase)
            road = np.abs(yy - line) < half
            period = rng.uniform(4, 9)
            stripes = (np.sin((xx + yy * rng.uniform(-1, 1)) * 2 * np.pi / period) > 0)[..., None]
            c1, c2 = _colour(rng), _colour(rng)
            image = np.where(road[..., None], np.where(stripes, c1, c2), image)
            mask[road] = 1

        for _ in range(rng.integers(2, 6)):
            shape = _SHAPES[rng.choice(len(_SHAPES), p=_SHAPE_P)]
            radius = rng.uniform(0.12, 0.22) * s
            if shape == "disc" and road.any() and rng.random() < 0.3:
                ys, xs = np.nonzero(road)  # put it on the road: a boat
                k = rng.integers(len(ys))
                cy, cx = float(ys[k]), float(xs[k])
            else:
                cy, cx = rng.uniform(radius, s - radius, size=2)
            inside = _shape_mask(shape, yy - cy, xx - cx, radius, rng)
            if not inside.any():
                continue
            label = _SHAPES.index(shape) + 2 if shape != "triangle" else 7
            if shape == "disc" and road[int(round(min(cy, s - 1))), int(round(min(cx, s - 1)))]:
                label = 6
            colour = _class_colour(rng, _SHAPES.index(shape))
            texture = rng.normal(0, 14, size=(s, s, 1))
            image = np.where(inside[..., None], colour + texture, image)
            mask[inside] = label

        image += rng.normal(0, 10, size=image.shape)  # sensor noise over everything
        return np.clip(image, 0, 255).astype(np.uint8), mask

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        s, yy, xx = self.size, self._yy, self._xx
        base = _colour(rng)
        field = np.zeros((s, s), np.float32)
        for _ in range(3):  # low-frequency blotches, so brightness alone does not separate classes
            fy, fx = rng.uniform(0.02, 0.15, size=2)
            field += np.sin(fy * yy * 2 * np.pi / 4 + fx * xx * 2 * np.pi / 4 + rng.uniform(0, 2 * np.pi))
        return base + (field[..., None] * rng.uniform(10, 30, size=3)).astype(np.float32)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(40, 215, size=3).astype(np.float32)


def _class_colour(rng: np.random.Generator, shape_index: int) -> np.ndarray:
    """A colour whose hue scatters (sd 35 degrees) around the shape's own: a cue, never a rule."""
    hue = (shape_index / len(_SHAPES) + rng.normal(0, 35 / 360)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.9))
    return np.array(rgb, np.float32) * 255


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "box":
        angle = rng.uniform(0, np.pi / 2)
        u, v = np.cos(angle) * dx + np.sin(angle) * dy, -np.sin(angle) * dx + np.cos(angle) * dy
        return (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "triangle":  # upward, apex at -r
        return (dy <= 0.7 * r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(shape)
