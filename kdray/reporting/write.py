"""`write_report`: read a sweep, build its tables and plots, write them; log them on the sweep's parent run only
when asked (`log_artifacts=True`: the sweep does; `python -m kdray.report` only with --log)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from kdray import contract
from kdray.contract import STAGE_CONFIRM
from kdray.errors import ConfigError
from kdray.reporting import plots, render
from kdray.reporting.confirmed import confirmed_table
from kdray.reporting.costs import has_costs
from kdray.reporting.groups import VALUES, count_phrase
from kdray.reporting.pareto import pareto_rows, pareto_table
from kdray.reporting.qualitative import write_qualitative
from kdray.reporting.runs import FINISHED, SweepData, open_client, read_iou_at, read_sweep
from kdray.reporting.search import Search, analyse, search_tables
from kdray.reporting.table import Table
from kdray.reporting.tables import (
    ablation_table,
    best_runs,
    describe_value,
    excluded_table,
    method_groups,
    methods_table,
    per_class_table,
    state_counts,
)

FORMATS = ("md", "tex", "csv", "parquet")
SMOKE_NOTE = (f"SMOKE TEST (tag {contract.SMOKE_TEST}=true): a few iterations per trial, run to check the pipeline; "
              "its numbers are not results.")


@dataclass(frozen=True)
class ReportResult:
    markdown: str  # the whole report as Markdown (what report.md holds), whatever the formats
    files: tuple[Path, ...]  # everything written, tables and plots
    tables: dict[str, Table]  # by name: search_summary, ablation, methods, pareto, per_class, excluded, search_best,
    #   search_top, importance (those the sweep has)
    experiment: str
    sweep_id: str
    sweep_run_id: str
    value: str
    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)  # seconds: read, tables, plots, write
    verdict: str | None = None  # a confirmed search's winner and whether its gains exceed the seed noise


def build_tables(data: SweepData, value: str, *, top_k: int = 10,
                 iou_at_best: dict[str, dict[str, float]] | None = None) -> tuple[list[Table], Search | None]:
    """Every table of the sweep, in report order, and the search analysis (None for an ablation sweep).

    iou_at_best: for value="best", the per-class IoUs of the best runs at their best step (`best_iou`); read
    from the store when not given.
    """
    if value == "best" and data.history is None:
        raise ValueError("value='best' needs the metric histories: read the sweep with history=True")
    if value == "best" and iou_at_best is None:
        iou_at_best = best_iou(data)
    stages = stage_views(data)
    if stages is not None:  # a search with its confirmation stage: each table reads the runs it is about
        confirm, searched = stages
        search = analyse(searched, value)
        summary, _ = confirmed_table(confirm, searched, value)
        tables = [summary, methods_table(confirm, value, confirmed=True), pareto_table(confirm, value),
                  *search_tables(searched, search, value, top_k), per_class_table(confirm, value, iou_at_best),
                  excluded_table(data)]
    else:
        search = analyse(data, value) if data.space_kind == "search" else None
        tables = [ablation_table(data, value), methods_table(data, value), pareto_table(data, value)]
        if search is not None:
            tables += search_tables(data, search, value, top_k)
        tables += [per_class_table(data, value, iou_at_best), excluded_table(data)]
    tables = [t for t in tables if t is not None]
    if data.smoke_test:
        tables = [smoke_marked(t) for t in tables]
    return tables, search


def stage_views(data: SweepData) -> tuple[SweepData, SweepData] | None:
    """A search sweep's confirmation-stage runs and its search-stage runs, each as a `SweepData`; None for an
    ablation, or a search recorded without a confirmation stage (before kdray had one)."""
    stages = data.runs.column("stage").to_pylist()
    if data.space_kind != "search" or STAGE_CONFIRM not in stages:
        return None
    confirm = pa.array([s == STAGE_CONFIRM for s in stages])
    return (dataclasses.replace(data, runs=data.runs.filter(confirm)),
            dataclasses.replace(data, runs=data.runs.filter(pc.invert(confirm))))


def smoke_marked(table: Table) -> Table:
    """The table with its caption opened by the smoke-test warning."""
    return dataclasses.replace(table, caption=f"{SMOKE_NOTE} {table.caption}")


def best_iou(data: SweepData) -> dict[str, dict[str, float]]:
    """Per-class IoU at the best evaluation of each run the per-class table shows (value="best")."""
    steps = {run_id: step for _, run_id, step in best_runs(data, "best") if step is not None}
    return read_iou_at(data.tracking_uri, steps, data.class_keys)


def _curve_groups(data: SweepData, value: str) -> list[tuple[str, list[str]]]:
    """Ablation rows for an ablation sweep, methods otherwise: (label, every run id of the group)."""
    column = "row" if data.space_kind == "ablation" and any(data.runs.column("row").to_pylist()) else "method"
    groups: dict[str, list[str]] = {}
    for key, run_id in zip(data.runs.column(column).to_pylist(), data.runs.column("run_id").to_pylist()):
        groups.setdefault(key or "?", []).append(run_id)
    if column == "method":  # keep the methods table's order (CE first)
        order = list(dict.fromkeys(mg.group.key[2] or "?" for mg in method_groups(data, value)))
        return [(k, groups[k]) for k in order if k in groups]
    return list(groups.items())


def write_plots(data: SweepData, search: Search | None, out: Path, value: str) -> list[Path]:
    sid = data.sweep_id
    stages = stage_views(data)
    if stages is not None:  # the curves of the runs the method table compares: the confirmation stage's
        data = stages[0]
    written = [plots.plot_curves(data.history, data.runs, _curve_groups(data, value), out / "miou_vs_iteration.png",
                                 f"val mIoU vs iteration, sweep {sid}")]
    if has_costs(data.runs):  # the rows of the pareto table: the methods table's
        written.append(plots.plot_pareto(pareto_rows(data, value), out / "pareto.png",
                                         f"val mIoU vs cost, sweep {sid}"))
    if search is not None:
        written.append(plots.plot_parallel(search, out / "parallel_coordinates.png",
                                           f"Parallel coordinates, sweep {sid}"))
        if search.importance is not None:
            written.append(plots.plot_importance(search.importance, out / "importance.png",
                                                 f"Parameter importance, sweep {sid}"))
    return [p for p in written if p is not None]


def report_markdown(data: SweepData, value: str, tables: list[Table], images: list[Path]) -> str:
    counts = state_counts(data)
    finished = counts.get(FINISHED, 0)
    left_out = count_phrase(counts)
    space = data.sweep_tags.get(contract.SPACE, "?")
    title = f"# kdray report: {data.experiment}, sweep {data.sweep_id}" + (" (smoke test)" if data.smoke_test else "")
    parts = [title, ""] + ([f"**{SMOKE_NOTE}**", ""] if data.smoke_test else [])
    parts += [f"Space `{space}` ({data.space_kind}); {data.runs.num_rows} trial runs: {finished} finished"
              f"{', ' + left_out if left_out else ''}. Cells show val mIoU at {describe_value(value)} "
              f"(`--value {value}`). Sweep run `{data.sweep_run_id}`.", ""]
    parts += unrun_note(data)
    parts += [render.markdown(t) for t in tables]
    if images:
        parts += ["### Plots", ""] + [f"![{p.stem.replace('_', ' ')}]({p.name})" for p in images] + [""]
    return "\n".join(parts)


def unrun_note(data: SweepData) -> list[str]:
    """Markdown lines for the trials the sweep planned that have no run (an interrupted sweep's), and how the
    sweep ended when it did not end well: what no table can show, since those trials left no run to list."""
    planned = int(data.sweep_tags.get(contract.TRIALS_PLANNED) or 0)
    missing = planned - data.runs.num_rows
    ended = data.sweep_tags.get(contract.FAILURE)
    if missing > 0:
        how = f"; the sweep ended: {ended}" if ended else ""
        return [f"**{missing} of the {planned} trials the space plans have no run: they never started{how}.**", ""]
    return [f"**The sweep ended: {ended}.**", ""] if ended else []


def write_report(tracking_uri: str, experiment: str, sweep_id: str | None = None, out_dir: str | Path | None = None,
                 *, value: str = "last", formats: Sequence[str] = ("md",), plots: bool = True,
                 log_artifacts: bool = False, top_k: int = 10) -> ReportResult:
    """Write the sweep's tables (in each of `formats`: md, tex, csv, parquet) and plots (PNG) to `out_dir`, and
    return the Markdown. Nothing is written to MLflow unless `log_artifacts`: then the files are also logged as
    artifacts of the sweep's parent run under `report/`.

    sweep_id: None reports the experiment's latest sweep that is not a smoke test (tag kdray.smoke_test).
    out_dir:  None writes to reports/<experiment>/<sweep id> under the working directory.
    value:    "last" (each run's last evaluation) or "best" (its best evaluation; reads metric histories).
    Files: report.md; <table>.tex; <table>.csv and runs.csv; <table>.parquet, runs.parquet and history.parquet;
    miou_vs_iteration.png, pareto.png when runs logged GFLOPs or latency, for a search sweep
    parallel_coordinates.png and importance.png, and qualitative.png (the preview images predicted by each method's
    best run, `kdray.reporting.qualitative`) when those runs logged predictions; with `log_artifacts` that figure is
    also logged with log_image (key `qualitative`) on the sweep's run: step 0 the first time, then one step more
    each time a report is logged again (`logged_images`), so the image slider holds each version once.
    Raises ConfigError for an unknown store, experiment or sweep, or a bad value or format.
    """
    if value not in VALUES:
        raise ConfigError(f"--value must be one of {', '.join(VALUES)}, got {value!r}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ConfigError(f"unknown report format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
    timings = {}
    start = time.perf_counter()
    data = read_sweep(tracking_uri, experiment, sweep_id, history=plots or value == "best")
    iou_at_best = None
    if value == "best":
        iou_at_best = best_iou(data)
    timings["read"] = time.perf_counter() - start

    start = time.perf_counter()
    tables, search = build_tables(data, value, top_k=top_k, iou_at_best=iou_at_best)
    timings["tables"] = time.perf_counter() - start

    out = Path(out_dir) if out_dir is not None else Path("reports") / experiment / data.sweep_id
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    images = write_plots(data, search, out, value) if plots else []
    stages = stage_views(data)
    qualitative = write_qualitative(stages[0] if stages is not None else data, value, out, sweep=data) \
        if plots else None
    timings["plots"] = time.perf_counter() - start

    start = time.perf_counter()
    text = report_markdown(data, value, tables, images)
    files = list(images)
    if qualitative is not None and qualitative.markdown:  # the figure, or why there is none
        text += "\n" + qualitative.markdown
    if qualitative is not None and qualitative.path is not None:
        files.append(qualitative.path)
    if "md" in formats:
        (out / "report.md").write_text(text)
        files.append(out / "report.md")
    for table in tables:
        if "tex" in formats:
            (out / f"{table.name}.tex").write_text(render.latex(table))
            files.append(out / f"{table.name}.tex")
        if "csv" in formats:
            files.append(render.write_csv(table.data, out / f"{table.name}.csv"))
        if "parquet" in formats:
            files.append(render.write_parquet(table.data, out / f"{table.name}.parquet"))
    if "csv" in formats:
        files.append(render.write_csv(data.runs, out / "runs.csv"))
    if "parquet" in formats:
        files.append(render.write_parquet(data.runs, out / "runs.parquet"))
        if data.history is not None:
            files.append(render.write_parquet(data.history, out / "history.parquet"))
    if log_artifacts:
        client = open_client(tracking_uri)
        for path in files:
            client.log_artifact(data.sweep_run_id, str(path), contract.REPORT_ARTIFACT_DIR)
        if qualitative is not None and qualitative.path is not None:  # also in the run's image view
            step = len(logged_images(client, data.sweep_run_id, contract.QUALITATIVE_IMAGE_KEY))
            with Image.open(qualitative.path) as figure:
                client.log_image(data.sweep_run_id, figure.convert("RGB"), key=contract.QUALITATIVE_IMAGE_KEY,
                                 step=step, synchronous=True)
    timings["write"] = time.perf_counter() - start
    return ReportResult(markdown=text, files=tuple(files), tables={t.name: t for t in tables},
                        experiment=experiment, sweep_id=data.sweep_id, sweep_run_id=data.sweep_run_id, value=value,
                        out_dir=out, timings=timings,
                        verdict=_verdict(tables))


def logged_images(client, run_id: str, key: str) -> list[str]:
    """The artifact paths of the images logged on the run under `key` (MLflow 3 keeps each as
    `images/<key>+step+<step>+timestamp+...png`, next to a compressed copy, which is not counted)."""
    prefix = f"{key}+step+"
    return [a.path for a in client.list_artifacts(run_id, "images")
            if a.path.split("/")[-1].startswith(prefix) and a.path.endswith(".png")]


def _verdict(tables: list[Table]) -> str | None:
    summary = next((t for t in tables if t.name == "search_summary"), None)
    first = summary.notes[0] if summary is not None and summary.notes else ""
    return first if first.startswith(("Winner", "Best searched configuration")) else None
