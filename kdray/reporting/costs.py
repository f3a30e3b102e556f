"""What a table row's runs cost: the student's size and speed, training's time and memory, as the trial runs logged
them (`kdray.contract.COST_METRICS`, read by `runs.py` into the `cost.*` columns of `SweepData.runs`).

A row's cost is the mean over the runs its mIoU averages (`Group.run_ids`) that logged that cost, each run's last
logged value; runs that logged none are left out of that mean and counted (`RowCost.n` of `RowCost.n_runs`), and a
note says so. Where a cost was measured (tag kdray.cost.device) matters for latency, s/iteration, device-seconds
and peak memory: each is averaged only when the runs that logged it were measured on one device. A row whose runs
measured one on several devices shows `—` for it, and the table's note names the devices: never is a CPU latency
averaged with a GPU one. GFLOPs and parameters do not depend on the device and are averaged over every run that
logged them. Rows measured on different devices sit side by side in one table: its note says which device each
row's costs come from. Runs recorded before kdray logged costs have no `cost.*` column: no table then has a cost
column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa

from kdray.reporting.runs import (
    COST_COLUMNS,
    COST_DEVICE_COLUMN,
    COST_DEVICE_SECONDS,
    COST_GFLOPS,
    COST_LATENCY_MS,
    COST_PARAMS,
    COST_PEAK_MEMORY_MIB,
    COST_S_PER_ITERATION,
    COST_TEACHER_SHARE,
)
from kdray.reporting.table import DASH, millions

UNRECORDED = "device not recorded"  # the device of runs that logged costs without the kdray.cost.device tag


def significant(value: float | None, digits: int = 3) -> str:
    """`digits` significant digits without an exponent; whole numbers once the integer part has that many or more:
    0.01234 -> `0.0123`, 1.234 -> `1.23`, 123.4 -> `123`, 12345.6 -> `12346`; `—` for None."""
    if value is None:
        return DASH
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def whole(value: float | None) -> str:
    """Rounded to a whole number: 1536.4 -> `1536`; `—` for None."""
    return DASH if value is None else f"{value:.0f}"


@dataclass(frozen=True)
class CostColumn:
    column: str  # the runs-table column
    field: str  # the field of the table's data (`<field>_mean`)
    header: str | None  # the cell column's header (units in it); None: in the data only
    per_device: bool  # depends on where it was measured: not averaged across devices
    text: Callable[[float | None], str]  # the cell, from the mean
    scale: float = 1.0  # shown = mean x scale


# In table order. Parameters: the methods table has its Params (M) column already (from the kdray.params_m tag).
PARAMS = CostColumn(COST_PARAMS, "params", "Params (M)", False, millions, 1e-6)
GFLOPS = CostColumn(COST_GFLOPS, "gflops", "GFLOPs", False, significant)
LATENCY = CostColumn(COST_LATENCY_MS, "latency_ms", "Latency (ms)", True, significant)
S_PER_ITERATION = CostColumn(COST_S_PER_ITERATION, "s_per_iteration", "s / iteration", True, significant)
DEVICE_SECONDS = CostColumn(COST_DEVICE_SECONDS, "device_seconds", "Device-s / run", True, significant)
PEAK_MEMORY = CostColumn(COST_PEAK_MEMORY_MIB, "peak_memory_mib", "Peak memory (MiB)", True, whole)
TEACHER_SHARE = CostColumn(COST_TEACHER_SHARE, "teacher_share", None, True, significant)
COLUMNS = (PARAMS, GFLOPS, LATENCY, S_PER_ITERATION, DEVICE_SECONDS, PEAK_MEMORY, TEACHER_SHARE)
PER_DEVICE_WORDS = "latency, s / iteration, device-seconds and peak memory"

CAPTION = ("Costs: the mean over the same runs of each run's last logged value (runs that logged none left out); "
           "GFLOPs: one forward pass of one image at the evaluation size, 1e9 FLOPs, a multiply-add counted as 2 "
           "(papers often count multiply-adds: half); latency: inference of one image (batch 1), median of timed "
           "runs, ms; s / iteration: wall seconds per training iteration; device-s / run: the device time of a "
           "whole run (GPU-seconds with GPUs, else CPU-seconds); peak memory: a rank's peak device memory, MiB.")


@dataclass(frozen=True)
class RowCost:
    means: dict[str, float | None]  # runs-table column -> mean over the runs that logged it (None: none did, or
    #   a per-device cost of runs measured on several devices)
    logged: frozenset[str]  # the columns at least one of the row's runs logged
    n: int  # runs that logged at least one cost
    n_runs: int  # runs the row averages
    devices: dict[str, int]  # device -> runs of the row measured there (UNRECORDED for runs without the tag)
    measured_on: dict[str, tuple[str, ...]]  # column -> the devices of the runs that logged it

    @property
    def not_averaged(self) -> list[CostColumn]:
        """The per-device costs of the row whose runs measured them on several devices: not averaged."""
        return [c for c in COLUMNS if c.per_device and len(self.measured_on.get(c.column, ())) > 1]

    def device(self, column: CostColumn) -> str | None:
        """The one device the row's runs measured `column` on; None when several, or when none logged it."""
        devices = self.measured_on.get(column.column, ())
        return devices[0] if len(devices) == 1 else None

    def mean(self, column: CostColumn) -> float | None:
        value = self.means.get(column.column)
        return None if value is None else value * column.scale

    def cell(self, column: CostColumn) -> str:
        return column.text(self.mean(column))


def has_costs(runs: pa.Table) -> bool:
    """Whether the runs table has the cost columns and one of its runs logged a cost or the cost-device tag."""
    if COST_DEVICE_COLUMN not in runs.column_names:
        return False
    return any(runs.column(c).null_count < runs.num_rows for c in (*COST_COLUMNS.values(), COST_DEVICE_COLUMN))


def cost_lookup(runs: pa.Table) -> dict[str, dict]:
    """run id -> its cost columns and device; empty for a runs table without cost columns."""
    if COST_DEVICE_COLUMN not in runs.column_names:
        return {}
    names = [*COST_COLUMNS.values(), COST_DEVICE_COLUMN]
    return {rec["run_id"]: rec for rec in runs.select(["run_id", *names]).to_pylist()}


def row_cost(lookup: dict[str, dict], run_ids: Sequence[str]) -> RowCost:
    """The cost of a row averaging `run_ids` (see the module's docstring)."""
    recs = [lookup[r] for r in run_ids if r in lookup]
    recs = [r for r in recs if any(r[c.column] is not None for c in COLUMNS)]
    devices: dict[str, int] = {}
    for rec in recs:
        device = rec[COST_DEVICE_COLUMN] or UNRECORDED
        devices[device] = devices.get(device, 0) + 1
    means, logged, measured_on = {}, set(), {}
    for column in COLUMNS:
        having = [rec for rec in recs if rec[column.column] is not None]
        if having:
            logged.add(column.column)
        measured_on[column.column] = tuple(dict.fromkeys(rec[COST_DEVICE_COLUMN] or UNRECORDED for rec in having))
        mixed = column.per_device and len(measured_on[column.column]) > 1
        values = [rec[column.column] for rec in having]
        means[column.column] = sum(values) / len(values) if values and not mixed else None
    return RowCost(means, frozenset(logged), len(recs), len(run_ids), devices, measured_on)


def shown_columns(costs: Sequence[RowCost], skip: Sequence[CostColumn] = ()) -> list[CostColumn]:
    """The cost columns a table shows: those with a header that at least one of its rows logged."""
    logged = frozenset().union(*(c.logged for c in costs))
    return [c for c in COLUMNS if c.header is not None and c not in skip and c.column in logged]


def cost_record(cost: RowCost) -> dict:
    """A row's costs for the table's data: `<field>_mean` in the shown unit (parameters as a count), the runs
    that logged costs (`cost_n`) and the device (`cost_device`: several joined by `; `, null without costs)."""
    record = {f"{c.field}_mean": cost.means.get(c.column) for c in COLUMNS}
    record["cost_n"] = cost.n
    record["cost_device"] = "; ".join(cost.devices) or None
    return record


COST_TYPES = {**{f"{c.field}_mean": pa.float64() for c in COLUMNS}, "cost_n": pa.int64(), "cost_device": pa.string()}


def _runs(n: int) -> str:
    return f"{n} run{'s' if n != 1 else ''}"


def device_notes(rows: Sequence[tuple[str, RowCost]]) -> list[str]:
    """Footnotes on where a table's costs were measured, given (row label, its cost) of each row: the one device,
    or each device with its rows; each row measured on several devices, whose per-device costs are not averaged;
    each row with costs from only some of its runs; the rows without any. Nothing when no row has costs."""
    without = [label for label, cost in rows if not cost.n]
    rows = [(label, cost) for label, cost in rows if cost.n]
    if not rows:
        return []
    by_device: dict[str, list[str]] = {}
    for label, cost in rows:
        for device in cost.devices:
            by_device.setdefault(device, []).append(label)
    notes = []
    if len(by_device) == 1:
        notes.append(f"Costs measured on `{next(iter(by_device))}`.")
    else:
        where = "; ".join(f"`{device}`: {', '.join(labels)}" for device, labels in by_device.items())
        notes.append(f"Costs measured on {len(by_device)} devices ({where}): {PER_DEVICE_WORDS} compare only "
                     "between rows measured on the same device.")
    for label, cost in rows:
        split = [c.header for c in cost.not_averaged if c.header]
        if split:
            counts = ", ".join(f"`{device}` ({_runs(n)})" for device, n in cost.devices.items())
            notes.append(f"{label}: its runs' costs were measured on several devices, {counts}: its "
                         f"{', '.join(split)} are not averaged across devices ({DASH}).")
    for label, cost in rows:
        if cost.n < cost.n_runs:
            notes.append(f"{label}: costs from {cost.n} of its {cost.n_runs} averaged runs (the others logged none).")
    if without:
        notes.append(f"No costs logged by the runs of: {', '.join(without)} ({DASH}).")
    return notes
