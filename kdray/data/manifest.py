"""What a run trains and evaluates on, as plain facts a tracker can record: a name, where the data comes from, a
digest of exactly which items, and how many.

    split_manifest(cfg, "train")  ->  SplitManifest(name="cityscapes/train", source="/data/cityscapes",
                                                    digest="<sha256 hex>", size=2975, ...)

- A file dataset (its items are `FileSegmentation` pairs) is digested by its sorted image paths relative to
  `data.root` (`kdray.data.tune_split.item_ids`, POSIX separators): the same files give the same digest on any
  machine, whatever the root's absolute path; a file added, removed or renamed changes it. The files' contents are
  not read (that would cost a full pass over the data).
- Any other dataset (the synthetic one, a plugin's without files) is digested by its registered name, the split,
  the role, its options (`data.<dataset>`) and its item ids (`<dataset>:<split>:<index>`): the settings that
  generate its items.
- With `data.tune_split` on, the `train` role is the training split without the held-out images and the `val`
  role is the held-out images (`kdray.data.tune_split`); each is digested on its own items.

Opening a split lists its tree (no mask is read). Plain Python: `kdray.orchestration` turns a manifest into an
MLflow dataset input; nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kdray.config.loading import to_dict
from kdray.config.schema import DataConfig
from kdray.data.files import FileSegmentation
from kdray.data.tune_split import item_ids, tune_split_digest, tune_split_indices, tune_split_on

__all__ = ["SplitManifest", "run_manifests", "split_manifest"]

ROLES = ("train", "val")


@dataclass(frozen=True)
class SplitManifest:
    """The items one role of a run reads (see the module docstring for how `digest` is made)."""

    name: str  # "<dataset>/<split>", with " (minus tune split)" or " (tune split)" when the tune split carves it
    dataset: str  # data.dataset
    split: str  # the split's name (data.<role>_split, else the papers')
    role: str  # "train" or "val": what the run does with it
    source: str  # the absolute data.root, or the dataset's name when the job names no root (generated data)
    digest: str  # SHA-256 hex (64 characters) of the items (file paths, or generator settings)
    size: int  # how many items (images)
    files: bool  # whether `digest` is of file paths (else of the generator's settings)


def split_manifest(cfg: DataConfig, role: str) -> SplitManifest:
    """The manifest of the job's `role` ("train" or "val"). Raises ValueError for another role, and what opening
    the split raises (`DataError` for a missing root or split, a ConfigError for an unknown dataset)."""
    from kdray.data import raw_dataset, split_name  # the package imports this module while it initialises

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    carved = tune_split_on(cfg)
    split = split_name(cfg, "train" if carved else role)
    dataset = raw_dataset(cfg, "train" if carved else role, sample_check=0)
    indices = list(range(len(dataset)))
    name = f"{cfg.dataset}/{split}"
    if carved:
        train, tune = tune_split_indices(len(dataset), cfg.tune_split.fraction, cfg.tune_split.seed)
        indices = train if role == "train" else tune
        name += " (minus tune split)" if role == "train" else " (tune split)"
    ids = item_ids(dataset, indices, cfg.dataset, split, cfg.root)
    files = isinstance(dataset, FileSegmentation)
    if files:
        digest = tune_split_digest(ids)
    else:
        options = getattr(cfg, cfg.dataset, None) if cfg.dataset in cfg.sections() else None
        settings = {"dataset": cfg.dataset, "split": split, "role": role,
                    "options": to_dict(options) if options is not None else None, "ids": sorted(ids)}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()
    source = str(Path(cfg.root).expanduser().resolve()) if cfg.root else cfg.dataset
    return SplitManifest(name, cfg.dataset, split, role, source, digest, len(indices), files)


def run_manifests(cfg: DataConfig) -> tuple[SplitManifest, SplitManifest]:
    """`(train, val)`: what a run of a job with this `data` section trains on and evaluates on."""
    return split_manifest(cfg, "train"), split_manifest(cfg, "val")
