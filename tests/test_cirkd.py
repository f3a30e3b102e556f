"""CIRKD (`kdray.losses.cirkd`, `.cirkd_batch`, `.cirkd_memory`) against float64 loop references written here:
the mini-batch pixel-to-pixel relations, the memory contrast (queues, pointers, slots and picks given, over
several calls, on one process and on two gloo ranks), the generator's state in the state dict, the whole loss
as the objective builds it, and its contract and config."""

from __future__ import annotations

import copy
import io
import math
import random
import socket
import struct

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.config import job_from_dict
from kdray.errors import ConfigError, PreflightError
from kdray.losses.cirkd import CIRKD
from kdray.losses.cirkd_batch import minibatch_pixel_relations
from kdray.losses.cirkd_memory import MemoryContrast
from kdray.losses.registry import LossContext, loss_spec
from kdray.testing import check_loss

IGNORE = 255


# ----------------------------------------------------------------------------------------------------------------
# the reference: plain Python over nested lists, nothing shared with the module
# ----------------------------------------------------------------------------------------------------------------
def _normalize(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / max(norm, 1e-12) for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _log_softmax(values: list[float]) -> list[float]:
    top = max(values)
    lse = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - lse for v in values]


def _kl_of_logits(teacher: list[float], student: list[float]) -> float:
    """KL(softmax(teacher) ‖ softmax(student))."""
    lt, ls = _log_softmax(teacher), _log_softmax(student)
    return sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))


def _f32(v: list[float]) -> list[float]:
    """The values as a float32 buffer stores them."""
    return [struct.unpack("f", struct.pack("f", x))[0] for x in v]


def _pooled(f: list, n: int, pool: int) -> list[list[float]]:
    """Image n of f [N][C][h][w]: the channel vectors of the pool×pool windows (stride pool, ceil mode, each the
    mean of its in-bounds positions), in raster order."""
    c, h, w = len(f[n]), len(f[n][0]), len(f[n][0][0])
    out = []
    for i0 in range(0, h, pool):
        for j0 in range(0, w, pool):
            cells = [(i, j) for i in range(i0, min(i0 + pool, h)) for j in range(j0, min(j0 + pool, w))]
            out.append([sum(f[n][ch][i][j] for i, j in cells) / len(cells) for ch in range(c)])
    return out


def batch_reference(fs: torch.Tensor, ft: torch.Tensor, tau: float = 0.1, pool: int = 1) -> float:
    """L = (1/N²) Σ_ab (1/M) Σ_p KL(softmax(S_T,ab[p,:]/τ) ‖ softmax(S_S,ab[p,:]/τ)), S_X,ab = E_X,a E_X,bᵀ."""
    s, t = fs.double().tolist(), ft.double().tolist()
    n_img = len(s)
    es = [[_normalize(v) for v in _pooled(s, n, pool)] for n in range(n_img)]
    et = [[_normalize(v) for v in _pooled(t, n, pool)] for n in range(n_img)]
    total = 0.0
    for a in range(n_img):
        for b in range(n_img):
            m = len(es[a])
            pair = 0.0
            for p in range(m):
                row_s = [_dot(es[a][p], es[b][q]) / tau for q in range(m)]
                row_t = [_dot(et[a][p], et[b][q]) / tau for q in range(m)]
                pair += _kl_of_logits(row_t, row_s)
            total += pair / m
    return total / n_img ** 2


class Head:
    """The projection head H (1×1 conv, BatchNorm, ReLU, 1×1 conv) from the module's parameter values."""

    def __init__(self, projection: torch.nn.Sequential, training: bool):
        conv0, bn, conv3 = projection[0], projection[1], projection[3]
        self.w0 = conv0.weight.detach().double()[:, :, 0, 0].tolist()
        self.w3 = conv3.weight.detach().double()[:, :, 0, 0].tolist()
        self.gamma, self.beta = bn.weight.detach().double().tolist(), bn.bias.detach().double().tolist()
        self.mean, self.var = bn.running_mean.double().tolist(), bn.running_var.double().tolist()
        self.eps, self.training = bn.eps, training

    def __call__(self, fs: torch.Tensor) -> list:
        """[N][h][w] -> the C_T vector of H(f_S) at each position."""
        s = fs.double().tolist()
        n_img, c_s, h, w = len(s), len(s[0]), len(s[0][0]), len(s[0][0][0])
        c_t = len(self.w0)
        x = [[[[sum(self.w0[o][c] * s[n][c][i][j] for c in range(c_s)) for o in range(c_t)] for j in range(w)]
              for i in range(h)] for n in range(n_img)]
        if self.training:  # the batch's statistics over all N·h·w positions, biased variance
            count = n_img * h * w
            mean = [sum(x[n][i][j][o] for n in range(n_img) for i in range(h) for j in range(w)) / count
                    for o in range(c_t)]
            var = [sum((x[n][i][j][o] - mean[o]) ** 2 for n in range(n_img) for i in range(h) for j in range(w))
                   / count for o in range(c_t)]
        else:
            mean, var = self.mean, self.var
        out = []
        for n in range(n_img):
            rows = []
            for i in range(h):
                row = []
                for j in range(w):
                    y = [max(0.0, (x[n][i][j][o] - mean[o]) / math.sqrt(var[o] + self.eps) * self.gamma[o]
                             + self.beta[o]) for o in range(c_t)]
                    row.append([sum(self.w3[o][c] * y[c] for c in range(c_t)) for o in range(c_t)])
                rows.append(row)
            out.append(rows)
        return out


class Picker:
    """Scripted draws: k distinct indices in [0, n) from a seeded Python RNG, every call logged."""

    def __init__(self, seed: int):
        self.rng, self.calls = random.Random(seed), []

    def __call__(self, n, k, purpose) -> list[int]:
        self.calls.append((int(n), int(k), purpose))
        return self.rng.sample(range(int(n)), int(k))

    def as_draw(self):
        return lambda n, k, purpose: torch.tensor(self(n, k, purpose), dtype=torch.long)


class MemoryReference:
    """The memory contrast's state and its two losses, step by step as the spec orders them."""

    def __init__(self, memory: MemoryContrast, picker: Picker, *, pixels_per_class: int = 16,
                 pixel_contrast_size: int, region_contrast_size: int, tau: float = 0.1, kd_temperature: float = 1.0,
                 mode: str = "class", ignore: int = IGNORE, store=_f32):
        self.pq = memory.pixel_queue.double().tolist()  # [K][Lp][C_T]
        self.rq = memory.region_queue.double().tolist()  # [K][Lr][C_T]
        self.pp, self.rp = memory.pixel_ptr.tolist(), memory.region_ptr.tolist()
        self.k, self.lp, self.lr = len(self.pq), len(self.pq[0]), len(self.rq[0])
        self.pick, self.per_class, self.mode, self.ignore, self.store = picker, pixels_per_class, mode, ignore, store
        self.p = pixel_contrast_size // self.k + 1
        self.r = region_contrast_size // self.k + 1
        self.tau, self.tc = tau, kd_temperature

    def enqueue(self, ft: torch.Tensor, labels: torch.Tensor) -> None:
        """Every image of the (gathered) batch in order; in each, the present classes ascending."""
        t, y = ft.double().tolist(), labels.tolist()
        for n in range(len(t)):
            c, h, w = len(t[n]), len(t[n][0]), len(t[n][0][0])
            flat = [(i, j) for i in range(h) for j in range(w)]
            v = {(i, j): _normalize([t[n][ch][i][j] for ch in range(c)]) for i, j in flat}
            for k in range(self.k):
                members = [(i, j) for i, j in flat if y[n][i][j] == k]
                if not members:
                    continue
                mean = [sum(v[p][ch] for p in members) / len(members) for ch in range(c)]
                self.rq[k][self.rp[k]] = self.store(_normalize(mean))
                self.rp[k] = (self.rp[k] + 1) % self.lr
                m = min(len(members), self.per_class)
                picks = self.pick(len(members), m, "enqueue")
                chosen = [members[q] for q in picks] if self.mode == "class" else [flat[q] for q in picks]
                if self.pp[k] + m >= self.lp:
                    start, self.pp[k] = self.lp - m, 0
                else:
                    start, self.pp[k] = self.pp[k], self.pp[k] + m
                for r, position in enumerate(chosen):
                    self.pq[k][start + r] = self.store(v[position])

    def draw_slots(self) -> tuple[list[int], list[int]]:
        return self.pick(self.lp, self.p, "pixel"), self.pick(self.lr, self.r, "region")

    def losses(self, slots: tuple[list[int], list[int]], projected: list, ft: torch.Tensor,
               labels: torch.Tensor) -> tuple[float, float]:
        """(L_p, L_r) over every valid pixel of this batch; `projected` is H(f_S) from `Head`."""
        t, y = ft.double().tolist(), labels.tolist()
        keys_p = [self.pq[k][j] for k in range(self.k) for j in slots[0]]
        keys_r = [self.rq[k][j] for k in range(self.k) for j in slots[1]]
        scale = self.tau * self.tc
        total_p = total_r = 0.0
        anchors = 0
        for n in range(len(t)):
            c, h, w = len(t[n]), len(t[n][0]), len(t[n][0][0])
            for i in range(h):
                for j in range(w):
                    if y[n][i][j] == self.ignore:
                        continue
                    u = _normalize(projected[n][i][j])
                    v = _normalize([t[n][ch][i][j] for ch in range(c)])
                    for keys, is_pixel in ((keys_p, True), (keys_r, False)):
                        kl = _kl_of_logits([_dot(v, x) / scale for x in keys], [_dot(u, x) / scale for x in keys])
                        if is_pixel:
                            total_p += kl
                        else:
                            total_r += kl
                    anchors += 1
        if anchors == 0:
            return 0.0, 0.0
        return self.tc ** 2 * total_p / anchors, self.tc ** 2 * total_r / anchors


# ----------------------------------------------------------------------------------------------------------------
# inputs and helpers
# ----------------------------------------------------------------------------------------------------------------
K, C_S, C_T, H, W = 5, 3, 4, 5, 7  # non-square, odd, C_S ≠ C_T
LP, LR, PIXEL_CONTRAST, REGION_CONTRAST = 24, 5, 22, 9  # P = 22 // 5 + 1 = 5, R = 9 // 5 + 1 = 2


def _features(n: int, c: int, h: int = H, w: int = W, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).to(dtype)


def _memory_labels(n: int, h: int = H, w: int = W, seed: int = 0) -> torch.Tensor:
    """Class 0 on most pixels (n_0 > 16 in every image), class 2 on some, a few ignored; in image 0 class 1 on
    exactly one pixel and class 3 on exactly five; class 4 (of K = 5) absent."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, h, w, generator=g)
    labels = torch.zeros(n, h, w, dtype=torch.long)
    labels[r < 0.15] = 2
    labels[r < 0.06] = IGNORE
    spots = torch.randperm(h * w, generator=g)[:6]
    first = labels[0].view(-1)
    first[spots[0]] = 1
    first[spots[1:]] = 3
    return labels


def _check_labels(labels: torch.Tensor) -> None:
    """The scenario the memory tests rely on."""
    for n in range(labels.shape[0]):
        assert int((labels[n] == 0).sum()) > 16
    assert int((labels[0] == 1).sum()) == 1 and int((labels[0] == 3).sum()) == 5
    assert not bool((labels == 4).any()) and bool((labels == IGNORE).any()) and bool((labels == 2).any())


def _unit_rows(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


def _memory(**options) -> MemoryContrast:
    sizes = {"pixel_memory_size": LP, "region_memory_size": LR, "pixel_contrast_size": PIXEL_CONTRAST,
             "region_contrast_size": REGION_CONTRAST}
    return MemoryContrast(K, C_S, C_T, **{**sizes, **options})


def _prepare(memory: MemoryContrast, seed: int = 0, pixel_ptr=(LP - 5, 3, LP - 2, LP - 5, 0),
             region_ptr=(LR - 1, 0, 3, LR - 1, 2)) -> None:
    """Known queues and pointers (pointers near the end: the first call wraps; class 3's five pixels end exactly
    at Lp), and a projection head with a non-trivial BatchNorm (its running statistics too)."""
    k, lp, c = memory.pixel_queue.shape
    lr = memory.region_queue.shape[1]
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        memory.pixel_queue.copy_(_unit_rows(k, lp, c, seed=seed + 1))
        memory.region_queue.copy_(_unit_rows(k, lr, c, seed=seed + 2))
        memory.pixel_ptr.copy_(torch.tensor(pixel_ptr[:k]))
        memory.region_ptr.copy_(torch.tensor(region_ptr[:k]))
        conv0, bn, conv3 = memory.projection[0], memory.projection[1], memory.projection[3]
        conv0.weight.copy_(torch.randn(conv0.weight.shape, generator=g))
        conv3.weight.copy_(torch.randn(conv3.weight.shape, generator=g))
        bn.weight.copy_(0.5 + torch.rand(bn.weight.shape, generator=g))
        bn.bias.copy_(0.3 * torch.randn(bn.bias.shape, generator=g))
        bn.running_mean.copy_(0.3 * torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(bn.running_var.shape, generator=g))


def _assert_state(memory: MemoryContrast, ref: MemoryReference, atol: float) -> None:
    torch.testing.assert_close(memory.pixel_queue.double(), torch.tensor(ref.pq, dtype=torch.float64),
                               rtol=0, atol=atol)
    torch.testing.assert_close(memory.region_queue.double(), torch.tensor(ref.rq, dtype=torch.float64),
                               rtol=0, atol=atol)
    assert memory.pixel_ptr.tolist() == ref.pp
    assert memory.region_ptr.tolist() == ref.rp


def _identity_head(memory: MemoryContrast) -> None:
    """H = identity up to a positive scale on non-negative inputs: both convs identity, BN in eval mode with
    running statistics 0/1, γ = 1, β = 0."""
    conv0, bn, conv3 = memory.projection[0], memory.projection[1], memory.projection[3]
    with torch.no_grad():
        eye = torch.eye(conv0.weight.shape[0])[:, :, None, None]
        conv0.weight.copy_(eye)
        conv3.weight.copy_(eye)
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
    memory.eval()


# ----------------------------------------------------------------------------------------------------------------
# mini-batch pixel-to-pixel relations
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("pool", [1, 2, 3])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_minibatch_equals_the_loop_reference(n, pool, tau):
    """Every ordered pair (a, b), a = b included, of an odd non-square map, C_S ≠ C_T, with and without the
    ceil-mode average pool (partial windows at the right and bottom edges; each window's scale is normalised
    away, so which positions it holds is what counts)."""
    fs, ft = _features(n, C_S, seed=1, dtype=torch.float64), _features(n, C_T, seed=2, dtype=torch.float64)
    expected = batch_reference(fs, ft, tau, pool)
    assert minibatch_pixel_relations(fs, ft, temperature=tau, pool=pool).item() == pytest.approx(expected, rel=1e-6)
    value = minibatch_pixel_relations(fs.float(), ft.float(), temperature=tau, pool=pool)
    assert value.dtype == torch.float32 and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_minibatch_default_temperature_and_no_pool():
    fs, ft = _features(2, C_S, seed=3, dtype=torch.float64), _features(2, C_T, seed=4, dtype=torch.float64)
    assert minibatch_pixel_relations(fs, ft).item() == pytest.approx(batch_reference(fs, ft, 0.1, 1), rel=1e-6)


def test_minibatch_is_zero_when_the_student_equals_the_teacher():
    """Equal features give equal similarity matrices; a positive scale is normalised away."""
    f = _features(2, C_T, seed=5, dtype=torch.float64)
    for pool in (1, 2):
        assert abs(minibatch_pixel_relations(f, f.clone(), pool=pool).item()) < 1e-12
        assert abs(minibatch_pixel_relations(3.0 * f, f, pool=pool).item()) < 1e-9
        assert abs(minibatch_pixel_relations(f.float(), f.float(), pool=pool).item()) < 1e-6
    assert minibatch_pixel_relations(_features(2, C_T, seed=6), f.float()).item() > 1e-3


def test_minibatch_empty_batch_is_exactly_zero_with_a_graph():
    fs = torch.randn(0, C_S, H, W, requires_grad=True)
    value = minibatch_pixel_relations(fs, torch.randn(0, C_T, H, W))
    assert value.dtype == torch.float32 and value.dim() == 0 and value.item() == 0.0 and value.requires_grad
    value.backward()
    assert fs.grad is None or bool(fs.grad.eq(0).all())


def test_minibatch_gradients_reach_the_student_never_the_teacher():
    fs = _features(2, C_S, seed=7).requires_grad_()
    ft = _features(2, C_T, seed=8).requires_grad_()
    minibatch_pixel_relations(fs, ft, pool=2).backward()
    assert ft.grad is None
    assert fs.grad is not None and bool(fs.grad.isfinite().all()) and bool(fs.grad.ne(0).any())


def test_minibatch_gradcheck_in_float64():
    fs = _features(2, 3, h=3, w=4, seed=9, dtype=torch.float64).requires_grad_()
    ft = _features(2, 5, h=3, w=4, seed=10, dtype=torch.float64)
    for pool in (1, 2):
        assert torch.autograd.gradcheck(lambda s, pool=pool: minibatch_pixel_relations(s, ft, pool=pool), (fs,))


def test_minibatch_bfloat16_under_autocast_is_float32():
    fs, ft = _features(2, C_S, seed=11, dtype=torch.bfloat16), _features(2, C_T, seed=12, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = minibatch_pixel_relations(fs, ft)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(batch_reference(fs, ft), rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# memory contrast: queues, pointers and losses, slots and picks given
# ----------------------------------------------------------------------------------------------------------------
def _run_sequence(n: int, mode: str, tau: float, tc: float, training: bool, dtype=torch.float32,
                  pixels_per_class: int = 16) -> None:
    """Four calls on one module and on the reference: three batches (new labels each time), then all-ignore
    labels; after each, the losses, both queues, both pointers and the log of draws agree."""
    memory = _memory(temperature=tau, kd_temperature=tc, enqueue_mode=mode, pixels_per_class=pixels_per_class)
    _prepare(memory, seed=n)
    memory.train(training)
    if dtype == torch.float64:
        memory.double()
    mine, theirs = Picker(42), Picker(42)
    memory.draw = mine.as_draw()
    store = _f32 if dtype == torch.float32 else (lambda v: v)
    ref = MemoryReference(memory, theirs, pixels_per_class=pixels_per_class, pixel_contrast_size=PIXEL_CONTRAST,
                          region_contrast_size=REGION_CONTRAST, tau=tau, kd_temperature=tc, mode=mode, store=store)
    rel, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-6, 1e-12)
    for call in range(4):
        fs = _features(n, C_S, seed=10 * call + 1, dtype=dtype)
        ft = _features(n, C_T, seed=10 * call + 2, dtype=dtype)
        labels = _memory_labels(n, seed=10 * call + 3)
        if call == 3:
            labels.fill_(IGNORE)
        else:
            _check_labels(labels)
        projected = Head(memory.projection, training)(fs)  # the head's values before the call
        lp, lr = memory(fs, ft, labels)
        ref.enqueue(ft, labels)
        expected = ref.losses(ref.draw_slots(), projected, ft, labels)
        assert mine.calls == theirs.calls, f"call {call}: the draws differ"
        _assert_state(memory, ref, atol)
        if call == 3:
            assert lp.item() == 0.0 and lr.item() == 0.0
        else:
            assert lp.item() == pytest.approx(expected[0], rel=rel), f"call {call}: L_p"
            assert lr.item() == pytest.approx(expected[1], rel=rel), f"call {call}: L_r"
        assert lp.dim() == 0 and lr.dim() == 0


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("mode", ["class", "cirkd_code"])
@pytest.mark.parametrize("tau, tc, training", [(0.1, 1.0, True), (0.2, 2.0, False)])
def test_memory_equals_the_loop_reference_over_calls(n, mode, tau, tc, training):
    """Queues, pointers (a wrap of the pixel queue, ptr + m = Lp exactly among them, and of the region queue),
    picks (the k-pixels at the drawn positions for `class`, the flat positions for `cirkd_code`), a class absent,
    one with one pixel, n_k > 16, and L_p, L_r over every valid pixel; BatchNorm with batch statistics (train)
    and running statistics (eval)."""
    _run_sequence(n, mode, tau, tc, training)


@pytest.mark.parametrize("mode", ["class", "cirkd_code"])
def test_memory_in_float64_equals_the_reference_to_1e_6(mode):
    """The module cast to float64 (queues too): the same arithmetic without float32 rounding."""
    _run_sequence(2, mode, 0.1, 1.0, True, dtype=torch.float64)


def test_memory_with_fewer_picks_per_class():
    """m = min(n_k, pixels_per_class) with pixels_per_class = 3: class 3's five pixels give three picks."""
    _run_sequence(2, "class", 0.1, 1.0, False, pixels_per_class=3)


def test_memory_draw_order_and_sizes():
    """Per call: draw(n_k, min(n_k, 16), enqueue) per image and present class ascending, then
    draw(Lp, ⌊pixel_contrast_size/K⌋ + 1, pixel), then draw(Lr, ⌊region_contrast_size/K⌋ + 1, region)."""
    memory = _memory()
    picker = Picker(0)
    memory.draw = picker.as_draw()
    labels = torch.full((2, H, W), IGNORE)
    labels[0, 0, :5] = 3
    labels[0, 1:4, :] = 1  # 21 pixels
    labels[1, 4, 6] = 0
    memory(_features(2, C_S, seed=1), _features(2, C_T, seed=2), labels)
    assert picker.calls == [(21, 16, "enqueue"), (5, 5, "enqueue"), (1, 1, "enqueue"),
                            (LP, 5, "pixel"), (LR, 2, "region")]
    assert memory.pixel_ptr.tolist() == [1, 16, 0, 5, 0] and memory.region_ptr.tolist() == [1, 1, 0, 1, 0]


def test_pointer_wraps_written_out():
    """One image, the draws `k−1, …, 0` (the first m positions, reversed): class 0 (one pixel, ptr Lp−2) goes to
    slot Lp−2 and ptr Lp−1; class 1 (21 pixels, ptr Lp−3, m = 16) to slots Lp−16 … Lp−1 and ptr 0; class 3 (five
    pixels, ptr Lp−5: ptr + m = Lp exactly) to slots Lp−5 … Lp−1 and ptr 0; region slots at the pointers, the
    region pointer of class 0 wrapping from Lr−1 to 0. No other row changes."""
    memory = _memory()
    _prepare(memory, pixel_ptr=(LP - 2, LP - 3, 0, LP - 5, 0), region_ptr=(LR - 1, 1, 0, 0, 0))
    memory.draw = lambda n, k, purpose: torch.arange(k).flip(0)
    pixel_before, region_before = memory.pixel_queue.clone(), memory.region_queue.clone()
    labels = torch.full((1, H, W), IGNORE)
    labels[0, 0, :5] = 3
    labels[0, 1:4, :] = 1
    labels[0, 4, 6] = 0
    ft = _features(1, C_T, seed=17)
    memory(_features(1, C_S, seed=18), ft, labels)
    assert memory.pixel_ptr.tolist() == [LP - 1, 0, 0, 0, 0]
    assert memory.region_ptr.tolist() == [0, 2, 0, 1, 0]

    def v(i, j):
        x = ft[0, :, i, j].double()
        return x / x.norm()

    expected = pixel_before.double().clone()
    expected[0, LP - 2] = v(4, 6)
    ones = [(i, j) for i in range(1, 4) for j in range(W)]
    for r in range(16):  # slot Lp−16+r gets the (15−r)-th k-pixel
        expected[1, LP - 16 + r] = v(*ones[15 - r])
    for r in range(5):
        expected[3, LP - 5 + r] = v(0, 4 - r)
    torch.testing.assert_close(memory.pixel_queue.double(), expected, rtol=0, atol=1e-6)
    expected = region_before.double().clone()
    for k, slot, cells in ((0, LR - 1, [(4, 6)]), (1, 1, ones), (3, 0, [(0, j) for j in range(5)])):
        mean = sum(v(*c) for c in cells) / len(cells)
        expected[k, slot] = mean / mean.norm()
    torch.testing.assert_close(memory.region_queue.double(), expected, rtol=0, atol=1e-6)


def test_cirkd_code_picks_are_flat_positions_in_the_image():
    """`cirkd_code`: class 1's picks 0…15 are the image's first 16 positions in raster order, whatever their
    class (here row 0, class 3, and the start of row 1); class 3's picks 0…4 the first five."""
    memory = _memory(enqueue_mode="cirkd_code")
    _prepare(memory, pixel_ptr=(0, 0, 0, 0, 0))
    memory.draw = lambda n, k, purpose: torch.arange(k)
    labels = torch.full((1, H, W), IGNORE)
    labels[0, 0, :5] = 3
    labels[0, 1:4, :] = 1
    ft = _features(1, C_T, seed=19)
    memory(_features(1, C_S, seed=20), ft, labels)
    flat = ft[0].double().flatten(1).T  # (h·w, C_T), raster order
    unit = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(memory.pixel_queue[1, :16].double(), unit[:16], rtol=0, atol=1e-6)
    torch.testing.assert_close(memory.pixel_queue[3, :5].double(), unit[:5], rtol=0, atol=1e-6)
    assert memory.pixel_ptr.tolist() == [0, 16, 0, 5, 0]


def test_all_ignore_gives_zero_not_nan_with_a_graph_and_enqueues_nothing():
    """No valid anchor: (0, 0) exactly, connected to the graph; nothing enqueued, pointers unchanged; the pixel
    and region draws still happen."""
    memory = _memory()
    _prepare(memory)
    before = {k: v.clone() for k, v in memory.state_dict().items() if isinstance(v, torch.Tensor)}
    picker = Picker(1)
    memory.draw = picker.as_draw()
    fs = _features(2, C_S, seed=3).requires_grad_()
    lp, lr = memory(fs, _features(2, C_T, seed=4), torch.full((2, H, W), IGNORE))
    for value in (lp, lr):
        assert value.dim() == 0 and value.dtype == torch.float32 and value.item() == 0.0 and value.requires_grad
    (lp + lr).backward()
    assert fs.grad is None or bool(fs.grad.eq(0).all())
    for name in ("pixel_queue", "region_queue", "pixel_ptr", "region_ptr"):
        assert torch.equal(getattr(memory, name), before[name]), name
    assert picker.calls == [(LP, 5, "pixel"), (LR, 2, "region")]


def test_empty_batch_gives_exactly_zero():
    memory = _memory()
    memory.draw = Picker(2).as_draw()
    fs = torch.randn(0, C_S, H, W, requires_grad=True)
    lp, lr = memory(fs, torch.randn(0, C_T, H, W), torch.zeros(0, H, W, dtype=torch.long))
    assert lp.item() == 0.0 and lr.item() == 0.0 and lp.requires_grad and lr.requires_grad
    (lp + lr).backward()


def test_the_ignore_index_is_an_option():
    memory = _memory(ignore_index=7)
    _prepare(memory)
    memory.eval()
    mine, theirs = Picker(3), Picker(3)
    memory.draw = mine.as_draw()
    ref = MemoryReference(memory, theirs, pixel_contrast_size=PIXEL_CONTRAST, region_contrast_size=REGION_CONTRAST,
                          ignore=7)
    fs, ft, labels = _features(2, C_S, seed=5), _features(2, C_T, seed=6), _memory_labels(2, seed=7)
    labels[labels == IGNORE] = 7
    projected = Head(memory.projection, False)(fs)
    lp, lr = memory(fs, ft, labels)
    ref.enqueue(ft, labels)
    expected = ref.losses(ref.draw_slots(), projected, ft, labels)
    _assert_state(memory, ref, 1e-6)
    assert (lp.item(), lr.item()) == pytest.approx(expected, rel=1e-5)


def test_memory_terms_are_zero_when_h_is_identity_and_the_student_equals_the_teacher():
    """C_S = C_T, both convs identity, BN identity (eval, statistics 0/1): u_i = v_i, so both KLs vanish."""
    memory = MemoryContrast(K, C_T, C_T, pixel_memory_size=LP, region_memory_size=LR,
                            pixel_contrast_size=PIXEL_CONTRAST, region_contrast_size=REGION_CONTRAST)
    _identity_head(memory)
    f = _features(2, C_T, seed=8).abs() + 0.05  # non-negative: the ReLU keeps it
    for call in range(3):
        lp, lr = memory(f, f.clone(), _memory_labels(2, seed=9 + call))
        assert abs(lp.item()) < 1e-6 and abs(lr.item()) < 1e-6
    # and not zero with a student that differs
    lp, lr = memory(_features(2, C_T, seed=12).abs(), f, _memory_labels(2, seed=13))
    assert lp.item() > 1e-4 and lr.item() > 1e-4


def test_gradients_reach_the_student_and_the_head_never_the_teacher_nor_the_queues():
    memory = _memory()
    _prepare(memory)
    fs = _features(2, C_S, seed=14).requires_grad_()
    ft = _features(2, C_T, seed=15).requires_grad_()
    lp, lr = memory(fs, ft, _memory_labels(2, seed=16))
    (lp + lr).backward()
    assert ft.grad is None
    assert fs.grad is not None and bool(fs.grad.isfinite().all()) and bool(fs.grad.ne(0).any())
    params = dict(memory.named_parameters())
    assert set(params) == {"projection.0.weight", "projection.1.weight", "projection.1.bias", "projection.3.weight"}
    for name, p in params.items():
        assert p.grad is not None and bool(p.grad.isfinite().all()) and bool(p.grad.ne(0).any()), name
    for name in ("pixel_queue", "region_queue"):
        queue = getattr(memory, name)
        assert not queue.requires_grad and queue.grad is None and queue.grad_fn is None, name
    for which in range(2):  # each term alone reaches the student too
        fs.grad = None
        memory(fs, ft, _memory_labels(2, seed=16))[which].backward()
        assert fs.grad is not None and bool(fs.grad.ne(0).any()), f"term {which}"


# ----------------------------------------------------------------------------------------------------------------
# memory contrast: initial state, the default draw, the generator in the state dict
# ----------------------------------------------------------------------------------------------------------------
def test_initial_buffers():
    """float32 queues of unit rows, int64 pointers at 0, all in the state dict; the same seed, the same rows."""
    memory = _memory(seed=3)
    assert memory.pixel_queue.shape == (K, LP, C_T) and memory.region_queue.shape == (K, LR, C_T)
    assert memory.pixel_queue.dtype == memory.region_queue.dtype == torch.float32
    for queue in (memory.pixel_queue, memory.region_queue):
        torch.testing.assert_close(queue.norm(dim=-1), torch.ones(queue.shape[:2]))
    for ptr in (memory.pixel_ptr, memory.region_ptr):
        assert ptr.dtype == torch.int64 and ptr.tolist() == [0] * K
    state = memory.state_dict()
    assert {"pixel_queue", "region_queue", "pixel_ptr", "region_ptr"} <= set(state)
    twin, other = _memory(seed=3), _memory(seed=4)
    assert torch.equal(twin.pixel_queue, memory.pixel_queue) and torch.equal(twin.region_queue, memory.region_queue)
    assert not torch.equal(other.pixel_queue, memory.pixel_queue)


def test_the_default_draw_is_a_randperm_prefix_of_the_generator():
    memory = _memory(seed=5)
    for n, k, purpose in ((50, 7, "enqueue"), (LP, 5, "pixel"), (LR, 2, "region"), (1, 1, "enqueue")):
        twin = torch.Generator()
        twin.set_state(memory.generator.get_state())
        picks = memory.draw(n, k, purpose)
        assert picks.dtype == torch.int64 and picks.shape == (k,)
        assert torch.equal(picks, torch.randperm(n, generator=twin)[:k])
        assert len(set(picks.tolist())) == k and all(0 <= i < n for i in picks.tolist())


def _draws(memory: MemoryContrast, count: int = 4) -> list[list[int]]:
    return [memory.draw(40, 6, "pixel").tolist() for _ in range(count)]


def test_same_seed_same_draws_and_the_state_round_trips():
    """Two modules with one seed draw alike; a state saved mid-way (through a file) and loaded into a module of
    another seed continues the same draws, queues, pointers and losses."""
    a, b = _memory(seed=11), _memory(seed=11)
    assert _draws(a) == _draws(b)
    assert _draws(_memory(seed=12)) != _draws(_memory(seed=11))
    # mid-way through forward calls with the default draw
    fs, ft, labels = _features(2, C_S, seed=1), _features(2, C_T, seed=2), _memory_labels(2, seed=3)
    a(fs, ft, labels)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    c = _memory(seed=99)
    c.load_state_dict(torch.load(buffer, weights_only=True))
    fs2, ft2, labels2 = _features(2, C_S, seed=4), _features(2, C_T, seed=5), _memory_labels(2, seed=6)
    first, second = a(fs2, ft2, labels2), c(fs2, ft2, labels2)
    assert [x.item() for x in first] == [x.item() for x in second]
    for name in ("pixel_queue", "region_queue", "pixel_ptr", "region_ptr"):
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    assert _draws(a) == _draws(c)
    # a deep copy of the state dict (as the pre-flight check keeps it) restores the draws too
    saved = copy.deepcopy(a.state_dict())
    expected = _draws(a)
    a.load_state_dict(saved)
    assert _draws(a) == expected


def test_bad_options_are_refused():
    """A bad mode, and a contrast drawing more distinct slots per class than a queue holds."""
    with pytest.raises(ConfigError):
        _memory(enqueue_mode="x")
    with pytest.raises(ConfigError):
        _memory(pixel_memory_size=4)  # P = 5
    with pytest.raises(ConfigError):
        _memory(region_memory_size=1)  # R = 2


# ----------------------------------------------------------------------------------------------------------------
# memory contrast on two gloo ranks
# ----------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, port, batches, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        memory = _memory()
        _prepare(memory)
        memory.eval()  # BatchNorm from running statistics: H is the same function on both ranks
        picker = Picker(7)
        memory.draw = picker.as_draw()
        calls = []
        for fs, ft, labels in batches[rank]:
            lp, lr = memory(fs, ft, labels)
            calls.append({"losses": [lp.item(), lr.item()], "pixel_queue": memory.pixel_queue.tolist(),
                          "region_queue": memory.region_queue.tolist(), "pixel_ptr": memory.pixel_ptr.tolist(),
                          "region_ptr": memory.region_ptr.tolist()})
        results[rank] = {"calls": calls, "draws": picker.calls}
    finally:
        dist.destroy_process_group()


CALLS = 4


def test_two_gloo_ranks_enqueue_in_rank_order_and_keep_equal_queues():
    """Each rank feeds its own batch; both enqueue rank 0's images then rank 1's (the reference fed the
    concatenation), their queues and pointers stay identical, and each rank's losses use its own anchors (one
    call with a smaller batch on rank 1, one with rank 1 all ignored)."""
    batches = {rank: [(_features(2, C_S, seed=100 * rank + 10 * call + 1),
                       _features(2, C_T, seed=100 * rank + 10 * call + 2),
                       _memory_labels(2, seed=100 * rank + 10 * call + 3)) for call in range(CALLS)]
               for rank in (0, 1)}
    fs, ft, labels = batches[1][2]
    batches[1][2] = fs[:1], ft[:1], labels[:1]  # the ranks' batch sizes may differ
    batches[1][3][2].fill_(IGNORE)  # rank 1 without anchors: its losses vanish, rank 0's images still enqueue
    results = mp.Manager().dict()
    mp.spawn(_rank_worker, args=(_free_port(), batches, results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert r0["draws"] == r1["draws"]

    memory = _memory()
    _prepare(memory)
    head = Head(memory.projection, training=False)
    picker = Picker(7)
    ref = MemoryReference(memory, picker, pixel_contrast_size=PIXEL_CONTRAST, region_contrast_size=REGION_CONTRAST)
    for call in range(CALLS):
        gathered = [batches[rank][call] for rank in (0, 1)]
        ref.enqueue(torch.cat([b[1] for b in gathered]), torch.cat([b[2] for b in gathered]))
        slots = ref.draw_slots()
        for rank, out in ((0, r0), (1, r1)):
            fs, ft, labels = gathered[rank]
            state = out["calls"][call]
            expected = ref.losses(slots, head(fs), ft, labels)
            if rank == 1 and call == 3:
                assert state["losses"] == [0.0, 0.0]
            assert state["losses"] == pytest.approx(list(expected), rel=1e-5), f"rank {rank}, call {call}"
            torch.testing.assert_close(torch.tensor(state["pixel_queue"], dtype=torch.float64),
                                       torch.tensor(ref.pq, dtype=torch.float64), rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.tensor(state["region_queue"], dtype=torch.float64),
                                       torch.tensor(ref.rq, dtype=torch.float64), rtol=0, atol=1e-6)
            assert state["pixel_ptr"] == ref.pp and state["region_ptr"] == ref.rp
        same = r0["calls"][call], r1["calls"][call]
        for key in ("pixel_queue", "region_queue", "pixel_ptr", "region_ptr"):
            assert same[0][key] == same[1][key], f"{key} differs between the ranks after call {call}"
        assert same[0]["losses"] != same[1]["losses"]
    assert picker.calls == r0["draws"]


# ----------------------------------------------------------------------------------------------------------------
# the whole loss, the contract and the config
# ----------------------------------------------------------------------------------------------------------------
SMALL = {"pixel_memory_size": 64, "region_memory_size": 8, "pixel_contrast_size": 32, "region_contrast_size": 8}


def _section(**options):
    overrides = ["losses.cirkd.enabled=true"] + [f"losses.cirkd.{k}={v}" for k, v in options.items()]
    return job_from_dict({}, overrides).losses.cirkd


def test_cirkd_is_the_weighted_sum_of_its_terms():
    """weight_batch·batch + weight_pixel·L_p + weight_region·L_r, the options reaching both parts (pool,
    temperatures, sizes, picks per class, enqueue mode, the context's ignore value and channels)."""
    options = {"weight_batch": 0.7, "weight_pixel": 0.3, "weight_region": 0.2, "pool": 2, "batch_temperature": 0.2,
               "pixel_memory_size": LP, "region_memory_size": LR, "pixel_contrast_size": PIXEL_CONTRAST,
               "region_contrast_size": REGION_CONTRAST, "pixels_per_class": 3, "contrast_temperature": 0.15,
               "contrast_kd_temperature": 1.5, "enqueue_mode": "cirkd_code"}
    module = loss_spec("cirkd").make(_section(**options), LossContext(K, 7, {"head": C_S}, {"head": C_T}, seed=3))
    assert isinstance(module, CIRKD) and isinstance(module.memory, MemoryContrast)
    memory = module.memory
    _prepare(memory)
    memory.eval()
    mine, theirs = Picker(8), Picker(8)
    memory.draw = mine.as_draw()
    ref = MemoryReference(memory, theirs, pixels_per_class=3, pixel_contrast_size=PIXEL_CONTRAST,
                          region_contrast_size=REGION_CONTRAST, tau=0.15, kd_temperature=1.5, mode="cirkd_code",
                          ignore=7)
    head = Head(memory.projection, training=False)
    for call in range(3):
        fs, ft = _features(2, C_S, seed=call + 20), _features(2, C_T, seed=call + 30)
        labels = _memory_labels(2, seed=call + 40)
        labels[labels == IGNORE] = 7
        if call == 2:
            labels.fill_(7)  # all ignored: the memory terms vanish, the mini-batch term (all pixels) stays
        value = module(fs, ft, labels)
        ref.enqueue(ft, labels)
        lp, lr = ref.losses(ref.draw_slots(), head(fs), ft, labels)
        expected = 0.7 * batch_reference(fs, ft, 0.2, 2) + 0.3 * lp + 0.2 * lr
        assert value.dtype == torch.float32 and value.dim() == 0
        assert value.item() == pytest.approx(expected, rel=1e-5), f"call {call}"
        assert mine.calls == theirs.calls
        _assert_state(memory, ref, 1e-6)


def test_cirkd_without_memory_terms_has_no_memory_and_no_parameters():
    module = loss_spec("cirkd").make(_section(weight_pixel=0, weight_region=0),
                                     LossContext(K, IGNORE, {"head": C_S}, {"head": C_T}))
    assert module.memory is None and not list(module.parameters())
    fs, ft = _features(2, C_S, seed=50, dtype=torch.float64), _features(2, C_T, seed=51, dtype=torch.float64)
    value = module(fs, ft, _memory_labels(2, seed=52))
    assert value.item() == pytest.approx(batch_reference(fs, ft), rel=1e-6)


def test_the_run_seed_seeds_the_memory():
    make = loss_spec("cirkd").make
    config = _section(**SMALL)
    a, b, c = (make(config, LossContext(K, IGNORE, {"head": C_S}, {"head": C_T}, seed=s)) for s in (1, 1, 2))
    assert torch.equal(a.memory.pixel_queue, b.memory.pixel_queue)
    assert _draws(a.memory) == _draws(b.memory)
    assert not torch.equal(a.memory.pixel_queue, c.memory.pixel_queue)


def test_cirkd_keeps_the_loss_contract():
    check_loss("cirkd", **SMALL)
    check_loss("cirkd", **SMALL, pool=2, enqueue_mode="cirkd_code", pixels_per_class=3)
    check_loss("cirkd", weight_pixel=0.0, weight_region=0.0)
    check_loss("cirkd")


@pytest.mark.parametrize("override", ["losses.cirkd.pool=0", "losses.cirkd.enqueue_mode=x",
                                      "losses.cirkd.weight_pixel=-1", "losses.cirkd.weight_region=-0.5",
                                      "losses.cirkd.weight_batch=-1", "losses.cirkd.batch_temperature=0",
                                      "losses.cirkd.contrast_temperature=0", "losses.cirkd.contrast_kd_temperature=0",
                                      "losses.cirkd.pixels_per_class=0", "losses.cirkd.gamma=1"])
def test_bad_options_are_refused_in_one_line(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        job_from_dict({}, [override])
    message = str(err.value)
    assert "\n" not in message and "losses.cirkd." in message and key.rsplit(".", 1)[1] in message


def test_a_loss_that_can_only_be_zero_is_refused():
    """All three weights 0 (the loss would be 0 for nothing), in the job; and a pool leaving one position of the
    maps (the mini-batch relations of one position are 0), at the pre-flight on the maps' size."""
    with pytest.raises(ConfigError, match=r"losses.cirkd: weight_batch, weight_pixel and weight_region are all 0"):
        job_from_dict({}, ["losses.cirkd.enabled=true", "losses.cirkd.weight_batch=0", "losses.cirkd.weight_pixel=0",
                           "losses.cirkd.weight_region=0"])
    job_from_dict({}, ["losses.cirkd.weight_batch=0", "losses.cirkd.weight_pixel=0", "losses.cirkd.weight_region=0"])
    module = loss_spec("cirkd").make(_section(pool=8, weight_pixel=0.0, weight_region=0.0),
                                     LossContext(5, IGNORE, {"head": 3}, {"head": 4}))
    fs, ft = torch.rand(2, 3, 8, 7), torch.rand(2, 4, 8, 7)
    with pytest.raises(PreflightError, match=r"pool=8 leaves one position of the \(8, 7\) feature maps"):
        module(fs, ft, torch.zeros(2, 8, 7, dtype=torch.long))
    assert module.pool == 8 and torch.isfinite(loss_spec("cirkd").make(
        _section(pool=4, weight_pixel=0.0, weight_region=0.0), LossContext(5, IGNORE, {"head": 3}, {"head": 4}))(
        fs, ft, torch.zeros(2, 8, 7, dtype=torch.long)))  # 2×2 positions: a real term


def test_queues_beyond_half_the_memory_are_refused_before_allocating():
    """The size is checked from the options before any queue is made, naming both sizes and the arithmetic."""
    with pytest.raises(ConfigError, match=r"losses.cirkd: the queues would take [0-9.]+ GiB \(\(pixel_memory_size="):
        loss_spec("cirkd").make(_section(pixel_memory_size=10**12), LossContext(19, IGNORE, {"head": 128},
                                                                                 {"head": 256}))


def test_the_queue_errors_name_the_job_section():
    with pytest.raises(ConfigError, match=r"^losses.cirkd: pixel_contrast_size=4096 draws 820 slots per class"):
        loss_spec("cirkd").make(_section(pixel_memory_size=100), LossContext(5, IGNORE, {"head": 3}, {"head": 4}))


def test_the_defaults():
    section = _section()
    assert (section.weight, section.weight_batch, section.weight_pixel, section.weight_region,
            section.batch_temperature, section.pool) == (1.0, 1.0, 0.1, 0.1, 0.1, 1)
    assert (section.pixel_memory_size, section.region_memory_size, section.pixel_contrast_size,
            section.region_contrast_size, section.pixels_per_class) == (20000, 2000, 4096, 1024, 16)
    assert (section.contrast_temperature, section.contrast_kd_temperature, section.enqueue_mode) == (
        0.1, 1.0, "class")


def test_the_memory_keeps_the_objective_off_cuda_graphs():
    """The enqueue loops, draws and all-gathers on the host: a run with the memory terms on replays no loss as a
    CUDA graph; the mini-batch relations alone may be replayed."""
    from kdray.config import job_from_dict
    from kdray.losses.objective import DistillationObjective

    def objective(*overrides):
        job = job_from_dict({"data": {"num_classes": 5}}, ["losses.cirkd.enabled=true", *overrides])
        return DistillationObjective(job.losses, num_classes=5, student_channels=4, teacher_channels=6)

    assert not objective().graphable()
    assert objective("losses.cirkd.weight_pixel=0", "losses.cirkd.weight_region=0").graphable()
    assert objective("losses.cirkd.enabled=false", "losses.kd.enabled=true").graphable()
