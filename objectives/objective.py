"""The Optuna objective: a trial's plan -> (validation accuracy, compression ratio[, BitOPs]).

Infeasible plans (over ``max_bytes`` or under ``min_ratio``, known before any training) are
recorded with their untrained accuracy and a positive constraint value, and spend no training.
Constraint values live in the user attribute ``constraints`` (<= 0 is feasible); samplers read
them through :func:`constraints_of`. Early stopping is injected as a hook factory so that this
package does not depend on ``search``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from models.train import TrainHook, evaluate_split
from objectives.pipeline import Outcome, Workbench, finish, prepare
from objectives.size import bitops
from spaces.plan import Plan, StudySpace, suggest_plan
from spaces.policy import LayerPolicy

STOPPED_AS = ("pruned", "complete")
OBJECTIVES = {"acc": ("val_accuracy", "maximize"), "ratio": ("compression_ratio", "maximize"), "bitops": ("bitops", "minimize")}
StopFactory = Callable[[optuna.Trial, str, float, int], TrainHook | None]


def parse_objectives(spec: str) -> tuple[str, ...]:
    """``"acc,ratio[,bitops]"`` -> names; accuracy and ratio are always the first two."""
    from models.errors import UserError

    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if names[:2] != ("acc", "ratio") or any(n not in OBJECTIVES for n in names) or len(set(names)) != len(names):
        raise UserError(f"--objectives {spec!r} is not valid; use acc,ratio or acc,ratio,bitops")
    return names


@dataclass(frozen=True)
class Constraints:
    """Declared limits; a violated one makes a trial infeasible (never on the exported front).

    ``max_accuracy_drop`` is in accuracy points (2.0 = two points below the baseline).
    """

    max_bytes: int | None = None
    min_ratio: float | None = None
    max_accuracy_drop: float | None = None

    def before_training(self, nbytes: int, ratio: float) -> list[float]:
        """Violations known from the size alone (positive = violated)."""
        out = []
        if self.max_bytes is not None:
            out.append(float(nbytes - self.max_bytes))
        if self.min_ratio is not None:
            out.append(self.min_ratio - ratio)
        return out

    def after_training(self, baseline_acc: float, acc: float) -> list[float]:
        """Violation of the accuracy-drop limit (positive = violated)."""
        if self.max_accuracy_drop is None:
            return []
        return [(baseline_acc - acc) * 100.0 - self.max_accuracy_drop]


def constraints_of(trial: optuna.trial.FrozenTrial) -> Sequence[float]:
    """Constraint values of a finished trial, for samplers' ``constraints_func``."""
    return trial.user_attrs.get("constraints", [0.0]) or [0.0]


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """True when every constraint value is <= 0."""
    return all(c <= 0 for c in constraints_of(trial))


def is_exportable(trial: optuna.trial.FrozenTrial) -> bool:
    """True for a COMPLETE, feasible trial that trained its full budget.

    A stopped trial recorded COMPLETE with its partial values (``stopped_as="complete"``, marked
    by the user attribute ``stopped_at_epoch``) informs the sampler but never enters the front:
    applying its plan trains the full budget, so its recorded point is not reproducible.
    """
    return (
        trial.state == optuna.trial.TrialState.COMPLETE
        and trial.values is not None
        and "stopped_at_epoch" not in trial.user_attrs
        and is_feasible(trial)
    )


class Objective:
    """Callable objective for ``study.optimize``."""

    def __init__(
        self,
        bench: Workbench,
        space: StudySpace,
        *,
        objectives: tuple[str, ...] = ("acc", "ratio"),
        constraints: Constraints | None = None,
        stopper: StopFactory | None = None,
        artifact_store: Any | None = None,
        policy: LayerPolicy | None = None,
        finetune_space: dict[str, tuple[float, float]] | None = None,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
        stopped_as: str = "pruned",
    ) -> None:
        if stopped_as not in STOPPED_AS:
            from models.errors import UserError

            raise UserError(f"stopped_as {stopped_as!r} is not valid; use {' or '.join(STOPPED_AS)}")
        self.stopped_as = stopped_as
        self.bench, self.space, self.objectives = bench, space, objectives
        self.constraints = constraints or Constraints()
        self.stopper, self.artifact_store = stopper, artifact_store
        self.policy, self.finetune_space, self.seed, self.log = policy, finetune_space, seed, log

    def trial_seed(self, trial: optuna.Trial) -> int:
        """The seed a trial (and ``search.apply`` of its plan) uses."""
        return self.seed * 100_003 + trial.number

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        """Run one trial."""
        start = time.perf_counter()
        plan = suggest_plan(trial, self.space, self.policy, self.finetune_space)
        seed = self.trial_seed(trial)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("families", plan.families)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", _device_name(self.bench.device))
        prepared = prepare(self.bench, plan, seed)
        predicted_ratio = self.bench.baseline_bytes / prepared.predicted_bytes
        trial.set_user_attr("predicted_bytes", prepared.predicted_bytes)
        violations = self.constraints.before_training(prepared.predicted_bytes, predicted_ratio)
        if any(v > 0 for v in violations):
            return self._infeasible(trial, prepared.model, prepared.predicted_bytes, predicted_ratio, violations, start)
        hooks = []
        if self.stopper is not None:
            epochs = plan.finetune.get("epochs", self.bench.preset.finetune.epochs)
            hook = self.stopper(trial, plan.families, predicted_ratio, int(epochs))
            if hook is not None:
                hooks.append(hook)
        outcome = finish(self.bench, prepared, extra_hooks=hooks)
        self._record(trial, outcome, start)
        violations += self.constraints.after_training(self.bench.record.val_accuracy, outcome.val_accuracy)
        trial.set_user_attr("constraints", violations or [0.0])
        if outcome.stopped:
            trial.set_user_attr("stopped_at_epoch", outcome.epochs)
            if self.stopped_as == "pruned":
                raise optuna.TrialPruned(f"stopped after epoch {outcome.epochs}: dominated by a finished trial")
        else:
            self._upload(trial, outcome)  # a stopped trial is never exported: no artifact
        values: list[float] = [outcome.val_accuracy, outcome.ratio]
        if "bitops" in self.objectives:
            values.append(float(bitops(outcome.model, self.bench.input_shape())))
        return tuple(values)

    def _infeasible(self, trial: optuna.Trial, model: torch.nn.Module, nbytes: int, ratio: float,
                    violations: list[float], start: float) -> tuple[float, ...]:
        acc = evaluate_split(model, self.bench.data, "val", self.bench.device)
        trial.set_user_attr("constraints", violations)
        trial.set_user_attr("infeasible", "size constraint violated before training")
        trial.set_user_attr("bytes", nbytes)
        trial.set_user_attr("wall_seconds", time.perf_counter() - start)
        values: list[float] = [acc, ratio]
        if "bitops" in self.objectives:
            values.append(float(bitops(model, self.bench.input_shape())))
        return tuple(values)

    def _record(self, trial: optuna.Trial, outcome: Outcome, start: float) -> None:
        trial.set_user_attr("bytes", outcome.bytes)
        trial.set_user_attr("breakdown", outcome.breakdown)
        trial.set_user_attr("curve", outcome.curve)
        trial.set_user_attr("epochs", outcome.epochs)
        trial.set_user_attr("wall_seconds", time.perf_counter() - start)
        if self.log:
            self.log(
                f"trial {trial.number}: {outcome.plan.families} acc {outcome.val_accuracy:.4f} "
                f"ratio {outcome.ratio:.2f} ({outcome.bytes} B){' stopped' if outcome.stopped else ''}"
            )

    def _upload(self, trial: optuna.Trial, outcome: Outcome) -> None:
        if self.artifact_store is None:
            return
        from optuna.artifacts import upload_artifact

        with tempfile.TemporaryDirectory() as tmp:
            pcz, plan_file = Path(tmp) / f"trial-{trial.number}.pcz", Path(tmp) / f"trial-{trial.number}.plan.json"
            pcz.write_bytes(outcome.artifact)
            plan_file.write_text(json.dumps(plan_record(outcome.plan, self.bench, trial.user_attrs["seed"]), indent=2))
            ids = {
                "artifact_id": upload_artifact(artifact_store=self.artifact_store, file_path=str(pcz), study_or_trial=trial),
                "plan_artifact_id": upload_artifact(artifact_store=self.artifact_store, file_path=str(plan_file), study_or_trial=trial),
            }
        for k, v in ids.items():
            trial.set_user_attr(k, v)


def plan_record(plan: Plan, bench: Workbench, seed: int, **extra: Any) -> dict[str, Any]:
    """The plan file: the plan plus what rebuilds its model (preset, dataset, seeds)."""
    return {
        "plan": plan.to_dict(),
        "preset": bench.preset.name,
        "dataset": bench.data.name,
        "baseline_seed": bench.seed,
        "seed": seed,
        "baseline_bytes": bench.baseline_bytes,
        **extra,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
