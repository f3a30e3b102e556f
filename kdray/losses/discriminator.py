"""The SKD holistic discriminator: a small SAGAN-style critic over segmentation score maps."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

WIDTHS = (64, 128, 256, 512)


class SelfAttention(nn.Module):
    """SAGAN self-attention: `x + γ · V softmax(QᵀK)ᵀ` over the h·w positions, γ initialised to 0.

    With γ = 0 the block starts as the identity, and the critic learns how much non-local evidence to use.
    x: (N, C, h, w) -> (N, C, h, w). Zhang et al., "Self-Attention Generative Adversarial Networks",
    ICML 2019, arXiv:1805.08318.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, kernel_size=1)
        self.key = nn.Conv2d(channels, channels // 8, kernel_size=1)
        self.value = nn.Conv2d(channels, channels, kernel_size=1)
        self.gain = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (N, M, M): row i attends over positions j
        out = v @ attention.transpose(1, 2)  # (N, C, M)
        return x + self.gain * out.view_as(x)


class Discriminator(nn.Module):
    """`D: (N, in_channels, h, w) -> (N, 1, h', w')` score map; the score of a sample is its map's mean.

    BatchNorm over the input channels (K logits, + 3 with image conditioning), four spectral-normalised
    4×4 stride-2 convolutions of widths 64, 128, 256, 512, each followed by LeakyReLU(0.1), a self-attention
    block after the 256 and the 512 ones, and a final plain 4×4 convolution to one channel.

    Padding, so that any map of at least 2×2 works (64×128 logits of a 512×1024 crop as well as the demo's
    8×8): the strided convolutions use padding 2, which maps a side s to ⌊s/2⌋ + 1 (never below 1, where
    the usual padding 1 gives ⌊s/2⌋ and collapses an 8×8 map to 0 at the fourth block); the final convolution
    uses padding 1, s -> s − 1. So 64×128 -> 33×65 -> 17×33 -> 9×17 -> 5×9 -> a 4×8 map, and
    8×8 -> 5 -> 3 -> 2 -> 2 -> 1×1.
    Spectral normalisation: Miyato et al., ICLR 2018, arXiv:1802.05957.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm2d(in_channels)]
        width_in = in_channels
        for width in WIDTHS:
            layers.append(spectral_norm(nn.Conv2d(width_in, width, kernel_size=4, stride=2, padding=2)))
            layers.append(nn.LeakyReLU(0.1))
            if width >= 256:
                layers.append(SelfAttention(width))
            width_in = width
        layers.append(nn.Conv2d(width_in, 1, kernel_size=4, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def __reduce__(self):
        # torch refuses to pickle spectral-normalised (parametrized) layers, and Ray ships the losses by pickle:
        # D travels as its input width, mode and state dict (weights, BatchNorm statistics, power-iteration vectors).
        return _unpickle_discriminator, (self.layers[0].num_features, self.training, self.state_dict())

    def __deepcopy__(self, memo: dict) -> Discriminator:
        # copy.deepcopy would take the pickle route above; keep torch's own (parametrized layers copy themselves,
        # and a memo of replacement tensors, as `kdray.models.weights` passes, is honoured)
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def _unpickle_discriminator(in_channels: int, training: bool, state: dict[str, Tensor]) -> Discriminator:
    with torch.device("meta"):  # no initialisation to draw (and no random numbers taken): the state replaces it
        discriminator = Discriminator(in_channels)
    discriminator.load_state_dict(state, assign=True)
    return discriminator.train(training)
