"""Which samples each rank trains on at each iteration, as a pure function of the iteration.

Iteration i belongs to epoch e = i // B, batch b = i % B (B = len(dataset) // global_batch, the last partial
batch of an epoch dropped). Epoch e walks a permutation seeded by (seed, e); rank r takes its contiguous
share of global batch b. Each sample also gets its own augmentation seed, so the random scale/crop/flip of a
sample depends on (seed, iteration, position) alone: not on the number of DataLoader processes, and not on
whether the run was interrupted. That is what makes a resumed run land on the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from kdray.errors import DataError

_MASK63 = (1 << 63) - 1


class IterationBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batch of `(index, augmentation_seed)` pairs for iterations `start .. stop-1`."""

    def __init__(self, dataset_size: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start: int, stop: int):
        if dataset_size < global_batch:
            raise DataError(f"the training split has {dataset_size} samples, fewer than one global batch "
                            f"({global_batch}): lower data.batch_size or add data")
        if global_batch % world_size:
            raise DataError(f"global batch {global_batch} does not split over {world_size} workers")
        self.n, self.global_batch, self.rank, self.world = dataset_size, global_batch, rank, world_size
        self.local = global_batch // world_size
        self.seed, self.start, self.stop = seed, start, stop
        self.batches_per_epoch = dataset_size // global_batch
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        epoch, b = divmod(iteration, self.batches_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & _MASK63)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        first = b * self.global_batch + self.rank * self.local
        indices = self._perm[first:first + self.local].tolist()
        base = ((self.seed & 0xFFFFF) << 40) ^ (iteration << 12)
        return [(idx, (base + self.rank * self.local + j) & _MASK63) for j, idx in enumerate(indices)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start, self.stop):
            yield self.batch(iteration)


class TransformedDataset(Dataset):
    """Applies a joint transform to `(image, mask)` items; a key `(index, seed)` fixes its randomness."""

    def __init__(self, dataset: Dataset, transform: Any):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.transform(*self.dataset[index])
        return self.transform(*self.dataset[key])
