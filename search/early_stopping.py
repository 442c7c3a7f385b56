"""Multi-objective early stopping.

Optuna's pruners refuse multi-objective studies (``trial.report`` raises). Here the compression
ratio of a plan is known before fine-tuning starts, and accuracy only rises during it by a
bounded amount. After each epoch a trial is stopped when a finished, feasible trial with an
equal or higher ratio already beats the trial's *optimistic* accuracy: its current accuracy plus
the largest gain that finished curves of the same family made from that epoch to their end.
Until enough curves exist the stopper never stops (conservative by construction).

Only trials that trained their full budget count, as references and as curves: a stopped trial
recorded COMPLETE with partial values (``stopped_as="complete"``) never enters the exported front,
so stopping in its favour could leave a hole there, and its truncated curve would understate the
headroom (making stops too eager).
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from torch import nn

from models.train import EpochRecord, TrainHook
from objectives.objective import is_exportable


@dataclass(frozen=True)
class StopRule:
    """Parameters of the stopping rule.

    Attributes:
        min_curves: Finished curves of a family needed before its trials may be stopped (the
            pooled curves of all families are used, with twice this many, when a family has few).
        margin: Extra accuracy (0..1) added to the optimistic estimate: more margin, fewer stops.
    """

    min_curves: int = 5
    margin: float = 0.0


def headroom(curves: list[list[float]], epoch: int) -> float | None:
    """The largest gain from ``epoch`` (1-based) to the end among ``curves`` long enough."""
    gains = [c[-1] - c[epoch - 1] for c in curves if len(c) > epoch]
    return max(gains) if gains else None


class ParetoStopper:
    """Builds a per-trial :class:`StopHook` (pass ``stopper.hook`` to the Objective)."""

    def __init__(self, rule: StopRule | None = None) -> None:
        self.rule = rule or StopRule()

    def hook(self, trial: optuna.Trial, family: str, ratio: float, epochs: int) -> TrainHook | None:
        """A hook for ``trial`` (None when there is nothing to decide: a single epoch)."""
        return StopHook(self.rule, trial, family, ratio) if epochs > 1 else None


class StopHook(TrainHook):
    """Records the validation curve on the trial and decides after each epoch."""

    def __init__(self, rule: StopRule, trial: optuna.Trial, family: str, ratio: float) -> None:
        self.rule, self.trial, self.family, self.ratio = rule, trial, family, ratio
        self.curve: list[float] = []

    def on_epoch_end(self, model: nn.Module, record: EpochRecord) -> bool:
        """Stop when a finished trial with ratio >= ours beats our optimistic accuracy."""
        self.curve.append(record.val_accuracy)
        self.trial.set_user_attr("curve", self.curve)
        finished = [
            t for t in self.trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if is_exportable(t) and "curve" in t.user_attrs
        ]
        better = [t.values[0] for t in finished if t.values[1] >= self.ratio]
        if not better:
            return False
        room = self._headroom(finished, record.epoch)
        if room is None:
            return False
        return max(better) > record.val_accuracy + room + self.rule.margin

    def _headroom(self, finished: list[optuna.trial.FrozenTrial], epoch: int) -> float | None:
        own = [t.user_attrs["curve"] for t in finished if t.user_attrs.get("families") == self.family]
        if len(own) >= self.rule.min_curves:
            return headroom(own, epoch)
        pooled = [t.user_attrs["curve"] for t in finished]
        if len(pooled) >= 2 * self.rule.min_curves:
            return headroom(pooled, epoch)
        return None
