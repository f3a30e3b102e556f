"""A trial's best student as an MLflow model: `mlflow.pytorch.log_model` on the trial's own run, so the run's page
lists it under its logged models, the model has a page of its own (its metrics at the best evaluation, the run's
params, its signature and input example) and can be registered from there. The raw `checkpoints/best_student.pt`
artifact stays as it is, for a resume and for `python -m kdray.evaluate`.

What is logged (`kdray.engine.serving`): `Logits(student)`, exported with `torch.export` (MLflow's "pt2" format: a
graph with its weights, loadable without kdray), images (N, 3, H, W) normalised as the job's data.normalize says ->
logits (N, K, ceil(H / 8), ceil(W / 8)) float32, N, H and W free (H, W >= 9).

MLflow 3's `log_model` takes the run to log to as `run_id` and never starts a fluent run then; the store is MLflow's
process-wide tracking URI, which is set to the run's store for the call only and restored after.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdray import contract
from kdray.config import Job
from kdray.orchestration.tracking import retrying


def model_signature(example: np.ndarray, logits: np.ndarray):
    """The signature `mlflow.models.infer_signature` gives (example, logits), with their height and width made free
    (-1) as the batch already is: inputs (-1, 3, -1, -1) and outputs (-1, K, -1, -1), float32. MLflow's pt2 export
    keeps exactly the dimensions a signature leaves free dynamic, so the model takes images of any size."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    inferred = infer_signature(example, logits)

    def free(schema: Schema) -> Schema:
        return Schema([TensorSpec(spec.type, (-1, spec.shape[1], -1, -1), spec.name) for spec in schema.inputs])

    return ModelSignature(free(inferred.inputs), free(inferred.outputs))


def log_student_model(tracking_uri: str, run_id: str, job: Job, weights: str | Path, step: int) -> Any:
    """Log the student with the weights at `weights` as the MLflow model `contract.STUDENT_MODEL_NAME` of run
    `run_id` and return MLflow's `ModelInfo` (its `model_uri` is `models:/<model id>`). `step` is the iteration those
    weights were evaluated at: the run's metrics at that step are linked to the model. The run's status is left as
    it is and no fluent run is started. The input example is `kdray.engine.serving.input_example` (two small crops);
    the pip requirements are the flavour's defaults (torch, cloudpickle), not inferred in a subprocess."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from kdray.engine.serving import input_example, servable_student

    module = servable_student(job, weights)
    example = input_example(job)
    with torch.no_grad():
        logits = module(torch.from_numpy(example)).numpy()
    client = MlflowClient(tracking_uri)
    run = retrying(lambda: client.get_run(run_id))
    # Created here, in the run's experiment: left to log_model, it would go to MLflow's fluent current experiment
    # (the Default one of the store, under its artifact root) rather than the run's. Its params are the run's, as
    # log_model would copy them.
    model = retrying(lambda: client.create_logged_model(
        run.info.experiment_id, name=contract.STUDENT_MODEL_NAME, source_run_id=run_id,
        params={k: str(v) for k, v in run.data.params.items()}))
    with _use_tracking_uri(tracking_uri):
        return mlflow.pytorch.log_model(
            module, name=contract.STUDENT_MODEL_NAME, model_id=model.model_id, run_id=run_id, step=step,
            input_example=example, signature=model_signature(example, logits), serialization_format="pt2",
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
            validate_serving_input=False)  # it would load the model back (seconds): the tests do that instead


def has_logged_model(tracking_uri: str, run_id: str) -> bool:
    """Whether the run already has a logged model (an output of it), e.g. from before a restart."""
    from mlflow.tracking import MlflowClient

    run = retrying(lambda: MlflowClient(tracking_uri).get_run(run_id))
    outputs = getattr(run, "outputs", None)
    return bool(outputs is not None and outputs.model_outputs)


def log_best_student(tracking_uri: str, run_id: str, job: Job, weights: Path | None, step: int) -> str | None:
    """`log_student_model` for a run that has just ended, unless it has a model already: with `weights` (this
    session's best weights file), else the run's `checkpoints/best_student.pt` artifact (a run resumed after its
    best evaluation). Returns None, or why no model was logged (also set as the run's MODEL_FAILURE tag): a model
    that cannot be logged never fails the run, whose checkpoint artifact serves instead."""
    from mlflow.tracking import MlflowClient

    try:
        if has_logged_model(tracking_uri, run_id):
            return None
        with tempfile.TemporaryDirectory(prefix="kdray-model-") as tmp:
            if weights is None:
                artifact = f"{contract.BEST_CHECKPOINT_ARTIFACT_DIR}/best_student.pt"
                weights = Path(MlflowClient(tracking_uri).download_artifacts(run_id, artifact, tmp))
            log_student_model(tracking_uri, run_id, job, weights, step)
        return None
    except Exception as err:  # the checkpoint artifact is the run's record; the model is a convenience on top
        why = f"the best student was not logged as an MLflow model: {type(err).__name__}: {err}"
        logging.getLogger(__name__).warning("run %s: %s", run_id, why)
        with contextlib.suppress(Exception):  # the store itself is unreachable: the warning above is all there is
            retrying(lambda: MlflowClient(tracking_uri).set_tag(run_id, contract.MODEL_FAILURE, why[:5000]))
        return why
