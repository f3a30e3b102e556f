"""Segmentation models: dilated deep-stem ResNets with DeepLabV3 or PSPNet heads, built by name.

    model = build_model("deeplabv3_resnet18", num_classes=19)
    out = model(images)          # SegmenterOutput(logits, features, aux_logits), all at output stride 8

An arch name is `<head>_<backbone>`; every head in `HEADS` pairs with every backbone in `BACKBONES`
(`available_models()` lists them). The full-size models have the CIRKD project's state-dict layout (commit
2d8ad0f), so its public checkpoints load without key mapping (`load_segmenter_weights`,
`load_backbone_weights`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from torch import nn

from kdray.errors import ConfigError
from kdray.models.common import scaled_channels
from kdray.models.deeplabv3 import DeepLabV3Head
from kdray.models.fcn_head import FCNHead
from kdray.models.pspnet import PSPHead
from kdray.models.resnet import BACKBONES, BasicBlock, Bottleneck, ResNet
from kdray.models.segmenter import Segmenter, SegmenterOutput
from kdray.models.taps import FeatureTaps, tap_channels, tap_names, tap_stride
from kdray.models.weights import load_backbone_weights, load_segmenter_weights, read_state_dict

__all__ = [
    "BACKBONES",
    "HEADS",
    "BasicBlock",
    "Bottleneck",
    "FeatureTaps",
    "HeadSpec",
    "ResNet",
    "Segmenter",
    "SegmenterOutput",
    "available_models",
    "build_model",
    "load_backbone_weights",
    "load_segmenter_weights",
    "read_state_dict",
    "tap_channels",
    "tap_names",
    "tap_stride",
]


class HeadSpec(NamedTuple):
    """A registered head: its class and the rule for its width.

    `head(in_channels, num_classes, channels)` must return a module whose forward maps the last backbone
    stage (N, in_channels, h, w) to `(logits (N, K, h, w), features (N, channels, h, w))`, where `features`
    is the classifier's input. `full_channels(c4)` gives `channels` at width 1 from the backbone's full-size
    last-stage width `c4` (512 for ResNet-18/34, 2048 for ResNet-50/101); the factory scales it by `width`.
    """

    head: Callable[[int, int, int], nn.Module]
    full_channels: Callable[[int], int]


HEADS: dict[str, HeadSpec] = {
    # CIRKD's ASPP width: 128 over the 512-channel ResNets, 256 over the 2048-channel ones.
    "deeplabv3": HeadSpec(DeepLabV3Head, lambda c4: 128 if c4 == 512 else 256),
    "pspnet": HeadSpec(PSPHead, lambda c4: c4 // 4),
}

# The ResNets' stage widths at width 1 are (64, 128, 256, 512) times the block expansion.
_FULL_LAYER3, _FULL_LAYER4 = 256, 512


def available_models() -> list[str]:
    """Every arch name `build_model` accepts, sorted."""
    return sorted(f"{head}_{backbone}" for head in HEADS for backbone in BACKBONES)


def build_model(
    arch: str,
    num_classes: int,
    *,
    aux: bool = True,
    width: float = 1.0,
    backbone_weights: str | Path | None = None,
) -> Segmenter:
    """Build the segmenter `arch` (`<head>_<backbone>`, see `available_models()`) for `num_classes` classes.

    aux: add the auxiliary FCN head on `layer3` (`auxlayer`; its logits come out in training mode only).
    width: multiplies every channel count (stem, stages, head and auxiliary widths; each rounded to a
        multiple of 8, at least 8). 1.0 is the published model; e.g. 0.25 gives a CPU-demo-sized one.
    backbone_weights: a backbone weights file loaded into `model.pretrained` (`load_backbone_weights`).

    Raises `ConfigError` for an unknown arch, `num_classes` < 2 or `width` <= 0, and `CheckpointError`
    when `backbone_weights` does not fit.
    """
    head_name, _, backbone_name = arch.partition("_") if isinstance(arch, str) else ("", "", "")
    if head_name not in HEADS or backbone_name not in BACKBONES:
        valid = available_models()
        close = difflib.get_close_matches(arch, valid, n=3) if isinstance(arch, str) else []
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ConfigError(f"unknown model arch {arch!r}: {hint}valid archs are {', '.join(valid)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, int | float) or not 0 < width < math.inf:
        raise ConfigError(f"width must be a finite number > 0, got {width!r}")

    backbone = BACKBONES[backbone_name](width)
    spec = HEADS[head_name]
    c3, c4 = backbone.stage_channels[2], backbone.stage_channels[3]
    full_c3, full_c4 = _FULL_LAYER3 * backbone.expansion, _FULL_LAYER4 * backbone.expansion
    head_channels = scaled_channels(spec.full_channels(full_c4), width)
    head = spec.head(c4, num_classes, head_channels)
    # CIRKD's auxiliary width: a quarter of layer3's.
    auxlayer = FCNHead(c3, num_classes, scaled_channels(full_c3 // 4, width)) if aux else None
    model = Segmenter(arch, backbone, head, auxlayer, num_classes, feature_channels=head_channels)
    if backbone_weights is not None:
        load_backbone_weights(model, backbone_weights)
    return model
