"""Group a sweep's runs (by ablation row, by method) and summarise the chosen value of each group.

The rule every table follows: a cell is the mean ± sample standard deviation (ddof=1) over the group's
FINISHED runs, with n = their number. Early-stopped runs are counted but not averaged; only when a group has no
finished run is its cell built from its early-stopped runs, and then it is flagged (`from_stopped`, a dagger in
the tables). Failed, not-started, interrupted, unfinished (still running) runs and finished runs without a
value are excluded and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from kdray.reporting.runs import EARLY_STOPPED, EXCLUDED_STATES, FINISHED, STATE_LABELS

VALUES = ("last", "best")


def value_column(value: str) -> str:
    """The runs-table column that holds the value a cell shows: the last evaluation or the best one."""
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    return f"miou_{value}"


@dataclass(frozen=True)
class Group:
    key: tuple  # the grouping columns' values
    order: int  # the position of the group's first run in the sweep
    mean: float | None  # of the value, as logged (a fraction for mIoU)
    std: float | None  # sample std (ddof=1); None when n < 2
    n: int  # runs averaged
    from_stopped: bool  # the cell is built only from early-stopped runs
    counts: dict[str, int]  # runs per state
    best_run_id: str | None  # the run with the highest value among the averaged ones
    best_value: float | None
    seeds: tuple[int, ...]  # seeds of the averaged runs
    run_ids: tuple[str, ...]  # the averaged runs

    @property
    def excluded(self) -> str:
        """`1 early-stopped, 1 failed, 1 not started`: the runs of the group not in the mean."""
        return count_phrase(self.counts, skip=EARLY_STOPPED if self.from_stopped else FINISHED)


def count_phrase(counts: dict[str, int], skip: str = FINISHED) -> str:
    """`1 early-stopped, 2 failed`: the count of each excluded state (but `skip`) that occurs, in report order."""
    return ", ".join(f"{counts[s]} {STATE_LABELS[s]}" for s in EXCLUDED_STATES if s != skip and counts.get(s))


def summarise(runs: pa.Table, keys: list[str], value: str) -> list[Group]:
    """One `Group` per distinct value of `keys`, in the order of each group's first run."""
    column = value_column(value)
    stats = runs.group_by(keys + ["state"], use_threads=False).aggregate([
        (column, "mean"), (column, "stddev", pc.VarianceOptions(ddof=1)), (column, "count"),
        ("run_id", "count", pc.CountOptions(mode="all")), ("order", "min")])
    by_key: dict[tuple, dict[str, dict]] = {}
    for rec in stats.to_pylist():
        by_key.setdefault(tuple(rec[k] for k in keys), {})[rec["state"]] = rec
    members: dict[tuple, list[dict]] = {}
    for rec in runs.select(keys + ["state", "run_id", "seed", column]).to_pylist():
        members.setdefault(tuple(rec[k] for k in keys), []).append(rec)
    groups = []
    for key, per_state in by_key.items():
        used = FINISHED if per_state.get(FINISHED, {}).get(f"{column}_count") else EARLY_STOPPED
        agg = per_state.get(used, {})
        n = agg.get(f"{column}_count") or 0
        averaged = [m for m in members[key] if m["state"] == used and m[column] is not None]
        best = max(averaged, key=lambda m: m[column], default=None)
        groups.append(Group(
            key=key, order=min(s["order_min"] for s in per_state.values()),
            mean=agg.get(f"{column}_mean") if n else None,
            std=agg.get(f"{column}_stddev") if n >= 2 else None, n=n, from_stopped=bool(n) and used == EARLY_STOPPED,
            counts={s: rec["run_id_count"] for s, rec in per_state.items()},
            best_run_id=best["run_id"] if best else None, best_value=best[column] if best else None,
            seeds=tuple(sorted({m["seed"] for m in averaged if m["seed"] is not None})),
            run_ids=tuple(m["run_id"] for m in averaged)))
    return sorted(groups, key=lambda g: g.order)
