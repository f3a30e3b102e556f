"""The SKD discriminator against its spec.

D: BatchNorm over the K input channels (K + 3 with `conditioning: logits+image`), then four blocks of
spectral-normalised 4×4 stride-2 convs with LeakyReLU(0.1), widths 64, 128, 256, 512, a self-attention block
after the 256 and 512 blocks (gain initialised to 0), a final 4×4 conv to one channel; the score is the mean of
that map.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from kdray.losses.discriminator import Discriminator, SelfAttention
from kdray.losses.holistic import AdversarialDistillation

K = 8


def _layers(module: nn.Module) -> list[nn.Module]:
    """D's layers in forward order, nested `nn.Sequential`s flattened (a parametrized conv stays one layer)."""
    out: list[nn.Module] = []
    for child in module.children():
        out.extend(_layers(child) if isinstance(child, nn.Sequential) else [child])
    return out


def _kinds(layers: list[nn.Module]) -> list[str]:
    kinds = {nn.BatchNorm2d: "bn", nn.Conv2d: "conv", nn.LeakyReLU: "lrelu", SelfAttention: "attn"}
    return [next((name for cls, name in kinds.items() if isinstance(layer, cls)), type(layer).__name__)
            for layer in layers]


def _convs(d: nn.Module) -> list[nn.Conv2d]:
    return [layer for layer in _layers(d) if isinstance(layer, nn.Conv2d)]


def test_layers_come_in_the_specified_order():
    """bn, then conv+lrelu ×4 with attention after the third (256) and fourth (512), then the final conv."""
    assert _kinds(_layers(Discriminator(K))) == [
        "bn",
        "conv", "lrelu",
        "conv", "lrelu",
        "conv", "lrelu", "attn",
        "conv", "lrelu", "attn",
        "conv",
    ]


def test_strided_convs_are_spectral_normalised_4x4_stride_2_with_widths_64_to_512():
    *blocks, final = _convs(Discriminator(K))
    assert [c.out_channels for c in blocks] == [64, 128, 256, 512]
    assert [c.in_channels for c in blocks] == [K, 64, 128, 256]
    for conv in blocks:
        assert conv.kernel_size == (4, 4) and conv.stride == (2, 2)
        assert parametrize.is_parametrized(conv, "weight")
        assert type(conv.parametrizations.weight[0]).__name__ == "_SpectralNorm"
    # the last layer: a plain 4×4 conv from 512 to one channel
    assert (final.in_channels, final.out_channels, final.kernel_size) == (512, 1, (4, 4))
    assert not parametrize.is_parametrized(final)


def test_activations_are_leaky_relu_with_slope_0_1():
    activations = [layer for layer in _layers(Discriminator(K)) if isinstance(layer, nn.LeakyReLU)]
    assert len(activations) == 4 and all(a.negative_slope == 0.1 for a in activations)


def test_attention_follows_the_256_and_512_blocks_with_gain_0():
    layers = _layers(Discriminator(K))
    attention = [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, SelfAttention)]
    convs_before = [[c.out_channels for c in layers[:i] if isinstance(c, nn.Conv2d)][-1] for i, _ in attention]
    assert convs_before == [256, 512]
    assert all(torch.equal(block.gain.detach(), torch.zeros_like(block.gain)) for _, block in attention)


@pytest.mark.parametrize("conditioning, channels", [("logits", K), ("logits+image", K + 3)])
def test_batch_norm_covers_the_input_channels(conditioning, channels):
    """The input BatchNorm and the first conv see the K logits, and 3 more channels with the image."""
    d = AdversarialDistillation(K, conditioning=conditioning).discriminator
    first = _layers(d)[0]
    assert isinstance(first, nn.BatchNorm2d) and first.num_features == channels
    assert _convs(d)[0].in_channels == channels


def test_attention_is_the_identity_at_gain_0_and_not_otherwise():
    torch.manual_seed(0)
    blocks = [layer for layer in _layers(Discriminator(K)) if isinstance(layer, SelfAttention)]
    assert len(blocks) == 2
    for block, channels in zip(blocks, (256, 512), strict=True):
        x = torch.randn(2, channels, 3, 3)
        with torch.no_grad():
            assert torch.equal(block(x), x)
            block.gain.fill_(0.5)
            assert not torch.allclose(block(x), x)


def test_score_is_the_mean_of_a_one_channel_map():
    """D maps (N, K, h, w) to an (N, 1, h', w') map (8×8 -> 1×1, 64×128 -> 4×8, as documented); a sample's
    score is that map's mean."""
    torch.manual_seed(0)
    adversarial = AdversarialDistillation(K).eval()  # eval: no power iteration, batch statistics not used
    d = adversarial.discriminator
    assert d(torch.randn(2, K, 8, 8)).shape == (2, 1, 1, 1)
    logits = torch.randn(2, K, 64, 128)
    with torch.no_grad():
        out = d(logits)
        assert out.shape == (2, 1, 4, 8)
        torch.testing.assert_close(adversarial.score(logits), out.mean(dim=(1, 2, 3)))
