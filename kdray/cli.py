"""What the kdray commands share: the job arguments and turning kdray errors into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from kdray.errors import KdrayError

# The demo job and space ship inside the package (package data), so the commands find them from any directory
# and from a wheel; jobs/demo.yaml and search_spaces/demo.yaml in the source tree are links to these files.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_JOB = "kdray/demo/job.yaml"


def demo_file(name: str) -> str:
    """The path of a file of the built-in demo (`job.yaml`, `space.yaml`)."""
    return str(DEMO_DIR / name)


def default_job() -> str:
    """The built-in synthetic demo job, read from the installed package."""
    return demo_file("job.yaml")


class JobParser(argparse.ArgumentParser):
    """An argument parser whose `parse_args` takes options and `key=value` overrides in any order.

    Plain argparse stops filling a `nargs="*"` positional at the first option, so `a=1 --dry-run b=2` is refused
    ("unrecognized arguments: b=2"); `parse_intermixed_args` collects the overrides from anywhere.
    """

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a command that takes `--job JOB` and overrides; options and overrides may interleave."""
    parser = JobParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None,
                        help=f"job YAML (default: the built-in synthetic demo, {DEMO_JOB})")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override job values, e.g. losses.kd.weight=0.5 optim.iterations=200; "
                             "they may come before, between or after the options")
    return parser


def tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tracking-uri` and `--no-tracking`: where a training's MLflow run goes, or that it has none."""
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: the job's tracking.uri, else $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<cwd>/mlflow.db, as a sweep)")
    parser.add_argument("--no-tracking", action="store_true", help="record no MLflow run")


def interrupt(signum, frame) -> None:
    """A signal handler that raises KeyboardInterrupt: SIGTERM then ends a command as Ctrl+C does."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within it, SIGTERM (`kill`) raises KeyboardInterrupt, so a command closes what it opened as on Ctrl+C; the
    handler before it is put back after. A no-op off the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> None:
    """Run a command; a KdrayError becomes one line on stderr and its exit code, not a traceback."""
    try:
        code = main(argv)
    except KdrayError as err:
        print(f"error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)
