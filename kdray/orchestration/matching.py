"""An ablation at equal device-seconds (`match:` in the space): each row's iterations from its measured cost.

Before the trials start, each row's training iteration is timed on the resources of one of its workers
(`kdray.engine.measure_iteration_seconds`, a Ray task per row, one at a time so that they do not slow each other),
and each row gets the iterations that fit the budget:

    device_seconds per iteration of row r:  d_r = run.workers_r x s_r       (s_r: its median s/iteration)
    budget per trial:                        B = match.device_seconds, or d_R x optim.iterations_R for match.row R
    iterations of row r:                     n_r = max(1, round(B / d_r))
    evaluation interval of row r:            ceil(n_r / e_r), e_r = the evaluations its job makes unmatched

so every row trains for about the same device time (a device: one worker's GPU, or its CPU share) and is
evaluated as often. The derived values are written in the plan the sweep prints, on the sweep's MLflow run
(tag kdray.match) and in its state file: a resumed sweep keeps them and measures nothing again.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from kdray.config import Job, override, to_dict
from kdray.errors import MatchError
from kdray.space import MATCHED_KEYS, SEED_KEY, SearchSpace


@dataclass(frozen=True)
class MatchedRow:
    """One row of a matched ablation: its measured seconds per iteration, and what the budget gives it."""

    row: str
    s_per_iteration: float  # NaN when it could not be measured (`unmeasured` says why)
    workers: int
    iterations: int
    eval_interval: int
    unmeasured: str | None = None  # why the row could not be timed: it then runs at its job's own iterations

    @property
    def device_seconds(self) -> float:
        return self.s_per_iteration * self.workers * self.iterations


def row_job(space: SearchSpace, base: Job, row: str) -> Job:
    """The job of `row` at the space's first seed, as its trials will run it (before the match sets iterations)."""
    return override(base, {**space.overrides, **space.row_overrides(row), SEED_KEY: space.seeds[0]})


def derive(space: SearchSpace, base: Job, seconds: dict[str, float | str], cap: int | None = None
           ) -> list[MatchedRow]:
    """Every row's iterations and evaluation interval from its measured seconds per iteration (`seconds`, one per
    row: a number, or why it could not be measured, e.g. a loss that is NaN from the start), by the module
    docstring's rule; `cap`: at most that many iterations (a smoke test's). A row that could not be measured keeps
    its job's iterations (its trials will show why). MatchError when the budget's own row (match.row) could not
    be measured; ValueError for a row without any entry."""
    match = space.match
    if match is None:
        raise ValueError(f"space {space.name!r} has no match")
    jobs = {name: row_job(space, base, name) for name, _ in space.rows}
    missing = [name for name in jobs if name not in seconds]
    if missing:
        raise ValueError(f"no measurement for row(s) {', '.join(map(repr, missing))}")
    usable = {name: isinstance(v, (int, float)) and v > 0 and math.isfinite(v) for name, v in seconds.items()}
    if match.device_seconds is not None:
        budget = match.device_seconds
    elif not usable[match.row]:
        raise MatchError(f"match.row: {match.row!r} sets the budget, but its training iteration could not be "
                          f"timed ({seconds[match.row]}): name another row, or give match.device_seconds")
    else:
        ref = jobs[match.row]
        budget = seconds[match.row] * ref.run.workers * ref.optim.iterations
    out = []
    for name, job in jobs.items():
        if not usable[name]:
            out.append(MatchedRow(name, math.nan, job.run.workers, job.optim.iterations, job.optim.eval_interval,
                                  str(seconds[name])))
            continue
        per_iteration = seconds[name] * job.run.workers
        iterations = max(1, round(budget / per_iteration))
        if cap is not None:
            iterations = min(iterations, cap)
        evaluations = max(1, job.optim.iterations // job.optim.eval_interval)
        out.append(MatchedRow(name, seconds[name], job.run.workers, iterations,
                              max(1, math.ceil(iterations / evaluations))))
    return out


def budget_of(space: SearchSpace, matched: list[MatchedRow]) -> float:
    """The budget per trial, device-seconds: the match's own, or its reference row's."""
    if space.match.device_seconds is not None:
        return space.match.device_seconds
    return next(m.device_seconds for m in matched if m.row == space.match.row)


def apply(space: SearchSpace, matched: list[MatchedRow]) -> None:
    """Set each row's iterations and evaluation interval (MATCHED_KEYS) in the space's rows, in place."""
    by_row = {m.row: m for m in matched}
    missing = [name for name, _ in space.rows if name not in by_row]
    if missing:
        raise ValueError(f"no matched iterations for row(s) {', '.join(map(repr, missing))}")
    space.rows = tuple((name, {**settings, **dict(zip(MATCHED_KEYS, (by_row[name].iterations,
                                                                    by_row[name].eval_interval)))})
                       for name, settings in space.rows)


def to_state(matched: list[MatchedRow]) -> list[dict[str, Any]]:
    return [asdict(m) for m in matched]


def from_state(records: list[dict[str, Any]]) -> list[MatchedRow]:
    return [MatchedRow(**r) for r in records]


def match_lines(space: SearchSpace, matched: list[MatchedRow], where: str) -> list[str]:
    """The plan of a matched ablation, a line per row: its measured s/iteration and the iterations it gets."""
    match = space.match
    budget = budget_of(space, matched)
    source = f"{match.device_seconds:g} device-seconds (match.device_seconds)" if match.device_seconds is not None \
        else f"row {match.row!r} at the job's iterations"
    lines = [f"equal device-seconds: {budget:.1f} per trial ({source}); seconds per iteration measured {where}, "
             f"median of {match.iterations} after {match.warmup} warm-up"]
    for m in matched:
        if m.unmeasured is not None:
            lines.append(f"  row {m.row!r}: not timed ({m.unmeasured}): at its job's {m.iterations} iterations")
            continue
        lines.append(f"  row {m.row!r}: {m.s_per_iteration:.4g} s/iteration x {m.workers} worker(s) -> "
                     f"{m.iterations} iterations, evaluation every {m.eval_interval}")
    return lines


def match_tag(matched: list[MatchedRow]) -> str:
    """The sweep run's tag kdray.match: each row's measurement and iterations, as JSON."""
    return json.dumps(to_state(matched), sort_keys=True)


def measure_rows(space: SearchSpace, base: Job, *, on_ray: bool) -> dict[str, float | str]:
    """Each row's median seconds per iteration (one at a time), or why it could not be timed (a loss that is not
    finite): on Ray, a task with the resources of one of the row's workers (where its trials will run), the job
    shipped as plain data with its plugin files' text (as a trial gets it); else in this process."""
    match = space.match
    out = {}
    for name, _ in space.rows:
        job = row_job(space, base, name)
        if on_ray:
            import ray

            from kdray.plugins import read_sources

            task = ray.remote(num_cpus=job.run.cpus_per_worker, num_gpus=job.run.gpus_per_worker)(_measure)
            out[name] = ray.get(task.remote(to_dict(job), read_sources(job.plugins), match.iterations,
                                            match.warmup))
        else:
            out[name] = _timed(job, match.iterations, match.warmup)
    return out


def _measure(job_data: dict[str, Any], plugin_sources: dict[str, str], iterations: int, warmup: int
             ) -> float | str:
    """The Ray task of `measure_rows`: the row's job rebuilt where it runs, timed."""
    from kdray.config import job_from_dict

    return _timed(job_from_dict(job_data, plugin_sources=plugin_sources), iterations, warmup)


def _timed(job: Job, iterations: int, warmup: int) -> float | str:
    from kdray.engine import NonFiniteLossError, measure_iteration_seconds

    try:
        return measure_iteration_seconds(job, iterations=iterations, warmup=warmup).median_s
    except NonFiniteLossError as err:
        return str(err)
