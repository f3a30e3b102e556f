"""`kdray COMMAND [args ...]` (or `python -m kdray COMMAND ...`): one entry point for the kdray commands.

`kdray X args` runs exactly what `python -m kdray.X args` runs; each command's --help shows that module form.
"""

from __future__ import annotations

import importlib
import sys

from kdray import __version__

# name -> (module, one line for the command list)
COMMANDS = {
    "sweep": ("kdray.sweep", "the distillation sweep on Ray Tune + Optuna, every trial in MLflow (default: the demo)"),
    "train": ("kdray.train", "distil one student from the job's teacher (--dry-run: validate and print the plan)"),
    "teacher": ("kdray.teacher", "train a job's teacher with cross-entropy and save its weights"),
    "report": ("kdray.report", "a sweep's tables and plots from its MLflow runs"),
    "evaluate": ("kdray.evaluate", "score a checkpoint single- and multi-scale (+ flip); Cityscapes test predictions"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: kdray {{{','.join(COMMANDS)}}} [args ...]", "",
             "Knowledge distillation for semantic segmentation, swept with Ray Tune + Optuna, tracked in MLflow.", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()]
    lines += ["", "`kdray COMMAND --help` shows a command's options; `kdray COMMAND args` is the same as",
              "`python -m kdray.COMMAND args`.", "", "options:", "  -h, --help  show this message and exit",
              "  --version   print kdray's version and exit"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the command named by the first argument; exit with its code (2 for an unknown command)."""
    from kdray.cli import run_main  # light: no torch, Ray or MLflow

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    name, rest = argv[0], argv[1:]
    if name in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if name == "--version":
        print(f"kdray {__version__}")
        sys.exit(0)
    if name not in COMMANDS:
        print(f"kdray: error: unknown command {name!r}; valid commands: {', '.join(COMMANDS)} (see kdray --help)",
              file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    run_main(module.main, rest)


if __name__ == "__main__":
    main()
