"""DeepLabV3 head: atrous spatial pyramid pooling (ASPP) over the last backbone stage.

Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017
(https://arxiv.org/abs/1706.05587). Module names follow the CIRKD project (commit 2d8ad0f): `aspp.b0`..`b4`,
`aspp.project`, and `block` whose index 4 is the classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.common import init_weights


class _ASPPConv(nn.Module):
    """3x3 conv at one atrous rate, BN, ReLU (held in `block` so the names read `b1.block.0`)."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back to the input size.

    In training mode its BatchNorm sees one value per image and channel, so a batch needs at least 2 images.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.gap = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear up-sampling of a 1x1 map is a constant map: expand says so without interpolating.
        return self.gap(x).expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Five parallel branches (1x1, three 3x3 atrous, image pooling), concatenated, projected to `channels`.

    x: (N, in_channels, h, w) -> (N, channels, h, w).
    """

    def __init__(self, in_channels: int, channels: int, rates: tuple[int, int, int] = (12, 24, 36)) -> None:
        super().__init__()
        self.b0 = nn.Sequential(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.b1 = _ASPPConv(in_channels, channels, rates[0])
        self.b2 = _ASPPConv(in_channels, channels, rates[1])
        self.b3 = _ASPPConv(in_channels, channels, rates[2])
        self.b4 = _ASPPPooling(in_channels, channels)
        self.project = nn.Sequential(
            nn.Conv2d(5 * channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project(torch.cat(branches, dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP, then 3x3 conv + BN + ReLU + Dropout(0.1), then a 1x1 classifier with bias.

    x: (N, in_channels, h, w) -> (logits: (N, num_classes, h, w), features: (N, channels, h, w)), where
    `features` is the classifier's input (after the ReLU and the Dropout, as CIRKD returns it).
    CIRKD's widths: `channels` = 128 over ResNet-18/34 (512-channel input), 256 over ResNet-50/101.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, channels)
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )
        self.out_channels = channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block[:4](self.aspp(x))
        return self.block[4](features), features
