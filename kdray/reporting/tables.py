"""The paper-style tables of one sweep: the ablation (Table 1 style), the method comparison (Tables 2-4 style),
per-class IoU of each method's best run, and the runs left out of the means.

Rows and methods come from the runs' tags, never from a list in the code. Ablation rows keep the order in
which the sweep generated them (the first trial id of each row), except that CE-only rows (the student
baseline) go first, under the teacher.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from kdray import contract
from kdray.reporting.costs import (
    CAPTION,
    COST_TYPES,
    PARAMS,
    cost_lookup,
    cost_record,
    device_notes,
    row_cost,
    shown_columns,
)
from kdray.reporting.groups import Group, count_phrase, summarise, value_column
from kdray.reporting.runs import (
    EARLY_STOPPED,
    EXCLUDED_STATES,
    FAILED,
    FINISHED,
    INTERRUPTED,
    IOU_COLUMN,
    NO_VALUE,
    NOT_STARTED,
    STATE_LABELS,
    SweepData,
    shared_keys,
)
from kdray.reporting.table import (
    DAGGER,
    DASH,
    Table,
    mean_std,
    millions,
    pct,
    percent_or_none,
    signed,
    typed_table,
)

CE = "CE"  # the method label of a student trained with cross-entropy only (kdray.losses.objective.method_label)

DAGGER_NOTE = (f"{DAGGER} built only from early-stopped runs (stopped by the scheduler before the full "
               "budget): their values at stopping, not comparable with rows of finished runs.")
EXCLUSION_NOTE = ("Early-stopped runs are counted but excluded from the mean; failed, not-started, interrupted "
                  "and unfinished (still running) runs, and finished runs without a val mIoU, are excluded; all are "
                  "listed in the excluded-runs table.")


def describe_value(value: str) -> str:
    value_column(value)  # validates
    if value == "last":
        return "the last evaluation of each run"
    return "the best evaluation of each run (max over its evaluations, as reference benchmarks report)"


def run_label(trial_id: str | None, run_name: str | None, run_id: str) -> str:
    return trial_id or run_name or run_id[:8]


def _seeds_phrase(groups: list[Group]) -> str:
    """`n = 3 seeds (0, 1, 2)` when every group of finished runs averaged the same seeds, else `n runs per row
    (2-3)`; groups built from early-stopped runs show their own n."""
    used = [g for g in groups if g.n and not g.from_stopped]
    if not used:
        return "no finished runs"
    seeds = {g.seeds for g in used}
    ns = sorted({g.n for g in used})
    if len(seeds) == 1 and len(next(iter(seeds))) == ns[0] == ns[-1]:
        only = next(iter(seeds))
        return f"n = {len(only)} seeds ({', '.join(map(str, only))})"
    return f"n runs per row ({ns[0]}–{ns[-1]})" if ns[0] != ns[-1] else f"n = {ns[0]} runs per row"


def _caption(data: SweepData, value: str, what: str, groups: list[Group]) -> str:
    space = data.sweep_tags.get(contract.SPACE)
    return (f"{what}: val mIoU (%) at {describe_value(value)}, mean ± sample std (ddof=1) over the finished runs "
            f"of each row, {_seeds_phrase(groups)}; sweep `{data.sweep_id}`{f' (space {space})' if space else ''}, "
            f"experiment `{data.experiment}`.")


def state_counts(data: SweepData) -> dict[str, int]:
    """Trial runs of the sweep per state."""
    counts: dict[str, int] = {}
    for state in data.runs.column("state").to_pylist():
        counts[state] = counts.get(state, 0) + 1
    return counts


def match_note(data: SweepData) -> list[str]:
    """A matched ablation's rows trained for equal device-seconds, each for its own number of iterations (the sweep
    run's MATCH tag): the note that says so, with the iterations; [] for any other sweep or an unreadable tag."""
    try:
        rows = json.loads(data.sweep_tags.get(contract.MATCH) or "null")
        shown = ", ".join(f"{r['row']} {r['iterations']}" for r in rows)
    except (ValueError, TypeError, KeyError):
        return []
    if not shown:
        return []
    return [f"Rows trained at equal device-seconds (the space's match), each for its own iterations: {shown}."]


def exclusion_note(data: SweepData) -> str:
    """The rule, and how many of the sweep's runs it left out, by state."""
    phrase = count_phrase(state_counts(data))
    tally = f" This sweep: {phrase} of {data.runs.num_rows} trial runs." if phrase else ""
    return EXCLUSION_NOTE + tally


def _states(g: Group) -> dict:
    return {f"n_{s}": g.counts.get(s, 0) for s in EXCLUDED_STATES}


def _numbers(g: Group) -> dict:
    return {"miou_pct_mean": percent_or_none(g.mean), "miou_pct_std": percent_or_none(g.std), "n": g.n,
            "from_stopped": g.from_stopped, **_states(g), "best_run_id": g.best_run_id,
            "best_miou_pct": percent_or_none(g.best_value), "seeds": list(g.seeds)}


def teacher_groups(data: SweepData, value: str) -> dict[str, Group]:
    """The experiment's teacher runs by teacher arch."""
    if not data.teachers.num_rows:
        return {}
    return {g.key[0]: g for g in summarise(data.teachers, ["teacher_arch"], value)}


def _teacher_archs(data: SweepData, teachers: dict[str, Group]) -> list[str]:
    archs = list(dict.fromkeys(a for a in data.runs.column("teacher_arch").to_pylist() if a))
    return archs or list(teachers)


def _lookup(table: pa.Table, column: str) -> dict[str, object]:
    return dict(zip(table.column("run_id").to_pylist(), table.column(column).to_pylist()))


def ablation_table(data: SweepData, value: str) -> Table | None:
    """Teacher, then one row per ablation row (CE-only rows first); None for a sweep without row tags."""
    if not any(data.runs.column("row").to_pylist()):
        return None
    groups = summarise(data.runs, ["row"], value)
    methods = {}
    for row, method in zip(data.runs.column("row").to_pylist(), data.runs.column("method").to_pylist()):
        methods.setdefault(row, {})[method or DASH] = None  # an ordered set
    groups.sort(key=lambda g: (CE not in methods[g.key[0]], g.order))
    baseline = next((g for g in groups if CE in methods[g.key[0]] and g.n), None)
    teachers = teacher_groups(data, value)
    notes = []
    header = ["Row", "Method", "mIoU (%)", "n", "Gain (pp)", "Excluded"]
    rows, records = [], []
    for arch in _teacher_archs(data, teachers):
        g = teachers.get(arch)
        if g is None:
            notes.append(f"No teacher run ({arch}, tag {contract.KIND}=teacher) in experiment `{data.experiment}`: "
                         "teacher row omitted.")
            continue
        rows.append([f"Teacher ({arch})", "teacher", mean_std(g.mean, g.std), str(g.n), DASH, g.excluded or DASH])
        records.append({"kind": "teacher", "row": f"Teacher ({arch})", "method": None, "teacher_arch": arch,
                        "gain_pp": None, **_numbers(g)})
    for g in groups:
        row = g.key[0]
        gain = None
        if baseline is not None and g is not baseline and g.mean is not None:
            gain = g.mean - baseline.mean
        gain_text = signed(gain) + (DAGGER if gain is not None and (g.from_stopped or baseline.from_stopped) else "")
        method = "/".join(methods[row])
        rows.append([row or "(no row tag)", method, mean_std(g.mean, g.std, g.from_stopped), str(g.n), gain_text,
                     g.excluded or DASH])
        named = "/".join(m for m in methods[row] if m != DASH) or None  # `—` shown for a run without a method
        records.append({"kind": "row", "row": row, "method": named, "teacher_arch": None,
                        "gain_pp": percent_or_none(gain), **_numbers(g)})
    if baseline is None:
        notes.append("No CE-only row with a value: gains omitted.")
    if any(g.from_stopped for g in groups):
        notes.append(DAGGER_NOTE)
    notes += match_note(data)
    notes.append(exclusion_note(data))
    caption = _caption(data, value, "Ablation", groups)
    if baseline is not None:
        caption += f" Gain: difference of means to the CE-only student `{baseline.key[0]}`, percentage points."
    return Table("ablation", "Ablation", caption, header, rows, "llrrrl", _data(records, data, value), notes)


def _data(records: list[dict], data: SweepData, value: str, types: dict[str, pa.DataType] | None = None
          ) -> pa.Table:
    return typed_table([{**r, "value": value, "sweep_id": data.sweep_id} for r in records], types)


@dataclass(frozen=True)
class MethodGroup:
    pair: tuple[str | None, str | None]  # teacher arch, student arch
    label: str  # the method label, with the row name where one method has several rows
    group: Group


def method_groups(data: SweepData, value: str) -> list[MethodGroup]:
    """Runs by (teacher, student, method), and by ablation row too where rows share a method label; pairs in
    order of appearance, CE first within a pair."""
    keys = ["teacher_arch", "student_arch", "method"]
    rows_per_method: dict[tuple, set] = {}
    for rec in data.runs.select(keys + ["row"]).to_pylist():
        rows_per_method.setdefault(tuple(rec[k] for k in keys), set()).add(rec["row"])
    split = any(len(rows) > 1 for rows in rows_per_method.values())
    groups = summarise(data.runs, keys + ["row"] if split else keys, value)
    pair_order: dict[tuple, int] = {}
    for g in groups:
        pair_order.setdefault(g.key[:2], g.order)
    result = []
    for g in sorted(groups, key=lambda g: (pair_order[g.key[:2]], g.key[2] != CE, g.order)):
        label = g.key[2] or DASH
        if split and len(rows_per_method[g.key[:3]]) > 1:
            label = f"{label} ({g.key[3]})"
        result.append(MethodGroup(pair=g.key[:2], label=label, group=g))
    return result


def pair_text(pair: tuple) -> str:
    """`teacher → student`, `?` for an arch not recorded."""
    return f"{pair[0] or '?'} → {pair[1] or '?'}"


def methods_table(data: SweepData, value: str, confirmed: bool = False) -> Table:
    """Per teacher → student pair: the teacher, then each method with the student's params, mean ± std (n), the
    best run. `confirmed`: `data` holds a search's confirmation runs (one configuration per row, n counts
    seeds).

    When a run logged costs (`kdray.reporting.costs`), columns after n: GFLOPs, latency (ms), s / iteration,
    device-seconds per run and peak memory (MiB), each the mean over the runs the row's mIoU averages, each shown
    only when a run logged it; the notes say where they were measured. Params (M) is the kdray.params_m tag, else
    the logged student/params."""
    groups = method_groups(data, value)
    teachers = teacher_groups(data, value)
    params = _lookup(data.runs, "params_m")
    teacher_params = _lookup(data.teachers, "params_m")
    trial_teacher_params = {}
    for arch, p in zip(data.runs.column("teacher_arch").to_pylist(), data.runs.column("teacher_params_m").to_pylist()):
        if p is not None:
            trial_teacher_params.setdefault(arch, p)
    labels = {**_labels(data.runs), **_labels(data.teachers)}
    run_costs, teacher_costs = cost_lookup(data.runs), cost_lookup(data.teachers)
    several_pairs = len({mg.pair for mg in groups}) > 1
    header = ["Teacher → Student", "Method", "Params (M)", "mIoU (%)", "n", "Best run", "Excluded"]
    rows, records, notes, seen_pairs, costs = [], [], [], [], []
    for mg in groups:
        g = mg.group
        suffix = f" [{pair_text(mg.pair)}]" if several_pairs else ""
        if mg.pair not in seen_pairs:
            seen_pairs.append(mg.pair)
            t = teachers.get(mg.pair[0])
            if t is None:
                notes.append(f"No teacher run for {mg.pair[0] or 'this pair'} (tag {contract.KIND}=teacher) in "
                             f"experiment `{data.experiment}`: teacher row omitted.")
            else:
                p = teacher_params.get(t.best_run_id) or trial_teacher_params.get(mg.pair[0])
                rows.append([pair_text(mg.pair), "Teacher", millions(p), mean_std(t.mean, t.std), str(t.n),
                             _best_text(t, labels), t.excluded or DASH])
                records.append({"teacher_arch": mg.pair[0], "student_arch": mg.pair[1], "method": "Teacher",
                                "params_m": p, **_numbers(t)})
                costs.append((f"Teacher{suffix}", row_cost(teacher_costs, t.run_ids)))
        cost = row_cost(run_costs, g.run_ids)
        p = next((params[r] for r in g.run_ids or [g.best_run_id] if params.get(r) is not None), None)
        if p is None:
            p = cost.mean(PARAMS)
        rows.append([pair_text(mg.pair), mg.label, millions(p), mean_std(g.mean, g.std, g.from_stopped), str(g.n),
                     _best_text(g, labels), g.excluded or DASH])
        method = mg.label if g.key[2] is not None else None  # no method tag: `—` shown, null in the files
        records.append({"teacher_arch": mg.pair[0], "student_arch": mg.pair[1], "method": method, "params_m": p,
                        **_numbers(g)})
        costs.append((mg.label + suffix, cost))
    shown = shown_columns([c for _, c in costs], skip=[PARAMS])
    types = None
    if shown:
        at = header.index("n") + 1
        header[at:at] = [c.header for c in shown]
        for row, record, (_, cost) in zip(rows, records, costs):
            row[at:at] = [cost.cell(c) for c in shown]
            record.update(cost_record(cost))
        types = COST_TYPES
    if any(mg.group.from_stopped for mg in groups):
        notes.append(DAGGER_NOTE)
    if shown:
        notes += device_notes(costs)
    notes += match_note(data)
    notes.append(exclusion_note(data))
    what = "Methods"
    if confirmed:
        what += (" (the search's confirmation stage: each searched configuration and the CE-only student over the "
                 "same seeds; a method with several configurations has a row for each)")
    elif data.space_kind == "search":
        what += (" (a search sweep: the runs of a method differ in their hyperparameters, so n counts "
                 "configurations, not seeds)")
    caption = _caption(data, value, what, [mg.group for mg in groups])
    caption += " Params: the student's parameters (the teacher's on teacher rows), millions."
    if shown:
        caption += " " + CAPTION
    return Table("methods", "Methods", caption, header, rows, "llrrr" + "r" * len(shown) + "ll",
                 _data(records, data, value, types), notes)


def _labels(table: pa.Table) -> dict[str, str]:
    return {r: run_label(t, n, r) for r, t, n in zip(*(table.column(c).to_pylist()
                                                       for c in ("run_id", "trial_id", "run_name")))}


def _best_text(g: Group, labels: dict[str, str]) -> str:
    if g.best_run_id is None:
        return DASH
    return f"{pct(g.best_value)} ({labels[g.best_run_id]}){DAGGER if g.from_stopped else ''}"


def best_runs(data: SweepData, value: str) -> list[tuple[str, str, int | None]]:
    """(column label, run id, step of its best mIoU) of the best run of the teacher and of each method, as the
    per-class table shows them."""
    groups = method_groups(data, value)
    teachers = teacher_groups(data, value)
    several_pairs = len({mg.pair for mg in groups}) > 1
    best_step = {**_lookup(data.runs, "best_step"), **_lookup(data.teachers, "best_step")}
    result, done = [], set()
    for mg in groups:
        suffix = f" [{pair_text(mg.pair)}]" if several_pairs else ""
        t = teachers.get(mg.pair[0])
        if t is not None and t.best_run_id and t.best_run_id not in done:
            done.add(t.best_run_id)
            result.append((f"Teacher{suffix}", t.best_run_id, best_step.get(t.best_run_id)))
        if mg.group.best_run_id:
            mark = DAGGER if mg.group.from_stopped else ""
            result.append((f"{mg.label}{mark}{suffix}", mg.group.best_run_id, best_step.get(mg.group.best_run_id)))
    return result


def per_class_table(data: SweepData, value: str, iou_at_best: dict[str, dict[str, float]] | None = None
                    ) -> Table | None:
    """Classes as rows, the best run of the teacher and of each method as columns, then its mIoU and its run.

    value="last": the IoUs of each run's last evaluation (from the runs table); value="best": those of the
    evaluation where its mIoU was best, `iou_at_best` ({run_id: {class: IoU}}, see `runs.read_iou_at`).
    """
    if not data.classes:
        return None
    if value == "best" and iou_at_best is None:
        raise ValueError("value='best' needs the per-class IoUs at each best run's best step")
    columns = best_runs(data, value)
    both = pa.concat_tables([data.runs.select(["run_id", "trial_id", "run_name", "method", "teacher_arch",
                                               "student_arch", value_column(value)]),
                             data.teachers.select(["run_id", "trial_id", "run_name", "method", "teacher_arch",
                                                   "student_arch", value_column(value)])])
    info = {rec["run_id"]: rec for rec in both.to_pylist()}
    last = {}
    for table in (data.runs, data.teachers):
        names = [c for c in data.classes if IOU_COLUMN + c in table.column_names]
        for rec in table.select(["run_id"] + [IOU_COLUMN + c for c in names]).to_pylist():
            last[rec["run_id"]] = {c: rec[IOU_COLUMN + c] for c in names}
    source = last if value == "last" else iou_at_best
    header = ["Class"] + [label for label, _, _ in columns]
    rows, records = [], []
    for name in data.classes:
        rows.append([name] + [pct(source.get(run_id, {}).get(name)) for _, run_id, _ in columns])
    rows.append(["mIoU"] + [pct(info[run_id][value_column(value)]) for _, run_id, _ in columns])
    rows.append(["Run"] + [run_label(info[r]["trial_id"], info[r]["run_name"], r) for _, r, _ in columns])
    for label, run_id, step in columns:
        for name in data.classes:
            records.append({"label": label.replace(DAGGER, ""), "from_stopped": DAGGER in label, "run_id": run_id,
                            "trial_id": info[run_id]["trial_id"], "teacher_arch": info[run_id]["teacher_arch"],
                            "student_arch": info[run_id]["student_arch"],
                            "class": name, "iou_pct": percent_or_none(source.get(run_id, {}).get(name)),
                            "step": step if value == "best" else None})
    at = "its last evaluation" if value == "last" else "the evaluation of its best mIoU"
    caption = (f"Per-class IoU (%) of the best run of the teacher and of each method (highest val mIoU at "
               f"{describe_value(value)}), at {at}; sweep `{data.sweep_id}`, experiment `{data.experiment}`.")
    notes = [DAGGER_NOTE] if any(DAGGER in label for label, _, _ in columns) else []
    notes += [f"Classes {', '.join(names)} share the metric key `{key}`: which one's IoU it holds cannot be told, "
              f"so they show {DASH}." for key, names in shared_keys(data.class_keys).items()]
    return Table("per_class", "Per-class IoU", caption, header, rows, "l" + "r" * len(columns),
                 _data(records, data, value), notes)


def exclusion_reason(r: dict) -> str:
    """Why a run (a record of the runs table) is not averaged."""
    state, at = r["state"], f" at iteration {r['last_step']}" if r["last_step"] is not None else ""
    last = f"; last mIoU {pct(r['miou_last'])}{at}" if r["miou_last"] is not None else "; no val mIoU logged"
    if state == FAILED:
        return r["failure"] or f"no reason recorded (tag {contract.FAILURE})"
    if state == NOT_STARTED:
        return r["failure"] or f"the trial never started (tag {contract.NOT_STARTED}); no reason recorded"
    if state == EARLY_STOPPED:
        return f"stopped early by the scheduler{at}; last mIoU {pct(r['miou_last'])}"
    if state == INTERRUPTED:
        return f"status KILLED, not stopped by the scheduler: interrupted{last}"
    if state == NO_VALUE:
        return "status FINISHED, but no val mIoU was ever logged"
    return f"status {r['status']}: still running, or its process died without ending the run{last}"


def excluded_table(data: SweepData) -> Table | None:
    """Every run of the sweep that is not a finished run, with its state and why; None when there is none."""
    cols = ["run_id", "run_name", "trial_id", "row", "method", "seed", "status", "state", "failure", "last_step",
            "miou_last"]
    recs = [r for r in data.runs.select(cols).to_pylist() if r["state"] != FINISHED]
    if not recs:
        return None
    rows, records = [], []
    for r in recs:
        reason = exclusion_reason(r)
        seed = DASH if r["seed"] is None else str(r["seed"])
        rows.append([run_label(r["trial_id"], r["run_name"], r["run_id"]), r["run_id"][:8],
                     r["row"] or r["method"] or DASH, seed, STATE_LABELS[r["state"]], reason])
        records.append({**{k: r[k] for k in ("run_id", "trial_id", "row", "method", "seed", "status", "state",
                                              "last_step")},
                        "miou_last_pct": percent_or_none(r["miou_last"]), "reason": reason,
                        "sweep_id": data.sweep_id})
    caption = (f"The {len(recs)} of {data.runs.num_rows} trial runs of sweep `{data.sweep_id}` left out of the "
               f"means: {count_phrase(state_counts(data))}. Early-stopped runs are counted in the tables' Excluded "
               "column but not averaged; the others never enter a mean.")
    return Table("excluded", "Excluded runs", caption, ["Trial", "Run", "Row / method", "Seed", "State", "Reason"],
                 rows, "llllll", typed_table(records))
