"""The knobs a search sweep varied, as Optuna distributions, and where each was active.

From the space file the sweep logged on its parent run (`config/space.yaml`, the format documented in
`kdray.orchestration.space`): `uniform`, `loguniform`, `int` and `choice` knobs with their bounds, and `if:` for
a knob sampled only when an earlier choice has a value. Without that file (runs logged by other tools), the knobs
are inferred from the runs' params:
- a knob is a config key with at least two distinct values among the runs that did not fail, except the seed
  and text values that are different in every run (paths, ids);
- booleans and text are categorical; integers an int range; other numbers a float range over the observed
  [min, max], on a log scale when they are positive and span a decade or more;
- a loss's knobs (`losses.<name>.<knob>`) are conditional on `losses.<name>.enabled` being true when that toggle
  is itself a knob.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from kdray.reporting.runs import FAILED, PARAM_COLUMN

SEED_KEY = "run.seed"  # the replicate axis (kdray.orchestration.space.SEED_KEY), never a knob
_INT = re.compile(r"[+-]?\d+")
_LOSS_KNOB = re.compile(r"(losses\.[^.]+)\.(.+)")


@dataclass(frozen=True)
class Knob:
    distribution: BaseDistribution
    condition: tuple[str, object] | None = None  # (toggle key, the value it must have) for a conditional knob


def parse(text: str | None) -> bool | int | float | str | None:
    """A param as MLflow stored it (a string) back to a bool, int, float or the text itself."""
    if text is None:
        return None
    if text in ("True", "true", "False", "false"):
        return text in ("True", "true")
    if _INT.fullmatch(text):
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


def trial_params(runs: pa.Table) -> list[dict[str, object]]:
    """Each run's params, parsed, keyed by config key."""
    keys = [c for c in runs.column_names if c.startswith(PARAM_COLUMN)]
    return [{k[len(PARAM_COLUMN):]: parse(v) for k, v in rec.items()} for rec in runs.select(keys).to_pylist()]


def from_space_file(text: str) -> dict[str, Knob] | None:
    """The knobs of a search space file; None when the text is not one (an ablation, unreadable YAML)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    space = data.get("space") if isinstance(data, dict) else None
    if not isinstance(space, dict):
        return None
    knobs: dict[str, Knob] = {}
    for key, spec in space.items():
        if not isinstance(spec, dict):
            continue  # a fixed value
        condition = spec.get("if")
        if condition is not None:
            condition = next(iter(condition.items())) if isinstance(condition, dict) else (condition, True)
        try:
            if "choice" in spec:
                dist = CategoricalDistribution(list(spec["choice"]))
            elif "int" in spec:
                dist = IntDistribution(*spec["int"], log=bool(spec.get("log", False)), step=spec.get("step") or 1)
            elif "uniform" in spec or "loguniform" in spec:
                low, high = spec.get("uniform") or spec["loguniform"]
                dist = FloatDistribution(float(low), float(high), log="loguniform" in spec)
            else:
                return None
        except (TypeError, ValueError):
            return None
        knobs[key] = Knob(dist, condition)
    return knobs


def infer_knobs(runs: pa.Table) -> dict[str, Knob]:
    """The knobs the runs' params show were varied (see the module's docstring)."""
    params = trial_params(runs.filter(pc.not_equal(runs.column("state"), FAILED)))
    varied = {}
    for key in (params[0] if params else {}):
        values = [p[key] for p in params if p.get(key) is not None]
        if key != SEED_KEY and len({(type(v), v) for v in values}) >= 2:
            varied[key] = values
    knobs: dict[str, Knob] = {}
    for key, values in varied.items():
        match = _LOSS_KNOB.fullmatch(key)
        toggle = f"{match.group(1)}.enabled" if match and match.group(2) != "enabled" else None
        condition = (toggle, True) if toggle in varied else None
        if condition is not None:  # only the values of trials where the knob was active
            values = [p[key] for p in params if p.get(toggle) is True and p.get(key) is not None]
        distinct = set(values)
        if all(isinstance(v, bool) for v in values):
            dist = CategoricalDistribution(sorted(distinct))
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            dist = IntDistribution(min(values), max(values))
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            low, high = float(min(values)), float(max(values))
            dist = FloatDistribution(low, high, log=low > 0 and high / low >= 10)
        elif len(values) >= 3 and len(distinct) == len(values):
            continue  # a path or an id: different in every run, not a knob
        else:
            dist = CategoricalDistribution(sorted(distinct, key=str))
        if not dist.single():
            knobs[key] = Knob(dist, condition)
    return knobs


def active_params(params: dict[str, object], knobs: dict[str, Knob]) -> dict[str, object]:
    """The trial's values of the knobs active in it, typed as their distributions want; a value outside its
    distribution (the space file changed, a resumed sweep) leaves the knob out."""
    result = {}
    for key, knob in knobs.items():
        value = params.get(key)
        if value is None or (knob.condition and params.get(knob.condition[0]) != knob.condition[1]):
            continue
        dist = knob.distribution
        if isinstance(dist, CategoricalDistribution):
            ok = value in dist.choices
        else:
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and dist.low <= value <= dist.high
            if isinstance(dist, IntDistribution):
                ok = ok and float(value).is_integer()
                value = int(value) if ok else value
            else:
                value = float(value) if ok else value
        if not ok:
            continue
        result[key] = value
    return result
