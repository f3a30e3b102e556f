"""How efficient is the search? TPE+ASHA against random+ASHA and a grid without early stopping, on the demo.

    python benchmarks/search_efficiency.py --iterations 150 --eval-interval 50   # a laptop-CPU sized run
    python benchmarks/search_efficiency.py                                       # at the demo job's own length
    python benchmarks/search_efficiency.py --quick                               # the pipeline, in minutes

A long run can be cut (Ctrl+C, a session's end) and run again with the same arguments: every sweep that ended is
recorded in `<--out>/progress.json` (its sweep id, its trials' configurations, its wall time) and is read back from
the MLflow store instead of being run again; only the sweep that was cut starts over. Other arguments start afresh.

(Ray starts inside: run it where Ray may listen, e.g. in a loopback-only network namespace.)

What is measured: on one job (jobs/demo.yaml) and one space (the knobs of the demo's search space: KD weight
and temperature, I2CKD on/off with its weight and margin), the best *confirmed* mIoU each method reaches
against the trial-iterations it spends. Every sweep goes through kdray's own machinery (`run_sweep`: Ray Tune,
Optuna, ASHA, MLflow), so this measures what a user of `kdray sweep` gets.

  - grid:        an ablation of the grid points (KD weight x temperature x I2CKD off/on at its defaults, `--grid`),
                 one seed, every trial at full length. Its budget B = points x iterations trial-iterations.
  - TPE+ASHA:    a search space with `sampler: tpe`, ASHA (`--grace` evaluations, `--reduction-factor`), and
                 num_samples sized so that its expected spend matches B (a simulation of ASHA on scores in random
                 order; the actual spend is measured and printed). `--reps` repetitions, search seeds 0, 1, ...
  - random+ASHA: the same with `sampler: random`.

No points_to_evaluate (both samplers start cold), no confirmation stage in the spaces, no tuning split.

Spend curve of a sweep: its trial runs ordered by end time; trial-iterations spent = the sum of each run's last
evaluation step (a stopped trial counts what it ran); best-so-far = the best last-evaluation mIoU among the trials
that ran to full length so far (one seed each: the "search score"). Trials still running when another ends are
not counted until they end.

Confirmation: the best-so-far configuration of each search at `--fraction` (0.3) and at 100 % of B, and the grid's
best, are run again at full length over `--confirm-seeds` in one ablation sweep (distinct configurations once);
a configuration's confirmed mIoU is its final val mIoU, mean +- sample std over those seeds.

Printed: the shape measured; a Markdown table per method, repetition and checkpoint (trial-iterations spent and
% of B, best search score, confirmed mIoU, difference to the grid's best confirmed); each sweep's total spend
and wall time; a one-line verdict on the goal: TPE+ASHA within `--tolerance` (0.3) mIoU of the grid's best
confirmed at <= 30 % of the grid's trial-iterations, in how many repetitions. A PNG plot of the curves
(best-so-far search score vs trial-iterations, confirmed points as markers) goes to --out.

Each sweep without a confirmation stage still runs kdray's CE-only student once (the sweep's own baseline row),
and the grid and the confirmation sweep get theirs as every ablation does: those runs are not counted in any
spend; the confirmation sweep's CE row is printed as the baseline.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO_JOB = REPO / "jobs" / "demo.yaml"
DEMO_SPACE = REPO / "kdray" / "demo" / "space.yaml"
GRID_PRESETS = {"default": "3x2x2", "small": "2x2x2", "quick": "1x1x2"}  # KD weights x temperatures x I2CKD
WEIGHT_RANGE = (10 ** -0.5, 10 ** 0.5)  # grid KD weights: geometric, inside the space's loguniform [0.1, 10]
TEMPERATURE_RANGE = (1.0, 4.0)  # grid KD temperatures: linear, inside the space's uniform [1, 8]
KD_WEIGHT, KD_T = "losses.kd.weight", "losses.kd.temperature"
KD_ON, I2CKD_ON, I2CKD_WEIGHT, I2CKD_MARGIN = ("losses.kd.enabled", "losses.i2ckd.enabled", "losses.i2ckd.weight",
                                               "losses.i2ckd.margin")
QUICK = ["data.crop=[32, 32]", "data.synthetic.image_size=32", "data.synthetic.train_length=64",
         "data.synthetic.val_length=8", "data.batch_size=4", "data.eval_batch_size=8", "optim.log_interval=2",
         "teacher.width=0.125", "teacher.iterations=2"]
TPE, RANDOM, GRID = "TPE+ASHA", "random+ASHA", "grid"


# ---------------------------------------------------------------------------------------------------------------
# Pure functions: spend curves, checkpoints, verdict, ASHA's expected spend, the grid (tested without Ray)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialRecord:
    """One trial run as the spend curve sees it."""

    name: str  # trial id (search) or row name (grid)
    end: float  # when it ended (any monotonic unit); inf when it never ended
    steps: int  # the iterations it ran: its last evaluation step (0 without any)
    finished: bool  # ran to full length
    score: float  # its last evaluation's mIoU (nan without any)
    config: dict[str, Any]  # the job overrides that make it (sampled values or the row's settings)


@dataclass(frozen=True)
class CurvePoint:
    spent: int  # cumulative trial-iterations once this trial ended
    best: TrialRecord | None  # the best finished trial so far (None before the first finishes)

    @property
    def score(self) -> float:
        return self.best.score if self.best is not None else math.nan


def spend_curve(trials: Iterable[TrialRecord]) -> list[CurvePoint]:
    """One point per trial, in end order: the trial-iterations spent so far and the best finished trial so far
    (the highest score; the earlier one among equals)."""
    points, spent, best = [], 0, None
    for t in sorted(trials, key=lambda t: (t.end, t.name)):
        spent += t.steps
        if t.finished and math.isfinite(t.score) and (best is None or t.score > best.score):
            best = t
        points.append(CurvePoint(spent, best))
    return points


def best_at(curve: Sequence[CurvePoint], budget: float) -> CurvePoint:
    """The curve's state once at most `budget` trial-iterations were spent: its last point within the budget
    (spent 0, no best, when even its first trial went over)."""
    within = [p for p in curve if p.spent <= budget]
    return within[-1] if within else CurvePoint(0, None)


def budget_fraction(spent: float, budget: float) -> float:
    """`spent` as a fraction of `budget` (nan for an empty budget)."""
    return spent / budget if budget > 0 else math.nan


def config_key(config: dict[str, Any]) -> tuple:
    """A hashable, order-free identity of a configuration (floats to 10 significant digits)."""
    return tuple(sorted((k, float(f"{v:.10g}") if isinstance(v, float) else v) for k, v in config.items()))


def describe(config: dict[str, Any]) -> str:
    """A short row name for a configuration: `KD w1 T4 + I2CKD w0.5 m0.3` (3 significant digits)."""
    text = f"KD w{config.get(KD_WEIGHT, 1.0):.3g} T{config.get(KD_T, 1.0):.3g}" if config.get(KD_ON, True) else "no KD"
    if config.get(I2CKD_ON):
        text += " + I2CKD" + "".join(f" {tag}{config[k]:.3g}" for tag, k in (("w", I2CKD_WEIGHT), ("m", I2CKD_MARGIN))
                                     if k in config)
    return text


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; nan, nan, 0 for none."""
    if not values:
        return math.nan, math.nan, 0
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def goal_met(delta: float | None, tolerance: float) -> bool:
    """Whether a confirmed difference to the grid's best (mIoU points) is within the tolerance."""
    return delta is not None and math.isfinite(delta) and delta >= -tolerance


def verdict(deltas: Sequence[float | None], tolerance: float, fraction: float, method: str = TPE) -> str:
    """The one line on the goal: `method` within `tolerance` mIoU of the grid's best confirmed at <= `fraction`
    of the grid's trial-iterations, in how many repetitions (met: all; partly met: some; not met: none)."""
    met, n = sum(goal_met(d, tolerance) for d in deltas), len(deltas)
    word = "not met" if n == 0 or met == 0 else "met" if met == n else "partly met"
    shown = ", ".join("none finished" if d is None or not math.isfinite(d) else f"{d:+.2f}" for d in deltas)
    return (f"Goal ({method} within {tolerance:g} mIoU of the grid's best confirmed at <= {100 * fraction:g} % of "
            f"the grid's trial-iterations): {word}, in {met} of {n} repetition(s) (differences: {shown or 'none'})")


def _percentile(ordered: list[float], q: float) -> float:
    """numpy's default (linear) percentile of a sorted list, as Ray's ASHA takes its cutoff."""
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def asha_milestones(iterations: int, eval_interval: int, grace: int, reduction_factor: float) -> list[int]:
    """The iterations at which Ray's ASHA (as kdray sets it up: time in iterations, grace in evaluations) can stop
    a trial, rounded up to the evaluation that reaches each rung; rungs at or past the end stop nothing."""
    min_t = min(grace * eval_interval, iterations)
    rungs = int(math.log(iterations / min_t) / math.log(reduction_factor) + 1 + 1e-9)
    stops = {min(math.ceil(min_t * reduction_factor ** k / eval_interval) * eval_interval, iterations)
             for k in range(rungs)}
    return sorted(s for s in stops if s < iterations)


def asha_expected_costs(n: int, iterations: int, milestones: Sequence[int], reduction_factor: float,
                        sims: int = 400, seed: int = 0) -> list[float]:
    """The expected trial-iterations of the i-th trial of an ASHA search (i < n), one trial at a time, each with a
    fixed score in random order: at each rung a trial continues unless below the (1 - 1/rf) percentile of those
    recorded there before it. A search that improves as it goes (TPE) promotes more, hence spends more."""
    import random

    rng = random.Random(seed)
    totals = [0.0] * n
    q = (1 - 1 / reduction_factor) * 100
    for _ in range(sims):
        recorded: list[list[float]] = [[] for _ in milestones]
        for i in range(n):
            score, cost = rng.random(), iterations
            for rung, at in zip(recorded, milestones):
                cutoff = _percentile(rung, q) if rung else None
                bisect.insort(rung, score)
                if cutoff is not None and score < cutoff:
                    cost = at
                    break
            totals[i] += cost
    return [t / sims for t in totals]


def samples_for_budget(budget: float, iterations: int, milestones: Sequence[int], reduction_factor: float,
                       sims: int = 400, seed: int = 0) -> tuple[int, float]:
    """The fewest ASHA trials whose expected spend reaches `budget`, and that expected spend."""
    cheapest = milestones[0] if milestones else iterations
    n = max(1, math.ceil(budget / cheapest))
    spent = 0.0
    for i, cost in enumerate(asha_expected_costs(n, iterations, milestones, reduction_factor, sims, seed)):
        spent += cost
        if spent >= budget:
            return i + 1, spent
    return n, spent


def grid_sizes(spec: str) -> tuple[int, int, int]:
    """`--grid`: a preset name (default, small, quick) or WxTxI (KD weights x temperatures x I2CKD settings,
    I = 1: off, 2: off and on)."""
    text = GRID_PRESETS.get(spec, spec)
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1 or sizes[2] > 2:
        raise ValueError(f"--grid {spec!r}: expected one of {', '.join(GRID_PRESETS)} or WxTxI "
                         "(e.g. 3x2x2; I is 1 for I2CKD off, 2 for off and on)")
    return sizes  # type: ignore[return-value]


def _spread(low: float, high: float, n: int, log: bool = False) -> list[float]:
    if n == 1:
        return [math.sqrt(low * high) if log else (1.0 if low <= 1.0 <= high else low)]
    if log:
        a, b = math.log10(low), math.log10(high)
        return [round(10 ** (a + (b - a) * i / (n - 1)), 3) for i in range(n)]
    return [round(low + (high - low) * i / (n - 1), 3) for i in range(n)]


def grid_rows(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """The grid's rows: (name, settings), KD weights x temperatures x I2CKD off/on (at the job's I2CKD weight and
    margin)."""
    weights, temperatures, toggles = grid_sizes(spec)
    rows = []
    for w in _spread(*WEIGHT_RANGE, weights, log=True):
        for t in _spread(*TEMPERATURE_RANGE, temperatures):
            for on in (False, True)[:toggles]:
                settings = {KD_ON: True, KD_WEIGHT: w, KD_T: t, I2CKD_ON: on}
                rows.append((describe(settings), settings))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The sweeps
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class Search:
    method: str
    seed: int
    sweep_id: str = ""
    wall_s: float = 0.0
    trials: list[TrialRecord] | None = None
    curve: list[CurvePoint] | None = None


def write_yaml(path: Path, data: dict[str, Any]) -> str:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def start_ray() -> None:
    """An embedded Ray as `kdray sweep` starts one (quiet, its workers pinned to it: see
    `tune_setup.pinned_runtime_env`); every sweep of the benchmark runs on it. Nothing when RAY_ADDRESS names a
    cluster."""
    import ray

    from kdray.orchestration.progress import quiet_ray_output

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    from kdray.orchestration.tune_setup import pinned_runtime_env

    ray.init(log_to_driver=False, runtime_env=pinned_runtime_env(), **quiet_ray_output(False, local=True))


def sweep(job: str, space: str, overrides: list[str], uri: str, log):
    """One sweep through kdray's own entry; the outcome (stops the benchmark when a sweep was interrupted)."""
    from kdray.orchestration.sweep import SweepRequest, run_sweep

    outcome = run_sweep(SweepRequest(job, space, overrides, tracking_uri=uri, train_teacher=True), say=log)
    log(f"sweep {outcome.sweep_id} ended in {outcome.wall_s:.0f} s: {outcome.counts()}")
    if outcome.interrupted:
        raise SystemExit(130)
    return outcome


def read_trials(outcome, configs: dict[str, dict[str, Any]], key: str, stage: str | None = None
                ) -> list[TrialRecord]:
    """The sweep's trial runs from MLflow (`read_sweep`) as TrialRecords: those of `stage` only (when given),
    each with its configuration from `configs` by `key` (trial_id or row); runs of no known configuration (the
    CE-only baseline row) left out."""
    from kdray.reporting.runs import FINISHED, read_sweep

    data = read_sweep(outcome.tracking_uri, outcome.experiment, outcome.sweep_id)
    out = []
    for run in data.runs.to_pylist():
        if (stage is not None and run["stage"] != stage) or run[key] not in configs:
            continue
        end = run["end_time"].timestamp() if run["end_time"] is not None else math.inf
        score = run["miou_last"] if run["miou_last"] is not None else math.nan
        out.append(TrialRecord(run[key], end, run["last_step"] or 0, run["state"] == FINISHED, 100 * score,
                               configs[run[key]]))
    return out


def confirmed_scores(outcome) -> dict[str, list[float]]:
    """Row name -> the final val mIoU (points) of each of its finished runs."""
    from kdray.reporting.runs import FINISHED, read_sweep

    data = read_sweep(outcome.tracking_uri, outcome.experiment, outcome.sweep_id, history=False)
    scores: dict[str, list[float]] = {}
    for run in data.runs.to_pylist():
        if run["state"] == FINISHED and run["miou_last"] is not None:
            scores.setdefault(run["row"], []).append(100 * run["miou_last"])
    return scores


class Progress:
    """The sweeps of this benchmark that ended, kept in a JSON file so that a run cut short continues where it
    stopped: `{"shape": <the settings' description>, "sweeps": {key: {sweep_id, experiment, tracking_uri, wall_s,
    configs, trials}}}`. A file written under other settings is set aside (renamed `.stale`), never mixed in."""

    def __init__(self, path: Path, shape: str):
        self.path, self.shape = path, shape
        self.sweeps: dict[str, dict[str, Any]] = {}
        if path.is_file():
            data = json.loads(path.read_text())
            if data.get("shape") == shape:
                self.sweeps = data.get("sweeps", {})
            else:
                path.replace(path.with_suffix(".stale"))

    def get(self, key: str):
        """The recorded sweep `key` as an outcome-like object (sweep_id, experiment, tracking_uri, wall_s,
        trials: a count) and its configurations; None when it has not ended yet."""
        done = self.sweeps.get(key)
        if done is None:
            return None
        outcome = SimpleNamespace(sweep_id=done["sweep_id"], experiment=done["experiment"],
                                  tracking_uri=done["tracking_uri"], wall_s=done["wall_s"], trials=done["trials"])
        return outcome, done["configs"]

    def put(self, key: str, outcome, configs: dict[str, Any]) -> None:
        self.sweeps[key] = {"sweep_id": outcome.sweep_id, "experiment": outcome.experiment,
                            "tracking_uri": outcome.tracking_uri, "wall_s": outcome.wall_s,
                            "trials": len(outcome.trials), "configs": configs}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"shape": self.shape, "sweeps": self.sweeps}, indent=1, default=str))
        tmp.replace(self.path)


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def plot(path: Path, grid: list[CurvePoint], searches: list[Search], marks: list[tuple[str, int, float, float]],
         budget: int, fraction: float, grid_confirmed: float, tolerance: float) -> str | None:
    """The PNG: best-so-far search score vs trial-iterations per method and repetition, the confirmed points as
    markers; returns the reason when it cannot be drawn (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    colours = {GRID: "black", TPE: "tab:blue", RANDOM: "tab:orange"}
    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(9, 5.5))

    def steps(curve: list[CurvePoint], **kw) -> None:
        xs, ys = [0], [math.nan]
        for p in curve:
            xs.append(p.spent)
            ys.append(p.score)
        ax.step(xs, ys, where="post", **kw)

    steps(grid, color=colours[GRID], linewidth=2, label="grid (no early stopping)")
    for i, s in enumerate(searches):
        steps(s.curve or [], color=colours[s.method], linestyle=styles[(s.seed if s.seed >= 0 else i) % len(styles)],
              alpha=0.8, label=f"{s.method}, seed {s.seed}")
    for method, _seed, spent, value in marks:
        ax.plot([spent], [value], marker="o" if method != GRID else "s", color=colours[method], markersize=8,
                markeredgecolor="black", linestyle="none")
    for x in (fraction * budget, budget):
        ax.axvline(x, color="grey", linewidth=0.8, linestyle="--")
    if math.isfinite(grid_confirmed):
        ax.axhspan(grid_confirmed - tolerance, grid_confirmed, color="green", alpha=0.15,
                   label=f"grid's best confirmed - {tolerance:g}")
    ax.set_xlabel("trial-iterations spent")
    ax.set_ylabel("best-so-far search score (val mIoU, %); markers: confirmed mean")
    ax.set_title("Search efficiency on the demo: best mIoU vs trial-iterations")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _count(trials) -> int:
    """A sweep's trial count: its outcome's list, or the number a recorded sweep kept."""
    return trials if isinstance(trials, int) else len(trials)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=str(DEMO_JOB))
    parser.add_argument("--space", default=str(DEMO_SPACE), help="the space whose `space:` knobs are searched")
    parser.add_argument("--iterations", type=int, help="optim.iterations of every trial (default: the job's)")
    parser.add_argument("--eval-interval", type=int, help="optim.eval_interval (default: the job's)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each search, search seeds 0, 1, ...")
    presets = ", ".join(f"{k}={v}" for k, v in GRID_PRESETS.items())
    parser.add_argument("--grid", default="default",
                        help=f"a preset ({presets}) or WxTxI: KD weights x temperatures x I2CKD off(/on)")
    parser.add_argument("--grace", type=int, default=1, help="ASHA's grace period, in evaluations")
    parser.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA's reduction factor")
    parser.add_argument("--confirm-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fraction", type=float, default=0.3, help="the budget fraction of the goal")
    parser.add_argument("--tolerance", type=float, default=0.3, help="the goal's tolerance, in mIoU points")
    parser.add_argument("--concurrent", type=int, default=2, help="trials at once")
    parser.add_argument("--out", default="runs/benchmarks/search_efficiency")
    parser.add_argument("--tracking-uri", help="default: the SQLite file mlflow.db in --out")
    parser.add_argument("--quick", action="store_true",
                        help="tiny images, 4 iterations, 1 rep, a 2-point grid: checks the pipeline, not a result")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the job")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.eval_interval, args.reps, args.grid = 4, 2, 1, "quick"

    from kdray.config import load_job

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = args.tracking_uri or f"sqlite:///{out / 'mlflow.db'}"
    overrides = [*(QUICK + [f"teacher.checkpoint={out / 'quick-teacher.pt'}"] if args.quick else []),
                 *([f"optim.iterations={args.iterations}"] if args.iterations else []),
                 *([f"optim.eval_interval={args.eval_interval}"] if args.eval_interval else []),
                 f"run.output_dir={out / 'runs'}", *args.overrides]
    job = load_job(args.job, overrides)
    iterations, eval_interval = job.optim.iterations, job.optim.eval_interval
    try:
        rows = grid_rows(args.grid)
    except ValueError as err:
        parser.error(str(err))
    budget = len(rows) * iterations
    milestones = asha_milestones(iterations, eval_interval, args.grace, args.reduction_factor)
    n_samples, expected = samples_for_budget(budget, iterations, milestones, args.reduction_factor)

    import yaml

    demo = yaml.safe_load(Path(args.space).read_text())
    cpus = round(min(0.9, 0.9 * (os.cpu_count() or 1) / args.concurrent), 2)
    # only the demo space's knobs: not its overrides (its tuning split: every score here is on val, as the grid's)
    fixed = {"run.workers": 1, "run.cpus_per_worker": cpus, "run.threads": 1}
    spaces = out / "spaces"
    shape = (f"job {args.job} ({job.name}): {iterations} iterations, evaluation every {eval_interval}; grid "
             f"{args.grid} = {len(rows)} points x 1 seed, budget B = {budget} trial-iterations; {args.reps} "
             f"repetition(s) of {TPE} and {RANDOM}, {n_samples} trials each (expected spend {expected:.0f} = "
             f"{100 * expected / budget:.0f} % of B; ASHA grace {args.grace} evaluation(s), reduction factor "
             f"{args.reduction_factor:g}, stops at {milestones or 'none'}); confirmation over seeds "
             f"{args.confirm_seeds}; {args.concurrent} trials at once, {cpus} CPU each")
    print(f"Search efficiency: {shape}", flush=True)

    def log(prefix: str):
        return lambda line: print(f"[{prefix}] {line}", flush=True)

    t_start = time.perf_counter()
    start_ray()
    grid_space = write_yaml(spaces / "grid.yaml", {
        "name": "efficiency-grid", "seeds": [0], "max_concurrent_trials": args.concurrent, "overrides": fixed,
        "rows": [{"name": name, "set": settings} for name, settings in rows]})
    progress = Progress(out / "progress.json", shape)
    recorded = progress.get("grid")
    if recorded is None:
        grid_outcome = sweep(args.job, grid_space, overrides, uri, log("grid"))
        progress.put("grid", grid_outcome, {})
    else:
        grid_outcome = recorded[0]
        log("grid")(f"sweep {grid_outcome.sweep_id} ended in an earlier run: read back from {uri}")
    grid_trials = read_trials(grid_outcome, dict(rows), "row")
    grid_curve = spend_curve(grid_trials)
    grid_best = grid_curve[-1].best if grid_curve else None

    searches: list[Search] = []
    for seed in range(args.reps):
        for method, sampler in ((TPE, "tpe"), (RANDOM, "random")):
            s = Search(method, seed)
            path = write_yaml(spaces / f"{sampler}-seed{seed}.yaml", {
                "name": f"efficiency-{sampler}-seed{seed}", "metric": "val/miou", "mode": "max",
                "num_samples": n_samples, "seed": seed, "sampler": sampler,
                "scheduler": {"kind": "asha", "grace_period": args.grace, "reduction_factor": args.reduction_factor},
                "max_concurrent_trials": args.concurrent, "overrides": fixed, "space": demo["space"]})
            key = f"{sampler}-seed{seed}"
            recorded = progress.get(key)
            if recorded is None:
                outcome = sweep(args.job, path, overrides, uri, log(f"{sampler} seed {seed}"))
                configs = {t.trial_id: {k: v for k, v in t.params.items() if k != "run.seed"}
                           for t in outcome.trials if t.stage in ("search", "")}
                progress.put(key, outcome, configs)
            else:
                outcome, configs = recorded
                log(f"{sampler} seed {seed}")(f"sweep {outcome.sweep_id} ended in an earlier run: read back")
            s.sweep_id, s.wall_s = outcome.sweep_id, outcome.wall_s
            s.trials = read_trials(outcome, configs, "trial_id", stage="search")
            s.curve = spend_curve(s.trials)
            searches.append(s)

    # the configurations to confirm: each search's best at fraction x B and at B, and the grid's best
    picks: dict[tuple[str, int, str], CurvePoint] = {}
    for s in searches:
        for label, cap in ((f"{100 * args.fraction:g} %", args.fraction * budget), ("100 %", budget)):
            picks[(s.method, s.seed, label)] = best_at(s.curve or [], cap)
    to_confirm: dict[tuple, tuple[str, dict[str, Any]]] = {}
    for point in [*picks.values(), *([CurvePoint(budget, grid_best)] if grid_best else [])]:
        if point.best is not None and config_key(point.best.config) not in to_confirm:
            name, taken, i = describe(point.best.config), {n for n, _ in to_confirm.values()}, 1
            while name in taken:  # two configurations alike to 3 significant digits
                i += 1
                name = f"{describe(point.best.config)} #{i}"
            to_confirm[config_key(point.best.config)] = (name, point.best.config)
    confirm_space = write_yaml(spaces / "confirm.yaml", {
        "name": "efficiency-confirm", "seeds": list(args.confirm_seeds), "max_concurrent_trials": args.concurrent,
        "overrides": fixed, "rows": [{"name": n, "set": c} for n, c in to_confirm.values()]})
    rows_key = "confirm:" + json.dumps(sorted(n for n, _ in to_confirm.values()))  # the same rows, or run again
    recorded = progress.get(rows_key)
    if recorded is None:
        confirm_outcome = sweep(args.job, confirm_space, overrides, uri, log("confirm"))
        progress.put(rows_key, confirm_outcome, {})
    else:
        confirm_outcome = recorded[0]
        log("confirm")(f"sweep {confirm_outcome.sweep_id} ended in an earlier run: read back")
    scores = confirmed_scores(confirm_outcome)
    wall = time.perf_counter() - t_start

    def confirmed(point: CurvePoint | None) -> tuple[float, float, int]:
        if point is None or point.best is None:
            return math.nan, math.nan, 0
        return mean_std(scores.get(to_confirm[config_key(point.best.config)][0], []))

    grid_mean, grid_std, grid_n = confirmed(CurvePoint(budget, grid_best))
    print(f"\nSearch efficiency: {shape}")
    if args.quick:
        print("QUICK RUN: tiny images and 4 iterations; this checks the pipeline, it measures nothing.")
    print(f"Grid's best (search score {fmt(grid_best.score if grid_best else math.nan)}): "
          f"{grid_best.name if grid_best else 'none finished'}; confirmed {fmt(grid_mean)} ± {fmt(grid_std)} "
          f"(n={grid_n})")
    ce = mean_std(scores.get("Student (CE)", []))
    if ce[2]:
        print(f"CE-only student (the confirmation sweep's baseline row): {fmt(ce[0])} ± {fmt(ce[1])} (n={ce[2]})")
    print("\n| method | rep (search seed) | checkpoint | trial-iterations spent | % of grid's | best search score "
          "| configuration | confirmed mIoU (mean ± std, n) | Δ to grid's best confirmed |")
    print("|---|---|---|---:|---:|---:|---|---|---:|")
    marks = []
    grid_spent = grid_curve[-1].spent if grid_curve else 0
    print(f"| {GRID} | – | all | {grid_spent} | {fmt(100 * budget_fraction(grid_spent, budget), 0)} | "
          f"{fmt(grid_best.score if grid_best else math.nan)} | {grid_best.name if grid_best else 'none'} | "
          f"{fmt(grid_mean)} ± {fmt(grid_std)} (n={grid_n}) | +0.00 |")
    if math.isfinite(grid_mean):
        marks.append((GRID, 0, grid_spent, grid_mean))
    deltas: dict[str, list[float | None]] = {TPE: [], RANDOM: []}
    for (method, seed, label), point in picks.items():
        mean, std, n = confirmed(point)
        delta = mean - grid_mean if n and math.isfinite(grid_mean) else None
        if label != "100 %":
            deltas[method].append(delta)
        if n:
            marks.append((method, seed, point.spent, mean))
        name = to_confirm[config_key(point.best.config)][0] if point.best else "none finished"
        print(f"| {method} | {seed} | ≤ {label} of B | {point.spent} | "
              f"{fmt(100 * budget_fraction(point.spent, budget), 0)} | {fmt(point.score)} | {name} | "
              f"{fmt(mean)} ± {fmt(std)} (n={n}) | {'n/a' if delta is None else f'{delta:+.2f}'} |")

    print("\n| sweep | trials (finished / stopped early) | trial-iterations spent | % of grid's | wall s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {GRID} | {sum(t.finished for t in grid_trials)} / {sum(not t.finished for t in grid_trials)} | "
          f"{grid_spent} | {fmt(100 * budget_fraction(grid_spent, budget), 0)} | {grid_outcome.wall_s:.0f} |")
    for s in searches:
        spent = s.curve[-1].spent if s.curve else 0
        trials = s.trials or []
        print(f"| {s.method} seed {s.seed} | {sum(t.finished for t in trials)} / {sum(not t.finished for t in trials)}"
              f" | {spent} | {fmt(100 * budget_fraction(spent, budget), 0)} | {s.wall_s:.0f} |")
    print(f"| confirmation ({len(to_confirm)} configurations + CE x {len(args.confirm_seeds)} seeds) | "
          f"{_count(confirm_outcome.trials)} | – | – | {confirm_outcome.wall_s:.0f} |")
    print(f"\nTotal wall time {wall:.0f} s. Sweeps in {uri} (experiment {grid_outcome.experiment!r}).")
    print(verdict(deltas[TPE], args.tolerance, args.fraction, TPE))
    print(verdict(deltas[RANDOM], args.tolerance, args.fraction, RANDOM))
    if grid_n > 1 and math.isfinite(grid_std):
        print(f"(For scale: the grid's best varies by {grid_std:.2f} mIoU (std) over {grid_n} seeds.)")
    png = out / "search_efficiency.png"
    note = plot(png, grid_curve, searches, marks, budget, args.fraction, grid_mean, args.tolerance)
    print(note or f"Plot: {png}")
    import ray

    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
