"""CIRKD's memory contrast: the student's pixels against queues of the teacher's pixels and class regions."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kdray.errors import ConfigError, PreflightError
from kdray.losses import _checks
from kdray.losses._precision import autocast_off
from kdray.losses.labels import check_labels_on_cpu

ENQUEUE_MODES = ("class", "cirkd_code")


class MemoryContrast(nn.Module):
    """CIRKD's memory-based pixel-to-pixel and pixel-to-region distillation, with the memory it keeps.

    State (buffers, so in every checkpoint): `pixel_queue` (K, Lp, C_T) and `region_queue` (K, Lr, C_T) of
    unit-norm teacher vectors, their write pointers `pixel_ptr` and `region_ptr` (K,) int64, and the generator
    of the draws (`get_extra_state`). The rows start as normalised Gaussian noise drawn from that generator,
    seeded by the run's seed: every rank of a run keeps identical queues.

    The projection head H (1×1 conv C_S→C_T without bias, BatchNorm, ReLU, 1×1 conv C_T→C_T without bias) is
    trained with the student. Its BatchNorm synchronises its statistics across GPU ranks (SyncBatchNorm, as
    CIRKD); on CPU ranks, where torch has no SyncBatchNorm, each rank normalises with its own statistics, as
    the student's BatchNorm does there.

    Each call, in this order:
    1. Enqueue (no gradient): the teacher's features and labels of every rank are all-gathered (rank order,
       then batch order). For each gathered image and each class k present in it (ascending, `ignore_index`
       skipped), with `v = normalize(f_T)` per pixel and n_k its k-pixels: `normalize(mean of v over them)` goes
       to region slot `region_ptr[k]`, which then advances modulo Lr; then m = min(n_k, `pixels_per_class`)
       picks `draw(n_k, m, "enqueue")` choose the pixels whose v are written: at slots Lp−m … Lp−1 (pointer back
       to 0) when `pixel_ptr[k] + m ≥ Lp`, else at ptr … ptr+m−1 (pointer + m). `enqueue_mode="class"`: the picks
       index the image's k-pixels in raster order (the paper's intent); `"cirkd_code"`: they are flat positions
       in the whole image, as CIRKD's public code uses them (the features of random positions among the first
       n_k, whatever their class), for a bit-faithful reproduction only.
    2. `draw(Lp, P, "pixel")` and `draw(Lr, R, "region")` choose P = ⌊`pixel_contrast_size`/K⌋ + 1 and
       R = ⌊`region_contrast_size`/K⌋ + 1 slots, the same for every class; the keys are
       `X_p = [pixel_queue[k, j] for k in 0..K−1 for j in slots]` (K·P × C_T), likewise X_r (K·R × C_T).
    3. Over the A valid pixels i of this rank's batch (every one an anchor), `u_i = normalize(H(f_S)_i)`,
       `v_i = normalize(f_T,i)`:

           L_p = T_c² · (1/A) Σ_i KL(softmax(v_i X_pᵀ / (τ·T_c)) ‖ softmax(u_i X_pᵀ / (τ·T_c)))

       and L_r likewise with X_r; τ = `temperature` (0.1), T_c = `kd_temperature` (1). Keys and teacher carry
       no gradient. No valid anchor: both exactly 0, connected to the student's features and H.

    Shapes: student_features (N, C_S, h, w), teacher_features (N, C_T, h, w), labels (N, h, w) int64 at the
    features' size. Returns (L_p, L_r), unweighted scalars in the module's dtype (float32 unless converted).
    ConfigError at construction when the contrast draws more slots than a queue has.

    Paper: C. Yang et al., "Cross-Image Relational Knowledge Distillation for Semantic Segmentation", CVPR 2022,
    arXiv:2204.06986 (code: winycg/CIRKD, `losses/cirkd_memory.py`, `train_cirkd.py` for the defaults).
    """

    def __init__(self, num_classes: int, student_channels: int, teacher_channels: int, *,
                 pixel_memory_size: int = 20000, region_memory_size: int = 2000,
                 pixel_contrast_size: int = 4096, region_contrast_size: int = 1024, pixels_per_class: int = 16,
                 temperature: float = 0.1, kd_temperature: float = 1.0, enqueue_mode: str = "class",
                 ignore_index: int = 255, seed: int = 0, owner: str = "MemoryContrast") -> None:
        super().__init__()
        k = self.num_classes = _checks.positive_int(owner, "num_classes", num_classes)
        c_s = _checks.positive_int(owner, "student_channels", student_channels)
        c_t = _checks.positive_int(owner, "teacher_channels", teacher_channels)
        lp = _checks.positive_int(owner, "pixel_memory_size", pixel_memory_size)
        lr = _checks.positive_int(owner, "region_memory_size", region_memory_size)
        self.pixels_per_class = _checks.positive_int(owner, "pixels_per_class", pixels_per_class)
        self.pixel_keys = _checks.positive_int(owner, "pixel_contrast_size", pixel_contrast_size) // k + 1
        self.region_keys = _checks.positive_int(owner, "region_contrast_size", region_contrast_size) // k + 1
        self.temperature = _checks.number(owner, "temperature", temperature, positive=True)
        self.kd_temperature = _checks.number(owner, "kd_temperature", kd_temperature, positive=True)
        self.enqueue_mode = _checks.choice(owner, "enqueue_mode", enqueue_mode, ENQUEUE_MODES)
        self.ignore_index = _checks.integer(owner, "ignore_index", ignore_index)
        for kind, keys, size, contrast in (("pixel", self.pixel_keys, lp, pixel_contrast_size),
                                           ("region", self.region_keys, lr, region_contrast_size)):
            if keys > size:
                raise ConfigError(f"{owner}: {kind}_contrast_size={contrast} draws {keys} slots per class "
                                  f"({kind}_contrast_size // K + 1, K = {k}), more than {kind}_memory_size={size} "
                                  f"holds; raise {kind}_memory_size or lower {kind}_contrast_size")
        if self.pixels_per_class > lp:
            raise ConfigError(f"{owner}: pixels_per_class={pixels_per_class} exceeds pixel_memory_size={lp}")
        _check_queue_memory(owner, (lp + lr) * k * c_t * 4, lp, lr, k, c_t)

        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("pixel_queue", _unit_rows(torch.randn(k, lp, c_t, generator=self.generator)))
        self.register_buffer("region_queue", _unit_rows(torch.randn(k, lr, c_t, generator=self.generator)))
        self.register_buffer("pixel_ptr", torch.zeros(k, dtype=torch.long))
        self.register_buffer("region_ptr", torch.zeros(k, dtype=torch.long))
        self.projection = nn.Sequential(
            nn.Conv2d(c_s, c_t, 1, bias=False), RankBatchNorm2d(c_t), nn.ReLU(), nn.Conv2d(c_t, c_t, 1, bias=False))

    def draw(self, n: int, k: int, purpose: str) -> Tensor:
        """k distinct indices in [0, n) (a CPU LongTensor) from the module's generator; `purpose` is one of
        enqueue, pixel, region (the calls come in a fixed order, so that a test may replace this method)."""
        return torch.randperm(n, generator=self.generator)[:k]

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def forward(self, student_features: Tensor, teacher_features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        owner = type(self).__name__
        _checks.same_grid(owner, "student_features", student_features, "teacher_features", teacher_features)
        _checks.label_map(owner, labels, "student_features", student_features)
        if labels.shape[-2:] != student_features.shape[-2:]:
            raise PreflightError(f"{owner}: labels {tuple(labels.shape)} must have the features' h×w "
                             f"{tuple(student_features.shape[-2:])} (labels at the score map's size)")
        c_t = self.pixel_queue.shape[2]
        if (student_features.shape[1], teacher_features.shape[1]) != (self.projection[0].in_channels, c_t):
            raise PreflightError(f"{owner}: student_features {tuple(student_features.shape)} and teacher_features "
                             f"{tuple(teacher_features.shape)} must have {self.projection[0].in_channels} and {c_t} "
                             "channels")
        check_labels_on_cpu(labels, self.num_classes, self.ignore_index)
        work = self.pixel_queue.dtype
        with autocast_off(student_features.device.type):
            teacher = F.normalize(teacher_features.detach().to(work), dim=1)
            self._enqueue(_gathered(teacher), _gathered(labels))
            pixel_slots = self.draw(self.pixel_queue.shape[1], self.pixel_keys, "pixel").to(teacher.device)
            region_slots = self.draw(self.region_queue.shape[1], self.region_keys, "region").to(teacher.device)
            if student_features.shape[0] == 0:
                zero = _checks.empty_batch(student_features, *self.projection.parameters()).to(work)
                return zero, zero
            projected = self.projection(student_features.to(work))
            valid = (labels != self.ignore_index).flatten()
            if not bool(valid.any()):
                zero = projected.sum() * 0.0
                return zero, zero
            student = F.normalize(_per_pixel(projected)[valid], dim=1)  # (A, C_T)
            teacher = _per_pixel(teacher)[valid]
            pixel_keys = self.pixel_queue[:, pixel_slots].reshape(-1, c_t)
            region_keys = self.region_queue[:, region_slots].reshape(-1, c_t)
            return self._contrast(student, teacher, pixel_keys), self._contrast(student, teacher, region_keys)

    def _contrast(self, student: Tensor, teacher: Tensor, keys: Tensor) -> Tensor:
        """T_c² · mean over anchors of KL(softmax(v·Xᵀ/(τT_c)) ‖ softmax(u·Xᵀ/(τT_c)))."""
        scale = 1.0 / (self.temperature * self.kd_temperature)
        log_q = F.log_softmax(student @ keys.T * scale, dim=1)
        log_p = F.log_softmax(teacher @ keys.T * scale, dim=1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
        return kl.mean() * self.kd_temperature ** 2

    @torch.no_grad()
    def _enqueue(self, teacher: Tensor, labels: Tensor) -> None:
        """Step 1 of the class docstring on all ranks' normalised teacher features (G, C_T, h, w) and labels.

        The bookkeeping (classes, counts, picks, slots) runs on the host over a copy of the labels; the writes are
        two indexed copies whose destinations are distinct (a slot written twice in one call, possible only with
        queues shorter than a step's writes, keeps the later value, as writing in order would).
        """
        if teacher.shape[0] == 0:
            return
        g, c_t = teacher.shape[0], teacher.shape[1]
        k_count = self.num_classes
        vectors = _per_pixel(teacher)  # (G·h·w, C_T)
        flat_labels = labels.reshape(g, -1)
        host_labels = flat_labels.cpu()
        hw = host_labels.shape[1]
        lp, lr = self.pixel_queue.shape[1], self.region_queue.shape[1]
        pixel_ptr, region_ptr = self.pixel_ptr.tolist(), self.region_ptr.tolist()
        pixel_writes: dict[tuple[int, int], int] = {}  # (class, slot) -> row of `vectors`
        region_writes: dict[tuple[int, int], tuple[int, int]] = {}  # (class, slot) -> (image, class)
        for image in range(g):
            row = host_labels[image]
            for k in torch.unique(row).tolist():
                if k == self.ignore_index:
                    continue
                positions = (row == k).nonzero().squeeze(1)  # the k-pixels in raster order
                n_k = positions.numel()
                region_writes[(k, region_ptr[k])] = (image, k)
                region_ptr[k] = (region_ptr[k] + 1) % lr
                m = min(n_k, self.pixels_per_class)
                picks = self.draw(n_k, m, "enqueue")
                flat = positions[picks] if self.enqueue_mode == "class" else picks
                if pixel_ptr[k] + m >= lp:
                    slots, pixel_ptr[k] = range(lp - m, lp), 0
                else:
                    slots, pixel_ptr[k] = range(pixel_ptr[k], pixel_ptr[k] + m), pixel_ptr[k] + m
                for slot, position in zip(slots, flat.tolist(), strict=True):
                    pixel_writes[(k, slot)] = image * hw + position
        device = teacher.device
        if region_writes:
            one_hot = F.one_hot(torch.where(flat_labels == self.ignore_index, k_count, flat_labels),
                                k_count + 1)[..., :k_count].to(teacher.dtype)  # (G, h·w, K)
            means = F.normalize(one_hot.transpose(1, 2) @ teacher.reshape(g, c_t, -1).transpose(1, 2), dim=2)
            classes, slots = _index(region_writes.keys(), device)
            images, sources = _index(region_writes.values(), device)
            self.region_queue[classes, slots] = means[images, sources].to(self.region_queue.dtype)
        if pixel_writes:
            classes, slots = _index(pixel_writes.keys(), device)
            rows = torch.tensor(list(pixel_writes.values()), dtype=torch.long, device=device)
            self.pixel_queue[classes, slots] = vectors[rows].to(self.pixel_queue.dtype)
        self.pixel_ptr.copy_(torch.tensor(pixel_ptr))
        self.region_ptr.copy_(torch.tensor(region_ptr))


class RankBatchNorm2d(nn.SyncBatchNorm):
    """BatchNorm2d whose statistics span the ranks of a GPU run (SyncBatchNorm), and each CPU rank's own batch
    where torch offers no SyncBatchNorm (gloo); plain BatchNorm2d in one process."""

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (torch's name)
        if input.dim() != 4:
            raise ValueError(f"RankBatchNorm2d: expected a 4-d input (N, C, h, w), got {tuple(input.shape)}")
        if input.device.type == "cpu":
            return super(nn.SyncBatchNorm, self).forward(input)  # _BatchNorm's: local statistics
        return super().forward(input)


def _unit_rows(x: Tensor) -> Tensor:
    """`F.normalize(x, dim=-1)` in place (the same values): a queue is not allocated twice."""
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-12))


def _check_queue_memory(owner: str, size: int, lp: int, lr: int, k: int, c_t: int) -> None:
    """ConfigError, before anything is allocated, when the queues would take more than half this machine's memory
    (they are built in host memory first, then moved to the device)."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): nothing to compare with
        return
    if size > total // 2:
        gib = 2 ** 30
        raise ConfigError(f"{owner}: the queues would take {size / gib:.1f} GiB ((pixel_memory_size={lp} + "
                          f"region_memory_size={lr}) x K={k} x C_T={c_t} x 4 bytes), more than half of this "
                          f"machine's {total / gib:.1f} GiB; lower pixel_memory_size or region_memory_size "
                          "(CIRKD: 20000 and 2000)")


def _per_pixel(maps: Tensor) -> Tensor:
    """(N, C, h, w) -> (N·h·w, C), rows in batch-then-raster order."""
    return maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1])


def _index(pairs, device: torch.device) -> tuple[Tensor, Tensor]:
    """[(a, b), ...] -> (LongTensor of the a's, LongTensor of the b's) on `device`."""
    both = torch.tensor(list(pairs), dtype=torch.long).reshape(-1, 2)
    return both[:, 0].to(device), both[:, 1].to(device)


def _gathered(tensor: Tensor) -> Tensor:
    """`tensor` of every rank concatenated along dim 0 in rank order (itself in one process); the ranks' batch
    sizes may differ."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])
