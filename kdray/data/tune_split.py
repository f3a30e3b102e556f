"""The tune split: a deterministic part of the *training* split that a run evaluates on instead of the val split.

A hyper-parameter search must not select on the split it reports. With `data.tune_split.fraction` f > 0
(`kdray.config.schema.TuneSplitConfig`), the N items of the training split are ordered by a permutation seeded
by `data.tune_split.seed` alone (never run.seed: every trial of a search, whatever its seed, holds out the same
images), and the first k = round(f * N) of them, at least 1, are the tune items. Then
- the `train` role serves the training split without the tune items, with the training augmentations;
- the `val` role serves the tune items, with the evaluation transforms; the val split is not read.
f = 0 (the default) is off: both roles are the splits they always were.

Guarantees:
- the training and tune indices are sorted, disjoint and together 0..N-1;
- they depend on (N, f, seed) only: the permutation orders the indices by the SHA-256 of `"<seed>:<index>"`,
  which no library version or platform changes; a larger f holds out a superset of a smaller one's items;
- an empty side is an error (`DataError` naming `data.tune_split.fraction`), never a silent no-op;
- `tune_split_digest` of the tune items' ids (an image path relative to `data.root` for a file dataset,
  `<dataset>:<split>:<index>` for one without paths) is the same for two runs that hold out the same files.

Plain Python and torch: the caller logs `tune_split_tags` (MLflow tags named in `kdray.contract`) itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from torch.utils.data import Dataset

from kdray import contract
from kdray.config.schema import DataConfig
from kdray.data.files import FileSegmentation
from kdray.errors import DataError

KEY = "data.tune_split.fraction"
TUNE = "tune"  # the value of the `kdray.eval_split` tag when the tune split is on


def tune_split_on(cfg: DataConfig) -> bool:
    """Whether the job holds out a tune split (`data.tune_split.fraction` > 0)."""
    return cfg.tune_split.fraction > 0


def eval_split(cfg: DataConfig) -> str:
    """What a run's val/* metrics measure (the `kdray.eval_split` tag's value): TUNE when the tune split is on,
    else the val split's name. Opens nothing."""
    from kdray.data import split_name  # the package imports this module while it initialises

    return TUNE if tune_split_on(cfg) else split_name(cfg, "val")


def tune_split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`(train_indices, tune_indices)` of a training split of `n` items: sorted, disjoint, together 0..n-1.

    The tune part has round(fraction * n) items, at least 1 (see the module docstring for how they are chosen).
    DataError naming `data.tune_split.fraction` when either part would be empty (fraction <= 0, an empty split,
    or a fraction that leaves no item to train on).
    """
    k = min(max(1, round(fraction * n)), n) if fraction > 0 else 0
    if k == 0:
        raise DataError(f"{KEY}={fraction!r} holds out none of the {n} images of the training split: set a fraction "
                        f"> 0 of a split that has images, or 0 to turn the tune split off")
    if k == n:
        raise DataError(f"{KEY}={fraction!r} holds out {k} of the {n} images of the training split, leaving none to "
                        f"train on: lower it (at most {n - 1} of the {n} can be held out)")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    tune = sorted(order[:k])
    held = set(tune)
    return [i for i in range(n) if i not in held], tune


def item_id(dataset: Dataset, index: int, name: str, split: str, root: str | None = None) -> str:
    """The identifier of item `index` of `dataset` (split `split` of the registered dataset `name`): for a file
    dataset its image path relative to `root` (POSIX separators; the whole path when it is not under `root`),
    for any other `"<name>:<split>:<index>"`."""
    if isinstance(dataset, FileSegmentation):
        image = Path(dataset.samples[index].image)
        if root is not None:
            try:
                return image.relative_to(Path(root).expanduser()).as_posix()
            except ValueError:
                pass
        return image.as_posix()
    return f"{name}:{split}:{index}"


def item_ids(dataset: Dataset, indices: Iterable[int], name: str, split: str, root: str | None = None) -> list[str]:
    """`item_id` of each of `indices`, in their order."""
    return [item_id(dataset, i, name, split, root) for i in indices]


def tune_split_digest(ids: Sequence[str]) -> str:
    """SHA-256 hex (64 characters) of the tune items' ids: sorted, then JSON-encoded (a list of strings) as UTF-8.
    The order the ids come in does not matter."""
    return hashlib.sha256(json.dumps(sorted(ids)).encode("utf-8")).hexdigest()


class TuneSplitSummary(NamedTuple):
    """What a run with the tune split on holds out, as the plan and the MLflow tags state it."""

    train_size: int  # images left to train on
    tune_size: int  # images held out and evaluated on instead of the val split
    digest: str  # `tune_split_digest` of the held-out images' ids


def summarize_tune_split(cfg: DataConfig) -> TuneSplitSummary:
    """Open the job's training split (its tree, no mask read) and carve it; DataError as `tune_split_indices`,
    or as the dataset when the tree is wrong. Only for a job with the tune split on."""
    from kdray.data import raw_dataset, split_name  # the package imports this module while it initialises

    dataset = raw_dataset(cfg, "train", sample_check=0)
    train, tune = tune_split_indices(len(dataset), cfg.tune_split.fraction, cfg.tune_split.seed)
    ids = item_ids(dataset, tune, cfg.dataset, split_name(cfg, "train"), cfg.root)
    return TuneSplitSummary(len(train), len(tune), tune_split_digest(ids))


def tune_split_tags(cfg: DataConfig) -> dict[str, str]:
    """The MLflow tags (names in `kdray.contract`) saying what a run evaluates on: `kdray.eval_split` ("tune",
    or the val split's name when the tune split is off), and when it is on the tune split's digest, its size
    and the training images left. Opens the training split when on (see `summarize_tune_split`)."""
    if not tune_split_on(cfg):
        return {contract.EVAL_SPLIT: eval_split(cfg)}
    summary = summarize_tune_split(cfg)
    return {contract.EVAL_SPLIT: TUNE, contract.TUNE_SPLIT_DIGEST: summary.digest,
            contract.TUNE_SPLIT_SIZE: str(summary.tune_size), contract.TUNE_SPLIT_TRAIN_SIZE: str(summary.train_size)}
