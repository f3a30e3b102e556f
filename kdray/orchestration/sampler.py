"""The search's sampler, with its settings written out: Optuna's TPE as kdray runs it, whatever Optuna's defaults
(or, with `sampler: random` in the space, Optuna's RandomSampler: the baseline a model-based search must beat).

Optuna 5 turned on multivariate TPE and the constant liar by default; kdray names every setting, so that a space
and a seed propose the same trials whatever Optuna version resolves, and records them on the sweep's run.
"""

from __future__ import annotations

from kdray import contract

# TPE as kdray samples with it, whatever Optuna's defaults: these are the settings the sweep records.
SAMPLER_SETTINGS = {"n_startup_trials": 10, "multivariate": False, "group": False, "constant_liar": False}


def tpe_settings(constant_liar: bool = False) -> dict:
    """`SAMPLER_SETTINGS`, with the constant liar on for a search that asks for several trials at once (a trial
    pack's members): the trials still running count as bad, so that the suggestions spread instead of piling up."""
    return {**SAMPLER_SETTINGS, "constant_liar": constant_liar}


def tpe_sampler(seed: int, constant_liar: bool = False):
    """Optuna's TPESampler with `tpe_settings(constant_liar)` and `seed`."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed, **tpe_settings(constant_liar))


SAMPLERS = ("tpe", "random")  # the values of a search space's `sampler` key


def make_sampler(kind: str, seed: int, constant_liar: bool = False):
    """The sampler a search space names: `tpe` (`tpe_sampler`) or `random` (Optuna's RandomSampler)."""
    import optuna

    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return tpe_sampler(seed, constant_liar)


def sampler_description(seed: int, kind: str = "tpe", constant_liar: bool = False) -> dict[str, str]:
    """The sampler's settings as MLflow tags of the sweep run (`kdray.sampler.*`)."""
    import optuna

    name = "RandomSampler" if kind == "random" else "TPESampler"
    described = {"name": name, "seed": str(seed), "optuna": optuna.__version__}
    if kind != "random":
        described.update({key: str(value) for key, value in tpe_settings(constant_liar).items()})
    return {f"{contract.SAMPLER_TAG_PREFIX}{key}": value for key, value in described.items()}
