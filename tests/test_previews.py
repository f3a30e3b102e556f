"""Predictions to look at: dataset palettes, the fixed preview items, the rendered rows (checked by hand), the engine's
previews and best-predictions file, and their images in an MLflow store."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torchvision import tv_tensors

from kdray import contract, rendering
from kdray.config import job_from_dict, job_hash, load_job
from kdray.config.cache import teacher_key
from kdray.data import DATASETS, build_dataset, class_palette, register_dataset
from kdray.data.registry import default_palette
from kdray.data.transforms import eval_transforms
from kdray.engine import train
from kdray.engine.previews import PreviewSet
from kdray.errors import ConfigError
from kdray.orchestration.tracking import RunLogger
from kdray.rendering import (
    GAP,
    Predictions,
    denormalize,
    display_size,
    preview_indices,
    read_predictions,
    render_predictions,
    write_predictions,
)

# --- palettes -------------------------------------------------------------------------------------------------------


def test_every_registered_dataset_draws_each_of_its_classes_in_a_colour_of_its_own():
    for name, spec in DATASETS.items():
        count = len(spec.class_names) if not isinstance(spec.class_names, str) else 5
        colours = spec.colours(count)
        assert len(colours) == count, name
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in colours), name
        if spec.palette is not None:
            assert len(spec.palette) == count and colours == spec.palette, name
    for name in ("cityscapes", "voc", "camvid"):
        assert DATASETS[name].palette is not None, name


def test_the_built_in_palettes_are_the_datasets_own():
    city, voc, camvid = (DATASETS[n].palette for n in ("cityscapes", "voc", "camvid"))
    # cityscapesScripts labels.py: road, sidewalk, person, car, bicycle (train ids 0, 1, 11, 13, 18)
    assert (city[0], city[1], city[11], city[13], city[18]) == (
        (128, 64, 128), (244, 35, 232), (220, 20, 60), (0, 0, 142), (119, 11, 32))
    # the VOC devkit's bit-interleaved colour map: background, aeroplane, person (15), tvmonitor (20)
    assert (voc[0], voc[1], voc[15], voc[20]) == ((0, 0, 0), (128, 0, 0), (192, 128, 128), (0, 64, 128))
    # SegNet's CamVid colours: sky, road, pavement (sidewalk), bicyclist
    assert (camvid[0], camvid[3], camvid[4], camvid[10]) == ((128, 128, 128), (128, 64, 128), (60, 40, 222),
                                                             (0, 128, 192))


@pytest.mark.parametrize("count", [2, 8, 19, 150, 400])
def test_the_default_palette_is_distinct_and_never_black(count):
    colours = default_palette(count)
    assert len(colours) == count and len(set(colours)) == count and (0, 0, 0) not in colours
    assert default_palette(count) == colours  # a pure function of the count
    # no class is drawn in the error map's red (class 0, often the background, least of all)
    hues = [colorsys.rgb_to_hsv(*(c / 255 for c in colour))[0] for colour in colours]
    assert all(min(h, 1 - h) > 0.03 for h in hues)


def test_a_job_gets_its_datasets_palette_or_the_default_for_another_class_count():
    demo = load_job("jobs/demo.yaml")
    assert class_palette(demo.data) == default_palette(8)  # the synthetic dataset registers none
    city = job_from_dict({"name": "c", "data": {"dataset": "cityscapes", "root": "/nowhere", "num_classes": 19}}, {})
    assert class_palette(city.data) == DATASETS["cityscapes"].palette
    four = job_from_dict({"name": "s", "data": {"num_classes": 4}}, {})
    assert class_palette(four.data) == default_palette(4)


@pytest.mark.parametrize("palette, message", [
    (((0, 0, 0),), "1 colours for 2 classes"),
    (((0, 0, 0), (0, 0, 256)), "palette[1]"),
    (((0, 0, 0), (0, 0)), "palette[1]"),
    (((0, 0, 0), (0.5, 0, 0)), "palette[1]"),
])
def test_register_dataset_refuses_a_palette_that_does_not_fit(palette, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        register_dataset("palette_test", class_names=("a", "b"), paper_splits=("train", "val"), palette=palette)
    assert "palette_test" not in DATASETS


def test_previews_leave_every_digest_unchanged():
    base, other = load_job("jobs/demo.yaml"), load_job("jobs/demo.yaml", ["data.preview_images=0"])
    assert job_hash(base) == job_hash(other)  # a resume and the cached teacher stay valid whatever it is set to
    assert teacher_key(base) == teacher_key(other)
    with pytest.raises(ConfigError, match="data.preview_images: got 17"):
        load_job("jobs/demo.yaml", ["data.preview_images=17"])


# --- which items ----------------------------------------------------------------------------------------------------


def test_preview_indices_are_fixed_by_the_split_length_and_count_alone():
    first = preview_indices(256, 4)
    np.random.seed(1)
    torch.manual_seed(5)
    assert preview_indices(256, 4) == first and len(set(first)) == 4 and first == sorted(first)
    assert all(0 <= i < 256 for i in first)
    assert preview_indices(3, 4) == [0, 1, 2] and preview_indices(10, 0) == []
    with pytest.raises(ValueError):
        preview_indices(-1, 2)


def test_every_seed_of_a_job_previews_the_same_items(tmp_path):
    sets = []
    for seed in (0, 7):
        job = tiny_job(tmp_path, **{"run.seed": seed})
        sets.append(PreviewSet.of(job, build_dataset(job.data, "val"), torch.device("cpu")))
    assert sets[0].indices == sets[1].indices == preview_indices(8, 3)
    assert all(np.array_equal(a, b) for a, b in zip(sets[0].images, sets[1].images))
    off = tiny_job(tmp_path, **{"data.preview_images": 0})
    assert PreviewSet.of(off, build_dataset(off.data, "val"), torch.device("cpu")) is None


def test_denormalize_gives_back_the_pixels_eval_transforms_normalised():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 5, 7), dtype=np.uint8)
    mean, std = (0.40787, 0.45752, 0.48109), (1 / 255,) * 3  # CIRKD's BGR numbers
    image, _ = eval_transforms(mean, std, "bgr")(tv_tensors.Image(torch.from_numpy(pixels)),
                                                   tv_tensors.Mask(torch.zeros(5, 7, dtype=torch.int64)))
    assert np.array_equal(denormalize(image.numpy(), mean, std, "bgr"), pixels.transpose(1, 2, 0))


# --- drawing, by hand -----------------------------------------------------------------------------------------------

P0, P1, BLACK, WHITE, GREY, RED = (10, 20, 30), (40, 50, 60), (0, 0, 0), (255, 255, 255), (128, 128, 128), (255, 0, 0)


def test_a_two_by_two_row_drawn_by_hand(monkeypatch):
    monkeypatch.setattr(rendering, "MIN_PANEL_WIDTH", 1)  # draw at the images' own size
    image = np.array([[[1, 2, 3], [4, 5, 6]], [[7, 8, 9], [10, 11, 12]]], np.uint8)
    label = np.array([[0, 1], [255, 1]])
    student = np.array([[0, 0], [1, 1]])
    teacher = np.array([[0, 1], [0, 1]])
    picture = render_predictions([image], [label], [student], [teacher], [P0, P1], 255)

    truth_panel = [[P0, P1], [BLACK, P1]]  # 255 is the ignore value: black
    student_panel = [[P0, P0], [P1, P1]]
    teacher_panel = [[P0, P1], [P0, P1]]
    errors = [[BLACK, RED], [GREY, BLACK]]  # right, wrong (0 for 1), not judged (ignored), right
    gap = [[WHITE] * GAP] * 2
    expected = np.concatenate([image, np.array(gap, np.uint8), np.array(truth_panel, np.uint8),
                               np.array(gap, np.uint8), np.array(student_panel, np.uint8), np.array(gap, np.uint8),
                               np.array(teacher_panel, np.uint8), np.array(gap, np.uint8),
                               np.array(errors, np.uint8)], axis=1)
    assert picture.dtype == np.uint8 and picture.shape == (2, 5 * 2 + 4 * GAP, 3)
    assert np.array_equal(picture, expected)

    # without a teacher, no teacher column; a second row below a gap
    two = render_predictions([image, image], [label, label], [student, teacher], None, [P0, P1], 255)
    assert two.shape == (2 + GAP + 2, 4 * 2 + 3 * GAP, 3)
    assert np.array_equal(two[:2], np.delete(expected, np.s_[3 * (2 + GAP):4 * (2 + GAP)], axis=1))
    assert (two[2:2 + GAP] == 255).all()
    second_errors = two[2 + GAP:, 3 * (2 + GAP):]  # the teacher's map as the student's: right, right, unjudged, right
    assert np.array_equal(second_errors, np.array([[BLACK, BLACK], [GREY, BLACK]], np.uint8))


def test_a_titled_picture_names_its_columns_above_the_rows(monkeypatch):
    monkeypatch.setattr(rendering, "MIN_PANEL_WIDTH", 1)
    image = np.full((40, 80, 3), 7, np.uint8)
    maps = [np.zeros((40, 80), int)]
    plain = render_predictions([image], maps, maps, maps, [P0], 255)
    titled = render_predictions([image], maps, maps, maps, [P0], 255, titled=True)
    assert titled.shape == (rendering.TITLE_HEIGHT + 40, plain.shape[1], 3)
    assert np.array_equal(titled[rendering.TITLE_HEIGHT:], plain)  # the rows are unchanged, under the strip
    strip = titled[:rendering.TITLE_HEIGHT]
    for column in range(5):  # image, ground truth, student, teacher, errors: each has its name written over it
        cell = strip[:, column * (80 + GAP):column * (80 + GAP) + 80]
        assert (cell != 255).any(), f"column {column} has no title"
    assert (strip[:, 80:80 + GAP] == 255).all()  # nothing written in the gaps
    without_teacher = render_predictions([image], maps, maps, None, [P0], 255, titled=True)
    assert without_teacher.shape[1] == 4 * 80 + 3 * GAP


def test_small_images_are_enlarged_in_blocks_and_wide_ones_shrunk():
    assert display_size(2, 2) == (128, 128) and display_size(64, 64) == (128, 128) and display_size(100, 100) == (
        100, 100)
    assert display_size(1024, 2048) == (256, 512) and display_size(*display_size(1024, 2048)) == (256, 512)
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 1] = (9, 9, 9)
    picture = render_predictions([image], [np.zeros((2, 2), int)], [np.ones((2, 2), int)], None, [P0, P1], 255)
    assert picture.shape == (128, 4 * 128 + 3 * GAP, 3)
    assert (picture[:64, 64:128] == 9).all() and (picture[64:, :128] == 0).all()  # pixel (0, 1) is a 64x64 block
    wide = render_predictions([np.zeros((1024, 2048, 3), np.uint8)], [np.zeros((1024, 2048), int)],
                              [np.zeros((1024, 2048), int)], None, [P0], 255)
    assert wide.shape == (256, 4 * 512 + 3 * GAP, 3)


def test_rendering_needs_neither_torch_nor_mlflow():
    """The report draws with it: numpy and PIL only."""
    import ast

    with open(rendering.__file__) as source:
        tree = ast.parse(source.read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {n for n in names if n.split(".")[0] in ("torch", "mlflow", "ray") or n.startswith("kdray.engine")}


def test_render_refuses_maps_of_another_size():
    with pytest.raises(ValueError, match="image 0"):
        render_predictions([np.zeros((4, 4, 3), np.uint8)], [np.zeros((4, 4), int)], [np.zeros((2, 2), int)], None,
                           [P0], 255)


def test_predictions_file_round_trip(tmp_path):
    predictions = Predictions((3, 9), (np.ones((2, 3, 3), np.uint8), np.zeros((4, 2, 3), np.uint8)),
                              (np.array([[0, 1, 255], [1, 1, 0]]), np.zeros((4, 2), int)),
                              (np.zeros((2, 3), int), np.ones((4, 2), int)), None, np.array([P0, P1], np.uint8),
                              255, 40, 0.5)
    back = read_predictions(write_predictions(tmp_path / "p.npz", predictions))
    assert back.indices == (3, 9) and back.teacher is None and back.iteration == 40 and back.miou == 0.5
    assert back.same_images(predictions) and np.array_equal(back.render(), predictions.render())
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a kdray predictions file"):
        read_predictions(tmp_path / "junk.npz")


# --- the engine -----------------------------------------------------------------------------------------------------

TINY = {
    "name": "tiny",
    "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4, "eval_batch_size": 4, "preview_images": 3,
             "synthetic": {"image_size": 32, "train_length": 16, "val_length": 8}},
    "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "optim": {"iterations": 4, "eval_interval": 2, "log_interval": 2},
    "run": {"threads": 1, "latency_repeats": 0},
}


def tiny_job(tmp_path, **overrides):
    return job_from_dict({**TINY, "run": {**TINY["run"], "output_dir": str(tmp_path / "runs")}}, overrides)


def test_a_distilling_run_previews_at_each_evaluation_and_keeps_its_best(tmp_path, teacher_file):
    job = tiny_job(tmp_path, **{"teacher.arch": "deeplabv3_resnet18", "teacher.width": 0.125,
                                "teacher.checkpoint": teacher_file, "losses.kd.enabled": True})
    pictures = []
    result = train(job, tmp_path / "run", progress=False, preview=lambda i, p: pictures.append((i, p)))
    panel = 128  # 32x32 images, enlarged 4x
    assert [i for i, _ in pictures] == [2, 4]
    title = rendering.TITLE_HEIGHT
    for _, picture in pictures:  # the columns' names over 3 rows of image | truth | student | teacher | errors
        assert picture.dtype == np.uint8 and picture.shape == (title + 3 * panel + 2 * GAP, 5 * panel + 4 * GAP, 3)
    teacher = np.s_[title:, 3 * (panel + GAP):3 * (panel + GAP) + panel]
    assert np.array_equal(pictures[0][1][teacher], pictures[1][1][teacher])  # the frozen teacher, predicted once

    kept = read_predictions(tmp_path / "run" / contract.BEST_PREDICTIONS_FILE)
    assert kept.iteration == result.best_iteration and kept.miou == pytest.approx(result.best_miou)
    assert kept.indices == tuple(preview_indices(8, 3)) and kept.teacher is not None
    assert np.array_equal(kept.palette, np.array(default_palette(8), np.uint8))
    assert np.array_equal(kept.render(), dict(pictures)[result.best_iteration])


def test_a_run_without_a_preview_callable_still_keeps_its_best_predictions(tmp_path):
    result = train(tiny_job(tmp_path), tmp_path / "run", progress=False)
    kept = read_predictions(tmp_path / "run" / contract.BEST_PREDICTIONS_FILE)
    assert kept.teacher is None and kept.iteration == result.best_iteration
    assert not (tmp_path / "off").exists()
    train(tiny_job(tmp_path, **{"data.preview_images": 0}), tmp_path / "off", progress=False,
          preview=lambda i, p: pytest.fail("no previews were asked for"))
    assert not (tmp_path / "off" / contract.BEST_PREDICTIONS_FILE).exists()


# --- MLflow ---------------------------------------------------------------------------------------------------------


def test_log_image_puts_one_image_per_step_in_the_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("previews", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    logger = RunLogger(uri, run_id)
    picture = np.zeros((6, 10, 3), np.uint8)
    picture[:, :5] = (255, 0, 0)
    for step in (150, 300):
        logger.log_image(picture, contract.PREDICTIONS_IMAGE_KEY, step)
    files = sorted(f.path for f in client.list_artifacts(run_id, "images"))
    for step in (150, 300):
        ours = [f for f in files if f.startswith(f"images/predictions+step+{step}+")]
        assert len(ours) == 2 and {f.rsplit(".", 1)[1] for f in ours} == {"png", "webp"}
    png = next(f for f in files if f.startswith("images/predictions+step+150+") and f.endswith(".png"))
    from PIL import Image

    with Image.open(client.download_artifacts(run_id, png, str(tmp_path / "down"))) as stored:
        assert np.array_equal(np.asarray(stored.convert("RGB")), picture)
    assert client.get_run(run_id).data.tags.get("mlflow.loggedImages", "").lower() == "true"
