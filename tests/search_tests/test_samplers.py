"""search.samplers: every sampler keeps suggesting valid plans of the real conditional joint space
(``all``) when most trials are stopped (PRUNED) — what early stopping produces. No training:
finished trials get synthetic (accuracy, ratio) values."""

from __future__ import annotations

import random
import warnings

import optuna
import pytest
from optuna.trial import TrialState

from models.errors import UserError
from search.samplers import SAMPLERS, make_sampler
from spaces.plan import Plan, get_study_space, suggest_plan

# Every fifth trial completes, the others are stopped (80 % PRUNED). Loop counts are chosen so
# that each sampler gets past its start-up phase into its model: TPE after 10 finished trials
# (complete or pruned), the GPs after 10 COMPLETE ones, NSGA-II after a first generation of 20
# COMPLETE ones (its population size). GP-based samplers fit a Gaussian process per suggestion
# (seconds each, tens of seconds for BoTorch on 2 loaded cores): only a few model suggestions.
COMPLETE_EVERY = 5
LOOPS = {"tpe": 30, "nsga2": 130, "random": 25, "gp": 54, "botorch": 49}
STARTUP = {  # (states counted, how many) before the sampler's model takes over
    "tpe": ((TrialState.COMPLETE, TrialState.PRUNED), 10),
    "nsga2": ((TrialState.COMPLETE,), 20),
    "random": ((TrialState.COMPLETE,), 0),
    "gp": ((TrialState.COMPLETE,), 10),
    "botorch": ((TrialState.COMPLETE,), 10),
}


def _synthetic_values(plan: Plan, rng: random.Random) -> tuple[float, float]:
    """Accuracy falls and ratio rises with the number of techniques (plus noise)."""
    n = len(plan.steps)
    return 0.97 - 0.03 * n + rng.uniform(-0.02, 0.02), 1.0 + 4.0 * n + rng.uniform(0.0, 2.0)


def _drive(sampler: optuna.samplers.BaseSampler, loops: int, seed: int = 0, constraints: bool = False) -> optuna.Study:
    """Ask ``loops`` plans of the ``all`` space; stop four of five, complete the fifth."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = get_study_space("all")
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=sampler)
    rng = random.Random(seed)
    for i in range(loops):
        trial = study.ask()
        plan = suggest_plan(trial, space)
        assert Plan.from_dict(plan.to_dict()) == plan
        # The plan is a function of the trial's parameters: the same parameters give the same plan.
        assert suggest_plan(optuna.trial.FixedTrial(trial.params), space) == plan
        if constraints:
            trial.set_user_attr("constraints", [rng.choice([-1.0, 0.0, 1.0])])
        if i % COMPLETE_EVERY:
            trial.set_user_attr("stopped_at_epoch", 1)
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, _synthetic_values(plan, rng))
    return study


def _params(name: str) -> list[object]:
    marks = []
    if name == "botorch":
        # Measured: ~60-150 s for its three model suggestions on 2 shared CPU cores.
        marks.append(pytest.mark.slow)
        marks.append(pytest.mark.filterwarnings("ignore"))  # botorch/gpytorch numerical warnings
    return [pytest.param(name, marks=marks, id=name)]


@pytest.mark.parametrize("name", [p for n in SAMPLERS for p in _params(n)])
def test_sampler_suggests_valid_plans_when_most_trials_are_stopped(name: str) -> None:
    if name == "botorch":
        pytest.importorskip("botorch", reason="--sampler botorch needs botorch (pip install 'pareto-compress[botorch]')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = _drive(make_sampler(name, seed=1), LOOPS[name])
    states = [t.state for t in study.trials]
    assert len(states) == LOOPS[name]
    assert states.count(TrialState.PRUNED) == LOOPS[name] - states.count(TrialState.COMPLETE)
    counted, startup = STARTUP[name]
    from_model = [i for i in range(len(states)) if sum(s in counted for s in states[:i]) >= startup]
    assert len(from_model) >= 3, "the sampler's model phase was not reached"
    if name == "nsga2":  # later trials were bred from a parent population
        assert max(t.system_attrs.get("NSGAIISampler:generation", 0) for t in study.trials) >= 1
    # More than one plan shape was explored (the space is conditional).
    assert len({tuple(sorted(t.params)) for t in study.trials}) > 1


@pytest.mark.filterwarnings("ignore:`constraints_func` has been deprecated:FutureWarning")  # optuna 5; see report
@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_samplers_with_constraints(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study = _drive(make_sampler(name, seed=2, constraints=True), 20, seed=2, constraints=True)
    assert len(study.trials) == 20


def test_seeds_make_samplers_reproducible_and_distinct() -> None:
    def params(seed: int) -> list[dict[str, object]]:
        return [t.params for t in _drive(make_sampler("tpe", seed=seed), 12).trials]

    assert params(5) == params(5)
    assert params(5) != params(6)


def test_unknown_sampler_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown sampler 'cmaes'; known: tpe, nsga2, random, gp, botorch"):
        make_sampler("cmaes")
