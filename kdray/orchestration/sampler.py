"""The search's sampler, with its settings written out: Optuna's TPE as kdray runs it, whatever Optuna's defaults
(or, with `sampler: random` in the space, Optuna's RandomSampler: the baseline a model-based search must beat).

Optuna 5 turned on multivariate TPE and the constant liar by default; kdray names every setting, so that a space
and a seed propose the same trials whatever Optuna version resolves, and records them on the sweep's run.
"""

from __future__ import annotations

from kdray import contract

# TPE as kdray samples with it, whatever Optuna's defaults: these are the settings the sweep records.
SAMPLER_SETTINGS = {"n_startup_trials": 10, "multivariate": False, "group": False, "constant_liar": False}


def tpe_sampler(seed: int):
    """Optuna's TPESampler with `SAMPLER_SETTINGS` and `seed`."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, **SAMPLER_SETTINGS)


SAMPLERS = ("tpe", "random")  # the values of a search space's `sampler` key


def make_sampler(kind: str, seed: int):
    """The sampler a search space names: `tpe` (`tpe_sampler`) or `random` (Optuna's RandomSampler)."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return tpe_sampler(seed)


def sampler_description(seed: int, kind: str = "tpe") -> dict[str, str]:
    """The sampler's settings as MLflow tags of the sweep run (`kdray.sampler.*`)."""
    import optuna

    name = "RandomSampler" if kind == "random" else "TPESampler"
    described = {"name": name, "seed": str(seed), "optuna": optuna.__version__}
    if kind != "random":
        described.update({key: str(value) for key, value in SAMPLER_SETTINGS.items()})
    return {f"{contract.SAMPLER_TAG_PREFIX}{key}": value for key, value in described.items()}
