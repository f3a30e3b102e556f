"""Sweep and teacher progress lines, and the settings that keep Ray's start-up notices out of the output.

Most tests need no Ray cluster (fake trials, a fake clock, a fake mailbox). The `ray` tests start a local Ray:
run them inside ../shared/bin/loopback-only.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import pytest

from kdray.orchestration import progress as P
from kdray.orchestration.progress import (
    ReportRelay,
    SweepProgress,
    TeacherProgress,
    TrialLabel,
    eta_seconds,
    last_line,
    metric_text,
    quiet_ray_output,
    sampled,
)
from kdray.orchestration.sweep import SweepRequest, prepare
from kdray.space import ROW_KEY, SEED_KEY

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "jobs" / "demo.yaml"


class FakeTrial:
    def __init__(self, trial_id, config=None, status="PENDING", last_result=None, error=None):
        self.trial_id, self.config, self.status = trial_id, config or {}, status
        self.last_result, self._error = last_result or {}, error

    def get_error(self):
        return self._error


class Clock:
    """A picklable clock the test moves by hand."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def result(iteration, miou=None, total=400):
    out = {"iteration": iteration, "iterations_total": total}
    if miou is not None:
        out["val/miou"] = miou
    return out


# -- arithmetic and formats -------------------------------------------------------------------------------------
def test_eta_is_the_pace_since_the_start_applied_to_what_is_left():
    assert eta_seconds(60.0, 0.0, 1.0, 4.0) == pytest.approx(180.0)  # 1 trial a minute, 3 to go
    assert eta_seconds(60.0, 2.0, 3.0, 4.0) == pytest.approx(60.0)  # resumed with 2 done: pace from the 3rd
    assert eta_seconds(30.0, 0.0, 0.5, 2.0) == pytest.approx(90.0)  # half a trial in 30 s
    assert eta_seconds(60.0, 1.0, 1.0, 4.0) is None  # nothing measured yet
    assert eta_seconds(0.0, 0.0, 1.0, 4.0) is None
    assert eta_seconds(60.0, 0.0, 5.0, 4.0) == 0.0  # never negative


def test_metric_text_shows_val_ratios_in_percent():
    assert metric_text("val/miou", 0.41304) == "mIoU 41.30%"
    assert metric_text("val/pixel_acc", 0.9) == "pixel acc 90.00%"
    assert metric_text("train/loss/total", 0.123456) == "train/loss/total 0.1235"
    assert metric_text("val/miou", float("nan")) == "mIoU n/a"


def test_last_line_is_the_workers_own_exception():
    err = RuntimeError("Training failed.\nTraceback ...\n  File x\nValueError: bad crop\n\n")
    assert last_line(err) == "ValueError: bad crop"
    assert last_line(None) == "the trial failed"
    assert len(last_line("x" * 1000)) == 300


def test_trial_error_prefers_the_local_error_file(tmp_path):
    trial = FakeTrial("x", error=RuntimeError("from storage"))
    assert P.trial_error(trial) == "from storage"
    trial.error_file = str(tmp_path / "error.txt")  # missing: still the storage copy
    assert P.trial_error(trial) == "from storage"
    (tmp_path / "error.txt").write_text("Failure # 1 (occurred at now)\nTraceback\nValueError: bad x\n")
    assert last_line(P.trial_error(trial)) == "ValueError: bad x"
    assert P.trial_error(FakeTrial("y")) is None


def test_sampled_lists_the_searched_values_only():
    config = {"losses.kd.weight": 2.3456789, "losses.i2ckd.enabled": True, ROW_KEY: "+KD", SEED_KEY: 1}
    assert sampled(config) == "losses.i2ckd.enabled=True, losses.kd.weight=2.346"
    assert sampled({ROW_KEY: "+KD", SEED_KEY: 0}) == ""


# -- the sweep callback -------------------------------------------------------------------------------------------
def test_one_line_per_trial_event_with_count_and_eta():
    lines, clock = [], Clock()
    cb = SweepProgress(4, say=lines.append, clock=clock)
    a = FakeTrial("t_00000", {"losses.kd.weight": 1.0})
    b = FakeTrial("t_00001", {"losses.kd.weight": 0.5})
    c = FakeTrial("t_00002")
    trials = [a, b, c]

    cb.on_trial_start(0, trials, a)
    a.status = "RUNNING"  # Tune sets RUNNING after on_trial_start
    cb.on_trial_start(0, trials, b)
    b.status = "RUNNING"
    clock.now += 60
    cb.on_trial_result(1, trials, a, result(100))  # no metric: counted, not printed
    cb.on_trial_result(1, trials, a, result(200, 0.413))
    clock.now += 60
    cb.on_trial_result(2, trials, a, result(400, 0.40))
    a.last_result = result(400, 0.40)
    cb.on_trial_complete(2, trials, a)
    a.status = "TERMINATED"
    b.last_result = result(200, 0.2)
    cb.on_trial_result(2, trials, b, result(200, 0.2))
    cb.on_trial_complete(3, trials, b)  # the scheduler stopped it
    b.status = "TERMINATED"
    cb.on_trial_start(3, trials, c)
    c.status = "RUNNING"
    c._error = RuntimeError("Training failed\nValueError: loss is nan")
    cb.on_trial_error(4, trials, c)
    c.status = "ERROR"
    cb.on_experiment_end(trials)

    assert lines == [
        "[0/4 done, 1 running] trial t_00000: started (losses.kd.weight=1)",
        "[0/4 done, 2 running] trial t_00001: started (losses.kd.weight=0.5)",
        # 0.5 trial of work in 60 s: 3.5 trials left -> 420 s
        "[0/4 done, 2 running, ETA 7m00s] trial t_00000: iteration 200/400 mIoU 41.30%",
        "[0/4 done, 2 running, ETA 6m00s] trial t_00000: iteration 400/400 mIoU 40.00% (best 41.30%)",
        "[1/4 done, 1 running, ETA 6m00s] trial t_00000: finished after iteration 400/400, best mIoU 41.30%",
        "[1/4 done, 1 running, ETA 3m20s] trial t_00001: iteration 200/400 mIoU 20.00%",
        # a stopped trial counts as one trial of work: 2 done in 120 s
        "[2/4 done, 0 running, ETA 2m00s] trial t_00001: stopped early at iteration 200/400, best mIoU 20.00%",
        "[2/4 done, 1 running, ETA 2m00s] trial t_00002: started",
        "[3/4 done, 0 running, ETA 40s] trial t_00002: failed: ValueError: loss is nan",
        "[3/4 done] trials ended after 2m00s: 1 finished, 1 stopped early, 1 failed",
    ]


def test_a_packs_end_says_how_each_member_ended_and_the_tally_counts_members():
    from kdray.orchestration.pack import PACK_KEY, member_key

    lines, clock = [], Clock()
    cb = SweepProgress(1, say=lines.append, clock=clock)
    last = {**result(400, 0.41)}
    for i, (state, done, miou) in enumerate([("complete", 400, 0.41), ("stopped", 200, 0.2), ("failed", 3, None)]):
        last.update({member_key(i, "state"): state, member_key(i, "iteration"): done})
        if miou is not None:
            last[member_key(i, "val/miou")] = miou
    pack = FakeTrial("p_00000", {PACK_KEY: [{}, {}, {}]}, last_result=last)
    cb.on_trial_start(0, [pack], pack)
    pack.status = "RUNNING"
    cb.on_trial_result(1, [pack], pack, result(400, 0.41))
    cb.on_trial_result(2, [pack], pack, result(400, 0.41))  # the pack's closing result: no second line
    cb.on_trial_complete(3, [pack], pack)
    pack.status = "TERMINATED"
    cb.on_experiment_end([pack])
    assert lines[-2:] == [
        "[1/1 done, 0 running] trial p_00000: ended: m0 finished (mIoU 41.00%), m1 stopped early at 200 "
        "(mIoU 20.00%), m2 failed at 3",
        "[1/1 done] packs ended after 0s: 1 finished, 1 stopped early, 1 failed (members of the packs)"]
    assert sum("iteration 400/400" in line for line in lines) == 1


def test_a_trial_cut_short_by_ctrl_c_is_interrupted_not_stopped_early(monkeypatch):
    lines = []
    cb = SweepProgress(2, say=lines.append, clock=Clock())
    a, b = FakeTrial("a", last_result=result(200, 0.3)), FakeTrial("b", last_result=result(400, 0.4))
    monkeypatch.setattr(P, "interrupted", lambda: True)
    cb.on_trial_complete(0, [a, b], a)
    cb.on_trial_complete(0, [a, b], b)  # it had reached the end: finished all the same
    cb.on_experiment_end([a, b])
    assert lines[0].endswith("trial a: interrupted at iteration 200/400, best mIoU 30.00%")
    assert lines[1].endswith("trial b: finished after iteration 400/400, best mIoU 40.00%")
    assert lines[2].endswith("1 finished, 1 interrupted")


def test_a_trial_its_time_budget_ended_is_finished_where_the_budget_ran_out():
    lines = []
    cb = SweepProgress(1, say=lines.append, clock=Clock())
    ended = {**result(137, 0.3), "iterations_total": 137, "time_budget_reached": 1.0}
    a = FakeTrial("a", last_result=ended)
    cb.on_trial_complete(0, [a], a)
    cb.on_experiment_end([a])
    assert lines[0].endswith("trial a: finished at iteration 137: its time budget (optim.time_budget_s) ran out, "
                             "best mIoU 30.00%")
    assert lines[1].endswith("1 finished")


def test_interrupted_reads_the_sweeps_ctrl_c_flag(monkeypatch):
    import threading

    from kdray.orchestration import trial

    flag = threading.Event()
    monkeypatch.setattr(trial, "INTERRUPTED", flag, raising=False)
    assert P.interrupted() is False
    flag.set()
    assert P.interrupted() is True
    monkeypatch.delattr(trial, "INTERRUPTED")
    assert P.interrupted() is False


def test_min_mode_tracks_the_lowest_value():
    lines = []
    cb = SweepProgress(1, metric="val/pixel_acc", mode="min", say=lines.append, clock=Clock())
    t = FakeTrial("x")
    for it, v in ((1, 0.5), (2, 0.3), (3, 0.4)):
        cb.on_trial_result(0, [t], t, {"iteration": it, "iterations_total": 3, "val/pixel_acc": v})
    assert lines[-1].endswith("iteration 3/3 pixel acc 40.00% (best 30.00%)")


def test_a_resumed_sweep_counts_restored_trials_but_not_their_time():
    lines, clock = [], Clock()
    cb = SweepProgress(3, say=lines.append, clock=clock)
    done = [FakeTrial("a", status="TERMINATED"), FakeTrial("b", status="ERROR")]
    c = FakeTrial("c")
    cb.on_trial_start(0, [*done, c], c)
    clock.now += 30
    cb.on_trial_result(0, [*done, c], c, result(200, 0.5))
    assert lines[0] == "[2/3 done, 1 running] trial c: started"
    assert lines[1].startswith("[2/3 done, 1 running, ETA 30s] trial c: iteration 200/400")


def test_a_failing_say_or_label_never_stops_the_sweep():
    def boom(_):
        raise OSError("closed stdout")

    cb = SweepProgress(1, say=boom, clock=Clock())
    t = FakeTrial("x")
    cb.on_trial_start(0, [t], t)
    cb.on_trial_error(0, [t], t)
    cb.on_experiment_end([t])
    cb = SweepProgress(1, label=lambda trial: 1 / 0, say=print, clock=Clock())
    cb.on_trial_start(0, [t], t)


def test_pickle_round_trip_drops_say_and_clock():
    lines = []
    cb = SweepProgress(6, say=lines.append, clock=Clock())
    t = FakeTrial("x")
    cb.on_trial_start(0, [t], t)
    cb.on_trial_result(0, [t], t, result(200, 0.5))
    restored = pickle.loads(pickle.dumps(cb))
    assert restored.say is P.echo
    assert restored.clock is P.time.monotonic
    assert restored._t0 is None and restored.total_trials == 6 and restored._best == {"x": 0.5}
    assert "say" not in cb.__getstate__() and cb.say == lines.append  # the original keeps its own


def test_trial_label_names_ablation_rows_and_search_methods(tmp_path):
    base, _, space = prepare(SweepRequest(str(DEMO), str(REPO / "search_spaces" / "i2ckd_ablation.yaml")))
    label = TrialLabel(space, base)
    assert label(FakeTrial("ab_00004", {ROW_KEY: "+KD", SEED_KEY: 1})) == "trial ab_00004 +KD seed 1"

    base, _, space = prepare(SweepRequest(str(DEMO), str(REPO / "search_spaces" / "demo.yaml")))
    label = pickle.loads(pickle.dumps(TrialLabel(space, base)))  # Tune pickles it into tuner.pkl
    config = {"losses.kd.enabled": True, "losses.kd.weight": 1.0, "losses.kd.temperature": 1.0,  # fixed + sampled
              "losses.i2ckd.enabled": True,
              "losses.i2ckd.weight": 1.0, "losses.i2ckd.margin": 0.5}
    assert label(FakeTrial("s_00000", config)) == "trial s_00000 KD+I2CKD seed 0"
    assert label(FakeTrial("s_00001", {**config, "losses.i2ckd.enabled": False})) == "trial s_00001 KD seed 0"
    assert label(FakeTrial("s_00002", {"losses.kd.weight": "not a number"})) == "trial s_00002"  # never raises


# -- the teacher ---------------------------------------------------------------------------------------------------
class FakeRemote:
    def __init__(self, sink):
        self.sink = sink

    def remote(self, item):
        self.sink.append(item)


class FakeMailbox:
    def __init__(self):
        self.items = []
        self.put = FakeRemote(self.items)


def test_relay_forwards_rank_zeros_numbers_and_worker_failures():
    mailbox = FakeMailbox()
    relay = ReportRelay(mailbox)
    relay.after_report(None, [{"iteration": 150, "val/miou": 0.4, "iterations_total": 900, "tag": "x",
                               "flag": True}, {"iteration": 150, "val/miou": 0.0}], None)
    relay.after_report(None, [], None)
    relay.after_exception(None, {1: RuntimeError("b"), 0: RuntimeError("trace\nCUDA out of memory")})
    assert mailbox.items == [{"iteration": 150, "val/miou": 0.4, "iterations_total": 900},
                             {"error": "CUDA out of memory"}]
    restored = pickle.loads(pickle.dumps(ReportRelay(None)))  # Ray ships it to the Train controller
    restored.put({"iteration": 1})  # no mailbox: silently nothing


def test_teacher_lines_use_the_train_progress_format():
    lines = []
    show = TeacherProgress(900, say=lines.append, name="teacher deeplabv3_resnet18")
    show.progress.t0 = P.time.perf_counter() - 60  # 150 iterations took a minute
    show.show({"iteration": 150, "val/miou": 0.3, "iterations_total": 900})
    show.show({"iteration": 200, "train/loss/total": 0.81234, "train/images_per_s": 92.6})
    show.show({"iteration": 300, "val/miou": 0.25})
    show.show({"error": "ValueError: x"})
    show.show({"iteration": 310})  # nothing to show
    assert len(lines) == 4
    assert re.fullmatch(r"teacher deeplabv3_resnet18 \[###\.{17}\] 150/900 mIoU 30\.00% \(best 30\.00%\) "
                        r"\| 1m0\ds elapsed, eta 5m0\ds", lines[0]), lines[0]
    assert " 200/900 loss 0.812, 93 img/s | " in lines[1]
    assert " 300/900 mIoU 25.00% (best 30.00%) | " in lines[2]
    assert lines[3] == "teacher deeplabv3_resnet18: a worker failed: ValueError: x"


# -- Ray's noise -----------------------------------------------------------------------------------------------------
@pytest.fixture
def quiet_state():
    environ = {}
    yield environ
    quiet_ray_output(True, environ=environ)  # undo whatever the test left


def test_quiet_settings_and_their_undo(quiet_state, capsys):
    import mlflow  # noqa: F401  (each configures its logger on import)
    import optuna  # noqa: F401
    import ray._private.ray_constants as constants
    import ray._private.worker as ray_worker

    environ = quiet_state
    before = constants.ENABLE_RAY_CLUSTER
    levels = {name: logging.getLogger(name).level for name in P.CHATTY_LIBRARIES}
    assert quiet_ray_output(False, local=True, environ=environ) == {"logging_level": logging.WARNING}
    assert environ == {"RAY_AIR_NEW_OUTPUT": "0"}
    assert constants.ENABLE_RAY_CLUSTER is False  # no route lookup towards 8.8.8.8 for a local Ray

    token = logging.getLogger(P._TOKEN_LOGGER)
    record = token.makeRecord(token.name, logging.WARNING, "f", 1, P._TOKEN_NOTICE + ". Set RAY_AUTH_MODE=...",
                              (), None)
    assert token.filter(record) is False
    other = token.makeRecord(token.name, logging.WARNING, "f", 1, "Token authentication is disabled", (), None)
    assert token.filter(other)  # the security warning for a disabled mode stays
    slow = logging.getLogger(P._SLOW_LOGGER)
    for text in ("The `on_step_begin` operation took 1.472 s, which may be a performance bottleneck.",
                 "Processing trial results took 0.559 s, which may be a performance bottleneck. Please consider ..."):
        assert slow.filter(slow.makeRecord(slow.name, logging.WARNING, "f", 1, text, (), None)) is False
    assert slow.filter(slow.makeRecord(slow.name, logging.WARNING, "f", 1, "anything else", (), None))

    noise = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 127.0.0.1, which "
             "is 4x the maximum expected startup concurrency (2).")
    ray_worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    ray_worker.print_to_stdstream({"lines": [noise, "Task killed: out of memory"], "pid": "raylet",
                                   "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "worker processes" not in out and "Task killed: out of memory" in out

    assert logging.getLogger("mlflow").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("optuna").getEffectiveLevel() == logging.WARNING

    quiet_ray_output(False, local=True, environ=environ)  # twice: nothing stacks
    assert len([f for f in token.filters if f is P._token_filter]) == 1
    assert not hasattr(ray_worker.print_to_stdstream.__kdray_original__, "__kdray_original__")

    assert quiet_ray_output(True, environ=environ) == {}  # --verbose: Ray's own defaults, all of it back
    assert environ == {} and constants.ENABLE_RAY_CLUSTER is before
    assert P._token_filter not in token.filters and P._slow_filter not in slow.filters
    assert not hasattr(ray_worker.print_to_stdstream, "__kdray_original__")
    assert {name: logging.getLogger(name).level for name in P.CHATTY_LIBRARIES} == levels
    ray_worker.print_to_stdstream({"lines": [noise], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert "worker processes" in capsys.readouterr().out


def test_quiet_keeps_the_users_own_settings_and_clusters_node_ip(quiet_state):
    import ray._private.ray_constants as constants

    environ = quiet_state
    environ["RAY_AIR_NEW_OUTPUT"] = "1"
    before = constants.ENABLE_RAY_CLUSTER
    quiet_ray_output(False, local=False, environ=environ)  # --address: a cluster, whose node IP matters
    assert environ == {"RAY_AIR_NEW_OUTPUT": "1"} and constants.ENABLE_RAY_CLUSTER is before
    quiet_ray_output(True, environ=environ)
    assert environ == {"RAY_AIR_NEW_OUTPUT": "1"}


def test_tune_verbosity_and_raylet_filter_are_pure():
    assert P.tune_verbosity(False) == 0 and P.tune_verbosity(True) == 1
    assert P.drop_raylet_noise({"pid": "123", "lines": ["worker processes have been started on node"]})["lines"]
    assert P.drop_raylet_noise({"pid": "raylet", "lines": ["x worker processes have been started on node y"]}) is None


# -- with Ray (inside loopback-only) ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    import ray

    kwargs = quiet_ray_output(False, local=True)
    ray.init(num_cpus=2, log_to_driver=False, **kwargs)
    yield
    ray.shutdown()
    quiet_ray_output(True)


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_progress_prints_each_report_on_the_driver(ray_local, tmp_path):
    import ray.train
    from ray.train.torch import TorchTrainer

    def _two_reports(config):  # nested: pickled by value (the workers cannot import this test module)
        for i in (1, 2):
            ray.train.report({"iteration": 2 * i, "val/miou": 0.1 * i, "iterations_total": 4})

    lines = []
    with TeacherProgress(4, say=lines.append, poll_s=0.2) as show:
        TorchTrainer(_two_reports, scaling_config=ray.train.ScalingConfig(num_workers=1,
                                                                          resources_per_worker={"CPU": 0.5}),
                     run_config=ray.train.RunConfig(name="teacher", storage_path=str(tmp_path),
                                                    callbacks=[show.callback])).fit()
    assert [line.split(" | ")[0] for line in lines] == [
        "teacher [##########..........] 2/4 mIoU 10.00% (best 10.00%)",
        "teacher [####################] 4/4 mIoU 20.00% (best 20.00%)"]


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_progress_under_tune_prints_and_survives_tuner_pickle(ray_local, tmp_path):
    from ray import tune

    def _trial(config):
        if config["x"] == 2:
            raise ValueError("bad x")
        for i in (1, 2):
            tune.report({"iteration": 2 * i, "val/miou": 0.1 * i * config["x"], "iterations_total": 4})

    lines = []
    tuner = tune.Tuner(tune.with_resources(_trial, {"cpu": 0.01}), param_space={"x": tune.grid_search([1, 2])},
                       tune_config=tune.TuneConfig(metric="val/miou", mode="max", max_concurrent_trials=1),
                       run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0,
                                                 callbacks=[SweepProgress(2, say=lines.append)]))
    grid = tuner.fit()
    assert grid.num_errors == 1
    text = "\n".join(lines)
    assert re.search(r"\] trial \w+_00000: iteration 4/4 mIoU 20\.00%", text), text
    assert re.search(r"\] trial \w+_00000: finished after iteration 4/4, best mIoU 20\.00%", text), text
    assert re.search(r"\] trial \w+_00001: failed: ValueError: bad x", text), text
    assert lines[-1].startswith("[2/2 done] trials ended after ")
    assert (tmp_path / "tune" / "tuner.pkl").is_file()  # the callback went into it without its `say`


def test_a_paused_trial_counts_as_paused_not_running():
    """Synchronous halving pauses a trial at a rung until its bracket is there: the count says so."""
    lines = []
    cb = SweepProgress(3, say=lines.append, clock=Clock())
    a, b = FakeTrial("a", status="PENDING"), FakeTrial("b", status="PENDING")
    cb.on_trial_start(0, [a, b], a)
    a.status = "RUNNING"
    cb.on_trial_start(0, [a, b], b)
    b.status, a.status = "RUNNING", "PAUSED"
    cb.on_trial_result(0, [a, b], b, {"iteration": 2, "iterations_total": 4, "val/miou": 0.2})
    assert lines[-1].startswith("[0/3 done, 1 running, 1 paused")
    a.last_result = {"iteration": 2}
    cb.on_trial_result(0, [a, b], a, {"iteration": 2, "iterations_total": 4, "val/miou": 0.3})
    cb.on_trial_start(0, [a, b], a)  # resumed: Tune still lists it PAUSED while it starts
    assert lines[-1].startswith("[0/3 done, 2 running]") and lines[-1].endswith("trial a: resumed after iteration 2")
