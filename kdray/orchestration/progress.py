"""What a sweep prints while it runs: a line per teacher evaluation, a line per trial event, and not Ray's noise.

- `SweepProgress`, a Tune callback on the driver: one line when a trial starts, reports an evaluation,
  finishes, is stopped early or fails, each behind the sweep's count and ETA:
  `[3/8 done, 2 running, ETA 4m10s] trial 1a2b3_00003 KD+I2CKD seed 0: iteration 200/400 mIoU 41.30%`.
- `TeacherProgress`: the teacher trains as a Ray Train run whose reports reach only the Train controller (an
  actor); `ReportRelay`, a `ray.train.UserCallback` there, posts them to a small mailbox actor that a driver
  thread reads, and each becomes a `kdray.train`-style progress line (`kdray.engine.progress.Progress`).
- `quiet_ray_output`: keeps Ray's, Tune's, MLflow's and Optuna's start-up notices out of the default output
  (`--verbose` keeps them).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune

from kdray import contract
from kdray.engine.progress import Progress, _duration
from kdray.orchestration.pack import PACK_KEY
from kdray.space import ROW_KEY, SEED_KEY

Say = Callable[[str], None]


def echo(line: str) -> None:
    """print, flushed: progress must show when stdout is a pipe or a file (`| tee`, `ray job submit` logs)."""
    print(line, flush=True)

_NAMES = {contract.VAL_MIOU: "mIoU", contract.VAL_PIXEL_ACC: "pixel acc"}


def value_text(metric: str, value: float | None) -> str:
    """`41.30%`: val/ metrics (ratios) in %, others as they are."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.2f}%" if metric.startswith("val/") else f"{value:.4g}"


def metric_text(metric: str, value: float | None) -> str:
    """`mIoU 41.30%`."""
    return f"{_NAMES.get(metric, metric)} {value_text(metric, value)}"


def eta_seconds(elapsed: float, work_at_start: float, work_done: float, work_total: float) -> float | None:
    """Seconds left if work goes on at the pace it went since `work_at_start` (any unit: trials, iterations);
    None while nothing has been measured."""
    progressed = work_done - work_at_start
    if progressed <= 0 or elapsed <= 0:
        return None
    return elapsed / progressed * max(0.0, work_total - work_done)


def last_line(error: BaseException | str | None, default: str = "the trial failed", limit: int = 300) -> str:
    """The last non-empty line of an error: Ray wraps the worker's own exception, which comes last."""
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    return (lines[-1] if lines else default)[:limit]


def trial_error(trial) -> str | None:
    """A failed trial's error text. Tune writes it to the trial's local error file before on_trial_error;
    `trial.get_error()` reads the copy in the storage path, which is often not there yet at that moment."""
    path = getattr(trial, "error_file", None)
    if path:
        with contextlib.suppress(OSError):
            text = Path(path).read_text()
            if text.strip():
                return text
    get_error = getattr(trial, "get_error", None)
    with contextlib.suppress(Exception):
        error = get_error() if callable(get_error) else None
        return str(error) if error is not None else None
    return None


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TrialLabel:
    """`trial <id> <ablation row, else method> seed <seed>`, from the trial's sampled config. Picklable (Tune
    pickles its callbacks into tuner.pkl): it holds the space and the job every trial starts from, never a
    closure."""

    def __init__(self, space, job):
        self.space, self.job = space, job
        self._cache: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def describe(self, config: dict[str, Any]) -> str:
        from kdray.config import override
        from kdray.losses.objective import method_label

        if PACK_KEY in config:  # a trial pack: its members' labels
            members = config[PACK_KEY]
            return f"(pack of {len(members)}: " + "; ".join(self.describe(m) for m in members) + ")"
        try:
            job = override(self.job, self.space.trial_overrides(config))
            return f"{config.get(ROW_KEY) or method_label(job.losses)} seed {job.run.seed}"
        except Exception:  # a label never stops a sweep
            return str(config.get(ROW_KEY, "")).strip()

    def __call__(self, trial) -> str:
        if trial.trial_id not in self._cache:
            self._cache[trial.trial_id] = self.describe(trial.config or {})
        text = self._cache[trial.trial_id]
        return f"trial {trial.trial_id} {text}" if text else f"trial {trial.trial_id}"


def interrupted() -> bool:
    """Whether Ctrl+C reached the sweep (the flag kdray.orchestration.trial sets, when it has one)."""
    with contextlib.suppress(Exception):
        from kdray.orchestration import trial

        flag = getattr(trial, "INTERRUPTED", None)
        return bool(flag is not None and flag.is_set())
    return False


def plain_label(trial) -> str:
    return f"trial {trial.trial_id}"


def sampled(config: dict[str, Any]) -> str:
    """A search trial's sampled values, `losses.kd.weight=2.31, ...` (ablation rows carry only row and seed)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(config.items()) if k not in (ROW_KEY, SEED_KEY, PACK_KEY))


class SweepProgress(ray.tune.Callback):
    """One line per trial event on the driver, behind the sweep's count and ETA.

    The ETA counts work in trials: an ended trial (finished, stopped early or failed) is one, a running one the
    fraction of its iterations reported so far; the pace is measured from this process's first event, so a
    resumed sweep's finished trials do not make it look fast. ASHA stops trials early, so for a search the ETA
    errs on the long side until the first rungs are decided.
    """

    def __init__(self, total_trials: int, metric: str = contract.VAL_MIOU, mode: str = "max",
                 label: Callable[[Any], str] | None = None, say: Say = echo, clock: Callable[[], float] | None = None):
        self.total_trials, self.metric, self.mode = total_trials, metric, mode
        self.label = label or plain_label
        self.say = say
        self.clock = clock or time.monotonic
        self._t0: float | None = None  # the clock at this process's first event
        self._work0 = 0.0  # work already done then
        self._fraction: dict[str, float] = {}  # trial id -> iterations reported / iterations_total
        self._best: dict[str, float] = {}
        self._started: set[str] = set()
        self._starting = ""  # the trial on_trial_start is about (still PENDING or PAUSED in Tune's list)
        self._ended: dict[str, str] = {}  # trial id -> finished | stopped early | failed | interrupted
        self._shown: dict[str, Any] = {}  # trial id -> the iteration of its last result line
        self._members: dict[str, str] = {}  # a pack's member id -> how it ended (finished | stopped early | failed)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment (tuner.pkl)
        state = {**self.__dict__}
        del state["say"], state["clock"]  # a print-like callable may not pickle; a clock is per process
        state["_t0"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_starting", "")  # pickled by a kdray from before it was kept
        self.__dict__.setdefault("_shown", {})
        self.__dict__.setdefault("_members", {})
        self.say, self.clock = echo, time.monotonic

    # -- the overall count ---------------------------------------------------------------------------------
    def counts(self, trials: list) -> tuple[set[str], set[str], set[str]]:
        """(ended, running, paused) trial ids. Tune sets a trial RUNNING only after on_trial_start and TERMINATED
        after on_trial_complete, so the callback's own record comes first; the trial list adds restored trials.
        A trial a scheduler paused (synchronous halving: waiting for its bracket) is paused, not running, until
        it starts again."""
        ended = set(self._ended) | {t.trial_id for t in trials if str(t.status) in ("TERMINATED", "ERROR")}
        paused = {t.trial_id for t in trials if str(t.status) == "PAUSED"} - ended - {self._starting}
        running = ({t.trial_id for t in trials if str(t.status) == "RUNNING"} | self._started) - ended - paused
        return ended, running, paused

    def prefix(self, trials: list) -> str:
        ended, running, paused = self.counts(trials)
        work = len(ended) + sum(self._fraction.get(t, 0.0) for t in running)
        now = self.clock()
        if self._t0 is None:
            self._t0, self._work0 = now, work
        total = max(self.total_trials, len(ended) + len(running) + len(paused))
        eta = eta_seconds(now - self._t0, self._work0, work, total)
        eta_text = f", ETA {_duration(eta)}" if eta is not None and len(ended) < total else ""
        waiting = f", {len(paused)} paused" if paused else ""
        return f"[{len(ended)}/{total} done, {len(running)} running{waiting}{eta_text}]"

    def _say(self, trials: list, trial, text: str) -> None:
        try:
            self.say(f"{self.prefix(trials)} {self.label(trial)}: {text}")
        except Exception as err:  # progress output never stops a sweep
            logging.getLogger(__name__).debug("progress line failed: %s", err)

    def _track(self, trial, result: dict[str, Any]) -> None:
        done, total = result.get(contract.ITERATION), result.get(contract.ITERATIONS_TOTAL)
        if done is not None and total:
            self._fraction[trial.trial_id] = min(1.0, float(done) / float(total))
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and not math.isnan(value):
            best = self._best.get(trial.trial_id)
            better = best is None or (value > best if self.mode == "max" else value < best)
            if better:
                self._best[trial.trial_id] = float(value)

    # -- Tune's hooks ------------------------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        again = trial.trial_id in self._fraction  # it reported before: a trial a scheduler paused, going on
        self._started.add(trial.trial_id)
        self._ended.pop(trial.trial_id, None)
        params = sampled(trial.config or {})
        self._starting = trial.trial_id
        done = (trial.last_result or {}).get(contract.ITERATION)
        text = (f"resumed after iteration {done}" if done is not None else "resumed") if again else \
            "started" + (f" ({params})" if params else "")
        self._say(trials, trial, text)
        self._starting = ""

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._track(trial, result)
        if self.metric not in result or self._shown.get(trial.trial_id) == result.get(contract.ITERATION):
            return  # a pack's closing result repeats its last evaluation's iteration: one line is enough
        self._shown[trial.trial_id] = result.get(contract.ITERATION)
        value, best = result[self.metric], self._best.get(trial.trial_id)
        text = f"iteration {result.get('iteration', '?')}/{result.get('iterations_total', '?')} "
        text += metric_text(self.metric, value)
        if best is not None and best != value:
            text += f" (best {value_text(self.metric, best)})"
        self._say(trials, trial, text)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        last = trial.last_result or {}
        self._track(trial, last)
        if PACK_KEY in (trial.config or {}):
            self._pack_ended(trials, trial, last)
            return
        done, total = last.get(contract.ITERATION, 0), last.get(contract.ITERATIONS_TOTAL, 0)
        status = "stopped early" if total and done < total else "finished"
        if status == "stopped early" and interrupted():
            status = "interrupted"  # Ctrl+C: Tune ends running trials as it ends stopped ones
        self._ended[trial.trial_id] = status
        self._started.discard(trial.trial_id)
        best = self._best.get(trial.trial_id, last.get(self.metric))
        where = "after" if status == "finished" else "at"
        text = f"{status} {where} iteration {done}/{total}" if total else status
        if last.get(contract.TIME_BUDGET_REACHED) and status == "finished":
            text = f"finished at iteration {done}: its time budget (optim.time_budget_s) ran out"
        if best is not None:
            text += f", best {metric_text(self.metric, best)}"
        self._say(trials, trial, text)

    def _pack_ended(self, trials: list, trial, last: dict[str, Any]) -> None:
        """A pack's end: how each member ended (its state in the pack's last result), in one line."""
        from kdray.orchestration.pack import COMPLETE, STATE, STOPPED, member_result

        self._ended[trial.trial_id] = "finished"
        self._started.discard(trial.trial_id)
        parts = []
        for index in range(len(trial.config[PACK_KEY])):
            member = member_result(last, index)
            state, done = member.get(STATE), member.get(contract.ITERATION, 0)
            status = {COMPLETE: "finished", STOPPED: "stopped early"}.get(state, "failed")
            self._members[f"{trial.trial_id}.m{index}"] = status
            where = f" at {done}" if status != "finished" else ""
            value = member.get(self.metric)
            shown = f" ({metric_text(self.metric, value)})" if isinstance(value, (int, float)) else ""
            parts.append(f"m{index} {status}{where}{shown}")
        self._say(trials, trial, "ended: " + ", ".join(parts))

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._ended[trial.trial_id] = "failed"
        self._started.discard(trial.trial_id)
        self._say(trials, trial, f"failed: {last_line(trial_error(trial))}")

    def on_experiment_end(self, trials: list, **info) -> None:
        if not self._ended:
            return
        tally = {s: sum(1 for v in self._ended.values() if v == s)
                 for s in ("finished", "stopped early", "failed", "interrupted")}
        done = tally["finished"] + tally["stopped early"] + tally["failed"]  # after Ctrl+C, the rest did not end
        elapsed = self.clock() - self._t0 if self._t0 is not None else 0.0
        parts = ", ".join(f"{n} {s}" for s, n in tally.items() if n)
        if self._members:  # packs: what became of their members
            members = {s: sum(1 for v in self._members.values() if v == s)
                       for s in ("finished", "stopped early", "failed")}
            parts = ", ".join(f"{n} {s}" for s, n in members.items() if n) + " (members of the packs)"
        try:
            self.say(f"[{done}/{max(self.total_trials, done)} done] {'packs' if self._members else 'trials'} ended "
                     f"after {_duration(elapsed)}: {parts}")
        except Exception as err:
            logging.getLogger(__name__).debug("progress line failed: %s", err)


# -- the teacher ----------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class _Mailbox:
    """Holds the reports the Train controller posts until the driver takes them."""

    def __init__(self) -> None:
        self._items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self._items = self._items, []
        return items


class ReportRelay(ray.train.UserCallback):
    """Runs in the Ray Train controller actor, not on the driver: posts rank 0's reports (and worker failures)
    to the driver's mailbox without waiting. `put` also works from a worker (rank 0), for progress between
    evaluations."""

    def __init__(self, mailbox) -> None:
        self.mailbox = mailbox

    def put(self, item: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # the mailbox is gone: progress is best effort
            self.mailbox.put.remote(item)  # fire and forget: training never waits for the driver

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if metrics:
            self.put({k: v for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        errors = [last_line(e, "worker failed") for _, e in sorted(worker_exceptions.items())]
        self.put({"error": errors[0] if errors else "worker failed"})


class _SayStream:
    """A stream for `Progress` that hands each finished line to `say` (never a terminal: plain lines)."""

    def __init__(self, say: Say, prefix: str = "") -> None:
        self.say, self.prefix = say, prefix

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                self.say(self.prefix + line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class TeacherProgress:
    """Driver-side progress lines for one Ray Train run (the teacher), while `fit()` blocks the main thread:

        with TeacherProgress(iterations, say, name="teacher") as progress:
            fit(job, role="teacher", ..., callbacks=[progress.callback])

    Each line is `Progress`'s (`[####....] 150/900 <text> | 1m10s elapsed, eta 5m50s`) after `name`.
    """

    def __init__(self, total: int, say: Say = echo, name: str = "teacher", metric: str = contract.VAL_MIOU,
                 poll_s: float = 1.0) -> None:
        self.total, self.say, self.name, self.metric, self.poll_s = total, say, name, metric, poll_s
        self.progress = Progress(total, stream=_SayStream(say, f"{name} "))
        self.best: float | None = None
        self.callback: ReportRelay | None = None
        self._mailbox = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line_text(self, item: dict[str, Any]) -> str | None:
        """The text after the bar for one report (an evaluation, or a loss window from a worker's `put`)."""
        if self.metric in item:
            value = item[self.metric]
            if self.best is None or value > self.best:
                self.best = value
            return f"{metric_text(self.metric, value)} (best {value_text(self.metric, self.best)})"
        if contract.TRAIN_LOSS_TOTAL in item:
            rate = item.get(contract.TRAIN_IMAGES_PER_S)
            return f"loss {item[contract.TRAIN_LOSS_TOTAL]:.3f}" + (f", {rate:.0f} img/s" if rate else "")
        return None

    def show(self, item: dict[str, Any]) -> None:
        if "error" in item:
            self.say(f"{self.name}: a worker failed: {item['error']}")
            return
        text = self.line_text(item)
        if text is not None and item.get(contract.ITERATION) is not None:
            self.progress.update(int(item[contract.ITERATION]), text)

    def _drain(self) -> None:
        try:
            items = ray.get(self._mailbox.take.remote(), timeout=30)
        except Exception:  # a slow or lost mailbox costs lines, never the run
            return
        for item in items:
            try:
                self.show(item)
            except Exception as err:
                logging.getLogger(__name__).debug("teacher progress line failed: %s", err)

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._drain()

    def __enter__(self) -> TeacherProgress:
        self._mailbox = _Mailbox.remote()
        self.callback = ReportRelay(self._mailbox)
        self.progress.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._poll, name="kdray-teacher-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._mailbox is not None:
            self._drain()  # the reports posted since the last poll
            ray.kill(self._mailbox)
            self._mailbox = None


# -- Ray's and Tune's start-up noise -----------------------------------------------------------------------------
# Every line below was captured from a sweep-shaped run (a Tune trial function calling TorchTrainer.fit):
#  1. "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
#     ray/_private/authentication/authentication_token_setup.py, logger WARNING when ray.init starts a local
#     cluster with RAY_AUTH_MODE unset. Dropped by a logging filter on that logger; authentication stays on.
#     (Setting RAY_AUTH_MODE=token also silences it, but only before `import ray`: set afterwards, the driver and
#     the GCS disagree on the mode and ray.init fails with InvalidAuthToken.)
#  2. "Generated new authentication token and saved to ~/.ray/auth_token", "Started a local Ray instance. View
#     the dashboard at ...", Tune's "Wrote the latest version of all result files ...": INFO records of the
#     "ray" logger, hidden by ray.init(logging_level=WARNING). Ray's warnings stay.
#  3. "network_util.cc: Failed to determine local IP via external connectivity to: 8.8.8.8:53, ..., falling back
#     to hostname resolution": the driver's C++ core, from ray._private.services.get_node_ip_address(), which
#     tries a UDP route lookup towards a public DNS address when no node IP is known. It appears only on a host
#     without a route to the internet. For an embedded single-node Ray the lookup is pointless: with
#     ray_constants.ENABLE_RAY_CLUSTER off (env RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's default on macOS
#     and Windows) the node IP is the loopback address and nothing is looked up. The env var is read once, at
#     `import ray`, and this module imports ray, so the constant is set directly; only when this process
#     starts its own local Ray (an address given means a cluster, where the node IP matters).
#  4. "(raylet) WARNING: 8 PYTHON worker processes have been started on node ... 4x the maximum expected
#     startup concurrency (2)": pushed by the raylet through the GCS error channel and printed by the driver's
#     error-listener thread (ray._private.worker.print_to_stdstream) whatever log_to_driver says. A sweep's
#     trial actors, Train controllers and workers exceed 2x the CPU count by design. Dropped by a wrapper on
#     that function that removes only these lines (out-of-memory kills and other raylet errors still print).
#  5. Tune's "Configuration for experiment" table, "View detailed results here: ..." and the TensorBoard hint
#     into Ray's temp dir: the new output engine (ray.tune.experimental.output) prints them whatever
#     RunConfig(verbose=0) says. RAY_AIR_NEW_OUTPUT=0 (read when Tune runs) selects the legacy reporter, which
#     prints nothing at verbose=0. TUNE_DISABLE_AUTO_CALLBACK_LOGGERS is NOT used: it would also drop the
#     progress.csv / result.json that ResultGrid.metrics_dataframe reads.
#  6. MLflow's "INFO mlflow.store.db.utils: Creating initial MLflow database tables..." / "Updating database
#     tables" (a new SQLite store) and Optuna's "[I ...] A new study created in memory with name: optuna" (the
#     searcher): INFO records of their own loggers, which each library configures when imported. Their level
#     goes to WARNING after importing them (an import afterwards would reset it).
#  7. Tune's "The `on_step_begin` operation took 1.472 s, which may be a performance bottleneck" and "Processing
#     trial results took ..." (`warn_if_slow`, logger ray.tune.utils.util, at its 0.5 s threshold, read when Ray
#     is imported): on a busy machine Tune's own bookkeeping crosses it; nothing a user can act on. Dropped by a
#     filter on that logger.
_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"
_TOKEN_NOTICE = "Token authentication is enabled for this Ray cluster"
RAYLET_NOISE = re.compile(r"worker processes have been started on node")


class _DropNotice(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


class _DropContaining(_DropNotice):
    def filter(self, record: logging.LogRecord) -> bool:
        return self.start not in record.getMessage()


_token_filter = _DropNotice(_TOKEN_NOTICE)
_SLOW_LOGGER = "ray.tune.utils.util"
_slow_filter = _DropContaining("may be a performance bottleneck")
# After Ctrl+C Tune logs "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)" and
# "Trials did not complete: [...]"; kdray says what was interrupted and how to resume (`kdray sweep --resume`).
_TUNE_LOGGER = "ray.tune.tune"
_tune_interrupt_filters = (_DropNotice("Experiment has been interrupted"), _DropNotice("Trials did not complete"))
CHATTY_LIBRARIES = ("mlflow", "optuna")


def ray_env(verbose: bool) -> dict[str, str]:
    """Environment settings for the driver (set with setdefault: a user's own setting wins)."""
    return {} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}


def tune_verbosity(verbose: bool) -> int:
    """For tune.RunConfig(verbose=...): Tune's status tables with --verbose, nothing otherwise."""
    return 1 if verbose else 0


def ray_init_kwargs(verbose: bool) -> dict[str, Any]:
    return {} if verbose else {"logging_level": logging.WARNING}


def drop_raylet_noise(data: dict[str, Any]) -> dict[str, Any] | None:
    """A driver-printed message without the raylet's worker-count notices; None when nothing is left."""
    if data.get("pid") != "raylet":
        return data
    lines = [line for line in data.get("lines", []) if not RAYLET_NOISE.search(str(line))]
    return {**data, "lines": lines} if lines else None


def _filter_raylet_messages(on: bool) -> None:
    import ray._private.worker as ray_worker

    current = getattr(ray_worker, "print_to_stdstream", None)
    if current is None:  # a Ray without this function: leave its output alone
        return
    original = getattr(current, "__kdray_original__", current)
    if not on:
        ray_worker.print_to_stdstream = original
        return
    if current is not original:
        return

    @functools.wraps(original)
    def print_filtered(data, *args, **kwargs):
        kept = drop_raylet_noise(data)
        if kept is not None:
            original(kept, *args, **kwargs)

    print_filtered.__kdray_original__ = original
    ray_worker.print_to_stdstream = print_filtered


_saved: dict[Any, Any] = {}  # what quiet_ray_output changed, so that a verbose call can put it back


def _skip_node_ip_probe(on: bool) -> None:
    import ray._private.ray_constants as constants

    if not hasattr(constants, "ENABLE_RAY_CLUSTER"):  # a Ray without the switch: leave it alone
        return
    if on:
        _saved.setdefault("ENABLE_RAY_CLUSTER", constants.ENABLE_RAY_CLUSTER)
        constants.ENABLE_RAY_CLUSTER = False
    elif "ENABLE_RAY_CLUSTER" in _saved:
        constants.ENABLE_RAY_CLUSTER = _saved.pop("ENABLE_RAY_CLUSTER")


def _quiet_libraries(on: bool) -> None:
    for name in CHATTY_LIBRARIES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)  # configures its logger now, so that the level set here sticks
        logger = logging.getLogger(name)
        if on:
            _saved.setdefault(("level", name), logger.level)
            if logger.getEffectiveLevel() < logging.WARNING:
                logger.setLevel(logging.WARNING)
        elif ("level", name) in _saved:
            logger.setLevel(_saved.pop(("level", name)))


def quiet_ray_output(verbose: bool, local: bool = True, environ: MutableMapping[str, str] | None = None
                     ) -> dict[str, Any]:
    """Keep Ray's, Tune's, MLflow's and Optuna's start-up notices out of the output (unless `verbose`); returns
    ray.init kwargs.

    Call it before ray.init; `local`: this process starts its own Ray (no --address, no RAY_ADDRESS).
    With `verbose` it undoes what an earlier call did and returns {} (Ray's defaults).
    """
    environ = os.environ if environ is None else environ
    if verbose:
        for key, value in _saved.pop(("env", id(environ)), {}).items():
            if environ.get(key) == value:
                environ.pop(key)
    for key, value in ray_env(verbose).items():
        if key not in environ:
            environ[key] = value
            _saved.setdefault(("env", id(environ)), {})[key] = value
    for name, notice in ((_TOKEN_LOGGER, _token_filter), (_SLOW_LOGGER, _slow_filter),
                         *((_TUNE_LOGGER, f) for f in _tune_interrupt_filters)):
        logger = logging.getLogger(name)
        if verbose:
            logger.removeFilter(notice)
        elif notice not in logger.filters:
            logger.addFilter(notice)
    _filter_raylet_messages(not verbose)
    _quiet_libraries(not verbose)
    _skip_node_ip_probe(local and not verbose)
    return ray_init_kwargs(verbose)
