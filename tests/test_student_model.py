"""The best student as an MLflow model: logged to a given run without touching its status or MLflow's fluent state,
loaded back (as a torch module and through pyfunc) with the logits of the checkpoint it came from."""

from __future__ import annotations

import os

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric

from kdray import contract
from kdray.config import job_from_dict
from kdray.engine.serving import EXAMPLE_SIDE, input_example
from kdray.models import build_model
from kdray.orchestration.student_model import log_best_student, log_student_model

JOB = {
    "name": "tiny",
    "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4,
             "synthetic": {"image_size": 72, "train_length": 8, "val_length": 4}},
    "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
    "run": {"threads": 1},
}


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A run with a val/miou history, and its best student logged as a model at iteration 4."""
    tmp = tmp_path_factory.mktemp("model")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("models", artifact_location=(tmp / "artifacts").as_uri())
    run_id = client.create_run(experiment, tags={contract.KIND: "trial"}).info.run_id
    client.log_batch(run_id, metrics=[Metric(contract.VAL_MIOU, 0.5, 1, 2), Metric(contract.VAL_MIOU, 0.6, 2, 4)])
    client.log_param(run_id, "losses.kd.weight", "2.0")
    torch.manual_seed(0)
    student = build_model("deeplabv3_resnet18", 8, aux=True, width=0.125)  # with the aux head, as trained
    weights = tmp / "best_student.pt"
    torch.save(student.state_dict(), weights)
    job = job_from_dict(JOB, {})
    before = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    info = log_student_model(uri, run_id, job, weights, step=4)
    after = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    return {"uri": uri, "client": client, "run_id": run_id, "experiment": experiment, "info": info,
            "student": student.eval(), "job": job, "before": before, "after": after}


def test_the_run_keeps_its_status_and_mlflow_no_fluent_state(logged):
    assert logged["client"].get_run(logged["run_id"]).info.status == "RUNNING"
    assert mlflow.active_run() is None
    assert logged["before"] == logged["after"]  # the process-wide tracking URI (and its variable) restored


def test_the_model_belongs_to_the_run_and_its_experiment(logged):
    client, info = logged["client"], logged["info"]
    model = client.get_logged_model(info.model_id)
    assert model.name == contract.STUDENT_MODEL_NAME and model.source_run_id == logged["run_id"]
    assert model.experiment_id == logged["experiment"] and str(model.status).endswith("READY")
    assert model.params.get("losses.kd.weight") == "2.0"  # the run's params
    assert {(m.key, m.step, m.value) for m in model.metrics} == {(contract.VAL_MIOU, 4, 0.6)}  # the best evaluation
    outputs = client.get_run(logged["run_id"]).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(info.model_id, 4)]
    signature = info.signature
    assert signature.inputs.inputs[0].shape == (-1, 3, -1, -1) and signature.outputs.inputs[0].shape == (-1, 8, -1, -1)


def test_loading_it_back_gives_the_checkpoints_logits(logged):
    student, info = logged["student"], logged["info"]
    with mlflow.tracking._tracking_service.utils._use_tracking_uri(logged["uri"]):
        module = mlflow.pytorch.load_model(info.model_uri)
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    torch.manual_seed(1)
    for shape in [(1, 3, 72, 72), (2, 3, 40, 56)]:  # the example's size, and another batch and size
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = student(x).logits
            got = module(x)
        assert got.shape == expected.shape == (shape[0], 8, (shape[2] + 7) // 8, (shape[3] + 7) // 8)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        expected = student(x).logits.numpy()
    np.testing.assert_allclose(pyfunc.predict(x.numpy()), expected, atol=1e-6, rtol=0)


def test_the_input_example_is_two_small_normalised_crops(logged):
    example = input_example(logged["job"])
    assert example.dtype == np.float32 and example.shape == (2, 3, EXAMPLE_SIDE, EXAMPLE_SIDE)
    np.testing.assert_array_equal(example[1], example[0][..., ::-1])  # the crop and its mirror image


def test_a_run_with_a_model_gets_no_second_and_a_failure_is_a_tag(logged, tmp_path):
    uri, client, run_id = logged["uri"], logged["client"], logged["run_id"]
    assert log_best_student(uri, run_id, logged["job"], tmp_path / "none.pt", 4) is None  # has one: nothing done
    assert len(client.search_logged_models([logged["experiment"]])) == 1
    other = client.create_run(logged["experiment"]).info.run_id
    why = log_best_student(uri, other, logged["job"], None, 4)  # no weights here, and no checkpoint artifact
    assert why is not None and why.startswith("the best student was not logged as an MLflow model")
    run = client.get_run(other)
    assert run.data.tags[contract.MODEL_FAILURE] == why and run.info.status == "RUNNING"
