"""The `Table` every report table is: its cells as shown, its numbers as Arrow, its caption and footnotes."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

DAGGER = "†"
DASH = "—"


@dataclass(frozen=True)
class Table:
    """name:    file stem (`ablation` -> ablation.md/.tex/.csv/.parquet).
    title:   a few words (the Markdown heading).
    caption: what the cells are: which value, over how many seeds, which sweep.
    header, rows: the cells as text (Unicode ± and † are turned into LaTeX by the renderer).
    align:   one of l/r per column.
    notes:   footnotes under the table (the dagger's meaning, omissions).
    data:    the same content, machine-readable, for CSV and Parquet: numbers as numbers (fractions as percent,
             named `*_pct`; mean, std and n in their own columns, unrounded), booleans as booleans, search
             knobs typed as their distribution (`search.knob_types`), null where a cell shows `—`.
    """

    name: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    align: str
    data: pa.Table
    notes: list[str] = field(default_factory=list)


# the Arrow type of the columns of `Table.data` that pyarrow cannot infer when every value is null
COLUMN_TYPES = {
    "miou_pct_mean": pa.float64(), "miou_pct_std": pa.float64(), "n": pa.int64(), "from_stopped": pa.bool_(),
    "best_run_id": pa.string(), "best_miou_pct": pa.float64(), "seeds": pa.list_(pa.int64()),
    "gain_pp": pa.float64(), "params_m": pa.float64(), "iou_pct": pa.float64(), "step": pa.int64(),
    "last_step": pa.int64(), "miou_last_pct": pa.float64(), "miou_pct": pa.float64(), "seed": pa.int64(),
    "rank": pa.int64(), "row": pa.string(), "method": pa.string(), "trial_id": pa.string(),
    "teacher_arch": pa.string(), "student_arch": pa.string(), "failure": pa.string(),
}


def typed_table(records: list[dict], types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Records as an Arrow table; columns named in `types` (or `COLUMN_TYPES`, or `n_<state>` counts) get that
    type even when every value is null, the others are inferred."""
    types = {**COLUMN_TYPES, **(types or {})}
    names = list(dict.fromkeys(k for r in records for k in r))
    columns = {}
    for name in names:
        kind = types.get(name, pa.int64() if name.startswith("n_") else None)
        columns[name] = pa.array([r.get(name) for r in records], kind)
    return pa.table(columns)


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percent: 0.7421 -> `74.21`."""
    return DASH if value is None else f"{100 * value:.{digits}f}"


def mean_std(mean: float | None, std: float | None, from_stopped: bool = False) -> str:
    """`74.21 ± 0.35`, `74.21` when there is one run, `—` when none; a dagger when built from stopped runs."""
    if mean is None:
        return DASH
    text = pct(mean) if std is None else f"{pct(mean)} ± {pct(std)}"
    return text + (DAGGER if from_stopped else "")


def signed(delta: float | None) -> str:
    """A difference of fractions in percentage points: `+1.23`."""
    return DASH if delta is None else f"{100 * delta:+.2f}"


def millions(value: float | None) -> str:
    """Parameters in millions, three significant digits: 13.6, 61.1, 0.213."""
    return DASH if value is None else f"{value:.3g}"


def percent_or_none(value: float | None) -> float | None:
    return None if value is None else 100 * value
