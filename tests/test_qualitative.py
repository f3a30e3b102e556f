"""The sweep report's qualitative figure: each method's best run's kept predictions side by side, logged on the sweep's
run; a method whose best run kept none is shown and listed as such, never dropped."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.entities import Metric

from kdray import contract
from kdray.rendering import Predictions, write_predictions
from kdray.reporting import read_sweep, write_report
from kdray.reporting.qualitative import fetch_predictions, method_columns, write_qualitative
from kdray.reporting.write import logged_images

ARCHS = {contract.TEACHER_ARCH: "deeplabv3_resnet101", contract.STUDENT_ARCH: "deeplabv3_resnet18",
         contract.PARAMS_M: "13.6000", contract.DATASET: "synthetic"}
PALETTE = np.array([(200, 0, 0), (0, 200, 0), (0, 0, 200)], np.uint8)


def predictions(student_class: int, teacher: bool, indices=(4, 9), seed=0) -> Predictions:
    rng = np.random.default_rng(seed)
    images = tuple(rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8) for _ in indices)
    labels = tuple(np.full((24, 32), k % 3) for k in range(len(indices)))
    student = tuple(np.full((24, 32), student_class) for _ in indices)
    return Predictions(tuple(indices), images, labels, student, tuple(np.full((24, 32), 2) for _ in indices)
                       if teacher else None, PALETTE, 255, 200, 0.6)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Sweep q-1: CE and KD runs with predictions (KD's with the teacher's), a KD+I2CKD whose best run kept none, an
    IFVD whose only run failed. Sweep q-2: runs without any predictions (recorded before kdray kept them)."""
    tmp = tmp_path_factory.mktemp("qualitative")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("qual", artifact_location=(tmp / "artifacts").as_uri())
    runs = {}
    for sweep in ("q-1", "q-2"):
        runs[sweep] = client.create_run(experiment, tags={contract.KIND: "sweep", contract.SWEEP_ID: sweep,
                                                          contract.SPACE_KIND: "ablation"}).info.run_id
        client.set_terminated(runs[sweep], "FINISHED")
    trials = [("q-1", "CE", 0, 0.60, "FINISHED", predictions(0, False)),
              ("q-1", "KD", 0, 0.62, "FINISHED", predictions(1, True)),
              ("q-1", "KD", 1, 0.58, "FINISHED", predictions(2, True)),  # not the best KD run
              ("q-1", "KD+I2CKD", 0, 0.64, "FINISHED", None),
              ("q-1", "IFVD", 0, None, "FAILED", None),
              ("q-2", "CE", 0, 0.60, "FINISHED", None), ("q-2", "KD", 0, 0.62, "FINISHED", None)]
    for i, (sweep, method, seed, miou, status, kept) in enumerate(trials):
        run_id = client.create_run(experiment, run_name=f"{method}-s{seed}", tags={
            contract.KIND: "trial", contract.SWEEP_ID: sweep, contract.TRIAL_ID: f"t_{i}", contract.METHOD: method,
            contract.SEED: str(seed), contract.PARENT: runs[sweep], **ARCHS}).info.run_id
        if miou is not None:
            client.log_batch(run_id, metrics=[Metric(contract.VAL_MIOU, miou, 1, 200)])
        if kept is not None:
            path = write_predictions(tmp / f"run{i}" / contract.BEST_PREDICTIONS_FILE, kept)
            client.log_artifact(run_id, str(path), contract.PREDICTIONS_ARTIFACT_DIR)
        client.set_terminated(run_id, status)
        runs[(sweep, method, seed)] = run_id
    return {"uri": uri, "client": client, "runs": runs}


def test_the_figure_is_written_logged_and_says_which_methods_have_no_predictions(store, tmp_path):
    result = write_report(store["uri"], "qual", "q-1", tmp_path, log_artifacts=True)
    figure = tmp_path / contract.QUALITATIVE_FIGURE
    assert figure in result.files and imread(figure).ndim == 3
    text = result.markdown
    assert "### Predictions" in text and f"![qualitative]({contract.QUALITATIVE_FIGURE})" in text
    assert "- KD+I2CKD: its best run `KD+I2CKD-s0` logged no predictions." in text
    assert "- IFVD: no finished run." in text
    assert "val items 4, 9" in text and "the teacher" in text
    client, sweep_run = store["client"], store["runs"]["q-1"]
    assert f"{contract.REPORT_ARTIFACT_DIR}/{contract.QUALITATIVE_FIGURE}" in {
        f.path for f in client.list_artifacts(sweep_run, contract.REPORT_ARTIFACT_DIR)}
    images = [f.path for f in client.list_artifacts(sweep_run, "images")]
    assert any(p.startswith(f"images/{contract.QUALITATIVE_IMAGE_KEY}+step+0+") and p.endswith(".png")
               for p in images)
    # logged again (kdray report --log): the next step, so the image slider holds each version once
    write_report(store["uri"], "qual", "q-1", tmp_path / "again", log_artifacts=True)
    steps = sorted(int(p.split("/")[-1].split("+")[2]) for p in logged_images(client, sweep_run,
                                                                              contract.QUALITATIVE_IMAGE_KEY))
    assert steps == [0, 1]


def test_columns_follow_the_method_table_and_take_each_methods_best_run(store):
    data = read_sweep(store["uri"], "qual", "q-1")
    columns = method_columns(data, "last", fetch_predictions(store["uri"]))
    assert [c.label for c in columns] == ["CE", "KD", "KD+I2CKD", "IFVD"]
    kd = columns[1]
    assert kd.run_id == store["runs"][("q-1", "KD", 0)]  # the best KD run (0.62, not 0.58)
    assert [c.problem for c in columns] == [None, None, "its best run `KD+I2CKD-s0` logged no predictions",
                                            "no finished run"]


def test_a_run_that_previewed_other_images_is_not_mixed_in(store, tmp_path):
    runs = store["runs"]
    fetched = {runs[("q-1", "CE", 0)]: predictions(0, False),
               runs[("q-1", "KD", 0)]: predictions(1, True, indices=(1, 2), seed=5),
               runs[("q-1", "KD+I2CKD", 0)]: predictions(2, True)}
    data = read_sweep(store["uri"], "qual", "q-1")
    figure = write_qualitative(data, "last", tmp_path, fetch=fetched.get)
    assert figure.path is not None and figure.notes[0] == (
        "KD: its best run `KD-s0` previewed other images (another split or dataset).")
    assert "the teacher" in figure.markdown  # from KD+I2CKD's file, the images the figure shows
    width = imread(figure.path).shape[1]
    without_teacher = write_qualitative(data, "last", tmp_path / "b", fetch={runs[("q-1", "CE", 0)]:
                                                                          predictions(0, False)}.get)
    assert ("No run of the sweep logged the teacher's predictions of these images: no teacher column."
            in without_teacher.notes)
    assert imread(without_teacher.path).shape[1] < width


def test_the_teacher_column_comes_from_another_run_of_the_sweep_when_no_compared_run_distils(store, tmp_path):
    import pyarrow.compute as pc

    runs = store["runs"]
    fetched = {runs[("q-1", "CE", 0)]: predictions(0, False), runs[("q-1", "KD", 0)]: predictions(1, True),
               runs[("q-1", "KD", 1)]: predictions(2, True)}
    sweep = read_sweep(store["uri"], "qual", "q-1")
    compared = dataclasses.replace(sweep, runs=sweep.runs.filter(pc.equal(sweep.runs.column("method"), "CE")))
    alone = write_qualitative(compared, "last", tmp_path / "a", fetch=fetched.get)
    assert any("no teacher column" in note for note in alone.notes)
    figure = write_qualitative(compared, "last", tmp_path / "b", fetch=fetched.get, sweep=sweep)
    assert "ground truth, the teacher" in figure.markdown and not any("teacher column" in n for n in figure.notes)
    assert imread(figure.path).shape[1] > imread(alone.path).shape[1]


def test_an_unreadable_predictions_file_is_said_with_its_reason(store, tmp_path):
    client, runs = store["client"], store["runs"]
    junk = tmp_path / contract.BEST_PREDICTIONS_FILE
    junk.write_text("not an npz")
    run_id = client.create_run(client.get_experiment_by_name("qual").experiment_id).info.run_id
    client.log_artifact(run_id, str(junk), contract.PREDICTIONS_ARTIFACT_DIR)
    reason = fetch_predictions(store["uri"])(run_id)
    assert isinstance(reason, str) and reason
    data = read_sweep(store["uri"], "qual", "q-1")
    fetched = {runs[("q-1", "CE", 0)]: "not a kdray predictions file", runs[("q-1", "KD", 0)]: predictions(1, True)}
    columns = method_columns(data, "last", fetched.get)
    assert columns[0].problem == ("the predictions its best run `CE-s0` logged cannot be read: not a kdray "
                                  "predictions file")


def test_a_sweep_without_predictions_gets_no_figure_and_says_why(store, tmp_path):
    result = write_report(store["uri"], "qual", "q-2", tmp_path)
    assert not (tmp_path / contract.QUALITATIVE_FIGURE).exists()
    text = result.markdown
    assert "### Predictions" in text and "No figure: no method's best run has predictions to show." in text
    assert "- CE: its best run `CE-s0` logged no predictions." in text
