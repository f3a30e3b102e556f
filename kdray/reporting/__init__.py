"""Tables and plots of a sweep from its MLflow runs: the report layer (the only one, with orchestration, that
imports mlflow and optuna).

    runs.py        MLflow -> Arrow: the sweep's runs, the teacher runs, the val/miou histories
    groups.py      group runs, mean ± sample std over finished runs; what counts as finished
    table.py       the Table type (cells, caption, notes, numbers) and cell formatting
    costs.py       what a row's runs cost (GFLOPs, latency, time, memory): the cost columns and their notes
    tables.py      ablation, methods, per-class IoU, excluded runs
    confirmed.py   the search summary of a search's confirmation stage
    pareto.py      the Pareto front of mIoU against GFLOPs and latency
    space.py       the knobs a sweep varied, recovered from the runs' params
    importance.py  PED-ANOVA parameter importance on a study rebuilt from the runs
    search.py      best trial, top-k, importance tables of a search sweep
    plots.py       PNG figures
    qualitative.py the preview images predicted by each method's best run (the papers' qualitative figure)
    render.py      Markdown, LaTeX, CSV, Parquet
    write.py       `write_report`, what `python -m kdray.report` and the sweep call
"""

from kdray.reporting.runs import SweepData, default_tracking_uri, read_sweep
from kdray.reporting.table import Table
from kdray.reporting.write import FORMATS, ReportResult, build_tables, write_report

__all__ = ["FORMATS", "ReportResult", "SweepData", "Table", "build_tables", "default_tracking_uri", "read_sweep",
           "write_report"]
