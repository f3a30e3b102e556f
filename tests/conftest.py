"""Fixtures shared by the engine and GPU tests."""

from __future__ import annotations

import pytest
import torch

from kdray.models import build_model


@pytest.fixture(scope="session", autouse=True)
def teacher_cache(tmp_path_factory):
    """Teachers that jobs with `teacher.checkpoint: auto` train (the demo's) go to a test folder, never to the
    user's cache; subprocesses inherit it."""
    import os

    before = os.environ.get("KDRAY_CACHE_DIR")
    os.environ["KDRAY_CACHE_DIR"] = str(tmp_path_factory.mktemp("kdray-cache"))
    yield
    if before is None:
        os.environ.pop("KDRAY_CACHE_DIR", None)
    else:
        os.environ["KDRAY_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Random teacher weights in the layout `kdray.teacher` writes (no training needed to test the loop)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(123)
    torch.save(build_model("deeplabv3_resnet18", 8, width=0.125).state_dict(), path)
    return str(path)
