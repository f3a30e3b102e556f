"""`python -m kdray.report --experiment NAME [--sweep ID]`: a sweep's tables and plots from its MLflow runs.

Writes the ablation table, the method comparison, the Pareto front of mIoU against GFLOPs and latency (when the
runs logged costs), the search summary (search sweeps), per-class IoU and the runs left out of the means, as
Markdown, LaTeX (booktabs), CSV or Parquet, plus PNG plots (with qualitative.png: the preview images predicted by
each method's best run), to --out, and prints the Markdown. It only reads MLflow; with --log it also logs the files
on the sweep's parent run under `report/`.
Without --sweep it reports the latest sweep that is not a smoke test (--smoke-test sweeps: name them).

examples:
  python -m kdray.report --experiment demo
  python -m kdray.report --experiment demo --sweep 20261122-0501-ab12 --value best --format md,tex,csv --log
"""

from __future__ import annotations

import argparse
import sys

from kdray.cli import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdray.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment (the job's name)")
    parser.add_argument("--sweep", default=None,
                        help="sweep id (tag kdray.sweep_id; default: the latest sweep that is not a smoke test)")
    parser.add_argument("--format", action="append", default=None, metavar="FMT",
                        help="md|tex|csv|parquet; repeat or comma-separate for several (default: md)")
    parser.add_argument("--out", default=None, help="output folder (default: reports/<experiment>/<sweep id>)")
    parser.add_argument("--value", choices=("last", "best"), default="last",
                        help="which evaluation of each run a cell shows: the last (default) or the best one")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--top-k", type=int, default=10, help="trials in the search summary (default: 10)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    parser.add_argument("--log", action="store_true",
                        help="also log the files on the sweep's parent run under report/ (default: write files only)")
    args = parser.parse_args(argv)
    from kdray.contract import resolve_tracking_uri
    from kdray.reporting import default_tracking_uri, write_report  # mlflow, optuna, matplotlib: seconds to import

    formats = [f.strip() for spec in (args.format or ["md"]) for f in spec.split(",") if f.strip()]
    uri = resolve_tracking_uri(args.tracking_uri) if args.tracking_uri else default_tracking_uri()
    print(f"MLflow store: {uri} (experiment {args.experiment!r}; read only{', --log writes' if args.log else ''})",
          file=sys.stderr)
    result = write_report(uri, args.experiment, args.sweep, args.out,
                          value=args.value, formats=formats, plots=not args.no_plots, log_artifacts=args.log,
                          top_k=args.top_k)
    print(result.markdown)
    logged = f"; logged under report/ of run {result.sweep_run_id}" if args.log else ""
    print(f"wrote {len(result.files)} files to {result.out_dir}{logged}")
    return 0


if __name__ == "__main__":
    run_main(main)
