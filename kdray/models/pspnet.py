"""PSPNet head: pyramid pooling over the last backbone stage.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017 (https://arxiv.org/abs/1612.01105). Module names
follow the CIRKD project (commit 2d8ad0f): `psp.conv1`..`conv4`, `block`, `classifier`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdray.models.common import init_weights


class PyramidPooling(nn.Module):
    """Average-pool to 1, 2, 3 and 6 bins a side, 1x1 conv + BN + ReLU each, up-sample, concat with the input.

    x: (N, C, h, w) -> (N, C + 4 * channels, h, w).
    """

    bins = (1, 2, 3, 6)

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        # One 1x1 conv + BN + ReLU per bin size; the pooling is done in forward (as a module it would shift
        # the checkpoint names from `conv1.0` to `conv1.1`).
        self.conv1 = _conv_bn_relu(in_channels, channels)
        self.conv2 = _conv_bn_relu(in_channels, channels)
        self.conv3 = _conv_bn_relu(in_channels, channels)
        self.conv4 = _conv_bn_relu(in_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        maps = [x]
        for bins, branch in zip(self.bins, (self.conv1, self.conv2, self.conv3, self.conv4), strict=True):
            pooled = branch(F.adaptive_avg_pool2d(x, bins))
            # align_corners=True as in CIRKD, so its checkpoints see the maps they were trained on.
            maps.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=True))
        return torch.cat(maps, dim=1)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class PSPHead(nn.Module):
    """Pyramid pooling, then 3x3 conv + BN + ReLU + Dropout(0.1), then a 1x1 classifier with bias.

    x: (N, in_channels, h, w) -> (logits: (N, num_classes, h, w), features: (N, channels, h, w)), where
    `features` is the classifier's input. CIRKD's width: `channels` = in_channels / 4 (128 over ResNet-18,
    512 over ResNet-101), used both for each pyramid branch and for the fused map.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int) -> None:
        super().__init__()
        self.psp = PyramidPooling(in_channels, channels)
        self.block = nn.Sequential(
            nn.Conv2d(in_channels + len(PyramidPooling.bins) * channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.out_channels = channels
        init_weights(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.block(self.psp(x))
        return self.classifier(features), features
