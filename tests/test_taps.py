"""Feature taps: names, shapes and channels, what they capture, hooks only when asked, errors, references."""

from __future__ import annotations

import functools
import math
import weakref

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdray.errors import ConfigError
from kdray.models import FeatureTaps, Segmenter, build_model, tap_channels, tap_names, tap_stride

SMALL = 0.125
ARCHS = ["deeplabv3_resnet18", "pspnet_resnet101"]
NAMES = ["backbone.layer1", "backbone.layer2", "backbone.layer3", "backbone.layer4", "head"]
BACKBONE_NAMES = NAMES[:-1]
# Odd sizes, so each halving's ceil shows.
H, W = 33, 47


@functools.cache
def small_model(arch: str) -> Segmenter:
    torch.manual_seed(0)
    return build_model(arch, 5, width=SMALL).eval()


def images() -> torch.Tensor:
    return torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_names_in_network_order(arch: str) -> None:
    assert tap_names(small_model(arch)) == NAMES


def test_channels_at_width_1_read_from_structure() -> None:
    model = build_model("deeplabv3_resnet18", 19)
    assert [tap_channels(model, n) for n in NAMES] == [64, 128, 256, 512, 128]
    assert [tap_stride(model, n) for n in NAMES] == [4, 8, 8, 8, 8]


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_shapes_match_channels_and_strides(arch: str) -> None:
    model = small_model(arch)
    with FeatureTaps(model, NAMES) as taps, torch.no_grad():
        feats = taps.collect(model(images()))
    assert list(feats) == NAMES
    for name, tensor in feats.items():
        s = tap_stride(model, name)
        assert tensor.shape == (2, tap_channels(model, name), math.ceil(H / s), math.ceil(W / s)), name


def test_captured_maps_are_the_backbone_stages_and_the_head_features() -> None:
    model = small_model("deeplabv3_resnet18")
    x = images()
    with FeatureTaps(model, NAMES) as taps, torch.no_grad():
        out = model(x)
        feats = taps.collect(out)
        stages = model.pretrained(x)
    for name, stage in zip(BACKBONE_NAMES, stages, strict=True):
        assert torch.equal(feats[name], stage), name
    assert feats["head"] is out.features


def test_no_hook_unless_a_backbone_tap_is_asked() -> None:
    model = small_model("deeplabv3_resnet18")
    for names in ([], ["head"]):
        taps = FeatureTaps(model, names)
        assert hook_count(model) == 0
        with torch.no_grad():
            out = model(images())
        assert taps.collect(out) == ({"head": out.features} if names else {})


def test_hooks_only_on_the_asked_stages_and_removed_after() -> None:
    model = small_model("pspnet_resnet101")
    with FeatureTaps(model, ["backbone.layer2", "head", "backbone.layer2"]) as taps:
        assert taps.names == ("backbone.layer2", "head")
        assert len(model.pretrained.layer2._forward_hooks) == 1
        assert hook_count(model) == 1
    assert hook_count(model) == 0
    taps.remove()  # idempotent


def test_unknown_tap_is_one_line_naming_it_and_the_valid_ones() -> None:
    model = small_model("deeplabv3_resnet18")
    with pytest.raises(ConfigError) as info:
        FeatureTaps(model, ["head", "backbone.layer5"])
    assert str(info.value) == (
        "tap 'backbone.layer5': not a layer of deeplabv3_resnet18; did you mean backbone.layer4? valid taps: "
        "backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4, head"
    )
    assert hook_count(model) == 0
    with pytest.raises(ConfigError, match=r"^tap 'pretrained\.layer2': .*did you mean backbone\.layer2\?"):
        tap_channels(model, "pretrained.layer2")
    with pytest.raises(ConfigError, match=r"^tap 3: not a layer of deeplabv3_resnet18; valid taps: backbone"):
        FeatureTaps(model, [3])  # type: ignore[list-item]


def test_teacher_under_no_grad_and_autocast() -> None:
    model = small_model("deeplabv3_resnet18")
    with (
        FeatureTaps(model, ["backbone.layer3", "head"]) as taps,
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        feats = taps.collect(model(images()))
    assert not any(t.requires_grad for t in feats.values())
    assert all(t.dtype == torch.bfloat16 for t in feats.values())


def test_gradient_of_a_loss_on_a_tap_reaches_the_layers_below_only() -> None:
    torch.manual_seed(0)
    student = build_model("deeplabv3_resnet18", 5, width=SMALL).train()
    with FeatureTaps(student, ["backbone.layer2"]) as taps:
        feats = taps.collect(student(images()))
    feats["backbone.layer2"].pow(2).mean().backward()
    below = [*student.pretrained.conv1.parameters(), *student.pretrained.layer2.parameters()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in below)
    above = [*student.pretrained.layer3.parameters(), *student.head.parameters()]
    assert all(p.grad is None for p in above)


def test_collect_keeps_no_reference() -> None:
    model = small_model("deeplabv3_resnet18")
    with FeatureTaps(model, ["backbone.layer3"]) as taps:
        with torch.no_grad():
            out = model(images())
        feats = taps.collect(out)
        captured = weakref.ref(feats["backbone.layer3"])
        del feats
        assert captured() is None
        with pytest.raises(RuntimeError, match="backbone.layer3 hold nothing"):
            taps.collect(out)  # the previous forward's maps were collected already


def test_collect_before_a_forward_is_an_error() -> None:
    model = small_model("deeplabv3_resnet18")
    with FeatureTaps(model, ["backbone.layer1", "head"]) as taps, pytest.raises(RuntimeError, match="layer1"):
        taps.collect(None)  # type: ignore[arg-type]


def test_hooks_fire_through_distributed_data_parallel(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("deeplabv3_resnet18", 5, width=SMALL)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)
        with FeatureTaps(wrapped, ["backbone.layer4", "head"]) as taps:
            assert len(model.pretrained.layer4._forward_hooks) == 1
            out = wrapped(images())
            feats = taps.collect(out)
        assert feats["backbone.layer4"].shape == (2, tap_channels(wrapped, "backbone.layer4"), 5, 6)
        assert feats["head"] is out.features
        with pytest.raises(ConfigError, match="not a layer of deeplabv3_resnet18"):
            FeatureTaps(wrapped, ["head2"])
    finally:
        dist.destroy_process_group()
