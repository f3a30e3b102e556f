"""Multi-scale and flipped evaluation: the "MS + flip" protocol of the DeepLab papers, for any kdray model.

For images x (N, 3, H, W) scored at the label size (h, w), scales S = (s_1, ..., s_m) (`data.eval_scales`) and
mirrors M = {no} or {no, yes} (`data.eval_flip`), each pass (s, f) of the m·|M| passes computes

    x_s     = resize(x, (max(1, round(s·H)), max(1, round(s·W))))         bilinear, align_corners=False,
                                                                          antialiased when it shrinks (s < 1)
    z_{s,f} = flip_f( g( flip_f(x_s) ) )                                  flip_f: reverse the width axis if f
    p_{s,f} = softmax over K of resize(z_{s,f}, (h, w))                  bilinear, align_corners=False

where g is the model's logits, of the whole image or averaged over sliding windows (`kdray.engine.sliding`, the
window in pixels of the resized image), and returns the mean probability

    P = 1 / (m·|M|) · sum over (s, f) of p_{s,f}                          (N, K, h, w) float32, each pixel sums to 1

whose argmax over K is the prediction. The mirror image's logits are flipped back before they are resized, so a
model whose logits are mirror-symmetric (g(flip x) = flip g(x)) gives p_{s,yes} = p_{s,no} exactly, and P equal,
bit for bit, to P without flips. With sliding windows it holds to rounding (each window's logits are resized
before they are summed) and only where the layout of the windows is its own mirror image (the mirror image's
windows are laid out from its own left edge). With S = (1,)
and no flip there is one pass, and its resized logits are returned as they are, not their softmax: exactly the
single-scale evaluation of `kdray.engine.evaluate` (the same argmax, bit for bit).

Sources. DeepLabV3 (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation", 2017): at test
time, inputs at the scales {0.5, 0.75, 1.0, 1.25, 1.5, 1.75} and their left-right flips, the outputs averaged
("MS" and "Flip" in its tables), as DeepLab's own code averages the softmax probabilities; CIRKD's `eval.py`
(github.com/winycg/CIRKD, `--scales`, `--flip-eval`) runs the same loop. Two differences from CIRKD's script, both
deliberate: it averages the upsampled logits, not their softmax (averaging probabilities, a pass with larger
logits does not outvote the others), and it resizes with align_corners=True and without antialiasing,
where kdray resizes as its own training transform does (torchvision's antialiased bilinear resize;
align_corners=False, as every other resize in kdray's evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kdray.engine.sliding import Window, slide_logits

Forward = Callable[[torch.Tensor], torch.Tensor]  # images (N, 3, H, W) -> logits (N, K, h', w'), any stride


def is_single_scale(scales: Sequence[float], flip: bool) -> bool:
    """True for the plain evaluation: one pass at scale 1, no mirror image."""
    return tuple(scales) == (1.0,) and not flip


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(round(scale·H), round(scale·W)), at least 1 pixel each: the size the image is resized to at `scale`
    (rounded as the training transform's random scale rounds)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_images(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Images (N, 3, H, W) resized by `scale` (`scaled_size`), bilinearly, antialiased when shrinking; the same
    tensor when the size does not change."""
    height, width = images.shape[-2:]
    size = scaled_size(height, width, scale)
    if size == (height, width):
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


def pass_logits(forward: Forward, images: torch.Tensor, size: Sequence[int], window: Window | None = None
                ) -> torch.Tensor:
    """One pass: the model's logits on `images` (whole, or slid over `window`), float32, resized bilinearly to
    `size` (h, w): (N, K, h, w). This is single-scale evaluation."""
    logits = forward(images) if window is None else slide_logits(forward, images, window)
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)


def multiscale_scores(forward: Forward, images: torch.Tensor, size: Sequence[int],
                      scales: Sequence[float] = (1.0,), flip: bool = False, window: Window | None = None
                      ) -> torch.Tensor:
    """The class scores (N, K, h, w) of `images` (N, 3, H, W) at `size` (h, w) under the protocol of the module
    docstring: the mean softmax probability over `scales` and, with `flip`, the mirror images; with scales (1.0,)
    and no flip, the single pass's resized logits (`pass_logits`). Passes run one after another, so memory is
    that of the largest scale's pass plus two (N, K, h, w) float32 maps.

    `forward` runs under whatever context the caller set (no_grad, autocast); the sums are float32.
    """
    if is_single_scale(scales, flip):
        return pass_logits(forward, images, size, window)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return forward(x) if window is None else slide_logits(forward, x, window)

    def probabilities(logits: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False).softmax(1)

    mirrors = (False, True) if flip else (False,)
    total: torch.Tensor | None = None
    for scale in scales:
        resized = resize_images(images, float(scale))
        # a scale's two passes are summed first: for a mirror-symmetric model that is exactly twice the plain one,
        # so flips change nothing, not even the rounding
        probs = probabilities(logits_of(resized))
        if flip:
            probs = probs.add_(probabilities(logits_of(resized.flip(-1)).flip(-1)))
        total = probs if total is None else total.add_(probs)
    assert total is not None  # at least one scale (data.eval_scales is validated non-empty)
    return total.div_(len(scales) * len(mirrors))
