"""Scoring a set of weights under the job's evaluation protocols: single scale (`val/miou`, what runs select on) and
the job's scales and flips (`data.eval_scales`, `data.eval_flip`: `kdray.engine.multiscale`).

- `load_for_evaluation`: the job's student (or teacher) built for the weights a file holds and loaded strictly: a
  weights file (kdray's `best_<role>.pt`, a public CIRKD file), a run checkpoint file, or a run checkpoint
  directory (`<output_dir>/checkpoint`). What `python -m kdray.evaluate` scores.
- `score_model`: one evaluation per protocol over the job's val split, with its wall time.
- `score_best_weights`: at the end of a complete run, its best weights scored once under the job's multi-scale
  protocol (every rank; confusion matrices summed over the ranks), as metrics named by `kdray.contract`
  (`val/miou_ms_flip`, `val/iou_ms_flip/<class>`, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from kdray import contract
from kdray.config import Job
from kdray.config.schema import DataConfig
from kdray.contract import arch_label
from kdray.data import build_dataset, class_names
from kdray.engine.checkpoint import FILENAME, load_checkpoint
from kdray.engine.distributed import RankContext
from kdray.engine.evaluate import evaluate, evaluation_loader
from kdray.engine.multiscale import is_single_scale
from kdray.engine.sliding import window_of
from kdray.errors import CheckpointError
from kdray.models import Segmenter, build_model, load_segmenter_weights, read_state_dict

Protocol = tuple[tuple[float, ...], bool]  # (scales, flip)
SINGLE_SCALE: Protocol = ((1.0,), False)


def job_protocol(data: DataConfig) -> Protocol:
    """The job's multi-scale protocol: (data.eval_scales, data.eval_flip)."""
    return tuple(data.eval_scales), data.eval_flip


def read_weights(path: str | Path, role: str) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (raw, or nested under `state_dict`/`model`: a run checkpoint file too) or
    of a run checkpoint directory (`<dir>/checkpoint.pt`, whose `model` it takes). CheckpointError naming the path
    when it is missing or unreadable, or when a run checkpoint was written for the other role."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return read_state_dict(path)  # CheckpointError for a missing, empty or foreign file
    if not (path / FILENAME).is_file():
        raise CheckpointError(f"{path}: a directory without a run checkpoint ({FILENAME}) in it; name a weights "
                              f"file (e.g. best_{role}.pt) or a run's checkpoint directory")
    state = load_checkpoint(path)
    written_for = state.get("role", role)
    if written_for != role:
        raise CheckpointError(f"{path}: a checkpoint of a {written_for} run; score it with --role {written_for}")
    return read_state_dict(path / FILENAME)


def load_for_evaluation(job: Job, role: str, path: str | Path, device: torch.device) -> Segmenter:
    """The job's `role` model (`student` or `teacher`: its arch and width, data.num_classes classes) with the
    weights at `path` (`read_weights`), loaded strictly, in eval mode, on `device`. The auxiliary head is built
    when the file has one (`auxlayer.*` keys), so that everything else must match exactly. CheckpointError
    naming the keys that differ otherwise."""
    cfg = job.teacher if role == "teacher" else job.student
    state = read_weights(path, role)
    aux = any(k.startswith("auxlayer.") for k in state)
    model = build_model(cfg.arch, job.data.num_classes, aux=aux, width=cfg.width)
    try:
        load_segmenter_weights(model, path, state=state)
    except CheckpointError as exc:
        hint = fitting_model_hint(job, role, state, aux)
        raise CheckpointError(f"{exc}. {hint}" if hint else str(exc)) from None
    return model.eval().to(device)


# The widths a hint tries for a file that does not fit: the published model and its usual fractions.
HINT_WIDTHS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125, 0.0625)


def fitting_model_hint(job: Job, role: str, state: dict[str, torch.Tensor], aux: bool) -> str | None:
    """For weights that do not fit the job's `role` model: which model they do fit, said as what to change, or
    None. Tries the job's other role first (its arch and width: "use --role teacher"), then the role's arch at
    the usual widths ("set student.width=0.5"). Models are built on the meta device: shapes only, no memory."""
    other = "student" if role == "teacher" else "teacher"
    cfg, other_cfg = getattr(job, role), getattr(job, other)
    n = job.data.num_classes
    if _fits(state, other_cfg.arch, n, aux, other_cfg.width):
        return (f"The file fits the job's {other} ({arch_label(other_cfg.arch, other_cfg.width)}): "
                f"score it with --role {other}")
    for width in HINT_WIDTHS:
        if width != cfg.width and _fits(state, cfg.arch, n, aux, width):
            return (f"The file fits {arch_label(cfg.arch, width)}, the job's {role} is "
                    f"{arch_label(cfg.arch, cfg.width)}: add {role}.width={width:g}")
    return None


def _fits(state: dict[str, torch.Tensor], arch: str, num_classes: int, aux: bool, width: float) -> bool:
    """Whether `state` has exactly the keys and shapes of `arch` at `width` (buffers BatchNorm fills itself
    aside)."""
    with torch.device("meta"):
        expected = build_model(arch, num_classes, aux=aux, width=width).state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    if set(state) - set(expected) or set(expected) - set(state) - optional:
        return False
    return all(state[k].shape == v.shape for k, v in expected.items() if k in state)


@dataclass(frozen=True)
class Score:
    """One evaluation of a model over the job's val split under one protocol. `miou`, `pixel_acc` and `iou`
    (per class, NaN for a class absent from labels and predictions) are fractions; `seconds` is its wall time
    (data loading and every forward pass; on a GPU, synchronised)."""

    metric: str  # the mIoU's name: contract.VAL_MIOU, or the protocol's (contract.miou_metric_key)
    scales: tuple[float, ...]
    flip: bool
    miou: float
    pixel_acc: float
    iou: tuple[float, ...]
    seconds: float


def score_model(job: Job, model: nn.Module, ctx: RankContext, protocols: list[Protocol],
                autocast: torch.autocast | None = None) -> list[Score]:
    """`model` evaluated over the job's val split (its tune split when data.tune_split is on, as a run's val/miou)
    once per protocol, in order, whole images or slid windows as data.eval_mode says. DataError from the split."""
    loader = evaluation_loader(build_dataset(job.data, "val"), job.data.eval_batch_size, ctx,
                               job.data.loader_workers)
    out = []
    for scales, flip in protocols:
        _synchronize(ctx.device)
        start = time.perf_counter()
        result = evaluate(model, loader, job.data.num_classes, job.data.ignore_index, ctx, autocast,
                          window_of(job.data), scales, flip)
        _synchronize(ctx.device)
        out.append(Score(contract.miou_metric_key(scales, flip), tuple(scales), flip, float(result["miou"]),
                         float(result["pixel_acc"]), tuple(result["iou"]), time.perf_counter() - start))
    return out


def protocol_metrics(score: Score, classes: list[str]) -> dict[str, float]:
    """A score as MLflow metrics: its mIoU under the protocol's name and each class's IoU
    (`contract.protocol_iou_key`: `val/iou_ms_flip/<class>`, ...)."""
    out = {score.metric: score.miou}
    out.update({contract.protocol_iou_key(name, score.scales, score.flip): value
                for name, value in zip(classes, score.iou)})
    return out


@torch.no_grad()
def score_best_weights(job: Job, model: nn.Module, path: Path, loader: DataLoader, ctx: RankContext,
                       autocast: torch.autocast | None = None) -> dict[str, float]:
    """The run's best weights (`path`, written by the main rank) scored under the job's multi-scale protocol, as
    `protocol_metrics`; {} when the protocol is single scale (val/miou already is that score) or the main rank has
    no such file (a run resumed on a fresh machine after its best evaluation).

    Every rank must call it (collectives): the main rank loads the file into `model` and broadcasts the weights, so
    each rank scores its share of `loader` with the same weights and the confusion matrices are summed. `model`
    keeps the best weights afterwards.
    """
    scales, flip = job_protocol(job.data)
    if is_single_scale(scales, flip):
        return {}
    present = torch.tensor(int(ctx.is_main and path.is_file()), device=ctx.device)
    if ctx.distributed:
        dist.broadcast(present, 0)
    if not int(present):
        return {}
    if ctx.is_main:
        model.load_state_dict(torch.load(path, map_location=ctx.device, weights_only=True))
    if ctx.distributed:
        for tensor in model.state_dict().values():  # the live parameters and buffers, received in place
            dist.broadcast(tensor, 0)
    start = time.perf_counter()
    result = evaluate(model, loader, job.data.num_classes, job.data.ignore_index, ctx, autocast,
                      window_of(job.data), scales, flip)
    score = Score(contract.miou_metric_key(scales, flip), scales, flip, float(result["miou"]),
                  float(result["pixel_acc"]), tuple(result["iou"]), time.perf_counter() - start)
    return protocol_metrics(score, class_names(job.data))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
