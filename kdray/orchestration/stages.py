"""A sweep's stages: the Tune experiments it runs one after another, recorded in its state file as plain data.

    ablation                      the rows x seeds grid                                   folder tune/
    search                        Optuna's trials (and the scheduler's stops)             folder tune/
    confirm                       the search's best configurations and the CE-only       folder confirm/
                                  student over seeds (`kdray.orchestration.confirm`)
    search (extension k)          `--extend N`: N more trials from the same study        folder tune-extend<k>/
    confirm (extension k)         the configurations now among the best, not yet         folder confirm-extend<k>/
                                  confirmed

A record is `{name, folder, ended?, ...}`: a confirmation stage holds its rows and seeds once chosen, an
extension its sample count and sampler seed, so that `--resume` runs exactly what was planned and a stage that
ended is collected from its folder, never run again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kdray import contract
from kdray.config import Job
from kdray.contract import STAGE_CONFIRM, STAGE_SEARCH
from kdray.orchestration.confirm import candidates, row_tags, stage_plan, stage_space
from kdray.orchestration.outcome import TrialSummary
from kdray.space import SearchSpace


@dataclass
class Stage:
    """One Tune experiment of a sweep: the search (or the ablation grid), or the confirmation stage after a
    search. `folder`: its name in the sweep folder (an existing one is restored, never started again)."""

    name: str  # search | confirm | ablation
    space: SearchSpace
    folder: str
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # see `run_trial`'s stage_tags


@dataclass
class StageResult:
    trials: list[TrialSummary]
    interrupted: bool
    never_created: int
    config: Any = None  # the TuneConfig of a stage started here (None when restored)


def sweep_stages(state: dict[str, Any], space: SearchSpace | None) -> list[dict[str, Any]]:
    """The sweep's stages as its state file records them (plain data, in order): `{name, folder, ended, ...}`;
    for a sweep begun before stages were recorded, its one Tune experiment `tune` (a search unless `space`
    says otherwise)."""
    if "stages" in state:
        return [dict(s) for s in state["stages"]]
    return [first_stage(space) if space is not None else {"name": STAGE_SEARCH, "folder": "tune"}]


def first_stage(space: SearchSpace) -> dict[str, Any]:
    """A new sweep's first stage: the ablation grid, or the search."""
    return {"name": STAGE_SEARCH if space.kind == "search" else "ablation", "folder": "tune"}


def extension_stage(stages: list[dict[str, Any]], num_samples: int, seed: int) -> dict[str, Any]:
    """`--extend N`: N more search trials in a Tune experiment of their own, sampled from the same Optuna study
    (TPE learns from every trial before) with the sampler seeded anew (`seed`), so that its start-up trials
    are not the first search's again."""
    k = sum(s["name"] == STAGE_SEARCH for s in stages)
    return {"name": STAGE_SEARCH, "folder": f"tune-extend{k}", "num_samples": num_samples, "seed": seed,
            "extension": k}


def confirmation_stage(space: SearchSpace, base: Job, searched: list[TrialSummary],
                       stages: list[dict[str, Any]]) -> dict[str, Any]:
    """The stage that confirms the best distinct configurations among `searched` that no earlier confirmation
    stage ran (and the CE-only student, once per sweep)."""
    done = {tags.get(contract.CONFIRMS) for s in stages if s["name"] == STAGE_CONFIRM
            for tags in row_tags(s).values()}
    top_k = space.confirm.top_k if space.confirm is not None else 0
    chosen = [c for c in candidates(searched, top_k, space.mode, space.objectives) if c.trial_id not in done]
    with_ce = not any(s["name"] == STAGE_CONFIRM for s in stages)
    k = sum(s["name"] == STAGE_CONFIRM for s in stages)
    folder = "confirm" if not k else f"confirm-extend{k}"
    return {"name": STAGE_CONFIRM, "folder": folder, **stage_plan(space, base, chosen, with_ce=with_ce)}


def planned_total(stages: list[dict[str, Any]], space: SearchSpace | None = None) -> int:
    """The trials the recorded stages make (a search stage without its own count: the space's num_samples)."""
    return sum(stage_count(s, space) for s in stages if s["name"] in (STAGE_CONFIRM, STAGE_SEARCH))


def stage_count(record: dict[str, Any], space: SearchSpace | None) -> int:
    """The trials one recorded stage makes (a search stage without its own count: the space's num_samples, 0
    without a space)."""
    if record["name"] == STAGE_CONFIRM:
        return len(record["rows"]) * len(record["seeds"])
    if record["name"] == STAGE_SEARCH:
        return record.get("num_samples") or (space.num_samples if space is not None else 0)
    return space.trial_count if space is not None else 0


def stage_lines(stages: list[dict[str, Any]], space: SearchSpace, sweep_dir: Path) -> list[str]:
    """A resumed or extended sweep's stages, one line each, as `--dry-run` and the sweep's start print them:
    which ended, which was interrupted (its Tune experiment is in `sweep_dir`) and which is still to run, with
    their trial counts; and the confirmation still to be chosen when a search stage comes last."""
    lines = []
    for record in stages:
        extension = record.get("extension") or record["folder"].partition("-extend")[2]
        kind = record["name"] + (f" (extension {extension})" if extension else "")
        n = stage_count(record, space)
        status = ("ended" if record.get("ended") else
                  "interrupted: it continues, its ended trials kept" if (sweep_dir / record["folder"]).exists()
                  else "to run")
        sampler = f", sampler seed {record['seed']}, no point first" if record.get("extension") else ""
        lines.append(f"  {kind}, folder {record['folder']}/: {n} trial(s){sampler}, {status}")
    c = space.confirm
    if stages and stages[-1]["name"] == STAGE_SEARCH and space.kind == "search" and c is not None:
        lines.append(f"  then: confirmation of its best configurations not confirmed before (at most {c.top_k} x "
                     f"{len(c.seeds)} trial(s), chosen when the search ends)")
    return lines


def make_stage(record: dict[str, Any], space: SearchSpace, base: Job) -> Stage:
    """The `Stage` a state-file record describes."""
    if record["name"] == STAGE_CONFIRM:
        return Stage(STAGE_CONFIRM, stage_space(space, base, record), record["folder"], row_tags(record))
    if record["name"] == STAGE_SEARCH:
        searched = space
        if record.get("extension"):  # only its own trials, sampled afresh
            searched = replace(space, num_samples=record["num_samples"], seed=record["seed"], points_to_evaluate=[])
        return Stage(STAGE_SEARCH, searched, record["folder"], {"": {contract.STAGE: STAGE_SEARCH}})
    return Stage("ablation", space, record["folder"])
