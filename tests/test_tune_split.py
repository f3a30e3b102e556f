"""data.tune_split: a deterministic part of the training split held out and evaluated on instead of val.

The carve (disjoint, complete, seeded, independent of run.seed), what the train and val roles serve with it on
(the synthetic dataset and a small folder tree), the digest and MLflow tags, the config keys and their errors,
the pre-flight batch check on the carved size, and that fraction 0 changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_datasets import folder_tree, index_of
from torch.utils.data import DataLoader

from kdray import contract
from kdray import train as train_cli
from kdray.config import job_from_dict, load_job
from kdray.config.schema import DataConfig, TuneSplitConfig
from kdray.data import (
    IterationBatchSampler,
    TransformedDataset,
    build_dataset,
    eval_transforms,
    raw_dataset,
    train_transforms,
)
from kdray.data.folder import FolderOptions
from kdray.data.synthetic import SyntheticOptions, SyntheticSegmentation
from kdray.data.tune_split import (
    item_id,
    summarize_tune_split,
    tune_split_digest,
    tune_split_indices,
    tune_split_tags,
)
from kdray.engine import RankContext
from kdray.engine.evaluate import evaluation_loader
from kdray.engine.inputs import open_splits
from kdray.errors import ConfigError, DataError

KEY = "data.tune_split.fraction"


def naive_digest(ids: list[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()


def synthetic_cfg(fraction: float = 0.0, seed: int = 0, train_length: int = 40) -> DataConfig:
    cfg = DataConfig(crop=(32, 32), tune_split=TuneSplitConfig(fraction, seed))
    cfg.synthetic = SyntheticOptions(image_size=48, train_length=train_length, val_length=6)
    return cfg


def same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return a[0].shape == b[0].shape and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# --- the carve ------------------------------------------------------------------------------------------------------

CASES = [(n, f) for n, f in [(2, 0.5), (3, 1e-9), (7, 0.01), (10, 0.1), (10, 0.94), (1000, 0.999), (1000, 1e-6)]]
CASES += [(n, f) for n, f in ((random.Random(k).randint(10, 3000), random.Random(-k).uniform(0.001, 0.9))
                              for k in range(12))]


@pytest.mark.parametrize(("n", "fraction"), CASES)
def test_the_parts_are_sorted_disjoint_and_cover_the_split(n, fraction):
    train, tune = tune_split_indices(n, fraction, seed=5)
    assert train == sorted(train) and tune == sorted(tune)
    assert not set(train) & set(tune)
    assert sorted(train + tune) == list(range(n))
    assert len(tune) == max(1, round(fraction * n)) and len(train) >= 1


def test_the_permutation_is_the_documented_one():
    """Indices ordered by sha256("<seed>:<index>"): nothing a library version can change."""
    n, fraction, seed = 50, 0.2, 7
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    assert tune_split_indices(n, fraction, seed)[1] == sorted(order[:10])


def test_deterministic_and_seed_sensitive_and_nested():
    a = tune_split_indices(500, 0.1, seed=0)
    assert a == tune_split_indices(500, 0.1, seed=0)
    assert a[1] != tune_split_indices(500, 0.1, seed=1)[1]
    assert set(a[1]) < set(tune_split_indices(500, 0.3, seed=0)[1])  # a larger fraction holds out more of the same
    jobs = [job_from_dict({}, ["data.synthetic.train_length=50", "data.tune_split.fraction=0.2", f"run.seed={s}"])
            for s in (0, 1)]  # every trial of a search, whatever its seed, holds out the same images
    assert summarize_tune_split(jobs[0].data) == summarize_tune_split(jobs[1].data)


@pytest.mark.parametrize(("n", "fraction", "fragment"), [
    (10, 0.96, "holds out 10 of the 10 images"),  # rounds up to the whole split
    (1, 0.5, "holds out 1 of the 1 images"),  # at least one is held out: nothing left
    (0, 0.5, "holds out none of the 0 images"),
    (10, 0.0, "holds out none of the 10 images"),
])
def test_an_empty_part_is_a_data_error_naming_the_key(n, fraction, fragment):
    with pytest.raises(DataError, match=rf"data\.tune_split\.fraction={fraction!r} {fragment}"):
        tune_split_indices(n, fraction, seed=0)


# --- what the roles serve ---------------------------------------------------------------------------------------------


def test_synthetic_roles_serve_the_carved_items_with_their_transforms():
    cfg = synthetic_cfg(0.25, seed=3)
    raw = SyntheticSegmentation("train", 40, 48)
    keep, tune = tune_split_indices(40, 0.25, 3)
    n = cfg.normalize
    train_tf = train_transforms(cfg.crop, cfg.scale_range, cfg.flip, n.mean, n.std, n.order, cfg.ignore_index)
    eval_tf = eval_transforms(n.mean, n.std, n.order)

    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert (len(train_set), len(val_set)) == (30, 10)
    for j, i in enumerate(tune):  # the tune items of the training split, whole, evaluation transforms
        image, mask = val_set[j]
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert same((image, mask), eval_tf(*raw[i]))
    for j in (0, 7, 29):  # the rest, with the same random augmentation as the uncarved split would give
        assert same(train_set[(j, 11)], TransformedDataset(raw, train_tf)[(keep[j], 11)])
        assert train_set[(j, 11)][0].shape == (3, 32, 32)
    served = {raw[i][0].numpy().tobytes() for i in tune}
    trained = {train_set.dataset[j][0].numpy().tobytes() for j in range(len(train_set))}
    assert not served & trained  # no tune image is trained on
    val_split = SyntheticSegmentation("val", 6, 48)
    assert not same(val_set[0], eval_tf(*val_split[0]))  # the val split is not what is served


def test_the_engine_loaders_take_the_carved_roles():
    cfg = synthetic_cfg(0.25, seed=3)
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    sampler = IterationBatchSampler(len(train_set), 4, 0, 1, seed=0, start=0, stop=8)  # two epochs of 30 // 4
    seen = [i for batch in sampler for i, _ in batch]
    assert max(seen) < 30
    images, labels = next(iter(DataLoader(train_set, batch_sampler=sampler)))
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4, 32, 32)
    ranks = [list(evaluation_loader(val_set, 1, RankContext(rank=r, world_size=2))) for r in (0, 1)]
    assert sum(len(batches) for batches in ranks) == 10


@pytest.fixture
def tree(tmp_path):
    """A folder tree: train img0..img9 (img<i> has colour i; odd i .png, even .jpg), val 2 images."""
    return folder_tree(tmp_path / "data", splits=(("train", 10), ("val", 2)))


def folder_cfg(root: Path, fraction: float, seed: int = 1) -> DataConfig:
    cfg = DataConfig(dataset="folder", root=str(root), num_classes=3, crop=(16, 16),
                     tune_split=TuneSplitConfig(fraction, seed))
    cfg.folder = FolderOptions(("a", "b", "c"))
    return cfg


def image_path(i: int) -> str:
    return f"train/images/img{i}.{'png' if i % 2 else 'jpg'}"


def test_folder_roles_and_ids(tree):
    cfg = folder_cfg(tree, 0.3)
    keep, tune = tune_split_indices(10, 0.3, 1)
    raw = raw_dataset(cfg, "train")
    assert [index_of(raw[i][0]) for i in range(10)] == list(range(10))  # index i is img<i>
    val_set, train_set = build_dataset(cfg, "val"), build_dataset(cfg, "train")
    assert [index_of(val_set.dataset[j][0]) for j in range(len(val_set))] == tune
    assert [index_of(train_set.dataset[j][0]) for j in range(len(train_set))] == keep
    n = cfg.normalize
    for j, i in enumerate(tune):
        assert same(val_set[j], eval_transforms(n.mean, n.std, n.order)(*raw[i]))
    assert [item_id(raw, i, "folder", "train", cfg.root) for i in tune] == [image_path(i) for i in tune]
    assert item_id(raw, 3, "folder", "train", None).endswith("/data/train/images/img3.png")  # no root: whole path


def test_digest_and_tags(tree, tmp_path):
    cfg = folder_cfg(tree, 0.3)
    tune = tune_split_indices(10, 0.3, 1)[1]
    expected = naive_digest([image_path(i) for i in tune])
    assert tune_split_digest([image_path(i) for i in reversed(tune)]) == expected  # the order does not matter
    tags = tune_split_tags(cfg)
    assert tags == {"kdray.eval_split": "tune", "kdray.tune_split.digest": expected,
                    "kdray.tune_split.size": "3", "kdray.tune_split.train_size": "7"}
    assert set(tags) == {contract.EVAL_SPLIT, contract.TUNE_SPLIT_DIGEST, contract.TUNE_SPLIT_SIZE,
                         contract.TUNE_SPLIT_TRAIN_SIZE}
    assert tune_split_tags(folder_cfg(tree, 0.3, seed=2))[contract.TUNE_SPLIT_DIGEST] != expected
    copy = shutil.copytree(tree, tmp_path / "elsewhere")  # the same files under another root: the same digest
    assert summarize_tune_split(folder_cfg(copy, 0.3)).digest == expected


def test_synthetic_ids_and_tags_off():
    cfg = synthetic_cfg(0.1, seed=4)
    tune = tune_split_indices(40, 0.1, 4)[1]
    assert tune_split_tags(cfg)[contract.TUNE_SPLIT_DIGEST] == naive_digest([f"synthetic:train:{i}" for i in tune])
    off = synthetic_cfg(0.0)
    off.val_split = "holdout"  # off: the val split's name, no file read
    assert tune_split_tags(off) == {"kdray.eval_split": "holdout"}


def test_fraction_zero_leaves_build_dataset_as_it_was():
    for cfg in (synthetic_cfg(), synthetic_cfg(0.0, seed=9)):
        train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
        assert type(train_set.dataset) is SyntheticSegmentation and train_set.dataset.split == "train"
        assert type(val_set.dataset) is SyntheticSegmentation and val_set.dataset.split == "val"
        assert (len(train_set), len(val_set)) == (40, 6)
        n = cfg.normalize
        assert same(val_set[2], eval_transforms(n.mean, n.std, n.order)(*SyntheticSegmentation("val", 6, 48)[2]))


# --- the config -------------------------------------------------------------------------------------------------------


def test_loads_from_a_mapping_yaml_and_overrides(tmp_path):
    assert job_from_dict({}).data.tune_split == TuneSplitConfig(0.0, 0)
    job = job_from_dict({"data": {"tune_split": {"fraction": 0.1, "seed": 3}}})
    assert job.data.tune_split == TuneSplitConfig(0.1, 3)
    job = job_from_dict({}, ["data.tune_split.fraction=0.2", "data.tune_split.seed=5"])
    assert job.data.tune_split == TuneSplitConfig(0.2, 5) and isinstance(job.data.tune_split.fraction, float)
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump({"data": {"tune_split": {"fraction": 0, "seed": 1}}}))
    assert load_job(path, ["data.tune_split.fraction=1e-1"]).data.tune_split == TuneSplitConfig(0.1, 1)


@pytest.mark.parametrize(("value", "shown"), [("-0.1", "-0.1"), ("1.0", "1.0"), (".nan", "nan"), (".inf", "inf")])
def test_fraction_out_of_range_names_key_value_and_range(value, shown):
    with pytest.raises(ConfigError, match=rf"^data\.tune_split\.fraction: got {shown}; must be finite, >= 0 and < 1"):
        job_from_dict({}, [f"data.tune_split.fraction={value}"])


@pytest.mark.parametrize("override", ["data.tune_split.seed=x", "data.tune_split.fractio=0.1",
                                      "data.tune_split=0.1"])
def test_bad_keys_and_types_are_refused(override):
    with pytest.raises(ConfigError, match=r"data\.tune_split"):
        job_from_dict({}, [override])


def tiny_job(*overrides: str):
    return job_from_dict({}, ["data.synthetic.train_length=20", "data.synthetic.val_length=3",
                              "data.batch_size=16", *overrides])


def test_a_fraction_leaving_nothing_to_train_on_is_a_data_error():
    job = tiny_job("data.tune_split.fraction=0.99")
    for make in (lambda: open_splits(job), lambda: build_dataset(job.data, "train"),
                 lambda: build_dataset(job.data, "val")):
        with pytest.raises(DataError, match=r"data\.tune_split\.fraction=0\.99 holds out 20 of the 20 images"):
            make()


def test_the_batch_check_counts_the_carved_training_size():
    assert open_splits(tiny_job()) == {"train": 20, "val": 3}
    assert open_splits(tiny_job("data.tune_split.fraction=0.2")) == {"train": 16, "val": 4}
    with pytest.raises(DataError, match=r"the train split has 20 images \(15 after data\.tune_split\.fraction=0\.25 "
                                        r"holds out 5 for tuning\), fewer than one global batch"):
        open_splits(tiny_job("data.tune_split.fraction=0.25"))


def test_dry_run_states_the_tune_split(capsys):
    overrides = ["data.synthetic.train_length=100", "data.tune_split.fraction=0.1", "data.tune_split.seed=2"]
    assert train_cli.main(["--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    digest = tune_split_tags(job_from_dict({}, overrides).data)[contract.TUNE_SPLIT_DIGEST]
    assert f"tune split: 10% of train (10 images, seed 2), evaluated instead of val; digest {digest[:12]}" in out
    assert "train on train (90 images)" in out
    assert train_cli.main(["--dry-run", "data.synthetic.train_length=100"]) == 0
    assert "tune split" not in capsys.readouterr().out
