"""search.progress: Pareto front and hypervolume against brute force, study statistics, the live
display (running trials counted while they run, elapsed time and ETA, 80 columns), and
search.apply's per-epoch progress on stderr."""

from __future__ import annotations

import datetime
import io
import itertools
import json
import math
import random
import re
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState, create_trial
from rich.console import Console

from search.progress import (
    ACCURACY_FLOOR_POINTS,
    ProgressDisplay,
    format_duration,
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


# ------------------------------------------------------------------------------ live display


def _render(display: ProgressDisplay, width: int = 80) -> list[str]:
    buf = io.StringIO()
    Console(width=width, file=buf, color_system=None, force_terminal=False).print(display.render())
    return buf.getvalue().splitlines()


def _cells(lines: list[str]) -> list[list[str]]:
    """The table's rows as lists of cell texts (border lines left out)."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in lines if line.strip().startswith("│")]


def _value(lines: list[str], header: str) -> str:
    """The value under ``header`` (each label row is followed by its value row)."""
    rows = _cells(lines)
    for labels, values in zip(rows, rows[1:], strict=False):
        if header in labels:
            return values[labels.index(header)]
    raise AssertionError(f"no column {header!r} in {lines}")


HEADERS = ("done", "running", "stopped", "failed", "infeasible", "front", "hypervolume", "best ratio <=1 pt",
           "elapsed", "ETA")


def test_the_table_fits_80_columns_with_whole_headers() -> None:
    study = optuna.create_study(study_name="all-cifar10-resnet18", directions=["maximize", "maximize"])
    for i in range(30):
        study.add_trial(_trial([0.9 + i / 1000, 1.5 ** i]))
    display = ProgressDisplay(study, 0.95, 2000, console=Console(width=80, file=io.StringIO()))
    lines = _render(display)
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    cells = [c for row in _cells(lines) for c in row]
    for header in HEADERS:  # whole, in a cell of their own: neither cut ("infeasi...") nor wrapped
        assert header in cells, (header, lines)
    assert not any("…" in line or "..." in line for line in lines)
    assert _value(lines, "done") == "30/2000"
    assert "study all-cifar10-resnet18" in lines[0]


def test_running_trials_are_counted_while_they_run() -> None:
    study = _synthetic_study()  # one RUNNING trial among others
    display = ProgressDisplay(study, 0.95, 20, refresh_seconds=0.0, console=Console(width=80, file=io.StringIO()))
    assert _value(_render(display), "running") == "1"
    study.ask()  # a trial starts after the display was made: counted at the next read, not at the trial's end
    assert _value(_render(display), "running") == "2"


def test_running_trials_of_other_processes_are_read_from_the_storage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=url, directions=["maximize", "maximize"])
    display = ProgressDisplay(study, 0.95, 8, refresh_seconds=0.0, console=Console(width=80, file=io.StringIO()))
    assert _value(_render(display), "running") == "0"
    # A --jobs worker is another process with its own connection to the storage.
    worker = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(url))
    worker.ask()
    worker.ask()
    assert _value(_render(display), "running") == "2"


def test_the_table_is_read_again_only_after_refresh_seconds() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    display = ProgressDisplay(study, 0.95, 8, refresh_seconds=3600.0, console=Console(width=80, file=io.StringIO()))
    study.ask()
    assert _value(_render(display), "running") == "0"  # cached: a large study is not re-read every frame
    display.update()  # an Optuna callback (a trial ended) reads it at once
    assert _value(_render(display), "running") == "1"


def _timed(number: int, seconds: float, state: TrialState = TrialState.COMPLETE) -> FrozenTrial:
    start = datetime.datetime(2026, 1, 1, 12, 0, 0)
    return FrozenTrial(
        number=number, state=state, value=None, values=[0.9, 2.0] if state == TrialState.COMPLETE else None,
        datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=seconds), params={},
        distributions={}, user_attrs={}, system_attrs={}, intermediate_values={}, trial_id=number,
    )


def test_eta_from_the_mean_duration_and_the_budget_left() -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    for i, seconds in enumerate([10.0, 20.0, 30.0]):
        study.add_trial(_timed(i, seconds))
    study.add_trial(_timed(3, 40.0, TrialState.PRUNED))  # stopped trials took time too
    stats = study_stats(study, 0.95)
    assert stats.mean_seconds == pytest.approx(25.0)
    assert stats.eta_seconds(10) == pytest.approx(6 * 25.0)  # 6 trials left, one at a time
    study.ask()
    study.ask()  # two workers: the trials left are shared
    assert study_stats(study, 0.95).eta_seconds(10) == pytest.approx(6 * 25.0 / 2)
    assert stats.eta_seconds(4) == 0.0
    assert study_stats(optuna.create_study(directions=["maximize", "maximize"]), 0.9).eta_seconds(10) is None
    display = ProgressDisplay(study, 0.95, 10, console=Console(width=80, file=io.StringIO()))
    lines = _render(display)
    assert _value(lines, "ETA") == "1m15s"
    assert re.fullmatch(r"\d+s", _value(lines, "elapsed"))


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (math.inf, "-"), (0.4, "0s"), (42, "42s"), (245, "4m05s"), (3720, "1h02m"), (183600, "2d03h"),
])
def test_durations_are_short(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_plain_lines_carry_elapsed_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.add_trial(_timed(0, 30.0))
    display = ProgressDisplay(study, 0.95, 3)  # stdout is not a terminal under pytest: plain lines
    assert display.live is None
    display.update()
    line = capsys.readouterr().out.strip()
    assert "1/3 done" in line and line.endswith("elapsed, ETA 1m00s"), line


# ------------------------------------------------------------------------- search.apply progress


def test_apply_reports_each_epoch_on_stderr_and_keeps_stdout_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from search import apply as apply_cli

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"steps": [{"technique": "int", "config": {"bits": 4}}]}))
    apply_cli.main([str(plan), "--preset", "digits", "--epochs", "2", "--out", str(tmp_path / "m.pcz"),
                    "--store", str(tmp_path / "store"), "--data-dir", str(tmp_path)])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)  # stdout is the JSON summary alone
    assert summary["families"] == "int"
    err = captured.err.splitlines()
    start = next(i for i, line in enumerate(err) if "fine-tuning 2 epochs" in line)
    epochs = err[start + 1:start + 3]
    for k, line in enumerate(epochs, start=1):
        assert re.fullmatch(rf"epoch {k}/2 loss \d+\.\d+ val (\d\.\d{{4}}) \(\d+\.\ds\)", line), line
    assert float(epochs[-1].split(" val ")[1].split()[0]) >= 0.0
    assert err[start + 3].startswith("done in ") and "ratio" in err[start + 3]
