"""Fixtures shared by the engine and GPU tests."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from kdray.losses import LOSSES, LossConfig, register_loss, student_features, teacher_features
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


# A loss on a backbone layer (FitNet-style hint), registered for the tests that use the `layer_hint` fixture.
@dataclass
class LayerHintConfig(LossConfig):
    layer: str = "backbone.layer3"


def _reads(cfg):
    return {"student_map": student_features(cfg.layer), "teacher_map": teacher_features(cfg.layer)}


def _build(cfg, context):
    return LayerHint(context.student(cfg.layer), context.teacher(cfg.layer))


class LayerHint(nn.Module):
    """A FitNet-style hint: `mean (W * f_S - f_T)²` at one layer, W a 1x1 adapter C_S -> C_T."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = nn.Conv2d(student_channels, teacher_channels, 1, bias=False)

    def forward(self, student_map, teacher_map):
        return (self.adapter(student_map) - teacher_map.detach()).float().square().mean()


@pytest.fixture
def layer_hint():
    """The name of a registered loss reading `losses.<name>.layer` (default backbone.layer3) of both models."""
    register_loss("layer_hint_test", config=LayerHintConfig, label="HINT", reads=_reads, build=_build)(LayerHint)
    yield "layer_hint_test"
    LOSSES.pop("layer_hint_test", None)




def _assert_run_shows_what_it_learnt(client, run, steps):
    """A trial's run as the MLflow UI shows it: a `predictions` picture at each evaluation step in `steps`, the best
    evaluation's predictions kept, and the best student logged as a model at its best evaluation."""
    from kdray import contract

    run_id = run.info.run_id
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    assert {int(p.split("+step+")[1].split("+")[0]) for p in images if p.endswith(".png")} == set(steps)
    kept = {f.path for f in client.list_artifacts(run_id, contract.PREDICTIONS_ARTIFACT_DIR)}
    assert kept == {f"{contract.PREDICTIONS_ARTIFACT_DIR}/{contract.BEST_PREDICTIONS_FILE}"}
    best = max(client.get_metric_history(run_id, contract.VAL_MIOU), key=lambda m: (m.value, -m.step)).step
    assert [o.step for o in run.outputs.model_outputs] == [best] and contract.MODEL_FAILURE not in run.data.tags
    assert client.get_logged_model(run.outputs.model_outputs[0].model_id).name == contract.STUDENT_MODEL_NAME


@pytest.fixture
def shows_what_it_learnt():
    """`check(client, run, steps)`: see `_assert_run_shows_what_it_learnt`."""
    return _assert_run_shows_what_it_learnt
