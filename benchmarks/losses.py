"""Cost of each distillation loss: forward+backward time and peak memory, next to a naive loop version of the
same loss and next to the student network's own forward+backward.

    python benchmarks/losses.py                      # CPU, paper and demo shapes
    python benchmarks/losses.py --device cuda
    python benchmarks/losses.py --shapes demo --no-student --repeats 10
    python benchmarks/losses.py --shapes paper --no-student --only ACE IFVD
    python benchmarks/losses.py --quick                # a tiny shape, seconds: a smoke test of the script

Shapes (what is measured):
- paper: N=2, teacher C=256, student C=128, K=19, maps 64×128 (output stride 8 of a 512×1024 crop), labels
  512×1024; student = deeplabv3_resnet18 (width 1) forward+backward on a 2×3×512×1024 batch.
- demo: N=8, C_T=64, C_S=32, K=8, maps 16×16, labels 128×128; student = deeplabv3_resnet18 at width 0.25
  (32 feature channels) on 8×3×128×128.
- tiny (only with --quick or --shapes tiny): N=2, C_T=16, C_S=8, K=5, maps 9×13, labels 72×104.
Each loss gets the labels the training objective gives it: CE and the feature losses (IFVD, I2CKD) the full
label map, ACE the labels already resized to the score maps (y↓, which the objective makes once per step for
every score-map loss; the resize reads one int64 per 64-byte line of the full map, 0.1–0.7 ms at the papers'
shape on this CPU, cold or warm).

The loop versions are written here as the naive implementation a researcher writes without vectorising:
explicit Python loops over every axis the formula indexes, with only the per-pixel / per-element work of one
iteration as a tensor op:
- KD, ACE: loop over images and classes (softmax normaliser, teacher argmax and the sum over k class by class);
- CWD: loop over images and channels (one spatial softmax and KL per (n, c));
- IFVD: loop over images and classes (a masked mean per (n, k) for the prototypes, then the cosine map);
- I2CKD: adapter on the whole map, loop over classes for the prototypes, double loop over the (k, j) pairs;
- SKD pair-wise, CSC: loop over images and over the rows of each affinity matrix (one node, or one channel,
  at a time: its similarities to all the others).
CE (torch's own), the discriminator and the baselines of current tables (FitNet, AT, DIST, DKD, CIRKD: their
float64 loop references live in their tests) have none. The "floor" row times one log-softmax of the student's
score map, forward and backward: a yardstick for the score-map losses (KD, CWD, ACE), each of which normalises
two such maps, the student's and the teacher's, and writes the student's gradient. Each loop version is
checked against the kdray module's value before it is timed; one whose first forward+backward shows that
the warm-up and repeats would exceed --loop-budget seconds is timed once (marked in the table). A loss and
its loop version are timed in alternation (sample of one, sample of the other), so that a drift of the
machine's speed hits both alike.

On CUDA each loss is timed a second time replayed as two CUDA graphs, forward and backward (what the engine
does with `run.cuda_graphs=true`; `--no-graphs` skips it): eager, a GPU loss is bound by dispatching its
hundred-odd operators from Python; replayed, by its kernels.

Two extra pair-wise rows show what computing it through C×C Gram matrices buys (see
`spatial_affinity_distance`): the same loss forced through the M×M affinities, and the loss unpooled (patch 1,
M = h·w: 2·8192² affinities, 512 MB per matrix in the M×M form at the paper's shape).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from kdray.losses import (  # noqa: E402
    I2CKD,
    AdaptiveCrossEntropy,
    AdversarialDistillation,
    ChannelSpatialCorrelation,
    ChannelWiseDistillation,
    IntraClassFeatureVariation,
    PairwiseAffinity,
    PixelwiseKD,
    SegmentationCrossEntropy,
    downsample_labels,
)
from kdray.losses.attention import AttentionTransfer  # noqa: E402
from kdray.losses.cirkd_batch import minibatch_pixel_relations  # noqa: E402
from kdray.losses.cirkd_memory import MemoryContrast  # noqa: E402
from kdray.losses.dist import DIST  # noqa: E402
from kdray.losses.dkd import DecoupledKD  # noqa: E402
from kdray.losses.fitnet import FitNetHint  # noqa: E402
from kdray.losses.pairwise import pool_nodes, spatial_affinity_distance  # noqa: E402

IGNORE = 255


@dataclass(frozen=True)
class Shape:
    n: int
    c_t: int
    c_s: int
    k: int
    h: int
    w: int
    height: int
    width: int
    student_width: float

    def describe(self) -> str:
        return (
            f"N={self.n}, C_T={self.c_t}, C_S={self.c_s}, K={self.k}, maps {self.h}×{self.w}, "
            f"labels {self.height}×{self.width}; student deeplabv3_resnet18 (width {self.student_width}) "
            f"fwd+bwd on {self.n}×3×{self.height}×{self.width}"
        )


SHAPES = {
    "paper": Shape(n=2, c_t=256, c_s=128, k=19, h=64, w=128, height=512, width=1024, student_width=1.0),
    "demo": Shape(n=8, c_t=64, c_s=32, k=8, h=16, w=16, height=128, width=128, student_width=0.25),
    # Not run by default: --quick (or --shapes tiny), non-square maps with a partial pooling window.
    "tiny": Shape(n=2, c_t=16, c_s=8, k=5, h=9, w=13, height=72, width=104, student_width=0.25),
}
DEFAULT_SHAPES = ["paper", "demo"]


# --------------------------------------------------------------------------------------------------------------
# Naive loop versions: Python loops over every axis the formula indexes (images, classes, channels, nodes,
# class pairs); only the per-pixel / per-element work inside one iteration is a tensor op.
# --------------------------------------------------------------------------------------------------------------
def _class_log_softmax(z, temperature):
    """log softmax over the class axis of one image's (K, h, w) logits, as a list of K per-class (h, w) maps.

    The normaliser `log Σ_k exp(z_k/T)` is accumulated class by class (shifted by the running max, which is a
    constant for the result, so it is detached), the way the formula reads.
    """
    maps = [z[c] / temperature for c in range(z.shape[0])]
    top = maps[0]
    for m in maps[1:]:
        top = torch.maximum(top, m)
    top = top.detach()
    total = torch.zeros_like(top)
    for m in maps:
        total = total + (m - top).exp()
    log_norm = top + total.log()
    return [m - log_norm for m in maps]


def kd_loop(zs, zt, labels, temperature=1.0):
    """Loop over images n and classes k: `T²/(N·h·w) Σ_n Σ_k Σ_i p_T[k] (log p_T[k] − log p_S[k])`."""
    n, k, h, w = zs.shape
    total = zs.new_zeros(())
    for b in range(n):
        log_s = _class_log_softmax(zs[b], temperature)
        log_t = _class_log_softmax(zt[b].detach(), temperature)
        for c in range(k):
            total = total + (log_t[c].exp() * (log_t[c] - log_s[c])).sum()
    return total / (n * h * w) * temperature**2


def cwd_loop(zs, zt, labels, temperature=4.0):
    """Loop over images n and channels c: one softmax over the h·w positions and one KL per (n, c)."""
    n, k = zs.shape[:2]
    total = zs.new_zeros(())
    for b in range(n):
        for c in range(k):
            log_s = F.log_softmax(zs[b, c].flatten() / temperature, dim=0)
            log_t = F.log_softmax(zt[b, c].detach().flatten() / temperature, dim=0)
            total = total + (log_t.exp() * (log_t - log_s)).sum()
    return total * temperature**2 / (n * k)


def ace_loop(zs, zt, labels, temperature=1.0):
    """Loop over images n and classes k: the teacher's argmax and both softmaxes class by class, then
    `−Σ_k q[k] log p_S[k]` as a sum of per-class maps, over the valid pixels."""
    n, k, h, w = zs.shape
    y = downsample_labels(labels, (h, w))
    total = zs.new_zeros(())
    for b in range(n):
        log_s = _class_log_softmax(zs[b], temperature)
        log_t = _class_log_softmax(zt[b].detach(), temperature)
        best, pred = zt[b, 0].detach(), torch.zeros_like(y[b])
        for c in range(1, k):
            better = zt[b, c] > best  # strict: ties keep the first class, as argmax does
            best = torch.where(better, zt[b, c].detach(), best)
            pred = pred.masked_fill(better, c)
        right = pred == y[b]  # never at ignored pixels (pred < K)
        for c in range(k):
            target = torch.where(right, log_t[c].exp(), (y[b] == c).to(zs.dtype))  # 0 at ignored pixels
            total = total - (target * log_s[c]).sum()
    return total / (y != IGNORE).sum().clamp_min(1)


def pairwise_loop(fs, ft, labels):
    """Loop over images, then over the M nodes: each node's cosine similarities to all nodes (one row of A)."""
    total, count = fs.new_zeros(()), 0
    for b in range(fs.shape[0]):
        unit_s = F.normalize(F.max_pool2d(fs[b], 2, 2, ceil_mode=True).flatten(1), dim=0)  # (C_S, M)
        unit_t = F.normalize(F.max_pool2d(ft[b].detach(), 2, 2, ceil_mode=True).flatten(1), dim=0)  # (C_T, M)
        for node_s, node_t in zip(unit_s.t(), unit_t.t(), strict=True):
            row = node_s @ unit_s - node_t @ unit_t  # A_S[a, :] − A_T[a, :]
            total = total + (row**2).sum()
            count += row.numel()
    return total / count


def ifvd_loop(num_classes):
    """Loop over images n and classes k: a masked mean per (n, k) gives the prototype, which is written into
    a per-pixel centre map; then the cosine map against it."""

    def loss(fs, ft, labels):
        n, _, h, w = fs.shape
        y = downsample_labels(labels, (h, w))
        total = fs.new_zeros(())
        for b in range(n):
            sims = []
            for f in (fs[b], ft[b].detach()):
                centre = f  # ignored pixels keep their own feature: cosine 1
                for c in range(num_classes):
                    mask = y[b] == c
                    if mask.any():
                        proto = f[:, mask].mean(dim=1)
                        centre = torch.where(mask, proto[:, None, None], centre)
                sims.append(F.cosine_similarity(f, centre, dim=0))
            total = total + ((sims[0] - sims[1]) ** 2).sum()
        return total / (n * h * w)

    return loss


def csc_loop(module):
    """Adapter on the whole map, then per image: a loop over the M positions (rows of A_sp) and a loop over
    the C_T channels (rows of A_ch)."""

    def loss(fs, ft, labels):
        sp_total, sp_count, ch_total, ch_count = fs.new_zeros(()), 0, fs.new_zeros(()), 0
        projected = module.adapter(fs)
        for b in range(fs.shape[0]):
            nodes_s = F.max_pool2d(projected[b], 2, 2, ceil_mode=True).flatten(1)  # (C_T, M)
            nodes_t = F.max_pool2d(ft[b].detach(), 2, 2, ceil_mode=True).flatten(1)
            sp_s, sp_t = F.normalize(nodes_s, dim=0), F.normalize(nodes_t, dim=0)
            for node_s, node_t in zip(sp_s.t(), sp_t.t(), strict=True):
                row = node_s @ sp_s - node_t @ sp_t
                sp_total, sp_count = sp_total + (row**2).sum(), sp_count + row.numel()
            ch_s, ch_t = F.normalize(nodes_s, dim=1), F.normalize(nodes_t, dim=1)
            for chan_s, chan_t in zip(ch_s, ch_t, strict=True):
                row = ch_s @ chan_s - ch_t @ chan_t
                ch_total, ch_count = ch_total + (row**2).sum(), ch_count + row.numel()
        return sp_total / sp_count + module.gamma * ch_total / ch_count

    return loss


def i2ckd_loop(module, num_classes, margin=0.5):
    """Adapter on the whole map; a loop over classes k for the prototypes (a masked mean over the batch per
    class); then a double loop over the ordered pairs (k, j≠k) for the triplet terms."""

    def loss(fs, ft, labels):
        projected = module.adapter(fs)
        y = downsample_labels(labels, fs.shape[-2:])
        p_s, p_t = [], []
        for c in range(num_classes):
            mask = y == c
            if mask.any():
                p_s.append(F.normalize(projected.permute(1, 0, 2, 3)[:, mask].mean(dim=1), dim=0))
                p_t.append(F.normalize(ft.detach().permute(1, 0, 2, 3)[:, mask].mean(dim=1), dim=0))
        terms = []
        for a in range(len(p_s)):
            for b in range(len(p_s)):
                if a != b:
                    pos = (p_t[a] - p_s[a]).norm()
                    neg = (p_t[a] - p_s[b]).norm()
                    terms.append(F.relu(pos - neg + margin))
        return torch.stack(terms).mean() if terms else projected.sum() * 0

    return loss


# --------------------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    return statistics.median(block_ms(step, device, 1) for _ in range(repeats))


def block_ms(step: Callable[[], None], device: torch.device, calls: int) -> float:
    """Milliseconds per call of `calls` back-to-back calls of `step`."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / calls * 1e3


def peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """Peak of the bytes allocated during one step, above what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    # On CPU: replay the profiler's allocation/free events ("[memory]", signed byte counts) in time order. The
    # first profiled step of a process can show a few extra MB (26 against 34 MB for pair-wise at the paper's
    # shape), so the smaller of two profiled steps is taken.
    return min(_profiled_peak_mb(step) for _ in range(2))


def _profiled_peak_mb(step: Callable[[], None]) -> float:
    activity = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


MEMORY_METHOD = {
    "cpu": "torch.profiler(profile_memory=True) allocation events, peak of live bytes within the step (min of 2)",
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() before the step",
}


@dataclass
class Row:
    loss: str
    shape: str
    ms: float
    loop_ms: float | None
    peak: float
    loop_runs: int = 0  # how many runs the loop time is the median of
    graphed_ms: float | None = None  # the same loss replayed as CUDA graphs (--device cuda)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = shape
    labels = torch.randint(0, s.k, (s.n, s.height, s.width), generator=g)
    labels[torch.rand(s.n, s.height, s.width, generator=g) < 0.1] = IGNORE
    tensors = {
        "zs": torch.randn(s.n, s.k, s.h, s.w, generator=g),
        "zt": torch.randn(s.n, s.k, s.h, s.w, generator=g),
        "fs": torch.randn(s.n, s.c_s, s.h, s.w, generator=g).relu(),
        "ft": torch.randn(s.n, s.c_t, s.h, s.w, generator=g).relu(),
        "labels": labels,
        # y↓: what the objective hands the score-map losses (`labels.at_logits`, resized once per step)
        "labels_small": downsample_labels(labels, (s.h, s.w)),
    }
    tensors = {key: value.to(device) for key, value in tensors.items()}
    tensors["zs"].requires_grad_(True)
    tensors["fs"].requires_grad_(True)
    return tensors


def loss_table(shape: Shape, device: torch.device):
    """[(name, call(x), loop version or None, the keys of x the loss reads, the module whose parameters it
    trains or None)]."""
    s = shape
    csc = ChannelSpatialCorrelation(s.c_s, s.c_t).to(device)
    i2ckd = I2CKD(s.c_s, s.c_t, s.k).to(device)
    adversarial = AdversarialDistillation(s.k).to(device)
    kd, cwd, ace = PixelwiseKD(), ChannelWiseDistillation(), AdaptiveCrossEntropy()
    pairwise, ifvd, ce = PairwiseAffinity(), IntraClassFeatureVariation(num_classes=s.k), SegmentationCrossEntropy()
    unpooled = PairwiseAffinity(patch=1)
    fitnet = FitNetHint(s.c_s, s.c_t).to(device)
    attention, dist, dkd = AttentionTransfer(), DIST(), DecoupledKD()
    memory = MemoryContrast(s.k, s.c_s, s.c_t).to(device)  # CIRKD's default queue sizes: 20000 and 2000 per class

    def memory_terms(x):
        pixel, region = memory(x["fs"], x["ft"], x["labels_small"])
        return 0.1 * pixel + 0.1 * region

    def affinity_form(fs, ft):
        return spatial_affinity_distance(pool_nodes(fs, 2), pool_nodes(ft.detach(), 2), via="affinity")

    # Each loss reads the labels the objective gives it: CE and the feature losses the full map, ACE y↓.
    logits = ("zs", "zt", "labels")
    features = ("fs", "ft", "labels")
    return [
        # Not a loss: one softmax normalisation of a score map, forward and backward, a yardstick for the
        # score-map losses, each of which normalises two maps (student and teacher) and writes a gradient.
        ("floor: one log-softmax fwd+bwd", lambda x: F.log_softmax(x["zs"], dim=1).mean(), None, logits, None),
        ("CE", lambda x: ce(x["zs"], x["labels"]), None, logits, None),
        ("KD", lambda x: kd(x["zs"], x["zt"]), kd_loop, logits, None),
        ("CWD (logits)", lambda x: cwd(x["zs"], x["zt"]), cwd_loop, logits, None),
        ("ACE", lambda x: ace(x["zs"], x["zt"], x["labels_small"]), ace_loop, ("zs", "zt", "labels_small"), None),
        ("SKD pair-wise", lambda x: pairwise(x["fs"], x["ft"]), pairwise_loop, features, None),
        # the same loss through the M×M affinities, the form `PairwiseAffinity` avoids when M is large
        ("SKD pair-wise, M×M form", lambda x: affinity_form(x["fs"], x["ft"]), None, features, None),
        ("SKD pair-wise, patch 1", lambda x: unpooled(x["fs"], x["ft"]), None, features, None),
        ("SKD holistic: student term", lambda x: adversarial(x["zs"]), None, logits, adversarial),
        (
            "SKD holistic: D step (hinge)",
            lambda x: adversarial.discriminator_loss(x["zt"], x["zs"]),
            None,
            logits,
            adversarial,
        ),
        ("IFVD", lambda x: ifvd(x["fs"], x["ft"], x["labels"]), ifvd_loop(s.k), features, None),
        ("CSC", lambda x: csc(x["fs"], x["ft"]), csc_loop(csc), features, csc),
        ("I2CKD", lambda x: i2ckd(x["fs"], x["ft"], x["labels"]), i2ckd_loop(i2ckd, s.k), features, i2ckd),
        # the baselines of current tables (head features; AT and FitNet on a backbone stage cost alike per map)
        ("FitNet (head)", lambda x: fitnet(x["fs"], x["ft"]), None, features, fitnet),
        ("AT (head)", lambda x: attention(student_0=x["fs"], teacher_0=x["ft"]), None, features, None),
        ("DIST", lambda x: dist(x["zs"], x["zt"]), None, logits, None),
        ("DKD", lambda x: dkd(x["zs"], x["zt"], x["labels_small"]), None, ("zs", "zt", "labels_small"), None),
        ("CIRKD mini-batch relations", lambda x: minibatch_pixel_relations(x["fs"], x["ft"]), None, features, None),
        # enqueue of the batch, the key draws, both contrast terms and the projection head (peak: queues included)
        ("CIRKD memory contrast", memory_terms, None, ("fs", "ft", "labels_small"), memory),
    ]


def clear_grads(x: dict, keys, owner: torch.nn.Module | None) -> None:
    """Drop the gradients one step leaves: its inputs' and its own module's (zeroing every module's would add
    ~60 µs of Python to each step, a fifth of KD's time at the demo shape)."""
    for key in keys:
        x[key].grad = None
    if owner is not None:
        owner.zero_grad(set_to_none=True)


def student_step(shape: Shape, device: torch.device):
    try:
        from kdray.models import build_model
    except ImportError as err:  # the models package is written separately; the table still prints
        print(f"(student skipped: kdray.models is not importable: {err})")
        return None
    model = build_model("deeplabv3_resnet18", shape.k, width=shape.student_width).to(device).train()
    images = torch.randn(shape.n, 3, shape.height, shape.width, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(images)
        loss = out.logits.mean() + (out.aux_logits.mean() if out.aux_logits is not None else 0)
        loss.backward()

    return step


class _Call(torch.nn.Module):
    """A loss's call as a module of its own inputs (the loss module's parameters included), for graph capture."""

    def __init__(self, fn, keys, owner):
        super().__init__()
        self.fn, self.keys, self.owner = fn, keys, owner

    def forward(self, *tensors):
        return self.fn(dict(zip(self.keys, tensors, strict=True)))


def graphed(fn, keys, owner, x):
    """`fn`'s forward and backward captured as CUDA graphs (`torch.cuda.make_graphed_callables`, as the engine
    does with `run.cuda_graphs`), callable like `fn` on the dict `x`."""
    call = torch.cuda.make_graphed_callables(_Call(fn, keys, owner), tuple(x[k] for k in keys),
                                             allow_unused_input=True)
    return lambda inputs: call(*(inputs[k] for k in keys))


def time_side_by_side(step, loop_step, device: torch.device, args) -> tuple[float, float | None, int]:
    """(ms, loop ms, loop runs): a loss and its loop version timed in alternation, so that both see the same
    machine (this one's speed drifts by tens of percent within minutes).

    Each sample of the loss is a block of back-to-back calls lasting about `args.block_ms` (sub-millisecond
    losses are otherwise at the mercy of the timer and of one interruption); each sample of the loop version
    is one call. Both figures are medians of `args.repeats` samples (the loop's: `args.loop_repeats`). A loop
    version whose first call shows that its warm-up and repeats would exceed `args.loop_budget` seconds is
    timed by that call alone (runs = 1).
    """
    first = block_ms(step, device, 1)
    calls = max(1, min(1000, round(args.block_ms / max(first, 1e-3))))
    for _ in range(args.warmup):
        step()
    loop_runs, over_budget = 0, False
    if loop_step is not None:
        first_loop = block_ms(loop_step, device, 1)
        over_budget = first_loop * (max(args.warmup - 1, 0) + args.loop_repeats) > args.loop_budget * 1e3
        loop_runs = 1 if over_budget else args.loop_repeats
        for _ in range(0 if over_budget else args.warmup - 1):
            loop_step()
    samples, loop_samples = [], [first_loop] if over_budget else []
    for i in range(max(args.repeats, loop_runs)):
        if i < args.repeats:
            samples.append(block_ms(step, device, calls))
        if not over_budget and i < loop_runs:
            loop_samples.append(block_ms(loop_step, device, 1))
    loop_ms = statistics.median(loop_samples) if loop_samples else None
    return statistics.median(samples), loop_ms, loop_runs


def _words(text: str) -> set[str]:
    """`"SKD pair-wise, M×M form"` -> {"skd", "pair", "wise", "m", "form"}: the words --only matches."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def run(args) -> list[tuple[Row, float | None]]:
    device = torch.device(args.device)
    results = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        student_ms = student_peak = None
        if args.student:
            step = student_step(shape, device)
            if step is not None:
                student_ms = median_ms(step, device, warmup=1, repeats=args.student_repeats)
                student_peak = peak_mb(step, device)
                del step
                print(f"[{shape_name}] student fwd+bwd {student_ms:.0f} ms", file=sys.stderr)
        x = make_inputs(shape, device)
        table = loss_table(shape, device)
        if student_ms is not None:
            results.append((Row("student fwd+bwd", shape_name, student_ms, None, student_peak), student_ms))
        for name, fn, loop, keys, owner in table:
            if args.only and not any(_words(query) <= _words(name) for query in args.only):
                continue

            def step(fn=fn, x=x, keys=keys, owner=owner):
                clear_grads(x, keys, owner)
                fn(x).backward()

            def loop_step(loop=loop, x=x, keys=keys, owner=owner):
                clear_grads(x, keys, owner)
                loop(*(x[k] for k in keys)).backward()

            if loop is not None:
                with torch.no_grad():
                    expected, got = fn(x).item(), loop(*(x[k] for k in keys)).item()
                if abs(expected - got) > 1e-4 * max(abs(expected), 1e-3):
                    raise SystemExit(f"{name} at {shape_name}: loop version gives {got}, module {expected}")
            ms, loop_ms, loop_runs = time_side_by_side(step, loop_step if loop else None, device, args)
            note = ""
            if loop_ms is not None:
                note = f", loop {loop_ms:.2f} ms ({loop_runs} run{'s' if loop_runs > 1 else ''})"
            graphed_ms = None
            if device.type == "cuda" and args.graphs:
                replay = graphed(fn, keys, owner, x)

                def graphed_step(replay=replay, x=x, keys=keys, owner=owner):
                    clear_grads(x, keys, owner)
                    replay(x).backward()

                graphed_ms, _, _ = time_side_by_side(graphed_step, None, device, args)
                note += f", graphed {graphed_ms:.2f} ms"
            row = Row(name, shape_name, ms, loop_ms, peak_mb(step, device), loop_runs, graphed_ms)
            results.append((row, student_ms))
            print(f"[{shape_name}] {name}: {ms:.2f} ms{note}", file=sys.stderr)
    return results


def render(results, args) -> str:
    lines = [
        f"# Distillation losses, forward+backward, device {args.device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)",
        f"# time per call: median of {args.repeats} samples after {args.warmup} warm-up calls, a sample being "
        f"~{args.block_ms:g} ms of back-to-back calls; loop versions: median of {args.loop_repeats} single calls "
        f"taken in alternation with the loss's samples (* = timed once, where that would take over "
        f"{args.loop_budget:g} s); student: median of {args.student_repeats} calls after 1",
        f"# peak memory: {MEMORY_METHOD['cuda' if args.device.startswith('cuda') else 'cpu']}",
    ]
    lines += [f"# {name}: {SHAPES[name].describe()}" for name in args.shapes]
    header = ("loss", "shape", "time ms", "% of student fwd+bwd", "loop time ms", "speed-up", "peak MB")
    with_graphs = any(row.graphed_ms is not None for row, _ in results)
    if with_graphs:
        header += ("graphed ms", "graphed % of student", "graphed speed-up")
    rows = [header]
    for row, student_ms in results:
        share = f"{100 * row.ms / student_ms:.2f}" if student_ms else "-"
        loop = "-"
        if row.loop_ms is not None:
            loop = f"{row.loop_ms:.2f}" + ("*" if row.loop_runs == 1 and args.loop_repeats > 1 else "")
        speedup = f"{row.loop_ms / row.ms:.1f}×" if row.loop_ms is not None else "-"
        cells = (row.loss, row.shape, f"{row.ms:.2f}", share, loop, speedup, f"{row.peak:.1f}")
        if with_graphs:
            g = row.graphed_ms
            cells += ("-", "-", "-") if g is None else (
                f"{g:.2f}", f"{100 * g / student_ms:.2f}" if student_ms else "-",
                f"{row.loop_ms / g:.1f}×" if row.loop_ms is not None else "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for i, r in enumerate(rows):
        cells = [c.ljust(wd) if j == 0 else c.rjust(wd) for j, (c, wd) in enumerate(zip(r, widths, strict=True))]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=DEFAULT_SHAPES)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timed samples of each loss (default 9)")
    parser.add_argument(
        "--block-ms", type=float, default=25.0, help="length of one timed sample of a loss, in ms (default 25)"
    )
    parser.add_argument("--loop-repeats", type=int, help="timed runs of each loop version (default: --repeats)")
    parser.add_argument(
        "--loop-budget",
        type=float,
        default=120.0,
        help="seconds a loop version's warm-up and repeats may take; over it, it is timed once (default 120)",
    )
    parser.add_argument("--student-repeats", type=int, default=3)
    parser.add_argument("--no-graphs", dest="graphs", action="store_false",
                        help="on CUDA, skip the losses replayed as CUDA graphs (the engine's run.cuda_graphs)")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME",
        help="time only the losses whose names hold every word of one of these (whole words: KD is not SKD)",
    )
    parser.add_argument("--no-student", dest="student", action="store_false", help="skip the student's timing")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: the tiny shape, 1 warm-up, 2 repeats, 1 student run"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.warmup, args.repeats, args.student_repeats = ["tiny"], 1, 2, 1
    if args.loop_repeats is None:
        args.loop_repeats = args.repeats
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    print(render(run(args), args))


if __name__ == "__main__":
    main()
