"""Trial packs in a sweep (`pack_size` in the space): up to K trials that differ in their losses only, trained as one
Tune trial, one Ray Train run, one `kdray.engine.train_pack` (one teacher forward and one data pipeline per batch).

    Tune trial (a pack)    config {PACK_KEY: [member config, ...]}      members' ids: <trial id>.m<i>
    each member            its own MLflow run (tags and params as a solo trial's), evaluations, checkpoint
    Tune's results         one per evaluation of the pack: ITERATION, ITERATIONS_TOTAL, the space's metric (the best
                           member's, for Tune's own view) and each member's under `m<i>/` (`member_key`), with its
                           state: running | complete | stopped | failed (`member_result` reads them back)

A search proposes a pack's members together (`PackSearch`: K of Optuna's suggestions at once), an ablation or a
confirmation stage packs the rows of one seed (`grid_packs`). Early stopping happens inside the pack
(`PackHalving`: the members reach each rung together, so a rung is decided on them at once); Tune runs the packs
without a scheduler. What the sweep reports (statuses, tables, the confirmation's candidates) is per member, as if
each had been its own trial.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search.searcher import Searcher

from kdray import contract
from kdray.orchestration.search import WrappedSearcher
from kdray.space import ROW_KEY, SEED_KEY, SearchSpace

PACK_KEY = "kdray.pack"  # the config key under which a pack trial carries its members' configs
STATE = "state"  # a member's key in a pack's results: its state, one of MEMBER_STATES
FAILURE = "failure"  # ... and, for a failed member, why (one line)
RUNNING, COMPLETE, STOPPED, FAILED = "running", "complete", "stopped", "failed"
MEMBER_STATES = (RUNNING, COMPLETE, STOPPED, FAILED)


def member_id(trial_id: str, index: int) -> str:
    """The trial id of a pack's member `index` (its MLflow run's TRIAL_ID tag and its row in the tables)."""
    return f"{trial_id}.m{index}"


def is_pack(config: dict[str, Any] | None) -> bool:
    return bool(config) and PACK_KEY in config


def members_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    """A pack trial's member configs, in order ([config] for a trial that is not a pack)."""
    return list(config[PACK_KEY]) if is_pack(config) else [config]


def member_key(index: int, key: str) -> str:
    """Where member `index`'s `key` lives in a pack's Tune results: `m<index>/<key>`."""
    return f"m{index}/{key}"


def member_result(result: dict[str, Any] | None, index: int) -> dict[str, Any]:
    """Member `index`'s part of a pack's Tune result, under its own names (ITERATION its last evaluation,
    ITERATIONS_TOTAL its length, STATE); {} when the result holds nothing of it."""
    prefix = member_key(index, "")
    return {k[len(prefix):]: v for k, v in (result or {}).items() if k.startswith(prefix)}


def pack_count(space: SearchSpace) -> int:
    """How many pack trials the space's trials make: a search's samples K at a time; an ablation's rows K at a time
    within each seed."""
    k = space.pack_size
    if space.kind == "ablation":
        return len(space.seeds) * math.ceil(len(space.rows) / k)
    return math.ceil(space.num_samples / k)


def grid_packs(space: SearchSpace) -> list[list[dict[str, Any]]]:
    """An ablation's (or a confirmation stage's) trials as packs: for each seed in order, its rows in order, K at a
    time; each member config as a solo trial's ({ROW_KEY: row, SEED_KEY: seed})."""
    names = [name for name, _ in space.rows]
    k = space.pack_size
    return [[{ROW_KEY: name, SEED_KEY: seed} for name in names[i:i + k]]
            for seed in space.seeds for i in range(0, len(names), k)]


def pack_lines(space: SearchSpace) -> list[str]:
    """What --dry-run says of a space's packs (nothing for pack_size 1)."""
    if space.pack_size == 1:
        return []
    largest = min(space.pack_size, space.num_samples if space.kind == "search" else len(space.rows))
    clipped = f" (pack_size {space.pack_size}: no more trials to pack)" if largest < space.pack_size else ""
    n = pack_count(space)
    head = (f"  trial packs of up to {largest}{clipped}: {space.trial_count} trial(s) in {n} pack(s), each one Ray "
            "Train run with one teacher forward and one data pipeline per batch for its members")
    if space.kind == "search":
        stop = {"asha": "ASHA's", "sync_halving": "synchronous halving's"}.get(space.scheduler.kind)
        how = (f"; {stop} rungs are decided inside each pack, on its members" if stop else "")
        return [head, f"    Optuna proposes each pack's members at once (TPE with the constant liar){how}",
                "    resources and 'at once' below count packs: a pack asks what one trial asks"]
    lines = [head, "    resources and 'at once' below count packs: a pack asks what one trial asks"]
    for i, members in enumerate(grid_packs(space)):
        lines.append(f"    pack {i + 1}: seed {members[0][SEED_KEY]}: " + ", ".join(m[ROW_KEY] for m in members))
    return lines


class PackHalving:
    """Successive halving inside a pack: at each rung (`grace_period * reduction_factor**k` iterations, below
    `max_t`), once its members reach it, the best `ceil(n / reduction_factor)` of the `n` evaluated there go on and
    the others stop (ties to the lower member index; a missing or non-finite metric ranks last). A pack's members
    evaluate at the same iterations, so each rung is decided the moment it is reached, on the members alone: the
    rule of `kdray.orchestration.halving.SyncHalving` with the pack as its bracket.

    Called with one iteration's evaluations (member index -> `kdray.contract.Evaluation`), it returns the indices
    to stop. `start`: a pack resumed at that iteration has decided every rung up to it already."""

    def __init__(self, metric: str, mode: str, grace_period: int, reduction_factor: float, max_t: int,
                 start: int = 0):
        if grace_period < 1 or reduction_factor <= 1 or max_t < 1:
            raise ValueError(f"PackHalving: grace_period >= 1, reduction_factor > 1 and max_t >= 1, got "
                             f"{grace_period}, {reduction_factor}, {max_t}")
        self.metric, self.mode = metric, mode
        self.reduction_factor = reduction_factor
        self.rungs: list[float] = []
        rung = float(grace_period)
        while rung < max_t:
            self.rungs.append(rung)
            rung *= reduction_factor
        self.decided = {r for r in self.rungs if r <= start}

    def __call__(self, evaluations: dict[int, Any]) -> set[int]:
        if not evaluations:
            return set()
        reached = max(e.iteration for e in evaluations.values())
        alive = dict(evaluations)
        stopped: set[int] = set()
        for rung in self.rungs:
            if rung in self.decided or rung > reached:
                continue
            self.decided.add(rung)
            ranked = sorted(alive, key=lambda i: (self._rank(alive[i]), i))
            keep = math.ceil(len(ranked) / self.reduction_factor)
            for index in ranked[keep:]:
                stopped.add(index)
                del alive[index]
        return stopped

    def _rank(self, evaluation: Any) -> float:
        value = evaluation.tune_metrics().get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return math.inf
        return -value if self.mode == "max" else value


class PackSearch(WrappedSearcher):
    """A searcher wrapper that proposes packs: each `suggest` asks the wrapped searcher (`KdraySearch`) for up to
    `pack_size` members, under the members' own ids (`member_id`), until `num_samples` members were proposed; and
    hands each pack result to it member by member (`member_result`), so that Optuna's study holds one trial per
    member, told COMPLETE, PRUNED (stopped inside the pack) or FAIL as a solo trial would be."""

    def __init__(self, searcher: Searcher, pack_size: int, num_samples: int):
        if pack_size < 1 or num_samples < 1:
            raise ValueError(f"PackSearch: pack_size and num_samples >= 1, got {pack_size}, {num_samples}")
        self.pack_size, self.num_samples = pack_size, num_samples
        self.members: dict[str, int] = {}  # pack trial id -> its member count
        self.last: dict[str, dict] = {}  # pack trial id -> its last result (Tune hands none to a failed trial's end)
        super().__init__(searcher)

    @property
    def proposed(self) -> int:
        return sum(self.members.values())

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.members:  # asked again for a pack it proposed (a restored trial): the same members
            return None
        left = self.num_samples - self.proposed
        if left <= 0:
            return Searcher.FINISHED
        configs = []
        for index in range(min(self.pack_size, left)):
            config = self.searcher.suggest(member_id(trial_id, index))
            if config in (None, Searcher.FINISHED):
                break
            configs.append(config)
        if not configs:
            return Searcher.FINISHED
        self.members[trial_id] = len(configs)
        return {PACK_KEY: configs}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.members:
            self.last[trial_id] = dict(result)
        for index in range(self.members.get(trial_id, 0)):
            part = member_result(result, index)
            if part.get(contract.ITERATION) is not None:
                self.searcher.on_trial_result(member_id(trial_id, index), part)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        result = result if result is not None else self.last.get(trial_id)
        self.last.pop(trial_id, None)
        for index in range(self.members.get(trial_id, 0)):
            part = member_result(result, index)
            # a member that ended before its pack failed keeps its end; one without a result never ran
            failed = part.get(STATE) == FAILED or (error and part.get(STATE) not in (COMPLETE, STOPPED))
            self.searcher.on_trial_complete(member_id(trial_id, index), result=part, error=failed)

    def trial_states(self) -> dict[str, int]:
        return self.searcher.trial_states()
