"""Sweeps on an embedded local Ray (started once for this module): MLflow layout, ablations, failures, resume.

Run inside ../shared/bin/loopback-only on these machines (Ray's servers must listen on loopback only).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdray import contract
from kdray.errors import ResourceError
from kdray.orchestration.sampler import tpe_sampler
from kdray.orchestration.sweep import SweepRequest, run_sweep, summary_table
from kdray.orchestration.tune_setup import pinned_runtime_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo.yaml"
TINY = ["data.crop=[32, 32]", "data.synthetic.image_size=32", "data.synthetic.train_length=64",
        "data.synthetic.val_length=8", "data.batch_size=4", "data.eval_batch_size=8",
        "optim.iterations=4", "optim.eval_interval=2", "optim.log_interval=2", "teacher.width=0.125",
        "teacher.arch=deeplabv3_resnet18", "teacher.iterations=2"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, log_to_driver=False, runtime_env=pinned_runtime_env())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def tiny_except(*keys: str) -> list[str]:
    """TINY without the keys a space sets: an override of those is refused (it would be ignored)."""
    return [o for o in TINY if o.split("=")[0] not in keys]


def write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def children(uri: str, experiment: str, sweep_id: str):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id],
                                      f"tags.`{contract.SWEEP_ID}` = '{sweep_id}' and tags.`{contract.KIND}` = 'trial'")


def test_a_search_under_sync_halving_then_its_confirmation_recorded_in_mlflow(ray_cluster, tmp_path,
                                                                               shows_what_it_learnt):
    """A search of 3 trials, 2 at a time, on a tuning split, under synchronous halving at the first evaluation
    (iteration 2 of 4): the 2 better trials go on (one that reached the rung before the last paused there and
    resumes from its checkpoint), the other ends there (PRUNED in the study). Then the confirmation stage: the
    best configuration and the CE-only student, trained on the whole training split and scored on val, under the
    same parent run. (Trials of two Ray Train workers: the packed sweep's test, tests/test_pack_sweep.py.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "space.yaml", {
        "name": "smoke", "num_samples": 3, "seed": 0, "max_concurrent_trials": 2,
        "scheduler": {"kind": "sync_halving", "grace_period": 1, "reduction_factor": 2},
        "overrides": {"run.workers": 1, "run.cpus_per_worker": 0.9, "run.threads": 1,
                      "data.tune_split.fraction": 0.25},
        "space": {"losses.kd.enabled": True, "losses.kd.weight": {"loguniform": [0.1, 10.0]},
                  "losses.i2ckd.enabled": {"choice": [True, False]}},
        "confirm": {"top_k": 1, "seeds": [0]}})
    request = SweepRequest(str(DEMO), space, [*TINY, f"run.output_dir={tmp_path}/runs",
                                              f"teacher.checkpoint={tmp_path}/teacher.pt"],
                           tracking_uri=uri, train_teacher=True)
    lines = []
    outcome = run_sweep(request, say=lines.append)
    assert outcome.complete and len(outcome.trials) == 5 and outcome.exit_code == 0, summary_table(outcome)
    searched = [t for t in outcome.trials if t.stage == "search"]
    confirmed = [t for t in outcome.trials if t.stage == "confirm"]
    assert len(searched) == 3 and len(confirmed) == 2
    # ranked as the confirmation picks: the longer run first, then the last score, ties by trial id
    assert searched == sorted(searched, key=lambda t: (-t.iteration, -t.last, t.trial_id))
    assert all(t.status == "finished" and t.iteration == 4 for t in confirmed)

    # the halving: 2 promoted (finished; one at least paused at iteration 2 and resumed), 1 stopped there
    state = json.loads(next(outcome.sweep_dir.glob("tune.sync_halving.json")).read_text())
    number = {n: trial for trial, n in state["numbers"].items()}
    promoted = {number[n] for n in state["promoted"][0][2]}
    stopped = {number[n] for n, _ in state["stopped"]}
    assert len(promoted) == 2 and len(stopped) == 1 and not promoted & stopped
    by_id = {t.trial_id: t for t in searched}
    assert all(by_id[t].status == "finished" for t in promoted)
    # a stopped trial ends at the rung, as the scheduler decided (on this tiny job its workers may train on to
    # iteration 4 before the stop reaches them: that is not its record)
    assert all(by_id[t].status == "stopped early" and by_id[t].iteration == 2 for t in stopped)
    best = max((by_id[t] for t in promoted), key=lambda t: (t.iteration, t.last)).trial_id  # furthest, then score
    assert sorted((t.label, t.seed) for t in confirmed) == [(f"Search #1 ({best})", 0), ("Student (CE)", 0)]
    assert "| rank | stage | trial |" in summary_table(outcome) and "| scored on |" in summary_table(outcome)
    assert any(line.startswith("confirmation: Student (CE), Search #1") for line in lines)
    # "Winner", or "Best searched configuration" when the CE student beats it (4 iterations decide nothing)
    assert outcome.verdict and outcome.verdict.startswith((f"Winner: Search #1 ({best})",
                                                           f"Best searched configuration: Search #1 ({best})"))
    assert "Search summary (confirmed)" in outcome.report_markdown

    client, runs = children(uri, "demo", outcome.sweep_id)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[contract.KIND] == "sweep"
    storage = f"sqlite:///{outcome.sweep_dir / 'optuna.db'}"  # the study persists in the sweep's folder
    assert parent.data.tags[contract.STUDY_STORAGE] == storage
    study = optuna.load_study(study_name=f"sweep-{outcome.sweep_id}", storage=storage)
    # the study has the scheduler's decisions: the one it stopped is PRUNED (even if its workers outran the stop)
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert parent.data.tags[contract.STUDY_STATES] == "COMPLETE=2 PRUNED=1"
    assert parent.data.tags[f"{contract.SAMPLER_TAG_PREFIX}name"] == "TPESampler"
    assert parent.data.tags[f"{contract.SAMPLER_TAG_PREFIX}constant_liar"] == "False"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "config")} == {"config/job.yaml",
                                                                                    "config/space.yaml"}
    reported = {a.path for a in client.list_artifacts(parent.info.run_id, contract.REPORT_ARTIFACT_DIR)}
    assert {"report/report.md", "report/miou_vs_iteration.png", "report/pareto.png"} <= reported
    assert parent.data.tags[contract.TRIALS_PLANNED] == "5"
    assert len(runs) == 5 and len({r.data.tags[contract.TRIAL_ID] for r in runs}) == 5
    digests = set()
    for run in runs:
        tags, trial = run.data.tags, run.data.tags[contract.TRIAL_ID]
        assert tags[contract.PARENT] == outcome.parent_run_id
        assert run.data.params["run.workers"] == "1"
        # its description, its searched knobs and its data (the active config only: no disabled loss's options)
        assert f"of [sweep {outcome.sweep_id}]" in tags[contract.NOTE] and tags[contract.SEARCHED]
        assert {i.dataset.name for i in run.inputs.dataset_inputs} <= {
            "synthetic/train", "synthetic/val", "synthetic/train (minus tune split)", "synthetic/train (tune split)"}
        assert len(run.inputs.dataset_inputs) == 2
        if run.data.params["losses.i2ckd.enabled"] == "False":
            assert "losses.i2ckd.weight" not in run.data.params
        steps = [m.step for m in client.get_metric_history(run.info.run_id, contract.VAL_MIOU)]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == \
            ["checkpoints/best_student.pt"]
        # what the trial cost: the student's size, FLOPs and latency, training's time, memory and teacher share
        distils = tags[contract.METHOD] != "CE"  # only a run with a teacher has its share of the step
        costs = set(contract.COST_METRICS) - ({contract.TRAIN_TEACHER_SHARE} if not distils else set())
        assert costs <= set(run.data.metrics) and tags[contract.COST_DEVICE] == "cpu, amp none"
        assert (contract.TRAIN_TEACHER_SHARE in run.data.metrics) == distils
        if tags[contract.STAGE] == "search":  # selected on the tuning split: 16 of the 64 training images
            assert tags[contract.METHOD] in {"KD", "KD+I2CKD"} and "losses.kd.weight" in run.data.params
            assert tags[contract.EVAL_SPLIT] == "tune" and tags[contract.TUNE_SPLIT_SIZE] == "16"
            assert run.data.params["data.tune_split.fraction"] == "0.25"
            digests.add(tags[contract.TUNE_SPLIT_DIGEST])
            assert client.get_metric_history(run.info.run_id, "train/loss/kd")
            if trial in promoted:  # (a trial that outran its pause to iteration 4 evaluates it again after it)
                assert run.info.status == "FINISHED" and sorted(set(steps)) == [2, 4]
            if trial in stopped:
                assert tags.get(contract.RESUMED_FROM) is None  # the stopped never came back
                assert run.info.status == "FINISHED" and tags[contract.STOPPED_EARLY] == "true"
                assert tags[contract.STOPPED_AT] == "2" and "Stopped early by the scheduler" in tags[contract.NOTE]
        else:  # confirmed on val, trained on the whole training split
            assert run.info.status == "FINISHED" and steps == [2, 4]
            shows_what_it_learnt(client, run, steps)  # its previews, best predictions and model, from the worker
            assert tags[contract.STAGE] == "confirm" and tags[contract.EVAL_SPLIT] == "val"
            assert run.data.params["data.tune_split.fraction"] == "0.0"
            if tags[contract.ROW] == "Student (CE)":
                assert tags[contract.METHOD] == "CE" and contract.CONFIRMS not in tags
            else:
                assert tags[contract.CONFIRMS] == best and tags[contract.SEARCH_RANK] == "1"
                assert float(tags[contract.SEARCH_SCORE]) == pytest.approx(by_id[best].last)
    resumed = [r.data.tags.get(contract.RESUMED_FROM) for r in runs if r.data.tags[contract.TRIAL_ID] in promoted]
    assert "2" in resumed  # a promoted trial paused at the rung and restarted from its checkpoint there
    assert len(digests) == 1  # every search trial held out the same images
    teachers = client.search_runs([parent.info.experiment_id], f"tags.`{contract.KIND}` = 'teacher'")
    assert len(teachers) == 1 and teachers[0].info.status == "FINISHED"  # trained once, as its own run
    assert contract.PARENT not in teachers[0].data.tags  # beside the sweep's run, not under it: linked
    assert teachers[0].data.tags[contract.TRAINED_FOR_SWEEP] == outcome.sweep_id
    # the sweep's run: its best trial (a confirmation one: scored on val), its plan and its report
    assert parent.data.tags[contract.BEST_RUN] in {r.info.run_id for r in runs if r.data.tags[contract.STAGE] ==
                                                   "confirm"}
    assert contract.VAL_BEST_MIOU in parent.data.metrics and "**Best trial**" in parent.data.tags[contract.NOTE]
    assert f"Report: `{outcome.sweep_dir / 'report'}`" in parent.data.tags[contract.NOTE]
    assert client.get_experiment(parent.info.experiment_id).tags[contract.EXPERIMENT_KIND] == \
        contract.EXPERIMENT_KIND_TRAINING
    # alone, with the job's own resources: the space's overrides size the trials that share the machine
    assert (teachers[0].data.params["run.workers"], teachers[0].data.params["run.threads"]) == ("1", "2")
    assert Path(tmp_path / "teacher.pt").is_file()


def test_trials_asha_stops_are_pruned_in_the_study_complete_ones_complete(ray_cluster, tmp_path):
    """Through Tune itself (a trainable reporting x · iteration, ASHA halving from iteration 2, two trials at a
    time): the trials ASHA stopped end PRUNED in the Optuna study with the evaluations they reached as
    intermediate values, those that ran to iteration 8 COMPLETE with their last score."""
    from functools import partial

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from kdray.orchestration.search import KdraySearch
    from kdray.space import Dimension, sample_config

    def reports_x_times_iteration(config):  # a local function: Ray ships it by value to its workers
        for iteration in (2, 4, 6, 8):
            tune.report({contract.VAL_MIOU: config["x"] * iteration, contract.ITERATION: iteration,
                         contract.ITERATIONS_TOTAL: 8})

    space = partial(sample_config, dimensions=(Dimension("x", "uniform", (0.0, 1.0)),))
    search = KdraySearch(space=space, metric=contract.VAL_MIOU, mode="max", seed=0)
    scheduler = ASHAScheduler(time_attr=contract.ITERATION, max_t=8, grace_period=2, reduction_factor=2)
    config = tune.TuneConfig(metric=contract.VAL_MIOU, mode="max", search_alg=search, scheduler=scheduler,
                             num_samples=8, max_concurrent_trials=2)
    tune.Tuner(reports_x_times_iteration, tune_config=config,
               run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    trials = search._ot_study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert len(trials) == 8 and set(states) == {"COMPLETE", "PRUNED"}
    for trial in trials:
        x, steps = trial.params["x"], sorted(trial.intermediate_values)
        assert all(trial.intermediate_values[s] == pytest.approx(x * s) for s in steps)
        if trial.state.name == "COMPLETE":
            assert steps == [2, 4, 6, 8] and trial.value == pytest.approx(8 * x)
        else:
            assert steps and steps[-1] < 8
    assert search.trial_states() == {"COMPLETE": states.count("COMPLETE"), "PRUNED": states.count("PRUNED")}


@pytest.mark.long
def test_a_search_over_two_objectives_tells_the_study_both(ray_cluster, tmp_path, teacher_file):
    """mIoU against the student's size, its width searched: Tune ranks by the first objective, the study (two
    directions) is told both values of each trial, and the summary shows the second. Every trial runs under a
    time budget (optim.time_budget_s) it spends in its first iteration: it ends there, complete."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "pareto.yaml", {
        "name": "pareto", "num_samples": 2, "seed": 0, "max_concurrent_trials": 2, "confirm": False,
        "objectives": [{"metric": "val/miou", "mode": "max"}, {"metric": "student/params", "mode": "min"}],
        "overrides": {"run.cpus_per_worker": 0.9, "run.threads": 1, "optim.time_budget_s": 1.0e-6},
        "space": {"student.width": {"choice": [0.0625, 0.125]}, "losses.kd.enabled": True,
                  "losses.kd.weight": {"loguniform": [0.1, 10.0]}}})
    request = SweepRequest(str(DEMO), space, [*TINY, f"run.output_dir={tmp_path}/runs",
                                              f"teacher.checkpoint={teacher_file}"], tracking_uri=uri)
    outcome = run_sweep(request, say=lambda *_: None)
    assert outcome.complete and outcome.exit_code == 0 and len(outcome.trials) == 3, summary_table(outcome)
    assert "student/params" in summary_table(outcome).splitlines()[0]
    study = optuna.load_study(study_name=f"sweep-{outcome.sweep_id}",
                              storage=f"sqlite:///{outcome.sweep_dir / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    client, runs = children(uri, "demo", outcome.sweep_id)
    params = {float(r.data.params["student.width"]): r.data.metrics[contract.STUDENT_PARAMS] for r in runs
              if r.data.tags[contract.STAGE] == "search"}
    for trial in study.trials:
        miou, size = trial.values
        assert size == params[trial.params["student.width"]] and 0 <= miou <= 1
    # the time budget ended each trial after its first iteration, evaluated there: finished, not stopped early
    assert [(t.status, t.iteration) for t in outcome.trials] == [("finished", 1)] * 3
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[contract.TIME_BUDGET_STOP] == "1"
        assert [m.step for m in client.get_metric_history(run.info.run_id, contract.VAL_MIOU)] == [1]


def test_an_ablation_row_that_diverges_fails_alone_and_fails_the_sweep(ray_cluster, tmp_path, teacher_file,
                                                                       monkeypatch):
    """Rows × seeds on Ray (one seed here: the plan's product is tests/test_space.py's): the CE row finishes, the
    diverging row's trial fails with the term and iteration, the sweep's run is FAILED with the count and exits 1;
    the given teacher is scored once for the tables; the matched CE row was timed."""
    monkeypatch.chdir(tmp_path)  # relative paths in the job resolve here, not in Tune's trial directories
    shutil.copyfile(teacher_file, tmp_path / "teacher.pt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "ablation.yaml", {
        "name": "abl", "seeds": [0], "max_concurrent_trials": 2,
        "overrides": {"run.cpus_per_worker": 0.9, "run.threads": 1},
        # a distilling row (the teacher is then scored and recorded) that diverges
        "rows": [{"name": "Student (CE)"},
                 {"name": "diverges", "set": {"losses.kd.enabled": True, "optim.lr": 1.0e30, "optim.momentum": 0.0}}],
        # at equal device-seconds: the CE row's own (its 4 iterations); the diverging row cannot be timed
        "match": {"row": "Student (CE)", "measure": {"iterations": 2, "warmup": 1}}})
    request = SweepRequest(str(DEMO), space, [*TINY, "run.output_dir=runs", "teacher.checkpoint=teacher.pt"],
                           tracking_uri=uri)
    lines = []
    outcome = run_sweep(request, say=lines.append)
    assert outcome.complete and len(outcome.trials) == 2
    assert any(line.startswith("equal device-seconds: ") for line in lines), lines
    assert any(line.startswith("  row 'diverges': not timed (loss term") for line in lines), lines
    client, runs = children(uri, "demo", outcome.sweep_id)
    combos = sorted((r.data.tags[contract.ROW], r.data.tags[contract.SEED]) for r in runs)
    assert {r.data.tags[contract.ROW]: r.data.tags[contract.ROW_INDEX] for r in runs} == \
        {"Student (CE)": "0", "diverges": "1"}
    assert "Student (CE)" in outcome.report_markdown and "diverges" in outcome.report_markdown
    # the given (untracked) teacher was scored once and recorded, so the tables have their teacher row
    teachers = client.search_runs([runs[0].info.experiment_id], f"tags.`{contract.KIND}` = 'teacher'")
    assert len(teachers) == 1
    assert teachers[0].data.tags[contract.TEACHER_CHECKPOINT] == str((tmp_path / "teacher.pt").resolve())
    assert 0 <= teachers[0].data.metrics[contract.VAL_MIOU] <= 1
    assert "Teacher" in outcome.report_markdown
    assert combos == [("Student (CE)", "0"), ("diverges", "0")]
    for run in runs:
        if run.data.tags[contract.ROW] == "diverges":
            assert run.info.status == "FAILED"
            assert "is nan at iteration" in run.data.tags[contract.FAILURE] or \
                "is inf at iteration" in run.data.tags[contract.FAILURE]
        else:
            assert run.info.status == "FINISHED"
    failed = [t for t in outcome.trials if t.status.startswith("failed")]
    assert len(failed) == 1 and all("at iteration" in t.status for t in failed)
    # failed trials make the sweep's outcome a failure too: exit code 1, its run FAILED with the count
    assert outcome.exit_code == 1 and outcome.counts() == "1 finished, 1 failed"
    sweep_run = client.get_run(outcome.parent_run_id)
    assert sweep_run.info.status == "FAILED" and sweep_run.data.tags[contract.FAILURE] == "1 finished, 1 failed"
    matched = {m["row"]: m for m in json.loads(sweep_run.data.tags[contract.MATCH])}
    assert matched["Student (CE)"]["iterations"] == 4 and matched["Student (CE)"]["s_per_iteration"] > 0
    assert "at iteration" in matched["diverges"]["unmeasured"]
    assert {r.data.params["optim.iterations"] for r in runs} == {"4"}


def test_a_gpu_request_on_a_cpu_cluster_fails_fast(ray_cluster, tmp_path, teacher_file):
    space = write(tmp_path / "s.yaml", {"rows": [{"name": "CE"}]})
    request = SweepRequest(str(DEMO), space, [*TINY, "run.gpus_per_worker=1", f"run.output_dir={tmp_path}/runs",
                                              f"teacher.checkpoint={teacher_file}"],
                           tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    t0 = time.perf_counter()
    with pytest.raises(ResourceError, match="asks for 1 GPU.*the cluster has 0"):
        run_sweep(request, say=lambda *_: None)
    assert time.perf_counter() - t0 < 30


def _interrupt_after_a_finished_trial(args: list[str], tmp_path: Path, uri: str):
    """Start the sweep command `args`, press Ctrl+C once a trial has finished, check it exits 130; returns the
    MLflow client, the experiment and the command's output."""
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                              start_new_session=True)
    client = MlflowClient(uri)
    deadline = time.time() + 240
    finished, exp = [], None
    while time.time() < deadline and not finished and driver.poll() is None:
        time.sleep(1)
        try:
            exp = client.get_experiment_by_name("demo")
            if exp is not None:
                finished = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED' and "
                                              f"tags.`{contract.KIND}` = 'trial'")
        except Exception:  # the database is still being created by the driver
            pass
    assert finished, "no trial finished in time"
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl+C: Tune saves its state and returns
    out, _ = driver.communicate(timeout=120)
    assert driver.returncode == 130, out[-3000:]
    return client, exp, out


@pytest.mark.long
def test_a_sweep_its_time_budget_stops_resumes_with_every_trial_exactly_once(ray_cluster, tmp_path, teacher_file,
                                                                             monkeypatch):
    """`sweep.time_budget_s` stops the sweep as Ctrl+C does (the SIGINT path itself is the search-resume test's):
    here the budget's clock runs out once the first trial reported its first evaluation, so that trial is cut
    mid-run, the CE-only row the sweep added never starts, and the sweep exits 4. `--resume` then runs both to
    their end, the cut one from its checkpoint, each once."""
    import threading

    from kdray.orchestration import budget

    reported = threading.Event()
    real = budget.start_budget
    monkeypatch.setattr(budget, "start_budget", lambda s, clock=None: real(s, lambda: 1e9 if reported.is_set() else 0))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "ablation.yaml", {
        "name": "resume", "seeds": [0], "max_concurrent_trials": 1,
        "overrides": {"run.cpus_per_worker": 0.9, "run.threads": 1, "optim.iterations": 8,
                      "optim.eval_interval": 2},
        "rows": [{"name": "+KD", "set": {"losses.kd.enabled": True}}]})
    lines = []

    def say(line):
        lines.append(line)
        if "iteration 2/8" in line:
            reported.set()

    request = SweepRequest(str(DEMO), space, [*tiny_except("optim.iterations", "optim.eval_interval"),
                                              f"run.output_dir={tmp_path}/runs", f"teacher.checkpoint={teacher_file}",
                                              "sweep.time_budget_s=3600"], tracking_uri=uri)
    outcome = run_sweep(request, say=say)
    out = "\n".join(lines)
    assert outcome.interrupted and outcome.budget_spent and outcome.exit_code == 4, out[-3000:]
    assert any(line.startswith("sweep stopped: its time budget of 3600 s spent") and "--resume" in line
               for line in lines), out[-3000:]
    assert "no CE-only row: the sweep adds 'Student (CE)' first" in out
    # the summary never calls a trial finished that did not run every iteration
    statuses = [t.status for t in outcome.trials] + ["not started"] * outcome.never_created  # (Tune made it or not)
    assert sorted(statuses) == ["interrupted", "not started"], summary_table(outcome)
    client, exp = MlflowClient(uri), MlflowClient(uri).get_experiment_by_name("demo")
    # no run is left RUNNING, the sweep's own included; the cut-short ones are KILLED, to be reopened
    everything = client.search_runs([exp.experiment_id], "")
    assert not [r.info.run_name for r in everything if r.info.status == "RUNNING"], out[-3000:]
    before = client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'trial'")
    assert 1 <= len(before) <= 2 and all(r.info.status in ("KILLED", "FAILED") for r in before)

    sweep_dir = outcome.sweep_dir
    reported.clear()
    resumed = run_sweep(SweepRequest(str(DEMO), space, tracking_uri=uri, resume=str(sweep_dir)),
                        say=lambda *_: None)
    assert resumed.complete and resumed.exit_code == 0, summary_table(resumed)
    assert [t.status for t in resumed.trials] == ["finished"] * 2
    sweep_run = client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'sweep'")[0]
    assert sweep_run.info.status == "FINISHED" and contract.FAILURE not in sweep_run.data.tags
    after = client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'trial'")
    assert len(after) == 2, [(r.data.tags[contract.TRIAL_ID], r.info.status) for r in after]
    assert sorted((r.data.tags[contract.ROW], r.data.tags[contract.SEED]) for r in after) == \
        [("+KD", "0"), ("Student (CE)", "0")]
    assert all(r.info.status == "FINISHED" for r in after)
    for run in after:  # a resumed trial continued its own run: one history, no repeated steps
        steps = [m.step for m in client.get_metric_history(run.info.run_id, contract.VAL_MIOU)]
        assert sorted(set(steps)) == [2, 4, 6, 8], steps
    cut_id = next(t.trial_id for t in outcome.trials if t.status == "interrupted")
    cut = next(r for r in after if r.data.tags[contract.TRIAL_ID] == cut_id)
    assert cut.data.tags.get(contract.RESUMED_FROM) in ("2", "4", "6"), cut.data.tags  # from its checkpoint
    print(f"MLflow trial runs: {len(before)} before the resume, {len(after)} after")


@pytest.mark.long
def test_an_interrupted_search_resumes_its_study_and_extends_it(ray_cluster, tmp_path, teacher_file):
    """A search cut by Ctrl+C after its first finished trial and resumed: the study (in the sweep's optuna.db)
    goes on where it stopped, so the sweep's trials are the seed's first three proposals, each once, as an
    uninterrupted sweep's would be (a fresh study would propose the first one again). Then `--extend 1` adds a
    new trial from the same study under the same parent run, and no run twice."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "search.yaml", {
        "name": "resume-search", "num_samples": 3, "seed": 0, "max_concurrent_trials": 1,
        "overrides": {"run.cpus_per_worker": 0.9, "run.threads": 1, "optim.iterations": 4,
                      "optim.eval_interval": 2},
        "space": {"losses.kd.enabled": True, "losses.kd.weight": {"loguniform": [0.1, 10.0]}}})
    args = [sys.executable, "-m", "kdray.sweep", "--job", str(DEMO), "--space", space, "--address", ray_cluster,
            "--tracking-uri", uri, *tiny_except("optim.iterations", "optim.eval_interval"),
            f"run.output_dir={tmp_path}/runs", f"teacher.checkpoint={teacher_file}"]
    client, exp, out = _interrupt_after_a_finished_trial(args, tmp_path, uri)
    sweep_dir = next((tmp_path / "runs" / "demo" / "sweeps").glob("sweep-*"))

    outcome = run_sweep(SweepRequest(str(DEMO), space, tracking_uri=uri, resume=str(sweep_dir)),
                        say=lambda *_: None)
    assert outcome.complete and [t.status for t in outcome.trials] == ["finished"] * 4, summary_table(outcome)
    assert [t.stage for t in outcome.trials] == ["search"] * 3 + ["confirm"]  # and the CE-only baseline, once
    runs = client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'trial'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    searched = [r for r in runs if r.data.tags[contract.STAGE] == "search"]
    assert [r.data.tags[contract.METHOD] for r in runs if r not in searched] == ["CE"]
    weights = sorted(round(float(r.data.params["losses.kd.weight"]), 6) for r in searched)

    fresh = optuna.create_study(direction="maximize", sampler=tpe_sampler(0))
    expected = []
    for _ in range(3):  # the start-up proposals do not depend on the scores told
        trial = fresh.ask()
        expected.append(round(trial.suggest_float("losses.kd.weight", 0.1, 10.0, log=True), 6))
        fresh.tell(trial, 0.0)
    assert weights == sorted(expected)
    study = optuna.load_study(study_name=f"sweep-{outcome.sweep_id}", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3

    said: list[str] = []
    extended = run_sweep(SweepRequest(str(DEMO), space, tracking_uri=uri, resume=str(sweep_dir), extend=1),
                         say=said.append)
    assert extended.complete and extended.exit_code == 0 and extended.parent_run_id == outcome.parent_run_id
    # every search trial, ranked together, then the CE-only baseline (no confirm: nothing more to confirm)
    assert [t.stage for t in extended.trials] == ["search"] * 4 + ["confirm"], summary_table(extended)
    # the stages it starts with
    assert "  search (extension 1), folder tune-extend1/: 1 trial(s), sampler seed 1, no point first, to run" in said
    runs = client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'trial'")
    assert len(runs) == 5 and len({r.data.tags[contract.TRIAL_ID] for r in runs}) == 5  # nothing run twice
    assert {r.data.tags[contract.PARENT] for r in runs} == {outcome.parent_run_id}
    assert len(client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'sweep'")) == 1
    new = sorted(round(float(r.data.params["losses.kd.weight"]), 6) for r in runs
                 if r.data.tags[contract.STAGE] == "search")
    assert len(set(new)) == 4 and set(weights) < set(new)  # a new configuration, sampled from the same study
    study = optuna.load_study(study_name=f"sweep-{outcome.sweep_id}", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert client.get_run(outcome.parent_run_id).data.tags[contract.TRIALS_PLANNED] == "5"


class _Trial:
    def __init__(self, trial_id, last_result, error=None):
        self.trial_id, self.last_result, self._error = trial_id, last_result, error

    def get_error(self):
        return self._error


def test_status_callback_marks_stopped_and_failed_runs(tmp_path):
    from kdray.orchestration.tracking import Tracker
    from kdray.orchestration.trial import MlflowStatusCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "cb")
    ids = {t: tracker.trial_run("s1", t, "p", t, {}, {}) for t in ("a", "b", "c")}
    callback = MlflowStatusCallback(uri, "cb", "s1")
    callback.on_trial_complete(0, [], _Trial("a", {"iteration": 10, "iterations_total": 10}))
    callback.on_trial_complete(0, [], _Trial("b", {"iteration": 4, "iterations_total": 10}))
    callback.on_trial_error(0, [], _Trial("c", {}, RuntimeError("Traceback...\nValueError: out of memory")))
    assert tracker.status(ids["a"]) == "FINISHED"
    # stopped early ends FINISHED, the stop tagged and said (FAILED stays the failures')
    assert tracker.status(ids["b"]) == "FINISHED" and tracker.tags(ids["b"])[contract.STOPPED_EARLY] == "true"
    assert "Stopped early by the scheduler at iteration 4 of 10" in tracker.tags(ids["b"])[contract.NOTE]
    assert tracker.status(ids["c"]) == "FAILED"
    assert tracker.tags(ids["c"])[contract.FAILURE] == "ValueError: out of memory"
    assert tracker.tags(ids["c"])[contract.NOTE] == "Failed: ValueError: out of memory"
    # the same trial id again (a restored trial) continues its run instead of creating a second one
    assert tracker.trial_run("s1", "b", "p", "b", {}, {}) == ids["b"]


def _train_worker_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "RayTrainWorker" in line and "ps -eo" not in line]


@pytest.mark.long
def test_a_worker_killed_mid_trial_restarts_from_its_checkpoint(ray_cluster, tmp_path, teacher_file):
    import threading

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = write(tmp_path / "one.yaml", {
        "name": "chaos", "seeds": [0],
        "overrides": {"run.workers": 2, "run.cpus_per_worker": 0.45, "run.threads": 1, "optim.iterations": 16,
                      "optim.eval_interval": 2},
        "rows": [{"name": "Student (CE)"}]})  # a CE-only row: the sweep adds no baseline, one trial runs
    request = SweepRequest(str(DEMO), space, [*tiny_except("optim.iterations", "optim.eval_interval"),
                                              f"run.output_dir={tmp_path}/runs", f"teacher.checkpoint={teacher_file}"],
                           tracking_uri=uri)
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("o", run_sweep(request, say=lambda *_: None)))
    thread.start()
    client, killed, deadline = MlflowClient(uri), None, time.time() + 240
    while killed is None and time.time() < deadline and thread.is_alive():
        time.sleep(0.5)
        try:
            exp = client.get_experiment_by_name("demo")
            runs = client.search_runs([exp.experiment_id], f"tags.`{contract.KIND}` = 'trial'") if exp else []
            steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, contract.VAL_MIOU)] if runs else []
        except Exception:  # the store is still being set up
            continue
        pids = _train_worker_pids()
        # kill once a few checkpoints were reported (Train registers them a moment after the report)
        if steps and max(steps) >= 6 and pids:
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
    assert killed is not None, "the trial never reached its first checkpoint"
    thread.join(timeout=300)
    result = outcome["o"]
    assert result.complete and [t.status for t in result.trials] == ["finished"]
    _, runs = children(uri, "demo", result.sweep_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run: the restart continued it
    assert int(runs[0].data.tags[contract.RESUMED_FROM]) >= 2  # the new worker group resumed from a checkpoint
    # iterations after the resumed checkpoint are evaluated twice (before and after the restart)
    steps = sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, contract.VAL_MIOU)})
    assert steps == list(range(2, 17, 2))


@pytest.mark.long
def test_a_loss_from_a_plugin_file_outside_the_package_runs_in_a_smoke_sweep(ray_cluster, tmp_path, teacher_file,
                                                                             monkeypatch):
    """A trial of a loss defined in the user's own file (and the CE baseline): its option comes from the space,
    the trial trains with it and logs its term. The file is moved away once the driver has read it, as on a cluster
    node that never had it: the trials import the text shipped with them."""
    monkeypatch.chdir(tmp_path)
    plugin = tmp_path / "my_method" / "scaled_l2.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "from dataclasses import dataclass\n"
        "from torch import nn\n"
        "from kdray.losses import STUDENT_LOGITS, TEACHER_LOGITS, LossConfig, option, register_loss\n\n\n"
        "@dataclass\nclass ScaledL2Config(LossConfig):\n    scale: float = option(1.0, above=0)\n\n\n"
        "@register_loss('scaled_l2', config=ScaledL2Config, label='SL2',\n"
        "               reads={'student_logits': STUDENT_LOGITS, 'teacher_logits': TEACHER_LOGITS})\n"
        "class ScaledL2(nn.Module):\n"
        "    def __init__(self, scale=1.0):\n        super().__init__()\n        self.scale = scale\n\n"
        "    def forward(self, student_logits, teacher_logits):\n"
        "        return self.scale * (student_logits - teacher_logits.detach()).float().square().mean()\n")
    space = write(tmp_path / "plugin_space.yaml", {
        "name": "plugin", "seeds": [0],
        "rows": [{"name": "SL2 x3", "set": {"losses.scaled_l2.enabled": True, "losses.scaled_l2.scale": 3.0}}]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shutil.copyfile(teacher_file, tmp_path / "teacher.pt")
    request = SweepRequest(str(DEMO), space, [*TINY, "run.output_dir=runs", "teacher.checkpoint=teacher.pt",
                                              f"plugins=[{plugin.relative_to(tmp_path)}]"],
                           tracking_uri=uri, smoke_test=True)
    moved = []

    def say(*_):
        if not moved:  # the driver has the plan, the plugin is imported: the trials must not need the file
            plugin.rename(tmp_path / "elsewhere.py")
            moved.append(True)

    try:
        outcome = run_sweep(request, say=say)
    finally:
        from kdray.losses import LOSSES

        LOSSES.pop("scaled_l2", None)
    assert moved and not plugin.exists()
    assert outcome.complete and outcome.exit_code == 0, [t.status for t in outcome.trials]
    client, runs = children(uri, "demo", outcome.sweep_id)
    assert sorted(r.data.tags[contract.ROW] for r in runs) == ["SL2 x3", "Student (CE)"]  # and the baseline
    assert [r.data.params["losses.scaled_l2.scale"] for r in runs if r.data.tags[contract.ROW] == "SL2 x3"] == ["3.0"]
    for run in runs:
        assert run.info.status == "FINISHED"
        if run.data.tags[contract.ROW] == "Student (CE)":
            assert run.data.tags[contract.METHOD] == "CE"
            continue
        assert run.data.tags[contract.METHOD] == "SL2"
        assert run.data.tags[contract.FORMULA] == "Loss = 1 * CE + 1 * SL2"
        assert "train/loss/scaled_l2" in run.data.metrics
