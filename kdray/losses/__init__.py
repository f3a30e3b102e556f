"""Distillation losses for semantic segmentation: one module per method, each docstring with its formula, shapes
and paper, each registered by name with `register_loss` (the contract: `kdray.losses.registry`).

Each loss is an `nn.Module` returning an unweighted scalar (the objective applies the config weight); teacher
tensors are detached inside. Importing this package imports every module in it, so every built-in loss is
registered; a user's own losses come in through a job's `plugins:` (`kdray.plugins`).
"""

import importlib
import pkgutil

from kdray.config.options import option
from kdray.losses.ace import AdaptiveCrossEntropy
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.cross_entropy import SegmentationCrossEntropy
from kdray.losses.csc import ChannelSpatialCorrelation
from kdray.losses.cwd import ChannelWiseDistillation
from kdray.losses.discriminator import Discriminator, SelfAttention
from kdray.losses.holistic import AdversarialDistillation
from kdray.losses.i2ckd import I2CKD, class_prototypes, triplet_prototype_loss
from kdray.losses.ifvd import IntraClassFeatureVariation
from kdray.losses.inputs import (
    IMAGES,
    LABELS,
    LABELS_AT_LOGITS,
    STUDENT_AUX_LOGITS,
    STUDENT_FEATURES,
    STUDENT_LOGITS,
    TEACHER_AUX_LOGITS,
    TEACHER_FEATURES,
    TEACHER_LOGITS,
    StepInput,
    StepTensors,
    optional,
    student_features,
    teacher_features,
)
from kdray.losses.kd import PixelwiseKD
from kdray.losses.labels import downsample_labels, one_hot_ignore
from kdray.losses.pairwise import PairwiseAffinity, spatial_affinity_distance
from kdray.losses.registry import LOSSES, LossConfig, LossContext, LossSpec, OwnedStep, loss_spec, register_loss
from kdray.losses.softmax_kl import softmax_kl

# Every module of the package, so that a built-in loss is its file: nothing else lists it.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "I2CKD",
    "IMAGES",
    "LABELS",
    "LABELS_AT_LOGITS",
    "LOSSES",
    "STUDENT_AUX_LOGITS",
    "STUDENT_FEATURES",
    "STUDENT_LOGITS",
    "TEACHER_AUX_LOGITS",
    "TEACHER_FEATURES",
    "TEACHER_LOGITS",
    "AdaptiveCrossEntropy",
    "AdversarialDistillation",
    "ChannelSpatialCorrelation",
    "ChannelWiseDistillation",
    "Discriminator",
    "FeatureAdapter",
    "IntraClassFeatureVariation",
    "LossConfig",
    "LossContext",
    "LossSpec",
    "OwnedStep",
    "PairwiseAffinity",
    "PixelwiseKD",
    "SegmentationCrossEntropy",
    "SelfAttention",
    "StepInput",
    "StepTensors",
    "class_prototypes",
    "downsample_labels",
    "loss_spec",
    "one_hot_ignore",
    "option",
    "optional",
    "register_loss",
    "softmax_kl",
    "spatial_affinity_distance",
    "student_features",
    "teacher_features",
    "triplet_prototype_loss",
]
