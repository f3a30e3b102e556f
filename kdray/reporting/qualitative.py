"""The report's qualitative figure: the sweep's preview images with the ground truth, the teacher and the best run of
each method side by side, the figure distillation papers show (CIRKD's Fig. 6, I2CKD's Fig. 4).

Layout: one row per preview image, columns Image | Ground truth | Teacher | <method> | <method> ..., methods in the
order of the method table (CE first within each teacher -> student pair; a search's confirmation runs). Each cell of
a method is the prediction of that method's best run (`kdray.reporting.tables.method_groups`, by the report's
`--value`) at the run's own best evaluation: the `predictions/best_predictions.npz` artifact every trial run logs
(`kdray.rendering.write_predictions`), so nothing is run again. The teacher's column comes from a distilling run's
file (the frozen teacher predicts the same images in every run), a compared run's or, when none distils, another run
of the sweep's. A method with nothing to show keeps its column, greyed, and the figure's notes say why: no finished
run, a best run that logged no predictions (a run from before kdray logged them, or data.preview_images 0), a file
that cannot be read (and why), or predictions of other images (another split). When no method has anything to show
there is no figure, and the report's Predictions section says why for each.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kdray import contract
from kdray.rendering import Predictions, colorize, read_predictions
from kdray.reporting.runs import EARLY_STOPPED, FINISHED, SweepData, open_client, read_artifact
from kdray.reporting.tables import method_groups, pair_text

PANEL_INCHES = 2.0  # width of one column
DPI = 120
MISSING_GREY = 0.85  # the face of a column with nothing to show

# run id -> its best predictions; None when it logged none; a text saying why when its file is unreadable
Fetch = Callable[[str], "Predictions | str | None"]


@dataclass(frozen=True)
class Column:
    """One method's column: its label, its best run (None: no run to show), and what that run predicted (None:
    nothing to show; `problem` says why)."""

    label: str
    run_id: str | None
    run_name: str | None
    predictions: Predictions | None
    problem: str | None = None


@dataclass(frozen=True)
class Qualitative:
    """The written figure and its Markdown (caption and notes), or why there is none."""

    path: Path | None
    markdown: str
    notes: tuple[str, ...]


def fetch_predictions(tracking_uri: str) -> Fetch:
    """A function reading a run's `predictions/best_predictions.npz` artifact through a client of the store: the
    predictions, None when the run has none, or why the file it has cannot be read."""
    client = open_client(tracking_uri)
    artifact = f"{contract.PREDICTIONS_ARTIFACT_DIR}/{contract.BEST_PREDICTIONS_FILE}"

    def read(path: Path) -> Predictions | str:
        try:
            return read_predictions(path)
        except ValueError as err:  # not a predictions file, or one of another layout
            return str(err)

    def fetch(run_id: str) -> Predictions | str | None:
        return read_artifact(client, run_id, artifact, read)

    return fetch


def method_columns(data: SweepData, value: str, fetch: Fetch) -> list[Column]:
    """Each method's column, in method-table order: its best run's predictions, or the reason there are none. A
    column whose predictions are of other images than the first column with predictions is given none."""
    groups = method_groups(data, value)
    several_pairs = len({mg.pair for mg in groups}) > 1
    names = dict(zip(data.runs.column("run_id").to_pylist(), data.runs.column("run_name").to_pylist()))
    columns, reference = [], None
    for mg in groups:
        label = mg.label + (f" [{pair_text(mg.pair)}]" if several_pairs else "")
        run_id = mg.group.best_run_id
        if run_id is None:
            columns.append(Column(label, None, None, None, "no finished run"))
            continue
        shown = names.get(run_id) or run_id
        predictions = fetch(run_id)
        if predictions is None:
            columns.append(Column(label, run_id, shown, None, f"its best run `{shown}` logged no predictions"))
        elif isinstance(predictions, str):
            columns.append(Column(label, run_id, shown, None, f"the predictions its best run `{shown}` logged cannot "
                                                              f"be read: {predictions}"))
        elif reference is not None and not predictions.same_images(reference):
            columns.append(Column(label, run_id, shown, None, f"its best run `{shown}` previewed other images "
                                                              "(another split or dataset)"))
        else:
            reference = reference or predictions
            columns.append(Column(label, run_id, shown, predictions))
    return columns


def teacher_column(columns: list[Column], data: SweepData, fetch: Fetch | None = None,
                   sweep: SweepData | None = None) -> Column | None:
    """The teacher's predictions from the first column whose run had a teacher; else (with `fetch` and `sweep`) from
    the first other finished run of the whole sweep that has them for the same images (a search run, when no
    confirmed method distils: the frozen teacher predicts the same in every run). None when no run has them.
    Labelled with the teacher's arch when the sweep has several."""
    shown = [c for c in columns if c.predictions is not None]
    candidates = [(c.run_id, c.run_name, c.predictions) for c in shown]
    if fetch is not None and sweep is not None and shown:
        seen = {c.run_id for c in columns}
        rows = zip(*(sweep.runs.column(k).to_pylist() for k in ("run_id", "run_name", "state", "teacher_arch")))
        candidates += [(run_id, name, None) for run_id, name, state, arch in rows
                       if run_id not in seen and state in (FINISHED, EARLY_STOPPED) and arch]
    runs = sweep.runs if sweep is not None else data.runs
    arch = dict(zip(runs.column("run_id").to_pylist(), runs.column("teacher_arch").to_pylist()))
    several = len({a for a in arch.values() if a}) > 1
    for run_id, run_name, predictions in candidates:
        if predictions is None:
            predictions = fetch(run_id)
            if not isinstance(predictions, Predictions) or not predictions.same_images(shown[0].predictions):
                continue
        if predictions.teacher is not None:
            teacher = dataclasses.replace(predictions, student=predictions.teacher, teacher=None)
            label = "Teacher" + (f" ({arch.get(run_id)})" if several else "")
            return Column(label, run_id, run_name or run_id, teacher)
    return None


def draw(columns: list[Column], path: Path) -> Path:
    """The figure: a row per preview image, Image | Ground truth | each column's prediction (colours from the
    predictions' palette, ignore pixels black); a column without predictions is a grey panel saying so."""
    reference = next(c.predictions for c in columns if c.predictions is not None)
    rows = len(reference.images)
    heights = [image.shape[0] / image.shape[1] for image in reference.images]
    count = 2 + len(columns)
    fig = Figure(figsize=(PANEL_INCHES * count, PANEL_INCHES * sum(heights) + 0.6))
    grid = fig.add_gridspec(rows, count, height_ratios=heights, wspace=0.03, hspace=0.03)
    for r in range(rows):
        cells = [("Image", reference.images[r]), ("Ground truth", colorize(reference.labels[r], reference.palette))]
        cells += [(c.label, None if c.predictions is None
                   else colorize(c.predictions.student[r], c.predictions.palette)) for c in columns]
        for k, (label, picture) in enumerate(cells):
            ax = fig.add_subplot(grid[r, k])
            ax.set_xticks([])
            ax.set_yticks([])
            if picture is None:  # a grey panel of the image's shape, so that the rows stay aligned
                picture = np.full(reference.images[r].shape, round(255 * MISSING_GREY), np.uint8)
                if r == 0:
                    ax.text(0.5, 0.5, "no predictions", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            ax.imshow(picture, interpolation="nearest")
            if r == 0:
                ax.set_title(textwrap.fill(label, 22), fontsize=9)  # a pair's name is long
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def write_qualitative(data: SweepData, value: str, out: Path, fetch: Fetch | None = None,
                      sweep: SweepData | None = None) -> Qualitative:
    """Write `out/qualitative.png` (contract.QUALITATIVE_FIGURE) when some method's best run logged predictions,
    and return it with its Markdown: a heading, the figure, a caption and a note per column without predictions.
    `data` holds the runs the method table compares (a search's confirmation stage), `sweep` the whole sweep (where
    the teacher's column may come from when no compared run distils). When no method has predictions to show, no
    figure is written and the Markdown says why, method by method (nothing at all only when no method has a run).
    `fetch` defaults to reading the runs' artifacts (`fetch_predictions`)."""
    fetch = fetch or fetch_predictions(data.tracking_uri)
    columns = method_columns(data, value, fetch)
    shown = [c for c in columns if c.predictions is not None]
    if not shown:
        notes = tuple(f"{c.label}: {c.problem}." for c in columns if c.run_id is not None)
        if not notes:
            return Qualitative(None, "", ())
        lines = ["### Predictions", "", "No figure: no method's best run has predictions to show.", ""]
        return Qualitative(None, "\n".join(lines + [f"- {note}" for note in notes] + [""]), notes)
    teacher = teacher_column(columns, data, fetch, sweep)
    notes = tuple(f"{c.label}: {c.problem}." for c in columns if c.problem)
    if teacher is None:
        notes += ("No run of the sweep logged the teacher's predictions of these images: no teacher column.",)
    path = draw(([teacher] if teacher else []) + columns, out / contract.QUALITATIVE_FIGURE)
    reference = shown[0].predictions
    iterations = ", ".join(f"{c.label} {c.predictions.iteration}" for c in shown)
    caption = (f"The {len(reference.indices)} preview images (val items {', '.join(map(str, reference.indices))}), "
               f"their ground truth{', the teacher' if teacher else ''} and each method's best run (by "
               f"{'its last' if value == 'last' else 'its best'} val mIoU), predicting at its best evaluation "
               f"(iteration: {iterations}). Black: pixels of no class.")
    lines = ["### Predictions", "", f"![qualitative]({path.name})", "", caption, ""]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    return Qualitative(path, "\n".join(lines), notes)
