"""The Pareto front of a sweep: each method row's val mIoU against what its student costs, GFLOPs and latency.

Rows are those of the methods table (`tables.method_groups`: by teacher, student, method, and by ablation row
where rows share a method; for a search with a confirmation stage, its confirmation runs: one row per confirmed
configuration and the CE-only student). A row's point is (its cost, its mIoU): the mIoU is the mean ± sample std
(ddof=1) over its finished runs, the rule of every table (`groups.py`); the cost is the mean over the same runs
(`costs.py`). The teacher is no candidate and has no point.

A row is on the front when no other row dominates it: row q dominates row p when cost_q <= cost_p and
mIoU_q >= mIoU_p, one of them strict (lower cost is better, higher mIoU is better). Rows with equal cost and
equal mIoU do not dominate each other: both stay on the front. Means are compared as they are: a row on the front
need not be better than a dominated one beyond the seed noise (the std is shown for that).

Left out of a front, and named in the table's notes (never dropped silently): rows without a finished run (no
mean), rows built only from early-stopped runs (values at stopping, not comparable), rows without that cost
logged, and, for latency, rows whose runs measured it on several devices. Latency depends on where it was
measured (tag kdray.cost.device): one latency front per device, never one across devices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from kdray.reporting.costs import GFLOPS, LATENCY, CostColumn, RowCost, cost_lookup, has_costs, row_cost, significant
from kdray.reporting.groups import Group
from kdray.reporting.runs import SweepData
from kdray.reporting.table import DASH, Table, mean_std, percent_or_none, typed_table
from kdray.reporting.tables import describe_value, method_groups, pair_text


def non_dominated(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (cost, value) point, whether no other point dominates it, minimising cost and maximising value.

    q dominates p when cost_q <= cost_p and value_q >= value_p, one of them strict; equal points do not dominate
    each other (duplicates are all kept). Sorted by cost, then by value descending: a point is dominated when a
    point of its cost has a higher value, or when a point of strictly lower cost has a value at least its own.
    O(n log n). Raises ValueError for a cost or value that is not a finite number.
    """
    for cost, value in points:
        if not (math.isfinite(cost) and math.isfinite(value)):
            raise ValueError(f"non_dominated: point ({cost}, {value}) is not finite")
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front = [False] * len(points)
    best_cheaper = -math.inf  # the highest value among points of strictly lower cost than the current one
    start = 0
    while start < len(order):
        cost = points[order[start]][0]
        end = start
        while end < len(order) and points[order[end]][0] == cost:
            end += 1
        top = points[order[start]][1]  # the highest value at this cost
        for i in order[start:end]:
            front[i] = points[i][1] == top and top > best_cheaper
        best_cheaper = max(best_cheaper, top)
        start = end
    return front


_WORDS = {GFLOPS.column: "GFLOPs", LATENCY.column: "latency"}


@dataclass(frozen=True)
class ParetoRow:
    pair: tuple[str | None, str | None]  # teacher arch, student arch
    label: str  # the methods table's method label
    group: Group
    cost: RowCost
    gflops_front: bool | None  # on the GFLOPs front; None: not placed (see `left_out`)
    latency_front: bool | None  # on its device's latency front; None: not placed

    @property
    def gflops(self) -> float | None:
        return self.cost.mean(GFLOPS)

    @property
    def latency_ms(self) -> float | None:
        return self.cost.mean(LATENCY)

    @property
    def latency_device(self) -> str | None:
        """The device its latency was measured on; None without a latency (or measured on several devices)."""
        return self.cost.device(LATENCY) if self.latency_ms is not None else None

    def left_out(self, column: CostColumn) -> str | None:
        """Why the row is not placed against `column` (GFLOPS or LATENCY); None when it is."""
        g = self.group
        if g.mean is None:
            return "no finished run with a val mIoU"
        if g.from_stopped:
            return "built only from early-stopped runs (values at stopping)"
        if column.column not in self.cost.logged:
            return f"no {_WORDS[column.column]} logged"
        if self.cost.mean(column) is None:  # logged, but per-device and measured on several devices
            devices = ", ".join(f"`{d}`" for d in self.cost.measured_on[column.column])
            return f"its runs measured {_WORDS[column.column]} on several devices ({devices})"
        return None


def pareto_rows(data: SweepData, value: str) -> list[ParetoRow]:
    """Every row of the methods table (in its order) with its costs and whether it is on each front."""
    lookup = cost_lookup(data.runs)
    groups = method_groups(data, value)
    rows = [ParetoRow(mg.pair, mg.label, mg.group, row_cost(lookup, mg.group.run_ids), None, None) for mg in groups]
    gflops = _fronts(rows, GFLOPS, lambda row: None)
    latency = _fronts(rows, LATENCY, lambda row: row.latency_device)
    return [ParetoRow(r.pair, r.label, r.group, r.cost, gflops.get(i), latency.get(i)) for i, r in enumerate(rows)]


def _fronts(rows: list[ParetoRow], column: CostColumn, split) -> dict[int, bool]:
    """Row index -> on the front against `column`, for the rows placed against it; one front per value of
    `split(row)` (the device, for latency)."""
    placed: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        if row.left_out(column) is None:
            placed.setdefault(split(row), []).append(i)
    result = {}
    for members in placed.values():
        flags = non_dominated([(rows[i].cost.mean(column), rows[i].group.mean) for i in members])
        result.update(zip(members, flags))
    return result


def has_points(rows: Sequence[ParetoRow]) -> bool:
    """Whether any row is placed on either front."""
    return any(r.gflops_front is not None or r.latency_front is not None for r in rows)


def _mark(on_front: bool | None) -> str:
    return DASH if on_front is None else ("yes" if on_front else "no")


def pareto_table(data: SweepData, value: str) -> Table | None:
    """`pareto`: each method row's mIoU, GFLOPs and latency, and whether it is on each front; rows with neither
    cost, or not placed, are named in the notes. None when no run logged GFLOPs or latency."""
    if not has_costs(data.runs):
        return None
    rows = pareto_rows(data, value)
    if not any(GFLOPS.column in r.cost.logged or LATENCY.column in r.cost.logged for r in rows):
        return None
    several_pairs = len({r.pair for r in rows}) > 1
    shown = [r for r in rows if r.gflops_front is not None or r.latency_front is not None]
    shown.sort(key=lambda r: (r.gflops is None, r.gflops or 0.0, r.latency_ms is None, r.latency_ms or 0.0))
    header = ["Teacher → Student", "Method", "mIoU (%)", "n", "GFLOPs", "Front (GFLOPs)", "Latency (ms)",
              "Front (latency)"]
    cells, records = [], []
    for r in shown:
        g = r.group
        cells.append([pair_text(r.pair), r.label, mean_std(g.mean, g.std), str(g.n), significant(r.gflops),
                      _mark(r.gflops_front), significant(r.latency_ms), _mark(r.latency_front)])
        records.append({"teacher_arch": r.pair[0], "student_arch": r.pair[1], "method": r.label,
                        "miou_pct_mean": percent_or_none(g.mean), "miou_pct_std": percent_or_none(g.std), "n": g.n,
                        "seeds": list(g.seeds), "gflops": r.gflops, "gflops_front": r.gflops_front,
                        "latency_ms": r.latency_ms, "latency_device": r.latency_device,
                        "latency_front": r.latency_front, "value": value, "sweep_id": data.sweep_id})
    types = {"gflops": pa.float64(), "gflops_front": pa.bool_(), "latency_ms": pa.float64(),
             "latency_device": pa.string(), "latency_front": pa.bool_()}
    caption = (f"Pareto front (sweep `{data.sweep_id}`): val mIoU (%) at {describe_value(value)}, mean ± sample "
               "std (ddof=1) over the finished runs of each row of the methods table, against the student's GFLOPs "
               "(one forward pass of one image at the evaluation size, 1e9 FLOPs, a multiply-add counted as 2) and "
               "its latency (inference of one image, batch 1, ms), each the mean over the same runs. Front: no other "
               "row has a cost at most its own and an mIoU at least its own, one of them strictly better; equal "
               "rows are all on it. Means are compared as they are, not tested against the seed noise.")
    notes = _notes(rows, several_pairs)
    return Table("pareto", "Pareto front", caption, header, cells, "llrrrlrl", typed_table(records, types), notes)


def _label(row: ParetoRow, several_pairs: bool) -> str:
    return row.label + (f" [{pair_text(row.pair)}]" if several_pairs else "")


def _notes(rows: list[ParetoRow], several_pairs: bool) -> list[str]:
    """Where latency was measured, and every row left out of a front, with why."""
    notes = []
    devices = list(dict.fromkeys(r.latency_device for r in rows if r.latency_front is not None))
    if len(devices) == 1:
        notes.append(f"Latency measured on `{devices[0]}`.")
    elif devices:
        per = "; ".join(f"`{d}`: " + ", ".join(_label(r, several_pairs) for r in rows
                                                if r.latency_front is not None and r.latency_device == d)
                        for d in devices)
        notes.append(f"Latency measured on {len(devices)} devices ({per}): one latency front per device, each "
                     "row's Front (latency) is among the rows of its device.")
    for column in (GFLOPS, LATENCY):
        what = _WORDS[column.column]
        if not any(column.column in r.cost.logged for r in rows):
            notes.append(f"No run logged its student's {what}: no {what} front.")
            continue
        out = [f"{_label(r, several_pairs)} ({r.left_out(column)})" for r in rows if r.left_out(column) is not None]
        if out:
            notes.append(f"Left out of the {what} front: {'; '.join(out)}.")
    return notes

