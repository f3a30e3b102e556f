"""`python -m kdray.sweep [--job JOB] [--space SPACE] [key=value ...]`: the distillation sweep.

With no argument: the built-in demo (kdray/demo/job.yaml, kdray/demo/space.yaml) on an embedded local Ray and
a local MLflow store, training the demo teacher first if it is missing. On a cluster: `ray up cluster.yaml`,
then the same command on the head node (or `ray job submit -- python -m kdray.sweep ...`).

exit codes:
  0    every trial finished or was stopped early by the scheduler
  1    a trial failed or never started (the summary says which and why; the report lists them)
  2    bad input: the job, an override, the space, the data tree or a weights file (nothing was started)
  3    the cluster cannot run a trial the space can produce (the row or key is named; nothing was started)
  4    its time budget ran out (sweep.time_budget_s): continue with --resume
  130  interrupted (Ctrl+C): continue with --resume
"""

from __future__ import annotations

import signal

from kdray.cli import default_job, demo_file, job_parser, run_main

DEMO_SPACE = "kdray/demo/space.yaml"


def default_space() -> str:
    """The built-in demo search space, read from the installed package."""
    return demo_file("space.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("python -m kdray.sweep", __doc__)
    parser.add_argument("--space", default=None,
                        help=f"search space YAML (default: the built-in demo space, {DEMO_SPACE})")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS if set, else an embedded local Ray)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_DIR",
                        help="continue an interrupted sweep (default: the job's latest)")
    parser.add_argument("--extend", type=int, default=None, metavar="N",
                        help="with --resume: search N more trials of a search sweep (even one that ran to its end) "
                             "from the same Optuna study, then confirm the configurations that are now among the best")
    parser.add_argument("--dry-run", action="store_true", help="validate job, space and resources; print the plan")
    parser.add_argument("--smoke-test", action="store_true",
                        help="check the pipeline (CI): 4 iterations per trial; a search runs at most 2 trials and "
                             "confirms its best one at one seed; the tables say SMOKE TEST")
    parser.add_argument("--train-teacher", action="store_true",
                        help="train the job's teacher first when teacher.checkpoint is missing "
                             "(always on for the built-in demo)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own start-up and status output")
    parser.add_argument("--study-storage", default=None, metavar="URL",
                        help="Optuna storage of a search's study, any database URL Optuna takes (default: "
                             "sqlite:///<the sweep's folder>/optuna.db; open it with optuna-dashboard URL)")
    args = parser.parse_args(argv)

    from kdray.orchestration.record import ui_url
    from kdray.orchestration.sweep import SweepRequest, dry_run, run_sweep, summary_table

    demo = args.job is None
    request = SweepRequest(
        job_path=args.job or default_job(), space_path=args.space or default_space(), overrides=args.overrides,
        address=args.address, tracking_uri=args.tracking_uri, resume=args.resume, dry_run=args.dry_run,
        smoke_test=args.smoke_test, train_teacher=args.train_teacher or demo, verbose=args.verbose,
        study_storage=args.study_storage, extend=args.extend,
    )
    if args.extend is not None and args.resume is None:
        parser.error("--extend N adds trials to an existing sweep: name it with --resume [SWEEP_DIR]")
    if args.resume is not None and args.space is not None:
        parser.error("--resume continues a sweep with the space it started with (a copy is kept in its folder); "
                     "--space is refused here: start a new sweep to use another space")
    if args.dry_run:
        print("\n".join(dry_run(request)))
        return 0
    # `kill` (SIGTERM) ends the sweep as Ctrl+C does past Tune's graceful stop: the runs it opened are closed
    signal.signal(signal.SIGTERM, _interrupt)
    outcome = run_sweep(request)
    ended = ("stopped by its time budget" if outcome.budget_spent else "interrupted") if outcome.interrupted \
        else "ended"
    print(f"\nsweep {outcome.sweep_id} {ended} after {outcome.wall_s:.0f} s: {outcome.counts()}; ranked by how far "
          f"each ran, then its last {outcome.metric}:\n")
    print(summary_table(outcome))
    if outcome.report_markdown:
        print(f"\n{outcome.report_markdown}\nreport files: {outcome.sweep_dir / 'report'}")
    if outcome.verdict:  # a confirmed search: the winner by its mean over seeds, and whether its gains are noise
        print(f"\n{outcome.verdict}")
    print(f"\nMLflow: mlflow ui --backend-store-uri {outcome.tracking_uri}   (experiment {outcome.experiment!r})")
    if outcome.experiment_id:
        print(f"  its runs: {ui_url(outcome.tracking_uri, outcome.experiment_id)}")
    if outcome.interrupted:
        print(f"resume with: python -m kdray.sweep --resume {outcome.sweep_dir}")
    return outcome.exit_code


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    run_main(main)
