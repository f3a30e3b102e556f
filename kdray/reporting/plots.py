"""The report's figures as PNG: mIoU vs iteration per method, the sweep's parallel coordinates, importance bars,
the Pareto front of mIoU against GFLOPs and latency.

Figures are built with matplotlib's object API on the Agg canvas, not pyplot: no global backend or figure
state is touched, so a sweep or a notebook that imports this keeps its own. (Optuna's matplotlib plots go
through pyplot and are experimental, hence these few lines of our own.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from optuna.distributions import CategoricalDistribution

from kdray.reporting.costs import GFLOPS, LATENCY
from kdray.reporting.importance import Importance
from kdray.reporting.pareto import ParetoRow, has_points
from kdray.reporting.runs import EARLY_STOPPED, FINISHED
from kdray.reporting.search import Search, format_param, in_space
from kdray.reporting.space import Outside

DPI = 120


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_curves(history: pa.Table, runs: pa.Table, groups: list[tuple[str, list[str]]], path: Path,
                title: str) -> Path:
    """val mIoU (%) vs iteration: per group, the mean over its finished runs with a band of ± one sample std
    (where two or more runs have that step); its early-stopped runs as thin dashed lines.

    groups: (label, run ids) in legend order.
    """
    points: dict[str, tuple[list[int], list[float]]] = {}
    for run_id, step, value in zip(*(history.column(c).to_pylist() for c in ("run_id", "step", "value"))):
        steps, values = points.setdefault(run_id, ([], []))
        steps.append(step)
        values.append(100 * value)
    state = dict(zip(runs.column("run_id").to_pylist(), runs.column("state").to_pylist()))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for (label, run_ids), color in zip(groups, colors):
        finished = [r for r in run_ids if state.get(r) == FINISHED and r in points]
        by_step: dict[int, list[float]] = {}
        for r in finished:
            for step, value in zip(*points[r]):
                by_step.setdefault(step, []).append(value)
        if by_step:
            steps = sorted(by_step)
            mean = np.array([np.mean(by_step[s]) for s in steps])
            std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else np.nan for s in steps])
            ax.plot(steps, mean, color=color, marker="o", markersize=3, label=f"{label} (n={len(finished)})")
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
        for i, r in enumerate(r for r in run_ids if state.get(r) == EARLY_STOPPED and r in points):
            ax.plot(*points[r], color=color, linestyle="--", linewidth=0.8, alpha=0.6,
                    label=None if by_step or i else f"{label} (early-stopped only)")
    ax.set_title(title)
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    fig.text(0.01, -0.02, "line: mean over finished runs; band: ± sample std (ddof=1); dashed: early-stopped runs",
             fontsize="x-small", ha="left", va="top")
    return _save(fig, path)


def _choice_index(choices: tuple, value: object) -> int | None:
    """The position of a trial's value among a knob's choices (the choice itself, as `active_params` gives it)."""
    return next((i for i, c in enumerate(choices) if c is value), None) if not isinstance(value, Outside) else None


def _axis(key: str, dist, params: list[dict[str, object]]) -> tuple[list[float | None], list[float], list[str]]:
    """Positions in [0, 1] of each trial's value on one knob's axis (None: inactive, or outside the space), and
    the axis' ticks."""
    if isinstance(dist, CategoricalDistribution):
        n = max(len(dist.choices) - 1, 1)
        index = [_choice_index(dist.choices, p[key]) if key in p else None for p in params]
        pos = [None if i is None else i / n for i in index]
        return pos, [i / n for i in range(len(dist.choices))], [format_param(c) for c in dist.choices]
    low, high = float(dist.low), float(dist.high)
    log = dist.log
    scale = (lambda x: math.log10(x)) if log else (lambda x: x)
    span = (scale(high) - scale(low)) or 1.0
    values = [in_space(p).get(key) for p in params]
    pos = [None if v is None else (scale(float(v)) - scale(low)) / span for v in values]
    ticks = [0.0, 0.5, 1.0]
    labels = [format_param(low), format_param(10 ** ((scale(low) + scale(high)) / 2) if log else (low + high) / 2),
              format_param(high)]
    return pos, ticks, labels


def plot_parallel(search: Search, path: Path, title: str) -> Path | None:
    """One vertical axis per knob and one for val mIoU; one line per scored trial, coloured by its mIoU.
    A knob inactive in a trial (its loss disabled) sits below its axis, at `inactive`."""
    if not search.space or len(search.trials) < 2:
        return None
    keys = list(search.space)
    values = [100 * t.value for t in search.trials]
    lo, hi = min(values), max(values)
    norm = Normalize(lo, hi if hi > lo else lo + 1e-9)
    axes = [_axis(k, search.space[k].distribution, [t.params for t in search.trials]) for k in keys]
    miou_pos = [norm(v) for v in values]
    inactive = -0.12
    fig = Figure(figsize=(max(6.0, 1.6 * (len(keys) + 1)), 4.8))
    ax = fig.add_subplot()
    cmap = colormaps["viridis"]
    order = sorted(range(len(search.trials)), key=lambda i: values[i])  # best drawn last, on top
    for i in order:
        ys = [inactive if a[0][i] is None else a[0][i] for a in axes] + [miou_pos[i]]
        stopped = search.trials[i].state == EARLY_STOPPED
        ax.plot(range(len(keys) + 1), ys, color=cmap(norm(values[i])), alpha=0.8, linewidth=1.2,
                linestyle="--" if stopped else "-")
    for x, (_, ticks, labels) in enumerate(axes):
        ax.axvline(x, color="black", linewidth=0.8)
        for y, label in zip(ticks, labels):
            ax.text(x + 0.03, y, label, fontsize="x-small", va="center")
        if any(p is None for p in axes[x][0]):
            ax.text(x + 0.03, inactive, "inactive", fontsize="x-small", va="center", color="gray")
    x = len(keys)
    ax.axvline(x, color="black", linewidth=0.8)
    for y in (0.0, 0.5, 1.0):
        ax.text(x + 0.03, y, f"{lo + y * (hi - lo):.2f}", fontsize="x-small", va="center")
    ax.set_xticks(range(len(keys) + 1), [*keys, "val mIoU (%)"], rotation=20, ha="right", fontsize="small")
    ax.set_yticks([])
    ax.set_ylim(inactive - 0.06, 1.06)
    ax.set_xlim(-0.2, len(keys) + 0.5)
    ax.set_title(title)
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.02)
    colorbar.set_label("val mIoU (%)")
    fig.text(0.01, -0.02, "dashed: early-stopped trials (value at stopping); knob axes span the searched range, "
             "on a log scale for log-uniform knobs; below an axis: inactive, or a value outside the space (‡ in "
             "the tables)", fontsize="x-small", ha="left", va="top")
    return _save(fig, path)


def plot_importance(importance: Importance, path: Path, title: str) -> Path:
    """Horizontal bars, most important on top."""
    items = list(importance.values.items())[::-1]
    fig = Figure(figsize=(6.5, 0.5 * len(items) + 1.6))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="C0")
    for y, (_, v) in enumerate(items):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize="small")
    ax.set_xlabel("importance (PED-ANOVA, normalised: sums to 1)")
    ax.set_ylabel("parameter")
    ax.set_xlim(0, max(1e-9, max(v for _, v in items)) * 1.2)
    ax.set_title(title)
    fig.text(0.01, -0.02, f"best {importance.n_top} of {importance.n_trials} trials vs all of them",
             fontsize="x-small", ha="left", va="top")
    return _save(fig, path)


def plot_pareto(rows: Sequence[ParetoRow], path: Path, title: str) -> Path | None:
    """Two panels, val mIoU (%) against the student's GFLOPs and against its latency (ms): one point per placed
    row (`pareto.ParetoRow`), error bars ± one sample std over its seeds, the front filled and joined by a line in
    cost order (one front per device on the latency panel), dominated rows hollow; each point labelled with its
    method (and its student, when the rows have several teacher → student pairs). None when no row is placed on
    either front."""
    if not has_points(rows):
        return None
    several_pairs = len({r.pair for r in rows}) > 1  # then each point names its student too
    fig = Figure(figsize=(12, 4.8))
    panels = ((fig.add_subplot(1, 2, 1), GFLOPS, "gflops_front", "GFLOPs (1e9 FLOPs, one image)", lambda r: None),
              (fig.add_subplot(1, 2, 2), LATENCY, "latency_front", "latency (ms, batch 1)", lambda r: r.latency_device))
    for ax, column, flag, xlabel, split in panels:
        placed = [r for r in rows if getattr(r, flag) is not None]
        series: dict[str | None, list[ParetoRow]] = {}
        for r in placed:
            series.setdefault(split(r), []).append(r)
        for k, (device, members) in enumerate(series.items()):
            color = f"C{k % 10}"
            for r in members:
                on = getattr(r, flag)
                x, y = r.cost.mean(column), 100 * r.group.mean
                std = 0.0 if r.group.std is None else 100 * r.group.std
                ax.errorbar([x], [y], yerr=[std], fmt="o", color=color, markersize=7 if on else 6, capsize=3,
                            markerfacecolor=color if on else "white", markeredgecolor=color, linewidth=1)
                label = r.label + (f" [{r.pair[1] or '?'}]" if several_pairs else "")
                ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize="x-small")
            front = sorted((r for r in members if getattr(r, flag)), key=lambda r: (r.cost.mean(column),
                                                                                     -r.group.mean))
            label = "front" + (f" ({device})" if device is not None else "")
            ax.plot([r.cost.mean(column) for r in front], [100 * r.group.mean for r in front], color=color,
                    linewidth=1.2, label=label)
        if not placed:
            ax.text(0.5, 0.5, f"no row with a {column.header}", transform=ax.transAxes, ha="center", va="center",
                    color="gray")
        else:
            ax.legend(fontsize="small", loc="lower right")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val mIoU (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.text(0.01, -0.02, "filled: on the front (no row with lower-or-equal cost and higher-or-equal mean mIoU, "
             "one strictly); hollow: dominated; bars: ± sample std (ddof=1) over the seeds; latency: one front per "
             "device", fontsize="x-small", ha="left", va="top")
    return _save(fig, path)
