"""Auxiliary FCN head on `layer3`, trained with its own cross-entropy (PSPNet's deep supervision).

Named `auxlayer` in the segmenter, as in the CIRKD project (commit 2d8ad0f).
"""

from __future__ import annotations

import torch
from torch import nn

from kdray.models.common import init_weights


class FCNHead(nn.Module):
    """3x3 conv + BN + ReLU + Dropout(0.1), then a 1x1 classifier with bias (`block.4`).

    x: (N, in_channels, h, w) -> logits (N, num_classes, h, w). CIRKD's width: `channels` = in_channels / 4.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, num_classes, 1),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)
