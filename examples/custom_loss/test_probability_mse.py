"""The example loss: its formula against a float64 loop, and kdray's contract for every registered loss.

    pytest examples/custom_loss
"""

import math
from pathlib import Path

import torch

from kdray.config import job_from_dict
from kdray.losses import LOSSES
from kdray.plugins import load_plugins
from kdray.testing import check_loss

PLUGIN = str(Path(__file__).with_name("probability_mse.py"))


def _registered():
    """Import the plugin as a job naming it does (by path) and return its module class."""
    load_plugins(PLUGIN)
    return LOSSES["prob_mse"].module


def test_matches_a_float64_loop():
    loss = _registered()(temperature=2.0)
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    total = 0.0
    for n in range(2):
        for y in range(3):
            for x in range(5):
                es = [math.exp(zs[n, k, y, x].item() / 2.0) for k in range(4)]
                et = [math.exp(zt[n, k, y, x].item() / 2.0) for k in range(4)]
                total += sum((es[k] / sum(es) - et[k] / sum(et)) ** 2 for k in range(4))
    assert abs(loss(zs, zt).item() - total / 30) < 1e-6


def test_keeps_the_contract_of_every_kdray_loss():
    _registered()
    check_loss("prob_mse")


def test_its_options_are_checked_from_the_job():
    import pytest

    from kdray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"losses.prob_mse.temperature: got -1.0; must be > 0"):
        job_from_dict({"plugins": [PLUGIN]}, ["losses.prob_mse.enabled=true", "losses.prob_mse.temperature=-1"])
