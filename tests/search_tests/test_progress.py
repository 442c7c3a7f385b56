"""search.progress: Pareto front and hypervolume against brute force, study statistics."""

from __future__ import annotations

import itertools
import math
import random

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search.progress import (
    ACCURACY_FLOOR_POINTS,
    front_trials,
    hypervolume,
    pareto_indices,
    study_hypervolume,
    study_stats,
)


def _dominated(p: tuple[float, float], q: tuple[float, float]) -> bool:
    """q dominates p (both maximised)."""
    return q[0] >= p[0] and q[1] >= p[1] and q != p


def _brute_front(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    return {p for p in points if not any(_dominated(p, q) for q in points)}


def _brute_hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area of the union of the boxes [ref, p], on the grid of all coordinates."""
    pts = [p for p in points if p[0] > ref[0] and p[1] > ref[1]]
    xs = sorted({ref[0], *(p[0] for p in pts)})
    ys = sorted({ref[1], *(p[1] for p in pts)})
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:], strict=False), zip(ys, ys[1:], strict=False)):
        if any(p[0] >= x1 and p[1] >= y1 for p in pts):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(20))
def test_pareto_indices_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    # Coarse values so that ties and duplicates occur.
    points = [(rng.randint(0, 12) / 12, rng.randint(0, 12) / 3) for _ in range(n)]
    idx = pareto_indices(points)
    assert len(set(idx)) == len(idx)
    assert {points[i] for i in idx} == _brute_front(points)
    # Exact duplicates of a front point are reported once.
    assert len(idx) == len(_brute_front(points))


@pytest.mark.parametrize("seed", range(20))
def test_hypervolume_matches_brute_force(seed: int) -> None:
    rng = random.Random(100 + seed)
    points = [(rng.random(), rng.uniform(0, 4)) for _ in range(rng.randint(1, 30))]
    ref = (rng.uniform(-0.2, 0.5), rng.uniform(-0.5, 1.5))
    assert hypervolume(points, ref) == pytest.approx(_brute_hypervolume(points, ref), rel=1e-12, abs=1e-12)


def test_hypervolume_of_one_point_is_its_box() -> None:
    assert hypervolume([(0.9, 3.0)], (0.5, 1.0)) == pytest.approx(0.4 * 2.0)
    assert hypervolume([], (0.0, 0.0)) == 0.0


def test_points_not_beyond_the_reference_add_nothing() -> None:
    ref = (0.5, 1.0)
    inside = [(0.9, 3.0)]
    outside = [(0.4, 10.0), (0.95, 0.5), (0.5, 2.0), (0.7, 1.0)]  # worse than or level with the reference
    assert hypervolume(inside + outside, ref) == pytest.approx(hypervolume(inside, ref))
    assert hypervolume(outside, ref) == 0.0


def _trial(values: list[float] | None, state: TrialState = TrialState.COMPLETE, **attrs: object) -> optuna.trial.FrozenTrial:
    return create_trial(state=state, values=values, user_attrs=dict(attrs))


def _synthetic_study() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "maximize"])
    trials = [
        _trial([0.95, 2.0]),                                  # front
        _trial([0.945, 8.0]),                                 # front
        _trial([0.90, 4.0]),                                  # dominated by the one above
        _trial([0.94, 12.0], constraints=[3.0]),              # infeasible: never on the front
        _trial([0.99, 50.0], stopped_at_epoch=2),             # stopped, kept with partial values
        _trial(None, TrialState.PRUNED, stopped_at_epoch=1),  # stopped, pruned
        _trial(None, TrialState.PRUNED, stopped_at_epoch=2),
        _trial(None, TrialState.FAIL),
        _trial(None, TrialState.RUNNING),
        _trial(None, TrialState.WAITING),
    ]
    for t in trials:
        study.add_trial(t)
    return study


def test_study_stats_counts_states() -> None:
    study = _synthetic_study()
    s = study_stats(study, 0.95)
    assert s.done == 5 + 2  # complete (any) + pruned
    assert s.running == 1
    assert s.stopped == 3  # two pruned + one complete with partial values
    assert s.failed == 1
    assert s.infeasible == 1
    assert s.front == 2
    assert s.best_ratio_1pt == pytest.approx(8.0)  # within 1 point of 0.95, feasible, full budget
    assert "7/20 done" in s.line(20)


def test_front_and_hypervolume_use_exportable_trials_only() -> None:
    study = _synthetic_study()
    trials = study.get_trials()
    front = front_trials(trials)
    assert [t.values for t in front] == [[0.95, 2.0], [0.945, 8.0]]  # sorted by ratio
    ref = (0.95 - ACCURACY_FLOOR_POINTS / 100, 0.0)
    expected = hypervolume([(0.95, math.log(2.0)), (0.945, math.log(8.0))], ref)
    assert study_hypervolume(trials, 0.95) == pytest.approx(expected)


def test_empty_study_stats() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    s = study_stats(study, 0.9)
    assert (s.done, s.front, s.hypervolume, s.best_ratio_1pt) == (0, 0, 0.0, None)
    assert "best ratio within 1 pt: -" in s.line()
