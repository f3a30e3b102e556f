"""The report's qualitative figure: the sweep's preview images with the ground truth, the teacher and the best run of
each method side by side, the figure distillation papers show (CIRKD's Fig. 6, I2CKD's Fig. 4).

Layout: one row per preview image, columns Image | Ground truth | Teacher | <method> | <method> ..., methods in the
order of the method table (CE first within each teacher -> student pair; a search's confirmation runs). Each cell of
a method is the prediction of that method's best run (`kdray.reporting.tables.method_groups`, by the report's
`--value`) at the run's own best evaluation: the `predictions/best_predictions.npz` artifact every trial run logs
(`kdray.rendering.write_predictions`), so nothing is run again. The teacher's column comes from a distilling run's
file (the frozen teacher predicts the same images in every run). A method with nothing to show keeps its column,
greyed, and the figure's notes say why: no finished run, a best run that logged no predictions (a run from before
kdray logged them, or data.preview_images 0), or predictions of other images (another split).
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
from kdray.reporting.runs import SweepData, open_client, read_artifact
from kdray.reporting.tables import method_groups, pair_text

PANEL_INCHES = 2.0  # width of one column
DPI = 120
MISSING_GREY = 0.85  # the face of a column with nothing to show

Fetch = Callable[[str], "Predictions | None"]  # run id -> its best predictions, None when it has none


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
    """A function reading a run's `predictions/best_predictions.npz` artifact (None when the run has none or it is
    unreadable), through a client of the store."""
    client = open_client(tracking_uri)
    artifact = f"{contract.PREDICTIONS_ARTIFACT_DIR}/{contract.BEST_PREDICTIONS_FILE}"

    def fetch(run_id: str) -> Predictions | None:
        return read_artifact(client, run_id, artifact, read_predictions, errors=(ValueError,))

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
        elif reference is not None and not predictions.same_images(reference):
            columns.append(Column(label, run_id, shown, None, f"its best run `{shown}` previewed other images "
                                                              "(another split or dataset)"))
        else:
            reference = reference or predictions
            columns.append(Column(label, run_id, shown, predictions))
    return columns


def teacher_column(columns: list[Column], data: SweepData) -> Column | None:
    """The teacher's predictions from the first column whose run had a teacher (None when no run did). Labelled
    with the teacher's arch when the sweep has several."""
    archs = {a for a in data.runs.column("teacher_arch").to_pylist() if a}
    for column in columns:
        if column.predictions is not None and column.predictions.teacher is not None:
            teacher = dataclasses.replace(column.predictions, student=column.predictions.teacher, teacher=None)
            arch = dict(zip(data.runs.column("run_id").to_pylist(), data.runs.column("teacher_arch").to_pylist()))
            label = "Teacher" + (f" ({arch.get(column.run_id)})" if len(archs) > 1 else "")
            return Column(label, column.run_id, column.run_name, teacher)
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


def write_qualitative(data: SweepData, value: str, out: Path, fetch: Fetch | None = None) -> Qualitative:
    """Write `out/qualitative.png` (contract.QUALITATIVE_FIGURE) when some method's best run logged predictions,
    and return it with its Markdown: a heading, the figure, a caption and a note per column without predictions.
    `data` holds the runs the method table compares (a search's confirmation stage). Without any predictions in
    them (runs from before kdray logged them, data.preview_images 0) nothing is written and the Markdown is empty.
    `fetch` defaults to reading the runs' artifacts (`fetch_predictions`)."""
    source = data
    columns = method_columns(source, value, fetch or fetch_predictions(data.tracking_uri))
    shown = [c for c in columns if c.predictions is not None]
    if not shown:
        return Qualitative(None, "", ())
    teacher = teacher_column(columns, source)
    notes = tuple(f"{c.label}: {c.problem}." for c in columns if c.problem)
    if teacher is None:
        notes += ("No run had a teacher's predictions: no teacher column.",)
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
