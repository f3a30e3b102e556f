"""Joint image/mask transforms of the papers, on `torchvision.transforms.v2` with `tv_tensors.Mask`.

Training: random scale 0.5-2.0 (bilinear for the image, nearest for the mask), random crop padded where the
scaled image is smaller (image with 0, mask with the ignore value), horizontal flip, then normalisation.
Evaluation: normalisation only, the whole image at its own size.
Outputs are plain tensors: image float32 (3, H, W), mask int64 (H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomScale(v2.Transform):
    """Resize image and mask together by one factor drawn uniformly from `scale_range`."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        h, w = F.get_size(image)
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * float(torch.rand(()))  # torch's RNG, like every other v2 transform
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class ChannelOrder(v2.Transform):
    """RGB to BGR for checkpoints trained on OpenCV-read images; identity for `rgb`."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, order: str):
        super().__init__()
        self.order = order

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return inpt if self.order == "rgb" else tv_tensors.wrap(inpt.flip(-3), like=inpt)


class _ToPlain(v2.Transform):
    """Unwrap to (float image, int64 mask) so the collated batch holds plain tensors."""

    def forward(self, image: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()


def _normalize(mean: Sequence[float], std: Sequence[float], order: str) -> list[v2.Transform]:
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        ChannelOrder(order),
        v2.Normalize(mean=list(mean), std=list(std)),  # in the channel order the model sees
    ]


def train_transforms(crop: tuple[int, int], scale_range: tuple[float, float], flip: bool,
                     mean: Sequence[float], std: Sequence[float], order: str = "rgb",
                     ignore_index: int = 255) -> v2.Compose:
    steps: list[v2.Transform] = [
        RandomScale(scale_range),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, *_normalize(mean, std, order), _ToPlain()])


def eval_transforms(mean: Sequence[float], std: Sequence[float], order: str = "rgb") -> v2.Compose:
    return v2.Compose([*_normalize(mean, std, order), _ToPlain()])


def eval_image_transforms(mean: Sequence[float], std: Sequence[float], order: str = "rgb") -> v2.Compose:
    """`eval_transforms` for an image without its mask (a test split's): a uint8 `tv_tensors.Image` (3, H, W) in,
    the same float32 (3, H, W) plain tensor out."""
    return v2.Compose([*_normalize(mean, std, order), v2.ToPureTensor()])
