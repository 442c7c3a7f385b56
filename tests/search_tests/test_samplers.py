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


# ------------------------------------------------------------------------- TPE's history cap


def _history(n: int, running: int = 0, seed: int = 0) -> list[optuna.trial.FrozenTrial]:
    """``n`` finished trials (every seventh infeasible) and ``running`` RUNNING ones."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    rng = random.Random(seed)
    for i in range(n):
        attrs = {"constraints": [1.0 if i % 7 == 3 else -1.0]}
        study.add_trial(optuna.trial.create_trial(values=[rng.random(), rng.random()], system_attrs=attrs))
    for _ in range(running):
        study.ask()
    return study.get_trials(deepcopy=False)


def test_capped_history_keeps_tpe_good_set_running_trials_and_the_most_recent() -> None:
    from optuna.samplers._tpe.sampler import _split_trials, default_gamma_multiobjective

    from search.samplers import HistoryCap, capped_history, good_size

    study = optuna.create_study(directions=["maximize", "maximize"])
    full = _history(1000, running=3)
    capped = capped_history(full, study.directions, 300)
    finished = [t for t in capped if t.state != TrialState.RUNNING]
    assert len(finished) == 300
    assert [t.number for t in capped if t.state == TrialState.RUNNING] == [1000, 1001, 1002]
    assert {t.number for t in full[900:1000]} <= {t.number for t in finished}  # the most recent
    # TPE's "good" set is exactly the full history's: optuna's 10 % (100 of 1,000), which is
    # also what the sampler's gamma asks of the capped view.
    gamma = default_gamma_multiobjective(1000)
    sampler = HistoryCap(300)
    sampler._finished = 1000
    assert gamma == good_size(1000, 300) == sampler._gamma(300) == 100
    below_full = [t.number for t in _split_trials(study, full, gamma)[0]]
    below_capped = [t.number for t in _split_trials(study, capped, gamma)[0]]
    assert below_capped == below_full and len(below_full) == gamma
    assert good_size(3000, 300) == 100 and good_size(200, 300) == default_gamma_multiobjective(200)
    # At or below the cap, and with the cap off, the history is untouched.
    assert capped_history(full[:300], study.directions, 300) == full[:300]
    assert capped_history(full, study.directions, 0) == full


def test_history_cap_feeds_tpe_at_most_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    from search.samplers import HistoryCap

    monkeypatch.setenv("PARETO_TPE_HISTORY", "50")
    sampler = make_sampler("tpe", seed=3)
    assert isinstance(sampler, HistoryCap) and sampler.history == 50
    seen: list[int] = []
    inner = sampler.inner.sample_relative

    def spy(study: optuna.Study, trial: optuna.trial.FrozenTrial, space: dict[str, object]) -> dict[str, object]:
        seen.append(len(study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))))
        return inner(study, trial, space)

    monkeypatch.setattr(sampler.inner, "sample_relative", spy)
    study = _drive(sampler, 70)
    assert len(study.trials) == 70
    assert seen[-1] == 50 and max(seen) == 50 and seen[:10] == list(range(10))
    assert len({tuple(sorted(t.params)) for t in study.trials[50:]}) > 1  # still explores the space


@pytest.mark.parametrize("raw", ["abc", "-1", "10"])
def test_bad_history_size_is_a_user_error(raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARETO_TPE_HISTORY", raw)
    with pytest.raises(UserError, match=rf"^\$PARETO_TPE_HISTORY='{raw}' is not a history size; set 0"):
        make_sampler("tpe")


def test_history_cap_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARETO_TPE_HISTORY", "0")
    assert isinstance(make_sampler("tpe"), optuna.samplers.TPESampler)
