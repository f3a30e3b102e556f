"""ADE20K (SceneParsing, ADEChallengeData2016) on a small fake tree: the label rule (0 ignored, v is class v - 1),
the registered facts, the tree errors, and the two paper jobs through `kdray.train --dry-run --check-data` and
`kdray.sweep --dry-run` (which plans without starting Ray).

The tree is `ade20k_tree` of test_datasets.py (JPEG images, PNG annotations holding every value 0..150), which also
puts ADE20K through the tests every dataset there passes (paper splits, missing root or split, every shipped job's
`--dry-run`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_datasets import H, W, ade20k_tree, assert_pairs, colour, error_of, fake_job_inputs, pattern, save

from kdray import train as train_cli
from kdray.config.schema import DataConfig
from kdray.data import DATASETS, class_names
from kdray.data.ade20k import ADE20K, CLASS_NAMES, PALETTE, annotation_codec
from kdray.errors import DataError

REPO = Path(__file__).resolve().parents[1]
JOBS = ("ade20k_dl101_to_dl18.yaml", "ade20k_dl101_to_psp18.yaml")
TRAIN = "annotations/training"


def expected_classes(raw: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """The SceneParsing rule written out: 0 -> ignore, v -> v - 1."""
    classes = raw.astype(np.int64) - 1
    classes[raw == 0] = ignore_index
    return classes


# --- the label rule and the facts -------------------------------------------------------------------------------


def test_annotations_are_read_as_value_minus_one_with_zero_ignored(tmp_path):
    root = ade20k_tree(tmp_path)
    train, val = ADE20K(root, "training"), ADE20K(root, "validation")
    assert (len(train), len(val)) == (3, 2) and train.num_classes == 150
    assert [s.image.name for s in val.samples] == ["ADE_val_00000001.jpg", "ADE_val_00000002.jpg"]
    assert_pairs(train, lambda i: expected_classes(pattern(i, 151)))
    assert_pairs(val, lambda i: expected_classes(pattern(i, 151)))

    raw = pattern(0, 151)  # every value 0..150, at known places
    mask = train[0][1].numpy()
    assert mask[raw == 0].tolist() == [255] * int((raw == 0).sum())
    assert set(mask[raw == 1].tolist()) == {0} and set(mask[raw == 150].tolist()) == {149}
    assert set(np.unique(mask)) == set(range(150)) | {255}


def test_the_ignore_value_is_the_jobs():
    raw = np.array([[0, 1, 150]], np.uint8)
    assert annotation_codec(-1).decode(raw, Path("a.png")).tolist() == [[-1, 0, 149]]  # CIRKD's ignore label
    assert annotation_codec(255).decode(raw, Path("a.png")).tolist() == [[255, 0, 149]]


def test_the_spec_states_the_sceneparsing_facts():
    spec = DATASETS["ade20k"]
    assert spec.class_names == CLASS_NAMES and len(CLASS_NAMES) == len(set(CLASS_NAMES)) == 150
    assert CLASS_NAMES[:5] == ("wall", "building", "sky", "floor", "tree") and CLASS_NAMES[-1] == "flag"
    assert CLASS_NAMES[12] == "person" and CLASS_NAMES[20] == "car"  # objectInfo150 ids 13 and 21
    assert spec.splits == ("training", "validation") and spec.paper_splits == ("training", "validation")
    assert spec.void == 0 and spec.label_map == {v: v - 1 for v in range(1, 151)}
    assert spec.eval_batch_one and spec.image_size is None and spec.needs_root
    assert len(PALETTE) == 150 and all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert PALETTE[0] == (120, 120, 120) and PALETTE[2] == (6, 230, 230)  # wall grey, sky cyan
    assert spec.palette == PALETTE and spec.colours(150) == PALETTE
    assert class_names(DataConfig(dataset="ade20k", root="/nowhere", num_classes=150))[:3] == [
        "wall", "building", "sky"]


# --- bad trees ----------------------------------------------------------------------------------------------------


def test_a_missing_root_or_folder_is_named(tmp_path):
    message = error_of(lambda: ADE20K(tmp_path / "absent", "training"))
    assert "data.root" in message and "absent" in message and "images/<split>/*.jpg" in message
    root = ade20k_tree(tmp_path / "tree")
    message = error_of(lambda: ADE20K(root, "testing"))
    assert f"{root / 'images' / 'testing'}: no such directory (the ADE20K testing images)" == message
    (root / "annotations" / "validation").rename(tmp_path / "moved")
    message = error_of(lambda: ADE20K(root, "validation"))
    assert f"{root / 'annotations' / 'validation'}: no such directory (the ADE20K validation annotations)" == message


def test_an_empty_split_is_named(tmp_path):
    for folder in ("images/training", TRAIN):
        (tmp_path / folder).mkdir(parents=True)
    save(colour(0), tmp_path / "images/training/ADE_train_00000001.png")  # not a .jpg: not an ADE20K image
    message = error_of(lambda: ADE20K(tmp_path, "training"))
    assert message == f"{tmp_path / 'images/training'}: no *.jpg images: the ADE20K training split is empty"


def test_images_and_annotations_without_their_partner_are_named(tmp_path):
    root = ade20k_tree(tmp_path)
    (root / TRAIN / "ADE_train_00000002.png").unlink()
    message = error_of(lambda: ADE20K(root, "training"))
    assert message == (f"{root / 'images/training/ADE_train_00000002.jpg'}: this image has no annotation (expected "
                       f"{root / TRAIN / 'ADE_train_00000002.png'}); 1 of 3 images have none")
    save(pattern(0, 151), root / "annotations/validation/ADE_val_00000009.png")
    message = error_of(lambda: ADE20K(root, "validation"))
    assert message.startswith(f"{root / 'annotations/validation/ADE_val_00000009.png'}: this annotation has no "
                              f"image (expected {root / 'images/validation/ADE_val_00000009.jpg'})")


def test_a_jpeg_in_an_annotations_place_is_named_as_such(tmp_path):
    root = ade20k_tree(tmp_path)
    png = root / TRAIN / "ADE_train_00000003.png"
    save(np.array(Image.open(png)), png.with_suffix(".jpg"))
    png.unlink()
    message = error_of(lambda: ADE20K(root, "training"))
    assert message.startswith(f"{png.with_suffix('.jpg')}: found a .jpg mask: lossy") and f"(expected {png})" in message


@pytest.mark.parametrize("value", [151, 255])
def test_an_annotation_value_above_150_is_named_with_its_file(tmp_path, value):
    root = ade20k_tree(tmp_path)
    path = root / "annotations/validation/ADE_val_00000002.png"
    raw = np.array(Image.open(path))
    raw[5, 7] = value
    save(raw, path)
    message = error_of(lambda: ADE20K(root, "validation"))
    assert message == f"{path}: mask value {value} is not one of the ADE20K annotation values (0..150, 0 = unlabelled)"


def test_a_mask_of_another_size_is_named(tmp_path):
    root = ade20k_tree(tmp_path)
    path = root / TRAIN / "ADE_train_00000001.png"
    save(pattern(0, 151)[: H // 2], path)
    assert f"{path}: mask is {H // 2}x{W} but its image" in error_of(lambda: ADE20K(root, "training"))


# --- the paper jobs -----------------------------------------------------------------------------------------------


def test_check_data_reads_every_annotation_of_a_paper_job(tmp_path, capsys):
    job = str(REPO / "jobs" / "ade20k_dl101_to_psp18.yaml")
    overrides = fake_job_inputs(tmp_path, "ade20k_dl101_to_psp18.yaml")
    assert train_cli.main(["--job", job, "--dry-run", "--check-data", "losses.kd.enabled=true", *overrides]) == 0
    out = capsys.readouterr().out
    assert "train on training (16 images), evaluate on validation (2 images), 150 classes" in out
    assert "deeplabv3_resnet101_ade20k_best_model.pth (public: the CIRKD ADE20K teacher" in out and "note:" not in out
    assert "16 training masks checked" in out and "2 validation masks checked" in out
    bad = tmp_path / "data" / TRAIN / "ADE_train_00000002.png"  # index 1: a normal start reads 0, 8 and 15
    save(np.full((H, W), 200, np.uint8), bad)
    assert train_cli.main(["--job", job, "--dry-run", *overrides]) == 0
    with pytest.raises(DataError, match=f"{bad}: mask value 200 is not one of the ADE20K annotation values"):
        train_cli.main(["--job", job, "--dry-run", "--check-data", *overrides])
