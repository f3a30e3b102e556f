"""The MLflow layout kdray writes and `kdray.report` reads: tag names and metric keys, in one place.

    experiment  = the job's name (or tracking.experiment)
    sweep run   = parent, one per `python -m kdray.sweep`         tags: KIND=sweep, SWEEP_ID, SPACE, SPACE_KIND, ...
    trial runs  = children (mlflow.parentRunId = sweep run)  tags: KIND=trial, SWEEP_ID, TRIAL_ID, METHOD, SEED, ...
    teacher run = the teacher's own training, when kdray did it    tags: KIND=teacher, TEACHER_ARCH, PARAMS_M
Params of a trial are its flattened job config (`losses.kd.weight`, ...). Metrics carry the iteration as step.
Status: FINISHED; KILLED for trials the scheduler stopped early (STOPPED_EARLY=true) or that were interrupted;
FAILED with the reason in FAILURE.
"""

# tags
KIND = "kdray.kind"  # sweep | trial | teacher
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
FAILURE = "kdray.failure"  # why a FAILED run failed
PARENT = "mlflow.parentRunId"
SMOKE_TEST = "kdray.smoke_test"  # "true" on the sweep (and teacher) run of a --smoke-test sweep: not a result
NOT_STARTED = "kdray.not_started"  # "true" on the run of a trial that never started (status FAILED or KILLED)
TRIALS_PLANNED = "kdray.trials_planned"  # on the sweep run: how many trials its space makes (rows x seeds, samples)



def arch_label(arch: str, width: float) -> str:
    """`deeplabv3_resnet18`, or `deeplabv3_resnet18@0.125x` for a width-reduced variant."""
    return arch if width == 1 else f"{arch}@{width:g}x"


# metrics (step = iteration)
VAL_MIOU = "val/miou"
VAL_PIXEL_ACC = "val/pixel_acc"
VAL_IOU_PREFIX = "val/iou/"  # + class name
TRAIN_LOSS_PREFIX = "train/loss/"  # + term name (ce, kd, i2ckd, ..., total)
TRAIN_LR = "train/lr"
TRAIN_IMAGES_PER_S = "train/images_per_s"
# What each evaluation reports to Tune (with `iteration` and `iterations_total`): the metrics a search space can
# optimise and ASHA can compare. Everything else (per-class IoU, training terms) goes to MLflow only.
TUNE_METRICS = (VAL_MIOU, VAL_PIXEL_ACC)

# artifacts
JOB_ARTIFACT = "config/job.yaml"
SPACE_ARTIFACT = "config/space.yaml"
BEST_CHECKPOINT_ARTIFACT_DIR = "checkpoints"  # holds best_student.pt
REPORT_ARTIFACT_DIR = "report"  # the tables and plots on the sweep run
