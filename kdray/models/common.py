"""Helpers every model file uses: channel scaling for the width variants, and weight initialisation."""

from __future__ import annotations

from torch import nn


def scaled_channels(channels: int, width: float) -> int:
    """`channels * width` rounded to the nearest multiple of 8, at least 8 (ties round up).

    Every channel count of a model (stem, stages, head and auxiliary widths) is its full-size value passed
    through this, so width 1.0 is exactly the published architecture.
    """
    return max(8, int(channels * width / 8 + 0.5) * 8)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias; BatchNorm weight 1, bias 0.

    The last BN of each residual block is NOT zero-initialised: the full-size backbones are overwritten by
    ImageNet weights, and the from-scratch demo variants train fine without it.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
