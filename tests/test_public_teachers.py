"""The public CIRKD checkpoints: each one fabricated from its key/shape list (tests/data/cirkd_keys) and loaded,
strictly, through the job key a user names it with; and the input normalisation recorded for them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from kdray.config import job_from_dict
from kdray.data import eval_transforms
from kdray.engine import load_teacher
from kdray.engine.loop import role_model
from kdray.errors import CheckpointError
from kdray.models.public import CIRKD_INPUT, CIRKD_MEAN_BGR_255, PUBLIC_CHECKPOINTS, find_public, mismatches

KEYS_DIR = Path(__file__).parent / "data" / "cirkd_keys"
# published file -> its key list
KEY_LISTS = {
    "deeplabv3_resnet101_citys_best_model.pth": "deeplabv3_resnet101_citys",
    "resnet18-imagenet.pth": "resnet18_imagenet",
    "resnet101-imagenet.pth": "resnet101_imagenet",
}
CPU = torch.device("cpu")


def fabricate(key_list: str, path: Path, extra: dict[str, torch.Tensor] | None = None,
              drop: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict with exactly the listed keys and shapes; each tensor a constant that identifies its key."""
    state = {}
    for i, line in enumerate((KEYS_DIR / f"{key_list}.tsv").read_text().splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(i, dtype=torch.int64)
        else:
            state[key] = torch.full(dims, i / 1000.0)
    state.update(extra or {})
    if drop:
        del state[drop]
    torch.save(state, path)
    return state


def job(**sections):
    base = {"data": {"dataset": "cityscapes", "root": "data/cityscapes", "num_classes": 19, "crop": [512, 1024]},
            "losses": {"ce": {"enabled": True}, "kd": {"enabled": True}}}
    return job_from_dict({**base, **sections})


def test_every_verified_entry_has_a_key_list():
    verified = {name for name, entry in PUBLIC_CHECKPOINTS.items() if entry.verified}
    assert verified == set(KEY_LISTS)
    for entry in PUBLIC_CHECKPOINTS.values():
        assert entry.kind in ("segmenter", "backbone")
        assert (entry.num_classes is None) == (entry.kind == "backbone")
        assert entry.normalize == CIRKD_INPUT


def test_teacher_checkpoint_loads_through_teacher_checkpoint(tmp_path):
    path = tmp_path / "deeplabv3_resnet101_citys_best_model.pth"
    state = fabricate("deeplabv3_resnet101_citys", path)
    j = job(teacher={"arch": find_public(path).arch, "checkpoint": str(path)})
    teacher = load_teacher(j, CPU)
    loaded = teacher.state_dict()
    assert set(loaded) == set(state)
    for key in ("pretrained.conv1.weight", "head.aspp.project.0.weight", "auxlayer.block.4.bias"):
        assert torch.equal(loaded[key], state[key]), key
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


@pytest.mark.parametrize("student_arch", ["deeplabv3_resnet18", "pspnet_resnet18"])
def test_resnet18_backbone_loads_through_student_backbone_weights(tmp_path, student_arch):
    path = tmp_path / "resnet18-imagenet.pth"
    state = fabricate("resnet18_imagenet", path, extra={"fc.weight": torch.zeros(1000, 512),
                                                        "fc.bias": torch.zeros(1000)})
    j = job(student={"arch": student_arch, "backbone_weights": str(path)}, losses={"ce": {"enabled": True}})
    model = role_model(j, "student")[0]
    backbone = model.pretrained.state_dict()
    assert set(backbone) == set(state) - {"fc.weight", "fc.bias"}  # the ImageNet classifier is dropped
    assert torch.equal(backbone["layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])


def test_resnet101_backbone_loads_through_teacher_backbone_weights(tmp_path):
    path = tmp_path / "resnet101-imagenet.pth"
    state = fabricate("resnet101_imagenet", path)
    j = job(teacher={"arch": "deeplabv3_resnet101", "backbone_weights": str(path)})
    model = role_model(j, "teacher")[0]  # how `python -m kdray.teacher` starts a teacher
    assert torch.equal(model.pretrained.state_dict()["layer3.22.conv2.weight"], state["layer3.22.conv2.weight"])


def test_loading_stays_strict(tmp_path):
    path = tmp_path / "resnet18-imagenet.pth"
    fabricate("resnet18_imagenet", path, drop="layer2.0.downsample.1.running_mean")
    j = job(student={"arch": "deeplabv3_resnet18", "backbone_weights": str(path)}, losses={"ce": {"enabled": True}})
    with pytest.raises(CheckpointError, match="1 missing key.*layer2.0.downsample.1.running_mean"):
        role_model(j, "student")
    fabricate("resnet18_imagenet", path, extra={"layer5.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="1 unexpected key.*layer5.weight"):
        role_model(j, "student")
    with pytest.raises(CheckpointError, match="does not fit the deeplabv3_resnet101 backbone"):  # R18 file, R101
        role_model(job(teacher={"arch": "deeplabv3_resnet101", "backbone_weights": str(path)}), "teacher")


def test_recorded_normalisation_reproduces_cirkd_inputs():
    """kdray's 0..1 pipeline with the recorded numbers gives CIRKD's `cv2.imread(p) - mean` to float precision."""
    rgb = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8)
    n = CIRKD_INPUT
    out, _ = eval_transforms(n.mean, n.std, n.order)(tv_tensors.Image(rgb), tv_tensors.Mask(torch.zeros(6, 5)))
    bgr = rgb.flip(0).double().numpy()
    cirkd = bgr - np.array(CIRKD_MEAN_BGR_255)[:, None, None]
    assert np.allclose(out.double().numpy(), cirkd, atol=1e-3)


def test_mismatches_name_what_does_not_fit():
    n = CIRKD_INPUT
    assert mismatches("teacher.checkpoint", "x/deeplabv3_resnet101_citys_best_model.pth", "deeplabv3_resnet101",
                      19, n.mean, n.std, n.order) == []
    assert mismatches("teacher.checkpoint", "x/my_teacher.pth", "pspnet_resnet18", 5, (0, 0, 0), (1, 1, 1),
                      "rgb") == []  # not a public file: nothing to say
    problems = mismatches("teacher.checkpoint", "deeplabv3_resnet101_citys_best_model.pth", "deeplabv3_resnet18", 21,
                          (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "rgb")
    assert len(problems) == 3 and "deeplabv3_resnet18" in problems[0] and "19 classes" in problems[1]
    assert "order bgr" in problems[2]
    assert "resnet101 backbone" in mismatches("student.backbone_weights", "resnet101-imagenet.pth",
                                              "deeplabv3_resnet18", 19, n.mean, n.std, n.order)[0]
