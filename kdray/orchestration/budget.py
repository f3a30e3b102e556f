"""A sweep's wall-clock budget (`sweep.time_budget_s`): when it runs out, the sweep stops as Ctrl+C stops it.

The deadline is fixed when the sweep's teacher and trials start (`start_budget`). A stage that would begin after
it does not begin; inside a stage, `TimeBudget` (a Tune callback, run on the driver's main thread before each of
Tune's steps) sees the deadline pass and calls the process's SIGINT handler, as a Ctrl+C would: `InterruptWatch`
notes the interruption and Tune ends gracefully, saving its state, so the running trials keep their checkpoints
and `--resume` continues them. `BUDGET_SPENT` tells the sweep's outcome why it stopped (exit code 4, not 130).

Tune's own `TuneConfig(time_budget_s=...)` is not used: it ends every trial TERMINATED (the pending ones too), so
nothing would be left to resume and a cut trial could not be told from one the scheduler stopped.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray.tune

BUDGET_SPENT = threading.Event()  # set when a sweep's time budget stopped it (cleared when a sweep starts)


@dataclass(frozen=True)
class Deadline:
    """When a sweep's budget runs out, on `clock` (monotonic seconds); `at` is inf without a budget."""

    budget_s: float
    at: float
    clock: Callable[[], float] = time.monotonic

    @property
    def passed(self) -> bool:
        return self.clock() >= self.at

    def left_s(self) -> float:
        """Seconds left (inf without a budget, 0 once passed)."""
        return max(0.0, self.at - self.clock())


_current = Deadline(0.0, math.inf)  # this process's sweep's; callbacks read it (a restored Tune run has old ones)


def start_budget(budget_s: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
    """Start this process's sweep budget: `budget_s` seconds from now (none for 0); returns the deadline.
    ValueError for a negative or non-finite budget."""
    global _current
    if not (math.isfinite(budget_s) and budget_s >= 0):
        raise ValueError(f"sweep.time_budget_s: got {budget_s!r}; expected a finite number >= 0")
    BUDGET_SPENT.clear()
    _current = Deadline(budget_s, clock() + budget_s if budget_s else math.inf, clock)
    return _current


def current_deadline() -> Deadline:
    return _current


class TimeBudget(ray.tune.Callback):
    """Stops the Tune run as Ctrl+C does once this process's sweep deadline has passed (once per Tune run; see the
    module docstring). It holds no deadline of its own: Tune pickles callbacks with an experiment, and a resumed
    sweep's budget starts afresh in the resuming process."""

    def __init__(self):
        self._fired = False

    def __getstate__(self) -> dict:  # a restored Tune run watches afresh
        return {}

    def __setstate__(self, state: dict) -> None:
        self._fired = False

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._fired or not _current.passed:
            return
        if threading.current_thread() is not threading.main_thread():
            return  # a signal handler acts from the main thread only (Tune's loop runs there in a sweep)
        from kdray.orchestration.trial import INTERRUPTED

        self._fired = True
        BUDGET_SPENT.set()
        INTERRUPTED.set()  # what every part of the sweep reads as "cut short, resumable"
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):  # Tune's (or InterruptWatch's around it): Tune ends the run gracefully
            handler(signal.SIGINT, None)
        else:  # no handler at all: as Python's default would
            raise KeyboardInterrupt
