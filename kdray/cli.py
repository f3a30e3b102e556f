"""What the `python -m kdray.*` commands share: the job arguments and turning kdray errors into exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from kdray.errors import KdrayError

DEMO_JOB = "jobs/demo.yaml"


def default_job() -> str:
    """`jobs/demo.yaml` in the working directory, else the one in the source tree kdray was installed from."""
    here = Path(DEMO_JOB)
    if here.is_file():
        return str(here)
    return str(Path(__file__).resolve().parents[1] / DEMO_JOB)


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=None, help=f"job YAML (default: {DEMO_JOB}, the synthetic demo)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override job values, e.g. losses.kd.weight=0.5 optim.iterations=200")
    return parser


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
