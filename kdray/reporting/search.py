"""The summary of a search sweep: its best trial and parameters, the top-k trials, the parameters' importance.

Trials are ranked by val mIoU (the chosen value: last or best evaluation). Early-stopped trials take part with
their value at stopping, as the search itself scored them, and are marked; the best trial is the best finished
one (an early-stopped one only when none finished). Failed and unfinished trials take no part.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from kdray.orchestration import layout
from kdray.reporting.groups import value_column
from kdray.reporting.importance import Importance, param_importance
from kdray.reporting.runs import EARLY_STOPPED, FINISHED, SweepData
from kdray.reporting.space import Knob, active_params, from_space_file, infer_knobs, trial_params
from kdray.reporting.table import DAGGER, DASH, Table, pct, percent_or_none
from kdray.reporting.tables import describe_value, run_label


@dataclass(frozen=True)
class Trial:
    run_id: str
    label: str  # the trial id, else the run name
    state: str  # finished | early_stopped
    method: str | None
    value: float  # val mIoU, a fraction
    params: dict[str, object]  # the knobs active in this trial


@dataclass(frozen=True)
class Search:
    space: dict[str, Knob]  # the knobs the sweep varied (see `kdray.reporting.space`)
    space_source: str  # where they come from: the sweep's space file, or inferred from the runs' params
    trials: list[Trial]  # finished and early-stopped trials with a value, best first
    best: Trial | None
    importance: Importance | None


def analyse(data: SweepData, value: str) -> Search:
    space = from_space_file(data.space_text) if data.space_text else None
    source = "the sweep's space file"
    if space is None:
        space, source = infer_knobs(data.runs), "inferred from the runs' params"
    column = value_column(value)
    recs = data.runs.select(["run_id", "trial_id", "run_name", "state", "method", column]).to_pylist()
    trials = [Trial(r["run_id"], run_label(r["trial_id"], r["run_name"], r["run_id"]), r["state"], r["method"],
                    r[column], active_params(p, space))
              for r, p in zip(recs, trial_params(data.runs))
              if r["state"] in (FINISHED, EARLY_STOPPED) and r[column] is not None]
    trials.sort(key=lambda t: -t.value)
    best = next((t for t in trials if t.state == FINISHED), trials[0] if trials else None)
    importance = param_importance([(t.params, t.value) for t in trials],
                                  {k: knob.distribution for k, knob in space.items()})
    return Search(space, source, trials, best, importance)


def format_param(value: object) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _metric_note(data: SweepData) -> str:
    metric, mode = data.sweep_tags.get(layout.METRIC), data.sweep_tags.get(layout.MODE)
    if metric and metric != layout.VAL_MIOU:
        return f" The sweep optimised {metric} ({mode or '?'}); this ranking uses {layout.VAL_MIOU}."
    return ""


def search_tables(data: SweepData, search: Search, value: str, top_k: int = 10) -> list[Table]:
    """`search_best` (the best trial and its parameters), `search_top` (the top-k trials) and, when it could be
    estimated, `importance`."""
    where = f"sweep `{data.sweep_id}`, experiment `{data.experiment}`"
    ranked = (f"Trials ranked by val mIoU (%) at {describe_value(value)}; early-stopped trials ({DAGGER}) "
              f"with their value at stopping, failed and unfinished ones left out.{_metric_note(data)}")
    tables = []
    best = search.best
    if best is not None:
        mark = DAGGER if best.state == EARLY_STOPPED else ""
        rows = [["Trial", best.label], ["Run", best.run_id], ["Method", best.method or DASH],
                ["val mIoU (%)", pct(best.value) + mark]]
        rows += [[k, format_param(best.params.get(k))] for k in search.space]
        data_row = {"run_id": best.run_id, "trial_id": best.label, "method": best.method, "state": best.state,
                    "miou_pct": percent_or_none(best.value), "value": value, "sweep_id": data.sweep_id}
        data_row.update({f"params.{k}": format_param(best.params.get(k)) for k in search.space})
        notes = [f"{DAGGER} no trial finished: the best early-stopped one."] if mark else []
        notes.append(f"{DASH}: a knob inactive in this trial (its loss disabled).")
        tables.append(Table("search_best", "Best trial",
                            f"Best finished trial of {len(search.trials)} scored ({where}); its parameters are the "
                            f"knobs the sweep varied ({search.space_source}). {ranked}", ["Field", "Value"], rows, "ll",
                            pa.Table.from_pylist([data_row]), notes))
    top = search.trials[:top_k]
    header = ["Rank", "Trial", "mIoU (%)", "State", *search.space]
    rows, records = [], []
    for rank, t in enumerate(top, 1):
        stopped = t.state == EARLY_STOPPED
        rows.append([str(rank), t.label, pct(t.value) + (DAGGER if stopped else ""), t.state,
                     *(format_param(t.params.get(k)) for k in search.space)])
        records.append({"rank": rank, "run_id": t.run_id, "trial_id": t.label, "miou_pct": percent_or_none(t.value),
                        "state": t.state, **{f"params.{k}": format_param(t.params.get(k)) for k in search.space}})
    notes = [f"{DAGGER} stopped early by the scheduler: value at stopping, not comparable with finished trials."] \
        if any(t.state == EARLY_STOPPED for t in top) else []
    notes.append(f"{DASH}: a knob inactive in that trial (its loss disabled).")
    table = pa.Table.from_pylist(records) if records else pa.table({"rank": pa.array([], pa.int64())})
    tables.append(Table("search_top", f"Top {len(top)} trials",
                        f"Top {len(top)} of {len(search.trials)} scored trials ({where}). {ranked}", header, rows,
                        "rlrl" + "l" * len(search.space), table, notes))
    imp = search.importance
    if imp is not None:
        rows = [[k, f"{v:.3f}"] for k, v in imp.values.items()]
        records = [{"param": k, "importance": v, "estimator": imp.estimator, "quantile": imp.quantile,
                    "n_trials": imp.n_trials} for k, v in imp.values.items()]
        tables.append(Table("importance", "Parameter importance",
                            f"Parameter importance ({where}) by {imp.describe()}; each trial scored by its val mIoU "
                            f"at {describe_value(value)}; a conditional knob counts only in trials where it was "
                            "active.", ["Parameter", "Importance"], rows, "lr", pa.Table.from_pylist(records)))
    return tables
