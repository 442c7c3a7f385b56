"""Multi-objective early stopping.

Optuna's pruners refuse multi-objective studies (``trial.report`` raises). Here the compression
ratio of a plan is known before fine-tuning starts, and accuracy only rises during it by a
bounded amount. After each epoch a trial is stopped when a finished, feasible trial with an
equal or higher ratio already beats the trial's *optimistic* accuracy: its current accuracy plus
the headroom it could still gain.

The headroom is learned from finished trials that were at a similar accuracy (within
``window``) after the same epoch: the ``quantile`` of the gains they made from there to their
recorded (finalized) accuracy. Gains are heavy-tailed (on digits the median is about one point,
the 90th percentile 12-15 points), so a plain maximum over all curves lets one dramatic recovery
veto every stop; conditioning on the accuracy level keeps such recoveries where they happen (low
accuracies). Until ``min_curves`` such curves exist the stopper never stops. The rule was chosen
by replaying real digits studies (seeds 0-2) and confirmed on fresh seeds 3-5 in live runs:
35% of epochs saved at 200 trials, 40% at equal hypervolume (BENCHMARKS.md).

Only trials that trained their full budget count, as references and as curves
(:func:`objectives.objective.is_exportable`): a stopped trial is recorded PRUNED and never
enters the exported front, so stopping in its favour could leave a hole there, and its truncated
curve would understate the headroom (making stops too eager). The curves are the ``curve`` of
each trial's record, written after every epoch by the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from torch import nn

from models.train import EpochRecord, TrainHook
from objectives import record as trial_record
from objectives.objective import is_exportable


@dataclass(frozen=True)
class StopRule:
    """Parameters of the stopping rule.

    Attributes:
        min_curves: Finished curves near the trial's accuracy needed before it may be stopped.
        window: Curves whose accuracy after the same epoch is within this distance (0..1) of
            the trial's count as "near".
        quantile: Which quantile of the near curves' remaining gains is the headroom (1.0 = max).
        margin: Extra accuracy (0..1) added to the optimistic estimate: more margin, fewer stops.
    """

    min_curves: int = 5
    window: float = 0.05
    quantile: float = 0.75
    margin: float = 0.0


def gains_after(trials: list[optuna.trial.FrozenTrial], epoch: int) -> list[tuple[float, float]]:
    """``(accuracy after epoch, gain from there to the recorded accuracy)`` per finished trial."""
    out = []
    for t in trials:
        curve = t.user_attrs.get(trial_record.CURVE, [])
        if len(curve) >= epoch and t.values is not None:
            out.append((curve[epoch - 1], t.values[0] - curve[epoch - 1]))
    return out


def headroom(points: list[tuple[float, float]], level: float, rule: StopRule) -> float | None:
    """The ``rule.quantile`` of the gains of points within ``rule.window`` of ``level`` (None
    when fewer than ``rule.min_curves`` are that near)."""
    near = sorted(g for acc, g in points if abs(acc - level) <= rule.window)
    if not near or len(near) < rule.min_curves:
        return None
    return near[min(len(near) - 1, int(rule.quantile * len(near)))]


class ParetoStopper:
    """Builds a per-trial :class:`StopHook` (pass ``stopper.hook`` to the Objective)."""

    def __init__(self, rule: StopRule | None = None) -> None:
        self.rule = rule or StopRule()

    def hook(self, trial: optuna.Trial, ratio: float, epochs: int) -> TrainHook | None:
        """A hook for ``trial`` (None when there is nothing to decide: a single epoch)."""
        return StopHook(self.rule, trial, ratio) if epochs > 1 else None


class StopHook(TrainHook):
    """Decides after each epoch whether the trial goes on."""

    def __init__(self, rule: StopRule, trial: optuna.Trial, ratio: float) -> None:
        self.rule, self.trial, self.ratio = rule, trial, ratio

    def on_epoch_end(self, model: nn.Module, record: EpochRecord) -> bool:
        """Stop when a finished trial with ratio >= ours beats our optimistic accuracy."""
        finished = [
            t for t in self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if is_exportable(t) and trial_record.CURVE in t.user_attrs
        ]
        better = [t.values[0] for t in finished if t.values[1] >= self.ratio]
        if not better:
            return False
        room = headroom(gains_after(finished, record.epoch), record.val_accuracy, self.rule)
        if room is None:
            return False
        return max(better) > record.val_accuracy + room + self.rule.margin
