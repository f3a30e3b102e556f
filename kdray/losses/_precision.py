"""A loss's arithmetic outside autocast, at the cost of a no-op when autocast is off."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off for the block where it is on, so that a loss computes in its inputs' precision
    (float32 at least, by its own casts); where it is off (the engine runs the losses outside autocast), a
    null context, an order of magnitude cheaper than entering `torch.autocast(..., enabled=False)` on every
    call (README, Performance)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
