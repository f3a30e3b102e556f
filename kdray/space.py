"""Search spaces (`search_spaces/*.yaml`): what a sweep varies, validated against the job before anything runs.

A **search** space samples trials with Optuna:

    name: i2ckd-weights
    metric: val/miou
    mode: max
    num_samples: 24
    seed: 0                                   # the sampler's seed
    sampler: tpe                              # Optuna's TPE (default), or random
    scheduler: {kind: asha, grace_period: 2, reduction_factor: 3}   # grace period in evaluations
    # or {kind: sync_halving, grace_period: 1, reduction_factor: 2, bracket: 6}: rungs decided on whole brackets
    overrides: {optim.iterations: 2000}       # fixed for every trial
    space:
      losses.kd.weight:      {loguniform: [0.1, 10.0]}
      losses.kd.temperature: {uniform: [1.0, 8.0]}
      losses.i2ckd.enabled:  {choice: [true, false]}
      losses.i2ckd.weight:   {loguniform: [0.01, 1.0], if: losses.i2ckd.enabled}
      run.seed: 0                             # a plain value: fixed
    points_to_evaluate:                        # tried first, e.g. the published defaults
      - {losses.kd.weight: 1.0, losses.kd.temperature: 1.0, losses.i2ckd.enabled: true, losses.i2ckd.weight: 1.0}
    confirm: {top_k: 3, seeds: [0, 1, 2]}     # then the 3 best distinct configurations, at full length, per seed
    pack_size: 4                               # optional: 4 trials at a time train as one pack (below)

A search may trade several objectives instead of one metric (`objectives:` replaces `metric`/`mode`; any score or
cost trials report to Tune; no scheduler, as one stops trials by a single metric):

    objectives: [{metric: val/miou, mode: max}, {metric: student/latency_ms, mode: min}]

Optuna's sampler then searches for the Pareto front; the first objective is the one the tables rank by, and the
confirmation stage takes the front's configurations first.

The confirmation stage (`confirm`, `kdray.orchestration.confirm`) re-runs the search's best configurations over
seeds, with the CE-only student beside them, and ranks them by their mean: the search's own scores come from one
seed each (and from a tuning subset of the training split when the job sets `data.tune_split`).

An **ablation** space runs every row x seed, no sampling:

    name: i2ckd-ablation
    seeds: [0, 1, 2]
    rows:
      - {name: Student (CE)}
      - {name: +KD, set: {losses.kd.enabled: true}}
    match: {row: +KD}        # optional: every row gets the device-seconds +KD takes for the job's iterations
    # or match: {device_seconds: 3600}; each row's iterations then follow from its measured s/iteration

`pack_size: K` (either kind; default 1) trains up to K trials at once in one process, as a **trial pack**
(`kdray.orchestration.pack`): one teacher forward and one data pipeline per batch, each member with its own student,
losses, evaluations, checkpoint and MLflow run, each training exactly as it would alone. The members may differ in
`losses.*` keys only: every searched key (or row setting) must be one. A search takes K of Optuna's suggestions at
once (TPE with the constant liar, so that they spread) and stops members by the scheduler's rule inside the pack
(its members reach each rung together: the pack is the bracket, so `scheduler.bracket` is refused with packs); an
ablation packs the rows of one seed.

Distributions: `uniform: [low, high]`, `loguniform: [low, high]` (low > 0), `int: [low, high]` (inclusive;
`step`, `log` optional), `choice: [...]`. `if: KEY` makes a knob conditional on an earlier boolean choice
(`if: {KEY: VALUE}` on a given value): when the toggle is off, the knob is never sampled.

One parser for both readers: the sweep (`load_space`, which also checks every key and value against the job)
and the report (`parse_space`, on the copy the sweep logged, with no job at hand).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from kdray import contract
from kdray.config import Job, flatten, override, read_yaml, to_dict
from kdray.config.loading import float_literal
from kdray.errors import ConfigError
from kdray.losses.objective import config_formula

_DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
_SEARCH_KEYS = {"name", "kind", "metric", "mode", "num_samples", "seed", "scheduler", "overrides", "space",
                "points_to_evaluate", "max_concurrent_trials", "description", "confirm", "sampler", "objectives",
                "pack_size"}
# What a multi-objective search can trade off: the scores and what a trial costs, all in Tune's results.
OBJECTIVE_METRICS = contract.TUNE_METRICS + contract.COST_METRICS
_ABLATION_KEYS = {"name", "kind", "metric", "mode", "seeds", "rows", "overrides", "max_concurrent_trials",
                  "description", "match", "pack_size"}
PACKED_PREFIX = "losses."  # what the members of one trial pack may differ in
_MATCH_KEYS = {"device_seconds", "row", "measure"}
MATCHED_KEYS = ("optim.iterations", "optim.eval_interval")  # what a match sets on each row
_SCHEDULER_KEYS = {"kind", "grace_period", "reduction_factor", "bracket"}
_SCHEDULER_KINDS = ("asha", "sync_halving", "none")
SEED_KEY = "run.seed"
ROW_KEY = "kdray.row"  # the config key under which an ablation trial carries its row's name


@dataclass(frozen=True)
class Dimension:
    """One searched key: a distribution, or a fixed value, optionally conditional on an earlier toggle."""

    key: str
    kind: str  # uniform | loguniform | int | choice | fixed
    args: tuple = ()
    step: int | None = None
    log: bool = False
    condition: tuple[str, Any] | None = None  # (toggle key, value it must have)


@dataclass
class Scheduler:
    kind: str = "none"  # asha | sync_halving | none
    grace_period: int = 1  # evaluations a trial gets before it can be stopped
    reduction_factor: float = 3.0
    bracket: int | None = None  # sync_halving: trials decided together (None: all num_samples)


@dataclass(frozen=True)
class Confirm:
    """A search's confirmation stage: its `top_k` distinct best configurations, run again at full length once
    per seed of `seeds` (with the CE-only student beside them), ranked by their mean over the seeds."""

    top_k: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Match:
    """An ablation whose rows train for equal device-seconds (`kdray.orchestration.matching`): the budget is
    `device_seconds` per trial, or what the row named `row` takes for the job's `optim.iterations`; each row's
    iterations follow from its measured seconds per iteration (median of `iterations` after `warmup`)."""

    device_seconds: float | None = None
    row: str | None = None
    iterations: int = 10
    warmup: int = 3


@dataclass
class SearchSpace:
    name: str
    kind: str  # search | ablation
    metric: str = "val/miou"
    mode: str = "max"
    num_samples: int = 1
    seed: int = 0
    scheduler: Scheduler = field(default_factory=Scheduler)
    overrides: dict[str, Any] = field(default_factory=dict)
    dimensions: tuple[Dimension, ...] = ()
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    seeds: tuple[int, ...] = ()
    rows: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, overrides)
    max_concurrent_trials: int | None = None
    source: str = ""  # the YAML text, logged with the sweep
    confirm: Confirm | None = None  # a search's confirmation stage (None: the search's own scores decide)
    sampler: str = "tpe"  # a search's Optuna sampler: tpe | random (kdray.orchestration.sampler)
    match: Match | None = None  # an ablation's rows at equal device-seconds (None: each at the job's iterations)
    # A multi-objective search's (metric, mode) pairs, the first also `metric`/`mode` (the one Tune and the tables
    # rank by); () for one objective.
    objectives: tuple[tuple[str, str], ...] = ()
    # Trials trained together as one pack (`kdray.orchestration.pack`): one teacher forward and one data pipeline
    # for up to pack_size students that differ in their losses only; 1: every trial alone.
    pack_size: int = 1

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def trial_count(self) -> int:
        return len(self.rows) * len(self.seeds) if self.kind == "ablation" else self.num_samples

    def row_overrides(self, row: str) -> dict[str, Any]:
        return dict(self.rows)[row]

    def trial_overrides(self, config: dict[str, Any]) -> dict[str, Any]:
        """The job overrides of one trial, from the config Tune hands the trial."""
        if self.kind == "ablation":
            return {**self.overrides, **self.row_overrides(config[ROW_KEY]), SEED_KEY: config[SEED_KEY]}
        return {**self.overrides, **{k: v for k, v in config.items() if k != ROW_KEY}}

    def define_by_run(self) -> partial:
        """The Optuna define-by-run function (module-level + partial: Ray pickles the searcher)."""
        return partial(sample_config, dimensions=self.dimensions)


def sample_config(trial: Any, dimensions: tuple[Dimension, ...]) -> dict[str, Any]:
    """Ask `trial` (an Optuna trial) for each dimension in order; conditional knobs only when their toggle is on.

    Returns the fixed values; Ray's OptunaSearch adds the sampled ones.
    """
    chosen: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    for d in dimensions:
        if d.condition is not None and chosen.get(d.condition[0]) != d.condition[1]:
            continue
        if d.kind == "fixed":
            value = fixed[d.key] = d.args[0]
        elif d.kind == "uniform":
            value = trial.suggest_float(d.key, d.args[0], d.args[1])
        elif d.kind == "loguniform":
            value = trial.suggest_float(d.key, d.args[0], d.args[1], log=True)
        elif d.kind == "int":
            value = trial.suggest_int(d.key, d.args[0], d.args[1], step=d.step or 1, log=d.log)
        else:
            value = trial.suggest_categorical(d.key, list(d.args))
        chosen[d.key] = value
    return fixed


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _yaml11_number(value: Any) -> Any:
    """`1e-4`, which YAML 1.1 (PyYAML) reads as text, as the number it spells; anything else as it is."""
    if isinstance(value, str) and float_literal(value) is not None:
        return float_literal(value)
    return value


def _number(where: str, value: Any) -> float:
    """A finite number; `1e-4`, which YAML 1.1 (PyYAML) reads as text, counts as its number (as in a job)."""
    value = _yaml11_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(where, f"got {value!r}; expected a finite number")
    return value


def _parse_dimension(key: str, spec: Any, earlier: dict[str, Dimension], where: str) -> Dimension:
    if not isinstance(spec, dict):
        return Dimension(key, "fixed", (_yaml11_number(spec),))
    kinds = [k for k in spec if k in _DISTRIBUTIONS]
    extra = set(spec) - set(_DISTRIBUTIONS) - {"if", "step", "log"}
    if len(kinds) != 1 or extra:
        raise _err(where, f"got {spec!r}; expected exactly one of {', '.join(_DISTRIBUTIONS)} "
                          "(plus optional if/step/log)")
    kind, args = kinds[0], spec[kinds[0]]
    condition = None
    if "if" in spec:
        cond = spec["if"]
        toggle, value = (next(iter(cond.items())) if isinstance(cond, dict) and len(cond) == 1 else (cond, True))
        if not isinstance(toggle, str) or toggle not in earlier:
            raise _err(where, f"if: {cond!r} must name a key listed earlier in the space")
        parent = earlier[toggle]
        if parent.kind != "choice" or value not in parent.args:
            raise _err(where, f"if: {toggle} is {value!r} can never hold: {toggle} is not a choice that includes it")
        condition = (toggle, value)
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise _err(where, f"choice: got {args!r}; expected a non-empty list of values")
        return Dimension(key, "choice", tuple(_yaml11_number(v) for v in args), condition=condition)
    if not isinstance(args, list) or len(args) != 2:
        raise _err(where, f"{kind}: got {args!r}; expected [low, high]")
    low, high = (_number(f"{where}.{kind}[{i}]", v) for i, v in enumerate(args))
    if low >= high:
        raise _err(where, f"{kind}: low {low} must be < high {high}")
    if kind == "loguniform" and low <= 0:
        raise _err(where, f"loguniform: low {low} must be > 0 (a log scale has no zero)")
    if kind == "int":
        if not all(isinstance(v, int) for v in (low, high)):
            raise _err(where, f"int: got {args!r}; expected integer bounds")
        step, log = spec.get("step"), bool(spec.get("log", False))
        if step is not None and (not isinstance(step, int) or step < 1):
            raise _err(where, f"step: got {step!r}; expected an integer >= 1")
        if log and low <= 0:
            raise _err(where, f"int with log: low {low} must be > 0")
        return Dimension(key, "int", (low, high), step=step, log=log, condition=condition)
    return Dimension(key, kind, (float(low), float(high)), condition=condition)


def _did_you_mean(value: Any, valid: Iterable[str]) -> str:
    """` (did you mean X?)` for the closest valid names (case aside), or nothing."""
    if not isinstance(value, str):
        return ""
    by_lower = {v.lower(): v for v in valid}
    close = difflib.get_close_matches(value.lower(), sorted(by_lower), n=2)
    return f" (did you mean {' or '.join(by_lower[c] for c in close)}?)" if close else ""


def _check_key(key: str, job_keys: set[str] | None, where: str) -> None:
    if job_keys is not None and key not in job_keys:
        inside = sorted(k for k in job_keys if k.startswith(f"{key}."))
        if inside:  # a section (data.tune_split): its keys are set one by one
            raise _err(where, f"{key!r} is a section of the job, not a key: set its keys one by one, e.g. "
                              f"{', '.join(inside[:4])}")
        section = key.split(".", 1)[0]
        plugin = " (a loss or dataset of your own: name its file under the job's plugins)" \
            if section in ("losses", "data") and key.count(".") >= 2 else ""
        raise _err(where, f"the job has no key {key!r}{_did_you_mean(key, job_keys)}{plugin}")


def probe_values(d: Dimension) -> list[Any]:
    """The values that bound what `d` can give: both ends of a range, every choice, the fixed value."""
    if d.kind in ("fixed", "choice"):
        return list(d.args)
    return [d.args[0], d.args[1]]


def _check_values(job: Job | None, base: dict[str, Any], overrides: dict[str, Any], where: str) -> None:
    """Build the job with these overrides: a value the job would refuse is refused here, before any trial."""
    if job is None:
        return
    try:
        override(job, {**base, **overrides})
    except ConfigError as err:
        raise _err(where, f"gives an invalid job: {err}") from None


def load_space(path: str | Path, job: Job) -> SearchSpace:
    """Read and validate a space file against `job` (every key it names, every value it can give); ConfigError
    on the first problem."""
    path = Path(path)
    return _parse(read_yaml(path), path.read_text(), path.name, path.stem, job)


def parse_space(text: str, name: str = "space") -> SearchSpace:
    """A space from its YAML text (the copy a sweep logged), checked as `load_space` checks it except against a
    job: the keys and values are not; `name` when the text names none. ConfigError on the first problem."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{name}: not readable YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of space settings, got {type(data).__name__}")
    return _parse(data, text, name, name, None)


def _parse(data: dict[str, Any], source: str, where: str, stem: str, job: Job | None) -> SearchSpace:
    kind = data.get("kind", "ablation" if "rows" in data else "search")
    if kind not in ("search", "ablation"):
        raise _err(f"{where}: kind", f"got {kind!r}; expected search or ablation")
    allowed = _SEARCH_KEYS if kind == "search" else _ABLATION_KEYS
    for key in data:
        if key not in allowed:
            article = "an" if kind == "ablation" else "a"
            hint = {"match": " (match is an ablation's: its rows at equal compute)",
                    "objectives": " (objectives are a search's: several metrics traded off)"}.get(key, "")
            raise _err(f"{where}: {key}",
                       f"unknown key for {article} {kind} space{hint}; valid: {', '.join(sorted(allowed))}")
    name = data.get("name", stem)
    objectives = _parse_objectives(data, where) if "objectives" in data else ()
    metric, mode = objectives[0] if objectives else (data.get("metric", "val/miou"), data.get("mode", "max"))
    if mode not in ("max", "min"):
        raise _err(f"{where}: mode", f"got {mode!r}; expected max or min")
    if metric not in contract.TUNE_METRICS and not objectives:
        raise _err(f"{where}: metric", f"got {metric!r}{_did_you_mean(metric, contract.TUNE_METRICS)}; a space can "
                                       f"optimise what trials report to Tune: {', '.join(contract.TUNE_METRICS)}")
    job_keys = set(flatten(to_dict(job))) if job is not None else None
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _err(f"{where}: overrides", f"got {overrides!r}; expected a mapping of job keys to values")
    for key in overrides:
        _check_key(key, job_keys, f"{where}: overrides.{key}")
    _check_values(job, {}, overrides, f"{where}: overrides")
    concurrent = data.get("max_concurrent_trials")
    if concurrent is not None and (not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1):
        raise _err(f"{where}: max_concurrent_trials", f"got {concurrent!r}; expected an integer >= 1")
    pack_size = data.get("pack_size", 1)
    if not isinstance(pack_size, int) or isinstance(pack_size, bool) or pack_size < 1:
        raise _err(f"{where}: pack_size", f"got {pack_size!r}; expected an integer >= 1 (1: each trial alone)")
    common = {"name": name, "kind": kind, "metric": metric, "mode": mode, "overrides": overrides,
              "max_concurrent_trials": concurrent, "source": source, "pack_size": pack_size}
    if kind == "ablation":
        space = _load_ablation(data, where, job_keys, job, common)
    else:
        space = _load_search(data, where, job_keys, job, {**common, "objectives": objectives})
    if pack_size > 1:
        _check_packable(space, where)
    return space


def _check_packable(space: SearchSpace, where: str) -> None:
    """ConfigError unless the trials of `space` can share packs: they may differ in `losses.*` keys only (a
    search's searched keys, an ablation's rows; seeds are packed apart), and an ablation is not matched (its rows
    would train for different iterations)."""
    why = (f"the trials of one pack (pack_size {space.pack_size}) share data, seed, student, schedule and teacher "
           f"and differ in {PACKED_PREFIX}* keys only")
    if space.kind == "search":
        for d in space.dimensions:
            if d.kind != "fixed" and not d.key.startswith(PACKED_PREFIX):
                raise _err(f"{where}: space.{d.key}", f"searched, but {why}: search it with pack_size 1, or fix it")
        return
    if space.match is not None:
        raise _err(f"{where}: match", f"each row trains for its own iterations, but {why}: drop the match, or set "
                                      "pack_size 1")
    for i, (name, settings) in enumerate(space.rows):
        for key in settings:
            if not key.startswith(PACKED_PREFIX):
                raise _err(f"{where}: rows[{i}] ({name}).set.{key}", f"set by a row, but {why}: set it in the "
                                                                      "overrides for every row, or pack_size 1")


def _parse_objectives(data: dict[str, Any], where: str) -> tuple[tuple[str, str], ...]:
    """`objectives: [{metric: M, mode: max|min}, ...]`: two or more, distinct, each a metric trials report to Tune
    (a score or a cost); `metric`/`mode` are then not given (the first objective is the space's metric)."""
    spec, at = data["objectives"], f"{where}: objectives"
    expected = ("expected a list of two or more {metric: M, mode: max|min}, e.g. [{metric: val/miou, mode: max}, "
                "{metric: student/latency_ms, mode: min}]")
    if not isinstance(spec, list) or len(spec) < 2:
        raise _err(at, f"got {spec!r}; {expected} (one objective: use metric and mode)")
    given = [k for k in ("metric", "mode") if k in data]
    if given:
        raise _err(f"{where}: {given[0]}", "a space with objectives takes its metric and mode from them (the first "
                                           "is the one tables rank by): remove it")
    out = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or set(item) != {"metric", "mode"}:
            raise _err(f"{at}[{i}]", f"got {item!r}; expected {{metric: M, mode: max|min}}")
        metric, mode = item["metric"], item["mode"]
        if metric not in OBJECTIVE_METRICS:
            raise _err(f"{at}[{i}].metric", f"got {metric!r}{_did_you_mean(metric, OBJECTIVE_METRICS)}; an objective "
                                            f"is what trials report to Tune: {', '.join(OBJECTIVE_METRICS)}")
        if mode not in ("max", "min"):
            raise _err(f"{at}[{i}].mode", f"got {mode!r}; expected max or min")
        out.append((metric, mode))
    metrics = [m for m, _ in out]
    if len(set(metrics)) != len(metrics):
        raise _err(at, f"got {metrics}: each metric once")
    return tuple(out)


def _load_ablation(data, where, job_keys, job, common) -> SearchSpace:
    seeds = _parse_seeds(data.get("seeds", [0]), f"{where}: seeds")
    rows_data = data.get("rows")
    if not isinstance(rows_data, list) or not rows_data:
        raise _err(f"{where}: rows", "expected a non-empty list of {name, set} rows")
    rows = []
    for i, row in enumerate(rows_data):
        at = f"{where}: rows[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or set(row) - {"name", "set"}:
            raise _err(at, f"got {row!r}; expected {{name: TEXT, set: {{key: value}}}}")
        settings = row.get("set") or {}
        if not isinstance(settings, dict):
            raise _err(f"{at}.set", f"got {settings!r}; expected a mapping of job keys to values")
        for key in settings:
            _check_key(key, job_keys, f"{at}.set.{key}")
        _check_values(job, common["overrides"], settings, f"{at} ({row['name']})")
        rows.append((row["name"], settings))
    names = [r[0] for r in rows]
    if len(set(names)) != len(names):
        raise _err(f"{where}: rows", f"row names must be unique, got {names}")
    match = _parse_match(data.get("match"), names, f"{where}: match")
    if match is not None:
        for at, settings in [("overrides", common["overrides"])] + [(f"rows[{i}] ({n}).set", r)
                                                                    for i, (n, r) in enumerate(rows)]:
            fixed = [k for k in MATCHED_KEYS if k in settings]
            if fixed:
                raise _err(f"{where}: {at}.{fixed[0]}", "a matched ablation derives each row's iterations and "
                                                        "evaluation interval from the budget: remove it, or the match")
    return SearchSpace(**common, seeds=seeds, rows=tuple(rows), match=match)


def _parse_match(spec: Any, rows: list[str], where: str) -> Match | None:
    """`match: {device_seconds: S}` or `match: {row: NAME}`, with `measure: {iterations: N, warmup: W}` optional."""
    if spec is None:
        return None
    expected = ("expected {device_seconds: SECONDS} or {row: NAME} (the budget of that row at the job's "
                "iterations), optionally with measure: {iterations: 10, warmup: 3}")
    if not isinstance(spec, dict) or set(spec) - _MATCH_KEYS:
        unknown = sorted(set(spec) - _MATCH_KEYS) if isinstance(spec, dict) else []
        raise _err(where, f"got {spec!r}{': unknown key(s) ' + ', '.join(unknown) if unknown else ''}; {expected}")
    if ("device_seconds" in spec) == ("row" in spec):
        raise _err(where, f"got {spec!r}: give one of device_seconds and row; {expected}")
    seconds, row = spec.get("device_seconds"), spec.get("row")
    if seconds is not None:
        seconds = _number(f"{where}.device_seconds", seconds)
        if not (math.isfinite(seconds) and seconds > 0):
            raise _err(f"{where}.device_seconds", f"got {spec['device_seconds']!r}; expected seconds > 0")
    if row is not None and row not in rows:
        raise _err(f"{where}.row", f"got {row!r}{_did_you_mean(row, rows)}; expected one of the rows: "
                                   f"{', '.join(rows)}")
    measure = spec.get("measure") or {}
    if not isinstance(measure, dict) or set(measure) - {"iterations", "warmup"}:
        raise _err(f"{where}.measure", f"got {measure!r}; expected {{iterations: 10, warmup: 3}}")
    iterations, warmup = measure.get("iterations", 10), measure.get("warmup", 3)
    for key, value, low in (("iterations", iterations, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _err(f"{where}.measure.{key}", f"got {value!r}; expected an integer >= {low}")
    return Match(seconds, row, iterations, warmup)


def _load_search(data, where, job_keys, job, common) -> SearchSpace:
    num_samples = data.get("num_samples", 1)
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
        raise _err(f"{where}: num_samples", f"got {num_samples!r}; expected an integer >= 1")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise _err(f"{where}: seed", f"got {seed!r}; expected an integer")
    space = data.get("space")
    if not isinstance(space, dict) or not space:
        raise _err(f"{where}: space", "expected a non-empty mapping of job keys to distributions")
    dims: dict[str, Dimension] = {}
    for key, spec in space.items():
        at = f"{where}: space.{key}"
        _check_key(key, job_keys, at)
        dims[key] = d = _parse_dimension(key, spec, dims, at)
        for value in probe_values(d):
            probe = {key: value}
            if d.condition is not None:
                probe[d.condition[0]] = d.condition[1]
            _check_values(job, common["overrides"], probe, f"{at} = {value!r}")
    if not any(d.kind != "fixed" for d in dims.values()):
        raise _err(f"{where}: space", "nothing to search: every key is fixed (use overrides, or an ablation)")
    points = data.get("points_to_evaluate") or []
    if not isinstance(points, list):
        raise _err(f"{where}: points_to_evaluate", "expected a list of mappings")
    for i, point in enumerate(points):
        _check_point(point, dims, f"{where}: points_to_evaluate[{i}]")
    scheduler = _parse_scheduler(data.get("scheduler"), f"{where}: scheduler")
    if common["objectives"] and scheduler.kind != "none":
        raise _err(f"{where}: scheduler", f"{scheduler.kind} stops trials by one metric, and this search has "
                                          f"{len(common['objectives'])} objectives: set scheduler kind none (every "
                                          "trial runs to its end)")
    latency = contract.STUDENT_LATENCY_MS in {m for m, _ in common["objectives"]}
    if latency and job is not None and not override(job, common["overrides"]).run.latency_repeats:
        raise _err(f"{where}: objectives", f"{contract.STUDENT_LATENCY_MS} is an objective, but run.latency_repeats "
                                           "is 0, so no trial times its student: set run.latency_repeats >= 1")
    confirm = _parse_confirm(data.get("confirm"), num_samples, f"{where}: confirm")
    sampler = data.get("sampler", "tpe")
    if sampler not in ("tpe", "random"):
        raise _err(f"{where}: sampler", f"got {sampler!r}; expected tpe (Optuna's TPE, the default) or random")
    return SearchSpace(**common, num_samples=num_samples, seed=seed, scheduler=scheduler,
                       dimensions=tuple(dims.values()), points_to_evaluate=points, confirm=confirm, sampler=sampler)


def _parse_seeds(seeds: Any, where: str) -> tuple[int, ...]:
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds):
        raise _err(where, f"got {seeds!r}; expected a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise _err(where, f"got {seeds!r}; each seed once")
    return tuple(seeds)


def _parse_confirm(spec: Any, num_samples: int, where: str) -> Confirm | None:
    """`confirm: {top_k: K, seeds: [...]}`, or `confirm: false` / absent (no confirmation stage)."""
    if spec is None or spec is False:
        return None
    expected = "expected {top_k: K, seeds: [0, 1, 2]} (or false for no confirmation)"
    if not isinstance(spec, dict):
        raise _err(where, f"got {spec!r}; {expected}")
    unknown, missing = sorted(set(spec) - {"top_k", "seeds"}), [k for k in ("top_k", "seeds") if k not in spec]
    if unknown or missing:
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise _err(where, f"got {spec!r}: {what}; {expected}")
    top_k = spec["top_k"]
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_samples:
        raise _err(f"{where}.top_k", f"got {top_k!r}; expected an integer from 1 to num_samples ({num_samples}): "
                                     "the configurations confirmed come from the search's trials")
    return Confirm(top_k, _parse_seeds(spec["seeds"], f"{where}.seeds"))


def _check_point(point: Any, dims: dict[str, Dimension], where: str) -> None:
    if not isinstance(point, dict):
        raise _err(where, f"got {point!r}; expected a mapping of searched keys to values")
    for key, value in point.items():
        value = _yaml11_number(value)
        d = dims.get(key)
        if d is None or d.kind == "fixed":
            raise _err(where, f"{key} is not a searched key of this space")
        if d.condition is not None and point.get(d.condition[0]) != d.condition[1]:
            raise _err(where, f"{key} is set but its toggle {d.condition[0]} is not {d.condition[1]!r} here")
        if d.kind == "choice":
            ok = value in d.args
        else:
            ok = (not isinstance(value, bool) and isinstance(value, (int, float))
                  and d.args[0] <= value <= d.args[1])
        if not ok:
            raise _err(where, f"{key}={value!r} lies outside its distribution {d.kind} {list(d.args)}")
    for key, d in dims.items():
        needed = d.kind != "fixed" and (d.condition is None or point.get(d.condition[0]) == d.condition[1])
        if needed and key not in point:
            raise _err(where, f"missing {key}: a point names a value for every knob it activates")


def _parse_scheduler(spec: Any, where: str) -> Scheduler:
    if spec is None:
        return Scheduler()
    if not isinstance(spec, dict) or set(spec) - _SCHEDULER_KEYS:
        raise _err(where, f"got {spec!r}; expected {{kind: asha|sync_halving|none, grace_period: N, "
                          "reduction_factor: R, bracket: B (sync_halving only)}")
    kind = spec.get("kind", "asha")
    if kind not in _SCHEDULER_KINDS:
        raise _err(f"{where}.kind", f"got {kind!r}; expected sync_halving, asha or none")
    bracket = spec.get("bracket")
    if bracket is not None and kind != "sync_halving":
        raise _err(f"{where}.bracket", f"got {bracket!r} with kind {kind}; valid with kind sync_halving only")
    if bracket is not None and (not isinstance(bracket, int) or isinstance(bracket, bool) or bracket < 1):
        raise _err(f"{where}.bracket", f"got {bracket!r}; expected an integer >= 1 (trials per bracket)")
    grace = spec.get("grace_period", 1)
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < 1:
        raise _err(f"{where}.grace_period", f"got {grace!r}; expected an integer >= 1 (evaluations)")
    factor = _number(f"{where}.reduction_factor", spec.get("reduction_factor", 3))
    if factor <= 1:
        raise _err(f"{where}.reduction_factor", f"got {factor}; must be > 1")
    return Scheduler(kind, grace, float(factor), bracket)


def check_scheduler(space: SearchSpace, job: Job, where: str) -> None:
    """ConfigError (naming `where`, the space file) for a search whose scheduler could never stop a trial of
    `job` (the job with the space's overrides): a grace period that reaches the trials' last iteration, or a
    bracket, pack or search of one trial, which it has nothing to compare with; and a `bracket` given to a packed
    search, whose packs are its brackets. Such a setting is a mistake, not a choice: `scheduler: {kind: none}`
    says "no early stopping"."""
    s = space.scheduler
    if space.kind != "search" or s.kind == "none":
        return
    iterations, interval = job.optim.iterations, job.optim.eval_interval
    most = (iterations - 1) // interval  # the last evaluation before the final one
    if s.grace_period * interval >= iterations:
        trials = f"the trials (optim.iterations={iterations}, optim.eval_interval={interval})"
        if most < 1:
            raise _err(f"{where}: scheduler", f"{s.kind} needs an evaluation before the last, but {trials} "
                       "evaluate only at their end: lower optim.eval_interval, or set scheduler kind none")
        raise _err(f"{where}: scheduler.grace_period", f"got {s.grace_period} evaluation(s) = "
                   f"{s.grace_period * interval} iterations, which {trials} reach only at their end: the "
                   f"scheduler would never stop one; expected 1..{most}, or scheduler kind none")
    if space.pack_size > 1:  # the scheduler's rule runs inside each pack: the pack is its bracket
        if s.bracket is not None:
            raise _err(f"{where}: scheduler.bracket", f"got {s.bracket} with pack_size {space.pack_size}: a pack is "
                       "its own bracket (its members reach each rung together); leave bracket out, or set pack_size 1")
        if space.num_samples < 2:  # (a last pack of one, after full ones, trains to its end: the others halve)
            raise _err(f"{where}: num_samples", f"got {space.num_samples}: {s.kind} runs inside each pack, and a pack "
                       "of 1 trial would never stop one; expected at least 2, or scheduler kind none")
        return
    size = min(s.bracket or space.num_samples, space.num_samples) if s.kind == "sync_halving" else space.num_samples
    if size < 2:
        key = "scheduler.bracket" if s.kind == "sync_halving" and space.num_samples > 1 else "num_samples"
        raise _err(f"{where}: {key}", f"{s.kind} decides among {size} trial(s) at a time and would never stop "
                   "one; expected at least 2, or scheduler kind none")


def plan_lines(space: SearchSpace, job: Job) -> list[str]:
    """The trial plan, as `--dry-run` prints it."""
    lines = [f"space {space.name} ({space.kind}): {space.trial_count} trials, metric {space.metric} ({space.mode})"]
    if space.multi_objective:
        shown = ", ".join(f"{m} ({d})" for m, d in space.objectives)
        lines[0] = (f"space {space.name} ({space.kind}): {space.trial_count} trials, objectives {shown}: a Pareto "
                    f"front, ranked by {space.metric}")
    if space.overrides:
        fixed = {k: v for k, v in space.overrides.items() if not k.startswith("sweep.")}  # the sweep's, not a trial's
        if fixed:
            lines.append("  fixed for every trial: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    if space.kind == "ablation":
        for name, settings in space.rows:
            shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "(the job as it is)"
            lines.append(f"  row {name!r}: {shown}  x seeds {list(space.seeds)}")
            lines.append(f"      {config_formula(override(job, settings).losses)}")
    else:
        for d in space.dimensions:
            cond = f"  if {d.condition[0]} == {d.condition[1]!r}" if d.condition else ""
            what = repr(d.args[0]) if d.kind == "fixed" else f"{d.kind} {list(d.args)}"
            lines.append(f"  {d.key}: {what}{cond}")
        s = space.scheduler
        name = "Optuna random sampling" if space.sampler == "random" else "Optuna TPE"
        lines.append(f"  sampler: {name}, seed {space.seed}; {len(space.points_to_evaluate)} point(s) first")
        if s.kind != "none" and space.pack_size > 1:
            lines.append(f"  scheduler: {'ASHA' if s.kind == 'asha' else 'synchronous halving'}'s rule inside each "
                         f"pack (the pack is the bracket), grace {s.grace_period} evaluation(s) = "
                         f"{s.grace_period * job.optim.eval_interval} iterations, reduction factor "
                         f"{s.reduction_factor:g}")
        elif s.kind == "asha":
            lines.append(f"  scheduler: ASHA, grace {s.grace_period} evaluation(s) = "
                         f"{s.grace_period * job.optim.eval_interval} iterations, "
                         f"reduction factor {s.reduction_factor:g}")
        elif s.kind == "sync_halving":
            size = min(s.bracket or space.num_samples, space.num_samples)
            clipped = f" (bracket {s.bracket} clipped to num_samples)" if s.bracket and s.bracket > size else ""
            lines.append(f"  scheduler: synchronous halving, brackets of {size} trial(s){clipped}, grace "
                         f"{s.grace_period} evaluation(s) = {s.grace_period * job.optim.eval_interval} iterations, "
                         f"reduction factor {s.reduction_factor:g}; a rung is decided once its bracket reached it")
        else:
            lines.append("  scheduler: none (every trial runs to the end)")
    return lines
