"""The knobs a search sweep varied, as Optuna distributions, and where each was active.

From the space file the sweep logged on its parent run (`config/space.yaml`), read by the sweep's own parser
(`kdray.space.parse_space`): `uniform`, `loguniform`, `int` and `choice` knobs with their bounds, and `if:` for
a knob sampled only when an earlier choice has a value. Without that file (runs logged by other tools), the knobs
are inferred from the runs' params:
- a knob is a config key with at least two distinct values among the runs that did not fail, except the seed
  and text values that are different in every run (paths, ids);
- booleans and text are categorical; integers an int range; other numbers a float range over the observed
  [min, max], on a log scale when they are positive and span a decade or more;
- a loss's knobs (`losses.<name>.<knob>`) are conditional on `losses.<name>.enabled` being true when that toggle
  is itself a knob.

Params come back as MLflow stored them: `str(value)` of the flattened job config (`Tracker.log_params`),
so `None`, `True`, `[512, 1024]`, `0.0001`, `1.0` (a float field given `1`) and the text `1` (a string field) all
arrive as text. A knob's value is recovered against its distribution: a choice is the one whose `str()` is the
stored text, else the one equal to the text read as a Python literal (`1.0` is the choice `1`: the job made the
int a float); a range takes the number. What `str()` storage cannot tell apart: two choices of one knob with the
same text (`None` and the string "None", `1` and "1", `True` and "True"); then the non-string one is taken. A
value its distribution cannot hold (the space changed after the trial ran) is kept, wrapped in `Outside`, and
shown marked, never as inactive.
"""

from __future__ import annotations

import ast
import re
import warnings
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from kdray.errors import ConfigError
from kdray.reporting.runs import FAILED, PARAM_COLUMN
from kdray.space import SEED_KEY, Dimension, parse_space  # SEED_KEY: the replicate axis, never a knob

_INT = re.compile(r"[+-]?\d+")
_LOSS_KNOB = re.compile(r"(losses\.[^.]+)\.(.+)")


@dataclass(frozen=True)
class Knob:
    distribution: BaseDistribution
    condition: tuple[str, object] | None = None  # (toggle key, the value it must have) for a conditional knob


@dataclass(frozen=True)
class Outside:
    """An active knob's value that its distribution cannot hold (the space file changed after the trial ran)."""

    value: object


def parse(text: str) -> object:
    """A param as `str()` stored it back to None, a bool, int, float or list; any other text stays text."""
    if text == "None":
        return None
    if text in ("True", "true", "False", "false"):
        return text in ("True", "true")
    if _INT.fullmatch(text):
        return int(text)
    if text[:1] in "[(" and text[-1:] in "])":
        return _literal(text)
    try:
        return float(text)
    except ValueError:
        return text


def _literal(text: str) -> object:
    """`[512, 1024]` -> [512, 1024] (tuples as lists, as the job config holds them); the text when not a literal."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return list(value) if isinstance(value, tuple) else value


def same(a: object, b: object) -> bool:
    """Equal as a space means it: a bool only equals a bool, numbers by value (1 == 1.0), lists item by item."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def trial_params(runs: pa.Table) -> list[dict[str, str]]:
    """Each run's params as stored (text), keyed by config key; a param the run did not log is absent."""
    keys = [c for c in runs.column_names if c.startswith(PARAM_COLUMN)]
    return [{k[len(PARAM_COLUMN):]: v for k, v in rec.items() if v is not None}
            for rec in runs.select(keys).to_pylist()]


def resolve(text: str, dist: BaseDistribution) -> object:
    """The value the space produced for a stored param (see the module's docstring), or `Outside`."""
    if isinstance(dist, CategoricalDistribution):
        return _choice(text, dist.choices)
    value = parse(text)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not dist.low <= value <= dist.high:
        return Outside(value)
    if isinstance(dist, IntDistribution):
        return int(value) if float(value).is_integer() else Outside(value)
    return float(value)


def _choice(text: str, choices: tuple) -> object:
    exact = [c for c in choices if str(c) == text]
    if len(exact) == 1:
        return exact[0]
    value = parse(text)
    typed = [c for c in exact or choices if same(c, value)]
    if typed:
        return typed[0]
    return exact[0] if exact else Outside(value)


def from_space_file(text: str) -> dict[str, Knob] | None:
    """The knobs of a search space file, as the sweep's parser reads it; None when the text is not one (an
    ablation, unreadable YAML, a space the parser refuses)."""
    try:
        space = parse_space(text, "the sweep's space file")
    except ConfigError:
        return None
    if space.kind != "search":
        return None
    return {d.key: Knob(distribution(d), d.condition) for d in space.dimensions if d.kind != "fixed"}


def distribution(d: Dimension) -> BaseDistribution:
    """The Optuna distribution of a searched dimension, as the sweep's `sample_config` asks Optuna for it."""
    if d.kind == "choice":
        return categorical(list(d.args))
    if d.kind == "int":
        return IntDistribution(d.args[0], d.args[1], log=d.log, step=d.step or 1)
    return FloatDistribution(d.args[0], d.args[1], log=d.kind == "loguniform")


def categorical(choices: list) -> CategoricalDistribution:
    """A choice knob's distribution. Optuna warns that lists (`[512, 1024]`) cannot go into its database; the
    study the report rebuilds lives in memory, where they can."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return CategoricalDistribution(list(choices))


def _distinct(values: list) -> list:
    """`values` without repeats, in order (lists are not hashable, and 1 and True are different values)."""
    seen: dict[tuple[str, str], object] = {}
    for v in values:
        seen.setdefault((type(v).__name__, repr(v)), v)
    return list(seen.values())


def infer_knobs(runs: pa.Table) -> dict[str, Knob]:
    """The knobs the runs' params show were varied (see the module's docstring)."""
    params = [{k: parse(v) for k, v in p.items()}
              for p in trial_params(runs.filter(pc.not_equal(runs.column("state"), FAILED)))]
    keys = list(dict.fromkeys(k for p in params for k in p))
    varied = {}
    for key in keys:
        values = [p[key] for p in params if key in p]
        if key != SEED_KEY and len(_distinct(values)) >= 2:
            varied[key] = values
    knobs: dict[str, Knob] = {}
    for key, values in varied.items():
        match = _LOSS_KNOB.fullmatch(key)
        toggle = f"{match.group(1)}.enabled" if match and match.group(2) != "enabled" else None
        condition = (toggle, True) if toggle in varied else None
        if condition is not None:  # only the values of trials where the knob was active
            values = [p[key] for p in params if p.get(toggle) is True and key in p]
        dist = _inferred(values)
        if dist is not None and not dist.single():
            knobs[key] = Knob(dist, condition)
    return knobs


def _inferred(values: list) -> BaseDistribution | None:
    """The distribution the observed values suggest; None for text different in every run (a path, an id)."""
    distinct = _distinct(values)
    if not values:
        return None
    if all(isinstance(v, bool) for v in values):
        return categorical(sorted(distinct))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return IntDistribution(min(values), max(values))
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        low, high = float(min(values)), float(max(values))
        return FloatDistribution(low, high, log=low > 0 and high / low >= 10)
    if len(values) >= 3 and len(distinct) == len(values):
        return None
    return categorical(sorted(distinct, key=str))


def active_params(params: dict[str, str], knobs: dict[str, Knob]) -> dict[str, object]:
    """The trial's value of each knob active in it (`params`: as stored, see `trial_params`), as the space
    produced it: the choice itself, an int or a float; `Outside` when its distribution cannot hold it.

    A conditional knob is active when its toggle's value == the condition's (Python ==, as the sweep's
    `sample_config` decides), the toggle read as the space produced it; a toggle inactive itself is None there.
    """
    values: dict[str, object] = {}
    for key, knob in knobs.items():  # in the space's order: a toggle comes before the knobs it gates
        if key in params and _holds(knob.condition, values, params, knobs):
            values[key] = resolve(params[key], knob.distribution)
    return values


def _holds(condition: tuple[str, object] | None, values: dict[str, object], params: dict[str, str],
           knobs: dict[str, Knob]) -> bool:
    if condition is None:
        return True
    toggle, wanted = condition
    if toggle in knobs:
        got = values.get(toggle)
        return (got.value if isinstance(got, Outside) else got) == wanted
    return toggle in params and (params[toggle] == str(wanted) or same(parse(params[toggle]), wanted))
