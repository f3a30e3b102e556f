"""Properties of the losses that the reference comparison does not pin down.

Zero where it must be zero; gradients reach the student and its adapters but never the teacher (and the
discriminator and the student never reach each other); `gradcheck` in float64; KD's T² scaling; the label
resize; and option validation (`ConfigError` naming the option).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck
from torch.func import functional_call

from kdray.errors import ConfigError, PreflightError
from kdray.losses import (
    I2CKD,
    AdaptiveCrossEntropy,
    AdversarialDistillation,
    ChannelSpatialCorrelation,
    ChannelWiseDistillation,
    FeatureAdapter,
    IntraClassFeatureVariation,
    PairwiseAffinity,
    PixelwiseKD,
    SegmentationCrossEntropy,
    class_prototypes,
    downsample_labels,
    one_hot_ignore,
    triplet_prototype_loss,
)
from kdray.losses.ace import class_argmax
from kdray.losses.ifvd import prototype_similarity, squared_norms
from kdray.losses.pairwise import gram_is_cheaper, spatial_affinity_distance
from kdray.losses.softmax_kl import LOG2_E, shifted_exponentials, softmax_kl

IGNORE = 255
N, K, H, W = 2, 5, 6, 8  # maps are h×w = 6×8, labels at full size 24×32
C_S, C_T = 4, 6


def make_inputs(c_s: int = C_S, c_t: int = C_T, seed: int = 0, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (N, 4 * H, 4 * W), generator=g)
    labels[:, :4] = IGNORE
    return {
        "zs": torch.randn(N, K, H, W, generator=g, dtype=dtype),
        "zt": torch.randn(N, K, H, W, generator=g, dtype=dtype),
        "fs": torch.randn(N, c_s, H, W, generator=g, dtype=dtype),
        "ft": torch.randn(N, c_t, H, W, generator=g, dtype=dtype),
        "labels": labels,
        "images": torch.rand(N, 3, 4 * H, 4 * W, generator=g, dtype=dtype),
    }


def identity_adapters(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, FeatureAdapter):
                sub.conv.weight.copy_(torch.eye(sub.teacher_channels)[:, :, None, None])


# name -> (build(c_s, c_t), call(module, inputs)); the student-side tensors are zs and fs
LOSSES = {
    "kd": (lambda cs, ct: PixelwiseKD(), lambda m, x: m(x["zs"], x["zt"])),
    "kd_element_masked": (
        lambda cs, ct: PixelwiseKD(temperature=4.0, reduction="element_mean", mask_ignore=True),
        lambda m, x: m(x["zs"], x["zt"], x["labels"]),
    ),
    "cwd_logits": (lambda cs, ct: ChannelWiseDistillation(), lambda m, x: m(x["zs"], x["zt"])),
    "cwd_both": (
        lambda cs, ct: ChannelWiseDistillation(on="both", student_channels=cs, teacher_channels=ct),
        lambda m, x: m(x["zs"], x["zt"], x["fs"], x["ft"]),
    ),
    "ace": (lambda cs, ct: AdaptiveCrossEntropy(rule="average"), lambda m, x: m(x["zs"], x["zt"], x["labels"])),
    "pairwise": (lambda cs, ct: PairwiseAffinity(), lambda m, x: m(x["fs"], x["ft"])),
    "ifvd": (lambda cs, ct: IntraClassFeatureVariation(), lambda m, x: m(x["fs"], x["ft"], x["labels"])),
    "csc": (lambda cs, ct: ChannelSpatialCorrelation(cs, ct), lambda m, x: m(x["fs"], x["ft"])),
    "i2ckd": (lambda cs, ct: I2CKD(cs, ct, K), lambda m, x: m(x["fs"], x["ft"], x["labels"])),
    "i2ckd_image_hardest": (
        lambda cs, ct: I2CKD(cs, ct, K, scope="image", mining="hardest", negatives="teacher"),
        lambda m, x: m(x["fs"], x["ft"], x["labels"]),
    ),
}
ZERO_WHEN_EQUAL = ["kd", "kd_element_masked", "cwd_logits", "cwd_both", "pairwise", "ifvd", "csc"]


# --------------------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------------------
def test_downsample_labels_returns_the_input_at_its_own_size():
    labels = torch.randint(0, 5, (2, 6, 8))
    assert downsample_labels(labels, (6, 8)) is labels


@pytest.mark.parametrize(
    "full,small",
    [((512, 1024), (64, 128)), ((11, 16), (5, 7)), ((64, 64), (8, 8)), ((16, 15), (8, 4)), ((15, 16), (4, 8))],
)
def test_downsample_labels_is_torch_nearest(full, small):
    labels = torch.randint(0, 19, (2, *full))
    labels[:, ::7] = IGNORE
    expected = F.interpolate(labels[:, None].float(), size=small, mode="nearest")[:, 0].long()
    actual = downsample_labels(labels, small)
    assert actual.dtype == torch.int64
    assert torch.equal(actual, expected)


# --------------------------------------------------------------------------------------------------------------
# Zero where it must be zero
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ZERO_WHEN_EQUAL)
def test_zero_when_student_equals_teacher(name):
    build, call = LOSSES[name]
    x = make_inputs(c_s=C_T, c_t=C_T)
    x["zs"], x["fs"] = x["zt"].clone(), x["ft"].clone()
    module = build(C_T, C_T).double()
    identity_adapters(module)
    assert abs(call(module, x).item()) < 1e-12


def separated_features(scale: float = 3.0):
    """Each class's pixels carry a fixed feature vector along its own axis: prototypes exactly orthogonal."""
    labels = torch.arange(4).repeat_interleave(6).view(1, 4, 6).repeat(2, 1, 1)  # classes 0..3, 6 pixels each
    features = scale * F.one_hot(labels, 4).permute(0, 3, 1, 2).double()  # (2, 4, 4, 6)
    return features, labels


@pytest.mark.parametrize("scope", ["batch", "image"])
@pytest.mark.parametrize("mining", ["all", "hardest"])
@pytest.mark.parametrize("distance", ["l2", "squared_l2"])
def test_i2ckd_vanishes_when_prototypes_are_separated_by_more_than_the_margin(scope, mining, distance):
    features, labels = separated_features()
    # Normalised prototypes are orthonormal: d(P_T[k], P_S[k]) = 0, d(P_T[k], P_S[j]) = √2 (l2) or 2.
    module = I2CKD(4, 4, 4, margin=1.0, scope=scope, mining=mining, distance=distance).double()
    identity_adapters(module)
    assert module(features.clone(), features, labels).item() == 0.0
    # With a margin beyond the separation every term is active: m − √2 (l2) or m − 2 (squared).
    module.margin = 3.0
    expected = 3.0 - (2**0.5 if distance == "l2" else 2.0)
    torch.testing.assert_close(module(features.clone(), features, labels).item(), expected)


def test_i2ckd_with_fewer_than_two_classes_is_zero_with_a_finite_gradient():
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 4, 5), 1)
    labels[0, 0] = IGNORE
    for scope in ("batch", "image"):
        module = I2CKD(3, 3, 4, scope=scope).double()
        loss = module(features, features.detach() + 1, labels)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.isfinite(features.grad).all()
        features.grad = None


def test_i2ckd_l2_gradient_is_finite_when_prototypes_coincide():
    teacher = torch.randn(3, 4, dtype=torch.float64)
    student = teacher.clone().requires_grad_(True)  # d(P_T[k], P_S[k]) = 0 exactly
    student_same = torch.stack([teacher[0], teacher[0], teacher[2]]).requires_grad_(True)  # two negatives at 0
    present = torch.tensor([True, True, True])
    for negatives in ("student", "teacher"):
        for s in (student, student_same):
            s.grad = None
            loss = triplet_prototype_loss(teacher, s, present, margin=0.5, negatives=negatives, distance="l2")
            loss.backward()
            assert torch.isfinite(s.grad).all()


def test_kd_masked_with_all_pixels_ignored_is_zero():
    x = make_inputs()
    x["zs"].requires_grad_(True)
    labels = torch.full_like(x["labels"], IGNORE)
    loss = PixelwiseKD(mask_ignore=True)(x["zs"], x["zt"], labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x["zs"].grad).all()


@pytest.mark.parametrize("with_aux", [False, True])
def test_cross_entropy_all_ignore_is_zero_with_finite_gradients(with_aux):
    x = make_inputs()
    logits = x["zs"].requires_grad_(True)
    labels = torch.full_like(x["labels"], IGNORE)
    loss = SegmentationCrossEntropy()(logits, labels, logits * 2 if with_aux else None)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_ace_and_ifvd_with_all_pixels_ignored_are_zero():
    x = make_inputs()
    labels = torch.full_like(x["labels"], IGNORE)
    assert AdaptiveCrossEntropy()(x["zs"], x["zt"], labels).item() == 0.0
    assert IntraClassFeatureVariation()(x["fs"], x["ft"], labels).item() == 0.0


# --------------------------------------------------------------------------------------------------------------
# Gradients: student and adapter yes, teacher never
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_reach_student_and_adapter_but_never_the_teacher(name):
    build, call = LOSSES[name]
    x = make_inputs(dtype=torch.float32)
    for key in ("zs", "zt", "fs", "ft"):
        x[key].requires_grad_(True)
    module = build(C_S, C_T)
    loss = call(module, x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert x["zt"].grad is None and x["ft"].grad is None
    student = [x[key].grad for key in ("zs", "fs") if x[key].grad is not None]
    assert student, "no gradient reached the student's tensors"
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in student)
    for pname, param in module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname


def test_adversarial_student_term_leaves_the_discriminator_alone():
    x = make_inputs(dtype=torch.float32)
    module = AdversarialDistillation(K, conditioning="logits+image")
    zs = x["zs"].requires_grad_(True)
    loss = module(zs, x["images"])
    loss.backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.parameters())
    assert all(p.requires_grad for p in module.parameters())  # restored after the call


@pytest.mark.parametrize("objective", ["hinge", "wgan_gp"])
def test_discriminator_loss_leaves_the_student_alone(objective):
    x = make_inputs(dtype=torch.float32)
    module = AdversarialDistillation(K, objective=objective)
    zs, zt = x["zs"].requires_grad_(True), x["zt"].requires_grad_(True)
    loss = module.discriminator_loss(zt, zs)
    assert torch.isfinite(loss)
    loss.backward()
    assert zs.grad is None and zt.grad is None
    grads = [p.grad for p in module.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("size", [(64, 64), (64, 128), (8, 8), (2, 2), (5, 7)])
def test_discriminator_runs_on_large_and_small_maps(size):
    module = AdversarialDistillation(3)
    out = module.discriminator(torch.randn(2, 3, *size))
    assert out.shape[:2] == (2, 1) and min(out.shape[-2:]) >= 1
    assert module.score(torch.randn(2, 3, *size)).shape == (2,)


def test_discriminator_refuses_maps_below_two_pixels():
    with pytest.raises(PreflightError, match="h, w >= 2"):
        AdversarialDistillation(3)(torch.randn(2, 3, 1, 8))


# --------------------------------------------------------------------------------------------------------------
# gradcheck (float64) on the smooth losses, w.r.t. the student tensors and the adapter weight
# --------------------------------------------------------------------------------------------------------------
def small_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[[0, 0, 1, 2], [0, 1, 1, 2], [IGNORE, 1, 2, 2]], [[2, 2, 0, 0], [2, 0, 0, 1], [1, 1, 1, 0]]])
    return {
        "zs": torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64),
        "zt": torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64),
        "fs": torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64),
        "ft": torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64),
        "labels": labels,
    }


def check_with_adapter(module, student_fn):
    """gradcheck over the student tensor(s) and the adapter weight together."""
    weight = module.adapter.conv.weight.detach().clone().requires_grad_(True)

    def fn(w, *student):
        return functional_call(module, {"adapter.conv.weight": w}, student_fn(*student))

    return fn, weight


GRADCHECK = {
    "kd_pixel_T3": (lambda: PixelwiseKD(temperature=3.0), ["zs"], lambda x: (x["zt"],)),
    "kd_element_masked": (
        lambda: PixelwiseKD(reduction="element_mean", mask_ignore=True),
        ["zs"],
        lambda x: (x["zt"], x["labels"]),
    ),
    "ace_average": (
        lambda: AdaptiveCrossEntropy(rule="average", temperature=2.0),
        ["zs"],
        lambda x: (x["zt"], x["labels"]),
    ),
    "ace_replace": (lambda: AdaptiveCrossEntropy(), ["zs"], lambda x: (x["zt"], x["labels"])),
    "pairwise_patch1": (lambda: PairwiseAffinity(patch=1), ["fs"], lambda x: (x["ft"],)),
    "ifvd": (lambda: IntraClassFeatureVariation(), ["fs"], lambda x: (x["ft"], x["labels"])),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_plain(name):
    build, student_keys, rest = GRADCHECK[name]
    x = small_inputs()
    module = build().double()
    student = [x[k].requires_grad_(True) for k in student_keys]
    assert gradcheck(lambda *s: module(*s, *rest(x)), student)


def test_gradcheck_cwd_both_with_adapter():
    x = small_inputs()
    module = ChannelWiseDistillation(on="both", student_channels=2, teacher_channels=3).double()
    weight = module.adapter.conv.weight.detach().clone().requires_grad_(True)

    def fn(w, zs, fs):
        return functional_call(module, {"adapter.conv.weight": w}, (zs, x["zt"], fs, x["ft"]))

    assert gradcheck(fn, (weight, x["zs"].requires_grad_(True), x["fs"].requires_grad_(True)))


def test_gradcheck_csc_with_adapter():
    x = small_inputs()
    module = ChannelSpatialCorrelation(2, 3, patch=1, gamma=0.7).double()
    weight = module.adapter.conv.weight.detach().clone().requires_grad_(True)

    def fn(w, fs):
        return functional_call(module, {"adapter.conv.weight": w}, (fs, x["ft"]))

    assert gradcheck(fn, (weight, x["fs"].requires_grad_(True)))


@pytest.mark.parametrize("scope", ["batch", "image"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("negatives", ["student", "teacher"])
def test_gradcheck_i2ckd_squared_l2(scope, normalize, negatives):
    x = small_inputs()
    # A margin larger than any squared distance of these inputs keeps every hinge term active and away from
    # its kink, where a finite difference would not match the one-sided derivative.
    module = I2CKD(2, 3, 3, margin=50.0, scope=scope, normalize=normalize, negatives=negatives, distance="squared_l2")
    module.double()
    weight = module.adapter.conv.weight.detach().clone().requires_grad_(True)

    def fn(w, fs):
        return functional_call(module, {"adapter.conv.weight": w}, (fs, x["ft"], x["labels"]))

    assert gradcheck(fn, (weight, x["fs"].requires_grad_(True)))


# --------------------------------------------------------------------------------------------------------------
# KD's T² scaling
# --------------------------------------------------------------------------------------------------------------
def test_kd_gradient_magnitude_is_stable_across_temperatures():
    g = torch.Generator().manual_seed(0)
    zt = 3 * torch.randn(2, 19, 8, 8, generator=g)
    zs0 = 3 * torch.randn(2, 19, 8, 8, generator=g)
    norms = []
    for temperature in (1.0, 2.0, 4.0, 8.0):
        zs = zs0.clone().requires_grad_(True)
        PixelwiseKD(temperature=temperature)(zs, zt).backward()
        norms.append(zs.grad.norm().item())
    assert max(norms) / min(norms) < 4, norms


# --------------------------------------------------------------------------------------------------------------
# Option validation
# --------------------------------------------------------------------------------------------------------------
BAD_OPTIONS = [
    (lambda: PixelwiseKD(temperature=0), "temperature", "0"),
    (lambda: PixelwiseKD(temperature=True), "temperature", "True"),
    (lambda: PixelwiseKD(reduction="mean"), "reduction", "'mean'"),
    (lambda: PixelwiseKD(mask_ignore="yes"), "mask_ignore", "'yes'"),
    (lambda: ChannelWiseDistillation(temperature=-1.0), "temperature", "-1.0"),
    (lambda: ChannelWiseDistillation(on="feature"), "on", "'feature'"),
    (lambda: ChannelWiseDistillation(on="features"), "student_channels", "None"),
    (lambda: ChannelWiseDistillation(feature_scale=-2), "feature_scale", "-2"),
    (lambda: AdaptiveCrossEntropy(rule="mix"), "rule", "'mix'"),
    (lambda: AdaptiveCrossEntropy(temperature=float("nan")), "temperature", "nan"),
    (lambda: PairwiseAffinity(patch=0), "patch", "0"),
    (lambda: PairwiseAffinity(patch=2.0), "patch", "2.0"),
    (lambda: AdversarialDistillation(8, conditioning="image"), "conditioning", "'image'"),
    (lambda: AdversarialDistillation(8, objective="wgan"), "objective", "'wgan'"),
    (lambda: AdversarialDistillation(8, d_weight=0), "d_weight", "0"),
    (lambda: AdversarialDistillation(8, gp_weight=-1), "gp_weight", "-1"),
    (lambda: AdversarialDistillation(0), "num_classes", "0"),
    (lambda: IntraClassFeatureVariation(num_classes=0), "num_classes", "0"),
    (lambda: IntraClassFeatureVariation(ignore_index="255"), "ignore_index", "'255'"),
    (lambda: ChannelSpatialCorrelation(4, 6, gamma=-0.5), "gamma", "-0.5"),
    (lambda: ChannelSpatialCorrelation(4, 6, patch=-1), "patch", "-1"),
    (lambda: I2CKD(4, 6, 5, margin=-0.1), "margin", "-0.1"),
    (lambda: I2CKD(4, 6, 5, scope="dataset"), "scope", "'dataset'"),
    (lambda: I2CKD(4, 6, 5, negatives="both"), "negatives", "'both'"),
    (lambda: I2CKD(4, 6, 5, mining="semi"), "mining", "'semi'"),
    (lambda: I2CKD(4, 6, 5, normalize="true"), "normalize", "'true'"),
    (lambda: I2CKD(4, 6, 5, distance="l1"), "distance", "'l1'"),
    (lambda: I2CKD(0, 6, 5), "student_channels", "0"),
    (lambda: FeatureAdapter(4, 0), "teacher_channels", "0"),
    (lambda: SegmentationCrossEntropy(aux_weight=-0.4), "aux_weight", "-0.4"),
    (
        lambda: class_prototypes(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), 3, scope="x"),
        "scope",
        "'x'",
    ),
    (
        lambda: triplet_prototype_loss(
            torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, dtype=torch.bool), mining="x"
        ),
        "mining",
        "'x'",
    ),
]


@pytest.mark.parametrize("build,option,value", BAD_OPTIONS)
def test_bad_option_raises_config_error_naming_it(build, option, value):
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert f"{option}=" in message or option in message
    assert value in message


# a loss (built afresh) and the inputs it reads
_AUTOCAST_CASES = {
    "kd": (PixelwiseKD, ("zs", "zt")),
    "cwd": (ChannelWiseDistillation, ("zs", "zt")),
    "ace": (AdaptiveCrossEntropy, ("zs", "zt", "labels")),
    "pairwise": (lambda: PairwiseAffinity(patch=1), ("fs", "ft")),
    "ifvd": (lambda: IntraClassFeatureVariation(num_classes=K), ("fs", "ft", "labels")),
    "i2ckd": (lambda: I2CKD(C_T, C_T, K), ("fs", "ft", "labels")),
}


@pytest.mark.parametrize("name", list(_AUTOCAST_CASES))
def test_losses_compute_in_float32_under_autocast(name):
    """Under bf16 autocast (the student's forward), a loss on float32 tensors gives its float32 value: its
    products and reductions do not drop to bf16 (whose 8-bit mantissa would move it by ~1e-3). A feature
    adapter is a layer of the student and follows autocast like one (CWD on features, CSC: not checked here);
    I2CKD's adapter is applied to the prototypes, inside the loss's float32 block."""
    x = make_inputs(c_s=C_T, dtype=torch.float32)
    torch.manual_seed(0)
    build, keys = _AUTOCAST_CASES[name]
    module = build()
    expected = module(*(x[k] for k in keys))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = module(*(x[k] for k in keys))
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7)


def test_valid_choices_are_listed_in_the_message():
    with pytest.raises(ConfigError, match="'pixel_mean', 'element_mean'"):
        PixelwiseKD(reduction="sum")


def test_shape_mismatch_raises_preflight_error():
    x = make_inputs()
    with pytest.raises(PreflightError, match="student_logits"):
        PixelwiseKD()(x["zs"], x["zt"][:, :3])
    with pytest.raises(PreflightError, match="student_features"):
        PairwiseAffinity()(x["fs"], x["ft"][..., :4])
    with pytest.raises(PreflightError, match="channels"):
        I2CKD(C_T, C_T, K)(x["fs"], x["ft"], x["labels"])


def _objective_and_tensors(overrides, student_channels=16, teacher_channels=32, size=8):
    """A DistillationObjective from job overrides, and step tensors of a K=8 student and teacher."""
    from kdray.config import job_from_dict
    from kdray.losses.objective import DistillationObjective
    from kdray.models import SegmenterOutput

    losses = job_from_dict({}, overrides).losses
    objective = DistillationObjective(losses, num_classes=8, student_channels=student_channels,
                                      teacher_channels=teacher_channels)
    g = torch.Generator().manual_seed(12)
    s = SegmenterOutput(torch.randn(2, 8, size, size, generator=g),
                        torch.randn(2, student_channels, size, size, generator=g).relu(), None)
    t = SegmenterOutput(torch.randn(2, 8, size, size, generator=g),
                        torch.randn(2, teacher_channels, size, size, generator=g).relu(), None)
    labels = torch.randint(0, 8, (2, 4 * size, 4 * size), generator=g)
    return objective, objective.step_tensors(s, t, labels, torch.randn(2, 3, 4 * size, 4 * size, generator=g))


@pytest.mark.parametrize("name", ["ifvd", "i2ckd"])
def test_feature_losses_resize_the_full_labels_once(name):
    """Features at 3×3 and logits at 4×4 of 12×12 labels: one nearest resize 12 -> 3 takes rows 0, 4, 8, the
    two in a row 12 -> 4 -> 3 would take 0, 3, 6; the objective must give the loss the full labels."""
    objective, tensors = _objective_and_tensors([f"losses.{name}.enabled=true"], size=3)
    g = torch.Generator().manual_seed(13)
    labels = torch.randint(0, 8, (2, 12, 12), generator=g)
    tensors = tensors.replace({"student.logits": torch.randn(2, 8, 4, 4), "teacher.logits": torch.randn(2, 8, 4, 4),
                               "labels": labels, "labels.at_logits": labels[:, ::3, ::3]})
    _, parts = objective(tensors)
    module = objective.terms[name]
    features = (tensors["student.features[head]"], tensors["teacher.features[head]"])
    expected = module(*features, labels[:, ::4, ::4])
    assert not torch.allclose(expected, module(*features, labels[:, ::3, ::3][:, :3, :3]))  # the two differ here
    torch.testing.assert_close(parts[name], expected)


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        # the adapter's channels do not match the teacher's: raised inside I2CKD, named by its config key
        (["losses.i2ckd.enabled=true"], ["losses.i2ckd:", "features (2, 16, 8, 8)", "features (2, 24, 8, 8)",
                                         "channels"]),
        (["losses.csc.enabled=true"], ["losses.csc:", "features (2, 24, 8, 8)"]),
    ],
)
def test_preflight_names_the_config_key_and_the_shapes_for_errors_inside_a_loss(overrides, fragments):
    objective, tensors = _objective_and_tensors(overrides)
    tensors = tensors.replace({"teacher.features[head]": torch.randn(2, 24, 8, 8)})  # the objective was built for 32
    with pytest.raises(PreflightError) as err:
        objective.preflight(tensors)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_preflight_names_the_adversarial_loss_on_a_map_too_small_for_its_discriminator():
    objective, tensors = _objective_and_tensors(["losses.adversarial.enabled=true"], size=1)
    with pytest.raises(PreflightError, match=r"losses.adversarial: .*logits \(2, 8, 1, 1\).*h, w >= 2"):
        objective.preflight(tensors)


@pytest.mark.parametrize("objective_name", ["hinge", "wgan_gp"])
def test_preflight_runs_the_discriminator_loss_and_leaves_no_trace(objective_name, monkeypatch):
    overrides = ["losses.adversarial.enabled=true", f"losses.adversarial.objective={objective_name}"]
    objective, tensors = _objective_and_tensors(overrides)
    adversarial = objective.terms["adversarial"]
    before = {k: v.clone() for k, v in adversarial.state_dict().items()}
    rng = torch.get_rng_state()
    objective.preflight(tensors)  # WGAN-GP's penalty draws α and needs autograd
    assert torch.equal(torch.get_rng_state(), rng)
    after = adversarial.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in adversarial.parameters())
    assert objective.training

    def broken(*args, **kwargs):
        raise RuntimeError("the discriminator's own loss failed")

    monkeypatch.setattr(adversarial, "discriminator_loss", broken)
    with pytest.raises(PreflightError, match="losses.adversarial: .*the discriminator's own loss failed"):
        objective.preflight(tensors)


# --------------------------------------------------------------------------------------------------------------
# The two forms of the pair-wise distance (M×M affinities, C×C Gram matrices)
# --------------------------------------------------------------------------------------------------------------
def test_gram_and_affinity_forms_give_the_same_gradient():
    g = torch.Generator().manual_seed(3)
    nodes_t = torch.randn(2, 6, 40, generator=g, dtype=torch.float64).relu()
    grads = []
    for via in ("affinity", "gram"):
        nodes_s = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        nodes_s.requires_grad_(True)
        spatial_affinity_distance(nodes_s, nodes_t, via=via).backward()
        grads.append(nodes_s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("noise", [1e-1, 1e-2, 1e-3])
def test_gram_form_keeps_its_precision_when_the_student_is_close(noise):
    """Its three terms nearly cancel as A_S → A_T; the float64 accumulation keeps float32 inputs accurate."""
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(1, 32, 512, generator=g).relu()
    student = teacher + noise * torch.randn(teacher.shape, generator=g)
    exact = spatial_affinity_distance(student.double(), teacher.double(), via="affinity").item()
    got = spatial_affinity_distance(student, teacher, via="gram")
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(exact, rel=1e-5)


def test_gram_form_runs_in_float64_under_autocast():
    g = torch.Generator().manual_seed(6)
    nodes_s, nodes_t = torch.randn(2, 8, 300, generator=g), torch.randn(2, 16, 300, generator=g)
    exact = spatial_affinity_distance(nodes_s, nodes_t, via="affinity").item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = spatial_affinity_distance(nodes_s.bfloat16(), nodes_t.bfloat16(), via="gram")
    assert got.dtype == torch.float32
    # only the inputs' rounding to bfloat16 remains (a few parts in 1e3), not the cancellation
    assert got.item() == pytest.approx(exact, rel=2e-2)


def test_auto_form_is_the_cheaper_one():
    assert gram_is_cheaper(128, 256, 2048)  # paper maps 64×128, patch 2
    assert not gram_is_cheaper(32, 64, 64)  # demo maps 16×16, patch 2
    with pytest.raises(ValueError, match="via must be one of"):
        spatial_affinity_distance(torch.ones(1, 2, 3), torch.ones(1, 2, 3), via="fast")


# --------------------------------------------------------------------------------------------------------------
# ACE's teacher prediction
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_class_argmax_is_torch_argmax_including_ties(dtype):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 6, 5, 7, generator=g).round().to(dtype)  # rounding makes many exact ties
    logits[0, :, 0, 0] = 1.0  # every class tied
    assert (logits == logits.amax(dim=1, keepdim=True)).sum(dim=1).gt(1).any()
    assert torch.equal(class_argmax(logits), logits.argmax(dim=1))


def test_class_argmax_of_a_nan_pixel_is_no_class():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 1, 0, 0] = float("nan")
    assert class_argmax(logits).tolist() == [[[3, 0]]]


@pytest.mark.parametrize("rule", ["replace", "average"])
def test_ace_counts_no_label_term_at_an_ignore_index_inside_the_classes(rule):
    """With ignore_index = 0 (a dataset whose class 0 is "void"), pixels labelled 0 add nothing: the same loss
    as with those pixels relabelled 255 and the default ignore_index, value and gradient."""
    x = make_inputs()
    labels = x["labels"].clone()
    labels[labels == IGNORE] = 1
    void = labels == 0
    assert void.any()
    student = x["zs"].clone().requires_grad_(True)
    reference = x["zs"].clone().requires_grad_(True)
    got = AdaptiveCrossEntropy(rule=rule, ignore_index=0)(student, x["zt"], labels)
    expected = AdaptiveCrossEntropy(rule=rule)(reference, x["zt"], labels.masked_fill(void, IGNORE))
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(student.grad, reference.grad)


def test_ace_in_half_precision_is_computed_in_float32():
    x = make_inputs()
    student = x["zs"].float().bfloat16().requires_grad_(True)
    reference = student.detach().float().requires_grad_(True)
    teacher = x["zt"].float().bfloat16()
    got = AdaptiveCrossEntropy(temperature=2.0)(student, teacher, x["labels"])
    expected = AdaptiveCrossEntropy(temperature=2.0)(reference, teacher.float(), x["labels"])
    got.backward()
    expected.backward()
    assert got.dtype == torch.float32 and student.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(student.grad.float(), reference.grad, rtol=2e-2, atol=2e-3)


# --------------------------------------------------------------------------------------------------------------
# softmax_kl: the KL of two softmaxes with its gradient written out (KD, CWD)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_softmax_kl_gradient_is_exact(dim, weighted, temperature):
    g = torch.Generator().manual_seed(8)
    student = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    weight = None
    if weighted:
        shape = [2, 4, 6]
        shape[dim] = 1
        weight = (torch.rand(shape, generator=g) > 0.4).double()
    assert gradcheck(lambda s: softmax_kl(s, teacher, dim, weight, temperature), (student,))
    log_p_s, log_p_t = F.log_softmax(student / temperature, dim), F.log_softmax(teacher / temperature, dim)
    expected = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True)
    if weight is not None:
        expected = expected * weight
    torch.testing.assert_close(softmax_kl(student, teacher, dim, weight, temperature), expected.sum())


@pytest.mark.parametrize("as_tensor", [False, True])
def test_softmax_kl_scale_multiplies_value_and_gradient_and_takes_no_gradient(as_tensor):
    g = torch.Generator().manual_seed(10)
    student = torch.randn(2, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if as_tensor else 0.3
    assert gradcheck(lambda s: softmax_kl(s, teacher, 1, None, 2.0, scale=scale), (student,))
    plain = softmax_kl(student, teacher, 1, None, 2.0)
    (plain_grad,) = torch.autograd.grad(plain, student)
    scaled = softmax_kl(student, teacher, 1, None, 2.0, scale=scale)
    (scaled_grad,) = torch.autograd.grad(scaled, student)
    torch.testing.assert_close(scaled, 0.3 * plain.detach())
    torch.testing.assert_close(scaled_grad, 0.3 * plain_grad)
    if as_tensor:
        assert scale.grad is None


def test_softmax_kl_leaves_the_teacher_alone_and_works_in_half_precision():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(2, 5, 3, 3, generator=g).bfloat16().requires_grad_(True)
    teacher = torch.randn(2, 5, 3, 3, generator=g).bfloat16().requires_grad_(True)
    softmax_kl(student, teacher, 1).backward()
    assert teacher.grad is None
    assert student.grad.dtype == torch.bfloat16
    reference = student.detach().float().requires_grad_(True)
    softmax_kl(reference, teacher.detach().float(), 1).backward()
    torch.testing.assert_close(student.grad.float(), reference.grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("top", [0.0, 5.0, -20.0, 100.0])
def test_shifted_exponentials_are_exp_of_shifted_scores(dtype, temperature, top):
    # three rows, maxima top, top − 7, top − 14; the shifted scores span [−104, 0]
    scores = torch.linspace(0, -104 * temperature, 100_001, dtype=dtype) + top
    scores = torch.stack([scores, scores - 7, scores - 14])[:, torch.randperm(100_001)]
    actual, maxima = shifted_exponentials(scores, dim=1, temperature=temperature)
    assert actual.dtype == dtype and maxima.flatten().tolist() == [top, top - 7, top - 14]
    wide = np.longdouble  # 80-bit on x86: a reference more precise than float64
    expected = np.exp((scores.numpy().astype(wide) - maxima.numpy().astype(wide)) / wide(temperature))
    bound = torch.finfo(dtype).eps * (1 + np.abs(maxima.numpy().astype(wide)) * LOG2_E / (2 * temperature))
    assert (np.abs(actual.numpy().astype(wide) - expected) <= bound).all()
    edge, _ = shifted_exponentials(torch.tensor([[0.0, float("-inf"), -1.0]], dtype=dtype), dim=1)
    assert edge[0, :2].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dim", [1, 2])
def test_softmax_kl_is_zero_for_equal_inputs_and_exact_near_them(dim):
    """The per-element difference x_T − x_S keeps the value accurate where the two distributions nearly agree."""
    g = torch.Generator().manual_seed(11)
    teacher = torch.randn(2, 19, 64, generator=g, dtype=torch.float64) * 4
    assert softmax_kl(teacher.float(), teacher.float(), dim).item() == 0.0
    student = teacher + 1e-2 * torch.randn(teacher.shape, generator=g, dtype=torch.float64)
    log_p_s, log_p_t = F.log_softmax(student, dim), F.log_softmax(teacher, dim)
    expected = (log_p_t.exp() * (log_p_t - log_p_s)).sum()  # ~1e-3, of terms ~1: float32 keeps ~3 digits
    # (two dot products with x_T and x_S, a difference of ~1e2-sized sums, would be off by 2-4 %)
    torch.testing.assert_close(softmax_kl(student.float(), teacher.float(), dim).double(), expected, rtol=5e-3, atol=0)


# --------------------------------------------------------------------------------------------------------------
# IFVD's cosine map: the hand-written gradient against autograd on the plain formula
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_bytes", [8, 2 * 7 * 8 * 3, 1 << 21])  # one channel per block, 3 (of 10), all
def test_squared_norms_in_channel_blocks_are_the_plain_sum_of_squares(block_bytes):
    features = torch.randn(2, 10, 7, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    torch.testing.assert_close(squared_norms(features, block_bytes), features.square().sum(dim=1))


def autograd_prototype_cosine(features, labels, num_classes, eps=1e-12):
    """The formula in plain autograd ops: per-image class means gathered per pixel, F.normalize-style clamps."""
    n, c, h, w = features.shape
    flat = features.flatten(2)
    y = labels.flatten(1)
    labelled = (y >= 0) & (y < num_classes)
    one_hot = F.one_hot(torch.where(labelled, y, num_classes), num_classes + 1)[..., :num_classes].to(flat.dtype)
    means = (one_hot.mT @ flat.mT) / one_hot.sum(dim=1).clamp_min(1).unsqueeze(-1)  # (N, K, C)
    centre = torch.gather(means, 1, torch.where(labelled, y, 0).unsqueeze(-1).expand(n, h * w, c))  # (N, M, C)
    pixel = flat.mT
    cosine = (pixel * centre).sum(-1) / (pixel.norm(dim=-1).clamp_min(eps) * centre.norm(dim=-1).clamp_min(eps))
    return torch.where(labelled, cosine, torch.ones_like(cosine))


@pytest.mark.parametrize("awkward", ["none", "zero_pixels", "zero_class", "absent_and_ignored", "one_pixel_classes"])
def test_prototype_cosine_gradient_equals_autograd_of_the_formula(awkward):
    g = torch.Generator().manual_seed(11)
    features = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (2, 4, 6), generator=g)
    if awkward == "zero_pixels":
        features[0, :, 1, :3] = 0  # |f_i| = 0 < eps: cosine 0, no gradient through the pixel norm
    elif awkward == "zero_class":
        features[1][:, labels[1] == 2] = 0  # a zero prototype: |P_k| = 0 < eps
    elif awkward == "absent_and_ignored":
        labels[labels == 3] = 1  # class 3 absent
        labels[:, 0] = IGNORE
    elif awkward == "one_pixel_classes":
        labels[0] = 0
        labels[0, 2, 3], labels[0, 1, 1] = 1, 2
    features.requires_grad_(True)
    reference = features.detach().clone().requires_grad_(True)
    upstream = torch.randn(2, 24, generator=g, dtype=torch.float64)
    one_hot = one_hot_ignore(labels, 4, IGNORE, torch.float64).flatten(2)
    got = prototype_similarity(features, one_hot)
    expected = autograd_prototype_cosine(reference, labels, 4)
    torch.testing.assert_close(got, expected)
    got.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(features.grad, reference.grad)


def test_prototype_cosine_in_half_precision_is_computed_in_float32():
    g = torch.Generator().manual_seed(12)
    features = torch.randn(2, 8, 4, 6, generator=g).bfloat16().requires_grad_(True)
    labels = torch.randint(0, 3, (2, 4, 6), generator=g)
    one_hot = one_hot_ignore(labels, 3, IGNORE, torch.bfloat16).flatten(2)
    got = prototype_similarity(features, one_hot)
    got.sum().backward()
    reference = features.detach().float().requires_grad_(True)
    expected = prototype_similarity(reference, one_hot.float())
    expected.sum().backward()
    assert got.dtype == torch.float32 and features.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(features.grad.float(), reference.grad, rtol=2e-2, atol=2e-3)
