"""Datasets (raw `(image, mask)` items), joint transforms, and the resumable per-iteration sampler."""

from __future__ import annotations

from torch.utils.data import Dataset

from kdray.config.schema import DataConfig
from kdray.data.sampling import IterationBatchSampler, TransformedDataset
from kdray.data.synthetic import SyntheticSegmentation
from kdray.data.transforms import eval_transforms, train_transforms

__all__ = [
    "IterationBatchSampler", "SyntheticSegmentation", "TransformedDataset", "build_dataset", "class_names",
    "eval_transforms", "train_transforms",
]


def _raw(cfg: DataConfig, split: str) -> Dataset:
    s = cfg.synthetic
    length = s.train_length if split == "train" else s.val_length
    return SyntheticSegmentation(split, length=length, image_size=s.image_size, seed=s.seed)


def build_dataset(cfg: DataConfig, split: str) -> TransformedDataset:
    """The `train` split with the training augmentations, or `val` with evaluation transforms."""
    n = cfg.normalize
    if split == "train":
        transform = train_transforms(cfg.crop, cfg.scale_range, cfg.flip, n.mean, n.std, n.order, cfg.ignore_index)
    else:
        transform = eval_transforms(n.mean, n.std, n.order)
    return TransformedDataset(_raw(cfg, split), transform)


def class_names(cfg: DataConfig) -> list[str]:
    names = list(getattr(_raw(cfg, "val"), "class_names", ()))
    return names if len(names) == cfg.num_classes else [f"class_{k}" for k in range(cfg.num_classes)]
