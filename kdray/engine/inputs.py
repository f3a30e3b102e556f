"""What a run reads before it computes, checked up front: the data tree and the weight files.

`kdray.train --dry-run`, every start of `kdray.train` and every sweep (`--dry-run` too, before Ray starts and
before anything is written to MLflow) run the same checks, so that a wrong path, a truncated or foreign
weights file, or a teacher trained for another class count stops the command in seconds with one line:

- `open_splits`: both splits' trees (missing root or split, empty split, unpaired files) and a few masks
  (every mask with `full=True`, the `--check-data` scan); at least one global batch of training images;
- `check_weights`: the teacher checkpoint (when the job distils) and the student's backbone file, each read
  as a state dict (`weights_only`: an unsafe pickle is refused, never run) and fitted, strictly, to a model
  built on the meta device (no memory, no compute); returns notes where a public file does not suit the job.

Errors are `DataError` or `CheckpointError` (exit code 2 on the command line).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import torch

from kdray.config import Job
from kdray.data import raw_dataset, split_name
from kdray.engine.progress import Progress
from kdray.errors import CheckpointError, DataError
from kdray.models import build_model
from kdray.models.public import mismatches
from kdray.models.weights import load_segmenter_weights, read_state_dict

SCAN_THREADS = min(8, os.cpu_count() or 1)  # threads reading masks for --check-data


def open_splits(job: Job, full: bool = False) -> dict[str, int]:
    """Open the train and val splits (tree checks and a few masks; every mask with `full`): role -> size."""
    sizes = {}
    for role in ("train", "val"):
        dataset = raw_dataset(job.data, role)
        sizes[role] = len(dataset)
        if full and hasattr(dataset, "check"):
            split = split_name(job.data, role)
            show = Progress(len(dataset))
            t0 = time.perf_counter()
            dataset.check(progress=_throttled(show, f"checking {job.data.dataset} {split} masks"),
                          workers=SCAN_THREADS)
            show.message(f"{len(dataset)} {split} masks checked in {time.perf_counter() - t0:.1f} s")
    if sizes["train"] < job.data.batch_size:  # the sampler would refuse it later, after the models are built
        raise DataError(f"the {split_name(job.data, 'train')} split has {sizes['train']} images, fewer than one "
                        f"global batch (data.batch_size={job.data.batch_size}): lower data.batch_size or add data")
    return sizes


def _throttled(show: Progress, label: str):
    """A `progress(done, total)` callback that redraws about 50 times in all (one line each off a terminal)."""

    def progress(done: int, total: int) -> None:
        if done % max(1, total // 50) == 0 or done == total:
            show.update(done, label)

    return progress


def check_weights(job: Job, teacher_will_be_trained: bool = False) -> list[str]:
    """Check the job's weight files; raise CheckpointError on the first that is missing or does not fit.

    teacher_will_be_trained: the teacher file may be absent (a sweep with `--train-teacher` makes it first);
    one that exists is still checked. Returns notes (a public file whose normalisation, arch or class count
    differs from the job's), one line each.
    """
    notes = []
    n = job.data.normalize
    if job.distills:
        path = job.teacher.checkpoint
        if path is None:
            raise CheckpointError("teacher.checkpoint: distillation needs trained teacher weights; train them with "
                                  "`python -m kdray.teacher --job <job>` or name a checkpoint file")
        if Path(path).is_file():
            _check_teacher_fits(job, path)
            notes += mismatches("teacher.checkpoint", path, job.teacher.arch, job.data.num_classes, n.mean, n.std,
                                n.order)
        elif not teacher_will_be_trained:
            raise CheckpointError(f"teacher.checkpoint: {path}: no such file (train it with `python -m kdray.teacher "
                                  "--job <job>`, or see the README section on public teachers)")
    notes += _check_backbone(job, "student")
    return notes


def check_teacher_training(job: Job) -> list[str]:
    """What training the job's teacher reads besides the data: its backbone file, when it names one."""
    return _check_backbone(job, "teacher")


def _check_backbone(job: Job, role: str) -> list[str]:
    """The `<role>.backbone_weights` file, fitted to a meta-device model of that role; notes as above."""
    cfg = getattr(job, role)
    path = cfg.backbone_weights
    if path is None:
        return []
    key = f"{role}.backbone_weights"
    if not Path(path).is_file():
        raise CheckpointError(f"{key}: {path}: no such file (see the README section on public teachers)")
    try:
        with _on_meta():
            build_model(cfg.arch, job.data.num_classes, width=cfg.width, backbone_weights=path)
    except CheckpointError as err:
        raise CheckpointError(f"{key}: {err}") from None
    n = job.data.normalize
    return mismatches(key, path, cfg.arch, job.data.num_classes, n.mean, n.std, n.order)


def _check_teacher_fits(job: Job, path: str) -> None:
    """Read the teacher file and load it, strictly, into a meta-device teacher (as `load_teacher` would)."""
    try:
        state = read_state_dict(path)
    except CheckpointError as err:
        raise CheckpointError(f"teacher.checkpoint: {err}") from None
    with _on_meta():
        model = build_model(job.teacher.arch, job.data.num_classes, aux=any(k.startswith("auxlayer.") for k in state),
                            width=job.teacher.width)
    try:
        with _on_meta():
            load_segmenter_weights(model, path, state=state)
    except CheckpointError as err:
        classes = _file_class_count(state, model, job.data.num_classes)
        if classes is not None:
            raise CheckpointError(f"teacher.checkpoint: {path} holds a teacher for {classes} classes; the job has "
                                  f"data.num_classes={job.data.num_classes} ({err})") from None
        raise CheckpointError(f"teacher.checkpoint: {err}") from None


def _file_class_count(state: dict[str, torch.Tensor], model: torch.nn.Module, num_classes: int) -> int | None:
    """The class count of the file's classifier, when it differs from the model's only in that count."""
    for key, tensor in model.state_dict().items():
        other = state.get(key)
        if (other is not None and tensor.dim() >= 1 and tensor.shape[0] == num_classes
                and other.shape[0] != num_classes and other.shape[1:] == tensor.shape[1:]):
            return int(other.shape[0])
    return None


@contextlib.contextmanager
def _on_meta():
    """Build models on the meta device (shapes only), keeping torch's "copy to meta is a no-op" warnings quiet."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
