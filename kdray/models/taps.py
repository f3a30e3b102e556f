"""Feature taps: the outputs of named layers of a segmenter, captured during its ordinary forward.

    taps = FeatureTaps(model, ["backbone.layer2", "head"])
    out = model(images)
    feats = taps.collect(out)    # {"backbone.layer2": (N, C2, h, w), "head": (N, C, h, w)}

A distillation loss names the layers it compares (FitNet, attention transfer: backbone stages); only those
are captured. The names, in network order, for an (H, W) input, with h, w = ceil(H / 8), ceil(W / 8):

    backbone.layer1   (N, C1, ceil(H / 4), ceil(W / 4))   output of ResNet stage 1 (after the stem's max-pool)
    backbone.layer2   (N, C2, h, w)                       output of stage 2 (the last stride-2 stage)
    backbone.layer3   (N, C3, h, w)                       output of stage 3 (dilated; the auxiliary head's input)
    backbone.layer4   (N, C4, h, w)                       output of stage 4 (dilated; the head's input)
    head              (N, C, h, w)                        the map the 1x1 classifier reads: `SegmenterOutput.features`

C1..C4 are `model.pretrained.stage_channels` and C is `model.feature_channels`. The backbone is the
segmenter's `pretrained` attribute (CIRKD's name, kept for its checkpoints); users say `backbone.`.

There is no stem tap: the stem has no module of its own (its three convs share one ReLU module, which runs
three times), and its only distinct map, the max-pool output, is `layer1`'s input at the same stride.
There is no aux tap either: the auxiliary head reads `backbone.layer3`, and its logits are the output's
`aux_logits` (training mode, or `model(x, aux=True)`), the step inputs `student.aux_logits`/`teacher.aux_logits`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdray.errors import ConfigError
from kdray.models.segmenter import SegmenterOutput

_STAGES = ("layer1", "layer2", "layer3", "layer4")
# Strides from resnet.py: the stem halves twice (conv1, max-pool), layer2 once more, layer3/4 dilate instead.
_STAGE_STRIDES = (4, 8, 8, 8)
_HEAD = "head"


def _unwrap(model: nn.Module) -> nn.Module:
    """The segmenter inside a (Distributed)DataParallel wrapper, or `model` itself."""
    if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
        return model.module
    return model


def tap_names(model: nn.Module) -> list[str]:
    """The tap names `model` has, in network order: `backbone.layer1` .. `backbone.layer4`, `head`.

    Every kdray arch (any head over any ResNet) has these five; `model` is taken so that callers ask the model
    they will tap, and an arch with other layers can answer differently.
    """
    return [f"backbone.{stage}" for stage in _STAGES] + [_HEAD]


def _check_name(model: nn.Module, name: object) -> str:
    valid = tap_names(model)
    if isinstance(name, str) and name in valid:
        return name
    close = difflib.get_close_matches(name, valid, n=1) if isinstance(name, str) else []
    hint = f"did you mean {close[0]}? " if close else ""
    arch = getattr(_unwrap(model), "arch", type(_unwrap(model)).__name__)
    raise ConfigError(f"tap {name!r}: not a layer of {arch}; {hint}valid taps: {', '.join(valid)}")


def tap_channels(model: nn.Module, name: str) -> int:
    """The channel count of tap `name`, read from the module structure (no forward).

    Raises `ConfigError` for a name that is not in `tap_names(model)`.
    """
    name = _check_name(model, name)
    inner = _unwrap(model)
    if name == _HEAD:
        return int(inner.feature_channels)
    return int(inner.pretrained.stage_channels[_STAGES.index(name.removeprefix("backbone."))])


def tap_stride(model: nn.Module, name: str) -> int:
    """The output stride of tap `name`: an (H, W) input gives a (ceil(H / s), ceil(W / s)) map.

    Raises `ConfigError` for a name that is not in `tap_names(model)`.
    """
    name = _check_name(model, name)
    if name == _HEAD:
        return 8
    return _STAGE_STRIDES[_STAGES.index(name.removeprefix("backbone."))]


class FeatureTaps:
    """Forward hooks that capture the outputs of the named layers of one segmenter.

    model: a `Segmenter` (or a module with its attributes: `pretrained.layer1..4`, `pretrained.stage_channels`,
        `feature_channels`), bare or wrapped in `DistributedDataParallel` / `DataParallel` (the hooks go on
        the inner modules, which the wrapper's forward runs).
    names: tap names (see `tap_names`); repeats are ignored. Hooks are registered only for the backbone taps
        asked for: with none (only `head`, or nothing) the model runs exactly as without taps.

    After each forward, `collect(output)` returns the captured maps, as the forward made them: with the
    autograd graph when gradients were on (a loss on them trains the layers below), without under
    `torch.no_grad` (a teacher), in the autocast dtype under autocast. It drops its references to them, so
    nothing of a step outlives the step. A forward that is not collected (an evaluation pass) is held until
    the next forward replaces it, `clear()` or `remove()`.

    Raises `ConfigError` (one line naming the bad tap and the valid ones) for an unknown name. Call `remove()`
    (or use it as a context manager) before copying or pickling the model: the hooks refer to this object.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.names: tuple[str, ...] = tuple(dict.fromkeys(_check_name(model, name) for name in names))
        inner = _unwrap(model)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        for name in self.names:
            if name != _HEAD:
                stage = getattr(inner.pretrained, name.removeprefix("backbone."))
                self._handles.append(stage.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def store(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            self._captured[name] = output

        return store

    def collect(self, output: SegmenterOutput) -> dict[str, torch.Tensor]:
        """The maps of the last forward, by tap name in the order asked: `head` is `output.features`.

        output: what that forward returned. Raises `RuntimeError` if a backbone tap did not fire (no forward
        since the last `collect`, or the hooks were removed).
        """
        missing = [name for name in self.names if name != _HEAD and name not in self._captured]
        if missing:
            self.clear()
            raise RuntimeError(f"feature taps {', '.join(missing)} hold nothing: run the model before collect()")
        captured = {name: output.features if name == _HEAD else self._captured[name] for name in self.names}
        self.clear()
        return captured

    def clear(self) -> None:
        """Drop the captured maps without returning them."""
        self._captured.clear()

    def remove(self) -> None:
        """Remove the hooks and drop the captured maps; the model then runs as if never tapped. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"FeatureTaps({', '.join(self.names)}; {len(self._handles)} hooks)"
