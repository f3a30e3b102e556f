"""Label maps at the losses' resolution: `y↓` and its one-hot form, defined once for every loss; the check
that labels are classes or the ignore value."""

from __future__ import annotations

from typing import NoReturn

import torch
from torch import Tensor

from kdray.errors import DataError


def check_labels(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise `DataError` unless every value of `labels` is a class in 0..K-1 or is `ignore_index`.

    labels: integer, any shape (empty passes). A label outside that set would be silently wrong in every loss
    (no class in a one-hot, a pixel counted by ACE's |V| but not its sum, a device-side assert in CUDA's
    cross-entropy), so it is refused, naming the value. Cost: one min/max over the labels with ignored pixels
    set to 0, read back to the host once; on an accelerator that read waits for the device (a sync, and an
    error inside a CUDA graph capture). So the objective calls this once per step, where the labels come in
    (`DistillationObjective.step_tensors`), and the losses call `check_labels_on_cpu`.
    """
    ignored = labels == ignore_index
    if num_classes < 1:  # no class at all (IFVD's classes-present mode on an all-ignored batch): only the ignore
        outside = labels[~ignored]
        if outside.numel():
            _refuse(int(outside[0]), num_classes, ignore_index)
        return
    if labels.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(labels.masked_fill(ignored, 0))).tolist()  # 0: a class, as K >= 1
    if low < 0 or high >= num_classes:
        _refuse(low if low < 0 else high, num_classes, ignore_index)


def _refuse(value: int, num_classes: int, ignore_index: int) -> NoReturn:
    raise DataError(f"label value {value} is outside 0..{num_classes - 1} (K = {num_classes}) and is not the "
                    f"ignore value {ignore_index}; labels must be class indices below data.num_classes or the "
                    "ignore value")


def check_labels_on_cpu(labels: Tensor, num_classes: int, ignore_index: int) -> None:
    """`check_labels` for labels on the CPU, where it costs no device sync; nothing elsewhere.

    The losses and their helpers call this: on the CPU (tests, direct calls) a bad label is refused where it
    is used; on an accelerator they rely on the objective's once-per-step `check_labels`, since a sync per loss
    would stall the step and cannot run inside the CUDA graph that may capture the losses.
    """
    if labels.device.type == "cpu":
        check_labels(labels, num_classes, ignore_index)


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
    pixels. Raises `DataError` for a label outside 0..K-1 that is not `ignore_index` (checked on the CPU only,
    see `check_labels_on_cpu`; elsewhere such a label would give a zero column, as an ignored pixel).
    """
    check_labels_on_cpu(labels, num_classes, ignore_index)
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, 1, 1)
    labels = labels.unsqueeze(1)
    hits = labels == classes
    if 0 <= ignore_index < num_classes:  # otherwise no ignored pixel can match a class
        hits &= labels != ignore_index
    return hits.to(dtype)
