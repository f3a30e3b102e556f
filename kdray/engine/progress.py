"""A compact progress display for the main rank: one updating line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, iteration: int, text: str) -> None:
        if not self.enabled:
            return
        done = iteration - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - iteration) if done else 0.0
        width = 20
        filled = int(width * iteration / self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {iteration}/{self.total} {text} "
                f"| {_duration(elapsed)} elapsed, eta {_duration(eta)}")
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()
