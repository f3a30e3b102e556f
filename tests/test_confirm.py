"""A search's confirmation stage (`kdray.orchestration.confirm`), the `confirm` key of a space, the CE-only
baseline row of ablations, and the report of a confirmed search (`search_summary`, the verdict). No Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_report import STEPS, Store, by_name, cells, cells_by_method, config, history, trial_tags

from kdray import contract
from kdray.cli import default_job
from kdray.config import load_job, override
from kdray.errors import ConfigError
from kdray.losses.objective import method_label
from kdray.models import build_model
from kdray.orchestration.confirm import (
    CE_ROW,
    TUNE_SPLIT_OFF,
    add_baseline_row,
    candidates,
    ce_only_overrides,
    describe,
    planned_trials,
    row_tags,
    stage_plan,
    stage_space,
)
from kdray.orchestration.outcome import FINISHED, INTERRUPTED, NOT_STARTED, STOPPED_EARLY, TrialSummary
from kdray.orchestration.plan import SweepRequest, dry_run, prepare
from kdray.reporting import build_tables, read_sweep, write_report
from kdray.space import ROW_KEY, SEED_KEY, Confirm, load_space, parse_space
from kdray.sweep import default_space

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "jobs" / "demo.yaml")
DEMO_SPACE = str(REPO / "search_spaces" / "demo.yaml")
SPACES = REPO / "search_spaces"


@pytest.fixture(scope="module")
def demo_job():
    return load_job(DEMO)


def search_data(**changes) -> dict:
    data = yaml.safe_load(Path(DEMO_SPACE).read_text())
    data.update(changes)
    return {k: v for k, v in data.items() if v is not None}


def text(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def write(path: Path, data: dict) -> str:
    path.write_text(text(data))
    return str(path)


# --- the `confirm` key ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("confirm", "expected"), [
    ({"top_k": 3, "seeds": [0, 1, 2]}, Confirm(3, (0, 1, 2))),
    ({"top_k": 6, "seeds": [7]}, Confirm(6, (7,))),  # top_k may be num_samples
    ({"top_k": 1, "seeds": [5, 2]}, Confirm(1, (5, 2))),  # the seeds' order is kept
    (False, None),
    (None, None),  # absent
])
def test_confirm_is_parsed(tmp_path, demo_job, confirm, expected):
    data = search_data(confirm=confirm)
    assert ("confirm" in data) == (confirm is not None)
    assert parse_space(text(data)).confirm == expected
    assert load_space(write(tmp_path / "s.yaml", data), demo_job).confirm == expected


@pytest.mark.parametrize(("confirm", "fragments"), [
    ({"top_k": 0, "seeds": [0]}, ["confirm.top_k: got 0", "from 1 to num_samples (6)"]),
    ({"top_k": 7, "seeds": [0]}, ["confirm.top_k: got 7", "num_samples (6)"]),
    ({"top_k": True, "seeds": [0]}, ["confirm.top_k: got True"]),
    ({"top_k": "2", "seeds": [0]}, ["confirm.top_k: got '2'"]),
    ({"top_k": 2.0, "seeds": [0]}, ["confirm.top_k: got 2.0"]),
    ({"top_k": 2, "seeds": []}, ["confirm.seeds: got []", "non-empty list of integers"]),
    ({"top_k": 2, "seeds": [0, 0]}, ["confirm.seeds: got [0, 0]", "each seed once"]),
    ({"top_k": 2, "seeds": [0, "1"]}, ["confirm.seeds: got [0, '1']"]),
    ({"top_k": 2, "seeds": [0, True]}, ["confirm.seeds: got [0, True]"]),
    ({"top_k": 2, "seeds": 3}, ["confirm.seeds: got 3"]),
    ({"top_k": 2}, ["confirm: got {'top_k': 2}: missing seeds"]),
    ({"seeds": [0, 1]}, ["confirm: got {'seeds': [0, 1]}: missing top_k"]),
    ({"top_k": 2, "seeds": [0], "rank_by": "mean"}, ["confirm: got", "unknown key(s) rank_by"]),
    (True, ["confirm: got True", "or false for no confirmation"]),
    ([2, [0, 1]], ["confirm: got [2, [0, 1]]"]),
])
def test_bad_confirm_values_are_refused_naming_the_key(tmp_path, demo_job, confirm, fragments):
    data = search_data(confirm=confirm)
    for parse in (lambda: parse_space(text(data), "s.yaml"), lambda: load_space(write(tmp_path / "s.yaml", data),
                                                                                demo_job)):
        with pytest.raises(ConfigError) as err:
            parse()
        message = str(err.value)
        assert message.startswith("s.yaml: ") and "\n" not in message
        for fragment in fragments:
            assert fragment in message, (fragment, message)


def test_confirm_is_a_search_key_only():
    ablation = {"name": "a", "seeds": [0], "rows": [{"name": "CE"}], "confirm": {"top_k": 1, "seeds": [0]}}
    with pytest.raises(ConfigError, match=r"a: confirm: unknown key for an ablation space"):
        parse_space(text(ablation), "a")


def test_top_k_is_checked_against_the_spaces_own_num_samples():
    assert parse_space(text(search_data(num_samples=2, confirm={"top_k": 2, "seeds": [0]}))).confirm.top_k == 2
    with pytest.raises(ConfigError, match=r"confirm.top_k: got 3; .*num_samples \(2\)"):
        parse_space(text(search_data(num_samples=2, confirm={"top_k": 3, "seeds": [0]})))


def test_the_default_sweep_confirms():
    space = load_space(default_space(), load_job(default_job()))
    assert space.kind == "search" and space.confirm == Confirm(2, (0, 1, 2))
    assert planned_trials(space) == (2 + 1) * 3


def shipped_spaces() -> list[Path]:
    return sorted(SPACES.glob("*.yaml")) + [REPO / "kdray" / "demo" / "space.yaml"]


@pytest.mark.parametrize("path", shipped_spaces(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_search_space_confirms(path, demo_job):
    raw = yaml.safe_load(path.read_text())
    space = load_space(path, demo_job)
    if space.kind != "search":
        assert "confirm" not in raw
        return
    assert isinstance(raw.get("confirm"), dict), f"{path.name}: a shipped search must confirm its best trials"
    assert space.confirm is not None and 1 <= space.confirm.top_k <= space.num_samples
    assert len(space.confirm.seeds) >= 2  # Welch's test needs 2 values per row
    assert planned_trials(space) == (space.confirm.top_k + 1) * len(space.confirm.seeds)


def test_some_shipped_spaces_are_searches(demo_job):
    kinds = [load_space(p, demo_job).kind for p in shipped_spaces()]
    assert kinds.count("search") >= 3 and kinds.count("ablation") >= 3  # demo (twice), i2ckd_weights; 4 ablations


# --- which trials the stage confirms -----------------------------------------------------------------------------

def summary(tid, last, iteration=4, status=FINISHED, seed=0, **params):
    params = params or {"losses.kd.weight": float(tid.split("_")[1])}
    return TrialSummary(tid, tid, seed, {**params, SEED_KEY: seed}, last, last, iteration, status, "search")


def ids(chosen):
    return [c.trial_id for c in chosen]


def test_candidates_rank_by_iteration_then_score_then_id():
    trials = [summary("t_1", 0.70), summary("t_2", 0.80, iteration=2, status=STOPPED_EARLY),
              summary("t_3", 0.75), summary("t_4", 0.75), summary("t_5", 0.60, iteration=3, status=STOPPED_EARLY),
              summary("t_6", 0.65, iteration=3, status=STOPPED_EARLY)]
    chosen = candidates(trials, top_k=6)
    # finished (iteration 4) first, by score, ties by id; then iteration 3; the best score (stopped at 2) last
    assert ids(chosen) == ["t_3", "t_4", "t_1", "t_6", "t_5", "t_2"]
    assert [c.rank for c in chosen] == [1, 2, 3, 4, 5, 6]
    first = chosen[0]
    assert first.params == {"losses.kd.weight": 3.0} and first.score == 0.75 and first.iteration == 4
    assert first.status == FINISHED and chosen[-1].status == STOPPED_EARLY
    assert ids(candidates(trials, top_k=2)) == ["t_3", "t_4"]
    assert ids(candidates(list(reversed(trials)), top_k=3)) == ["t_3", "t_4", "t_1"]  # not the input's order


def test_candidates_mode_min():
    trials = [summary("t_1", 0.30), summary("t_2", 0.10), summary("t_3", 0.20),
              summary("t_4", 0.05, iteration=1, status=STOPPED_EARLY)]
    assert ids(candidates(trials, 4, mode="min")) == ["t_2", "t_3", "t_1", "t_4"]
    assert ids(candidates(trials, 4, mode="max")) == ["t_1", "t_3", "t_2", "t_4"]


def test_candidates_are_distinct_configurations_whatever_the_seed():
    same = {"losses.kd.weight": 2.0, "losses.i2ckd.enabled": True}
    trials = [summary("t_1", 0.70, seed=0, **same), summary("t_2", 0.72, seed=1, **same),
              summary("t_3", 0.71, **{"losses.i2ckd.enabled": True, "losses.kd.weight": 2.0}),  # key order aside
              summary("t_4", 0.69, **{"losses.kd.weight": 2.0, "losses.i2ckd.enabled": False})]
    chosen = candidates(trials, top_k=3)
    assert ids(chosen) == ["t_2", "t_4"]  # the best of the three alike, then the other configuration
    assert chosen[0].params == same and SEED_KEY not in chosen[0].params


def test_candidates_skip_trials_without_a_usable_score():
    trials = [summary("t_1", 0.90, status="failed: loss is NaN at iteration 120"),
              summary("t_2", math.nan), summary("t_3", math.nan, iteration=2, status=STOPPED_EARLY),
              summary("t_4", 0.95, iteration=3, status=INTERRUPTED), summary("t_5", 0.99, iteration=0,
                                                                              status=NOT_STARTED),
              summary("t_6", 0.50), summary("t_7", 0.40, iteration=2, status=STOPPED_EARLY)]
    chosen = candidates(trials, top_k=5)  # more than the pool
    assert ids(chosen) == ["t_6", "t_7"] and [c.rank for c in chosen] == [1, 2]
    assert candidates([summary("t_1", 0.5, status="failed: x")], 3) == []
    assert candidates([], 3) == []


def test_candidates_skip_an_infinite_score():
    """"with a finite score": an infinite value is no score to rank by."""
    trials = [summary("t_1", math.inf), summary("t_2", 0.5), summary("t_3", -math.inf)]
    assert ids(candidates(trials, 3)) == ["t_2"]


# --- the stage's rows, tags, seeds and space ---------------------------------------------------------------------

SEARCH = {"name": "s", "num_samples": 8, "overrides": {"optim.iterations": 300},
          "space": {"losses.kd.enabled": True, "losses.kd.weight": {"loguniform": [0.1, 10.0]},
                    "losses.i2ckd.enabled": {"choice": [True, False]},
                    "losses.i2ckd.margin": {"uniform": [0.1, 2.0], "if": "losses.i2ckd.enabled"}},
          "confirm": {"top_k": 2, "seeds": [3, 4, 5]}}
KD_ONLY = {"losses.kd.enabled": True, "losses.kd.weight": 2.5, "losses.i2ckd.enabled": False}
KD_I2CKD = {"losses.kd.enabled": True, "losses.kd.weight": 0.5, "losses.i2ckd.enabled": True,
            "losses.i2ckd.margin": 1.25}


@pytest.fixture(scope="module")
def tuned_job(demo_job):
    return override(demo_job, {"data.tune_split.fraction": 0.1, "run.seed": 9})


def search_space(tmp_path, job, **changes):
    return load_space(write(tmp_path / "space.yaml", {**SEARCH, **changes}), job)


def chosen_two():
    return candidates([summary("t_3", 0.71, **KD_ONLY), summary("t_5", 0.74, iteration=2, status=STOPPED_EARLY,
                                                                **KD_I2CKD),
                       summary("t_8", 0.61, **KD_I2CKD), summary("t_9", 0.2, status="failed: x", **KD_ONLY)], 2)


ROW_1, ROW_2 = "Search #1 (t_3)", "Search #2 (t_8)"  # a candidate's row: its rank and its trial


def test_stage_plan_rows_tags_and_seeds(tmp_path, tuned_job):
    space = search_space(tmp_path, tuned_job)
    chosen = chosen_two()
    assert ids(chosen) == ["t_3", "t_8"]
    plan = stage_plan(space, tuned_job, chosen)
    assert [r["name"] for r in plan["rows"]] == [CE_ROW, ROW_1, ROW_2]
    assert plan["seeds"] == [3, 4, 5]
    ce, first, second = plan["rows"]
    assert first["set"] == KD_ONLY and second["set"] == KD_I2CKD
    jobs = {r["name"]: override(tuned_job, {**space.overrides, **r["set"]}) for r in plan["rows"]}
    # the CE row: the search's fixed settings without a teacher-reading loss (CE itself stays on)
    assert method_label(jobs[CE_ROW].losses) == "CE" and jobs[CE_ROW].losses.ce.enabled
    assert not any(v is True for v in ce["set"].values())
    assert method_label(jobs[ROW_1].losses) == "KD" and method_label(jobs[ROW_2].losses) == "KD+I2CKD"
    assert jobs[ROW_2].losses.i2ckd.margin == 1.25 and jobs[ROW_1].losses.kd.weight == 2.5
    tags = row_tags(plan)
    assert tags[CE_ROW] == {contract.STAGE: contract.STAGE_CONFIRM}
    assert tags[ROW_1] == {contract.STAGE: "confirm", contract.CONFIRMS: "t_3", contract.SEARCH_RANK: "1",
                           contract.SEARCH_SCORE: repr(0.71), contract.SEARCH_ITERATION: "4"}
    assert tags[ROW_2][contract.CONFIRMS] == "t_8" and tags[ROW_2][contract.SEARCH_RANK] == "2"
    assert float(tags[ROW_2][contract.SEARCH_SCORE]) == 0.61
    assert [r["name"] for r in stage_plan(space, tuned_job, chosen, with_ce=False)["rows"]] == [ROW_1, ROW_2]
    # the plan lives in the sweep's state file: plain JSON, and the same stage from its copy
    copy = json.loads(json.dumps(plan))
    assert copy == plan and stage_space(space, tuned_job, copy).rows == stage_space(space, tuned_job, plan).rows


def ce_job(space, base, plan):
    stage = stage_space(space, base, plan)
    return override(base, stage.trial_overrides({ROW_KEY: CE_ROW, SEED_KEY: stage.seeds[0]}))


def test_the_ce_row_switches_off_only_what_is_on(tmp_path, demo_job):
    space = search_space(tmp_path, demo_job)  # kd on in every trial (fixed in space:); the job: CE only
    # the space's fixed keys are the CE row's too, so kd (fixed on there) is switched off
    kd_only = candidates([summary("t_1", 0.7, **KD_ONLY), summary("t_2", 0.6, **{**KD_ONLY, "losses.kd.weight": 1.0})],
                         2)
    plan = stage_plan(space, demo_job, kd_only)
    assert plan["rows"][0]["set"] == {"losses.kd.enabled": False}
    assert method_label(ce_job(space, demo_job, plan).losses) == "CE"
    # a distillation loss the space's overrides switch on is switched off
    cwd = search_space(tmp_path, demo_job, overrides={"losses.cwd.enabled": True})
    plan = stage_plan(cwd, demo_job, kd_only)
    assert plan["rows"][0]["set"] == {"losses.kd.enabled": False, "losses.cwd.enabled": False}
    assert method_label(ce_job(cwd, demo_job, plan).losses) == "CE"
    label = method_label(override(demo_job, {**cwd.overrides, **plan["rows"][1]["set"]}).losses)
    assert set(label.split("+")) == {"KD", "CWD"}
    # so is one the job itself enables
    kd_job = override(demo_job, {"losses.kd.enabled": True})
    plan = stage_plan(space, kd_job, kd_only)
    assert plan["rows"][0]["set"] == {"losses.kd.enabled": False}
    assert method_label(ce_job(space, kd_job, plan).losses) == "CE"
    assert ce_only_overrides([kd_job]) == {"losses.kd.enabled": False}
    assert ce_only_overrides([demo_job]) == {}


def test_without_confirm_the_stage_is_the_ce_row_at_the_jobs_seed(tmp_path, tuned_job):
    space = search_space(tmp_path, tuned_job, confirm=False)
    assert space.confirm is None and planned_trials(space) == 1
    plan = stage_plan(space, tuned_job, [])
    assert [r["name"] for r in plan["rows"]] == [CE_ROW] and plan["seeds"] == [9]
    assert method_label(ce_job(space, tuned_job, plan).losses) == "CE" and ce_job(space, tuned_job, plan).run.seed == 9
    assert "no confirmation stage" in describe(space, override(tuned_job, space.overrides))
    assert "seed 9" in describe(space, override(tuned_job, space.overrides))


def test_stage_space_runs_rows_by_seeds_on_the_whole_training_split(tmp_path, tuned_job):
    space = search_space(tmp_path, tuned_job)
    plan = stage_plan(space, tuned_job, chosen_two())
    stage = stage_space(space, tuned_job, plan)
    assert stage.kind == "ablation" and stage.confirm is None and stage.dimensions == ()
    assert stage.seeds == (3, 4, 5) and [name for name, _ in stage.rows] == [CE_ROW, ROW_1, ROW_2]
    assert stage.trial_count == 9 == planned_trials(space)
    assert stage.overrides == {"optim.iterations": 300, TUNE_SPLIT_OFF: 0.0}
    assert space.overrides == {"optim.iterations": 300} and space.kind == "search"  # the search's space unchanged
    trial = stage.trial_overrides({ROW_KEY: ROW_2, SEED_KEY: 4})
    assert trial == {"optim.iterations": 300, TUNE_SPLIT_OFF: 0.0, **KD_I2CKD, SEED_KEY: 4}
    job = override(tuned_job, trial)
    assert job.data.tune_split.fraction == 0 and job.run.seed == 4 and job.optim.iterations == 300
    assert job.losses.i2ckd.enabled and job.losses.i2ckd.margin == 1.25 and job.losses.kd.weight == 0.5
    ce = override(tuned_job, stage.trial_overrides({ROW_KEY: CE_ROW, SEED_KEY: 5}))
    assert method_label(ce.losses) == "CE" and ce.run.seed == 5 and ce.data.tune_split.fraction == 0
    assert "tuning split off" in describe(space, override(tuned_job, space.overrides))


def test_the_ce_row_trains_as_long_as_the_searched_rows(tmp_path, demo_job):
    """A value fixed in the space: section (as `optim.iterations: 300` here) is part of every search trial's
    params, so of every Search row; the CE-only row must train under the same settings to be their baseline."""
    space = search_space(tmp_path, demo_job, overrides={},
                         space={**SEARCH["space"], "optim.iterations": 300})
    fixed = {**KD_ONLY, "optim.iterations": 300}
    plan = stage_plan(space, demo_job, candidates([summary("t_1", 0.7, **fixed)], 1))
    stage = stage_space(space, demo_job, plan)
    searched = override(demo_job, stage.trial_overrides({ROW_KEY: "Search #1 (t_1)", SEED_KEY: 3}))
    assert searched.optim.iterations == 300
    assert ce_job(space, demo_job, plan).optim.iterations == searched.optim.iterations


def test_stage_space_leaves_a_job_without_tuning_split_alone(tmp_path, demo_job):
    space = search_space(tmp_path, demo_job)
    stage = stage_space(space, demo_job, stage_plan(space, demo_job, chosen_two()))
    assert TUNE_SPLIT_OFF not in stage.overrides
    assert "tuning split off" not in describe(space, override(demo_job, space.overrides))
    # a tuning split the space's overrides set is switched off as well
    split = search_space(tmp_path, demo_job, overrides={"data.tune_split.fraction": 0.2})
    stage = stage_space(split, demo_job, stage_plan(split, demo_job, chosen_two()))
    assert stage.overrides[TUNE_SPLIT_OFF] == 0.0
    job = override(demo_job, stage.trial_overrides({ROW_KEY: ROW_1, SEED_KEY: 3}))
    assert job.data.tune_split.fraction == 0


# --- the CE-only row of an ablation ----------------------------------------------------------------------------------

def test_an_ablation_without_a_ce_row_gets_one_first(demo_job):
    space = load_space(SPACES / "kd_temperature.yaml", demo_job)
    before = space.rows
    note = add_baseline_row(space, demo_job)
    assert note is not None and "'Student (CE)'" in note and "no CE-only row" in note
    assert space.rows[0] == (CE_ROW, {"losses.kd.enabled": False}) and space.rows[1:] == before
    assert method_label(override(demo_job, {**space.overrides, **space.rows[0][1]}).losses) == "CE"
    assert space.trial_count == 5 * 3
    assert add_baseline_row(space, demo_job) is None and len(space.rows) == 5  # once


@pytest.mark.parametrize("name", ["methods.yaml", "i2ckd_ablation.yaml", "loss_variants.yaml"])
def test_an_ablation_with_a_ce_row_is_left_alone(demo_job, name):
    space = load_space(SPACES / name, demo_job)
    before = space.rows
    assert add_baseline_row(space, demo_job) is None and space.rows == before


def test_a_row_named_like_the_baseline_that_distils_keeps_its_name(demo_job):
    space = parse_space(text({"name": "a", "seeds": [0], "rows": [
        {"name": CE_ROW, "set": {"losses.kd.enabled": True}},
        {"name": "+I2CKD", "set": {"losses.i2ckd.enabled": True}}]}))
    note = add_baseline_row(space, demo_job)
    assert f"'{CE_ROW} [baseline]'" in note
    assert space.rows[0] == (f"{CE_ROW} [baseline]", {"losses.kd.enabled": False, "losses.i2ckd.enabled": False})
    assert [name for name, _ in space.rows[1:]] == [CE_ROW, "+I2CKD"]


def test_a_job_that_distils_itself_gets_a_baseline_row(demo_job):
    kd_job = override(demo_job, {"losses.kd.enabled": True})
    space = parse_space(text({"name": "a", "seeds": [0, 1], "rows": [{"name": "as is"}]}))
    assert add_baseline_row(space, kd_job) is not None
    assert space.rows[0] == (CE_ROW, {"losses.kd.enabled": False})


@pytest.fixture()
def teacher(tmp_path) -> str:
    """Random weights of the demo job's teacher: the dry run reads and fits them, nothing trains."""
    job = load_job(DEMO)
    path = tmp_path / "teacher.pt"
    torch.save(build_model(job.teacher.arch, job.data.num_classes, width=job.teacher.width).state_dict(), path)
    return str(path)


def test_the_dry_run_shows_the_added_baseline_row(teacher):
    lines = dry_run(SweepRequest(DEMO, str(SPACES / "kd_temperature.yaml"), [f"teacher.checkpoint={teacher}"]))
    notes = [line for line in lines if line.startswith("note: the space has no CE-only row")]
    assert len(notes) == 1 and "'Student (CE)'" in notes[0]
    rows = [line.strip() for line in lines if line.startswith("  row ")]
    assert rows[0].startswith("row 'Student (CE)': losses.kd.enabled=False  x seeds [0, 1, 2]")
    assert [r.split("'")[1] for r in rows] == [CE_ROW, "KD T=1", "KD T=2", "KD T=4", "KD T=8"]
    assert "space kd-temperature (ablation): 15 trials" in lines[1]


def test_the_dry_run_of_an_ablation_with_a_ce_row_has_no_such_note(teacher):
    lines = dry_run(SweepRequest(DEMO, str(SPACES / "i2ckd_ablation.yaml"), [f"teacher.checkpoint={teacher}"]))
    assert not any("no CE-only row" in line for line in lines)
    assert [line.strip().split("'")[1] for line in lines if line.startswith("  row ")] == [
        CE_ROW, "+KD", "+KD+I2CKD"]


def test_a_smoke_test_confirms_one_configuration_on_one_seed(teacher):
    _, _, space = prepare(SweepRequest(DEMO, DEMO_SPACE, [f"teacher.checkpoint={teacher}"], smoke_test=True))
    assert space.num_samples == 2 and space.confirm == Confirm(1, (0,)) and planned_trials(space) == 2
    _, _, full = prepare(SweepRequest(DEMO, DEMO_SPACE, [f"teacher.checkpoint={teacher}"]))
    assert full.confirm == Confirm(2, (0, 1, 2))


# --- the report of a confirmed search ----------------------------------------------------------------------------

EXPERIMENT = "confirmtest"
S1, S2 = "Search #1 (t_0)", "Search #2 (t_1)"  # confirmation rows, named as stage_plan names them
# search stage: trial -> (kd.weight, i2ckd.enabled, margin, state, last)
SEARCHED = {"t_0": (1.0, True, 0.5, "FINISHED", 0.78), "t_1": (2.0, True, 1.0, "STOPPED", 0.74),
            "t_2": (4.0, False, 0.5, "FAILED", None), "t_3": (0.3, True, 1.5, "STOPPED", 0.60)}
# confirmation stage (sweep cs-1): row -> (method, search trial, rank, values per seed); #2 beats #1 clearly
CLEAR = {CE_ROW: ("CE", None, None, [0.700, 0.705, 0.695, 0.702]),
         S1: ("KD+I2CKD", "t_0", 1, [0.712, 0.702, 0.708]),
         S2: ("KD+I2CKD", "t_1", 2, [0.760, 0.762, 0.758, 0.761])}
# sweep cs-2: the same search, its confirmed gains within the seed noise
NOISY = {CE_ROW: ("CE", None, None, [0.70, 0.72, 0.71]),
         S1: ("KD+I2CKD", "t_0", 1, [0.705, 0.715, 0.700]),
         S2: ("KD+I2CKD", "t_1", 2, [0.712, 0.700, 0.722])}
SPACE_YAML = """name: tiny-confirm
num_samples: 4
space:
  losses.kd.enabled: true
  losses.kd.weight: {loguniform: [0.1, 10.0]}
  losses.i2ckd.enabled: {choice: [true, false]}
  losses.i2ckd.margin: {uniform: [0.1, 2.0], if: losses.i2ckd.enabled}
confirm: {top_k: 2, seeds: [0, 1, 2, 3]}
"""


def add_search_sweep(s: Store, eid: str, sweep_id: str, rows: dict | None, tune_split: bool, staged: bool = True):
    """A search sweep: the SEARCHED trials, then (rows given) its confirmation runs."""
    sweep = s.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: sweep_id, contract.SPACE: "tiny-confirm",
                        contract.SPACE_KIND: "search", contract.METRIC: contract.VAL_MIOU, contract.MODE: "max"})
    s.client.log_text(sweep, SPACE_YAML, contract.SPACE_ARTIFACT)
    run_ids = {}
    for trial, (w, en, m, state, last) in SEARCHED.items():
        extra = {contract.STAGE: contract.STAGE_SEARCH} if staged else {}
        if tune_split:
            extra[contract.EVAL_SPLIT] = "tune"
        values, steps = (history(last, last), STEPS) if last is not None else ([], STEPS)
        if state == "STOPPED":
            extra[contract.STOPPED_EARLY] = "true"
            values, steps = [last - 0.05, last], STEPS[:2]
        if state == "FAILED":
            extra[contract.FAILURE] = "loss is NaN at iteration 120"
        run_ids[trial] = s.run(eid, trial_tags(sweep_id, trial, "KD+I2CKD" if en else "KD", 0, **extra), values,
                               steps, params=config(0, kd=True, i2ckd=en, **{"losses.kd.weight": w,
                                                                          "losses.i2ckd.margin": m}),
                               status={"STOPPED": "FINISHED"}.get(state, state))
    number = 0
    for index, (row, (method, trial, rank, values)) in enumerate((rows or {}).items()):
        for seed, value in enumerate(values):
            tags = {contract.STAGE: contract.STAGE_CONFIRM, contract.ROW: row, contract.ROW_INDEX: str(index)}
            if trial is not None:
                tags.update({contract.CONFIRMS: trial, contract.SEARCH_RANK: str(rank),
                             contract.SEARCH_SCORE: repr(SEARCHED[trial][4]),
                             contract.SEARCH_ITERATION: "300" if trial == "t_0" else "200"})
            w, en, m = SEARCHED[trial][:3] if trial else (1.0, False, 0.5)
            params = config(seed, kd=trial is not None, i2ckd=en, **{"losses.kd.weight": w, "losses.i2ckd.margin": m})
            run_ids[(row, seed)] = s.run(eid, trial_tags(sweep_id, f"c_{number}", method, seed, **tags),
                                         history(value, value), params=params)
            number += 1
        if row == S1 and rows is CLEAR:  # a confirmation run that failed: excluded, listed
            tags = {contract.STAGE: contract.STAGE_CONFIRM, contract.ROW: row, contract.ROW_INDEX: str(index),
                    contract.CONFIRMS: trial, contract.SEARCH_RANK: str(rank), contract.FAILURE: "CUDA out of memory"}
            run_ids[(row, 3)] = s.run(eid, trial_tags(sweep_id, f"c_{number}", method, 3, **tags), [0.5],
                                      params=config(3, kd=True, i2ckd=True), status="FAILED")
            number += 1
    return run_ids


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = Store(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    eid = s.client.create_experiment(EXPERIMENT, artifact_location=s.artifacts)
    s.run(eid, {contract.KIND: "teacher", contract.TEACHER_ARCH: "deeplabv3_resnet101",
                contract.PARAMS_M: "61.1000"}, history(0.80, 0.80), name="teacher")
    s.old = add_search_sweep(s, eid, "old-1", None, tune_split=False, staged=False)
    s.clear = add_search_sweep(s, eid, "cs-1", CLEAR, tune_split=True)
    s.noisy = add_search_sweep(s, eid, "cs-2", NOISY, tune_split=False)
    return s


@pytest.fixture(scope="module")
def clear_tables(store):
    return by_name(build_tables(read_sweep(store.uri, EXPERIMENT, "cs-1"), "last")[0])


def scipy_welch(a, b):
    stats = pytest.importorskip("scipy.stats")
    return stats.ttest_ind(a, b, equal_var=False)


def test_the_confirmed_search_has_its_tables(clear_tables):
    # importance needs more scored search trials than this sweep has (3)
    assert [name for name in clear_tables if name != "importance"] == [
        "search_summary", "methods", "search_best", "search_top", "per_class", "excluded"]


def test_search_summary_ranks_by_the_confirmed_mean(clear_tables):
    table = clear_tables["search_summary"]
    assert [r[1] for r in table.rows] == [S2, S1, CE_ROW]  # #1 had the better search score
    assert [r[0] for r in table.rows] == ["1", "2", "3"]
    assert "Search score (%, tune split)" in table.header
    shown = {r[1]: dict(zip(table.header, r)) for r in table.rows}
    records = {r["row"]: r for r in table.data.to_pylist()}
    ce_values = CLEAR[CE_ROW][3]
    for row, (method, trial, rank, values) in CLEAR.items():
        mean, std = np.mean(values), np.std(values, ddof=1)
        assert shown[row]["Confirmed mIoU (%)"] == f"{100 * mean:.2f} ± {100 * std:.2f}"
        assert shown[row]["n"] == str(len(values)) and records[row]["n"] == len(values)
        assert records[row]["miou_pct_mean"] == pytest.approx(100 * mean)
        assert records[row]["miou_pct_std"] == pytest.approx(100 * std)
        assert records[row]["seeds"] == list(range(len(values)))
        assert shown[row]["Method"] == method and records[row]["search_trial"] == trial
        assert shown[row]["Search trial"] == (trial or "—") and records[row]["search_rank"] == rank
        if trial is None:
            assert shown[row]["vs CE-only (pp)"] == "—" and shown[row]["p (Welch)"] == "—"
            assert records[row]["vs_ce_p"] is None and shown[row]["Search score (%, tune split)"] == "—"
            continue
        expected = scipy_welch(values, ce_values)
        assert records[row]["vs_ce_pp"] == pytest.approx(100 * (mean - np.mean(ce_values)))
        assert shown[row]["vs CE-only (pp)"] == f"{100 * (mean - np.mean(ce_values)):+.2f}"
        assert records[row]["vs_ce_p"] == pytest.approx(float(expected.pvalue), rel=1e-6)
        star = " *" if expected.pvalue < 0.05 else ""
        assert shown[row]["p (Welch)"] == f"{float(expected.pvalue):.3f}{star}"
    # the search's own score of each configuration, at the rung where it stopped: a dagger
    assert shown[S1]["Search score (%, tune split)"] == "78.00"
    assert shown[S2]["Search score (%, tune split)"] == "74.00†"
    assert records[S2]["search_stopped"] and not records[S1]["search_stopped"]
    assert records[S2]["search_iteration"] == 200 and records[S1]["search_iteration"] == 300
    assert records[S1]["search_score_pct"] == pytest.approx(78.0)
    assert shown[S1]["Excluded"] == "1 failed" and shown[S2]["Excluded"] == "—"
    assert records[S2]["vs_ce_significant"] and not records[S1]["vs_ce_significant"]
    assert any(n.startswith("† the search stopped this configuration early") for n in table.notes)


def test_the_verdict_when_the_gains_exceed_the_seed_noise(clear_tables):
    verdict = clear_tables["search_summary"].notes[0]
    win, ce, second = (CLEAR[k][3] for k in (S2, CE_ROW, S1))
    assert verdict.startswith(f"Winner: {S2} (KD+I2CKD): ")
    mean, std = np.mean(win), np.std(win, ddof=1)
    assert f"{100 * mean:.2f} ± {100 * std:.2f} mIoU (n=4) confirmed on val; search score 74.00 (one seed, " \
           "tune split)." in verdict
    over_ce, over_second = verdict.split(" Over ")[1:]
    p_ce, p_second = float(scipy_welch(win, ce).pvalue), float(scipy_welch(win, second).pvalue)
    assert p_ce < 0.05 and p_second < 0.05
    assert over_ce.startswith("the CE-only student") and f"{100 * (mean - np.mean(ce)):+.2f} pp" in over_ce
    assert f"exceeds the seed noise (Welch's t-test, p = {p_ce:.3f} < 0.05)" in over_ce
    assert over_second.startswith(f"the runner-up {S1}")
    assert f"exceeds the seed noise (Welch's t-test, p = {p_second:.3f} < 0.05)" in over_second
    interval = scipy_welch(win, ce).confidence_interval(0.95)
    assert f"95 % CI [{100 * interval.low:+.2f}, {100 * interval.high:+.2f}]" in over_ce
    assert "within" not in verdict and "No searched configuration beats" not in verdict


def test_the_verdict_when_the_gains_are_within_the_seed_noise(store):
    table = by_name(build_tables(read_sweep(store.uri, EXPERIMENT, "cs-2"), "last")[0])["search_summary"]
    assert [r[1] for r in table.rows] == [S2, CE_ROW, S1]  # means 71.13, 71.00, 70.67
    assert "Search score (%, val)" in table.header  # the search scored on val here
    verdict = table.notes[0]
    win, ce, second = (NOISY[k][3] for k in (S2, CE_ROW, S1))
    p_ce, p_second = float(scipy_welch(win, ce).pvalue), float(scipy_welch(win, second).pvalue)
    assert p_ce > 0.2 and p_second > 0.2
    assert verdict.startswith(f"Winner: {S2} (KD+I2CKD)")
    assert f"within the seed noise (Welch's t-test, p = {p_ce:.3f} ≥ 0.05)" in verdict
    assert f"within the seed noise (Welch's t-test, p = {p_second:.3f} ≥ 0.05)" in verdict
    assert verdict.index("the CE-only student") < verdict.index(f"the runner-up {S1}")
    assert "exceeds" not in verdict
    assert not any(r[table.header.index("p (Welch)")].endswith("*") for r in table.rows)


def test_the_methods_table_holds_the_confirmation_runs_only(clear_tables):
    table = clear_tables["methods"]
    assert [r[1] for r in table.rows] == ["Teacher", "CE", f"KD+I2CKD ({S1})", f"KD+I2CKD ({S2})"]
    shown = cells_by_method(table)
    for label, row in (("CE", CE_ROW), (f"KD+I2CKD ({S1})", S1), (f"KD+I2CKD ({S2})", S2)):
        values = CLEAR[row][3]
        assert shown[label]["mIoU (%)"] == f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"
        assert shown[label]["n"] == str(len(values))  # seeds, not configurations
    assert shown[f"KD+I2CKD ({S1})"]["Excluded"] == "1 failed"
    assert "confirmation stage" in table.caption and "n counts configurations" not in table.caption
    assert shown[f"KD+I2CKD ({S2})"]["Best run"] == "76.20 (c_9)"


def test_the_search_tables_hold_the_search_runs_only(clear_tables):
    top = clear_tables["search_top"]
    trials = [r[1] for r in top.rows]
    assert set(trials) == {"t_0", "t_1", "t_3"} and trials[0] == "t_0"
    assert dict(clear_tables["search_best"].rows)["Trial"] == "t_0"
    assert not any(str(c).startswith("c_") for r in top.rows for c in r)


def test_per_class_and_excluded_tables(store, clear_tables):
    per_class = {r[0]: r[1:] for r in clear_tables["per_class"].rows}
    assert all(run.startswith("c_") or run == "teacher" for run in per_class["Run"])
    excluded = {r[0]: r for r in clear_tables["excluded"].rows}
    assert set(excluded) == {"t_1", "t_2", "t_3", "c_7"}  # every stage's
    assert excluded["c_7"][2] == S1 and excluded["c_7"][-1] == "CUDA out of memory"
    assert excluded["t_2"][-1] == "loss is NaN at iteration 120"


def test_a_search_without_stages_keeps_the_old_tables(store, tmp_path):
    data = read_sweep(store.uri, EXPERIMENT, "old-1")
    tables = by_name(build_tables(data, "last")[0])
    assert "search_summary" not in tables and {"methods", "search_best", "search_top"} <= set(tables)
    assert "n counts configurations" in tables["methods"].caption
    assert write_report(store.uri, EXPERIMENT, "old-1", tmp_path, plots=False).verdict is None


def test_write_report_returns_the_verdict(store, tmp_path):
    result = write_report(store.uri, EXPERIMENT, "cs-1", tmp_path, plots=False)
    summary = result.tables["search_summary"]
    assert result.verdict == summary.notes[0] and result.verdict.startswith(f"Winner: {S2}")
    assert result.verdict in result.markdown
    assert cells(summary)["1"]["Row"] == S2


def _row(name, values, trial=None, method="KD"):
    from kdray.reporting.confirmed import ConfirmedRow
    from kdray.reporting.groups import Group

    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    group = Group((name,), 0, mean, std, len(values), False, {"finished": len(values)}, None, None,
                  tuple(range(len(values))), ())
    return ConfirmedRow(name, "CE" if trial is None else method, group, list(values), trial, 1 if trial else None,
                        0.5, False, 600)


def test_a_searched_configuration_the_ce_student_beats_is_not_called_the_winner():
    from kdray.reporting.confirmed import verdict

    rows = [_row(CE_ROW, [0.30, 0.31, 0.32]), _row("Search #1 (t_1)", [0.20, 0.22, 0.21], "t_1"),
            _row("Search #2 (t_2)", [0.18, 0.19, 0.20], "t_2")]
    text = verdict(rows, "tune split")
    assert text.startswith("Best searched configuration: Search #1 (t_1) (KD): ") and "Winner" not in text
    assert "No searched configuration beats the CE-only student on average." in text
    assert "search score 50.00 (one seed, tune split)" in text
    wins = verdict([_row(CE_ROW, [0.1, 0.12, 0.11]), rows[1]], "val")
    assert wins.startswith("Winner: Search #1 (t_1) (KD): ") and "beats" not in wins


def test_one_seed_rows_show_the_difference_to_the_ce_student_untested(tmp_path):
    """With one seed per row (a search without `confirm` extended, a smoke test) the difference is still shown;
    the p value is `—`."""
    from kdray.reporting.confirmed import confirmed_table
    from kdray.reporting.write import stage_views

    store = Store(tmp_path / "mlflow.db")
    eid = store.client.create_experiment("one", artifact_location=store.artifacts)
    store.run(eid, {contract.KIND: "sweep", contract.SWEEP_ID: "o-1", contract.SPACE_KIND: "search"})
    store.run(eid, trial_tags("o-1", "t_1", "KD", 0, **{contract.STAGE: "search"}), [0.3, 0.4, 0.5])
    store.run(eid, trial_tags("o-1", "c_0", "CE", 0, **{contract.STAGE: "confirm", contract.ROW: CE_ROW,
                                                         contract.ROW_INDEX: "0"}), [0.3, 0.35, 0.4])
    store.run(eid, trial_tags("o-1", "c_1", "KD", 0, **{contract.STAGE: "confirm", contract.ROW: "Search #1 (t_1)",
                                                         contract.ROW_INDEX: "1", contract.CONFIRMS: "t_1"}),
              [0.3, 0.4, 0.45])
    confirm, searched = stage_views(read_sweep(store.uri, "one", "o-1"))
    table, text = confirmed_table(confirm, searched, "last")
    cells = {row[1]: dict(zip(table.header, row)) for row in table.rows}
    assert cells["Search #1 (t_1)"]["vs CE-only (pp)"] == "+5.00" and cells["Search #1 (t_1)"]["p (Welch)"] == "—"
    assert "not tested" in text
