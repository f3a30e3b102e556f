"""The per-class sums of a feature map, `one_hot(y↓)ᵀ @ f`: what IFVD's and I2CKD's prototypes are made of."""

from __future__ import annotations

from torch import Tensor

# Pixels per chunk of the split reduction on CUDA: enough for a matrix unit to stream, few enough for many blocks.
_CHUNK_PIXELS = 512


def class_sums(features: Tensor, one_hot: Tensor, chunks: int | None = None) -> Tensor:
    """`S[n, c, k] = Σ_i one_hot[n, k, i] · features[n, c, i]`: (N, C, M), (N, K, M) -> (N, C, K).

    A product whose reduction (M = h·w pixels, 8192 at the papers' shape) dwarfs its output (C×K, e.g.
    256×19): cuBLAS runs it on a handful of thread blocks, so most of a GPU idles through a long serial
    reduction. On CUDA the pixels are split into chunks of about 512, one batched product gives each
    chunk's sums and a sum adds them up: many blocks, and the two copies this takes are of the inputs' size.
    On the CPU (where the one product is fast) it is that product, features on the left, as autograd's
    backward then needs no copy. `chunks` (dividing M) overrides the choice, on any device. Differentiable in
    both arguments.
    """
    n, c, m = features.shape
    if chunks is None:
        chunks = _chunks(m) if features.is_cuda else 1
    if chunks == 1:
        return features @ one_hot.mT
    k = one_hot.shape[1]
    pieces = features.reshape(n, c, chunks, m // chunks).transpose(1, 2)  # (N, S, C, m)
    masks = one_hot.reshape(n, k, chunks, m // chunks).permute(0, 2, 3, 1)  # (N, S, m, K)
    return (pieces @ masks).sum(dim=1)


def _chunks(pixels: int) -> int:
    """The most chunks (a power of two up to 64) that split `pixels` evenly into pieces of ≥ _CHUNK_PIXELS."""
    chunks = 64
    while chunks > 1 and (pixels % chunks or pixels // chunks < _CHUNK_PIXELS):
        chunks //= 2
    return chunks
