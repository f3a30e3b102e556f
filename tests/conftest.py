"""Fixtures shared by the engine and GPU tests."""

from __future__ import annotations

import pytest
import torch

from kdray.models import build_model


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """Random teacher weights in the layout `kdray.teacher` writes (no training needed to test the loop)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.manual_seed(123)
    torch.save(build_model("deeplabv3_resnet18", 8, width=0.125).state_dict(), path)
    return str(path)
