"""The val images a run shows its predictions on at each evaluation (`data.preview_images`; drawn by
`kdray.rendering`).

The items are `kdray.rendering.preview_indices(len(val split), data.preview_images)`: the same for every run and
seed of a job. At an evaluation the main rank predicts them one at a time with the trained model (and, the first
time, with the frozen teacher when the run has one), each prediction the argmax of the single-scale logits resized
to the label's size, whole or slid as data.eval_mode says (`kdray.engine.multiscale.pass_logits`), under the run's
autocast. What it returns is a picture for the orchestration to log; at the run's best evaluation it also writes
the predictions (`kdray.rendering.write_predictions`) for the sweep's report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdray.config import Job
from kdray.data import class_palette
from kdray.engine.multiscale import pass_logits
from kdray.engine.sliding import Window, window_of
from kdray.rendering import Predictions, denormalize, fit_for_display, preview_indices, write_predictions

Autocast = Callable[[], contextlib.AbstractContextManager]


class PreviewSet:
    """A job's preview items of one val split, ready to be predicted, drawn and kept.

    `inputs[i]` is item `indices[i]` as the model sees it (normalised float (3, H, W)), `images[i]` the same item
    displayable (uint8 (H, W, 3) RGB), `labels[i]` its ground truth (int64 (H, W), with the ignore value).
    """

    def __init__(self, indices: list[int], inputs: list[torch.Tensor], images: list[np.ndarray],
                 labels: list[np.ndarray], palette: tuple[tuple[int, int, int], ...], ignore_index: int,
                 device: torch.device, window: Window | None = None, autocast: Autocast = contextlib.nullcontext):
        self.indices, self.inputs, self.images, self.labels = indices, inputs, images, labels
        self.palette, self.ignore_index, self.device = palette, ignore_index, device
        self.window, self.autocast = window, autocast
        self._teacher: list[np.ndarray] | None = None

    @classmethod
    def of(cls, job: Job, val_set: Dataset, device: torch.device, autocast: Autocast = contextlib.nullcontext
           ) -> PreviewSet | None:
        """The job's preview items of `val_set` (a transformed val split: (normalised image, mask) items), or None
        when data.preview_images is 0 or the split is empty. Reads those items now."""
        d = job.data
        indices = preview_indices(len(val_set), d.preview_images)  # type: ignore[arg-type]
        if not indices:
            return None
        inputs, images, labels = [], [], []
        for index in indices:
            image, label = val_set[index]
            inputs.append(image)
            images.append(denormalize(image.numpy(), d.normalize.mean, d.normalize.std, d.normalize.order))
            labels.append(label.numpy())
        return cls(indices, inputs, images, labels, class_palette(d), d.ignore_index, device, window_of(d), autocast)

    @torch.no_grad()
    def predict(self, model: nn.Module) -> list[np.ndarray]:
        """Each item's predicted class ids, int64 (H, W) at its label's size; `model` (a `Segmenter`) is run in eval
        mode and left in the mode it was in."""
        was_training = model.training
        model.eval()

        def forward(x: torch.Tensor) -> torch.Tensor:
            with self.autocast():
                return model(x).logits

        try:
            return [pass_logits(forward, image[None].to(self.device), label.shape, self.window).argmax(1)[0].cpu()
                    .numpy() for image, label in zip(self.inputs, self.labels)]
        finally:
            model.train(was_training)

    def update(self, model: nn.Module, teacher: nn.Module | None, iteration: int, miou: float, *,
               best_path: str | Path | None = None, render: bool = True) -> np.ndarray | None:
        """Predict the items with `model` (and, once per set, with `teacher` when given), at their display size
        (`kdray.rendering.fit_for_display`); with `best_path`, write them there (this evaluation is the run's best);
        return the rows `kdray.rendering.render_predictions` draws, or None without `render`."""
        if best_path is None and not render:
            return None
        student = self.predict(model)
        if teacher is not None and self._teacher is None:
            self._teacher = self.predict(teacher)  # the teacher is frozen: its predictions never change
        teacher_maps = self._teacher if teacher is not None else None
        fitted = [fit_for_display(image, label, s, teacher_maps[i] if teacher_maps is not None else None)
                  for i, (image, label, s) in enumerate(zip(self.images, self.labels, student))]
        predictions = Predictions(
            tuple(self.indices), tuple(f[0] for f in fitted), tuple(f[1] for f in fitted), tuple(f[2] for f in fitted),
            tuple(f[3] for f in fitted) if teacher_maps is not None else None, np.asarray(self.palette, np.uint8),
            self.ignore_index, iteration, miou)
        if best_path is not None:
            write_predictions(best_path, predictions)
        return predictions.render() if render else None
