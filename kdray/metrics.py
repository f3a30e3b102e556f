"""Segmentation metrics: a confusion matrix with an ignore value, per-class IoU and mIoU, summed across ranks.

IoU_k = TP_k / (TP_k + FP_k + FN_k). A class that is absent from both the ground truth and the predictions of
the whole evaluation has a zero denominator: its IoU is NaN and it does not count in the mean (the convention
of the Cityscapes/VOC evaluation scripts, where every class occurs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kdray.contract import VAL_IOU_PREFIX, iou_metric_key  # noqa: F401 (re-exported: the metric names live there)
from kdray.errors import ConfigError, DataError

IOU_KEY_PREFIX = VAL_IOU_PREFIX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
                     ) -> torch.Tensor:
    """Counts (K, K) int64, rows = ground truth, columns = prediction, pixels labelled `ignore_index` skipped.

    pred, target: integer tensors of the same shape (any); on the pixels not ignored, labels must be in
    0..K-1 (`DataError` otherwise) and predictions too (`ConfigError` otherwise: the model predicts classes
    the data does not have, so its class count differs from data.num_classes). The cell of a pair is
    `t·K + p`, counted by `bincount`: an unchecked p ≥ K or < 0 would land in another pair's cell.
    Predictions at ignored pixels are not looked at. Costs one min/max of labels and predictions, read back
    to the host once.
    """
    if pred.shape != target.shape:
        raise DataError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel():
        t_min, t_max, p_min, p_max = torch.stack([*torch.aminmax(t), *torch.aminmax(p)]).tolist()
        if t_min < 0 or t_max >= num_classes:
            raise DataError(f"label value {t_max if t_max >= num_classes else t_min} is outside "
                            f"0..{num_classes - 1} and is not the ignore value {ignore_index}")
        if p_min < 0 or p_max >= num_classes:
            raise ConfigError(f"prediction value {p_max if p_max >= num_classes else p_min} is outside "
                              f"0..{num_classes - 1} (K = {num_classes}): the model's class count must match "
                              f"data.num_classes ({num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """(K,) float64 IoU per class, NaN where a class is neither labelled nor predicted."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    iou = iou_per_class(confusion)
    present = ~iou.isnan()
    return float(iou[present].mean()) if present.any() else float("nan")


class ConfusionMatrix:
    """Accumulates a confusion matrix over batches; `all_reduce()` sums it over the ranks of a process group."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, logits_or_pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: logits (N, K, H, W) or predictions (N, H, W), labels (N, H, W).

        Raises `ConfigError` when the logits' class axis is not K or a prediction is outside 0..K-1 (the model
        was built for another class count than data.num_classes), `DataError` for a label outside 0..K-1 that
        is not the ignore value.
        """
        if logits_or_pred.dim() == target.dim() + 1:
            if logits_or_pred.shape[1] != self.num_classes:
                raise ConfigError(f"logits {tuple(logits_or_pred.shape)} have {logits_or_pred.shape[1]} classes on "
                                  f"axis 1, expected K = {self.num_classes}: the model's class count must match "
                                  f"data.num_classes ({self.num_classes})")
            pred = logits_or_pred.argmax(1)
        else:
            pred = logits_or_pred
        self.counts += confusion_matrix(pred, target, self.num_classes, self.ignore_index).to(self.counts.device)

    def all_reduce(self) -> ConfusionMatrix:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def compute(self) -> dict[str, object]:
        """`{"miou": float, "iou": [K floats, NaN for classes never seen], "pixel_acc": float}`."""
        counts = self.counts.cpu()
        total = int(counts.sum())
        return {
            "miou": mean_iou(counts),
            "iou": iou_per_class(counts).tolist(),
            "pixel_acc": float(counts.diagonal().sum()) / total if total else float("nan"),
        }
