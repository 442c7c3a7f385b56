"""Study statistics and the live progress display.

The hypervolume uses a fixed reference point so that numbers are comparable across runs and
samplers: accuracy floor = baseline accuracy - 10 points, compression ratio 1, and the ratio
axis in log scale (doubling the ratio counts the same at 2x as at 40x).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from objectives import record
from objectives.objective import is_exportable, is_feasible

ACCURACY_FLOOR_POINTS = 10.0


def pareto_indices(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates maximised)."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_y = [], -math.inf
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (maximised) above ``reference``, 2-D."""
    pts = [(x, y) for x, y in points if x > reference[0] and y > reference[1]]
    if not pts:
        return 0.0
    front = sorted((pts[i] for i in pareto_indices(pts)), key=lambda p: -p[0])
    area, prev_y = 0.0, reference[1]
    for x, y in front:  # x descending, y ascending along the front
        area += (x - reference[0]) * (y - prev_y)
        prev_y = y
    return area


def front_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """Exportable trials (COMPLETE, feasible, full budget) on the accuracy/ratio Pareto front."""
    ok = [t for t in trials if is_exportable(t)]
    idx = pareto_indices([(t.values[0], t.values[1]) for t in ok])
    return sorted((ok[i] for i in idx), key=lambda t: t.values[1])


def study_hypervolume(trials: Sequence[FrozenTrial], baseline_accuracy: float) -> float:
    """Hypervolume of (accuracy, log ratio) of the exportable trials, fixed reference (module doc)."""
    ok = [t for t in trials if is_exportable(t)]
    ref = (baseline_accuracy - ACCURACY_FLOOR_POINTS / 100.0, 0.0)
    return hypervolume([(t.values[0], math.log(t.values[1])) for t in ok if t.values[1] > 0], ref)


@dataclass(frozen=True)
class StudyStats:
    """Counts and front summary of a study."""

    done: int
    running: int
    stopped: int
    failed: int
    infeasible: int
    front: int
    hypervolume: float
    best_ratio_1pt: float | None

    def line(self, total: int | None = None) -> str:
        """One-line summary."""
        best = f"{self.best_ratio_1pt:.1f}x" if self.best_ratio_1pt else "-"
        of = f"/{total}" if total else ""
        return (
            f"trials {self.done}{of} done, {self.running} running, {self.stopped} stopped, {self.failed} failed, "
            f"{self.infeasible} infeasible | front {self.front} | HV {self.hypervolume:.4f} | best ratio within 1 pt: {best}"
        )


def study_stats(study: optuna.Study, baseline_accuracy: float) -> StudyStats:
    """Statistics of ``study`` against the baseline accuracy."""
    trials = study.get_trials(deepcopy=False)
    by = {s: [t for t in trials if t.state == s] for s in TrialState}
    complete = by[TrialState.COMPLETE]
    # Stopped trials are PRUNED; studies made while a hidden option recorded them COMPLETE with
    # partial values may still hold such trials (marked by stopped_at_epoch).
    partial = [t for t in complete if record.STOPPED_AT_EPOCH in t.user_attrs]
    feasible = [t for t in complete if t.values is not None and is_feasible(t)]
    near = [t.values[1] for t in feasible if is_exportable(t) and t.values[0] >= baseline_accuracy - 0.01]
    return StudyStats(
        done=len(complete) + len(by[TrialState.PRUNED]),
        running=len(by[TrialState.RUNNING]),
        stopped=len(by[TrialState.PRUNED]) + len(partial),
        failed=len(by[TrialState.FAIL]),
        infeasible=len(complete) - len(feasible),
        front=len(front_trials(complete)),
        hypervolume=study_hypervolume(complete, baseline_accuracy),
        best_ratio_1pt=max(near) if near else None,
    )


class ProgressDisplay:
    """A rich live table on a terminal; plain lines otherwise (CI, logs)."""

    def __init__(self, study: optuna.Study, baseline_accuracy: float, total: int) -> None:
        self.study, self.baseline_accuracy, self.total = study, baseline_accuracy, total
        self.live = None
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._table(study_stats(study, baseline_accuracy)), refresh_per_second=2)

    def __enter__(self) -> ProgressDisplay:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def _table(self, s: StudyStats) -> object:
        from rich.table import Table

        table = Table(title=f"study {self.study.study_name}", show_header=True)
        for col in ("done", "running", "stopped", "failed", "infeasible", "front", "hypervolume", "best ratio (<=1 pt)"):
            table.add_column(col, justify="right")
        table.add_row(
            f"{s.done}/{self.total}", str(s.running), str(s.stopped), str(s.failed), str(s.infeasible),
            str(s.front), f"{s.hypervolume:.4f}", f"{s.best_ratio_1pt:.1f}x" if s.best_ratio_1pt else "-",
        )
        return table

    def update(self, *_: object) -> None:
        """Refresh (usable as an Optuna callback)."""
        stats = study_stats(self.study, self.baseline_accuracy)
        if self.live is not None:
            self.live.update(self._table(stats))
        else:
            print(stats.line(self.total), flush=True)
