"""The summary of a search sweep: its best trial and parameters, the top-k trials, the parameters' importance.

Trials are ranked by val mIoU (the chosen value: last or best evaluation). Early-stopped trials take part with
their value at stopping, as the search itself scored them, and are marked; the best trial is the best finished
one (an early-stopped one only when none finished). Failed, not-started, interrupted and unfinished trials take
no part; the captions count them and the excluded-runs table lists them.

A knob's cell shows its value as the space produced it, in the space file's YAML: `null`, `true`, `[512, 1024]`,
`"1"` (a string that YAML would read as a number); `—` only when the knob was inactive in that trial. CSV and
Parquet hold each knob typed as its distribution (`knob_types`), unrounded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa
import yaml
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution

from kdray import contract
from kdray.reporting.groups import count_phrase, value_column
from kdray.reporting.importance import Importance, param_importance
from kdray.reporting.runs import EARLY_STOPPED, FINISHED, SweepData, eval_splits
from kdray.reporting.space import Knob, Outside, active_params, from_space_file, infer_knobs, trial_params
from kdray.reporting.table import DAGGER, DASH, Table, pct, percent_or_none, typed_table
from kdray.reporting.tables import describe_value, run_label, state_counts

OUTSIDE_MARK = "‡"
PARAM_PREFIX = "params."  # + knob: its column in the CSV and Parquet of the search tables
_ARROW = {"float": pa.float64(), "int": pa.int64(), "bool": pa.bool_(), "string": pa.string(), "json": pa.string()}


@dataclass(frozen=True)
class Trial:
    run_id: str
    label: str  # the trial id, else the run name
    state: str  # finished | early_stopped
    method: str | None
    value: float  # val mIoU, a fraction
    params: dict[str, object]  # the knobs active in this trial, as the space produced them (or `Outside`)


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
    importance = param_importance([(in_space(t.params), t.value) for t in trials],
                                  {k: knob.distribution for k, knob in space.items()})
    return Search(space, source, trials, best, importance)


def in_space(params: dict[str, object]) -> dict[str, object]:
    """The params a rebuilt Optuna study can hold: without values `Outside` their distribution."""
    return {k: v for k, v in params.items() if not isinstance(v, Outside)}


def format_param(value: object) -> str:
    """A knob's value as the space file's YAML writes it (floats to 4 significant digits); `Outside` marked ‡."""
    if isinstance(value, Outside):
        return format_param(value.value) + OUTSIDE_MARK
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_param(v) for v in value) + "]"
    if isinstance(value, str):
        return _yaml_text(value)
    return str(value)


def _yaml_text(text: str) -> str:
    """The text, quoted where YAML would read it as something else (`"1"`, `"true"`, `"null"`, `"a, b"`)."""
    try:
        plain = yaml.safe_load(text) == text
    except yaml.YAMLError:
        plain = False
    return text if plain and not any(c in text for c in ",[]{}#'\"") else json.dumps(text)


def knob_cell(params: dict[str, object], key: str) -> str:
    """The cell of one knob in one trial: its value, or `—` when it was inactive."""
    return format_param(params[key]) if key in params else DASH


def knob_types(space: dict[str, Knob]) -> dict[str, pa.DataType]:
    """The Arrow type of each knob's `params.<key>` column (see `knob_kind`)."""
    return {PARAM_PREFIX + k: _ARROW[knob_kind(knob.distribution)] for k, knob in space.items()}


def knob_kind(dist: BaseDistribution) -> str:
    """How a knob's column holds it: `float` and `int` for ranges; for a choice, the one type its choices share
    (`bool`, `int`, `float`, `string`), else `json`: JSON text (`null`, `[512, 1024]`, `"adam"`)."""
    if isinstance(dist, FloatDistribution):
        return "float"
    if isinstance(dist, IntDistribution):
        return "int"
    choices = dist.choices
    if all(isinstance(c, bool) for c in choices):
        return "bool"
    if all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
        return "int"
    if all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices):
        return "float"
    return "string" if all(isinstance(c, str) for c in choices) else "json"


def knob_datum(params: dict[str, object], key: str, kind: str) -> object:
    """One knob's value for its column (`knob_kind`): null when inactive, or when a value `Outside` its
    distribution does not fit the column."""
    if key not in params:
        return None
    value = params[key]
    value = value.value if isinstance(value, Outside) else value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "json":
        return json.dumps(value)
    if kind == "float":
        return float(value) if number else None
    if kind == "int":
        return int(value) if number and float(value).is_integer() else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    return value if isinstance(value, str) else None


def knob_columns(params: dict[str, object], space: dict[str, Knob]) -> dict[str, object]:
    """`params.<key>` -> the value of each knob of the space in one trial, for its typed column."""
    return {PARAM_PREFIX + k: knob_datum(params, k, knob_kind(knob.distribution)) for k, knob in space.items()}


def knob_notes(trials: list[Trial], space: dict[str, Knob]) -> list[str]:
    """The footnotes of a table of knob values: `—`, and `‡` when a shown value is `Outside` its distribution."""
    notes = [f"{DASH}: a knob inactive in that trial (its `if:` condition did not hold); null: the value None."]
    if any(isinstance(t.params.get(k), Outside) for t in trials for k in space):
        notes.append(f"{OUTSIDE_MARK} a value the space file's distribution cannot hold (the space changed after "
                     "the trial ran); shown, but left out of the importance.")
    return notes


def _left_out(data: SweepData) -> str:
    """`left out: 1 failed, 1 not started (listed in the excluded-runs table)`, or that none was."""
    phrase = count_phrase(state_counts(data), skip=EARLY_STOPPED)
    return f"left out: {phrase} (listed in the excluded-runs table)" if phrase else "no trial left out"


def _metric_note(data: SweepData) -> str:
    metric, mode = data.sweep_tags.get(contract.METRIC), data.sweep_tags.get(contract.MODE)
    if metric and metric != contract.VAL_MIOU:
        return f" The sweep optimised {metric} ({mode or '?'}); this ranking uses {contract.VAL_MIOU}."
    return ""


def scored_on(data: SweepData) -> str:
    """What the search's trials were scored on: `val mIoU`, or `tune-split mIoU` when their runs say they were
    scored on a tuning split of the training split (tag kdray.eval_split=tune)."""
    return "tune-split mIoU" if "tune" in eval_splits(data) else "val mIoU"


def search_tables(data: SweepData, search: Search, value: str, top_k: int = 10) -> list[Table]:
    """`search_best` (the best trial and its parameters), `search_top` (the top-k trials) and, when it could be
    estimated, `importance`."""
    where = f"sweep `{data.sweep_id}`, experiment `{data.experiment}`"
    score = scored_on(data)
    ranked = (f"Trials ranked by {score} (%) at {describe_value(value)}; early-stopped trials ({DAGGER}) "
              f"with their value at stopping; {_left_out(data)}.{_metric_note(data)}")
    types = knob_types(search.space)
    tables = []
    best = search.best
    if best is not None:
        mark = DAGGER if best.state == EARLY_STOPPED else ""
        rows = [["Trial", best.label], ["Run", best.run_id], ["Method", best.method or DASH],
                [f"{score} (%)", pct(best.value) + mark]]
        rows += [[k, knob_cell(best.params, k)] for k in search.space]
        data_row = {"run_id": best.run_id, "trial_id": best.label, "method": best.method, "state": best.state,
                    "miou_pct": percent_or_none(best.value), "value": value, "sweep_id": data.sweep_id,
                    **knob_columns(best.params, search.space)}
        notes = [f"{DAGGER} no trial finished: the best early-stopped one."] if mark else []
        notes += knob_notes([best], search.space)
        tables.append(Table("search_best", "Best trial",
                            f"Best finished trial of {len(search.trials)} scored ({where}); its parameters are the "
                            f"knobs the sweep varied ({search.space_source}). {ranked}", ["Field", "Value"], rows, "ll",
                            typed_table([data_row], types), notes))
    top = search.trials[:top_k]
    header = ["Rank", "Trial", "mIoU (%)", "State", *search.space]
    rows, records = [], []
    for rank, t in enumerate(top, 1):
        stopped = t.state == EARLY_STOPPED
        rows.append([str(rank), t.label, pct(t.value) + (DAGGER if stopped else ""), t.state,
                     *(knob_cell(t.params, k) for k in search.space)])
        records.append({"rank": rank, "run_id": t.run_id, "trial_id": t.label, "miou_pct": percent_or_none(t.value),
                        "state": t.state, **knob_columns(t.params, search.space)})
    notes = [f"{DAGGER} stopped early by the scheduler: value at stopping, not comparable with finished trials."] \
        if any(t.state == EARLY_STOPPED for t in top) else []
    notes += knob_notes(top, search.space)
    table = typed_table(records, types) if records else pa.table({"rank": pa.array([], pa.int64())})
    tables.append(Table("search_top", f"Top {len(top)} trials",
                        f"Top {len(top)} of {len(search.trials)} scored trials ({where}). {ranked}", header, rows,
                        "rlrl" + "l" * len(search.space), table, notes))
    imp = search.importance
    if imp is not None:
        rows = [[k, f"{v:.3f}"] for k, v in imp.values.items()]
        records = [{"param": k, "importance": v, "estimator": imp.estimator, "quantile": imp.quantile,
                    "n_trials": imp.n_trials} for k, v in imp.values.items()]
        tables.append(Table("importance", "Parameter importance",
                            f"Parameter importance ({where}) by {imp.describe()}; each trial scored by its {score} "
                            f"at {describe_value(value)}; a conditional knob counts only in trials where it was "
                            "active.", ["Parameter", "Importance"], rows, "lr", typed_table(records)))
    return tables
