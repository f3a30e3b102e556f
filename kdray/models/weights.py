"""Loading weight files into a `Segmenter`: strictly, with one clear `CheckpointError` when they do not fit.

Two kinds of file:
- backbone weights (the deep-stem ImageNet ResNets), keys `conv1.weight`, `layer1.0.bn1.weight`, ...,
  loaded into `model.pretrained` by `load_backbone_weights`;
- whole-segmenter weights (a CIRKD teacher checkpoint, or one kdray wrote), keys `pretrained.*`, `head.*`,
  `auxlayer.*`, loaded by `load_segmenter_weights`.

Either may hold the state dict itself or nest it under `state_dict` or `model`; a `module.` prefix on every
key (a model saved from inside DistributedDataParallel) is removed. Unlike CIRKD, which silently skips keys
it does not know, every other mismatch is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from kdray.errors import CheckpointError
from kdray.models.segmenter import Segmenter

# An ImageNet backbone file may carry the 1000-way classifier it was trained with; a segmentation backbone
# has no such layer, so exactly these two keys are dropped. Any other extra key is an error.
IMAGENET_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")

_NESTING_KEYS = ("state_dict", "model")
_SHOW = 5  # how many key names an error message lists


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `path` (raw, or nested under `state_dict`/`model`), minus any `module.` prefix.

    Read with `weights_only=True`: a file that needs arbitrary unpickling is refused, not executed.
    Raises `CheckpointError` when the file is missing, unreadable or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in _NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise CheckpointError(
            f"{path} does not hold a state dict (a non-empty mapping of names to tensors, possibly under "
            f"{' or '.join(repr(k) for k in _NESTING_KEYS)}); found {_describe(obj)}"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_backbone_weights(model: Segmenter, path: str | Path) -> None:
    """Load a backbone weights file (e.g. CIRKD's deep-stem `resnet18-imagenet.pth`) into `model.pretrained`.

    Strict: every backbone parameter and buffer must be in the file with the right shape, and the file may
    hold nothing else except the ImageNet classifier `fc.weight` / `fc.bias`, which is dropped.
    Raises `CheckpointError` otherwise.
    """
    state = read_state_dict(path)
    for key in IMAGENET_CLASSIFIER_KEYS:
        state.pop(key, None)
    _load_strict(model.pretrained, state, path, what=f"the {model.arch} backbone")


def load_segmenter_weights(model: Segmenter, path: str | Path,
                           state: dict[str, torch.Tensor] | None = None) -> None:
    """Load a whole-segmenter weights file (e.g. a CIRKD teacher checkpoint) into `model`, strictly.

    A model built with `aux=False` refuses a file that has `auxlayer.*` keys (and the reverse): build it
    the way the file was saved. `state`: the file's content when the caller has already read it with
    `read_state_dict` (`path` then only names it in errors). Raises `CheckpointError` on any mismatch.
    """
    _load_strict(model, read_state_dict(path) if state is None else state, path, what=f"the {model.arch} model")


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (file {_shape(state[k])}, model {_shape(v)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
    if problems:
        raise CheckpointError(f"{path} does not fit {what}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(d) for d in t.shape) if t.dim() else "scalar"


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty mapping"
        return f"a mapping with keys {_first([repr(k) for k in obj])}"
    return f"a {type(obj).__name__}"
