"""Evaluation as the papers do it: whole images, single scale, logits upsampled to the label size.
With a `window` (data.eval_mode: slide) the logits come from overlapping windows instead (engine/sliding.py);
with `scales` other than (1.0,) or `flip`, from the mean softmax over the scales and mirror images
(engine/multiscale.py, the papers' "MS + flip").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from kdray.contract import Evaluation, improves
from kdray.engine.distributed import RankContext
from kdray.engine.multiscale import multiscale_scores
from kdray.engine.sliding import Window
from kdray.metrics import ConfusionMatrix


def evaluation_loader(dataset: Dataset, batch_size: int, ctx: RankContext, workers: int = 0) -> DataLoader:
    """Rank r evaluates items r, r+W, r+2W, ...: every item once, confusion matrices summed afterwards."""
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))  # type: ignore[arg-type]
    return DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator())  # not the global RNG: evaluating must not shift training


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, ignore_index: int, ctx: RankContext,
             autocast: torch.autocast | None = None, window: Window | None = None,
             scales: Sequence[float] = (1.0,), flip: bool = False) -> dict[str, object]:
    """`{"miou", "iou", "pixel_acc"}` over the whole split (all ranks): each batch's prediction is the argmax of
    `multiscale_scores` (the single-scale logits with the defaults `scales=(1.0,)`, `flip=False`)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, ctx.device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if autocast is not None:
            with autocast:
                return model(x).logits
        return model(x).logits

    for images, labels in loader:
        images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
        cm.update(multiscale_scores(forward, images, labels.shape[-2:], scales, flip, window), labels)
    model.train(was_training)
    return cm.all_reduce().compute()


def judge(iteration: int, scores: dict[str, object], classes: Sequence[str], best_miou: float) -> Evaluation:
    """The typed evaluation at `iteration` of `scores` (what `evaluate` returns), given the run's best mIoU before
    it (-inf at the start): `is_best` when it beats that strictly (`kdray.contract.improves`; ties and NaN do not)."""
    miou = float(scores["miou"])  # type: ignore[arg-type]
    is_best = improves(miou, best_miou)
    iou = tuple(float(v) for v in scores["iou"])  # type: ignore[union-attr]
    return Evaluation(iteration, miou, float(scores["pixel_acc"]), tuple(classes), iou,  # type: ignore[arg-type]
                      miou if is_best else best_miou, is_best)
