"""Resumable run checkpoints: one directory holding `checkpoint.pt`, written atomically.

A checkpoint holds everything that determines the rest of the run: student (and adapters), discriminator,
the student's optimizer and the losses' own ones, the grad scaler, the iteration, every rank's RNG state, the best
result so far, and the hash of the job it was made for. A resume with a different job is refused with both hashes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kdray.errors import CheckpointError

FILENAME = "checkpoint.pt"
FORMAT = 2  # 2: the losses' own optimizers under "owned_optimizers" by loss name (1: "d_optimizer")


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` to `directory/checkpoint.pt` (replacing the directory's content atomically)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    torch.save({"format": FORMAT, **state}, tmp / FILENAME)
    if directory.exists():
        old = directory.with_name(f".{directory.name}-old-{os.getpid()}")
        directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(directory)
    return directory


def load_checkpoint(path: str | Path, job_hash: str | None = None) -> dict[str, Any]:
    """Read a checkpoint from a directory or file; refuse one written for another job."""
    path = Path(path)
    file = path / FILENAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no run checkpoint here (expected a directory holding {FILENAME})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: say which, not torch's unpickling trace
        raise CheckpointError(f"{file}: not a readable kdray checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT):
        raise CheckpointError(f"{file}: not a kdray run checkpoint (format {FORMAT})")
    if state["format"] == 1:  # before the loss registry: the one loss-owned optimizer was the discriminator's
        d_optimizer = state.pop("d_optimizer", None)
        state["owned_optimizers"] = {"adversarial": d_optimizer} if d_optimizer is not None else {}
    if job_hash is not None and state.get("job_hash") != job_hash:
        raise CheckpointError(f"{file}: written for job hash {state.get('job_hash')}, this job hashes to "
                              f"{job_hash}; resume with the same job and overrides, or start a new run")
    return state
