"""Inputs users hit on real data, each on a tiny tree generated with PIL: EXIF-rotated photos, 16-bit images,
float and wide-integer masks, lossy or MATLAB files where a mask should be, and a bad mask met by a DataLoader
worker process. The rule they share: `check()` (the --check-data scan), the sample check at construction and
`__getitem__` accept and refuse the same files, and a refusal is one DataError line naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from kdray.cli import run_main
from kdray.data import TransformedDataset, eval_transforms
from kdray.data.camvid import CamVid
from kdray.data.cityscapes import Cityscapes
from kdray.data.files import WorkerDataError, image_header, read_image, read_mask
from kdray.data.folder import FolderSegmentation
from kdray.data.voc import VOCAug
from kdray.errors import DataError

ABC = ("a", "b", "c")


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def folder(tmp_path: Path, image: Image.Image, mask: Image.Image | None, image_name: str = "a.png",
           mask_name: str = "a.png", image_exif: Image.Exif | None = None) -> Path:
    """<tmp_path>/train/{images,masks}/ holding one image and (unless None) its mask; returns the root."""
    images, masks = tmp_path / "train" / "images", tmp_path / "train" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    extra = {"exif": image_exif} if image_exif is not None else {}
    if image_name.endswith(".jpg"):
        extra["quality"] = 100
    image.save(images / image_name, **extra)
    if mask is not None:
        mask.save(masks / mask_name)
    return tmp_path


def rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray(np.zeros((h, w, 3), np.uint8))


def grey(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


def message(fn: Callable[[], object]) -> str:
    with pytest.raises(DataError) as caught:
        fn()
    text = str(caught.value)
    assert "\n" not in text
    return text


def every_path(root: Path, classes=ABC) -> dict[str, Callable[[], object]]:
    """The three ways a file is read: the sample check at construction, the full scan, and the item."""
    return {
        "construction": lambda: FolderSegmentation(root, "train", classes),
        "check": lambda: FolderSegmentation(root, "train", classes, sample_check=0).check(),
        "item": lambda: FolderSegmentation(root, "train", classes, sample_check=0)[0],
    }


# --- 1. EXIF orientation ------------------------------------------------------------------------------------


def sideways_photo(h: int, w: int) -> tuple[Image.Image, np.ndarray]:
    """A photo stored sideways (its first column red) and the mask an annotator draws on it as viewers show
    it with Orientation 6 (turned 90 degrees clockwise): class 1 on the red pixels, 0 elsewhere."""
    stored = np.zeros((h, w, 3), np.uint8)
    stored[:, 0] = (255, 0, 0)
    shown = np.rot90(stored, -1)
    return Image.fromarray(stored), (shown[..., 0] > 128).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp", ".tif"])
def test_exif_rotated_square_image_is_read_as_shown_so_its_mask_aligns(tmp_path, suffix):
    image, mask = sideways_photo(8, 8)
    root = folder(tmp_path, image, grey(mask), image_name=f"a{suffix}", image_exif=exif(6))
    ds = FolderSegmentation(root, "train", ("bg", "red"))
    picture, labels = ds[0]
    assert ((picture[0] > 128) == (labels == 1)).all()
    assert ds.check() == 1


def test_exif_rotated_non_square_image_has_its_upright_size_in_every_check(tmp_path):
    image, mask = sideways_photo(8, 12)  # stored 8x12, shown 12x8
    root = folder(tmp_path, image, grey(mask), image_name="a.jpg", image_exif=exif(6))
    ds = FolderSegmentation(root, "train", ("bg", "red"))
    assert ds.check() == 1
    assert image_header(ds.samples[0].image).size == (12, 8)
    picture, labels = ds[0]
    assert tuple(picture.shape) == (3, 12, 8) and tuple(labels.shape) == (12, 8)


def test_a_mask_drawn_on_the_stored_pixels_of_a_rotated_image_is_named_with_the_orientation(tmp_path):
    image, _ = sideways_photo(8, 12)
    root = folder(tmp_path, image, grey(np.zeros((8, 12), np.uint8)), image_name="a.jpg", image_exif=exif(6))
    for way, fn in every_path(root).items():
        text = message(fn)
        assert "masks/a.png: mask is 8x12" in text and "is 12x8" in text, way
        assert "EXIF orientation 6" in text and "stored 8x12" in text, way


def test_a_plain_size_mismatch_says_nothing_of_orientation(tmp_path):
    root = folder(tmp_path, rgb(8, 12), grey(np.zeros((8, 8), np.uint8)))
    text = message(lambda: FolderSegmentation(root, "train", ABC))
    assert "mask is 8x8 but its image" in text and "EXIF" not in text


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_is_read_as_pil_exif_transpose_shows_it(tmp_path, suffix, orientation):
    path = tmp_path / f"a{suffix}"
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(stored).save(path, exif=exif(orientation))
    with Image.open(path) as im:
        shown = np.array(ImageOps.exif_transpose(im).convert("RGB"))
    assert np.array_equal(read_image(path).permute(1, 2, 0).numpy(), shown)
    assert image_header(path).size == shown.shape[:2]


def test_a_mask_is_turned_by_its_own_orientation_tag(tmp_path):
    """A tool that copies the photo's EXIF into the mask keeps the photo's stored grid: both turn alike."""
    image, _ = sideways_photo(8, 12)
    stored_mask = (np.array(image)[..., 0] > 128).astype(np.uint8)
    root = folder(tmp_path, image, None, image_name="a.jpg", image_exif=exif(6))
    grey(stored_mask).save(root / "train" / "masks" / "a.png", exif=exif(6))
    ds = FolderSegmentation(root, "train", ("bg", "red"))
    picture, labels = ds[0]
    assert tuple(labels.shape) == (12, 8) and ((picture[0] > 128) == (labels == 1)).all()
    assert np.array_equal(read_mask(ds.samples[0].mask), labels.numpy())


# --- 2. image modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("array", "name", "mode"), [
    (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64, "a.png", "I;16"),  # 12-bit data in a 16-bit PNG
    (np.arange(64, dtype=np.int32).reshape(8, 8) * 64, "a.tif", "I"),
    (np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "a.tif", "F"),
])
def test_images_that_are_not_8_bit_are_refused_everywhere(tmp_path, array, name, mode):
    root = folder(tmp_path, Image.fromarray(array), grey(np.zeros((8, 8), np.uint8)), image_name=name)
    with Image.open(root / "train" / "images" / name) as im:
        assert im.mode == mode
    for way, fn in every_path(root).items():
        text = message(fn)
        assert f"images/{name}: image mode {mode} is not 8 bits per channel" in text, way
        assert "convert the image to 8-bit" in text, way


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA"])  # PIL cannot write PA
def test_8_bit_images_of_every_common_mode_are_read_as_rgb(tmp_path, mode):
    root = folder(tmp_path, rgb(8, 8).convert(mode), grey(np.zeros((8, 8), np.uint8)))
    picture, _ = FolderSegmentation(root, "train", ABC)[0]
    assert tuple(picture.shape) == (3, 8, 8)


def test_cmyk_jpeg_is_read_as_rgb(tmp_path):
    root = folder(tmp_path, rgb(8, 8).convert("CMYK"), grey(np.zeros((8, 8), np.uint8)), image_name="a.jpg")
    picture, _ = FolderSegmentation(root, "train", ABC)[0]
    assert tuple(picture.shape) == (3, 8, 8)


# --- 3. mask dtypes -----------------------------------------------------------------------------------------


def labels_of(root: Path, classes=ABC) -> np.ndarray:
    ds = FolderSegmentation(root, "train", classes)
    assert ds.check() == 1
    return ds[0][1].numpy()


def test_float_mask_of_whole_numbers_decodes(tmp_path):
    values = np.array([[0.0, 1.0], [2.0, 255.0]], np.float32).repeat(4, 0).repeat(4, 1)
    root = folder(tmp_path, rgb(8, 8), Image.fromarray(values), mask_name="a.tif")
    assert np.array_equal(labels_of(root), values.astype(np.int64))


@pytest.mark.parametrize(("value", "shown"), [(2.5, "2.5"), (np.nan, "nan"), (np.inf, "inf")])
def test_float_mask_value_that_is_not_a_whole_number_is_named_everywhere(tmp_path, value, shown):
    values = np.zeros((8, 8), np.float32)
    values[3, 3] = value
    root = folder(tmp_path, rgb(8, 8), Image.fromarray(values), mask_name="a.tif")
    for way, fn in every_path(root).items():
        assert f"masks/a.tif: mask value {shown} is not an integer class id" in message(fn), way


@pytest.mark.parametrize(("array", "name"), [
    (np.array([[0, 1], [2, 255]], np.uint16), "a.png"),  # PIL mode I;16
    (np.array([[0, 1], [2, 255]], np.int32), "a.tif"),  # PIL mode I
])
def test_16_and_32_bit_integer_masks_decode(tmp_path, array, name):
    array = array.repeat(4, 0).repeat(4, 1)
    root = folder(tmp_path, rgb(8, 8), Image.fromarray(array), mask_name=name)
    assert np.array_equal(labels_of(root), array.astype(np.int64))


@pytest.mark.parametrize(("value", "name"), [(-1, "a.tif"), (70000, "a.tif"), (1000, "a.png"), (2.0**40, "a.tif")])
def test_negative_or_huge_mask_values_are_named_everywhere(tmp_path, value, name):
    array = np.zeros((8, 8), np.float32 if isinstance(value, float) else np.int32)
    array[0, 0] = value
    if name.endswith(".png"):
        array = array.astype(np.uint16)
    root = folder(tmp_path, rgb(8, 8), Image.fromarray(array), mask_name=name)
    for way, fn in every_path(root).items():
        assert f"mask value {int(value)} is not one of the class ids" in message(fn), way


def test_bool_mask_decodes_as_0_and_1(tmp_path):
    root = folder(tmp_path, rgb(8, 8), Image.fromarray(np.eye(8, dtype=bool)))
    assert np.array_equal(labels_of(root), np.eye(8, dtype=np.int64))


@pytest.mark.parametrize("mode", ["RGB", "LA", "RGBA"])
def test_mask_with_several_channels_is_refused_naming_its_mode(tmp_path, mode):
    root = folder(tmp_path, rgb(8, 8), rgb(8, 8).convert(mode))
    for way, fn in every_path(root).items():
        assert f"masks/a.png: a mask must be a single-channel image of label ids (grey or palette PNG); this one " \
               f"is {mode}" in message(fn), way


# --- 4. lossy and MATLAB files in a mask's place ------------------------------------------------------------

LOSSY = "lossy (it blurs the class ids along every edge), convert to PNG"
MATLAB = "a MATLAB file (SBD's .mat format): convert it to an index PNG"


def stand_in(path: Path) -> None:
    """A lossy image or a fake MATLAB file at `path`, by its suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".mat":
        path.write_bytes(b"MATLAB 5.0 MAT-file")
    else:
        grey(np.zeros((8, 8), np.uint8)).save(path, format="JPEG" if path.suffix.lower() != ".webp" else "WEBP")


@pytest.mark.parametrize(("name", "why"), [("a.jpg", LOSSY), ("a.jpeg", LOSSY), ("a.JPG", LOSSY),
                                           ("a.webp", "usually lossy"), ("a.mat", MATLAB)])
def test_folder_names_a_lossy_or_matlab_mask(tmp_path, name, why):
    root = folder(tmp_path, rgb(8, 8), None)
    stand_in(root / "train" / "masks" / name)
    text = message(lambda: FolderSegmentation(root, "train", ABC))
    assert f"masks/{name}: found a {Path(name).suffix} mask: {why}" in text
    assert "expected" in text and "masks/a.png" in text


def test_folder_counts_the_images_with_a_stand_in_mask(tmp_path):
    root = folder(tmp_path, rgb(8, 8), None)
    for stem in ("b", "c"):
        rgb(8, 8).save(root / "train" / "images" / f"{stem}.png")
        stand_in(root / "train" / "masks" / f"{stem}.jpg")
    grey(np.zeros((8, 8), np.uint8)).save(root / "train" / "masks" / "a.png")
    assert "(2 of 3 images have such a file instead of their mask)" in message(
        lambda: FolderSegmentation(root, "train", ABC))


def test_folder_without_mask_or_stand_in_still_reports_the_missing_mask(tmp_path):
    root = folder(tmp_path, rgb(8, 8), None)
    assert "this image has no mask" in message(lambda: FolderSegmentation(root, "train", ABC))


def test_voc_names_an_sbd_mat_label(tmp_path):
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("2008_000001\n")
    (tmp_path / "JPEGImages").mkdir()
    rgb(8, 8).save(tmp_path / "JPEGImages" / "2008_000001.jpg")
    stand_in(tmp_path / "SegmentationClassAug" / "2008_000001.mat")
    text = message(lambda: VOCAug(tmp_path, "train_aug"))
    assert f"SegmentationClassAug/2008_000001.mat: found a .mat mask: {MATLAB}" in text


def test_camvid_names_a_jpeg_annotation(tmp_path):
    for part in ("train", "trainannot"):
        (tmp_path / part).mkdir()
    rgb(8, 8).save(tmp_path / "train" / "0001TP_006690.png")
    stand_in(tmp_path / "trainannot" / "0001TP_006690.jpg")
    text = message(lambda: CamVid(tmp_path, "train"))
    assert f"trainannot/0001TP_006690.jpg: found a .jpg mask: {LOSSY}" in text


def test_cityscapes_names_a_jpeg_label_file(tmp_path):
    city = "aachen"
    (tmp_path / "leftImg8bit" / "train" / city).mkdir(parents=True)
    rgb(8, 8).save(tmp_path / "leftImg8bit" / "train" / city / f"{city}_000000_000019_leftImg8bit.png")
    stand_in(tmp_path / "gtFine" / "train" / city / f"{city}_000000_000019_gtFine_labelIds.jpg")
    text = message(lambda: Cityscapes(tmp_path, "train"))
    assert f"{city}_000000_000019_gtFine_labelIds.jpg: found a .jpg mask: {LOSSY}" in text


# --- 5. a bad mask in a DataLoader worker process -----------------------------------------------------------


def bad_mask_tree(tmp_path: Path) -> Path:
    return folder(tmp_path, rgb(8, 8), grey(np.full((8, 8), 9, np.uint8)))


def worker_error(dataset) -> DataError:
    with pytest.raises(DataError) as caught:
        for _ in DataLoader(dataset, num_workers=1):
            pass
    return caught.value


def test_a_worker_process_reports_a_bad_mask_as_kdrays_one_line(tmp_path):
    ds = FolderSegmentation(bad_mask_tree(tmp_path), "train", ABC, sample_check=0)
    text = str(worker_error(ds))
    assert text.endswith("masks/a.png: mask value 9 is not one of the class ids and ignore value (0..2, 255)")
    assert "\n" not in text and "Traceback" not in text and text.startswith(str(tmp_path))


def test_a_worker_process_behind_the_training_transforms_reports_one_line(tmp_path):
    ds = FolderSegmentation(bad_mask_tree(tmp_path), "train", ABC, sample_check=0)
    text = str(worker_error(TransformedDataset(ds, eval_transforms((0.5,) * 3, (0.5,) * 3))))
    assert "\n" not in text and "masks/a.png: mask value 9" in text


def test_the_command_line_prints_a_worker_error_on_one_line(tmp_path, capsys):
    ds = FolderSegmentation(bad_mask_tree(tmp_path), "train", ABC, sample_check=0)

    def main(argv):
        for _ in DataLoader(ds, num_workers=1):
            pass
        return 0

    with pytest.raises(SystemExit) as exited:
        run_main(main, [])
    assert exited.value.code == DataError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "masks/a.png: mask value 9" in err


def test_the_main_process_raises_a_plain_data_error(tmp_path):
    ds = FolderSegmentation(bad_mask_tree(tmp_path), "train", ABC, sample_check=0)
    with pytest.raises(DataError) as caught:
        ds[0]
    assert type(caught.value) is DataError


def test_worker_data_error_keeps_messages_it_does_not_recognise():
    assert str(WorkerDataError("x.png: mask value 9 is not ...")) == "x.png: mask value 9 is not ..."
    assert str(WorkerDataError("Caught something else\nno marker")) == "Caught something else\nno marker"


# --- siblings -----------------------------------------------------------------------------------------------


def test_an_image_too_large_for_pil_is_one_line(tmp_path, monkeypatch):
    root = folder(tmp_path, rgb(64, 64), grey(np.zeros((64, 64), np.uint8)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this many pixels
    for way, fn in every_path(root).items():
        assert "cannot read this" in message(fn), way
