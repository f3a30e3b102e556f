"""Tables as text and files: Markdown (a README, a PR), LaTeX with booktabs (a paper), CSV and Parquet (analysis).

Markdown and LaTeX show the cells; CSV and Parquet hold the numbers (`Table.data`). CSV has no list type, so
list columns (the seeds) are written joined by `;` there; Parquet keeps them as lists.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from kdray.reporting.table import DAGGER, Table

_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_SYMBOLS = {"±": r"$\pm$", DAGGER: r"$^\dagger$", "→": r"$\rightarrow$", "—": "---", "–": "--",
                  "Δ": r"$\Delta$", "`": ""}


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """A Markdown (GFM) table: `align` has one letter per column, `r` right-aligned, anything else left; a `|`
    in a cell is escaped. kdray's one Markdown table writer (the report's tables, the sweep's summary)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"

    rule = "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def markdown(table: Table, level: int = 3) -> str:
    """Heading, caption, the table, then its footnotes."""
    parts = [f"{'#' * level} {table.title}", "", table.caption, "",
             markdown_table(table.header, table.rows, table.align)]
    if table.notes:
        parts += [""] + [f"{note}  " for note in table.notes]
    return "\n".join(parts) + "\n"


def latex_text(text: str) -> str:
    out = []
    for ch in text:
        out.append(_LATEX_ESCAPES.get(ch) or _LATEX_SYMBOLS.get(ch, ch))
    return "".join(out)


def latex(table: Table) -> str:
    """A `table` float with a booktabs `tabular` (needs `\\usepackage{booktabs}`), caption on top, footnotes
    under it; label `tab:kdray-<name>`."""
    def line(cells: list[str]) -> str:
        return " & ".join(latex_text(c) for c in cells) + r" \\"

    parts = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_text(table.caption)}}}",
             rf"\label{{tab:kdray-{table.name.replace('_', '-')}}}", rf"\begin{{tabular}}{{{table.align}}}",
             r"\toprule", line(table.header), r"\midrule", *(line(r) for r in table.rows), r"\bottomrule",
             r"\end{tabular}"]
    if table.notes:
        parts += [r"\par\smallskip", r"{\footnotesize " + r" \\ ".join(latex_text(n) for n in table.notes) + "}"]
    parts.append(r"\end{table}")
    return "\n".join(parts) + "\n"


def _flat(data: pa.Table) -> pa.Table:
    for i, field in enumerate(data.schema):
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            joined = pc.binary_join(pc.cast(data.column(i), pa.list_(pa.string())), ";")
            data = data.set_column(i, field.name, joined)
    return data


def write_csv(data: pa.Table, path: Path) -> Path:
    pa_csv.write_csv(_flat(data), path)
    return path


def write_parquet(data: pa.Table, path: Path) -> Path:
    pq.write_table(data, path)
    return path
