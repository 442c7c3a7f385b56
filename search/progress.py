"""Study statistics and the live progress display.

The hypervolume uses a fixed reference point so that numbers are comparable across runs and
samplers: accuracy floor = baseline accuracy - 10 points, compression ratio 1, and the ratio
axis in log scale (doubling the ratio counts the same at 2x as at 40x). ``search.export`` leaves
plans below the same floor out of the exported front (``--accuracy-floor``).

The live display (:class:`ProgressDisplay`) re-reads the study from its storage every few
seconds, not only when a trial ends: the trials running now (this process's, or those of
``--jobs`` workers, which are other processes), the time elapsed and an estimate of the time
left. It fits an 80-column terminal.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from objectives import record
from objectives.objective import is_exportable, is_feasible

if TYPE_CHECKING:
    from rich.table import Table

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
    mean_seconds: float | None = None  # mean duration of the finished (COMPLETE, PRUNED) trials

    def eta_seconds(self, total: int) -> float | None:
        """Estimated seconds until ``total`` trials are done: the trials left times the mean
        duration of the finished ones, divided by the trials running now (the workers); None
        before any trial has finished."""
        left = total - self.done
        if left <= 0:
            return 0.0
        if self.mean_seconds is None:
            return None
        return left * self.mean_seconds / max(1, self.running)

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
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in (*complete, *by[TrialState.PRUNED])
        if t.datetime_start is not None and t.datetime_complete is not None
    ]
    return StudyStats(
        done=len(complete) + len(by[TrialState.PRUNED]),
        running=len(by[TrialState.RUNNING]),
        stopped=len(by[TrialState.PRUNED]) + len(partial),
        failed=len(by[TrialState.FAIL]),
        infeasible=len(complete) - len(feasible),
        front=len(front_trials(complete)),
        hypervolume=study_hypervolume(complete, baseline_accuracy),
        best_ratio_1pt=max(near) if near else None,
        mean_seconds=sum(durations) / len(durations) if durations else None,
    )


def format_duration(seconds: float | None) -> str:
    """``42s``, ``4m05s``, ``1h02m``, ``2d03h`` (at most 6 characters); ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class ProgressDisplay:
    """A rich live table on a terminal; plain lines otherwise (CI, logs).

    The table is redrawn twice a second from a background thread; the study's statistics are
    read from its storage at most every ``refresh_seconds`` (and at every :meth:`update`), so
    the trials running now are counted while they run: this process's trial as well as those
    of ``--jobs`` workers, which are other processes writing to the same storage."""

    def __init__(self, study: optuna.Study, baseline_accuracy: float, total: int, *,
                 console: Any | None = None, refresh_seconds: float = 2.0) -> None:
        self.study, self.baseline_accuracy, self.total = study, baseline_accuracy, total
        self.refresh_seconds = refresh_seconds
        self.start = time.monotonic()
        self._stats = study_stats(study, baseline_accuracy)
        self._read_at = self.start
        self.live = None
        if console is not None or sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(get_renderable=self.render, console=console, refresh_per_second=2)

    def __enter__(self) -> ProgressDisplay:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def stats(self, *, force: bool = False) -> StudyStats:
        """The study's statistics, read again when older than ``refresh_seconds``."""
        now = time.monotonic()
        if force or now - self._read_at >= self.refresh_seconds:
            try:
                self._stats = study_stats(self.study, self.baseline_accuracy)
            except Exception:  # a display must never end a search; the next read may work
                pass
            self._read_at = now
        return self._stats

    def render(self) -> Table:
        """The table: trial counts, then the front, the time elapsed and the time left. Two
        label rows over two value rows keep it within 80 columns (no header is cut)."""
        from rich import box
        from rich.table import Table

        s = self.stats()
        elapsed = time.monotonic() - self.start
        table = Table(title=f"study {self.study.study_name}", show_header=False, box=box.ROUNDED)
        for _ in range(5):
            table.add_column(justify="right", no_wrap=True)
        table.add_row("done", "running", "stopped", "failed", "infeasible", style="bold")
        table.add_row(f"{s.done}/{self.total}", str(s.running), str(s.stopped), str(s.failed), str(s.infeasible))
        table.add_section()
        table.add_row("front", "hypervolume", "best ratio <=1 pt", "elapsed", "ETA", style="bold")
        table.add_row(
            str(s.front), f"{s.hypervolume:.4f}", f"{s.best_ratio_1pt:.1f}x" if s.best_ratio_1pt else "-",
            format_duration(elapsed), format_duration(s.eta_seconds(self.total)),
        )
        return table

    def update(self, *_: object) -> None:
        """Read the study again and show it (usable as an Optuna callback)."""
        stats = self.stats(force=True)
        if self.live is not None:
            self.live.refresh()
        else:
            elapsed = format_duration(time.monotonic() - self.start)
            print(f"{stats.line(self.total)} | {elapsed} elapsed, ETA {format_duration(stats.eta_seconds(self.total))}",
                  flush=True)
