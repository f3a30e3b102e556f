"""Every loss against an independent float64 reference written with explicit Python loops.

The references below use no kdray code (not even the label resize): they read the definitions in
`shared/kd-losses.md` pixel by pixel and class by class, on numpy arrays, so a vectorisation mistake in
`kdray.losses` (a wrong axis, a mean over the wrong count, a broadcast across images) shows up as a mismatch.
Cases cover a class absent from the batch, a class with exactly one pixel, all-ignore labels, N = 1,
non-square maps, labels at full size with a non-integer resize ratio, and C_S != C_T.
"""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdray.losses import (
    I2CKD,
    AdaptiveCrossEntropy,
    AdversarialDistillation,
    ChannelSpatialCorrelation,
    ChannelWiseDistillation,
    IntraClassFeatureVariation,
    PairwiseAffinity,
    PixelwiseKD,
    SegmentationCrossEntropy,
)
from kdray.losses.class_sums import _chunks, class_sums
from kdray.losses.pairwise import pool_nodes, spatial_affinity_distance

IGNORE = 255
RTOL, ATOL = 1e-6, 1e-12


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------
# name: (N, K, h, w, H, W); labels are built at h×w with the property the case needs, then spread to H×W
CASES = {
    # class 1 has exactly one pixel in the batch, class 3 is absent, some pixels ignored; 11×16 -> 5×7
    "mixed": (2, 4, 5, 7, 11, 16),
    "all_ignore": (2, 4, 5, 7, 10, 14),
    "single_image": (1, 4, 4, 6, 4, 6),  # labels passed at the logits' size
    "one_class": (2, 4, 3, 5, 6, 10),  # only class 2 (and ignore): fewer than two classes
}
C_S, C_T = 3, 5


def nearest_index(out_size: int, in_size: int) -> list[int]:
    return [(i * in_size) // out_size for i in range(out_size)]


def make_case(name: str, seed: int = 0) -> dict:
    n, k, h, w, H, W = CASES[name]
    g = torch.Generator().manual_seed(seed)
    if name == "all_ignore":
        small = torch.full((n, h, w), IGNORE)
    elif name == "one_class":
        small = torch.full((n, h, w), 2)
        small[0, 0, :2] = IGNORE
    else:
        small = torch.randint(0, 3, (n, h, w), generator=g)  # classes 0..2: class 3 absent
        small[torch.rand(n, h, w, generator=g) < 0.15] = IGNORE
        if name == "mixed":
            small[small == 1] = 0
            small[0, 2, 3] = 1  # the only pixel of class 1
    full = torch.randint(0, k, (n, H, W), generator=g)
    full[torch.rand(n, H, W, generator=g) < 0.1] = IGNORE
    rows, cols = nearest_index(h, H), nearest_index(w, W)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            full[:, r, c] = small[:, i, j]

    zs = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    zt = torch.randn(n, k, h, w, generator=g, dtype=torch.float64)
    # Make the teacher right on about half of the labelled pixels so ACE's both branches are exercised.
    boost = (torch.rand(n, h, w, generator=g) < 0.5) & (small != IGNORE)
    zt = zt + 4.0 * F.one_hot(small.clamp(max=k - 1), k).permute(0, 3, 1, 2) * boost.unsqueeze(1)
    return {
        "zs": zs,
        "zt": zt,
        "fs": torch.randn(n, C_S, h, w, generator=g, dtype=torch.float64),
        "ft": torch.randn(n, C_T, h, w, generator=g, dtype=torch.float64),
        "labels": full,
        "small": small,
        "images": torch.rand(n, 3, H, W, generator=g, dtype=torch.float64),
        "K": k,
    }


def close(actual: torch.Tensor, expected: float) -> None:
    assert torch.isfinite(actual)
    torch.testing.assert_close(actual.item(), float(expected), rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------------------------
# Reference building blocks (numpy + loops)
# --------------------------------------------------------------------------------------------------------------
def ref_resize_nearest(labels: np.ndarray, h: int, w: int) -> np.ndarray:
    n, H, W = labels.shape
    out = np.empty((n, h, w), dtype=np.int64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                out[b, i, j] = labels[b, (i * H) // h, (j * W) // w]
    return out


def ref_log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    log_sum = math.log(sum(math.exp(v - top) for v in values))
    return [v - top - log_sum for v in values]


def ref_kl(log_p: list[float], log_q: list[float]) -> float:
    """KL(p || q) from log-probabilities."""
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q, strict=True))


def ref_adapter(f: np.ndarray, weight: np.ndarray) -> np.ndarray:
    n, c_in, h, w = f.shape
    out = np.zeros((n, weight.shape[0], h, w))
    for b in range(n):
        for c in range(weight.shape[0]):
            for i in range(h):
                for j in range(w):
                    out[b, c, i, j] = sum(weight[c, d] * f[b, d, i, j] for d in range(c_in))
    return out


def ref_unit(vec: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in vec))
    return [v / max(norm, 1e-12) for v in vec]


def ref_dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


def ref_nodes(f: np.ndarray, patch: int) -> list[list[float]]:
    """Max over each patch×patch window (ceil mode: partial windows at the border). f: (C, h, w)."""
    c_count, h, w = f.shape
    nodes = []
    for a in range(math.ceil(h / patch)):
        for b in range(math.ceil(w / patch)):
            window_rows = range(a * patch, min((a + 1) * patch, h))
            window_cols = range(b * patch, min((b + 1) * patch, w))
            nodes.append([max(f[c, i, j] for i in window_rows for j in window_cols) for c in range(c_count)])
    return nodes


def ref_spatial_affinity(nodes: list[list[float]]) -> list[list[float]]:
    units = [ref_unit(v) for v in nodes]
    return [[ref_dot(a, b) for b in units] for a in units]


def ref_channel_affinity(nodes: list[list[float]]) -> list[list[float]]:
    channels = [ref_unit([node[c] for node in nodes]) for c in range(len(nodes[0]))]
    return [[ref_dot(a, b) for b in channels] for a in channels]


def ref_mean_squared_difference(a: list[list[list[float]]], b: list[list[list[float]]]) -> float:
    total, count = 0.0, 0
    for ma, mb in zip(a, b, strict=True):
        for ra, rb in zip(ma, mb, strict=True):
            for x, y in zip(ra, rb, strict=True):
                total += (x - y) ** 2
                count += 1
    return total / count


# --------------------------------------------------------------------------------------------------------------
# References, one per loss
# --------------------------------------------------------------------------------------------------------------
def ref_kd(zs, zt, labels, temperature, reduction, mask_ignore):
    n, k, h, w = zs.shape
    y = ref_resize_nearest(labels, h, w)
    total, count = 0.0, 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                if mask_ignore and y[b, i, j] == IGNORE:
                    continue
                log_s = ref_log_softmax([zs[b, c, i, j] / temperature for c in range(k)])
                log_t = ref_log_softmax([zt[b, c, i, j] / temperature for c in range(k)])
                total += ref_kl(log_t, log_s)
                count += 1
    if count == 0:
        return 0.0
    if reduction == "pixel_mean":
        return temperature**2 * total / count
    return total / (count * k)


def ref_cwd_term(xs, xt, temperature):
    n, c_count, h, w = xs.shape
    total = 0.0
    for b in range(n):
        for c in range(c_count):
            log_s = ref_log_softmax([xs[b, c, i, j] / temperature for i in range(h) for j in range(w)])
            log_t = ref_log_softmax([xt[b, c, i, j] / temperature for i in range(h) for j in range(w)])
            total += ref_kl(log_t, log_s)
    return temperature**2 * total / (n * c_count)


def ref_ace(zs, zt, labels, rule, temperature):
    n, k, h, w = zs.shape
    y = ref_resize_nearest(labels, h, w)
    total, count = 0.0, 0
    for b in range(n):
        for i in range(h):
            for j in range(w):
                label = int(y[b, i, j])
                if label == IGNORE:
                    continue
                count += 1
                teacher = [zt[b, c, i, j] for c in range(k)]
                one_hot = [1.0 if c == label else 0.0 for c in range(k)]
                if teacher.index(max(teacher)) == label:
                    p_t = [math.exp(v) for v in ref_log_softmax([v / temperature for v in teacher])]
                    q = p_t if rule == "replace" else [(p + o) / 2 for p, o in zip(p_t, one_hot, strict=True)]
                else:
                    q = one_hot
                log_s = ref_log_softmax([zs[b, c, i, j] / temperature for c in range(k)])
                total -= ref_dot(q, log_s)
    return total / count if count else 0.0


def ref_pairwise(fs, ft, patch):
    a_s = [ref_spatial_affinity(ref_nodes(f, patch)) for f in fs]
    a_t = [ref_spatial_affinity(ref_nodes(f, patch)) for f in ft]
    return ref_mean_squared_difference(a_s, a_t)


def ref_csc(fs, ft, weight, patch, gamma):
    projected = ref_adapter(fs, weight)
    nodes_s = [ref_nodes(f, patch) for f in projected]
    nodes_t = [ref_nodes(f, patch) for f in ft]
    spatial = ref_mean_squared_difference(
        [ref_spatial_affinity(v) for v in nodes_s], [ref_spatial_affinity(v) for v in nodes_t]
    )
    channel = ref_mean_squared_difference(
        [ref_channel_affinity(v) for v in nodes_s], [ref_channel_affinity(v) for v in nodes_t]
    )
    return spatial + gamma * channel


def ref_ifvd(fs, ft, labels):
    n, _, h, w = fs.shape
    y = ref_resize_nearest(labels, h, w)

    def similarities(f, b):
        centres = {}
        for label in {int(v) for v in y[b].flatten()} - {IGNORE}:
            pixels = [(i, j) for i in range(h) for j in range(w) if y[b, i, j] == label]
            centres[label] = [sum(f[b, c, i, j] for i, j in pixels) / len(pixels) for c in range(f.shape[1])]
        out = {}
        for i in range(h):
            for j in range(w):
                label = int(y[b, i, j])
                if label == IGNORE:
                    out[i, j] = 1.0
                else:
                    vec = [f[b, c, i, j] for c in range(f.shape[1])]
                    out[i, j] = ref_dot(ref_unit(vec), ref_unit(centres[label]))
        return out

    total = 0.0
    for b in range(n):
        s_s, s_t = similarities(fs, b), similarities(ft, b)
        total += sum((s_s[p] - s_t[p]) ** 2 for p in s_s)
    return total / (n * h * w)


def ref_i2ckd(fs, ft, labels, weight, num_classes, margin, scope, negatives, mining, normalize, distance):
    projected = ref_adapter(fs, weight)
    n, _, h, w = fs.shape
    y = ref_resize_nearest(labels, h, w)
    images = [list(range(n))] if scope == "batch" else [[b] for b in range(n)]

    def dist(a, b):
        squared = sum((x - z) ** 2 for x, z in zip(a, b, strict=True))
        return math.sqrt(squared) if distance == "l2" else squared

    group_losses = []
    for group in images:
        pixels = [(b, i, j) for b in group for i in range(h) for j in range(w)]
        classes = sorted({int(y[p]) for p in pixels} - {IGNORE})
        classes = [c for c in classes if c < num_classes]
        if len(classes) < 2:
            continue
        protos = {}
        for name, f in (("S", projected), ("T", ft)):
            for k in classes:
                members = [(b, i, j) for b, i, j in pixels if y[b, i, j] == k]
                mean = [sum(f[b, c, i, j] for b, i, j in members) / len(members) for c in range(f.shape[1])]
                protos[name, k] = ref_unit(mean) if normalize else mean
        negative = "S" if negatives == "student" else "T"

        def term(k, j):
            pos = dist(protos["T", k], protos["S", k])  # noqa: B023 (used inside this iteration only)
            neg = dist(protos["T", k], protos[negative, j])  # noqa: B023
            return max(0.0, pos - neg + margin)

        if mining == "all":
            terms = [term(k, j) for k in classes for j in classes if j != k]
        else:
            terms = [max(term(k, j) for j in classes if j != k) for k in classes]
        group_losses.append(sum(terms) / len(terms))
    return sum(group_losses) / len(group_losses) if group_losses else 0.0


def ref_bilinear(x, out_h, out_w):
    """F.interpolate(mode="bilinear", align_corners=False) on one (C, h, w) map, written out."""
    c_count, h, w = x.shape

    def source(dst, in_size, out_size):
        src = max((dst + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(src)), in_size - 1)
        high = min(low + 1, in_size - 1)
        return low, high, src - low

    out = np.zeros((c_count, out_h, out_w))
    for i in range(out_h):
        i0, i1, li = source(i, h, out_h)
        for j in range(out_w):
            j0, j1, lj = source(j, w, out_w)
            for c in range(c_count):
                top = (1 - lj) * x[c, i0, j0] + lj * x[c, i0, j1]
                bottom = (1 - lj) * x[c, i1, j0] + lj * x[c, i1, j1]
                out[c, i, j] = (1 - li) * top + li * bottom
    return out


def ref_ce(logits, labels):
    n, k = logits.shape[:2]
    _, H, W = labels.shape
    total, count = 0.0, 0
    for b in range(n):
        up = ref_bilinear(logits[b], H, W)
        for i in range(H):
            for j in range(W):
                label = int(labels[b, i, j])
                if label == IGNORE:
                    continue
                total -= ref_log_softmax([up[c, i, j] for c in range(k)])[label]
                count += 1
    return total / count if count else 0.0


# --------------------------------------------------------------------------------------------------------------
# The comparisons
# --------------------------------------------------------------------------------------------------------------
def numpy_inputs(case):
    return {key: case[key].numpy() for key in ("zs", "zt", "fs", "ft", "labels")}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(
    "temperature,reduction,mask_ignore",
    [(1.0, "pixel_mean", False), (4.0, "element_mean", False), (2.0, "pixel_mean", True), (3.0, "element_mean", True)],
)
def test_kd_matches_reference(case, temperature, reduction, mask_ignore):
    c = make_case(case)
    a = numpy_inputs(c)
    loss = PixelwiseKD(temperature=temperature, reduction=reduction, mask_ignore=mask_ignore)
    expected = ref_kd(a["zs"], a["zt"], a["labels"], temperature, reduction, mask_ignore)
    close(loss(c["zs"], c["zt"], c["labels"]), expected)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("on,temperature", [("logits", 4.0), ("features", 1.0), ("both", 2.0)])
def test_cwd_matches_reference(case, on, temperature):
    c = make_case(case)
    a = numpy_inputs(c)
    loss = ChannelWiseDistillation(temperature=temperature, on=on, student_channels=C_S, teacher_channels=C_T)
    loss.double()
    expected = 0.0
    if on != "features":
        expected += ref_cwd_term(a["zs"], a["zt"], temperature)
    if on != "logits":
        weight = loss.adapter.conv.weight.detach()[:, :, 0, 0].numpy()
        expected += 50 / 3 * ref_cwd_term(ref_adapter(a["fs"], weight), a["ft"], temperature)
    close(loss(c["zs"], c["zt"], c["fs"], c["ft"]), expected)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rule,temperature", [("replace", 1.0), ("average", 1.0), ("replace", 2.5), ("average", 3.0)])
def test_ace_matches_reference(case, rule, temperature):
    c = make_case(case)
    a = numpy_inputs(c)
    loss = AdaptiveCrossEntropy(rule=rule, temperature=temperature)
    close(loss(c["zs"], c["zt"], c["labels"]), ref_ace(a["zs"], a["zt"], a["labels"], rule, temperature))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("patch", [1, 2, 3])
def test_pairwise_matches_reference(case, patch):
    c = make_case(case)
    a = numpy_inputs(c)
    close(PairwiseAffinity(patch=patch)(c["fs"], c["ft"]), ref_pairwise(a["fs"], a["ft"], patch))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("patch", [1, 2, 3])
@pytest.mark.parametrize("via", ["affinity", "gram"])
def test_both_forms_of_the_affinity_distance_match_reference(case, patch, via):
    """The pair-wise module picks one of two exact forms by cost; each must equal the reference on its own."""
    c = make_case(case)
    a = numpy_inputs(c)
    got = spatial_affinity_distance(pool_nodes(c["fs"], patch), pool_nodes(c["ft"], patch), via=via)
    close(got, ref_pairwise(a["fs"], a["ft"], patch))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("patch,gamma", [(1, 1.0), (2, 1.0), (3, 0.5)])
def test_csc_matches_reference(case, patch, gamma):
    c = make_case(case)
    a = numpy_inputs(c)
    loss = ChannelSpatialCorrelation(C_S, C_T, patch=patch, gamma=gamma).double()
    weight = loss.adapter.conv.weight.detach()[:, :, 0, 0].numpy()
    close(loss(c["fs"], c["ft"]), ref_csc(a["fs"], a["ft"], weight, patch, gamma))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("num_classes", [None, 4])
def test_ifvd_matches_reference(case, num_classes):
    c = make_case(case)
    a = numpy_inputs(c)
    loss = IntraClassFeatureVariation(num_classes=num_classes)
    close(loss(c["fs"], c["ft"], c["labels"]), ref_ifvd(a["fs"], a["ft"], a["labels"]))


I2CKD_OPTIONS = list(
    itertools.product(
        ["batch", "image"], ["student", "teacher"], ["all", "hardest"], [True, False], ["l2", "squared_l2"]
    )
)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("scope,negatives,mining,normalize,distance", I2CKD_OPTIONS)
def test_i2ckd_matches_reference(case, scope, negatives, mining, normalize, distance):
    c = make_case(case)
    a = numpy_inputs(c)
    options = {"scope": scope, "negatives": negatives, "mining": mining, "normalize": normalize}
    loss = I2CKD(C_S, C_T, c["K"], margin=0.5, distance=distance, **options).double()
    weight = loss.adapter.conv.weight.detach()[:, :, 0, 0].numpy()
    expected = ref_i2ckd(
        a["fs"], a["ft"], a["labels"], weight, c["K"], 0.5, scope, negatives, mining, normalize, distance
    )
    close(loss(c["fs"], c["ft"], c["labels"]), expected)


def test_i2ckd_reference_cases_are_not_trivial():
    """The mixed case must give a positive loss under every option, or the comparison above proves little."""
    c = make_case("mixed")
    for scope, negatives, mining, normalize, distance in I2CKD_OPTIONS:
        options = {"scope": scope, "negatives": negatives, "mining": mining, "normalize": normalize}
        loss = I2CKD(C_S, C_T, 4, distance=distance, **options).double()
        assert loss(c["fs"], c["ft"], c["labels"]).item() > 0


@pytest.mark.parametrize("chunks", [None, 1, 4, 16])
def test_class_sums_in_chunks_equal_the_one_product(chunks):
    """The split reduction (CUDA's path, forced here on the CPU) gives the sums and gradients of the plain product."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 64, dtype=torch.float64, generator=g, requires_grad=True)
    one_hot = F.one_hot(torch.randint(0, 3, (2, 64), generator=g), 3).mT.double().requires_grad_(True)
    expected = torch.einsum("ncm,nkm->nck", features, one_hot)
    got = class_sums(features, one_hot, chunks=chunks)
    torch.testing.assert_close(got, expected)
    weights = torch.randn(2, 5, 3, dtype=torch.float64, generator=g)
    grads = torch.autograd.grad((got * weights).sum(), (features, one_hot))
    for grad, want in zip(grads, torch.autograd.grad((expected * weights).sum(), (features, one_hot)), strict=True):
        torch.testing.assert_close(grad, want)


def test_class_sum_chunks_divide_the_pixels_into_pieces_of_at_least_512():
    assert [_chunks(m) for m in (256, 1024, 8192, 12288, 1 << 20, 8191)] == [1, 2, 16, 16, 64, 1]


def test_i2ckd_prototypes_stay_float32_under_float16_autocast():
    """A class's feature sum over thousands of pixels is past float16's 65504, and an absent class's zero
    prototype normalised with float16 arithmetic is 0/0: under fp16 AMP the prototypes are made in float32."""
    g = torch.Generator().manual_seed(0)
    fs, ft = 8 + torch.rand(2, 8, 64, 64, generator=g), 8 + torch.rand(2, 16, 64, 64, generator=g)
    labels = torch.randint(0, 2, (2, 64, 64), generator=g)  # classes 2 and 3 absent; ~4096 pixels × 8 per class
    fs.requires_grad_(True)
    torch.manual_seed(0)
    loss = I2CKD(8, 16, 4)
    expected = loss(fs, ft, labels)
    with torch.autocast("cpu", dtype=torch.float16):
        got = loss(fs.to(torch.float16), ft.to(torch.float16), labels)
    got.backward()
    assert got.dtype == torch.float32 and torch.isfinite(fs.grad).all()
    torch.testing.assert_close(got.item(), expected.item(), rtol=1e-2, atol=0)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_aux", [False, True])
def test_cross_entropy_matches_reference(case, with_aux):
    c = make_case(case)
    a = numpy_inputs(c)
    aux = c["zt"] if with_aux else None  # any second score map will do as the aux head's output
    expected = ref_ce(a["zs"], a["labels"]) + (0.4 * ref_ce(a["zt"], a["labels"]) if with_aux else 0.0)
    close(SegmentationCrossEntropy()(c["zs"], c["labels"], aux), expected)


# --------------------------------------------------------------------------------------------------------------
# The adversarial loss: D's architecture is not a formula, so the reference calls the same D and writes the
# objective out by hand. D's state is restored before the reference call: every training-mode call runs a
# spectral-norm power iteration and updates BatchNorm statistics, so the reference makes the same calls in
# the same order (D(z_T), D(z_S), then D(x̂)).
# --------------------------------------------------------------------------------------------------------------
def ref_scores(module, logits, images):
    x = logits
    if module.conditioning == "logits+image":
        resized = F.interpolate(images, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([logits, resized], dim=1)
    out = module.discriminator(x)
    return [out[b].mean() for b in range(out.shape[0])]


def ref_discriminator_loss(module, zt, zs, images, alpha, objective):
    n = zt.shape[0]
    real = [s.item() for s in ref_scores(module, zt.detach(), images)]
    fake = [s.item() for s in ref_scores(module, zs.detach(), images)]
    if objective == "hinge":
        return 0.1 * (sum(max(0.0, 1 - s) for s in real) / n + sum(max(0.0, 1 + s) for s in fake) / n)
    mixed = torch.stack([alpha[b] * zt[b] + (1 - alpha[b]) * zs[b] for b in range(n)]).requires_grad_(True)
    (grad,) = torch.autograd.grad(sum(ref_scores(module, mixed, images)), mixed)
    penalty = 0.0
    for b in range(n):
        norm = math.sqrt(sum(float(v) ** 2 for v in grad[b].flatten()))
        penalty += (norm - 1) ** 2 / n
    return 0.1 * (sum(fake) / n - sum(real) / n) + 0.1 * 10.0 * penalty


@pytest.mark.parametrize("objective", ["hinge", "wgan_gp"])
@pytest.mark.parametrize("conditioning", ["logits", "logits+image"])
@pytest.mark.parametrize("size", [(8, 8), (5, 7)])
def test_adversarial_matches_reference(objective, conditioning, size):
    torch.manual_seed(0)
    n, k = 2, 4
    zs = torch.randn(n, k, *size, dtype=torch.float64)
    zt = torch.randn(n, k, *size, dtype=torch.float64)
    images = torch.rand(n, 3, 4 * size[0], 4 * size[1], dtype=torch.float64)
    alpha = torch.tensor([0.3, 0.8], dtype=torch.float64)
    module = AdversarialDistillation(k, conditioning=conditioning, objective=objective).double()
    with torch.no_grad():  # non-zero attention gains, so the reference also covers the attention blocks
        for block in module.modules():
            if hasattr(block, "gain"):
                block.gain.fill_(0.5)
    state = copy.deepcopy(module.state_dict())

    actual = module.discriminator_loss(zt, zs, images, alpha=alpha)
    module.load_state_dict(state)
    close(actual, ref_discriminator_loss(module, zt, zs, images, alpha, objective))

    module.load_state_dict(state)
    actual = module(zs, images)
    module.load_state_dict(state)
    close(actual, -sum(s.item() for s in ref_scores(module, zs, images)) / n)
