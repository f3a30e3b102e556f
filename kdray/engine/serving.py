"""A trained student as a function of images alone: what a run's MLflow model holds (the orchestration logs it;
nothing here imports MLflow).

    Logits(student)(images) -> logits           images (N, 3, H, W) normalised as the job's data.normalize says
                                                logits (N, K, ceil(H / 8), ceil(W / 8)) float32, output stride 8

The logits are the model's own, at output stride 8, as its checkpoint gives them (`SegmenterOutput.logits`); a
per-pixel prediction is their bilinear resize to (H, W), argmax over K, as kdray's evaluation does
(`kdray.engine.multiscale.pass_logits`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdray.config import Job
from kdray.data import build_dataset
from kdray.engine.scoring import load_for_evaluation
from kdray.models import Segmenter
from kdray.rendering import preview_indices

EXAMPLE_SIDE = 64  # pixels: the input example is a crop of at most this a side (its numbers are stored as JSON)


class Logits(nn.Module):
    """`student(images).logits` without the auxiliary head: a module whose forward returns one plain tensor, as
    `mlflow.pytorch` and `torch.export` want. The wrapped `Segmenter` is `self.student`."""

    def __init__(self, student: Segmenter):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.student(images, aux=False).logits


def servable_student(job: Job, weights: str | Path, device: torch.device | str = "cpu") -> Logits:
    """The job's student with the weights at `weights` (a `best_student.pt`, loaded strictly by
    `kdray.engine.scoring.load_for_evaluation`), its auxiliary head dropped, wrapped in `Logits`, in eval mode on
    `device`. CheckpointError naming the file when it does not fit the job's student."""
    student = load_for_evaluation(job, "student", weights, torch.device(device))
    student.auxlayer = None  # serves no prediction; its weights would only weigh the logged model down
    return Logits(student).eval()


def input_example(job: Job) -> np.ndarray:
    """float32 (2, 3, h, w): the job's first preview item of the val split (`kdray.rendering.preview_indices(n, 1)`,
    normalised as the model sees it), its centred crop of at most EXAMPLE_SIDE pixels a side, and that crop's mirror
    image. Two images, so that `torch.export` keeps the batch size free (it fixes a size-1 dimension to 1). Reads one
    item of the split (and checks the split's tree as `kdray.data.build_dataset` does)."""
    val = build_dataset(job.data, "val")
    image, _ = val[preview_indices(len(val), 1)[0]]
    _, height, width = image.shape
    h, w = min(height, EXAMPLE_SIDE), min(width, EXAMPLE_SIDE)
    top, left = (height - h) // 2, (width - w) // 2
    crop = image[:, top:top + h, left:left + w]
    return torch.stack([crop, crop.flip(-1)]).numpy().astype(np.float32)
