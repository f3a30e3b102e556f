"""The CE-only baseline every sweep carries, and a search's confirmation stage.

A search scores each configuration once: one seed, possibly cut short by the scheduler, and (with
`data.tune_split`) on a tuning subset of the training split. Seed noise in this field (about ±0.5 mIoU) is larger
than most claimed gains, so a search's best trial is a candidate, not a result. After the search, the
confirmation stage runs, as an ablation of its own (rows x seeds, every trial at full length, the tuning split
off: trained on the whole training split, scored on val):

    Student (CE)   the student without any teacher-reading loss: the baseline every gain is measured against
    Search #1 (<trial id>)   the search's best distinct configuration
    ...                      down to Search #k (`confirm: {top_k: k, seeds: [...]}` in the space)

Which trials are "best": those that went furthest (a finished trial before one the scheduler stopped, a trial
stopped at a later rung before one stopped earlier), then by the value they were scored on there, the search's
own objective, then by trial id. Two trials with the same sampled values are one configuration.

A search without `confirm` still gets its CE-only row (one run, the job's seed); an ablation space without a
CE-only row gets one as its first row. The rows live in the sweep's state file once chosen, so `--resume` runs
the same ones. `--extend N` adds a search stage and then a confirmation stage of the configurations that are now
among the best and were not confirmed before (the CE-only row runs once per sweep).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from kdray import contract
from kdray.config import Job, override
from kdray.contract import STAGE_CONFIRM
from kdray.losses.objective import method_label
from kdray.losses.registry import LOSSES
from kdray.orchestration.outcome import selection_key
from kdray.space import SEED_KEY, SearchSpace

CE_ROW = "Student (CE)"
TUNE_SPLIT_OFF = "data.tune_split.fraction"  # set to 0 in the confirmation stage


def ce_only_overrides(jobs: Iterable[Job]) -> dict[str, Any]:
    """Overrides that turn each of `jobs` into the CE-only student: every enabled loss that reads the teacher,
    in any of them, switched off (`losses.<name>.enabled: false`)."""
    names: dict[str, None] = {}
    for job in jobs:
        for name, cfg in job.losses.enabled().items():
            if LOSSES[name].needs_teacher(cfg):
                names.setdefault(name)
    return {f"losses.{name}.enabled": False for name in names}


def add_baseline_row(space: SearchSpace, base: Job) -> str | None:
    """An ablation space without a CE-only row gets one first (every seed), so that its tables have the
    baseline its gains are measured against; returns a note saying so, or None when it had one."""
    jobs = [override(base, {**space.overrides, **settings}) for _, settings in space.rows]
    if any(method_label(job.losses) == "CE" for job in jobs):
        return None
    name = CE_ROW if CE_ROW not in dict(space.rows) else f"{CE_ROW} [baseline]"
    space.rows = ((name, ce_only_overrides([override(base, space.overrides), *jobs])), *space.rows)
    return (f"the space has no CE-only row: the sweep adds {name!r} first, every seed, as the baseline of its "
            "gains")


@dataclass(frozen=True)
class Candidate:
    """A search trial the confirmation stage runs again."""

    rank: int  # 1 = the search's best distinct configuration
    trial_id: str
    params: dict[str, Any]  # its sampled (and fixed) values, without the seed
    score: float  # the value the search scored it on (its last evaluation), as logged
    iteration: int  # how far it went
    status: str


def pareto_front(values: list[tuple[float, ...]], modes: tuple[str, ...]) -> list[bool]:
    """For each point, whether no other point dominates it: q dominates p when q is at least as good on every
    objective (max or min, as `modes` says) and better on one. Equal points do not dominate each other. O(n^2)."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    oriented = [tuple(s * v for s, v in zip(signs, point)) for point in values]

    def dominates(q, p):
        return all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p))

    return [not any(dominates(q, p) for q in oriented) for p in oriented]


def candidates(trials: Iterable[Any], top_k: int, mode: str = "max",
               objectives: tuple[tuple[str, str], ...] = ()) -> list[Candidate]:
    """The `top_k` best distinct configurations among `trials` (`TrialSummary`s of the search stage) that
    finished or were stopped early with a finite score, ranked as the module docstring says. With several
    `objectives` ((metric, mode) pairs, each trial's values in `TrialSummary.objectives`), the configurations on
    the trials' Pareto front come first (those without every value finite are behind them), each group as
    before."""
    if top_k < 1:
        return []
    scored = [t for t in trials if t.ok and math.isfinite(t.last)]
    behind: dict[str, bool] = {}
    if len(objectives) > 1:
        whole = [t for t in scored if len(t.objectives) == len(objectives) and all(map(math.isfinite, t.objectives))]
        front = pareto_front([t.objectives for t in whole], tuple(m for _, m in objectives))
        behind = {t.trial_id: not on for t, on in zip(whole, front)}
    scored.sort(key=lambda t: (behind.get(t.trial_id, bool(behind)), *selection_key(t, mode)))
    chosen: list[Candidate] = []
    seen: set[str] = set()
    for t in scored:
        params = {k: v for k, v in t.params.items() if k != SEED_KEY}
        key = json.dumps(params, sort_keys=True, default=repr)
        if key in seen:
            continue
        seen.add(key)
        chosen.append(Candidate(len(chosen) + 1, t.trial_id, params, t.last, t.iteration, t.status))
        if len(chosen) == top_k:
            break
    return chosen


def stage_plan(space: SearchSpace, base: Job, chosen: list[Candidate], with_ce: bool = True) -> dict[str, Any]:
    """A confirmation stage as plain data (kept in the sweep's state file): its rows, each with its settings and
    the tags its runs carry, and its seeds. The CE-only row (`with_ce`) is the search's fixed settings with every
    teacher-reading loss they enable switched off (the space's fixed keys included: the baseline trains as long,
    on the same data, as every searched trial); a candidate's row is named after its rank and trial."""
    seeds = list(space.confirm.seeds) if space.confirm is not None else [base.run.seed]
    rows = []
    if with_ce:  # the settings every searched trial shares (the space's fixed keys too), minus the distillation
        fixed = {d.key: d.args[0] for d in space.dimensions if d.kind == "fixed" and d.condition is None}
        ce = ce_only_overrides([override(base, {**space.overrides, **fixed})])
        rows.append({"name": CE_ROW, "set": {**fixed, **ce}, "tags": {contract.STAGE: STAGE_CONFIRM}})
    for c in chosen:
        rows.append({"name": f"Search #{c.rank} ({c.trial_id})", "set": c.params,
                     "tags": {contract.STAGE: STAGE_CONFIRM, contract.CONFIRMS: c.trial_id,
                              contract.SEARCH_RANK: str(c.rank), contract.SEARCH_SCORE: repr(float(c.score)),
                              contract.SEARCH_ITERATION: str(c.iteration)}})
    return {"rows": rows, "seeds": seeds}


def stage_space(space: SearchSpace, base: Job, plan: dict[str, Any]) -> SearchSpace:
    """The confirmation stage as an ablation space (rows x seeds, no sampler, no scheduler): the search's fixed
    settings, each row's values, and the tuning split off, so that every run trains on the whole training split
    and is scored on val."""
    overrides = dict(space.overrides)
    tune_split = getattr(base.data, "tune_split", None)
    if tune_split is not None and (tune_split.fraction or overrides.get(TUNE_SPLIT_OFF)):
        overrides[TUNE_SPLIT_OFF] = 0.0
    return replace(space, kind="ablation", overrides=overrides, rows=tuple((r["name"], r["set"]) for r in plan["rows"]),
                   seeds=tuple(plan["seeds"]), scheduler=space.scheduler.__class__(), dimensions=(),
                   points_to_evaluate=[], num_samples=1, confirm=None)


def row_tags(plan: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Row name -> the tags of its runs (stage, the search trial it confirms, its search rank and score)."""
    return {r["name"]: dict(r["tags"]) for r in plan["rows"]}


def planned_trials(space: SearchSpace) -> int:
    """How many trials the confirmation stage will run: (top_k + the CE row) x seeds; the CE row alone (one seed)
    for a search without `confirm`."""
    if space.kind != "search":
        return 0
    if space.confirm is None:
        return 1
    return (space.confirm.top_k + 1) * len(space.confirm.seeds)


def describe(space: SearchSpace, job: Job) -> str:
    """The confirmation stage in one line, for --dry-run (`job`: the job with the space's overrides)."""
    c = space.confirm
    on_val = " (tuning split off: trained on the whole training split, scored on val)" \
        if getattr(getattr(job.data, "tune_split", None), "fraction", 0) else ""
    if c is None:
        return (f"then: the CE-only student once (seed {job.run.seed}) as the baseline; no confirmation stage "
                "(the search's single-seed scores rank the trials: add confirm: {top_k: 3, seeds: [0, 1, 2]})")
    which = f"the top {c.top_k} distinct configuration(s)" if not space.multi_objective else \
        f"up to {c.top_k} distinct configuration(s), those of the Pareto front first (by {space.metric})"
    packed = f", in packs of up to {space.pack_size} (the rows of one seed)" if space.pack_size > 1 else ""
    return (f"then: confirmation of {which} and the CE-only student, seeds "
            f"{list(c.seeds)}: {planned_trials(space)} full-length trials{packed}{on_val}")
