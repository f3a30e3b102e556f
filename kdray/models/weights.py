"""Loading weight files into a `Segmenter`: strictly, with one clear `CheckpointError` when they do not fit.

Two kinds of file:
- backbone weights (the deep-stem ImageNet ResNets), keys `conv1.weight`, `layer1.0.bn1.weight`, ...,
  loaded into `model.pretrained` by `load_backbone_weights`;
- whole-segmenter weights (a CIRKD teacher checkpoint, or one kdray wrote), keys `pretrained.*`, `head.*`,
  `auxlayer.*`, loaded by `load_segmenter_weights`.

Either may hold the state dict itself or nest it under `state_dict` or `model`; a `module.` prefix on every
key (a model saved from inside DistributedDataParallel) is removed. Unlike CIRKD, which silently skips keys
it does not know, every other mismatch is an error.

"Strict" means exactly as strict as PyTorch's own `load_state_dict(strict=True)`, no stricter: the missing and
unexpected keys are the ones torch reports after its load hooks (BatchNorm fills the `num_batches_tracked` that
files saved before its version 2 lack, so those load), and a shape mismatch is torch's (a `(1,)` tensor loads
into a 0-d one, as for PyTorch 0.3 files). The file's `_metadata` (the module versions those hooks read) is
kept. A refused file leaves the model untouched.
"""

from __future__ import annotations

import copy
import itertools
import pickle
import re
from collections import OrderedDict
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
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read weights file {path}: it is empty (0 bytes)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read weights file {path}: {_load_failure(exc)}") from exc
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
    metadata = _file_metadata(obj, path)
    state = OrderedDict(obj)
    if all(k.startswith("module.") for k in state):
        state = OrderedDict((k[len("module.") :], v) for k, v in state.items())
        if metadata is not None:  # its keys are module paths too: "module" -> "", "module.layer1" -> "layer1"
            metadata = {k[len("module.") :] if k.startswith("module.") else "": v
                        for k, v in metadata.items() if k == "module" or k.startswith("module.")}
    if metadata is not None:
        state._metadata = metadata  # type: ignore[attr-defined]  # where torch's load_state_dict looks for it
    return state


def _file_metadata(state: Mapping, path: Path) -> dict[str, dict] | None:
    """The `_metadata` attribute `Module.state_dict()` attaches (module path -> {"version": n, ...}), if any.

    torch's load hooks read these versions (BatchNorm: a file before version 2 may lack `num_batches_tracked`),
    so it travels with the state dict. Raises `CheckpointError` when it is not such a mapping.
    """
    metadata = getattr(state, "_metadata", None)
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path} holds a malformed `_metadata` ({_describe(metadata)}); expected a mapping "
                              "of module names to mappings such as {'version': 1}, as `Module.state_dict()` saves")
    return {k: dict(v) for k, v in metadata.items()}


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
    """`module.load_state_dict(state, strict=True)`, refusing with one `CheckpointError` that names the missing
    and unexpected keys (as torch reports them after its load hooks) and each shape mismatch with both shapes.

    Everything is checked before anything is copied, so a refused file leaves `module` as it was.
    """
    expected = module.state_dict()
    mismatched = [
        f"{k} (file {_shape(state[k])}, model {_shape(v)})"
        for k, v in expected.items()
        if k in state and not _shape_fits(state[k], v)
    ]
    missing, unexpected = _torch_key_report(module, state, expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first(mismatched)}")
    if problems:
        raise CheckpointError(f"{path} does not fit {what}: " + "; ".join(problems))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # what the dry run cannot see: a value torch cannot copy into the model's dtype
        raise CheckpointError(f"{path} does not fit {what}: {exc}") from exc


def _shape_fits(saved: torch.Tensor, current: torch.Tensor) -> bool:
    """torch's shape rule: the same shape, or a `(1,)` tensor into a 0-d one (PyTorch 0.3 saved scalars so)."""
    return saved.shape == current.shape or (current.dim() == 0 and tuple(saved.shape) == (1,))


def _torch_key_report(module: nn.Module, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                      ) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the keys torch's own `load_state_dict` reports for `state`, after its load hooks.

    Found by a dry run rather than by comparing key sets here, so that the hooks (BatchNorm's, any other
    module's) decide as they do in a real load. The run loads a copy of `module` whose tensors live on the
    meta device (shapes only) from meta tensors of the model's shapes (a wrong shape is reported separately),
    with `assign=True`: no data is allocated or copied, and `module` is not touched.
    """
    probe = OrderedDict(
        (k, torch.empty(expected[k].shape if k in expected else v.shape, dtype=v.dtype, device="meta"))
        for k, v in state.items()
    )
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        probe._metadata = {k: dict(v) for k, v in metadata.items()}  # type: ignore[attr-defined]  # torch writes into these
    result = _meta_copy(module).load_state_dict(probe, strict=False, assign=True)
    return list(result.missing_keys), list(result.unexpected_keys)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` whose parameters and buffers are meta tensors of the same shapes and dtypes."""
    memo: dict[int, object] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _load_failure(exc: Exception) -> str:
    """Why torch.load refused a file, in one line (torch's own messages run to several, with terminal colours)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        return ("it holds objects besides tensors (numpy values, custom classes), which would need arbitrary "
                "unpickling, refused for safety: save the state dict alone (torch.save(model.state_dict(), path))")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"not a PyTorch weights file, or a damaged one ({type(exc).__name__}: {first[:200] or 'no detail'})"


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
