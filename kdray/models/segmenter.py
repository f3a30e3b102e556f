"""The composed segmentation model (backbone + head + optional auxiliary head) and its output type."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kdray.models.resnet import ResNet


class SegmenterOutput(NamedTuple):
    """What `Segmenter.forward` returns (a NamedTuple, so DDP and `torch.compile` pass it through).

    logits:     (N, K, h, w) class scores at output stride 8, NOT up-sampled to the input size.
    features:   (N, C, h, w) the map the final 1x1 classifier reads (after the head's ReLU and Dropout),
                C = `Segmenter.feature_channels`. This is the map feature-distillation losses compare.
    aux_logits: (N, K, h, w) the auxiliary FCN head's scores on `layer3`, only when the model has an auxiliary
                head and the forward computes it (training mode, or `aux=True`); None otherwise.

    With an (H, W) input, (h, w) = (ceil(H / 8), ceil(W / 8)).
    """

    logits: torch.Tensor
    features: torch.Tensor
    aux_logits: torch.Tensor | None


class Segmenter(nn.Module):
    """Backbone (`pretrained`), head (`head`) and optional auxiliary head (`auxlayer`).

    The attribute names are the CIRKD project's, so its checkpoints' state-dict keys match ours one for one.
    `forward(x, aux=None)` takes images (N, 3, H, W) and returns a `SegmenterOutput`. `aux` says whether to
    run the auxiliary head: None (the default) in training mode only; True also in eval mode (a frozen teacher
    whose auxiliary logits a distillation loss reads: `losses.dist.aux_weight`, `losses.dkd.aux_weight`);
    False never. A model without an auxiliary head gives None whatever `aux` says.

    Attributes: `arch` (the registry name), `num_classes` (K), `feature_channels` (C of `features`).
    """

    def __init__(
        self,
        arch: str,
        backbone: ResNet,
        head: nn.Module,
        auxlayer: nn.Module | None,
        num_classes: int,
        feature_channels: int,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.pretrained = backbone
        self.head = head
        self.auxlayer = auxlayer

    def forward(self, x: torch.Tensor, aux: bool | None = None) -> SegmenterOutput:
        _, _, c3, c4 = self.pretrained(x)
        logits, features = self.head(c4)
        # The auxiliary head only feeds a training loss: skip its cost at evaluation unless asked for.
        wanted = self.training if aux is None else aux
        aux_logits = self.auxlayer(c3) if wanted and self.auxlayer is not None else None
        return SegmenterOutput(logits, features, aux_logits)
