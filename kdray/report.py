"""`python -m kdray.report --experiment NAME [--sweep ID]`: a sweep's tables and plots from its MLflow runs.

Writes the ablation table, the method comparison, the search summary (search sweeps), per-class IoU and the
runs left out of the means, as Markdown, LaTeX (booktabs), CSV or Parquet, plus PNG plots, to --out; logs them
on the sweep's parent run under `report/`; prints the Markdown.

examples:
  python -m kdray.report --experiment demo
  python -m kdray.report --experiment demo --sweep 20261122-0501-ab12 --value best --format md,tex,csv
"""

from __future__ import annotations

import argparse

from kdray.cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdray.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the job's name)")
    parser.add_argument("--sweep", default=None, help="sweep id (tag kdray.sweep_id; default: the latest sweep)")
    parser.add_argument("--format", action="append", default=None, metavar="FMT",
                        help="md|tex|csv|parquet; repeat or comma-separate for several (default: md)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/<experiment>/<sweep id>)")
    parser.add_argument("--value", choices=("last", "best"), default="last",
                        help="which evaluation of each run a cell shows: the last (default) or the best one")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--top-k", type=int, default=10, help="trials in the search summary (default: 10)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--no-log", action="store_true", help="do not log the files on the sweep's parent run")
    args = parser.parse_args(argv)
    from kdray.reporting import default_tracking_uri, write_report  # mlflow, optuna, matplotlib: seconds to import

    formats = [f.strip() for spec in (args.format or ["md"]) for f in spec.split(",") if f.strip()]
    result = write_report(args.tracking_uri or default_tracking_uri(), args.experiment, args.sweep, args.out,
                          value=args.value, formats=formats, plots=not args.no_plots, log_artifacts=not args.no_log,
                          top_k=args.top_k)
    print(result.markdown)
    logged = "" if args.no_log else f"; logged under report/ of run {result.sweep_run_id}"
    print(f"wrote {len(result.files)} files to {result.out_dir}{logged}")
    return 0


if __name__ == "__main__":
    run_main(main)
