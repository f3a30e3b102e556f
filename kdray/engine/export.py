"""Predictions for the Cityscapes benchmark server: one PNG of labelIds per image of a split.

The server scores test-set predictions with cityscapesScripts' `evalPixelLevelSemanticLabeling.py`, which looks,
anywhere under the results folder, for exactly one file matching `<city>_<seq>_<frame>*.png` per image, and reads
its pixels as label ids (the `id` column of cityscapesScripts' `labels.py`, 0..33: not the 19 train ids). So:

    DIR/<city>/<city>_<seq>_<frame>_leftImg8bit.png     one per image of the split, named after the image
                                                         single-channel uint8 PNG at the image's resolution
                                                         (1024x2048), values the labelIds 7, 8, 11, ..., 33

Each pixel's label is the argmax over the 19 classes of the job's protocol (`kdray.engine.multiscale`: the
scales of data.eval_scales, data.eval_flip, whole images or slid windows as data.eval_mode says), mapped
trainId -> labelId (`kdray.data.cityscapes.TRAIN_TO_LABEL_ID`). Zip DIR for the upload. The same export of the val
split can be checked locally: `CITYSCAPES_DATASET=<root> CITYSCAPES_RESULTS=DIR csEvalPixelLevelSemanticLabeling`
(`pip install cityscapesscripts`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from kdray.config import Job
from kdray.data.cityscapes import TRAIN_TO_LABEL_ID, CityscapesImages
from kdray.data.transforms import eval_image_transforms
from kdray.engine.multiscale import multiscale_scores
from kdray.engine.progress import Progress
from kdray.engine.sliding import window_of
from kdray.errors import ConfigError

EXPORT_DATASET = "cityscapes"


def prediction_path(out_dir: Path, image: Path) -> Path:
    """Where the prediction of a `<city>/<city>_<seq>_<frame>_leftImg8bit.png` image goes: `out_dir/<city>/` with the
    image's own file name."""
    return out_dir / image.parent.name / image.name


def label_id_table() -> torch.Tensor:
    """(19,) uint8: trainId -> labelId, indexed by the predicted class."""
    return torch.tensor([TRAIN_TO_LABEL_ID[k] for k in range(len(TRAIN_TO_LABEL_ID))], dtype=torch.uint8)


@torch.no_grad()
def export_cityscapes(job: Job, model: nn.Module, split: str, out_dir: str | Path, device: torch.device,
                      autocast: torch.autocast | None = None, progress: bool = True) -> list[Path]:
    """Write the predictions of `model` for every image of the Cityscapes `split` under `out_dir` (the layout of the
    module docstring; existing files of the same names are replaced) and return their paths, in image order.

    ConfigError when the job's dataset is not Cityscapes (no other dataset has a benchmark server with this layout);
    DataError when the split's images are missing. One image at a time, at its full resolution."""
    if job.data.dataset != EXPORT_DATASET:
        raise ConfigError(f"data.dataset: got {job.data.dataset!r}; exporting predictions in the benchmark server's "
                          f"layout (labelId PNGs) is for {EXPORT_DATASET} only")
    n = job.data.normalize
    images = CityscapesImages(job.data.root, split, eval_image_transforms(n.mean, n.std, n.order))
    loader = DataLoader(images, batch_size=1, shuffle=False, num_workers=job.data.loader_workers)
    out_dir = Path(out_dir)
    table = label_id_table()
    scales, flip, window = tuple(job.data.eval_scales), job.data.eval_flip, window_of(job.data)
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if autocast is not None:
            with autocast:
                return model(x).logits
        return model(x).logits

    show = Progress(len(images), enabled=progress)
    every = max(1, len(images) // 20)  # about 20 progress lines
    written = []
    for done, (image, index) in enumerate(loader, start=1):
        image = image.to(device)
        scores = multiscale_scores(forward, image, image.shape[-2:], scales, flip, window)
        label_ids = table[scores[0].argmax(0).cpu()].numpy()
        path = prediction_path(out_dir, images.paths[int(index)])
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(label_ids)).save(path)  # uint8 (H, W): an 8-bit grey PNG
        written.append(path)
        if done % every == 0 or done == len(images):
            show.update(done, f"{split} predictions -> {out_dir}")
    return written
