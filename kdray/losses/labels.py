"""Label maps at the losses' resolution: `y↓` and its one-hot form, defined once for every loss."""

from __future__ import annotations

import torch
from torch import Tensor


def downsample_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of an integer label map: `y↓`.

    labels: (N, H, W) integer; size: (h, w). Returns (N, h, w), the same tensor when it already has that size.
    Output pixel (i, j) takes input pixel (⌊i·H/h⌋, ⌊j·W/w⌋), the rule of `F.interpolate(mode="nearest")`
    (the one the public CIRKD code uses on `target.float()`), computed here in integer arithmetic so it
    never depends on float rounding of the scale and never casts labels to float. Where the size divides
    (H = s·h), ⌊i·H/h⌋ = s·i: that axis is a strided slice, no index tensor (the usual output strides 8 and 16).
    """
    h, w = int(size[0]), int(size[1])
    height, width = labels.shape[-2:]
    if (height, width) == (h, w):
        return labels
    rows = _nearest_indices(height, h, labels.device)
    cols = _nearest_indices(width, w, labels.device)
    if isinstance(rows, Tensor) and isinstance(cols, Tensor):
        rows = rows[:, None]  # both axes indexed: broadcast to an (h, w) grid
    return labels[..., rows, cols].contiguous()


def _nearest_indices(size: int, new_size: int, device: torch.device) -> slice | Tensor:
    """The input positions ⌊i·size/new_size⌋, i < new_size: a slice when new_size divides size."""
    if size % new_size == 0:
        return slice(None, None, size // new_size)
    return torch.arange(new_size, device=device) * size // new_size


def one_hot_ignore(labels: Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """One-hot encoding, class axis second, with all-zero columns at ignored pixels.

    labels: (N, h, w) integer; returns (N, K, h, w) of `dtype`, the layout of the score maps, so that
    `one_hot.flatten(2)` is the (N, K, M) matrix whose product with features `(N, C, M)ᵀ` sums each class's
    pixels. Values outside [0, K) other than `ignore_index` also give zero columns (the data layer validates
    labels; a loss must not crash on them).
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, 1, 1)
    labels = labels.unsqueeze(1)
    hits = labels == classes
    if 0 <= ignore_index < num_classes:  # otherwise no ignored pixel can match a class
        hits &= labels != ignore_index
    return hits.to(dtype)
