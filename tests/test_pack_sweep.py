"""Trial packs in a sweep (`pack_size`): the space's checks, the packs a grid makes, the halving inside a pack
against a naive reference, Optuna proposing a pack's members together, the members' MLflow statuses, and one packed
search end to end on an embedded Ray.

The last test starts Ray: run it inside ../shared/bin/loopback-only on these machines.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import optuna
import pytest
import yaml

from kdray import contract
from kdray.config import load_job
from kdray.errors import ConfigError
from kdray.orchestration.pack import (
    COMPLETE,
    FAILED,
    PACK_KEY,
    STATE,
    STOPPED,
    PackHalving,
    PackSearch,
    grid_packs,
    member_id,
    member_key,
    member_result,
    pack_count,
    pack_lines,
)
from kdray.space import ROW_KEY, SEED_KEY, Dimension, load_space, sample_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo.yaml"


def space_file(tmp_path, data):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


SEARCH = {"name": "packed", "num_samples": 7, "pack_size": 3,
          "space": {"losses.kd.enabled": True, "losses.kd.weight": {"loguniform": [0.1, 10.0]}}}
ABLATION = {"name": "rows", "seeds": [0, 1], "pack_size": 2,
            "rows": [{"name": "CE"}, {"name": "+KD", "set": {"losses.kd.enabled": True}},
                     {"name": "+I2CKD", "set": {"losses.kd.enabled": True, "losses.i2ckd.enabled": True}}]}


# --- the space --------------------------------------------------------------------------------------------------

def test_a_packed_search_and_ablation_load_and_say_their_packs(tmp_path):
    job = load_job(DEMO)
    search = load_space(space_file(tmp_path, SEARCH), job)
    assert (search.pack_size, pack_count(search)) == (3, 3)  # 7 members: 3 + 3 + 1
    assert "7 trial(s) in 3 pack(s)" in pack_lines(search)[0]
    ablation = load_space(space_file(tmp_path, ABLATION), job)
    packs = grid_packs(ablation)
    assert packs == [[{ROW_KEY: "CE", SEED_KEY: 0}, {ROW_KEY: "+KD", SEED_KEY: 0}], [{ROW_KEY: "+I2CKD", SEED_KEY: 0}],
                     [{ROW_KEY: "CE", SEED_KEY: 1}, {ROW_KEY: "+KD", SEED_KEY: 1}], [{ROW_KEY: "+I2CKD", SEED_KEY: 1}]]
    assert pack_count(ablation) == 4
    assert pack_lines(ablation)[2:] == ["    pack 1: seed 0: CE, +KD", "    pack 2: seed 0: +I2CKD",
                                        "    pack 3: seed 1: CE, +KD", "    pack 4: seed 1: +I2CKD"]


@pytest.mark.parametrize("change, message", [
    ({"pack_size": 0}, "pack_size: got 0; expected an integer >= 1"),
    ({"pack_size": True}, "pack_size: got True; expected an integer >= 1"),
    ({"space": {**SEARCH["space"], "student.width": {"choice": [0.125, 0.25]}}},
     "space.student.width: searched, but the trials of one pack (pack_size 3) share data, seed, student, schedule "
     "and teacher and differ in losses.* keys only"),
    ({"space": {**SEARCH["space"], "optim.lr": {"uniform": [0.01, 0.1]}}}, "space.optim.lr: searched, but"),
])
def test_a_search_packs_only_what_differs_in_losses(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        load_space(space_file(tmp_path, {**SEARCH, **change}), load_job(DEMO))
    fixed = {**SEARCH, "space": {**SEARCH["space"], "student.width": 0.25}}  # a fixed key is every member's
    assert load_space(space_file(tmp_path, fixed), load_job(DEMO)).pack_size == 3


def test_an_ablation_packs_only_rows_that_differ_in_losses(tmp_path):
    rows = [*ABLATION["rows"], {"name": "wide", "set": {"student.width": 0.25}}]
    with pytest.raises(ConfigError, match=r"rows\[3\] \(wide\)\.set\.student\.width: set by a row, but"):
        load_space(space_file(tmp_path, {**ABLATION, "rows": rows}), load_job(DEMO))
    with pytest.raises(ConfigError, match="match: each row trains for its own iterations"):
        load_space(space_file(tmp_path, {**ABLATION, "match": {"row": "+KD"}}), load_job(DEMO))


# --- the halving inside a pack ------------------------------------------------------------------------------------

@dataclass
class FakeEvaluation:
    iteration: int
    miou: float
    extra: dict = field(default_factory=dict)

    def tune_metrics(self):
        return {contract.ITERATION: self.iteration, contract.VAL_MIOU: self.miou, **self.extra}


def naive_halving(scores, rungs, eta):
    """For each rung in turn: the survivors ranked by score (highest first, NaN last, lower index first on ties),
    the first ceil(n / eta) kept. Returns {rung: the indices stopped there}."""
    alive = sorted(scores)
    out = {}
    for rung in rungs:
        def worse(a, b, rung=rung):
            sa, sb = scores[a][rung], scores[b][rung]
            if math.isnan(sa) != math.isnan(sb):
                return math.isnan(sa)
            if not math.isnan(sa) and sa != sb:
                return sa < sb
            return a > b
        ranked = list(alive)
        for i in range(len(ranked)):  # a bubble sort: no shared code with the implementation
            for j in range(len(ranked) - 1 - i):
                if worse(ranked[j], ranked[j + 1]):
                    ranked[j], ranked[j + 1] = ranked[j + 1], ranked[j]
        keep = -(-len(ranked) // eta)
        out[rung] = set(ranked[keep:])
        alive = ranked[:keep]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_pack_halving_stops_whom_a_naive_reference_stops(seed):
    rng = random.Random(seed)
    k, eta, interval = rng.randint(2, 9), rng.choice([2, 3]), 10
    rungs = [r for r in (interval * eta ** n for n in range(5)) if r < 50]  # max_t 50: 10, 20, 40 or 10, 30
    scores = {i: {t: rng.choice([rng.random(), rng.random(), 0.5, float("nan")]) for t in range(10, 51, 10)}
              for i in range(k)}
    expected = naive_halving(scores, rungs, eta)
    halving = PackHalving(contract.VAL_MIOU, "max", grace_period=interval, reduction_factor=eta, max_t=50)
    alive = set(range(k))
    for t in range(10, 51, 10):
        stopped = halving({i: FakeEvaluation(t, scores[i][t]) for i in sorted(alive)})
        assert stopped == expected.get(t, set()), (t, scores)
        alive -= stopped
    # resumed past its first rung, a pack does not decide that rung again
    resumed = PackHalving(contract.VAL_MIOU, "max", grace_period=interval, reduction_factor=eta, max_t=50,
                          start=rungs[0])
    assert resumed({i: FakeEvaluation(rungs[0], 0.1 * i) for i in range(k)}) == set()


def test_the_pack_halving_ranks_by_the_spaces_metric_and_mode():
    halving = PackHalving("val/pixel_acc", "min", grace_period=2, reduction_factor=2, max_t=8)
    evaluations = {i: FakeEvaluation(2, 0.5, {"val/pixel_acc": acc}) for i, acc in enumerate([0.9, 0.1, 0.5, 0.3])}
    assert halving(evaluations) == {0, 2}  # the lowest pixel accuracy goes on in mode min
    with pytest.raises(ValueError, match="reduction_factor > 1"):
        PackHalving(contract.VAL_MIOU, "max", grace_period=2, reduction_factor=1, max_t=8)


# --- Optuna proposes a pack's members together --------------------------------------------------------------------

def pack_search(num_samples=7, pack_size=3):
    from kdray.orchestration.search import KdraySearch

    space = partial(sample_config, dimensions=(Dimension("x", "uniform", (0.0, 1.0)),))
    inner = KdraySearch(space=space, metric=contract.VAL_MIOU, mode="max", seed=0, constant_liar=pack_size > 1)
    return PackSearch(inner, pack_size, num_samples)


def test_a_pack_search_proposes_members_together_and_tells_the_study_each_one(tmp_path):
    search = pack_search()
    packs = [search.suggest(f"p{i}") for i in range(3)]
    assert [len(p[PACK_KEY]) for p in packs] == [3, 3, 1] and search.suggest("p3") == "FINISHED"
    xs = [m["x"] for p in packs for m in p[PACK_KEY]]
    assert len(set(xs)) == 7  # seven distinct proposals
    assert search.searcher._ot_study.sampler._constant_liar  # the pending members count as bad: they spread
    # the first pack's members end complete, stopped at its rung, and failed
    result = {contract.ITERATION: 8, contract.ITERATIONS_TOTAL: 8}
    for index, (state, done, value) in enumerate([(COMPLETE, 8, 0.7), (STOPPED, 4, 0.2), (FAILED, 2, 0.1)]):
        result.update({member_key(index, STATE): state, member_key(index, contract.ITERATION): done,
                       member_key(index, contract.ITERATIONS_TOTAL): 8, member_key(index, contract.VAL_MIOU): value})
    assert member_result(result, 1) == {STATE: STOPPED, contract.ITERATION: 4, contract.ITERATIONS_TOTAL: 8,
                                        contract.VAL_MIOU: 0.2}
    search.on_trial_result("p0", result)
    search.on_trial_complete("p0", result)
    trials = {t.number: t for t in search.searcher._ot_study.get_trials(deepcopy=False)}
    assert [trials[i].state.name for i in range(3)] == ["COMPLETE", "PRUNED", "FAIL"]
    assert trials[0].value == 0.7 and trials[1].intermediate_values == {4: 0.2}
    # a pack that failed as a whole fails the members that had not ended (Tune hands its end no result: its last
    # one counts); the saved state restores the packs
    search.on_trial_result("p1", {contract.ITERATION: 8, member_key(0, STATE): COMPLETE,
                                  member_key(0, contract.ITERATION): 8, member_key(0, contract.ITERATIONS_TOTAL): 8,
                                  member_key(0, contract.VAL_MIOU): 0.4})
    search.on_trial_complete("p1", None, error=True)
    assert search.trial_states() == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 3, "RUNNING": 1}
    search.save(str(tmp_path / "searcher.pkl"))
    again = pack_search()
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again.members == {"p0": 3, "p1": 3, "p2": 1} and again.suggest("p9") == "FINISHED"
    assert member_id("p0", 2) == "p0.m2"


# --- the members' MLflow runs ---------------------------------------------------------------------------------------

@dataclass
class FakeTrial:
    trial_id: str
    config: dict
    last_result: dict
    error_file: str | None = None
    pickled_error_file: str | None = None

    def get_error(self):
        return None


def test_a_packs_members_runs_end_as_their_states_say(tmp_path):
    from kdray.orchestration.tracking import Tracker
    from kdray.orchestration.trial import MlflowStatusCallback

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "packs")
    ids = [tracker.trial_run("s1", member_id("t1", i), "p", f"m{i}", {}, {}) for i in range(4)]
    last = {contract.ITERATION: 8, contract.ITERATIONS_TOTAL: 8,
            member_key(2, "failure"): "loss term 'kd' is nan at iteration 3"}
    for i, (state, done) in enumerate([(COMPLETE, 8), (STOPPED, 4), (FAILED, 3), ("running", 6)]):
        last.update({member_key(i, STATE): state, member_key(i, contract.ITERATION): done,
                     member_key(i, contract.ITERATIONS_TOTAL): 8})
    trial = FakeTrial("t1", {PACK_KEY: [{}, {}, {}, {}]}, last)
    MlflowStatusCallback(uri, "packs", "s1").on_trial_complete(0, [], trial)
    assert [tracker.status(r) for r in ids] == ["FINISHED", "FINISHED", "FAILED", "FAILED"]
    assert tracker.tags(ids[1])[contract.STOPPED_EARLY] == "true" and tracker.tags(ids[1])[contract.STOPPED_AT] == "4"
    assert "Stopped early by its pack's halving at iteration 4 of 8" in tracker.tags(ids[1])[contract.NOTE]
    assert tracker.tags(ids[2])[contract.NOTE] == "Failed: loss term 'kd' is nan at iteration 3"
    assert tracker.tags(ids[2])[contract.FAILURE] == "loss term 'kd' is nan at iteration 3"
    assert tracker.tags(ids[3])[contract.FAILURE] == "the pack ended before this member did"


# --- end to end ----------------------------------------------------------------------------------------------------

TINY = ["data.crop=[32, 32]", "data.synthetic.image_size=32", "data.synthetic.train_length=64",
        "data.synthetic.val_length=8", "data.batch_size=4", "data.eval_batch_size=8", "optim.log_interval=2",
        "teacher.width=0.125", "teacher.arch=deeplabv3_resnet18", "teacher.iterations=2", "run.threads=1",
        "run.latency_repeats=0"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_packed_search_and_its_confirmation_on_ray(tmp_path, teacher_file, shows_what_it_learnt):
    """Two search trials in one pack on two Ray Train workers (DDP over gloo), halving inside the pack at its first
    evaluation, then the confirmation (the best configuration and the CE student: one pack). Every member is a
    trial of its own in the summary, the study and MLflow; the stopped one is PRUNED and tagged; no run is left
    RUNNING. (Packs of unequal sizes: the PackSearch test above.)"""
    import ray
    from mlflow.tracking import MlflowClient

    from kdray.orchestration.sweep import SweepRequest, run_sweep, summary_table
    from kdray.orchestration.tune_setup import pinned_runtime_env

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = space_file(tmp_path, {
        "name": "packed", "num_samples": 2, "seed": 0, "pack_size": 2, "max_concurrent_trials": 1,
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        "overrides": {"optim.iterations": 4, "optim.eval_interval": 2, "run.workers": 2, "run.cpus_per_worker": 0.9},
        "space": {"losses.kd.enabled": True, "losses.kd.weight": {"loguniform": [0.1, 10.0]}},
        "confirm": {"top_k": 1, "seeds": [0]}})
    ray.init(num_cpus=2, log_to_driver=False, runtime_env=pinned_runtime_env())
    try:
        request = SweepRequest(str(DEMO), str(space), [*TINY, f"run.output_dir={tmp_path}/runs",
                                                       f"teacher.checkpoint={teacher_file}"], tracking_uri=uri)
        lines = []
        outcome = run_sweep(request, say=lines.append)
    finally:
        ray.shutdown()
    assert outcome.complete and outcome.exit_code == 0, summary_table(outcome)
    searched = [t for t in outcome.trials if t.stage == "search"]
    confirmed = [t for t in outcome.trials if t.stage == "confirm"]
    assert sorted(t.status for t in searched) == ["finished", "stopped early"]
    stopped = next(t for t in searched if t.status == "stopped early")
    assert stopped.iteration == 2 and stopped.trial_id.endswith((".m0", ".m1"))
    assert sorted(t.label for t in confirmed)[1] == "Student (CE)" and all(t.status == "finished" for t in confirmed)
    assert any("2 search trial(s) in 1 pack(s)" in line for line in lines)
    study = optuna.load_study(study_name=f"sweep-{outcome.sweep_id}",
                              storage=f"sqlite:///{outcome.sweep_dir / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "PRUNED"]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id],
                              f"tags.`{contract.SWEEP_ID}` = '{outcome.sweep_id}' and tags.`{contract.KIND}` = 'trial'")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["run.workers"] for r in runs} == {"2"}
    by_trial = {r.data.tags[contract.TRIAL_ID]: r for r in runs}
    assert by_trial[stopped.trial_id].data.tags[contract.STOPPED_EARLY] == "true"
    for run in runs:  # each member's own evaluations, at its own iterations, in one go (no worker restart)
        assert contract.RESUMED_FROM not in run.data.tags
        steps = [m.step for m in client.get_metric_history(run.info.run_id, contract.VAL_MIOU)]
        assert steps == ([2] if run.data.tags[contract.TRIAL_ID] == stopped.trial_id else [2, 4])
        if steps == [2, 4]:  # a complete member's previews, best predictions and model, from the pack's worker
            shows_what_it_learnt(client, run, steps)
    tags = client.get_run(outcome.parent_run_id).data.tags
    assert tags[f"{contract.SAMPLER_TAG_PREFIX}constant_liar"] == "True"


# --- a pack's worker, restarted from its checkpoint -------------------------------------------------------------------

PACK_JOB = {"name": "pack", "data": {"num_classes": 8, "crop": [32, 32], "batch_size": 4, "eval_batch_size": 8,
                                     "synthetic": {"image_size": 32, "train_length": 32, "val_length": 8}},
            "teacher": {"arch": "deeplabv3_resnet18", "width": 0.125},
            "student": {"arch": "deeplabv3_resnet18", "width": 0.125},
            "optim": {"iterations": 6, "eval_interval": 3, "log_interval": 3},
            "run": {"threads": 1, "latency_repeats": 0}, "tracking": {"log_model": False}}


class FakeTrain:
    """Ray Train as `pack_per_worker` sees it on one rank: its checkpoint to resume from, and `report`, which keeps
    each result and a copy of its checkpoint, and dies (as a killed worker) at the report numbered `die_at`."""

    def __init__(self, keep: Path, resume_from: Path | None = None, die_at: int | None = None):
        self.keep, self.resume_from, self.die_at = keep, resume_from, die_at
        self.results, self.checkpoints = [], []

    def install(self, monkeypatch):
        import ray.train
        import ray.train.torch
        import torch

        from kdray.orchestration import pack_trial

        context = type("Context", (), {"get_world_rank": lambda self: 0, "get_world_size": lambda self: 1})()
        monkeypatch.setattr(pack_trial.ray.train, "get_context", lambda: context)
        monkeypatch.setattr(pack_trial.ray.train.torch, "get_device", lambda: torch.device("cpu"))
        monkeypatch.setattr(pack_trial.ray.train, "get_checkpoint", lambda: None if self.resume_from is None
                            else ray.train.Checkpoint.from_directory(str(self.resume_from)))
        monkeypatch.setattr(pack_trial.ray.train, "report", self.report)

    def report(self, result, checkpoint=None):
        import shutil

        copy = self.keep / f"report-{len(self.results)}"
        shutil.copytree(checkpoint.path, copy)
        self.results.append(dict(result))
        self.checkpoints.append(copy)
        if self.die_at is not None and len(self.results) == self.die_at:
            raise RuntimeError("the worker died")


def test_a_pack_worker_restarted_from_its_checkpoint_ends_as_one_never_stopped(tmp_path, teacher_file, monkeypatch):
    import torch

    from kdray.config import job_from_dict
    from kdray.orchestration.pack_trial import PACK_FILE, pack_per_worker
    from kdray.orchestration.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "packs")
    base = {**PACK_JOB, "teacher": {**PACK_JOB["teacher"], "checkpoint": teacher_file}}
    jobs = [job_from_dict(base, {}), job_from_dict(base, {"losses.kd.enabled": True, "losses.adversarial.enabled":
                                                          True})]

    def config(tag):
        members = [{"index": i, "job": job, "run_id": tracker.trial_run(tag, f"t.m{i}", "p", f"m{i}", {}, {})}
                   for i, job in enumerate(jobs)]
        return {"members": members, "unbuilt": [], "halving": None, "metric": contract.VAL_MIOU, "mode": "max",
                "iterations": 6, "tracking_uri": uri}

    whole = FakeTrain(tmp_path / "whole")
    whole.install(monkeypatch)
    assert pack_per_worker(config("whole")) is None
    assert [r[contract.ITERATION] for r in whole.results] == [3, 6, 6]  # each evaluation, then the pack's end
    last = whole.results[-1]
    assert [last[member_key(i, STATE)] for i in range(2)] == [COMPLETE, COMPLETE]

    cut = FakeTrain(tmp_path / "cut", die_at=1)  # dies right after the pack's first report (iteration 3)
    cut.install(monkeypatch)
    with pytest.raises(RuntimeError, match="the worker died"):
        pack_per_worker(config("cut"))
    saved = yaml.safe_load((cut.checkpoints[0] / PACK_FILE).read_text())
    assert saved["iteration"] == 3 and set(saved["states"].values()) == {"running"}
    again = FakeTrain(tmp_path / "again", resume_from=cut.checkpoints[0])
    again.install(monkeypatch)
    assert pack_per_worker(config("cut")) is None
    assert [r[contract.ITERATION] for r in again.results] == [6, 6]
    for i in range(2):  # every member resumed and ended with the weights of the pack that never stopped
        ours = torch.load(again.checkpoints[-1] / f"m{i}" / "checkpoint.pt", weights_only=False)["model"]
        theirs = torch.load(whole.checkpoints[-1] / f"m{i}" / "checkpoint.pt", weights_only=False)["model"]
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    run = tracker.client.get_run(config("cut")["members"][1]["run_id"])
    assert run.data.tags[contract.RESUMED_FROM] == "3"


def test_a_member_that_failed_stays_failed_with_its_reason_after_a_restart(tmp_path, teacher_file, monkeypatch):
    """KD's loss is NaN from the start: the member fails at iteration 1, the pack's first report (iteration 3) says
    so, the worker dies there; restarted, only the CE member trains on, and the failed one keeps its FAILED state and
    its reason (its run, reopened by the restarted trial, had lost the tag). A member left alone that fails ends the
    pack's worker normally, not with an error Ray Train would retry."""
    from kdray.config import job_from_dict
    from kdray.losses.kd import PixelwiseKD
    from kdray.orchestration.pack_trial import pack_per_worker
    from kdray.orchestration.tracking import Tracker

    original = PixelwiseKD.forward
    monkeypatch.setattr(PixelwiseKD, "forward", lambda self, *a, **k: original(self, *a, **k) * float("nan"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "packs")
    base = {**PACK_JOB, "teacher": {**PACK_JOB["teacher"], "checkpoint": teacher_file}}
    jobs = [job_from_dict(base, {}), job_from_dict(base, {"losses.kd.enabled": True})]
    members = [{"index": i, "job": job, "run_id": tracker.trial_run("s", f"t.m{i}", "p", f"m{i}", {}, {})}
               for i, job in enumerate(jobs)]
    config = {"members": members, "unbuilt": [], "halving": None, "metric": contract.VAL_MIOU, "mode": "max",
              "iterations": 6, "tracking_uri": uri}
    cut = FakeTrain(tmp_path / "cut", die_at=1)
    cut.install(monkeypatch)
    with pytest.raises(RuntimeError, match="the worker died"):
        pack_per_worker(config)
    assert cut.results[0][member_key(1, STATE)] == FAILED  # said at the pack's first report, not only at its end
    tracker.clear_tag(members[1]["run_id"], contract.FAILURE)  # what reopening the trial's runs does
    again = FakeTrain(tmp_path / "again", resume_from=cut.checkpoints[0])
    again.install(monkeypatch)
    assert pack_per_worker(config) is None
    assert [again.results[-1][member_key(i, STATE)] for i in range(2)] == [COMPLETE, FAILED]
    assert again.results[-1][member_key(1, "failure")] == "loss term 'kd' is nan at iteration 1"
    assert tracker.tags(members[1]["run_id"])[contract.FAILURE] == "loss term 'kd' is nan at iteration 1"

    alone = FakeTrain(tmp_path / "alone")
    alone.install(monkeypatch)
    assert pack_per_worker({**config, "members": members[1:]}) is None
    assert alone.results[-1][member_key(1, STATE)] == FAILED
