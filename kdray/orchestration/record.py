"""What a kdray run shows in MLflow beside its metrics: its active params, the knobs its sweep varies, its data as
dataset inputs, its description, and, on a sweep's run, its best trial so far. Names from `kdray.contract`.

- **Params** (`active_params`): the flattened job config, less what the run does not use: the options of a
  disabled loss (its `losses.<name>.enabled` stays) and the options of every dataset but `data.dataset`. A
  searched knob is always kept. MLflow's compare view then plots only values that acted on the run.
- **Searched knobs** (`searched_keys`, tag SEARCHED): a search trial's sampled keys, or an ablation (or
  confirmation) row's keys and the seed.
- **Dataset inputs** (`log_datasets`): the training and the evaluation items (`kdray.data.manifest`) as MLflow
  datasets: name `<dataset>/<split>`, digest (the first 16 hex digits of the manifest's SHA-256; MLflow keeps at
  most 36 characters), source (`local` with the data root, or `code` for generated data), and a profile with the
  image count, the split, the source and the whole SHA-256. The input's context tag says `training` or
  `evaluation`, as MLflow's own loggers do.
- **Descriptions** (tag NOTE, Markdown, on the run's page): the method, its loss formula, seed, length and data,
  and where the run belongs (a sweep's stage, with a link to the sweep's run; a single command).
- **The sweep's best trial** (`record_best`): on the sweep's run, metric VAL_BEST_MIOU, tags BEST_RUN, BEST_TRIAL,
  BEST_PARAMS and a paragraph of its description, updated whenever a trial ends.

Links inside a description are the UI's own routes (`#/experiments/<id>/runs/<run id>`), which it resolves
against the page it shows them on. MLflow 3.17's UI opens an experiment in the view its sidebar switch
(GenAI / Model training) holds, GenAI for a browser that never chose: `ui_url` adds `workflowType=machine_learning`,
which opens the run table (the experiment tag `mlflow.experimentKind`, set by `Tracker`, is not read by that UI).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import TYPE_CHECKING, Any

from kdray import contract
from kdray.config import Job, flatten, to_dict
from kdray.errors import KdrayError
from kdray.space import ROW_KEY, SEED_KEY, SearchSpace

if TYPE_CHECKING:
    from kdray.config.schema import DataConfig, LossesConfig
    from kdray.data.manifest import SplitManifest
    from kdray.orchestration.tracking import Tracker

_DIGEST_CHARS = 16  # of the SHA-256 hex, as the MLflow dataset's digest (MLflow refuses more than 36 characters)
_BEST_HEADING = "**Best trial**"  # where a sweep's description gives way to its best-trial paragraph
_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
WORKFLOW_QUERY = "workflowType=machine_learning"  # MLflow 3.17's UI: open in its Model training view


# -- params and searched knobs -------------------------------------------------------------------------------------
def active_params(job: Job, searched: tuple[str, ...] | list[str] = (), role: str = "student") -> dict[str, Any]:
    """The job's flattened config as a run's params, without the options that do not act on the run: those of a
    disabled loss (`losses.<name>.enabled` stays, so the toggle is still a column) and of every dataset section
    but `data.<data.dataset>`; for a teacher's run (`role="teacher"`, trained with CE alone on the whole training
    split) also the student's section, every loss but CE and the tune split. Keys in `searched` are kept
    whatever they are."""
    losses = teacher_losses(job) if role == "teacher" else job.losses
    unused = [f"losses.{name}." for name, cfg in losses.sections().items() if not cfg.enabled]
    unused += [f"data.{name}." for name in job.data.sections() if name != job.data.dataset]
    if role == "teacher":
        unused += ["student.", "data.tune_split."]
    keep = set(searched)

    def used(key: str) -> bool:
        if key in keep or (key.endswith(".enabled") and key.startswith("losses.") and role != "teacher"):
            return True
        return not any(key.startswith(prefix) for prefix in unused)

    flat = flatten(to_dict(job))
    if role == "teacher":
        flat.update(flatten({"losses": to_dict(losses)}))
    return {k: v for k, v in flat.items() if used(k)}


def teacher_losses(job: Job) -> LossesConfig:
    """What a teacher trains with: the job's CE term, enabled, and no other loss (`kdray.engine.loop`)."""
    from kdray.config.schema import LossesConfig

    return LossesConfig(ce=dataclasses.replace(job.losses.ce, enabled=True))


def searched_keys(space: SearchSpace, config: dict[str, Any]) -> list[str]:
    """The config keys a sweep varies in this trial (`config`: the one Tune hands it): a search's sampled knobs
    (its fixed keys aside) in the space's order, or an ablation row's keys (a confirmation row's too) and the
    seed."""
    if space.kind == "ablation":
        return [*space.row_overrides(config[ROW_KEY]), SEED_KEY] if ROW_KEY in config else [SEED_KEY]
    return [d.key for d in space.dimensions if d.kind != "fixed" and d.key in config]


# -- tags ----------------------------------------------------------------------------------------------------------
def run_tags(job: Job) -> dict[str, str]:
    """The tags a student's run carries whatever made it (a sweep's trial, `python -m kdray.train`): its method,
    seed, models and their size, dataset and classes, and what its val/* metrics measure."""
    from kdray.data import class_names
    from kdray.data.tune_split import tune_split_tags
    from kdray.losses.objective import method_label
    from kdray.models import build_model

    student = build_model(job.student.arch, job.data.num_classes, aux=job.student.aux, width=job.student.width)
    tags = {
        contract.METHOD: method_label(job.losses),
        contract.SEED: str(job.run.seed),
        contract.TEACHER_ARCH: contract.arch_label(job.teacher.arch, job.teacher.width),
        contract.STUDENT_ARCH: contract.arch_label(job.student.arch, job.student.width),
        contract.PARAMS_M: f"{sum(p.numel() for p in student.parameters()) / 1e6:.4f}",
        contract.DATASET: job.data.dataset,
        contract.CLASSES: json.dumps(class_names(job.data)),
    }
    tags.update(tune_split_tags(job.data))  # what its val/* metrics measure: val, or the search's tuning split
    return tags


def teacher_tags(job: Job, params_m: float) -> dict[str, str]:
    """The tags of a teacher's run (`params_m`: its size, millions of parameters): the report finds the teacher
    of a sweep by TEACHER_CHECKPOINT."""
    from kdray.data import class_names

    return {contract.KIND: "teacher",
            contract.TEACHER_ARCH: contract.arch_label(job.teacher.arch, job.teacher.width),
            contract.PARAMS_M: f"{params_m:.4f}",
            contract.DATASET: job.data.dataset, contract.SEED: str(job.run.seed),
            contract.TEACHER_CHECKPOINT: str(job.teacher.checkpoint),
            contract.CLASSES: json.dumps(class_names(job.data))}


# -- dataset inputs ------------------------------------------------------------------------------------------------
def dataset_input(manifest: SplitManifest, context: str):
    """The MLflow `DatasetInput` of a manifest, tagged with `context` (contract.DATA_TRAINING / DATA_EVALUATION)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    if manifest.files:
        source_type, source = "local", {"uri": manifest.source}
    else:
        source_type, source = "code", {"tags": {"kdray.dataset": manifest.dataset}}
    profile = {"images": manifest.size, "split": manifest.split, "source": manifest.source,
               "sha256": manifest.digest, "digest of": "image paths" if manifest.files else "generator settings"}
    dataset = Dataset(name=manifest.name, digest=manifest.digest[:_DIGEST_CHARS], source_type=source_type,
                      source=json.dumps(source), profile=json.dumps(profile))
    return DatasetInput(dataset, tags=[InputTag(contract.DATA_CONTEXT, context)])


def log_datasets(tracker: Tracker, run_id: str, data: DataConfig, trained: bool = True) -> str | None:
    """Log what a run with this `data` section trains on (context `training`; not when `trained` is False: a
    teacher only scored) and evaluates on (`evaluation`) as the run's dataset inputs. Returns None, or why they
    were not logged: a split that cannot be opened here (the run itself then fails with the data's own error)
    never stops a run."""
    from kdray.data.manifest import split_manifest
    from kdray.orchestration.tracking import retrying

    try:
        inputs = [dataset_input(split_manifest(data, "train"), contract.DATA_TRAINING)] if trained else []
        inputs.append(dataset_input(split_manifest(data, "val"), contract.DATA_EVALUATION))
        retrying(lambda: tracker.client.log_inputs(run_id, datasets=inputs))
    except Exception as err:  # an optional record of the data
        why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        logging.getLogger(__name__).warning("the dataset inputs of run %s were not logged: %s", run_id, why)
        return why
    return None


# -- descriptions --------------------------------------------------------------------------------------------------
def ui_route(experiment_id: str, run_id: str | None = None) -> str:
    """The UI's route of an experiment's run table, or of one run, in its Model training view:
    `#/experiments/<id>/runs[/<run id>]?workflowType=machine_learning` (a description's link opens in a new tab,
    which would otherwise show the GenAI view)."""
    return f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "") + f"?{WORKFLOW_QUERY}"


def ui_url(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The address of the experiment's run table (or of one run) in the MLflow UI, in its Model training view:
    the tracking server itself for an http(s) URI, else where `mlflow ui` serves by default."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else _UI
    return f"{base}/{ui_route(experiment_id, run_id)}"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def loss_formula(losses: LossesConfig, searched: tuple[str, ...] | list[str] = ()) -> str:
    """`L = 1·CE + 3.2·KD (KD: temperature=4)`: each enabled loss's weight and label, then the options of each that
    differ from the loss's defaults or that the sweep searched (`searched`: config keys), weights aside."""
    from kdray.losses.registry import LOSSES

    enabled = losses.enabled()
    terms = " + ".join(f"{cfg.term_weight():g}·{LOSSES[name].label}" for name, cfg in enabled.items())
    details = []
    for name, cfg in enabled.items():
        default = type(cfg)()
        shown = [f"{f.name}={_number(getattr(cfg, f.name))}" for f in dataclasses.fields(cfg)
                 if f.name not in ("enabled", "weight")
                 and (getattr(cfg, f.name) != getattr(default, f.name) or f"losses.{name}.{f.name}" in searched)]
        if shown:
            details.append(f"{LOSSES[name].label}: {', '.join(shown)}")
    return f"L = {terms or '0'}" + (f" ({'; '.join(details)})" if details else "")


def model_phrase(job: Job, role: str = "student") -> str:
    """`KD+I2CKD student deeplabv3_resnet18 (width 0.125) distilled from deeplabv3_resnet18 (width 0.5)`, `CE-only
    student ...`, or `teacher deeplabv3_resnet101` for a teacher's run."""
    from kdray.losses.objective import method_label

    def model(arch: str, width: float) -> str:
        return f"{arch}" + (f" (width {width:g})" if width != 1 else "")

    if role == "teacher":
        return f"teacher {model(job.teacher.arch, job.teacher.width)}"
    student = model(job.student.arch, job.student.width)
    if not job.distills:
        return f"CE-only student {student}"
    return f"{method_label(job.losses)} student {student} distilled from {model(job.teacher.arch, job.teacher.width)}"


def data_phrase(job: Job, role: str = "student") -> str:
    """`on synthetic/train, scored on synthetic/val`, or on the tune split (a teacher: never the tune split)."""
    from kdray.data import split_name
    from kdray.data.tune_split import tune_split_on

    d = job.data
    train = f"{d.dataset}/{split_name(d, 'train')}"
    if role == "student" and tune_split_on(d):
        return f"on {train} less its tune split ({100 * d.tune_split.fraction:g}%), scored on that tune split"
    return f"on {train}, scored on {d.dataset}/{split_name(d, 'val')}"


def run_note(job: Job, role: str, where: str, searched: tuple[str, ...] | list[str] = ()) -> str:
    """A run's description: what it trains, with which objective, seed, length and data, then `where` (the
    sentence saying what the run belongs to, without its final period)."""
    iterations = job.teacher_iterations if role == "teacher" else job.optim.iterations
    objective = loss_formula(teacher_losses(job) if role == "teacher" else job.losses, searched)
    return (f"**{model_phrase(job, role)}**: {objective}; seed {job.run.seed}, {iterations} iterations "
            f"{data_phrase(job, role)}. {where}.")


def stage_phrase(tags: dict[str, str]) -> str:
    """What a trial is in its sweep, from its tags: `search stage`, `confirmation stage (re-runs search trial x,
    rank 1)`, `confirmation stage (the CE-only baseline)` or `ablation row KD`."""
    stage = tags.get(contract.STAGE)
    if stage == contract.STAGE_SEARCH:
        return "search stage"
    if stage == contract.STAGE_CONFIRM:
        if contract.CONFIRMS in tags:
            return (f"confirmation stage (re-runs search trial {tags[contract.CONFIRMS]}, rank "
                    f"{tags.get(contract.SEARCH_RANK, '?')} of the search)")
        return "confirmation stage (the CE-only baseline)"
    return f"ablation row {tags[contract.ROW]}" if contract.ROW in tags else "trial"


def trial_note(job: Job, tags: dict[str, str], searched: list[str], sweep_id: str, trial_id: str,
               experiment_id: str, parent_run_id: str) -> str:
    """A trial's description: `run_note` placed in its sweep's stage, with a link to the sweep's run."""
    link = f"[sweep {sweep_id}]({ui_route(experiment_id, parent_run_id)})"
    return run_note(job, "student", f"Trial {trial_id}, {stage_phrase(tags)} of {link}", searched)


def append_note(tracker: Tracker, run_id: str, sentence: str) -> None:
    """Add `sentence` to the end of the run's description (once: a sentence already there is not repeated)."""
    note = tracker.tags(run_id).get(contract.NOTE, "")
    if sentence not in note:
        tracker.set_tags(run_id, {contract.NOTE: f"{note} {sentence}".strip()})


def sweep_note(job: Job, space: SearchSpace, sweep_id: str, report_dir: str, planned: int,
               teacher: str | None = None, ended: str | None = None) -> str:
    """A sweep's description (Markdown paragraphs): a line naming its job, data, space and planned trial count;
    where its report is written (once it ended, `ended`: its trials' counts, "6 finished, 3 stopped early"); its
    plan as `--dry-run` states it (space, kind, stages, sampler and scheduler); where its teacher comes from.
    `record_best` puts the best trial's paragraph second: MLflow's run page shows a description's first lines."""
    from kdray.orchestration.confirm import describe
    from kdray.space import plan_lines

    when = f"Ended: {ended}." if ended else "Written when the sweep ends."
    lines = [f"**Sweep {sweep_id}** of job `{job.name}` ({job.data.dataset}): space `{space.name}`, a {space.kind}, "
             f"{planned} trial(s) planned.", "",
             f"Report: `{report_dir}` (report.md, tables and plots), also this run's artifacts under "
             f"`{contract.REPORT_ARTIFACT_DIR}/`. {when}", "", "Plan:", ""]
    try:
        plan = plan_lines(space, job)
    except KdrayError:  # a row's formula re-reads the job's plugin files, which this process may no longer reach
        plan = [f"space {space.name} ({space.kind}): {space.trial_count} trials, metric {space.metric} "
                f"({space.mode})", *(f"row {name!r}: {settings or '(the job as it is)'}" for name, settings in
                                     space.rows)]
    lines += [f"- {line.strip()}" for line in plan]
    if space.kind == "search":
        lines.append(f"- {describe(space, job)}")
    if teacher:
        lines += ["", f"Teacher: {teacher}."]
    return "\n".join(lines)


# -- the sweep's best trial ----------------------------------------------------------------------------------------
def _shown(text: str) -> str:
    """A param as logged, for a sentence: a number to 4 significant digits, anything else as it is."""
    try:
        number = float(text)
    except ValueError:
        return text
    return text if text.lstrip("-").isdigit() else f"{number:.4g}"


def record_best(tracker: Tracker, sweep_id: str, parent_run_id: str) -> str | None:
    """Give the sweep's run its best trial so far and return that trial's run id (None while no trial finished).

    The best trial is the trial run with the highest `val/best_miou` among those that ran to their end (FINISHED,
    not stopped early); a search sweep's confirmation trials (scored on val) rank before its search trials (scored
    on a tune split, when it has one) as soon as one of them finished. Its value is logged as the sweep run's
    VAL_BEST_MIOU (step: how many trials have finished), its run and trial ids and its SEARCHED knobs' values as
    tags, and the description's best-trial paragraph (its second, after the heading line) is rewritten with a
    link to its run."""
    from kdray.orchestration.tracking import retrying

    query = (f"tags.`{contract.SWEEP_ID}` = '{sweep_id}' and tags.`{contract.KIND}` = 'trial' "
             "and attributes.status = 'FINISHED'")
    runs = retrying(lambda: tracker.client.search_runs([tracker.experiment_id], filter_string=query,
                                                       max_results=5000))
    done = [r for r in runs if r.data.tags.get(contract.STOPPED_EARLY) != "true"
            and math.isfinite(r.data.metrics.get(contract.VAL_BEST_MIOU, math.nan))]
    if not done:
        return None
    confirmed = [r for r in done if r.data.tags.get(contract.STAGE) == contract.STAGE_CONFIRM]
    best = max(confirmed or done, key=lambda r: r.data.metrics[contract.VAL_BEST_MIOU])
    tags, value = best.data.tags, best.data.metrics[contract.VAL_BEST_MIOU]
    knobs = [k for k in tags.get(contract.SEARCHED, "").split(",") if k]
    params = {k: best.data.params[k] for k in knobs if k in best.data.params}
    tracker.run_logger(parent_run_id).log_metrics({contract.VAL_BEST_MIOU: value}, len(done))
    scored = "the tune split" if tags.get(contract.EVAL_SPLIT) == "tune" else tags.get(contract.EVAL_SPLIT, "val")
    label = tags.get(contract.ROW) or tags.get(contract.METHOD, "?")
    shown = ", ".join(f"`{k}` = {_shown(v)}" for k, v in params.items())
    paragraph = (f"{_BEST_HEADING} (of {len(done)} finished): [trial {tags.get(contract.TRIAL_ID, '?')}]"
                 f"({ui_route(tracker.experiment_id, best.info.run_id)}), {label}, {stage_phrase(tags)}: best "
                 f"val/miou {100 * value:.2f}% on {scored}" + (f"; {shown}" if shown else "") + ".")
    note = tracker.tags(parent_run_id).get(contract.NOTE, "")
    paragraphs = [p for p in note.split("\n\n") if p.strip() and not p.startswith(_BEST_HEADING)]
    note = "\n\n".join([*paragraphs[:1], paragraph, *paragraphs[1:]])
    tracker.set_tags(parent_run_id, {contract.BEST_RUN: best.info.run_id,
                                     contract.BEST_TRIAL: tags.get(contract.TRIAL_ID, ""),
                                     contract.BEST_PARAMS: json.dumps(params), contract.NOTE: note})
    return best.info.run_id
