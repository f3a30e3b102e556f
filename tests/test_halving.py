"""Synchronous successive halving (`kdray.orchestration.halving`): decisions on complete rungs, whatever the order
results arrive in; the bracket gate on the searcher; and both through Tune itself."""

from __future__ import annotations

import json
import pickle
import random
import time

import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from kdray import contract
from kdray.orchestration.halving import BracketGate, SyncHalving, milestones
from kdray.orchestration.tune_setup import pinned_runtime_env

CONTINUE, PAUSE, STOP = TrialScheduler.CONTINUE, TrialScheduler.PAUSE, TrialScheduler.STOP


class FakeTrial:
    def __init__(self, trial_id: str):
        self.trial_id, self.status, self.is_saving, self.last_result = trial_id, "PENDING", False, {}

    def __repr__(self):
        return f"FakeTrial({self.trial_id}, {self.status})"


class FakeSearcher:
    """Where the scheduler's on_pause / on_unpause calls land (Tune: search_alg.searcher)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def on_pause(self, trial_id):
        self.calls.append(("pause", trial_id))

    def on_unpause(self, trial_id):
        self.calls.append(("unpause", trial_id))


class FakeController:
    """What Tune's controller does for the scheduler: stop_trial tells the scheduler (on_trial_remove for a paused
    trial, on_trial_complete for a running one) and ends the trial TERMINATED."""

    def __init__(self, scheduler: SyncHalving):
        self.scheduler, self.trials, self.stopped = scheduler, [], []
        self.search_alg = type("SearchGenerator", (), {})()
        self.search_alg.searcher = FakeSearcher()

    def get_trials(self):
        return list(self.trials)

    def add(self, trial_id: str) -> FakeTrial:
        trial = FakeTrial(trial_id)
        self.trials.append(trial)
        self.scheduler.on_trial_add(self, trial)
        return trial

    def stop_trial(self, trial):
        if trial.status in ("PAUSED", "PENDING"):
            self.scheduler.on_trial_remove(self, trial)
        else:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
        trial.status = "TERMINATED"
        self.stopped.append(trial.trial_id)

    def report(self, trial: FakeTrial, iteration: int, value: float) -> str:
        """One result of a running trial, and Tune's handling of the scheduler's answer."""
        assert trial.status == "RUNNING", trial
        trial.last_result = {contract.ITERATION: iteration, "score": value}
        action = self.scheduler.on_trial_result(self, trial, dict(trial.last_result))
        if action == PAUSE:
            trial.status = "PAUSED"
        elif action == STOP:
            self.stop_trial(trial)
        return action


def halving(mode="max", **kwargs) -> SyncHalving:
    kwargs = {"num_samples": 4, "max_t": 8, "grace_period": 2, "reduction_factor": 2, **kwargs}
    scheduler = SyncHalving(**kwargs)
    scheduler.set_search_properties("score", mode)
    return scheduler


def start(controller: FakeController, n: int) -> list[FakeTrial]:
    trials = [controller.add(f"t{i}") for i in range(n)]
    for trial in trials:
        trial.status = "RUNNING"
    return trials


def simulate(values: dict[int, float], order_seed: int, mode="max", concurrent=2, **kwargs):
    """A whole sweep of len(values) trials (trial i reports values[i] * iteration at every even iteration up to
    8), `concurrent` at a time, the next result coming from a running trial chosen at random (`order_seed`), as
    Tune would start and resume them. Returns (scheduler, controller, {trial number: last iteration})."""
    rng = random.Random(order_seed)
    scheduler = halving(mode, num_samples=len(values), max_concurrent=concurrent, **kwargs)
    controller = FakeController(scheduler)
    at: dict[str, int] = {}
    created = 0
    for _ in range(1000):
        running = [t for t in controller.trials if t.status == "RUNNING"]
        while len(running) < concurrent:  # the gate's cap on new trials, then the scheduler's on resumed ones
            if created < len(values):
                trial = controller.add(f"t{created}")
                created += 1
            else:
                trial = scheduler.choose_trial_to_run(controller)
                if trial is None:
                    break
            trial.status = "RUNNING"
            at.setdefault(trial.trial_id, 0)
            running.append(trial)
        if not running:
            break
        trial = rng.choice(running)
        at[trial.trial_id] += 2
        number = int(trial.trial_id[1:])
        action = controller.report(trial, at[trial.trial_id], values[number] * at[trial.trial_id])
        if action == CONTINUE and at[trial.trial_id] >= 8:
            controller.stop_trial(trial)  # the trainable returned at max_t
    assert all(t.status == "TERMINATED" for t in controller.trials), controller.trials
    return scheduler, controller, {int(t[1:]): i for t, i in at.items()}


def test_milestones_are_grace_times_eta_powers_below_max_t():
    assert milestones(2, 8, 2) == (2, 4)
    assert milestones(150, 600, 2) == (150, 300)
    assert milestones(1, 27, 3) == (1, 3, 9)
    assert milestones(8, 8, 2) == ()


def test_a_trial_pauses_at_a_rung_until_the_whole_bracket_recorded_then_the_top_half_goes_on():
    scheduler = halving()
    controller = FakeController(scheduler)
    t0, t1, t2, t3 = start(controller, 4)
    assert controller.report(t0, 1, 0.9) == CONTINUE  # below the first rung (2)
    assert controller.report(t0, 2, 0.9) == PAUSE
    assert controller.report(t2, 2, 0.1) == PAUSE
    assert controller.report(t3, 2, 0.5) == PAUSE
    assert controller.search_alg.searcher.calls == [("pause", "t0"), ("pause", "t2"), ("pause", "t3")]
    assert not controller.stopped and scheduler.choose_trial_to_run(controller) is None
    assert controller.report(t1, 2, 0.3) == STOP  # the last of the rung: t0 (0.9) and t3 (0.5) are promoted
    assert controller.stopped == ["t2", "t1"]  # the paused loser by Tune's stop_trial, the reporting one by STOP
    assert (t1.status, t2.status) == ("TERMINATED", "TERMINATED")
    assert scheduler.decisions() == {(0, 2): (0, 3)}
    assert ("unpause", "t0") in controller.search_alg.searcher.calls
    assert scheduler.choose_trial_to_run(controller) is t0  # lowest number first
    t0.status = "RUNNING"
    assert scheduler.choose_trial_to_run(controller) is t3
    t3.status = "RUNNING"
    assert controller.report(t3, 4, 0.6) == PAUSE  # rung 4 waits for t0
    assert controller.report(t0, 4, 0.2) == STOP  # ceil(2 / 2) = 1: t3 goes on
    assert scheduler.choose_trial_to_run(controller) is t3
    t3.status = "RUNNING"
    assert controller.report(t3, 6, 0.7) == CONTINUE and controller.report(t3, 8, 0.8) == CONTINUE  # to max_t
    assert scheduler.stopped == {1: 2, 2: 2, 0: 4}


@pytest.mark.parametrize("mode,kept", [("max", (1, 2)), ("min", (0, 3))])
def test_the_promoted_are_the_top_ceil_n_over_eta_in_the_mode(mode, kept):
    scheduler = halving(mode, num_samples=4, reduction_factor=3)  # ceil(4 / 3) = 2
    controller = FakeController(scheduler)
    trials = start(controller, 4)
    for trial, value in zip(trials, (0.1, 0.9, 0.5, 0.2)):
        controller.report(trial, 2, value)
    assert scheduler.decisions()[(0, 2)] == kept
    assert sorted(int(t[1:]) for t in controller.stopped) == sorted(set(range(4)) - set(kept))


def test_ties_go_to_the_lower_trial_number_and_a_missing_metric_ranks_last():
    scheduler = halving(num_samples=5)
    controller = FakeController(scheduler)
    trials = start(controller, 5)
    for trial, value in zip(reversed(trials), (float("nan"), 0.5, 0.5, 0.5, 0.5)):  # t4 nan; t0..t3 tie
        controller.report(trial, 2, value)
    assert scheduler.decisions()[(0, 2)] == (0, 1, 2)  # ceil(5 / 2) = 3, by number
    assert scheduler.ranking({0: 0.5, 3: 0.9, 2: float("nan"), 1: 0.9}) == [1, 3, 0, 2]


def test_two_arrival_orders_of_the_same_values_take_the_same_decisions():
    values = {0: 0.3, 1: 0.8, 2: 0.1, 3: 0.6, 4: 0.8, 5: 0.45}
    runs = [simulate(values, seed) for seed in range(6)]
    decisions = {tuple(sorted(s.decisions().items())) for s, _, _ in runs}
    stopped = {tuple(sorted(s.stopped.items())) for s, _, _ in runs}
    reached = {tuple(sorted(at.items())) for _, _, at in runs}
    assert len(decisions) == len(stopped) == len(reached) == 1
    scheduler = runs[0][0]
    assert scheduler.decisions() == {(0, 2): (1, 3, 4), (0, 4): (1, 4)}  # 6 -> 3 -> 2 (0.8 and 0.8 tie)
    assert runs[0][2] == {0: 2, 1: 8, 2: 2, 3: 4, 4: 8, 5: 2}
    # the orders did differ: which trial paused first is not the same in every run
    firsts = {c.search_alg.searcher.calls[0] for _, c, _ in runs}
    assert len(firsts) > 1


def test_the_cap_on_running_trials_holds_when_resuming():
    scheduler = halving(num_samples=4, max_concurrent=1)
    controller = FakeController(scheduler)
    trials = start(controller, 4)
    for trial, value in zip(trials, (0.4, 0.3, 0.2, 0.1)):
        controller.report(trial, 2, value)
    for trial in trials[1:]:
        trial.status = "PAUSED" if trial.status == "RUNNING" else trial.status
    trials[0].status = "RUNNING"
    assert scheduler.choose_trial_to_run(controller) is None  # t0 runs, t1 (promoted, paused) waits
    trials[0].status = "TERMINATED"
    assert scheduler.choose_trial_to_run(controller) is trials[1]


def test_a_trial_that_errors_leaves_the_rung_and_the_rest_is_decided_without_it():
    scheduler = halving(num_samples=4)
    controller = FakeController(scheduler)
    t0, t1, t2, t3 = start(controller, 4)
    controller.report(t0, 2, 0.1)
    controller.report(t1, 2, 0.9)
    controller.report(t2, 2, 0.5)
    assert not controller.stopped
    t3.status = "ERROR"
    scheduler.on_trial_error(controller, t3)  # the rung's population is now t0..t2: ceil(3 / 2) = 2 go on
    assert scheduler.decisions() == {(0, 2): (1, 2)}
    assert controller.stopped == ["t0"] and t0.status == "TERMINATED"
    assert scheduler.choose_trial_to_run(controller) is t1


def test_a_trial_that_errors_after_recording_does_not_count():
    scheduler = halving(num_samples=3)
    controller = FakeController(scheduler)
    t0, t1, t2 = start(controller, 3)
    controller.report(t0, 2, 0.9)
    t0.status = "ERROR"  # (a paused trial cannot error in Tune; a running one reporting past the rung can)
    scheduler.on_trial_error(controller, t0)
    controller.report(t1, 2, 0.1)
    controller.report(t2, 2, 0.2)
    assert scheduler.decisions() == {(0, 2): (2,)}  # ceil(2 / 2) = 1 of t1, t2


def test_brackets_are_decided_independently_and_the_last_may_be_smaller():
    scheduler = halving(num_samples=5, bracket_size=2)
    controller = FakeController(scheduler)
    trials = start(controller, 5)
    assert controller.report(trials[4], 2, 0.9) == CONTINUE  # bracket 2 holds t4 alone: decided at once
    assert controller.report(trials[2], 2, 0.1) == PAUSE
    assert controller.report(trials[0], 2, 0.5) == PAUSE
    assert controller.report(trials[1], 2, 0.7) == CONTINUE  # bracket 0 complete: t1 over t0
    assert controller.report(trials[3], 2, 0.3) == CONTINUE  # bracket 1 complete: t3 over t2
    assert scheduler.decisions() == {(0, 2): (1,), (1, 2): (3,), (2, 2): (4,)}
    assert sorted(controller.stopped) == ["t0", "t2"]


def test_a_result_past_two_rungs_records_at_both_once_promoted():
    scheduler = halving(num_samples=2, max_t=16)  # rungs 2, 4, 8
    controller = FakeController(scheduler)
    t0, t1 = start(controller, 2)
    assert controller.report(t0, 6, 0.9) == PAUSE  # past rungs 2 and 4 in one result
    assert controller.report(t1, 2, 0.1) == STOP  # rung 2: t0; rung 4 holds t0 alone: decided, t0 resumes
    assert scheduler.decisions() == {(0, 2): (0,), (0, 4): (0,)}
    assert scheduler.choose_trial_to_run(controller) is t0


def test_the_scheduler_pickles_mid_sweep_and_goes_on_alike():
    scheduler = halving(num_samples=3)
    controller = FakeController(scheduler)
    t0, t1, t2 = start(controller, 3)
    controller.report(t0, 2, 0.5)
    controller.report(t1, 2, 0.7)
    copy = pickle.loads(pickle.dumps(scheduler))
    assert copy.decisions() == {} and copy.milestones == scheduler.milestones
    controller.scheduler = copy  # the restored scheduler takes the last result: same decision
    controller.report(t2, 2, 0.1)
    assert copy.decisions() == {(0, 2): (0, 1)} and copy.stopped == {2: 2}


def _drive(scheduler, controller, values, rng, at, concurrent, results=None) -> int:
    """Go on with a sweep of len(values) trials like `simulate` (restored PENDING trials first, then new ones in
    the searcher's order t0, t1, ...), for `results` results (None: to the end); the results handled."""
    done = 0
    while results is None or done < results:
        running = [t for t in controller.trials if t.status == "RUNNING"]
        while len(running) < concurrent:
            trial = next((t for t in controller.trials if t.status == "PENDING"), None)
            if trial is None and len(controller.trials) < len(values):
                trial = controller.add(f"t{len(controller.trials)}")
            if trial is None:
                trial = scheduler.choose_trial_to_run(controller)
            if trial is None:
                break
            trial.status = "RUNNING"
            at.setdefault(trial.trial_id, 0)  # a restored trial goes on from its last result (its checkpoint)
            running.append(trial)
        if not running:
            break
        trial = rng.choice(running)
        at[trial.trial_id] += 2
        number = int(trial.trial_id[1:])
        action = controller.report(trial, at[trial.trial_id], values[number] * at[trial.trial_id])
        if action == CONTINUE and at[trial.trial_id] >= 8:
            controller.stop_trial(trial)
        done += 1
    return done


@pytest.mark.parametrize("cut", [2, 5, 8, 11, 14])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_fresh_scheduler_on_the_state_file_goes_on_like_an_uninterrupted_run(tmp_path, seed, cut):
    """Half a sweep, then what a restored Tune experiment does: a new SyncHalving on the same state file, the
    trials re-added most recent result first (the ended TERMINATED, the others PENDING), the sweep going on in
    another order. Its numbers, decisions and stops are the uninterrupted run's."""
    values = {0: 0.3, 1: 0.8, 2: 0.1, 3: 0.6, 4: 0.8, 5: 0.45, 6: 0.2, 7: 0.7}
    expected, _, expected_at = simulate(values, 100 + seed, concurrent=3, bracket_size=4)
    path = tmp_path / "run" / "sync_halving.json"
    first = halving(num_samples=8, max_concurrent=3, bracket_size=4, state_path=path)
    before = FakeController(first)
    rng, at = random.Random(seed), {}
    assert _drive(first, before, values, rng, at, 3, results=cut) == cut
    paused = sorted(t.trial_id for t in before.trials if t.status == "PAUSED")
    ended = sorted(t.trial_id for t in before.trials if t.status == "TERMINATED")
    assert path.exists() and not list(path.parent.glob(".sync_halving.*"))  # no temporary file left behind

    second = halving(num_samples=8, max_concurrent=3, bracket_size=4, state_path=path)
    assert second.decisions() == first.decisions()
    after = FakeController(second)
    last_time = {t.trial_id: (at.get(t.trial_id, 0), i) for i, t in enumerate(before.trials)}
    for old in sorted(before.trials, key=lambda t: last_time[t.trial_id], reverse=True):  # Tune's re-add order
        trial = FakeTrial(old.trial_id)
        trial.status = "TERMINATED" if old.status in ("TERMINATED", "ERROR") else "PENDING"
        trial.last_result = dict(old.last_result)
        after.trials.append(trial)
        second.on_trial_add(after, trial)
    assert second._number == {f"t{i}": i for i in range(len(before.trials))}  # whatever the re-add order
    _drive(second, after, values, random.Random(1000 + seed), at, 3)
    assert all(t.status == "TERMINATED" for t in after.trials), (paused, ended, after.trials)
    assert second.decisions() == expected.decisions(), (paused, ended)
    assert second.stopped == expected.stopped
    assert {int(t[1:]): i for t, i in at.items()} == expected_at
    assert not set(before.stopped) & set(after.stopped)  # nobody was stopped twice


def test_the_state_file_is_taken_up_after_unpickling_and_keeps_a_promoted_paused_trial_going(tmp_path):
    path = tmp_path / "sync_halving.json"
    scheduler = halving(num_samples=4, state_path=path)
    pickled = pickle.dumps(scheduler)  # Tune pickles the scheduler into tuner.pkl when the Tuner is created
    controller = FakeController(scheduler)
    t0, t1, t2, t3 = start(controller, 4)
    for trial, value in zip((t0, t2, t3, t1), (0.9, 0.1, 0.5, 0.3)):
        controller.report(trial, 2, value)  # t0 and t3 promoted; t0 resumes, t3 waits to
    t0.status = "RUNNING"
    controller.report(t0, 3, 0.9)
    restored = pickle.loads(pickled)  # the state of the pickle's time: empty
    again = FakeController(restored)
    for old in (t0, t2, t1, t3):
        trial = FakeTrial(old.trial_id)
        trial.status = "TERMINATED" if old.status == "TERMINATED" else "PENDING"
        again.trials.append(trial)
        restored.on_trial_add(again, trial)
    assert restored.decisions() == {(0, 2): (0, 3)} and restored.stopped == {1: 2, 2: 2}
    new = {t.trial_id: t for t in again.trials}
    new["t0"].status = new["t3"].status = "RUNNING"
    assert again.report(new["t3"], 3, 0.5) == CONTINUE  # promoted while paused: it goes on
    assert again.report(new["t3"], 4, 0.5) == PAUSE  # rung 4 waits for t0
    assert again.report(new["t0"], 4, 0.2) == STOP
    assert again.stopped == ["t0"] and restored.decisions() == {(0, 2): (0, 3), (0, 4): (3,)}


def test_restored_trials_paused_on_an_undecided_rung_are_paused_again_and_settled_when_it_is_decided(tmp_path):
    path = tmp_path / "sync_halving.json"
    scheduler = halving(num_samples=4, state_path=path)
    controller = FakeController(scheduler)
    t0, t1, t2, t3 = start(controller, 4)
    controller.report(t0, 2, 0.9)
    controller.report(t1, 2, 0.1)  # both paused on rung 2; then Tune's state is saved and the run cut
    restored = halving(num_samples=4, state_path=path)
    again = FakeController(restored)
    trials = {}
    for trial_id in ("t3", "t1", "t2", "t0"):  # Tune re-adds them all PENDING
        trials[trial_id] = FakeTrial(trial_id)
        again.trials.append(trials[trial_id])
        restored.on_trial_add(again, trials[trial_id])
    assert {t: trial.status for t, trial in trials.items()} == {"t3": "PENDING", "t1": "PAUSED", "t2": "PENDING",
                                                                 "t0": "PAUSED"}
    assert again.search_alg.searcher.calls == [("unpause", "t3"), ("pause", "t1"), ("unpause", "t2"),
                                               ("pause", "t0")]
    assert restored.choose_trial_to_run(again) is trials["t3"]  # the pending ones; the paused wait
    trials["t3"].status = trials["t2"].status = "RUNNING"
    assert again.report(trials["t2"], 2, 0.5) == PAUSE
    assert again.report(trials["t3"], 2, 0.2) == STOP  # the rung: 0.9 (t0) and 0.5 (t2) go on
    assert again.stopped == ["t1", "t3"] and trials["t1"].status == "TERMINATED"  # the paused loser: unstarted
    assert restored.decisions() == {(0, 2): (0, 2)} and restored.stopped == {1: 2, 3: 2}
    assert restored.choose_trial_to_run(again) is trials["t0"]


def test_a_trial_the_state_file_knows_but_tune_did_not_re_add_is_dropped(tmp_path):
    path = tmp_path / "sync_halving.json"
    scheduler = halving(num_samples=4, state_path=path)
    controller = FakeController(scheduler)
    t0, t1, t2 = start(controller, 3)
    controller.report(t0, 2, 0.9)
    controller.report(t1, 2, 0.1)
    controller.report(t2, 2, 0.5)
    controller.add("t3")  # (Tune's experiment state was saved before t3 came)
    restored = halving(num_samples=4, state_path=path)
    again = FakeController(restored)
    for trial_id in ("t0", "t1", "t2"):
        trial = FakeTrial(trial_id)
        again.trials.append(trial)
        restored.on_trial_add(again, trial)
    fresh = again.add("t9")  # the searcher's next trial takes the free number 3
    assert restored._number["t9"] == 3 and "t3" not in restored._number
    fresh.status = "RUNNING"
    assert again.report(fresh, 2, 0.3) == STOP
    assert restored.decisions() == {(0, 2): (0, 2)} and again.stopped == ["t1", "t9"]


def test_a_state_file_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "sync_halving.json"
    start(FakeController(halving(num_samples=4, state_path=path)), 2)
    with pytest.raises(ValueError, match="remove the file"):
        halving(num_samples=5, state_path=path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a SyncHalving state file"):
        halving(num_samples=4, state_path=path)


def test_bad_settings_name_the_setting_and_what_is_valid():
    with pytest.raises(ValueError, match=r"reduction_factor: got 1; expected a number > 1"):
        SyncHalving(num_samples=2, max_t=4, reduction_factor=1)
    with pytest.raises(ValueError, match=r"bracket_size: got 0; expected an integer >= 1"):
        SyncHalving(num_samples=2, max_t=4, bracket_size=0)
    assert SyncHalving(num_samples=4, max_t=4, bracket_size=10).bracket_size == 4  # clipped
    with pytest.raises(ValueError, match="metric and a mode"):
        FakeController(SyncHalving(num_samples=2, max_t=4)).add("t0")


class ListSearcher(Searcher):
    """Proposes {"i": 0}, {"i": 1}, ... then FINISHED after `total`; records what it was told."""

    def __init__(self, total: int = 100):
        super().__init__(metric="score", mode="max")
        self.total, self.proposed, self.completed, self.results = total, 0, [], []

    def suggest(self, trial_id):
        if self.proposed >= self.total:
            return Searcher.FINISHED
        self.proposed += 1
        return {"i": self.proposed - 1}

    def on_trial_result(self, trial_id, result):
        self.results.append((trial_id, result))

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((trial_id, result, error))

    def save(self, path):
        with open(path, "wb") as f:
            pickle.dump(self.__dict__.copy(), f)

    def restore(self, path):
        with open(path, "rb") as f:
            self.__dict__.update(pickle.load(f))


def test_the_gate_proposes_a_bracket_only_once_the_earlier_brackets_completed():
    gate = BracketGate(ListSearcher(), bracket_size=2)
    assert gate.suggest("a") == {"i": 0} and gate.suggest("b") == {"i": 1}
    assert gate.suggest("c") is None  # bracket 1 waits for a and b
    gate.on_trial_complete("a", {"score": 1.0})
    assert gate.suggest("c") is None
    gate.on_trial_complete("b", error=True)  # an error completes it too
    assert gate.suggest("c") == {"i": 2} and gate.suggest("d") == {"i": 3}
    assert gate.suggest("e") is None
    assert gate.searcher.proposed == 4  # the wrapped searcher was not asked while the gate waited


def test_the_gate_caps_running_trials_without_counting_paused_ones():
    gate = BracketGate(ListSearcher(), bracket_size=6, max_concurrent=2)
    assert gate.suggest("a") and gate.suggest("b")
    assert gate.suggest("c") is None
    gate.on_pause("a")
    assert gate.suggest("c") == {"i": 2}
    assert gate.suggest("d") is None
    gate.on_unpause("a")
    gate.on_pause("b")
    gate.on_pause("c")
    assert gate.suggest("d") == {"i": 3}


def test_the_gate_passes_finished_through_and_hands_a_paused_trials_last_result_when_tune_gives_none():
    inner = ListSearcher(total=1)
    gate = BracketGate(inner, bracket_size=5)
    assert gate.suggest("a") == {"i": 0}
    assert gate.suggest("b") == Searcher.FINISHED
    gate.on_trial_result("a", {"score": 0.3, contract.ITERATION: 2})
    gate.on_pause("a")
    gate.on_trial_complete("a")  # Tune stops a paused trial without a result
    assert inner.completed == [("a", {"score": 0.3, contract.ITERATION: 2}, False)]
    assert inner.results == [("a", {"score": 0.3, contract.ITERATION: 2})]


def test_the_gate_keeps_its_counters_through_get_state_and_save_to_dir(tmp_path):
    gate = BracketGate(ListSearcher(), bracket_size=2, max_concurrent=2)
    gate.suggest("a"), gate.suggest("b")
    gate.on_trial_complete("a", {"score": 1.0})
    gate.on_pause("b")
    copy = BracketGate(ListSearcher(), bracket_size=2, max_concurrent=2)
    copy.set_state(gate.get_state())
    assert (copy.order, copy.completed, copy.paused) == ({"a": 0, "b": 1}, {"a"}, {"b"})
    assert copy.suggest("c") is None  # b (bracket 0) has not completed
    gate.save_to_dir(str(tmp_path))
    restored = BracketGate(ListSearcher(), bracket_size=2, max_concurrent=2)
    restored.restore_from_dir(str(tmp_path))
    assert (restored.order, restored.completed, restored.paused) == ({"a": 0, "b": 1}, {"a"}, {"b"})
    assert restored.searcher.proposed == 2  # the wrapped searcher's own state came back too
    restored.on_trial_complete("b", {"score": 0.5})
    assert restored.suggest("c") == {"i": 2}


def test_study_states_unwraps_nested_searchers():
    from kdray.orchestration.tune_setup import study_states

    class WithStates(ListSearcher):
        def trial_states(self):
            return {"COMPLETE": 1}

    config = type("TuneConfig", (), {})()
    config.search_alg = BracketGate(WithStates(), bracket_size=2)
    assert study_states(config) == {"COMPLETE": 1}
    config.search_alg = BracketGate(ListSearcher(), bracket_size=2)
    assert study_states(config) == {}


def _seeded_search(tmp_path, name: str):
    """One seeded search through Tune: 6 samples, 3 at once, SyncHalving grace 2, eta 2, max_t 8, a trainable
    that reports x · (1 + iteration / 8) with small random sleeps and pauses/restores through tune checkpoints."""
    import os
    import tempfile
    from functools import partial

    from ray import tune

    from kdray.orchestration.search import KdraySearch
    from kdray.space import Dimension, sample_config

    def trainable(config):  # a local function: Ray ships it by value to its workers
        import random as rnd
        import time as clock

        start_at, checkpoint = 0, tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder, open(os.path.join(folder, "state.json")) as f:
                start_at = json.load(f)["iteration"]
        for iteration in range(start_at + 1, 9):
            clock.sleep(rnd.uniform(0.0, 0.3))
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, "state.json"), "w") as f:
                    json.dump({"iteration": iteration}, f)
                tune.report({contract.VAL_MIOU: config["x"] * (1 + iteration / 8), contract.ITERATION: iteration,
                             contract.ITERATIONS_TOTAL: 8, "restored_from": start_at},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    space = partial(sample_config, dimensions=(Dimension("x", "uniform", (0.0, 1.0)),))
    search = KdraySearch(space=space, metric=contract.VAL_MIOU, mode="max", seed=3)
    scheduler = SyncHalving(num_samples=6, max_t=8, grace_period=2, reduction_factor=2, max_concurrent=3)
    config = tune.TuneConfig(metric=contract.VAL_MIOU, mode="max", search_alg=BracketGate(search, 6),
                             scheduler=scheduler, num_samples=6, max_concurrent_trials=3)
    began = time.monotonic()
    grid = tune.Tuner(trainable, tune_config=config,
                      run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0)).fit()
    seconds = time.monotonic() - began
    out = {}
    for result in grid:
        history = result.metrics_dataframe
        out[round(result.config["x"], 12)] = {
            "last": int(result.metrics[contract.ITERATION]),
            "restored": sorted(set(history["restored_from"])),
            "error": result.error,
        }
    return search, out, seconds


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long  # one rung of it on kdray's own trials: tests/test_sweep.py's search test
def test_through_tune_the_promoted_resume_from_their_rung_and_the_stopped_are_pruned(tmp_path):
    """One seeded search through Tune (run-to-run sameness is the restore test's: a cut and restored run against
    an uncut one)."""
    import ray

    ray.init(num_cpus=3, log_to_driver=False, runtime_env=pinned_runtime_env())
    try:
        search, run, seconds = _seeded_search(tmp_path, "first")
    finally:
        ray.shutdown()
    print(f"\nrun: {seconds:.1f} s {run}")
    assert all(r["error"] is None for r in run.values()) and len(run) == 6
    xs = sorted(run, reverse=True)
    # 6 -> ceil(6/2) = 3 at iteration 2 -> ceil(3/2) = 2 at iteration 4 -> those 2 run to 8
    assert [run[x]["last"] for x in xs] == [8, 8, 4, 2, 2, 2]
    # the promoted that paused at iteration 2 resumed from their checkpoint there (the trial whose result
    # completed the rung, if promoted, went on without a pause)
    assert sum(2 in run[x]["restored"] for x in xs[:3]) >= 2, run
    assert all(run[x]["restored"] == [0] for x in xs[3:]), run  # the stopped ones never came back
    trials = search._ot_study.get_trials(deepcopy=False)
    states = {round(t.params["x"], 12): t.state.name for t in trials}
    assert states == {x: ("COMPLETE" if run[x]["last"] == 8 else "PRUNED") for x in xs}


_RESTORE_JOB = '''"""A seeded search under SyncHalving (6 samples, 3 at once, grace 2, eta 2, max_t 8), its
halving state in the experiment folder: run as a script, it runs the search `argv[2]` under the folder `argv[1]`."""
import json
import os
import sys
import tempfile
from functools import partial

from ray import tune

from kdray import contract
from kdray.orchestration.halving import BracketGate, SyncHalving
from kdray.orchestration.search import KdraySearch
from kdray.orchestration.tune_setup import pinned_runtime_env
from kdray.space import Dimension, sample_config


def make_trainable():
    def trainable(config):  # a local function: Ray ships it by value to its workers
        import random as rnd
        import time as clock

        start_at, checkpoint = 0, tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder, open(os.path.join(folder, "state.json")) as f:
                start_at = json.load(f)["iteration"]
        for iteration in range(start_at + 1, 9):
            clock.sleep(rnd.uniform(0.0, 0.3))
            with tempfile.TemporaryDirectory() as folder:
                with open(os.path.join(folder, "state.json"), "w") as f:
                    json.dump({"iteration": iteration}, f)
                tune.report({contract.VAL_MIOU: config["x"] * (1 + iteration / 8), contract.ITERATION: iteration,
                             contract.ITERATIONS_TOTAL: 8, "restored_from": start_at},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    return trainable


def tuner(storage, name):
    space = partial(sample_config, dimensions=(Dimension("x", "uniform", (0.0, 1.0)),))
    search = KdraySearch(space=space, metric=contract.VAL_MIOU, mode="max", seed=3)
    scheduler = SyncHalving(num_samples=6, max_t=8, grace_period=2, reduction_factor=2, max_concurrent=3,
                            state_path=os.path.join(storage, name + ".sync_halving.json"))
    config = tune.TuneConfig(metric=contract.VAL_MIOU, mode="max", search_alg=BracketGate(search, 6),
                             scheduler=scheduler, num_samples=6, max_concurrent_trials=3)
    return tune.Tuner(make_trainable(), tune_config=config,
                      run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))


if __name__ == "__main__":
    import ray

    ray.init(num_cpus=3, log_to_driver=False, runtime_env=pinned_runtime_env())
    tuner(sys.argv[1], sys.argv[2]).fit()
'''


def _last_iterations(grid) -> dict[float, int]:
    return {round(r.config["x"], 12): int(r.metrics[contract.ITERATION]) for r in grid}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.long
def test_through_tune_a_sweep_cut_mid_bracket_and_restored_stops_the_trials_an_uninterrupted_one_stops(tmp_path):
    """The search runs in a subprocess until 3 trials wait on the first rung, gets Ctrl+C (Tune saves its state),
    and is restored here with Tuner.restore(resume_unfinished, resume_errored): the scheduler, fresh from
    tuner.pkl, takes up its state file; the same trials end at the same iterations as in a run not cut. So two
    runs of one seeded search propose the same trials and stop the same ones, a cut and restore between."""
    import importlib.util
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import ray
    from ray import tune

    script = tmp_path / "halving_job.py"
    script.write_text(_RESTORE_JOB)
    spec = importlib.util.spec_from_file_location("halving_job", script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    state_file = tmp_path / "cut.sync_halving.json"  # beside the experiment folder, not in it (see SyncHalving)
    log = tmp_path / "cut.log"
    began = time.monotonic()
    with open(log, "w") as out:
        driver = subprocess.Popen([sys.executable, str(script), str(tmp_path), "cut"], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1],
                                  start_new_session=True)
        at_cut = None
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and driver.poll() is None:
                time.sleep(0.05)
                if state_file.exists():
                    state = json.loads(state_file.read_text())
                    first_rung = [values for b, r, values in state["records"] if (b, r) == (0, 0)]
                    if first_rung and len(first_rung[0]) >= 3 and not state["promoted"]:
                        at_cut = state
                        break
            assert at_cut is not None, log.read_text()[-3000:]
            os.kill(driver.pid, signal.SIGINT)  # Ctrl+C: Tune saves the experiment's state and returns
            driver.wait(timeout=90)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    cut_s = time.monotonic() - began
    after_cut = json.loads(state_file.read_text())
    assert len(after_cut["left"]) < 6, after_cut  # the sweep did not end before the cut
    ray.init(num_cpus=3, log_to_driver=False, runtime_env=pinned_runtime_env())
    try:
        began = time.monotonic()
        restored = tune.Tuner.restore(str(tmp_path / "cut"), trainable=job.make_trainable(),
                                      resume_unfinished=True, resume_errored=True)
        resumed = _last_iterations(restored.fit())
        restore_s = time.monotonic() - began
        began = time.monotonic()
        whole = _last_iterations(job.tuner(str(tmp_path), "whole").fit())
        whole_s = time.monotonic() - began
    finally:
        ray.shutdown()
    final = json.loads(state_file.read_text())
    uncut = json.loads((tmp_path / "whole.sync_halving.json").read_text())
    print(f"\ncut after {cut_s:.1f} s with records {at_cut['records']}, numbers {at_cut['numbers']}"
          f"\nafter the cut: promoted {after_cut['promoted']}, left {after_cut['left']}"
          f"\nrestored: {restore_s:.1f} s {resumed}; final promoted {final['promoted']}"
          f"\nuninterrupted: {whole_s:.1f} s {whole}")
    assert set(final["numbers"].items()) >= set(after_cut["numbers"].items())  # the numbers stood
    assert (final["promoted"], final["stopped"]) == (uncut["promoted"], uncut["stopped"])
    assert resumed == whole
    xs = sorted(whole, reverse=True)
    assert [whole[x] for x in xs] == [8, 8, 4, 2, 2, 2]
