"""Sliding-window evaluation, for GPUs that cannot hold a whole full-resolution image at once.

Windows of `crop` pixels start every `stride` pixels; the last row and column of windows are moved back to end
flush with the image border, so every pixel is covered and no window is padded. Each window's logits are
upsampled bilinearly to the window's size and summed into a full-size map; each pixel is divided by the number
of windows that cover it. A window as large as the image gives exactly the whole-image logits upsampled.
The papers evaluate whole images (`data.eval_mode: whole`); this is the memory-saving alternative.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdray.config.schema import DataConfig

Window = tuple[tuple[int, int], tuple[int, int]]  # ((crop_h, crop_w), (stride_h, stride_w))


def window_of(cfg: DataConfig) -> Window | None:
    """The job's window for `eval_mode: slide` (crop defaults to data.crop, stride to 2/3 of it); None: whole."""
    if cfg.eval_mode != "slide":
        return None
    crop = cfg.eval_crop or cfg.crop
    stride = cfg.eval_stride or (max(1, crop[0] * 2 // 3), max(1, crop[1] * 2 // 3))
    return crop, stride


def starts(size: int, crop: int, stride: int) -> list[int]:
    """Window offsets along one side: every `stride`, the last one flush with the end."""
    if size <= crop:
        return [0]
    return [*range(0, size - crop, stride), size - crop]


def slide_logits(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, window: Window
                 ) -> torch.Tensor:
    """Logits (N, K, H, W) at the images' full size, averaged over overlapping windows.

    forward: maps a window batch (N, 3, h, w) to logits (N, K, h', w') at any stride.
    images: (N, 3, H, W).
    """
    (crop_h, crop_w), (stride_h, stride_w) = window
    _, _, height, width = images.shape
    crop_h, crop_w = min(crop_h, height), min(crop_w, width)
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, height, width, device=images.device)
    for y in starts(height, crop_h, stride_h):
        for x in starts(width, crop_w, stride_w):
            logits = forward(images[:, :, y:y + crop_h, x:x + crop_w])
            logits = F.interpolate(logits.float(), size=(crop_h, crop_w), mode="bilinear", align_corners=False)
            if total is None:
                total = logits.new_zeros(logits.shape[0], logits.shape[1], height, width)
            total[:, :, y:y + crop_h, x:x + crop_w] += logits
            count[:, :, y:y + crop_h, x:x + crop_w] += 1
    assert total is not None  # at least one window
    return total / count
