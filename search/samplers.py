"""Samplers for the joint space.

TPE is the default: it models conditional spaces (``group=True`` splits the space by which
parameters a trial used, ``multivariate=True`` models their interactions) and ``constant_liar``
keeps parallel workers from sampling the same point. Each worker gets its own seed.

TPE's cost per suggestion grows with the history: it re-splits every finished trial for each
parameter group (about 18 per plan of the ``all`` space), ~190 ms per trial at 1,000 trials on
one core. :class:`HistoryCap` keeps it flat: past ``$PARETO_TPE_HISTORY`` (default 300) finished
trials the sampler sees the best of them (whole non-domination ranks) and the most recent. TPE's
"good" set (the best 10 % of the history) is then the one the full history gives, up to a third
of the cap (100 trials: up to 1,000 trials exactly the full history's); only the "rest" is a
sample, and a recent one.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Container, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.study._multi_objective import _fast_non_domination_rank
from optuna.trial import FrozenTrial, TrialState

from models.errors import UserError
from objectives.objective import constraints_of

SAMPLERS = ("tpe", "nsga2", "random", "gp", "botorch")
SAMPLER_HELP = (
    "tpe (default: multivariate, grouped, constant liar), nsga2, random, "
    "gp and botorch (Gaussian processes: seconds per suggestion, worth it only for slow trials)"
)


HISTORY_ENV = "PARETO_TPE_HISTORY"
DEFAULT_HISTORY = 300
# TPE's "good" set is the best 10 % of the history (optuna's default for several objectives);
# past the cap it is at most a third of the cap, the rest of the view being recent trials.
_GOOD_SHARE = 0.1
_GOOD_MAX_SHARE = 3
_SEEN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


def tpe_history() -> int:
    """Finished trials TPE models at most: ``$PARETO_TPE_HISTORY`` (0: all) or the default."""
    raw = os.environ.get(HISTORY_ENV, "").strip()
    if not raw:
        return DEFAULT_HISTORY
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or 0 < value < 50:
        raise UserError(f"${HISTORY_ENV}={raw!r} is not a history size; set 0 (all trials) or an integer >= 50")
    return value


def _infeasible(trial: FrozenTrial) -> bool:
    return any(v > 0 for v in trial.constraints.values())


def good_size(finished: int, cap: int) -> int:
    """Trials in TPE's "good" set for ``finished`` trials of history: optuna's 10 %, at most a
    third of ``cap`` (0: no cap)."""
    size = math.ceil(_GOOD_SHARE * finished)
    return min(size, cap // _GOOD_MAX_SHARE) if cap else size


def capped_history(trials: Sequence[FrozenTrial], directions: Sequence[StudyDirection], cap: int) -> list[FrozenTrial]:
    """``trials`` (sorted by number) cut to ``cap`` finished ones, RUNNING ones all kept.

    Kept: whole non-domination ranks of the feasible complete trials until :func:`good_size`
    is reached (a trial's rank depends only on the trials that dominate it, which lie in lower
    ranks: the ranks kept are the full history's, and so is TPE's good set), then the most
    recent finished trials.
    """
    finished = [t for t in trials if t.state != TrialState.RUNNING]
    if cap <= 0 or len(finished) <= cap:
        return list(trials)
    good = [t for t in finished if t.state == TrialState.COMPLETE and t.values is not None and not _infeasible(t)]
    keep: set[int] = set()
    if good:
        signs = np.array([-1.0 if d == StudyDirection.MAXIMIZE else 1.0 for d in directions])
        ranks = _fast_non_domination_rank(np.array([t.values for t in good]) * signs)
        counts = np.cumsum(np.bincount(ranks))
        last = int(np.searchsorted(counts, min(good_size(len(finished), cap), len(good))))
        keep = {t.number for t, r in zip(good, ranks, strict=True) if r <= last}
    for t in reversed(finished):
        if len(keep) >= cap:
            break
        keep.add(t.number)
    return [t for t in trials if t.state == TrialState.RUNNING or t.number in keep]


class _HistoryView:
    """The study as a sampler sees it: every attribute is the study's except its trials."""

    def __init__(self, study: optuna.Study, trials: list[FrozenTrial]) -> None:
        self._study = study
        self._view = trials

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None,
                    use_cache: bool = False) -> list[FrozenTrial]:
        trials = [t for t in self._view if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._get_trials()


class HistoryCap(BaseSampler):
    """TPE (built here, with ``tpe_options``) fed at most ``history`` finished trials (see
    :func:`capped_history`), with its good set sized on the whole history (:func:`good_size`).

    The trials are read once per suggested trial (TPE reads them once per parameter group) and
    cut once; with ``history`` 0, or fewer finished trials, the view is the whole study.
    """

    def __init__(self, history: int, **tpe_options: Any) -> None:
        self.history = history
        with warnings.catch_warnings():
            # Deprecated in optuna 4.9 (to go in 6.0; pyproject stays below 6): the only public way
            # to size the good set on the whole history rather than on the view.
            warnings.filterwarnings("ignore", message="`gamma` has been deprecated", category=FutureWarning)
            self.inner = optuna.samplers.TPESampler(gamma=self._gamma, **tpe_options)
        self._for: int | None = None
        self._view: _HistoryView | None = None
        self._finished = 0

    def _gamma(self, n: int) -> int:
        # n counts the view's finished trials; the good set is sized on the whole history's.
        return min(good_size(max(n, self._finished), self.history), n)

    def _study_for(self, study: optuna.Study, trial: FrozenTrial) -> Any:
        if self._for != trial._trial_id or self._view is None or self._view._study is not study:
            trials = study._get_trials(deepcopy=False, states=_SEEN, use_cache=False)
            self._finished = sum(1 for t in trials if t.state != TrialState.RUNNING)
            self._view = _HistoryView(study, capped_history(trials, study.directions, self.history))
            self._for = trial._trial_id
        return self._view

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        """The inner sampler's, on the capped view."""
        return self.inner.infer_relative_search_space(self._study_for(study, trial), trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        """The inner sampler's, on the capped view."""
        return self.inner.sample_relative(self._study_for(study, trial), trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        """The inner sampler's, on the capped view."""
        return self.inner.sample_independent(self._study_for(study, trial), trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The inner sampler's, on the study itself."""
        self._view = None  # a new trial: the history is read again
        self.inner.before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        """The inner sampler's, on the study itself (it may write the trial's constraints)."""
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Reseeds the inner sampler."""
        self.inner.reseed_rng()


def make_sampler(name: str, seed: int | None = None, *, constraints: bool = False) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` seeded with ``seed``; ``constraints`` wires trial constraints in."""
    cf = constraints_of if constraints else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "tpe":
            options: dict[str, Any] = {"multivariate": True, "group": True, "constant_liar": True, "seed": seed,
                                       "constraints_func": cf, "n_startup_trials": 10}
            history = tpe_history()
            return HistoryCap(history, **options) if history else optuna.samplers.TPESampler(**options)
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
