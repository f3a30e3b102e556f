"""Datasets (raw `(image, mask)` items), joint transforms, and the resumable per-iteration sampler.

`data.dataset` picks the loader: synthetic (built in), cityscapes, voc, camvid, or folder (a user's own data);
the engine asks for the `train` and `val` roles, which `split_name` maps to the dataset's split names.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from kdray.config.schema import PAPER_SPLITS, DataConfig
from kdray.data import camvid, cityscapes, voc
from kdray.data.camvid import CamVid
from kdray.data.cityscapes import Cityscapes
from kdray.data.files import SAMPLE_MASKS, FileSegmentation
from kdray.data.folder import FolderSegmentation
from kdray.data.sampling import IterationBatchSampler, TransformedDataset
from kdray.data.synthetic import SyntheticSegmentation
from kdray.data.transforms import eval_transforms, train_transforms
from kdray.data.voc import VOCAug

__all__ = [
    "CamVid", "Cityscapes", "FileSegmentation", "FolderSegmentation", "IterationBatchSampler",
    "SyntheticSegmentation", "TransformedDataset", "VOCAug", "build_dataset", "class_names", "eval_transforms",
    "raw_dataset", "split_name", "train_transforms",
]

_LOADERS = {"cityscapes": Cityscapes, "voc": VOCAug, "camvid": CamVid}
_CLASS_NAMES = {"cityscapes": cityscapes.CLASS_NAMES, "voc": voc.CLASS_NAMES, "camvid": camvid.CLASS_NAMES}


def split_name(cfg: DataConfig, role: str) -> str:
    """The split that plays `role` (`train` or `val`): the job's `data.<role>_split`, else the papers' one."""
    train, val = PAPER_SPLITS[cfg.dataset]
    if role == "train":
        return cfg.train_split or train
    if role == "val":
        return cfg.val_split or val
    raise ValueError(f"role must be 'train' or 'val', got {role!r}")


def raw_dataset(cfg: DataConfig, role: str, sample_check: int = SAMPLE_MASKS) -> Dataset:
    """The untransformed dataset for `role`. A file dataset checks its tree and `sample_check` masks now
    (DataError on a missing root, empty split, unpaired file or bad mask value)."""
    split = split_name(cfg, role)
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        length = s.train_length if role == "train" else s.val_length
        return SyntheticSegmentation(split, length=length, image_size=s.image_size, seed=s.seed)
    if cfg.dataset == "folder":
        return FolderSegmentation(cfg.root, split, cfg.folder.class_names or (), cfg.ignore_index, sample_check)
    return _LOADERS[cfg.dataset](cfg.root, split, cfg.ignore_index, sample_check)


def build_dataset(cfg: DataConfig, split: str) -> TransformedDataset:
    """The `train` split with the training augmentations, or `val` with evaluation transforms."""
    n = cfg.normalize
    if split == "train":
        transform = train_transforms(cfg.crop, cfg.scale_range, cfg.flip, n.mean, n.std, n.order, cfg.ignore_index)
    else:
        transform = eval_transforms(n.mean, n.std, n.order)
    return TransformedDataset(raw_dataset(cfg, split), transform)


def class_names(cfg: DataConfig) -> list[str]:
    """The dataset's class names in id order (no files are read)."""
    if cfg.dataset == "synthetic":
        names = list(SyntheticSegmentation.class_names)
    elif cfg.dataset == "folder":
        names = list(cfg.folder.class_names or ())
    else:
        names = list(_CLASS_NAMES[cfg.dataset])
    return names if len(names) == cfg.num_classes else [f"class_{k}" for k in range(cfg.num_classes)]
