"""Label maps at the losses' resolution: `y↓` and its one-hot form, defined once for every loss."""

from __future__ import annotations

import torch
from torch import Tensor


def downsample_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Nearest-neighbour resize of an integer label map: `y↓`.

    labels: (N, H, W) integer; size: (h, w). Returns (N, h, w), the same tensor when it already has that size.
    Output pixel (i, j) takes input pixel (⌊i·H/h⌋, ⌊j·W/w⌋), the rule of `F.interpolate(mode="nearest")`
    (the one the public CIRKD code uses on `target.float()`), computed here in integer arithmetic so it
    never depends on float rounding of the scale and never casts labels to float.
    """
    h, w = int(size[0]), int(size[1])
    height, width = labels.shape[-2:]
    if (height, width) == (h, w):
        return labels
    rows = torch.arange(h, device=labels.device) * height // h
    cols = torch.arange(w, device=labels.device) * width // w
    return labels[..., rows[:, None], cols[None, :]]


def one_hot_ignore(labels: Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """One-hot encoding, class axis second, with all-zero columns at ignored pixels.

    labels: (N, h, w) integer; returns (N, K, h, w) of `dtype`, the layout of the score maps, so that
    `one_hot.flatten(2)` is the (N, K, M) matrix whose product with features `(N, C, M)ᵀ` sums each class's
    pixels. Values outside [0, K) other than `ignore_index` also give zero columns (the data layer validates
    labels; a loss must not crash on them).
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, 1, 1)
    labels = labels.unsqueeze(1)
    hits = (labels == classes) & (labels != ignore_index)
    return hits.to(dtype)
