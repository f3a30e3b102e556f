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
    data:    the same content as numbers (fractions as percent, named `*_pct`), for CSV and Parquet.
    """

    name: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    align: str
    data: pa.Table
    notes: list[str] = field(default_factory=list)


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
