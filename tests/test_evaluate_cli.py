"""`python -m kdray.evaluate`: a checkpoint scored single-scale and multi-scale + flip on the demo job, bad input
as one line and exit code 2, and `--export` writing Cityscapes benchmark-server PNGs (labelIds, the images' names)
on a fake tree. In-process, tiny models with random weights: no training, no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

from kdray import evaluate as evaluate_cli
from kdray.cli import run_main
from kdray.data.cityscapes import LABEL_TO_TRAIN_ID, TRAIN_TO_LABEL_ID, CityscapesImages
from kdray.data.transforms import eval_image_transforms, eval_transforms
from kdray.engine.checkpoint import save_checkpoint
from kdray.errors import DataError
from kdray.models import build_model

SMALL_VAL = ["data.synthetic.val_length=8", "data.eval_batch_size=4", "run.latency_repeats=0"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def student_file(tmp_path):
    """Random weights of the demo student (DeepLabV3-R18 at width 0.125, 8 classes, with its aux head)."""
    torch.manual_seed(0)
    path = tmp_path / "best_student.pt"
    torch.save(build_model("deeplabv3_resnet18", 8, width=0.125).state_dict(), path)
    return path


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """The command as the shell runs it: exit code, stdout, stderr."""
    with pytest.raises(SystemExit) as exited:
        run_main(evaluate_cli.main, argv)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def table(out: str) -> dict[str, list[float]]:
    """metric -> [mIoU, pixel acc, seconds] from the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["metric", "mIoU"])
    rows = {}
    for line in lines[start + 1:]:
        parts = line.split()
        if len(parts) == 4 and parts[0].startswith("val/"):
            rows[parts[0]] = [float(p) for p in parts[1:]]
    return rows


def test_scores_a_checkpoint_single_scale_and_multi_scale_with_flips(student_file, capsys):
    code, out, err = run(["--checkpoint", str(student_file), "--device", "cpu", *SMALL_VAL,
                          "data.eval_scales=[0.5, 1.0, 1.5]", "data.eval_flip=true"], capsys)
    assert code == 0, err
    rows = table(out)
    assert list(rows) == ["val/miou", "val/miou_ms_flip"]
    for miou, pixel_acc, seconds in rows.values():
        assert 0 <= miou <= 100 and 0 <= pixel_acc <= 100 and seconds >= 0
    assert "student deeplabv3_resnet18@0.125x (8 classes)" in out and "scales [0.5, 1.0, 1.5], with flips" in out


def test_a_single_scale_job_prints_one_row_and_a_run_checkpoint_directory_loads(student_file, tmp_path, capsys):
    state = torch.load(student_file, weights_only=True)
    folder = save_checkpoint(tmp_path / "checkpoint", {"role": "student", "iteration": 3, "model": state})
    code, out, err = run(["--checkpoint", str(folder), *SMALL_VAL], capsys)
    assert code == 0, err
    assert list(table(out)) == ["val/miou"] and "data.eval_flip=true adds" in out
    by_file = run(["--checkpoint", str(student_file), *SMALL_VAL], capsys)[1]
    assert table(by_file)["val/miou"][:2] == table(out)["val/miou"][:2]  # the same weights, the same score

    code, _, err = run(["--checkpoint", str(folder), "--role", "teacher", *SMALL_VAL], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {folder}: a checkpoint of a student run; score it with --role student"]


def test_the_demo_teacher_role_builds_the_teacher(tmp_path, capsys):
    torch.manual_seed(1)
    path = tmp_path / "teacher.pt"
    torch.save(build_model("deeplabv3_resnet18", 8, width=0.5, aux=False).state_dict(), path)
    code, out, err = run(["--role", "teacher", "--checkpoint", str(path), *SMALL_VAL, "data.eval_scales=[0.75]"],
                         capsys)
    assert code == 0, err
    assert "teacher deeplabv3_resnet18@0.5x" in out and list(table(out)) == ["val/miou", "val/miou_ms"]


@pytest.mark.parametrize("case", ["missing", "not weights", "wrong model", "no checkpoint", "split alone",
                                  "bad override"])
def test_bad_input_is_one_line_and_exit_code_2(case, student_file, tmp_path, capsys):
    argv = {"missing": ["--checkpoint", str(tmp_path / "nope.pt")],
            "not weights": ["--checkpoint", str(tmp_path / "junk.pt")],
            "wrong model": ["--checkpoint", str(student_file), "student.width=0.25"],
            "no checkpoint": [],
            "split alone": ["--checkpoint", str(student_file), "--split", "test"],
            "bad override": ["--checkpoint", str(student_file), "data.eval_scales=[-1]"]}[case]
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    code, out, err = run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    expected = {"missing": f"weights file not found: {tmp_path / 'nope.pt'}",
                "not weights": f"cannot read weights file {tmp_path / 'junk.pt'}",
                "wrong model": f"{student_file} does not fit the deeplabv3_resnet18 model",
                "no checkpoint": "--checkpoint: not given",
                "split alone": "--split: got 'test'",
                "bad override": "data.eval_scales[0]: got -1.0"}[case]
    assert expected in lines[0]
    if case == "wrong model":  # what the file is, said as what to change
        assert lines[0].endswith("The file fits deeplabv3_resnet18@0.125x, the job's student is "
                                 "deeplabv3_resnet18@0.25x: add student.width=0.125")
    if case == "no checkpoint":
        assert "best_student.pt" in lines[0] and "--role teacher scores the job's teacher.checkpoint" in lines[0]


def test_the_teachers_weights_scored_as_the_student_point_at_role_teacher(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    torch.save(build_model("deeplabv3_resnet18", 8, width=0.5, aux=False).state_dict(), path)
    code, _, err = run(["--checkpoint", str(path), *SMALL_VAL], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].endswith("The file fits the job's teacher (deeplabv3_resnet18@0.5x): score it with --role teacher")


def test_weights_of_no_model_near_the_job_get_no_hint(tmp_path, capsys):
    path = tmp_path / "other.pt"
    torch.save(build_model("pspnet_resnet18", 8, width=0.3, aux=False).state_dict(), path)
    code, _, err = run(["--checkpoint", str(path), *SMALL_VAL], capsys)
    assert code == 2 and "does not fit" in err and "The file fits" not in err


def test_export_is_refused_for_a_job_that_is_not_cityscapes(student_file, tmp_path, capsys):
    code, out, err = run(["--checkpoint", str(student_file), "--export", str(tmp_path / "out")], capsys)
    assert code == 2 and err.strip().splitlines() == [
        "error: --export: writes predictions in the Cityscapes benchmark server's layout (labelId PNGs); this job's "
        "data.dataset is 'synthetic'"]
    assert not (tmp_path / "out").exists()


# --- Cityscapes: the test split's images, predicted as labelIds ---------------------------------------------------

H, W = 24, 40
TEST_IMAGES = [("berlin", "berlin_000000_000019"), ("berlin", "berlin_000001_000019"), ("bonn", "bonn_000000_000019")]


def cityscapes_with_test_split(root: Path) -> Path:
    """A fake tree: train and val with labelIds, and a test split of images only (its labels are not public)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            stem = f"aachen_{i:06d}_000019"
            _save(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), root / "leftImg8bit" / split / "aachen" /
                  f"{stem}_leftImg8bit.png")
            _save(rng.integers(0, 34, (H, W), dtype=np.uint8), root / "gtFine" / split / "aachen" /
                  f"{stem}_gtFine_labelIds.png")
    for city, stem in TEST_IMAGES:
        _save(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), root / "leftImg8bit" / "test" / city /
              f"{stem}_leftImg8bit.png")
    return root


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def cityscapes_job(tmp_path: Path, root: Path) -> Path:
    job = {"name": "citys_tiny",
           "data": {"dataset": "cityscapes", "root": str(root), "num_classes": 19, "crop": [16, 16], "batch_size": 2,
                    "eval_batch_size": 1},
           "teacher": {"arch": "deeplabv3_resnet18", "width": 0.125},
           "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
           "run": {"output_dir": str(tmp_path / "runs"), "latency_repeats": 0}}
    path = tmp_path / "citys.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.mark.parametrize("protocol", [[], ["data.eval_scales=[0.75, 1.0]", "data.eval_flip=true"]])
def test_export_writes_one_label_id_png_per_test_image_named_after_it(protocol, tmp_path, capsys):
    root = cityscapes_with_test_split(tmp_path / "cityscapes")
    torch.manual_seed(2)
    weights = tmp_path / "student19.pt"
    torch.save(build_model("deeplabv3_resnet18", 19, width=0.125, aux=False).state_dict(), weights)
    out_dir = tmp_path / "results"
    code, out, err = run(["--job", str(cityscapes_job(tmp_path, root)), "--checkpoint", str(weights),
                          "--export", str(out_dir), *protocol], capsys)
    assert code == 0, err
    written = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    assert written == [f"{city}/{stem}_leftImg8bit.png" for city, stem in TEST_IMAGES]
    assert "3 test predictions" in out
    label_ids = set(TRAIN_TO_LABEL_ID.values())
    for name in written:
        with Image.open(out_dir / name) as png:
            assert png.mode == "L" and png.size == (W, H)  # 8-bit grey, the image's own resolution
            values = set(np.unique(np.array(png)).tolist())
        assert values and values <= label_ids, values  # labelIds (7, 8, 11, ..., 33), never trainIds 0..18 alone
    # the val split can be exported too (to check the export locally with cityscapesScripts)
    code, out, err = run(["--job", str(cityscapes_job(tmp_path, root)), "--checkpoint", str(weights),
                          "--export", str(tmp_path / "val_results"), "--split", "val"], capsys)
    assert code == 0 and (tmp_path / "val_results" / "aachen" / "aachen_000000_000019_leftImg8bit.png").is_file()


def test_export_predictions_are_the_argmax_mapped_to_label_ids(tmp_path):
    """The PNG of an image is the trainId argmax of the model's scores at full size, each mapped to its labelId."""
    from kdray.config import load_job
    from kdray.engine.export import export_cityscapes

    root = cityscapes_with_test_split(tmp_path / "cityscapes")
    job = load_job(cityscapes_job(tmp_path, root))
    torch.manual_seed(3)
    model = build_model("deeplabv3_resnet18", 19, width=0.125, aux=False).eval()
    written = export_cityscapes(job, model, "test", tmp_path / "out", torch.device("cpu"), progress=False)
    n = job.data.normalize
    images = CityscapesImages(root, "test", eval_image_transforms(n.mean, n.std, n.order))
    lut = np.array([TRAIN_TO_LABEL_ID[k] for k in range(19)], np.uint8)
    for path, (image, _) in zip(written, images):
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(image[None]).logits, size=(H, W), mode="bilinear",
                                                     align_corners=False)
        assert np.array_equal(np.array(Image.open(path)), lut[logits[0].argmax(0).numpy()])


def test_test_split_reader_and_label_id_table(tmp_path):
    root = cityscapes_with_test_split(tmp_path / "cityscapes")
    images = CityscapesImages(root, "test")
    assert [p.name for p in images.paths] == [f"{stem}_leftImg8bit.png" for _, stem in TEST_IMAGES]
    image, index = images[2]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8 and image.shape == (3, H, W)
    assert index == 2
    assert {LABEL_TO_TRAIN_ID[label]: label for label in TRAIN_TO_LABEL_ID.values()} == TRAIN_TO_LABEL_ID
    assert sorted(TRAIN_TO_LABEL_ID) == list(range(19))
    with pytest.raises(DataError, match="the Cityscapes train images"):
        CityscapesImages(tmp_path / "cityscapes" / "gtFine", "train")
    (root / "leftImg8bit" / "empty").mkdir()
    with pytest.raises(DataError, match="the Cityscapes empty split is empty"):
        CityscapesImages(root, "empty")


def test_the_image_alone_is_normalised_as_with_its_mask():
    image = tv_tensors.Image(torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(5, 7, dtype=torch.int64))
    args = ((0.41, 0.46, 0.48), (0.0039, 0.0039, 0.0039), "bgr")
    alone = eval_image_transforms(*args)(image)
    assert type(alone) is torch.Tensor and torch.equal(alone, eval_transforms(*args)(image, mask)[0])
