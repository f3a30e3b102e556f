"""Real-dataset loaders on small fake trees in each layout (shared/datasets.md), sliding-window evaluation, the
data rules of the config, and `python -m kdray.train --dry-run / --check-data` on every shipped job.

Every fake image i is one flat colour whose red value encodes i, and its mask is a pattern shifted by i, so a
test can tell that image i came back with mask i.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from kdray import train as train_cli
from kdray.config import load_job
from kdray.config.schema import DataConfig
from kdray.data import build_dataset, class_names, raw_dataset
from kdray.data.ade20k import ADE20K
from kdray.data.camvid import CamVid
from kdray.data.cityscapes import LABEL_TO_TRAIN_ID, Cityscapes
from kdray.data.folder import FolderOptions, FolderSegmentation
from kdray.data.voc import VOCAug
from kdray.engine import RankContext
from kdray.engine.evaluate import evaluate, evaluation_loader
from kdray.engine.sliding import slide_logits, starts, window_of
from kdray.errors import CheckpointError, ConfigError, DataError
from kdray.models import build_model

REPO = Path(__file__).resolve().parents[1]
H, W = 32, 64
ABC = ("a", "b", "c")


# --- fake trees --------------------------------------------------------------------------------------------


def colour(i: int) -> np.ndarray:
    image = np.empty((H, W, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10 * i + 5, 100, 200
    return image


def index_of(image: torch.Tensor) -> int:
    return round((float(image[0].float().mean()) - 5) / 10)


def pattern(i: int, modulo: int) -> np.ndarray:
    return ((np.arange(H * W).reshape(H, W) + i) % modulo).astype(np.uint8)


def save(array: np.ndarray, path: Path, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette:  # a palette PNG: the colours are for viewing, the stored indices are the labels
        image = image.convert("P")
        image.putpalette([(k * c) % 256 for k in range(256) for c in (37, 91, 53)])
        image.putdata(array.ravel().tolist())
    image.save(path, quality=95) if path.suffix == ".jpg" else image.save(path)
    return path


def cityscapes_tree(root: Path, splits=(("train", 3), ("val", 2)), train_ids: bool = False) -> Path:
    for split, n in splits:
        for i in range(n):
            city = "aachen" if i % 2 == 0 else "bremen"
            stem = f"{city}_{i:06d}_000019"
            save(colour(i), root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            save(pattern(i, 34), root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            if train_ids:
                trainid = pattern(i, 19)
                trainid[0, :4] = 255
                save(trainid, root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
            save(colour(i), root / "gtFine" / split / city / f"{stem}_gtFine_color.png")  # not a label: skipped
    return root


def voc_tree(root: Path, splits=(("train_aug", 4), ("val", 2))) -> Path:
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    for split, n in splits:
        ids = [f"2007_{split}_{i:06d}" for i in range(n)]
        for i, name in enumerate(ids):
            save(colour(i), root / "JPEGImages" / f"{name}.jpg")
            mask = pattern(i, 21)
            mask[-1, :] = 255  # object boundaries
            folder = "SegmentationClassAug" if split.endswith("_aug") else "SegmentationClass"
            save(mask, root / folder / f"{name}.png", palette=folder == "SegmentationClass")
        (sets / f"{split}.txt").write_text("".join(f"{name}\n" for name in ids))
    return root


def camvid_tree(root: Path, splits=(("train", 3), ("val", 1), ("test", 2))) -> Path:
    for split, n in splits:
        for i in range(n):
            name = f"0001TP_{split}_{i:06d}.png"
            save(colour(i), root / split / name)
            save(pattern(i, 12), root / f"{split}annot" / name)
    return root


def folder_tree(root: Path, splits=(("train", 3), ("val", 2)), k: int = 3) -> Path:
    for split, n in splits:
        for i in range(n):
            save(colour(i), root / split / "images" / f"img{i}.{'png' if i % 2 else 'jpg'}")
            mask = pattern(i, k)
            mask[0, 0] = 255
            save(mask, root / split / "masks" / f"img{i}.png")
    return root


def ade20k_tree(root: Path, splits=(("training", 3), ("validation", 2))) -> Path:
    """JPEG images; annotations hold 0..150 (0 unlabelled, v is class v - 1)."""
    for split, n in splits:
        prefix = "ADE_train" if split == "training" else "ADE_val"
        for i in range(n):
            save(colour(i), root / "images" / split / f"{prefix}_{i + 1:08d}.jpg")
            save(pattern(i, 151), root / "annotations" / split / f"{prefix}_{i + 1:08d}.png")
    return root


TREES = {"cityscapes": cityscapes_tree, "voc": voc_tree, "camvid": camvid_tree, "folder": folder_tree,
         "ade20k": ade20k_tree}


def assert_pairs(dataset, expected_mask) -> None:
    """Every item: image i (from its colour) with mask `expected_mask(i)`, the right types and shapes."""
    for j in range(len(dataset)):
        image, mask = dataset[j]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64 and mask.shape == (H, W)
        assert torch.equal(mask, torch.from_numpy(expected_mask(index_of(image))))


# --- reading each layout back ----------------------------------------------------------------------------------


def test_cityscapes_maps_label_ids_to_train_ids(tmp_path):
    root = cityscapes_tree(tmp_path)
    lut = np.full(256, 255, np.int64)
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    train, val = Cityscapes(root, "train"), Cityscapes(root, "val")
    assert (len(train), len(val)) == (3, 2) and train.num_classes == 19
    assert_pairs(train, lambda i: lut[pattern(i, 34)])
    assert_pairs(val, lambda i: lut[pattern(i, 34)])
    ids = np.unique(train[0][1].numpy())
    assert set(ids) == set(range(19)) | {255}  # the pattern holds every id 0..33, so every class and ignore


def test_cityscapes_prefers_label_train_ids(tmp_path):
    root = cityscapes_tree(tmp_path, train_ids=True)

    def expected(i):
        m = pattern(i, 19).astype(np.int64)
        m[0, :4] = 255
        return m

    assert_pairs(Cityscapes(root, "train"), expected)


def test_voc_reads_index_and_palette_pngs(tmp_path):
    root = voc_tree(tmp_path)

    def expected(i):
        m = pattern(i, 21).astype(np.int64)
        m[-1, :] = 255
        return m

    train, val = VOCAug(root, "train_aug"), VOCAug(root, "val")
    assert (len(train), len(val)) == (4, 2) and train.num_classes == 21
    assert Image.open(val.samples[0].mask).mode == "P"  # the val labels are palette PNGs, read as indices
    assert_pairs(train, expected)
    assert_pairs(val, expected)


def test_voc_list_lines_with_paths(tmp_path):
    root = voc_tree(tmp_path)
    ids = (root / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    (root / "ImageSets/Segmentation/train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    assert [s.image.stem for s in VOCAug(root, "train_aug").samples] == ids


def test_camvid_void_is_ignored_and_trainval_joins(tmp_path):
    root = camvid_tree(tmp_path)
    train, test = CamVid(root, "train"), CamVid(root, "test")
    assert (len(train), len(test), len(CamVid(root, "trainval"))) == (3, 2, 4)

    def expected(i):
        m = pattern(i, 12).astype(np.int64)
        m[m == 11] = 255
        return m

    assert_pairs(train, expected)
    assert_pairs(test, expected)


def test_folder_dataset_pairs_by_stem(tmp_path):
    root = folder_tree(tmp_path)

    def expected(i):
        m = pattern(i, 3).astype(np.int64)
        m[0, 0] = 255
        return m

    ds = FolderSegmentation(root, "train", ("sky", "road", "car"))
    assert len(ds) == 3 and ds.class_names == ("sky", "road", "car")
    assert_pairs(ds, expected)


@pytest.mark.parametrize("dataset", sorted(TREES))
def test_build_dataset_dispatches_with_the_paper_splits(tmp_path, dataset):
    root = TREES[dataset](tmp_path)
    k = {"cityscapes": 19, "voc": 21, "camvid": 11, "folder": 3, "ade20k": 150}[dataset]
    cfg = DataConfig(dataset=dataset, root=str(root), num_classes=k, crop=(16, 16))
    if dataset == "folder":
        cfg.folder = FolderOptions(("a", "b", "c"))
    sizes = {"cityscapes": (3, 2), "voc": (4, 2), "camvid": (3, 2), "folder": (3, 2), "ade20k": (3, 2)}[dataset]
    assert (len(raw_dataset(cfg, "train")), len(raw_dataset(cfg, "val"))) == sizes  # camvid val = test
    image, mask = build_dataset(cfg, "train")[(0, 7)]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and mask.shape == (16, 16)
    image, mask = build_dataset(cfg, "val")[0]
    assert image.shape == (3, H, W) and mask.shape == (H, W)
    names = class_names(cfg)
    assert len(names) == k and names == list(raw_dataset(cfg, "val").class_names)


def test_class_names_need_no_files():
    assert class_names(DataConfig(dataset="cityscapes", root="/nowhere", num_classes=19))[:3] == [
        "road", "sidewalk", "building"]
    assert class_names(DataConfig(dataset="voc", num_classes=21))[-1] == "tvmonitor"
    assert class_names(DataConfig(dataset="camvid", num_classes=11))[0] == "sky"
    folder = DataConfig(dataset="folder", num_classes=2)
    folder.folder = FolderOptions(("x", "y"))
    assert class_names(folder) == ["x", "y"]


# --- bad trees --------------------------------------------------------------------------------------------------


def error_of(make) -> str:
    with pytest.raises(DataError) as err:
        make()
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("dataset", sorted(TREES))
def test_missing_root_and_missing_split(tmp_path, dataset):
    open_ = {"cityscapes": Cityscapes, "voc": VOCAug, "camvid": CamVid, "ade20k": ADE20K,
             "folder": lambda r, s: FolderSegmentation(r, s, ("a", "b", "c"))}[dataset]
    message = error_of(lambda: open_(tmp_path / "absent", "train"))
    assert "data.root" in message and "absent" in message and "does not exist" in message
    root = TREES[dataset](tmp_path / "tree")
    message = error_of(lambda: open_(root, "nosuchsplit"))
    assert "nosuchsplit" in message and ("no such" in message)


def test_empty_splits(tmp_path):
    (tmp_path / "cs/leftImg8bit/train").mkdir(parents=True)
    (tmp_path / "cs/gtFine/train").mkdir(parents=True)
    assert "is empty" in error_of(lambda: Cityscapes(tmp_path / "cs", "train"))
    root = voc_tree(tmp_path / "voc")
    (root / "ImageSets/Segmentation/val.txt").write_text("\n")
    assert "val.txt" in (m := error_of(lambda: VOCAug(root, "val"))) and "empty" in m
    for sub in ("test", "testannot"):
        (tmp_path / "cv" / sub).mkdir(parents=True)
    assert "is empty" in error_of(lambda: CamVid(tmp_path / "cv", "test"))
    for sub in ("images", "masks"):
        (tmp_path / "f/train" / sub).mkdir(parents=True)
    assert "is empty" in error_of(lambda: FolderSegmentation(tmp_path / "f", "train", ("a", "b")))


def test_images_without_masks_and_masks_without_images(tmp_path):
    root = cityscapes_tree(tmp_path / "cs")
    label = next((root / "gtFine/train/aachen").glob("*_labelIds.png"))
    label.rename(tmp_path / "moved.png")
    message = error_of(lambda: Cityscapes(root, "train"))
    assert "_leftImg8bit.png" in message and "has no label" in message and "1 of 3 images" in message
    (tmp_path / "moved.png").rename(label)
    save(pattern(0, 34), root / "gtFine/train/aachen/aachen_999999_000019_gtFine_labelIds.png")
    message = error_of(lambda: Cityscapes(root, "train"))
    assert "aachen_999999_000019_gtFine_labelIds.png" in message and "has no image" in message

    root = camvid_tree(tmp_path / "cv")
    (root / "trainannot" / "0001TP_train_000001.png").unlink()
    assert "0001TP_train_000001.png: this image has no label" in error_of(lambda: CamVid(root, "train"))
    save(pattern(0, 12), root / "testannot" / "extra.png")
    assert "extra.png: this label has no image" in error_of(lambda: CamVid(root, "test"))

    root = voc_tree(tmp_path / "voc")
    (root / "SegmentationClass" / "2007_val_000001.png").unlink()
    assert "2007_val_000001" in (m := error_of(lambda: VOCAug(root, "val"))) and "has no label" in m
    (root / "JPEGImages" / "2007_train_aug_000002.jpg").unlink()
    assert "2007_train_aug_000002.jpg: no such image" in error_of(lambda: VOCAug(root, "train_aug"))

    root = folder_tree(tmp_path / "f")
    (root / "train/masks/img1.png").unlink()
    assert "img1.png: this image has no mask" in error_of(lambda: FolderSegmentation(root, "train", ABC))
    save(pattern(0, 3), root / "val/masks/lonely.png")
    assert "lonely.png: this mask has no image" in error_of(lambda: FolderSegmentation(root, "val", ABC))
    save(colour(0), root / "val/images/img0.png")  # img0.jpg is there too
    assert "same stem" in error_of(lambda: FolderSegmentation(root, "val", ABC))


@pytest.mark.parametrize(("dataset", "split", "relpath", "value", "valid"), [
    ("cityscapes", "val", "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", 40, "labelIds (0..33)"),
    ("voc", "val", "SegmentationClass/2007_val_000000.png", 30, "(0..20, 255)"),
    ("camvid", "test", "testannot/0001TP_test_000001.png", 12, "(0..11, 11 = void)"),
    ("folder", "val", "val/masks/img1.png", 3, "(0..2, 255)"),
])
def test_mask_value_outside_the_label_set(tmp_path, dataset, split, relpath, value, valid):
    root = TREES[dataset](tmp_path)
    mask = np.array(Image.open(root / relpath))
    mask[5, 7] = value
    save(mask, root / relpath, palette=dataset == "voc")
    open_ = {"cityscapes": Cityscapes, "voc": VOCAug, "camvid": CamVid,
             "folder": lambda r, s: FolderSegmentation(r, s, ("a", "b", "c"))}[dataset]
    message = error_of(lambda: open_(root, split))
    assert f"{root / relpath}: mask value {value} is not one of the" in message and valid in message


def test_unsampled_bad_mask_is_caught_by_the_full_scan_and_on_reading(tmp_path):
    root = camvid_tree(tmp_path, splits=(("train", 5), ("test", 1)))
    bad = root / "trainannot" / "0001TP_train_000001.png"  # index 1: the sample reads 0, 2 and 4
    mask = np.array(Image.open(bad))
    mask[0, 0] = 200
    save(mask, bad)
    ds = CamVid(root, "train")
    seen = []
    assert "mask value 200" in error_of(lambda: ds.check(progress=lambda done, total: seen.append((done, total))))
    assert seen == [(1, 5)]
    assert "mask value 200" in error_of(lambda: ds.check(workers=2))
    assert "mask value 200" in error_of(lambda: ds[1])


def test_wrong_mask_shape_or_channels(tmp_path):
    root = folder_tree(tmp_path)
    save(pattern(0, 3)[:16], root / "train/masks/img0.png")
    assert "mask is 16x64 but its image" in error_of(lambda: FolderSegmentation(root, "train", ("a", "b", "c")))
    save(colour(0), root / "val/masks/img0.png")
    assert "single-channel" in error_of(lambda: FolderSegmentation(root, "val", ("a", "b", "c")))


# --- config rules -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "fragments"), [
    ({"dataset": "cityscapes", "root": "x", "num_classes": 8}, ["data.num_classes", "19 classes"]),
    ({"dataset": "folder", "root": "x"}, ["data.folder.class_names", "one name per class"]),
    ({"dataset": "folder", "root": "x", "num_classes": 3, "folder": {"class_names": ["a", "b"]}},
     ["data.num_classes", "lists 2 classes"]),
    ({"dataset": "folder", "root": "x", "num_classes": 2, "folder": {"class_names": ["a", "a"]}}, ["distinct"]),
    ({"dataset": "folder", "root": "x", "folder": {"class_names": "abc"}}, ["data.folder.class_names", "a list"]),
    ({"dataset": "cityscapes", "root": "x", "num_classes": 19, "val_split": "test"},
     ["data.val_split", "'test'", "train, val"]),
    ({"dataset": "voc", "root": "x", "num_classes": 21, "train_split": "../up"}, ["data.train_split", "not a path"]),
    ({"dataset": "voc", "root": "x", "num_classes": 21, "eval_batch_size": 4}, ["data.eval_batch_size", "1"]),
    ({"eval_mode": "slide", "eval_crop": [32, 32], "eval_stride": [48, 16]}, ["data.eval_stride[0]", "1..32"]),
    ({"eval_mode": "sliding"}, ["data.eval_mode", "'whole'"]),
    ({"dataset": "camvid", "num_classes": 11}, ["data.root", "camvid"]),
])
def test_data_config_rules(data, fragments):
    from kdray.config import job_from_dict

    with pytest.raises(ConfigError) as err:
        job_from_dict({"data": data})
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


# --- sliding-window evaluation ----------------------------------------------------------------------------------


def test_window_starts_cover_the_image_and_end_flush():
    assert starts(10, 6, 4) == [0, 4]
    assert starts(1024, 512, 341) == [0, 341, 512]
    assert starts(5, 8, 4) == [0]
    assert window_of(DataConfig()) is None
    assert window_of(DataConfig(eval_mode="slide", crop=(30, 60))) == ((30, 60), (20, 40))


def test_overlapping_windows_average_their_logits():
    images = torch.arange(20.0).reshape(1, 1, 2, 10).expand(1, 3, 2, 10).contiguous()

    def window_mean(x):  # one logit channel per window: that window's mean, at the window's full size
        return x.mean(dim=(1, 2, 3), keepdim=True).expand(x.shape[0], 1, *x.shape[2:])

    logits = slide_logits(window_mean, images, ((2, 6), (2, 4)))  # windows over columns 0..5 and 4..9
    left, right = images[0, 0, :, 0:6].mean(), images[0, 0, :, 4:10].mean()
    expected = torch.cat([left.expand(2, 4), ((left + right) / 2).expand(2, 2), right.expand(2, 4)], dim=1)
    assert torch.allclose(logits[0, 0], expected)


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and the CI machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_a_window_over_the_whole_image_is_whole_image_evaluation(one_thread):
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 5, width=0.125).eval()
    images = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        whole = torch.nn.functional.interpolate(model(images).logits, size=(40, 56), mode="bilinear",
                                                align_corners=False)
        slid = slide_logits(lambda x: model(x).logits, images, ((64, 64), (32, 32)))
    assert torch.equal(whole, slid)

    labels = torch.randint(0, 5, (4, 40, 56))
    dataset = list(zip(torch.randn(4, 3, 40, 56), labels))
    loader = evaluation_loader(dataset, 1, RankContext())
    a = evaluate(model, loader, 5, 255, RankContext())
    b = evaluate(model, loader, 5, 255, RankContext(), window=((40, 56), (20, 20)))
    c = evaluate(model, loader, 5, 255, RankContext(), window=((24, 32), (16, 16)))
    assert a["miou"] == b["miou"] and np.array_equal(np.asarray(a["iou"]), np.asarray(b["iou"]), equal_nan=True)
    assert 0 <= c["miou"] <= 1


# --- the paper jobs: --dry-run and --check-data -------------------------------------------------------------------

JOBS = sorted(p.name for p in (REPO / "jobs").glob("*.yaml"))


def fake_job_inputs(tmp_path: Path, job_file: str, sizes: tuple[int, int] = (16, 2)) -> list[str]:
    """Overrides pointing a shipped job at a fake tree of its dataset and at fake weight files."""
    job = load_job(REPO / "jobs" / job_file)
    d = job.data
    if d.dataset == "synthetic":
        return []
    splits = ((d.train_split or "train", sizes[0]), (d.val_split or "val", sizes[1]))
    root = TREES[d.dataset](tmp_path / "data", splits=splits)
    overrides = [f"data.root={root}"]
    with torch.device("meta"):  # shapes only
        models = {"teacher.checkpoint": build_model(job.teacher.arch, d.num_classes, aux=True),
                  "student.backbone_weights": build_model(job.student.arch, d.num_classes).pretrained}
    for key, model in models.items():
        section, name = key.split(".")
        path = getattr(getattr(job, section), name)
        if path is not None:
            fake = tmp_path / "checkpoints" / Path(path).name
            fake.parent.mkdir(exist_ok=True)
            save_shapes_only(model, fake)
            overrides.append(f"{key}={fake}")
    return overrides


def save_shapes_only(model: torch.nn.Module, path: Path) -> None:
    """A weights file that fits `model` (a dry run loads it, strictly, into a meta-device model) in a few kB:
    every tensor a stride-0 view of one element, which torch.save stores as that one element."""
    torch.save({k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}, path)


@pytest.mark.parametrize("job_file", JOBS)
def test_every_job_passes_dry_run_on_a_fake_tree(tmp_path, capsys, job_file):
    overrides = fake_job_inputs(tmp_path, job_file)
    assert train_cli.main(["--job", str(REPO / "jobs" / job_file), "--dry-run", *overrides]) == 0
    out = capsys.readouterr().out
    assert "dry run:" in out and "Loss = 1 * CE" in out and "note:" not in out
    if overrides:
        assert "(16 images)" in out and "(2 images)" in out and "40000 iterations" in out
        assert "8 worker(s) x 2 images" in out and "8 GPU(s)" in out


def test_dry_run_refuses_a_missing_teacher_file(tmp_path):
    job = str(REPO / "jobs" / "camvid_dl101_to_dl18.yaml")
    overrides = [o for o in fake_job_inputs(tmp_path, "camvid_dl101_to_dl18.yaml")
                 if not o.startswith("teacher.")] + ["losses.kd.enabled=true"]
    with pytest.raises(CheckpointError, match="teacher.checkpoint: .*camvid_best_model.pth: no such file"):
        train_cli.main(["--job", job, "--dry-run", *overrides])


def test_dry_run_notes_a_normalisation_that_does_not_fit_the_teacher(tmp_path, capsys):
    overrides = fake_job_inputs(tmp_path, "cityscapes_dl101_to_dl18.yaml")
    job = str(REPO / "jobs" / "cityscapes_dl101_to_dl18.yaml")
    assert train_cli.main(["--job", job, "--dry-run", "data.normalize.order=rgb", "losses.kd.enabled=true",
                           *overrides]) == 0
    out = capsys.readouterr().out
    assert "note: teacher.checkpoint: deeplabv3_resnet101_citys_best_model.pth expects" in out and "bgr" in out


def test_check_data_scans_every_mask(tmp_path, capsys):
    overrides = fake_job_inputs(tmp_path, "camvid_dl101_to_psp18.yaml")
    job = str(REPO / "jobs" / "camvid_dl101_to_psp18.yaml")
    assert train_cli.main(["--job", job, "--dry-run", "--check-data", *overrides]) == 0
    out = capsys.readouterr().out
    assert "16 train masks checked" in out and "2 test masks checked" in out
    bad = next((tmp_path / "data" / "trainannot").glob("*000001.png"))  # a normal start reads 0, 8 and 15
    save(np.full((H, W), 77, np.uint8), bad)
    assert train_cli.main(["--job", job, "--dry-run", *overrides]) == 0
    with pytest.raises(DataError, match="mask value 77"):
        train_cli.main(["--job", job, "--dry-run", "--check-data", *overrides])


def test_dry_run_refuses_a_split_smaller_than_one_batch(tmp_path):
    overrides = fake_job_inputs(tmp_path, "voc_dl101_to_dl18.yaml", sizes=(8, 2))
    with pytest.raises(DataError, match="train_aug split has 8 images, fewer than one global batch"):
        train_cli.main(["--job", str(REPO / "jobs" / "voc_dl101_to_dl18.yaml"), "--dry-run", *overrides])


def test_command_line_bad_tree_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kdray.train", "--job", str(REPO / "jobs/voc_dl101_to_dl18.yaml"),
                           "--dry-run", f"data.root={tmp_path / 'nothing'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.root:") and "nothing" in lines[0]
