"""Dilated deep-stem ResNets (output stride 8), laid out like the CIRKD project's backbones (commit 2d8ad0f).

The module and parameter names (`conv1`/`bn1`..`conv3`/`bn3` stem, `layer1`..`layer4`, `downsample.0/.1`)
are those of the deep-stem ImageNet checkpoints the segmentation-KD literature shares, so those files load
with no key mapping. There is no ImageNet classifier (`fc`): a segmentation backbone never uses it.

Resolution: the stem halves the input twice (stride-2 conv, stride-2 max-pool) and `layer2` once more;
`layer3` and `layer4` keep stride 1 and dilate instead. Every down-sampling op has kernel 3 / padding 1 or
kernel 1 / padding 0, so each halving maps a side `s` to `ceil(s / 2)`: an (H, W) input gives
(ceil(ceil(ceil(H/2)/2)/2), ...) = (ceil(H/8), ceil(W/8)) maps from `layer2` on, for any H, W.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kdray.models.common import init_weights, scaled_channels


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34).

    `first_dilation` is the dilation of the conv that carries the block's stride (conv1), `dilation` that of
    the other 3x3 conv; see `ResNet._make_layer` for why they differ in the first block of a dilated layer.
    """

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            inplanes, planes, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, with a residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        first_dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # A bottleneck's only 3x3 conv is the strided one, so `first_dilation` is the only dilation it uses
        # (`dilation` is accepted to keep one block signature).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """Deep-stem ResNet with output stride 8: `forward(x)` returns the four stage outputs.

    x: (N, 3, H, W) -> (c1, c2, c3, c4) with c1: (N, C1, ceil(H/4), ceil(W/4)) and c2..c4 at
    (ceil(H/8), ceil(W/8)); `stage_channels` holds (C1, C2, C3, C4), e.g. (64, 128, 256, 512) for
    ResNet-18 and (256, 512, 1024, 2048) for ResNet-101 at width 1.

    `width` scales every channel count (stem and stages) with `scaled_channels`; it exists for the small
    CPU demo variants and must stay 1.0 for the public checkpoints to fit.
    """

    def __init__(self, block: Block, layers: tuple[int, int, int, int], width: float = 1.0) -> None:
        super().__init__()
        stem = [scaled_channels(c, width) for c in (64, 64, 128)]
        planes = [scaled_channels(c, width) for c in (64, 128, 256, 512)]
        self.expansion = block.expansion
        self.conv1 = nn.Conv2d(3, stem[0], 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem[0])
        self.conv2 = nn.Conv2d(stem[0], stem[1], 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem[1])
        self.conv3 = nn.Conv2d(stem[1], stem[2], 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem[2])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)

        self.inplanes = stem[2]
        self.layer1 = self._make_layer(block, planes[0], layers[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=1, dilation=4)
        self.stage_channels = tuple(p * block.expansion for p in planes)
        init_weights(self)

    def _make_layer(
        self, block: Block, planes: int, blocks: int, stride: int, dilation: int
    ) -> nn.Sequential:
        # A dilated layer is the ImageNet layer with its stride-2 conv turned into stride 1. That conv still
        # samples its input at the spacing the previous layer worked at, so it keeps the previous layer's
        # dilation (1 before layer3, 2 before layer4); every later 3x3 conv now sees a map 2x finer than
        # at ImageNet training and takes the full `dilation` to keep its receptive field (and the pretrained
        # weights' meaning). This is also what CIRKD's backbone does.
        first_dilation = max(1, dilation // 2)
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, dilation, first_dilation, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, dilation, dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        c1 = self.layer1(self.maxpool(x))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4


def resnet18(width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width)


def resnet34(width: float = 1.0) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), width)


def resnet50(width: float = 1.0) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), width)


def resnet101(width: float = 1.0) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), width)


BACKBONES: dict[str, Callable[[float], ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
}
"""Backbone name -> constructor taking `width`."""
