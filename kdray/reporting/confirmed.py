"""The summary of a search sweep's confirmation stage: the search's best configurations and the CE-only student,
each run over the same seeds, ranked by their mean; whether the winner's gains exceed the seed noise.

A row's cell is the mean ± sample std (n) of its finished confirmation runs (full length, on val) — the rule of
every table (`kdray.reporting.groups`). Beside it, the search's score of that configuration: one seed, scored
where the search scored it (the tuning split, when the job set one), at the iteration where it stopped. The
gains of the winner over the CE-only student and over the runner-up are tested with Welch's t-test (two-sided,
α = 0.05, `kdray.reporting.welch`) over the seeds' values: "significant" means the gain exceeds what the spread
between seeds explains, not that it would hold on another dataset.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from kdray.reporting.costs import CAPTION, COST_TYPES, cost_lookup, cost_record, device_notes, row_cost, shown_columns
from kdray.reporting.groups import Group, summarise, value_column
from kdray.reporting.runs import EARLY_STOPPED, SweepData, eval_splits
from kdray.reporting.table import DAGGER, DASH, Table, mean_std, pct, percent_or_none, signed, typed_table
from kdray.reporting.tables import CE, describe_value, exclusion_note
from kdray.reporting.welch import ALPHA, WelchTest, welch_t_test


@dataclass(frozen=True)
class ConfirmedRow:
    row: str  # Student (CE), Search #1, ...
    method: str | None
    group: Group
    values: list[float]  # the averaged runs' values (fractions)
    search_trial: str | None  # the search trial this row re-runs (None: the CE-only row)
    search_rank: int | None
    search_score: float | None
    search_stopped: bool  # the search's score is at a rung where the scheduler stopped it
    search_iteration: int | None
    vs_ce: WelchTest | None = None

    @property
    def is_ce(self) -> bool:
        return self.search_trial is None and self.method == CE


def confirmed_rows(confirm: SweepData, search: SweepData, value: str) -> list[ConfirmedRow]:
    """Each confirmation row with its values and its search trial's score, best confirmed mean first (rows without
    a finished run last, in search order)."""
    column = value_column(value)
    runs = confirm.runs.to_pylist()
    value_of = {r["run_id"]: r[column] for r in runs}
    first = {}
    for r in runs:
        first.setdefault(r["row"], r)
    searched = {r["trial_id"]: r for r in search.runs.to_pylist() if r["trial_id"]}
    rows = []
    for g in summarise(confirm.runs, ["row"], value):
        r = first[g.key[0]]
        trial = r.get("confirms")
        origin = searched.get(trial) if trial else None
        score = origin[value_column("last")] if origin else _float(r.get("search_score"))
        stopped = bool(origin and origin["state"] == EARLY_STOPPED)
        rank = r.get("search_rank")
        rows.append(ConfirmedRow(g.key[0], r["method"], g, [value_of[i] for i in g.run_ids], trial,
                                 int(rank) if rank else None, score, stopped,
                                 int(r["search_iteration"]) if r.get("search_iteration") else None))
    ce = next((row for row in rows if row.is_ce), None)
    if ce is not None:
        rows = [row if row is ce else _with_test(row, welch_t_test(row.values, ce.values)) for row in rows]
    rows.sort(key=lambda row: (row.group.mean is None, -(row.group.mean or 0.0), row.search_rank or 0))
    return rows


def _with_test(row: ConfirmedRow, test: WelchTest | None) -> ConfirmedRow:
    return ConfirmedRow(**{**row.__dict__, "vs_ce": test})


def _float(text) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _p_text(test: WelchTest | None) -> str:
    if test is None:
        return DASH
    return f"{test.p:.3f}" + (" *" if test.significant else "")


def verdict(rows: list[ConfirmedRow], split: str = "val") -> str | None:
    """The winner (the best confirmed searched configuration; called the best searched configuration when the
    CE-only student beats it) in one paragraph, with its gains over the CE-only
    student and over the runner-up and whether each exceeds the seed noise; None without a confirmed row."""
    ranked = [row for row in rows if row.search_trial and row.group.mean is not None]
    if not ranked:
        return None
    win = ranked[0]
    ce = next((row for row in rows if row.is_ce and row.group.mean is not None), None)
    beaten = ce is not None and ce.group.mean > win.group.mean
    lead = "Best searched configuration" if beaten else "Winner"
    text = (f"{lead}: {win.row} ({win.method or DASH}): {_cell(win)} confirmed on val; search score "
            f"{pct(win.search_score)} (one seed, {split}).")
    if ce is not None:
        text += " " + _gain("the CE-only student", win, ce, welch_t_test(win.values, ce.values))
        if beaten:
            text += " No searched configuration beats the CE-only student on average."
    if len(ranked) > 1:
        second = ranked[1]
        text += " " + _gain(f"the runner-up {second.row}", win, second, welch_t_test(win.values, second.values))
    return text


def _cell(row: ConfirmedRow) -> str:
    return f"{mean_std(row.group.mean, row.group.std)} mIoU (n={row.group.n})"


def _gain(what: str, win: ConfirmedRow, other: ConfirmedRow, test: WelchTest | None) -> str:
    diff = signed(win.group.mean - other.group.mean)
    if test is None:
        return (f"Over {what} ({_cell(other)}): {diff} pp; not tested (Welch's t-test needs at least 2 seeds per "
                "row and some spread between them).")
    noise = (f"exceeds the seed noise (Welch's t-test, p = {test.p:.3f} < {ALPHA})" if test.significant else
             f"within the seed noise (Welch's t-test, p = {test.p:.3f} ≥ {ALPHA})")
    return (f"Over {what} ({_cell(other)}): {diff} pp, 95 % CI [{signed(test.low)}, {signed(test.high)}], "
            f"{noise}.")


def confirmed_table(confirm: SweepData, search: SweepData, value: str) -> tuple[Table | None, str | None]:
    """`search_summary`: the confirmation rows ranked by their confirmed mean, and the verdict (`verdict`);
    (None, None) for a sweep without confirmation runs.

    When a confirmation run logged costs (`kdray.reporting.costs`), columns after n: Params (M), GFLOPs,
    latency (ms), s / iteration, device-seconds per run, peak memory (MiB), each the mean over the runs the row's
    confirmed mIoU averages and each shown only when a run logged it; the notes say where they were measured."""
    if not confirm.runs.num_rows:
        return None, None
    rows = confirmed_rows(confirm, search, value)
    split = _search_split(search)
    ce = next((row for row in rows if row.is_ce and row.group.mean is not None), None)
    header = ["Rank", "Row", "Method", f"Search score (%, {split})", "Confirmed mIoU (%)", "n", "vs CE-only (pp)",
              "p (Welch)", "Search trial", "Excluded"]
    lookup = cost_lookup(confirm.runs)
    costs = [(row.row, row_cost(lookup, row.group.run_ids)) for row in rows]
    shown = shown_columns([cost for _, cost in costs])
    at = header.index("n") + 1
    header[at:at] = [c.header for c in shown]
    cells, records = [], []
    for rank, (row, (_, cost)) in enumerate(zip(rows, costs), 1):
        g, test = row.group, row.vs_ce
        diff = g.mean - ce.group.mean if ce is not None and row is not ce and g.mean is not None else None
        score = pct(row.search_score) + (DAGGER if row.search_stopped else "") if row.search_trial else DASH
        cells.append([str(rank), row.row, row.method or DASH, score, mean_std(g.mean, g.std), str(g.n),
                      *(cost.cell(c) for c in shown), signed(diff), _p_text(test), row.search_trial or DASH,
                      g.excluded or DASH])
        records.append({"rank": rank, "row": row.row, "method": row.method, "search_trial": row.search_trial,
                        "search_rank": row.search_rank, "search_score_pct": percent_or_none(row.search_score),
                        "search_stopped": row.search_stopped, "search_iteration": row.search_iteration,
                        "miou_pct_mean": percent_or_none(g.mean), "miou_pct_std": percent_or_none(g.std), "n": g.n,
                        "seeds": list(g.seeds), "vs_ce_pp": percent_or_none(diff),
                        "vs_ce_p": test.p if test else None, "vs_ce_significant": test.significant if test else None,
                        **(cost_record(cost) if shown else {}), "value": value, "sweep_id": confirm.sweep_id})
    seeds = sorted({s for row in rows for s in row.group.seeds})
    caption = (f"Search summary (sweep `{confirm.sweep_id}`): the search's best configurations and the CE-only "
               f"student, each run again at full length on val over seeds {seeds}, ranked by the mean of val mIoU "
               f"at {describe_value(value)}; beside it, the single-seed score the search selected them by "
               f"({split}). vs CE-only: difference of means; p: Welch's t-test, two-sided (* p < {ALPHA}; — with "
               "fewer than 2 seeds or no spread).")
    if shown:
        caption += " Params: the student's logged parameters, millions. " + CAPTION
    notes = []
    text = verdict(rows, split)
    if text:
        notes.append(text)
    if any(row.search_stopped for row in rows):
        notes.append(f"{DAGGER} the search stopped this configuration early: its score is the value at stopping.")
    if shown:
        notes += device_notes(costs)
    notes.append(exclusion_note(confirm))
    types = {**COST_TYPES, "search_trial": pa.string(), "search_rank": pa.int64(), "search_score_pct": pa.float64(),
             "search_stopped": pa.bool_(), "search_iteration": pa.int64(), "vs_ce_pp": pa.float64(),
             "vs_ce_p": pa.float64(), "vs_ce_significant": pa.bool_()}
    align = "rllrrr" + "r" * len(shown) + "rrll"
    table = Table("search_summary", "Search summary (confirmed)", caption, header, cells, align,
                  typed_table(records, types), notes)
    return table, text


def _search_split(search: SweepData) -> str:
    """Where the search scored its trials: `tune split` when its runs say so (kdray.eval_split), else `val`."""
    splits = eval_splits(search)
    if splits == {"tune"}:
        return "tune split"
    return "val" if not splits or splits == {"val"} else ", ".join(sorted(splits))

