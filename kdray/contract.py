"""The run contract: the names kdray writes and `kdray.report` reads, and the evaluation the engine hands up.

Below every layer (plain Python, nothing from kdray but its errors), so that the engine, orchestration and the
report all spell a metric or a tag the same way and none of them imports another to learn it.

MLflow layout:

    experiment  = the job's name (or tracking.experiment); tag EXPERIMENT_KIND = EXPERIMENT_KIND_TRAINING
    sweep run   = parent, one per `python -m kdray.sweep`         tags: KIND=sweep, SWEEP_ID, SPACE, SPACE_KIND, ...
                  metric VAL_BEST_MIOU (the best trial's, step = trials ended), tags BEST_RUN, BEST_TRIAL, BEST_PARAMS
    trial runs  = children (mlflow.parentRunId = sweep run)  tags: KIND=trial, SWEEP_ID, TRIAL_ID, METHOD, SEED, ...
    teacher run = the teacher's own training, when kdray did it    tags: KIND=teacher, TEACHER_ARCH, PARAMS_M
                  (a sweep's: not nested under its run; TRAINED_FOR_SWEEP names the sweep)
    train run   = one `python -m kdray.train`                      tags: KIND=train, laid out as a trial

Every run has a description (NOTE) and, where it trained or evaluated, dataset inputs (DATA_CONTEXT: training,
evaluation). Params of a run are its active job config, flattened (`losses.kd.weight`, ...): a disabled loss's
options and the options of datasets other than data.dataset are left out (each loss's `enabled` stays); SEARCHED
names the knobs its sweep varies. Metrics carry the iteration as step.
Status: FINISHED, also for trials the scheduler stopped early (STOPPED_EARLY=true, STOPPED_AT); KILLED for runs
that were interrupted (Ctrl+C, a sweep's time budget: resumable); FAILED with the reason in FAILURE.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdray.errors import ConfigError

# tags
KIND = "kdray.kind"  # sweep | trial | teacher | train
SWEEP_ID = "kdray.sweep_id"
SPACE = "kdray.space"  # the search space's name
SPACE_KIND = "kdray.space_kind"  # search | ablation
METRIC = "kdray.metric"  # the metric the sweep optimises (val/miou)
MODE = "kdray.mode"  # max | min
GIT_COMMIT = "kdray.git_commit"
VERSION = "kdray.version"
TRIAL_ID = "kdray.trial_id"
METHOD = "kdray.method"  # CE, KD, KD+I2CKD, ...: the enabled distillation terms
ROW = "kdray.row"  # the ablation row's name (ablation sweeps only)
ROW_INDEX = "kdray.row_index"  # its position in the space's list of rows
CLASSES = "kdray.classes"  # JSON list of the class names, in class-id order
SEED = "kdray.seed"
TEACHER_ARCH = "kdray.teacher_arch"  # arch, with "@<width>x" when the width multiplier is not 1
STUDENT_ARCH = "kdray.student_arch"
PARAMS_M = "kdray.params_m"  # the trained model's parameters, millions (the student's for a trial)
TEACHER_PARAMS_M = "kdray.teacher_params_m"
TEACHER_CHECKPOINT = "kdray.teacher_checkpoint"  # teacher runs: the file they produced or scored; sweep runs: theirs
DATASET = "kdray.dataset"
FORMULA = "kdray.formula"  # "Loss = 1 * CE + 1 * KD + ..."
RESUMED_FROM = "kdray.resumed_from"  # the iteration a restarted trial last continued from (worker or sweep restart)
STOPPED_EARLY = "kdray.stopped_early"  # "true" when the scheduler stopped the trial
# With STOPPED_EARLY: the iteration of the last evaluation the scheduler saw before it stopped the trial. Workers keep
# training until the stop reaches them, so the run may have logged later evaluations: they are not its record.
STOPPED_AT = "kdray.stopped_at"
# The iteration a run's own time budget (optim.time_budget_s) ended it at: the run is complete (FINISHED) there.
TIME_BUDGET_STOP = "kdray.time_budget.stopped_at"
FAILURE = "kdray.failure"  # why a FAILED run failed
PARENT = "mlflow.parentRunId"
SMOKE_TEST = "kdray.smoke_test"  # "true" on the sweep (and teacher) run of a --smoke-test sweep: not a result
NOT_STARTED = "kdray.not_started"  # "true" on the run of a trial that never started (status FAILED or KILLED)
TRIALS_PLANNED = "kdray.trials_planned"  # on the sweep run: how many trials its space makes (rows x seeds, samples)
STUDY_STATES = "kdray.study_states"  # on a search's sweep run: "COMPLETE=4 PRUNED=2" as the Optuna study ended
STUDY_STORAGE = "kdray.study_storage"  # on a search's sweep run: the Optuna storage URL holding its study
MATCH = "kdray.match"  # on a matched ablation's sweep run: each row's measured s/iteration and iterations, JSON
SAMPLER_TAG_PREFIX = "kdray.sampler."  # on a search's sweep run: the Optuna sampler and each of its settings
STAGE = "kdray.stage"  # a search sweep's trial runs: search (sampled by Optuna) | confirm (rows x seeds, after it)
STAGE_SEARCH, STAGE_CONFIRM = "search", "confirm"  # its values
CONFIRMS = "kdray.confirms"  # a confirmation run: the trial id of the search trial whose configuration it re-runs
SEARCH_RANK = "kdray.search_rank"  # a confirmation run: that configuration's rank in the search (1 = best)
SEARCH_SCORE = "kdray.search_score"  # a confirmation run: the value the search scored it on (a fraction for mIoU)
SEARCH_ITERATION = "kdray.search_iteration"  # a confirmation run: how far the search ran that configuration
# data.tune_split (kdray.data.tune_split): the held-out part of the training split a run evaluates on instead of val
TUNE_SPLIT_DIGEST = "kdray.tune_split.digest"  # sha256 hex of the held-out images' ids: same digest, same images
TUNE_SPLIT_SIZE = "kdray.tune_split.size"  # how many training-split images were held out and evaluated on
TUNE_SPLIT_TRAIN_SIZE = "kdray.tune_split.train_size"  # how many training-split images were left to train on
EVAL_SPLIT = "kdray.eval_split"  # what the val/* metrics measure: "tune", or the name of the val split
SEARCHED = "kdray.searched"  # a trial's: the config keys its sweep varies (sampled knobs, or its row's keys and the
#   seed), comma-separated in the space's order: the columns worth comparing across its runs
TRAINED_FOR_SWEEP = "kdray.trained_for_sweep"  # a teacher run a sweep trained: that sweep's id (it is not nested
#   under the sweep's run: the teacher serves every later sweep of the same settings)
BEST_RUN = "kdray.best.run_id"  # on a sweep's run: its best trial's run id (see VAL_BEST_MIOU there)
BEST_TRIAL = "kdray.best.trial_id"  # ... that trial's id
BEST_PARAMS = "kdray.best.params"  # ... its SEARCHED knobs' values, JSON {config key: value as logged}
OUTPUT_DIR = "kdray.output_dir"  # a `kdray.train` / `kdray.teacher` run's output folder (absolute): its resume
# MLflow's own names kdray sets
NOTE = "mlflow.note.content"  # a run's description (Markdown), shown on its page
EXPERIMENT_KIND = "mlflow.experimentKind"  # the experiment's kind, as MLflow's UI writes it from its kind selector
EXPERIMENT_KIND_TRAINING = "custom_model_development"  # "Machine learning" (model training), not GenAI
DATA_CONTEXT = "mlflow.data.context"  # a dataset input's tag: what the run did with it
DATA_TRAINING, DATA_EVALUATION = "training", "evaluation"  # its values


def arch_label(arch: str, width: float) -> str:
    """`deeplabv3_resnet18`, or `deeplabv3_resnet18@0.125x` for a width-reduced variant."""
    return arch if width == 1 else f"{arch}@{width:g}x"


# metrics (step = iteration)
ITERATION = "iteration"  # not an MLflow metric (it is the step); the key Tune's results and ASHA order by
ITERATIONS_TOTAL = "iterations_total"  # with every Tune result: how far the trial would go
# On the Tune result of the evaluation a run's own time budget (optim.time_budget_s) ended it at: 1.0. That run is
# complete there: its ITERATIONS_TOTAL is the iteration reached (short of optim.iterations).
TIME_BUDGET_REACHED = "time_budget_reached"
VAL_MIOU = "val/miou"
VAL_BEST_MIOU = "val/best_miou"  # the best val/miou of the run so far, this evaluation included
VAL_PIXEL_ACC = "val/pixel_acc"
VAL_IOU_PREFIX = "val/iou/"  # + class name, made loggable (iou_metric_key)
# A run's best weights scored once more at its end with data.eval_scales / data.eval_flip (softmax scores averaged
# over the scales and mirror images, `kdray.engine.multiscale`); the name says which, `miou_metric_key` picks it.
# VAL_MIOU stays the single-scale score every evaluation reports and runs select on.
VAL_MIOU_MS = VAL_MIOU + "_ms"  # scales other than [1.0], no flip
VAL_MIOU_FLIP = VAL_MIOU + "_flip"  # scale 1 and its mirror image
VAL_MIOU_MS_FLIP = VAL_MIOU + "_ms_flip"  # both: the papers' "MS + flip"
TRAIN_LOSS_PREFIX = "train/loss/"  # + term name (ce, kd, i2ckd, ..., total)
TRAIN_LOSS_TOTAL = TRAIN_LOSS_PREFIX + "total"
TRAIN_LR = "train/lr"
TRAIN_IMAGES_PER_S = "train/images_per_s"
# What a trial costs (logged once the cost is known; the student's at the start, training's at each evaluation):
STUDENT_PARAMS = "student/params"  # the student's parameters (a count)
STUDENT_GFLOPS = "student/gflops"  # one forward pass of one image at the job's evaluation size, 1e9 FLOPs (a
#   multiply-add counts 2, torch.utils.flop_counter's convention; papers' "FLOPs" are often multiply-adds: half)
STUDENT_LATENCY_MS = "student/latency_ms"  # inference of one image (batch 1), the trial's device and precision,
#   median of timed runs after warm-up, milliseconds
TRAIN_S_PER_ITERATION = "train/s_per_iteration"  # wall seconds per training iteration (the whole step, all ranks)
TRAIN_DEVICE_SECONDS = "train/device_seconds"  # device time the run spent so far: GPU-seconds (wall x GPUs) with
#   GPUs, else CPU-seconds (the processes' CPU time, summed over ranks)
TRAIN_PEAK_MEMORY_MIB = "train/peak_memory_mib"  # peak device memory of a rank (GPU: allocated; CPU: resident), MiB
TRAIN_TEACHER_SHARE = "train/teacher_share"  # the teacher forward's fraction of the step's wall time (0..1)
COST_METRICS = (STUDENT_PARAMS, STUDENT_GFLOPS, STUDENT_LATENCY_MS, TRAIN_S_PER_ITERATION, TRAIN_DEVICE_SECONDS,
                TRAIN_PEAK_MEMORY_MIB, TRAIN_TEACHER_SHARE)
COST_DEVICE = "kdray.cost.device"  # tag: where the costs were measured (cpu, or the GPU's name), with the precision
# What each evaluation reports to Tune (with ITERATION and ITERATIONS_TOTAL): the metrics a search space can
# optimise and ASHA can compare. Everything else (per-class IoU, training terms) goes to MLflow only.
TUNE_METRICS = (VAL_MIOU, VAL_PIXEL_ACC)

# artifacts
JOB_ARTIFACT = "config/job.yaml"
SPACE_ARTIFACT = "config/space.yaml"
BEST_CHECKPOINT_ARTIFACT_DIR = "checkpoints"  # holds best_student.pt
REPORT_ARTIFACT_DIR = "report"  # the tables and plots on the sweep run
# What a run shows of its predictions (data.preview_images val images, the same for every run of a job):
PREDICTIONS_IMAGE_KEY = "predictions"  # MlflowClient.log_image key, one image per evaluation, step = iteration:
#   rows image | ground truth | student | teacher (distilling runs) | errors (`kdray.rendering.render_predictions`)
BEST_PREDICTIONS_FILE = "best_predictions.npz"  # the best evaluation's previews and class-id predictions
#   (`kdray.rendering.write_predictions`), written to the run's output folder and logged under:
PREDICTIONS_ARTIFACT_DIR = "predictions"
QUALITATIVE_FIGURE = "qualitative.png"  # the sweep report's figure: the previews by each method's best run
QUALITATIVE_IMAGE_KEY = "qualitative"  # ... also logged with log_image on the sweep's run (step: the how-many-th log)
STUDENT_MODEL_NAME = "student"  # mlflow.pytorch.log_model name of a trial's best student (a LoggedModel)
MODEL_FAILURE = "kdray.model.failure"  # tag: why the best student could not be logged as an MLflow model

# What a class name may keep in its metric key: MLflow's characters less '/' and ':' (see iou_metric_key).
_REFUSED_IN_CLASS_NAME = re.compile(r"[^\w.\- ]")


def iou_metric_key(class_name: str) -> str:
    r"""The MLflow metric name a class's IoU is logged under: "val/iou/" + the class name, made loggable.

    MLflow 3 accepts a metric name only if it matches `^[/\w.\- :]*$` (Unicode letters, digits and '_', then
    '.', '-', ' ', ':', '/'; ':' refused on Windows), and only if `posixpath.normpath` leaves it unchanged and
    it neither starts with '/' nor '..'. So it refuses "(", ")", "+", "," and "'", among others. Here every
    character of `class_name` other than a word character, '.', '-' or ' ' becomes '_': also '/' (a class
    name is one segment: "tv/monitor" would otherwise nest under "val/iou/tv" and, in MLflow's file store,
    collide with a class "tv") and ':' (so the key is the same whatever platform logs it). A name that would
    vanish as a path segment ("", ".", "..") becomes as many '_' (one for ""). Names made only of accepted
    characters are unchanged: "traffic light" -> "val/iou/traffic light", "crack (large)" ->
    "val/iou/crack _large_", "person+rider" -> "val/iou/person_rider", "tv/monitor" -> "val/iou/tv_monitor".
    Distinct names can map to the same key ("a(b", "a)b"). MLflow also caps names at 250 characters, which a
    class name longer than 242 still exceeds.
    """
    name = _REFUSED_IN_CLASS_NAME.sub("_", class_name)
    if name in ("", ".", ".."):
        name = "_" * max(len(name), 1)
    return VAL_IOU_PREFIX + name


def protocol_suffix(scales: tuple[float, ...], flip: bool) -> str:
    """How an evaluation's scores are averaged, as a metric-name suffix: "" for one pass at scale 1 (the plain
    val/miou), "_ms" when `scales` is anything but (1.0,), "_flip" with mirror images, "_ms_flip" for both."""
    return ("_ms" if tuple(scales) != (1.0,) else "") + ("_flip" if flip else "")


def miou_metric_key(scales: tuple[float, ...], flip: bool) -> str:
    """VAL_MIOU, VAL_MIOU_MS, VAL_MIOU_FLIP or VAL_MIOU_MS_FLIP: the mIoU of an evaluation over `scales` (image
    resize factors) with or without horizontal flips."""
    return VAL_MIOU + protocol_suffix(scales, flip)


def protocol_iou_key(class_name: str, scales: tuple[float, ...], flip: bool) -> str:
    """A class's IoU under the same protocol: `val/iou/<class>` for one pass at scale 1, else e.g.
    `val/iou_ms_flip/<class>` (the class name made loggable as `iou_metric_key` does)."""
    return "val/iou" + protocol_suffix(scales, flip) + iou_metric_key(class_name)[len(VAL_IOU_PREFIX) - 1:]


def train_loss_key(term: str) -> str:
    """`train/loss/<term>`: one distillation term's (or the total's) mean over a logging window."""
    return TRAIN_LOSS_PREFIX + term


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of a run on its val split, as the engine reports it (every rank gets the same one).

    `iou[k]` is class `classes[k]`'s IoU (NaN for a class absent from labels and predictions alike); `miou`,
    `pixel_acc` and the IoUs are fractions in [0, 1]. `best_miou` is the best mIoU of the run so far, this
    evaluation included, restored on resume; `is_best` says whether this evaluation set it (its weights are the
    run's best ones now). A tie with the earlier best, or a NaN mIoU, is not a new best.
    """

    iteration: int
    miou: float
    pixel_acc: float
    classes: tuple[str, ...]
    iou: tuple[float, ...]
    best_miou: float
    is_best: bool
    cost: dict[str, float] = field(default_factory=dict)  # COST_METRICS known at this evaluation (may be empty)
    time_budget_reached: bool = False  # the run's time budget ended it here: its last evaluation, short of the end

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.iou):
            raise ValueError(f"Evaluation: {len(self.classes)} class names for {len(self.iou)} IoU values")

    def metrics(self) -> dict[str, float]:
        """The evaluation as MLflow metrics (with ITERATION, the step): val/miou, val/pixel_acc, one val/iou/<class>
        per class, val/best_miou."""
        out: dict[str, float] = {ITERATION: self.iteration, VAL_MIOU: self.miou, VAL_PIXEL_ACC: self.pixel_acc}
        out.update({iou_metric_key(name): value for name, value in zip(self.classes, self.iou)})
        out[VAL_BEST_MIOU] = self.best_miou
        out.update(self.cost)
        return out

    def tune_metrics(self) -> dict[str, float]:
        """What Tune gets of it: ITERATION, TUNE_METRICS, the costs and, at a time-budget stop, TIME_BUDGET_REACHED
        (the caller adds ITERATIONS_TOTAL)."""
        out = {ITERATION: self.iteration, VAL_MIOU: self.miou, VAL_PIXEL_ACC: self.pixel_acc, **self.cost}
        if self.time_budget_reached:
            out[TIME_BUDGET_REACHED] = 1.0
        return out


def improves(miou: float, best: float) -> bool:
    """Whether an evaluation's mIoU is a new best over `best` (-inf before the first): strictly greater, so a
    tie keeps the earlier evaluation's weights, and a NaN never counts."""
    return not math.isnan(miou) and miou > best


def resolve_tracking_uri(uri: str | None) -> str:
    """The job's URI, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the working directory: the store
    a sweep writes and the report reads, spelled the same way by both.

    Absolute, because Ray moves the workers' working directory. A bare path ending in `.db` is a SQLite file. A
    bare directory path (or a `file:` URI) names MLflow's file store, which MLflow 3 refuses unless
    MLFLOW_ALLOW_FILE_STORE=true: without that opt-in it is a ConfigError suggesting a SQLite file instead.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).expanduser().resolve()}"
    if "://" in uri and not uri.startswith("file:"):
        return uri
    if uri.startswith("file:"):
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):])
    else:
        path = Path(uri)
    path = path.expanduser().resolve()
    if not uri.startswith("file:") and path.suffix == ".db":
        return f"sqlite:///{path}"
    if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1"):
        return path.as_uri()
    raise ConfigError(f"tracking URI {uri!r} (--tracking-uri, tracking.uri or $MLFLOW_TRACKING_URI): a directory is "
                      f"MLflow's file store, which MLflow 3 refuses; use a SQLite file, e.g. "
                      f"sqlite:///{path / 'mlflow.db'} (or a path ending in .db)")
