"""Models: CIRKD state-dict layout, parameter counts, shapes at stride 8, gradients, weight loading.

Tests that are about the published architecture use the full-size models (built once per session); the rest
use width 0.25 so every registered arch runs in a fraction of a second on a CPU.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kdray.errors import CheckpointError, ConfigError
from kdray.models import (
    Segmenter,
    SegmenterOutput,
    available_models,
    build_model,
    load_backbone_weights,
    load_segmenter_weights,
)
from kdray.models.common import scaled_channels

KEYS_DIR = Path(__file__).parent / "data" / "cirkd_keys"
SMALL = 0.25
NUM_CLASSES = 5

# arch -> (CIRKD segmenter key list, CIRKD ImageNet backbone key list, feature channels,
#          params with aux in M, params without aux in M), all for 19 classes.
CIRKD = {
    "deeplabv3_resnet101": ("deeplabv3_resnet101_citys", "resnet101_imagenet", 256, 61.12, 58.75),
    "deeplabv3_resnet18": ("deeplabv3_resnet18_citys", "resnet18_imagenet", 128, 13.61, 13.46),
    "pspnet_resnet18": ("psp_resnet18_citys", "resnet18_imagenet", 128, 12.92, 12.77),
}


def read_keys(name: str) -> dict[str, tuple[int, ...]]:
    """The `key<TAB>shape` list of a CIRKD state dict (`scalar` for num_batches_tracked)."""
    shapes = {}
    for line in (KEYS_DIR / f"{name}.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        shapes[key] = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
    return shapes


def shapes_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def n_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@functools.cache
def full_model(arch: str) -> Segmenter:
    torch.manual_seed(0)
    return build_model(arch, 19)


@functools.cache
def small_model(arch: str) -> Segmenter:
    torch.manual_seed(0)
    return build_model(arch, NUM_CLASSES, width=SMALL)


# --- the published architectures --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(CIRKD))
def test_state_dict_matches_cirkd(arch: str) -> None:
    segmenter_keys, backbone_keys, *_ = CIRKD[arch]
    model = full_model(arch)
    assert shapes_of(model) == read_keys(segmenter_keys)
    assert shapes_of(model.pretrained) == read_keys(backbone_keys)


@pytest.mark.parametrize("arch", sorted(CIRKD))
def test_param_counts_match_cirkd(arch: str) -> None:
    *_, with_aux, without_aux = CIRKD[arch]
    model = full_model(arch)
    total = n_params(model)
    assert total / 1e6 == pytest.approx(with_aux, rel=0.005)
    assert (total - n_params(model.auxlayer)) / 1e6 == pytest.approx(without_aux, rel=0.005)
    assert n_params(build_model(arch, 19, aux=False)) == total - n_params(model.auxlayer)


@pytest.mark.parametrize("arch", sorted(CIRKD))
def test_full_size_feature_channels(arch: str) -> None:
    channels = CIRKD[arch][2]
    model = full_model(arch).eval()
    assert (model.arch, model.num_classes, model.feature_channels) == (arch, 19, channels)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 33, 47))
    assert out.features.shape == (1, channels, 5, 6)
    assert out.logits.shape == (1, 19, 5, 6)


# --- every registered arch, small ------------------------------------------------------------------------


def test_registry_lists_head_backbone_products() -> None:
    archs = available_models()
    expected = {f"{h}_resnet{d}" for h in ("deeplabv3", "pspnet") for d in (18, 34, 50, 101)}
    assert set(archs) == expected
    assert archs == sorted(archs)


@pytest.mark.parametrize("arch", available_models())
def test_forward_shapes_stride_8(arch: str) -> None:
    model = small_model(arch).train()
    h, w = 61, 90  # non-square, neither a multiple of 8
    out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, SegmenterOutput) and isinstance(out, tuple)
    size = (math.ceil(h / 8), math.ceil(w / 8))
    assert out.logits.shape == (2, NUM_CLASSES, *size)
    assert out.features.shape == (2, model.feature_channels, *size)
    assert out.aux_logits is not None and out.aux_logits.shape == (2, NUM_CLASSES, *size)

    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert out.aux_logits is None
    assert out.logits.shape == (1, NUM_CLASSES, *size)


@pytest.mark.parametrize("arch", available_models())
def test_forward_backward_every_parameter_gets_finite_grad(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, width=SMALL).train()
    out = model(torch.randn(2, 3, 48, 40))
    for name, t in out._asdict().items():
        assert torch.isfinite(t).all(), name
    target = torch.randint(0, NUM_CLASSES, out.logits.shape[:1] + out.logits.shape[2:])
    loss = nn.functional.cross_entropy(out.logits, target) + 0.4 * nn.functional.cross_entropy(
        out.aux_logits, target
    )
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.pretrained.parameters())


@pytest.mark.parametrize("arch", available_models())
def test_features_are_the_classifier_input(arch: str) -> None:
    model = small_model(arch).eval()
    classifier = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 40, 40))
        torch.testing.assert_close(classifier(out.features), out.logits)


@pytest.mark.parametrize("size", [(64, 64), (65, 96), (1, 9), (17, 250)])
def test_output_size_is_ceil_of_input_over_8(size: tuple[int, int]) -> None:
    model = small_model("deeplabv3_resnet18").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.logits.shape[2:] == (math.ceil(size[0] / 8), math.ceil(size[1] / 8))


def test_no_aux_head() -> None:
    model = build_model("pspnet_resnet18", NUM_CLASSES, aux=False, width=SMALL).train()
    assert model.auxlayer is None
    assert not any(k.startswith("auxlayer.") for k in model.state_dict())
    assert model(torch.randn(2, 3, 32, 32)).aux_logits is None


# --- width variants and argument errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("channels", "width", "expected"),
    [(64, 1.0, 64), (64, 0.25, 16), (64, 0.01, 8), (512, 0.1, 48), (100, 0.5, 48), (64, 2.0, 128)],
)
def test_scaled_channels(channels: int, width: float, expected: int) -> None:
    assert scaled_channels(channels, width) == expected


@pytest.mark.parametrize("width", [0.125, 0.25, 0.5])
def test_width_scales_every_channel(width: float) -> None:
    model = build_model("deeplabv3_resnet18", NUM_CLASSES, width=width)
    assert model.pretrained.stage_channels == tuple(scaled_channels(c, width) for c in (64, 128, 256, 512))
    assert model.feature_channels == scaled_channels(128, width)
    assert model.pretrained.conv1.out_channels == scaled_channels(64, width)
    assert model.auxlayer.block[0].out_channels == scaled_channels(64, width)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != NUM_CLASSES:
            assert m.out_channels % 8 == 0 and m.out_channels >= 8
    assert n_params(model) < n_params(full_model("deeplabv3_resnet18"))


def test_small_demo_model_is_small() -> None:
    assert n_params(small_model("deeplabv3_resnet18")) < 1_000_000


def test_unknown_arch_names_value_close_matches_and_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_model("deeplabv3_resnet181", 19)
    message = str(err.value)
    assert "'deeplabv3_resnet181'" in message
    assert "did you mean deeplabv3_resnet18" in message
    for arch in available_models():
        assert arch in message


@pytest.mark.parametrize("arch", ["", "unet", "pspnet_resnet18_extra", "resnet18", None])
def test_unknown_arch_without_close_match(arch: object) -> None:
    with pytest.raises(ConfigError, match="unknown model arch"):
        build_model(arch, 19)  # type: ignore[arg-type]


@pytest.mark.parametrize("width", [0, -0.5, float("nan"), float("inf"), "0.5", True])
def test_bad_width(width: object) -> None:
    with pytest.raises(ConfigError, match="width"):
        build_model("deeplabv3_resnet18", 19, width=width)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_classes", [1, 0, 2.0, True])
def test_bad_num_classes(num_classes: object) -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("deeplabv3_resnet18", num_classes)  # type: ignore[arg-type]


# --- weights ---------------------------------------------------------------------------------------------


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for t in module.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
            else:
                t.fill_(7)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_backbone_weights_round_trip(tmp_path: Path) -> None:
    source = build_model("deeplabv3_resnet18", NUM_CLASSES, width=SMALL)
    _randomise(source)
    path = tmp_path / "backbone.pth"
    torch.save(source.pretrained.state_dict(), path)
    model = build_model("pspnet_resnet18", NUM_CLASSES, width=SMALL, backbone_weights=str(path))
    _assert_same_state(model.pretrained, source.pretrained)


def test_backbone_file_with_imagenet_classifier_and_nesting(tmp_path: Path) -> None:
    source = build_model("deeplabv3_resnet18", NUM_CLASSES, width=SMALL)
    _randomise(source)
    state = dict(source.pretrained.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 128), torch.zeros(1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save({"state_dict": state}, path)
    model = build_model("deeplabv3_resnet18", NUM_CLASSES, width=SMALL)
    load_backbone_weights(model, path)
    _assert_same_state(model.pretrained, source.pretrained)


@pytest.mark.parametrize("nest", [None, "state_dict", "model"])
def test_segmenter_weights_round_trip_with_ddp_prefix(tmp_path: Path, nest: str | None) -> None:
    source = small_model("deeplabv3_resnet50")
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "model.pth"
    torch.save(state if nest is None else {nest: state, "iteration": 3}, path)
    model = build_model("deeplabv3_resnet50", NUM_CLASSES, width=SMALL)
    _randomise(model)
    load_segmenter_weights(model, path)
    _assert_same_state(model, source)


@pytest.mark.parametrize("arch", sorted(CIRKD))
def test_fabricated_cirkd_checkpoint_loads_strictly(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(1)
    state = {
        k: torch.tensor(5) if shape == () else torch.randn(shape)
        for k, shape in read_keys(CIRKD[arch][0]).items()
    }
    path = tmp_path / f"{arch}_citys.pth"
    torch.save(state, path)
    model = build_model(arch, 19)
    load_segmenter_weights(model, path)
    loaded = model.state_dict()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match="not found") as err:
        load_segmenter_weights(small_model("pspnet_resnet18"), path)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match="not found"):
        build_model("pspnet_resnet18", NUM_CLASSES, width=SMALL, backbone_weights=path)


@pytest.mark.parametrize("content", [[1, 2], {}, {"a": 1}, {"state_dict": {"w": "x"}}])
def test_not_a_state_dict(tmp_path: Path, content: object) -> None:
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_segmenter_weights(small_model("pspnet_resnet18"), path)


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch file")
    with pytest.raises(CheckpointError, match="cannot read weights file"):
        load_backbone_weights(small_model("pspnet_resnet18"), path)


def _backbone_file(tmp_path: Path, edit) -> Path:
    state = dict(small_model("deeplabv3_resnet18").pretrained.state_dict())
    edit(state)
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    return path


def test_missing_keys(tmp_path: Path) -> None:
    def drop(state: dict) -> None:
        for k in [k for k in state if k.startswith("layer4.")]:
            del state[k]

    path = _backbone_file(tmp_path, drop)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): layer4\.0\.conv1\.weight") as err:
        load_backbone_weights(small_model("deeplabv3_resnet18"), path)
    assert "more)" in str(err.value) and "unexpected" not in str(err.value)


def test_unexpected_keys(tmp_path: Path) -> None:
    def add(state: dict) -> None:
        state["layer5.0.conv1.weight"] = torch.zeros(1)

    path = _backbone_file(tmp_path, add)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): layer5\.0\.conv1\.weight"):
        load_backbone_weights(small_model("deeplabv3_resnet18"), path)


def test_shape_mismatch(tmp_path: Path) -> None:
    path = _backbone_file(tmp_path, lambda state: None)
    full = build_model("deeplabv3_resnet18", NUM_CLASSES, width=0.5)
    with pytest.raises(
        CheckpointError, match=r"shape mismatch\(es\): conv1\.weight \(file 16x3x3x3, model 32x3x3x3\)"
    ):
        load_backbone_weights(full, path)


def test_segmenter_file_into_model_without_aux(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(small_model("pspnet_resnet18").state_dict(), path)
    model = build_model("pspnet_resnet18", NUM_CLASSES, aux=False, width=SMALL)
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): auxlayer\.block\.0\.weight"):
        load_segmenter_weights(model, path)
