"""The training/evaluation loop for one run or a trial pack, on one process or every rank of a data-parallel group."""

from kdray.engine.calibrate import IterationTiming, measure_iteration_seconds
from kdray.engine.checkpoint import load_checkpoint, save_checkpoint
from kdray.engine.distributed import RankContext
from kdray.engine.evaluate import evaluate
from kdray.engine.loop import NonFiniteLossError, PackMember, RunResult, load_teacher, train, train_pack

__all__ = ["IterationTiming", "NonFiniteLossError", "PackMember", "RankContext", "RunResult", "evaluate",
           "load_checkpoint", "load_teacher", "measure_iteration_seconds", "save_checkpoint", "train", "train_pack"]
