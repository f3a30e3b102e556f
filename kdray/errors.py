"""The errors kdray raises at its boundaries.

Each one carries a message that names the offending key, file or value and what would be valid. The command
line catches `KdrayError` and prints that message on one line with exit code `exit_code` instead of a
traceback; anything else escaping is a bug in kdray.
"""


class KdrayError(Exception):
    """Base of every error kdray raises on purpose."""

    exit_code = 2


class ConfigError(KdrayError):
    """A job, override or search space is invalid: unknown key, wrong type, impossible value."""


class DataError(KdrayError):
    """A dataset tree or file is missing, empty or holds values outside the label set."""


class CheckpointError(KdrayError):
    """A weights or run checkpoint cannot be read or does not fit the model it is loaded into."""


class ResourceError(KdrayError):
    """The cluster cannot provide what a run asks for (GPUs, CPUs, workers)."""

    exit_code = 3


class PreflightError(KdrayError):
    """A distillation loss cannot run on the shapes the teacher and student produce."""


class MatchError(KdrayError):
    """A matched ablation cannot set its budget: the row it is matched to could not be timed (its loss is not
    finite). Raised once the sweep has started (after its teacher), so it ends as a failed sweep does."""

    exit_code = 1
