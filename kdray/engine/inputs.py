"""What a run reads before it computes, checked up front: the data tree and the weight files.

`kdray.train --dry-run`, every start of `kdray.train` and every sweep (`--dry-run` too, before Ray starts and
before anything is written to MLflow) run the same checks, so that a wrong path, a truncated or foreign
weights file, or a teacher trained for another class count stops the command in seconds with one line:

- `open_splits`: both splits' trees (missing root or split, empty split, unpaired files) and a few masks
  (every mask with `full=True`, the `--check-data` scan); at least one global batch of training images;
- `check_weights`: the teacher checkpoint (when the job distils) and the student's backbone file, each read
  as a state dict (`weights_only`: an unsafe pickle is refused, never run) and fitted, strictly, to a model
  built on the meta device (no memory, no compute); returns notes where a public file does not suit the job;
- `check_losses`: every enabled loss's pre-flight check (the one a run makes at its first step) on stand-in
  outputs of the job's models at the training shapes: a loss that cannot run, or a plugin loss whose forward
  fails, stops the command here rather than at the first step of the first trial.

Errors are `DataError`, `CheckpointError` or `PreflightError` (exit code 2 on the command line).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from pathlib import Path

import torch

from kdray.config import Job
from kdray.data import raw_dataset, split_name
from kdray.data.tune_split import tune_split_indices, tune_split_on
from kdray.engine.loop import student_aux
from kdray.engine.progress import Progress
from kdray.errors import CheckpointError, DataError
from kdray.losses.inputs import TEACHER_AUX_LOGITS
from kdray.losses.objective import DistillationObjective, reads_input, required_taps
from kdray.models import SegmenterOutput, build_model
from kdray.models.public import mismatches
from kdray.models.taps import tap_channels, tap_stride
from kdray.models.weights import load_segmenter_weights, read_state_dict

SCAN_THREADS = min(8, os.cpu_count() or 1)  # threads reading masks for --check-data


def open_splits(job: Job, full: bool = False) -> dict[str, int]:
    """Open the train and val splits (tree checks and a few masks; every mask with `full`): role -> size.

    With `data.tune_split` on, only the training split is opened (the val split is not read) and carved up front
    (`kdray.data.tune_split`; DataError naming `data.tune_split.fraction` when a part would be empty): `train`
    is the size left to train on, `val` the size of the tune part evaluated instead."""
    sizes, carved = {}, ""
    tuning = tune_split_on(job.data)
    for role in ("train",) if tuning else ("train", "val"):
        dataset = raw_dataset(job.data, role)
        sizes[role] = len(dataset)
        if tuning:  # before the mask scan: a fraction that leaves a part empty stops the command at once
            t = job.data.tune_split
            train, tune = tune_split_indices(len(dataset), t.fraction, t.seed)
            carved = f" ({len(train)} after data.tune_split.fraction={t.fraction:g} holds out {len(tune)} for tuning)"
        if full:
            split = split_name(job.data, role)
            show = Progress(len(dataset))
            t0 = time.perf_counter()
            progress = _throttled(show, f"checking {job.data.dataset} {split} masks")
            if hasattr(dataset, "check"):  # the file datasets read the masks themselves, in threads
                dataset.check(progress=progress, workers=SCAN_THREADS)
            else:
                _check_items(dataset, job, split, progress)
            show.message(f"{len(dataset)} {split} masks checked in {time.perf_counter() - t0:.1f} s")
    total = sizes["train"]
    if tuning:
        sizes = {"train": len(train), "val": len(tune)}
    if sizes["train"] < job.data.batch_size:  # the sampler would refuse it later, after the models are built
        raise DataError(f"the {split_name(job.data, 'train')} split has {total} images{carved}, fewer than one "
                        f"global batch (data.batch_size={job.data.batch_size}): lower data.batch_size"
                        f"{' or data.tune_split.fraction' if tuning else ''} or add data")
    return sizes


def _check_items(dataset, job: Job, split: str, progress) -> None:
    """Every item's mask of a dataset without its own check (a plugin's, the synthetic one): integer class ids
    0..K-1 or the ignore value; DataError naming the dataset, split, item and value otherwise."""
    k, ignore = job.data.num_classes, job.data.ignore_index
    for index in range(len(dataset)):
        mask = torch.as_tensor(dataset[index][1])
        where = f"{job.data.dataset} {split} item {index}"
        if mask.is_floating_point() and not torch.equal(mask, mask.round()):
            raise DataError(f"{where}: mask values are not integer class ids (dtype {mask.dtype})")
        values = mask.long().unique()
        bad = values[((values < 0) | (values >= k)) & (values != ignore)]
        if bad.numel():
            raise DataError(f"{where}: mask value {int(bad[0])} is outside 0..{k - 1} (K = {k}) and is not "
                            f"data.ignore_index={ignore}")
        progress(index + 1, len(dataset))


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


def check_losses(job: Job) -> None:
    """The losses' pre-flight check on stand-in outputs: random logits, features of every layer an enabled loss
    reads (their channel counts and strides from meta-device copies of the models), auxiliary logits of a model
    that will have the auxiliary head (the student as the run builds it; the teacher as its checkpoint has it),
    labels with ignored pixels and images, for one worker's batch of training crops. Builds the objective on
    the CPU (its adapters and discriminator), never the networks, and leaves the random stream as it was.
    PreflightError naming the loss.
    """
    d = job.data
    n, (height, width), k = max(d.batch_size // job.run.workers, 1), d.crop, d.num_classes
    with _on_meta():
        student = build_model(job.student.arch, k, aux=student_aux(job), width=job.student.width)
        teacher = build_model(job.teacher.arch, k, aux=_teacher_aux(job), width=job.teacher.width) \
            if job.distills else None
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(0)

        def maps(channels: int, stride: int) -> torch.Tensor:
            return torch.randn(n, channels, math.ceil(height / stride), math.ceil(width / stride), generator=g)

        def outputs(model, side: str) -> tuple[SegmenterOutput, dict[str, torch.Tensor]]:
            aux = maps(k, 8) if model.auxlayer is not None else None
            out = SegmenterOutput(maps(k, 8), maps(model.feature_channels, 8).relu(), aux)
            taps = {t: maps(tap_channels(model, t), tap_stride(model, t)).relu()
                    for t in required_taps(job.losses, side)}
            return out, taps

        taps_channels = {"student": {t: tap_channels(student, t) for t in required_taps(job.losses, "student")}}
        if teacher is not None:
            taps_channels["teacher"] = {t: tap_channels(teacher, t) for t in required_taps(job.losses, "teacher")}
        objective = DistillationObjective(
            job.losses, num_classes=k, student_channels=student.feature_channels,
            teacher_channels=teacher.feature_channels if teacher is not None else None,
            ignore_index=d.ignore_index, tap_channels=taps_channels)
        s_out, s_taps = outputs(student, "student")
        t_out, t_taps = outputs(teacher, "teacher") if teacher is not None else (None, None)
        labels = torch.randint(0, k, (n, height, width), generator=g)
        labels[:, : max(height // 8, 1)] = d.ignore_index  # a band of ignored pixels, like a padded crop's
        images = torch.randn(n, 3, height, width, generator=g)
        objective.preflight(objective.step_tensors(s_out, t_out, labels, images, s_taps, t_taps))


def _teacher_aux(job: Job) -> bool:
    """Whether the job's teacher will have the auxiliary head, as `load_teacher` builds it: from its checkpoint's
    keys, read only when an enabled loss reads `teacher.aux_logits` (else it does not matter). A checkpoint not
    written yet (a sweep's `--train-teacher`, `teacher.checkpoint: auto`) is the teacher kdray will train, with
    the head when `losses.ce.aux_weight` > 0."""
    if not reads_input(job.losses, TEACHER_AUX_LOGITS):
        return False
    path = job.teacher.checkpoint
    if path is None or not Path(path).is_file():
        return job.losses.ce.aux_weight > 0
    try:
        return any(key.startswith("auxlayer.") for key in read_state_dict(path))
    except CheckpointError as err:
        raise CheckpointError(f"teacher.checkpoint: {err}") from None


@contextlib.contextmanager
def _on_meta():
    """Build models on the meta device (shapes only), keeping torch's "copy to meta is a no-op" warnings quiet."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
