"""Samplers for the joint space.

TPE is the default: it models conditional spaces (``group=True`` splits the space by which
parameters a trial used, ``multivariate=True`` models their interactions) and ``constant_liar``
keeps parallel workers from sampling the same point. Each worker gets its own seed.
"""

from __future__ import annotations

import warnings

import optuna

from models.errors import UserError
from objectives.objective import constraints_of

SAMPLERS = ("tpe", "nsga2", "random", "gp", "botorch")
SAMPLER_HELP = (
    "tpe (default: multivariate, grouped, constant liar), nsga2, random, "
    "gp and botorch (Gaussian processes: seconds per suggestion, worth it only for slow trials)"
)


def make_sampler(name: str, seed: int | None = None, *, constraints: bool = False) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` seeded with ``seed``; ``constraints`` wires trial constraints in."""
    cf = constraints_of if constraints else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            return optuna.samplers.TPESampler(
                multivariate=True, group=True, constant_liar=True, seed=seed, constraints_func=cf, n_startup_trials=10
            )
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=cf, population_size=20)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, constraints_func=cf)
        if name == "botorch":
            try:
                from optuna_integration import BoTorchSampler
            except ImportError as exc:
                raise UserError(f"--sampler botorch needs botorch: {exc}; pip install 'pareto-compress[botorch]'") from None
            return BoTorchSampler(seed=seed, constraints_func=cf)
    raise UserError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
