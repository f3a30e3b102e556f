"""Distillation losses for semantic segmentation: one module per method, each docstring with its
formula and paper.

Each loss is an `nn.Module` returning an unweighted scalar (the objective applies the config weight); teacher
tensors are detached inside. Constructor keywords are the job config's option names.
"""

from kdray.losses.ace import AdaptiveCrossEntropy
from kdray.losses.adapter import FeatureAdapter
from kdray.losses.cross_entropy import SegmentationCrossEntropy
from kdray.losses.csc import ChannelSpatialCorrelation
from kdray.losses.cwd import ChannelWiseDistillation
from kdray.losses.discriminator import Discriminator, SelfAttention
from kdray.losses.holistic import AdversarialDistillation
from kdray.losses.i2ckd import I2CKD, class_prototypes, triplet_prototype_loss
from kdray.losses.ifvd import IntraClassFeatureVariation
from kdray.losses.kd import PixelwiseKD
from kdray.losses.labels import downsample_labels, one_hot_ignore
from kdray.losses.pairwise import PairwiseAffinity, spatial_affinity_distance
from kdray.losses.softmax_kl import softmax_kl

__all__ = [
    "I2CKD",
    "AdaptiveCrossEntropy",
    "AdversarialDistillation",
    "ChannelSpatialCorrelation",
    "ChannelWiseDistillation",
    "Discriminator",
    "FeatureAdapter",
    "IntraClassFeatureVariation",
    "PairwiseAffinity",
    "PixelwiseKD",
    "SegmentationCrossEntropy",
    "SelfAttention",
    "class_prototypes",
    "downsample_labels",
    "one_hot_ignore",
    "softmax_kl",
    "spatial_affinity_distance",
    "triplet_prototype_loss",
]
