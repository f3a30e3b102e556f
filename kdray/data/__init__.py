"""Datasets (raw `(image, mask)` items), joint transforms, and the resumable per-iteration sampler.

`data.dataset` picks the loader by its registered name (`kdray.data.registry`: each dataset declares its
classes, splits, image sizes and options on its own class); a user's own datasets come in through a job's
`plugins:`. The engine asks for the `train` and `val` roles, which `split_name` maps to the dataset's split names.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch.utils.data import Dataset, Subset

from kdray.config.schema import DataConfig
from kdray.data.files import SAMPLE_MASKS, FileSegmentation
from kdray.data.registry import DATASETS, DatasetRequest, DatasetSpec, dataset_spec, register_dataset
from kdray.data.sampling import IterationBatchSampler, TransformedDataset
from kdray.data.transforms import eval_transforms, train_transforms
from kdray.data.tune_split import tune_split_indices, tune_split_on

# Every module of the package, so that a built-in dataset is its file (its loader class is imported from its
# module, e.g. `kdray.data.cityscapes.Cityscapes`): nothing else lists it.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "DATASETS", "DatasetRequest", "DatasetSpec", "FileSegmentation", "IterationBatchSampler", "TransformedDataset",
    "build_dataset", "class_names", "class_palette", "dataset_spec", "eval_transforms", "raw_dataset",
    "register_dataset", "split_name", "train_transforms",
]


def split_name(cfg: DataConfig, role: str) -> str:
    """The split that plays `role` (`train` or `val`): the job's `data.<role>_split`, else the papers' one."""
    train, val = dataset_spec(cfg.dataset).paper_splits
    if role == "train":
        return cfg.train_split or train
    if role == "val":
        return cfg.val_split or val
    raise ValueError(f"role must be 'train' or 'val', got {role!r}")


def raw_dataset(cfg: DataConfig, role: str, sample_check: int = SAMPLE_MASKS) -> Dataset:
    """The untransformed dataset for `role`. A file dataset checks its tree and `sample_check` masks now
    (DataError on a missing root, empty split, unpaired file or bad mask value)."""
    return dataset_spec(cfg.dataset).make(cfg, split_name(cfg, role), role, sample_check)


def build_dataset(cfg: DataConfig, split: str) -> TransformedDataset:
    """The `train` role with the training augmentations, or `val` with evaluation transforms.

    With `data.tune_split` on (`kdray.data.tune_split`), both come from the training split: `train` is it without
    the tune items, `val` is the tune items (a `Subset` of the raw training split, evaluation transforms); the
    val split is not read. DataError naming `data.tune_split.fraction` when a side would be empty."""
    n = cfg.normalize
    if split == "train":
        transform = train_transforms(cfg.crop, cfg.scale_range, cfg.flip, n.mean, n.std, n.order, cfg.ignore_index)
    else:
        transform = eval_transforms(n.mean, n.std, n.order)
    if not tune_split_on(cfg):
        return TransformedDataset(raw_dataset(cfg, split), transform)
    source = raw_dataset(cfg, "train")
    train, tune = tune_split_indices(len(source), cfg.tune_split.fraction, cfg.tune_split.seed)
    return TransformedDataset(Subset(source, train if split == "train" else tune), transform)


def class_names(cfg: DataConfig) -> list[str]:
    """The dataset's class names in id order (no files are read); `class_<k>` for each id when the job's
    data.num_classes differs from the dataset's count."""
    spec = dataset_spec(cfg.dataset)
    names = list(spec.names(spec.options_of(cfg)))
    return names if len(names) == cfg.num_classes else [f"class_{k}" for k in range(cfg.num_classes)]


def class_palette(cfg: DataConfig) -> tuple[tuple[int, int, int], ...]:
    """The (r, g, b) colour of each class id 0..data.num_classes-1 (no files are read): the dataset's registered
    palette, or generated well-separated colours when it has none or the job's class count differs from it
    (`DatasetSpec.colours`)."""
    return dataset_spec(cfg.dataset).colours(cfg.num_classes)
