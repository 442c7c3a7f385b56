"""The Optuna objective: a trial's plan -> (validation accuracy, compression ratio[, BitOPs]).

Every trial writes its :class:`objectives.record.TrialRecord` to its user attributes as the
fields become known (the plan first, before anything can fail). Infeasible plans (over
``max_bytes`` or under ``min_ratio``, known before any training) are recorded with their
untrained accuracy and a positive constraint value, and spend no training. Constraint values
live in the record's ``constraints`` (<= 0 is feasible); samplers read them through
:func:`constraints_of`. Early stopping is injected as a hook factory so that this package does
not depend on ``search``; a stopped trial is recorded PRUNED, its record keeping the epoch it
stopped after and its (accuracy, ratio) at that point.

A *refinement trial* (enqueued by ``search.refine`` with ``refine_of``/``fidelity_epochs``)
re-trains its parent search trial's recorded plan with that many fine-tune epochs and the
parent's seed, never stopped early (:meth:`Objective.refinement`).
"""

from __future__ import annotations

import dataclasses
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
from torch import nn

from models.train import EpochRecord, TrainHook, evaluate_split
from objectives import record
from objectives.pipeline import Outcome, Workbench, finish, prepare
from objectives.sensitivity import SensitivityProfile
from objectives.size import bitops
from spaces.plan import Plan, StudySpace, compressible_layers, suggest_plan
from spaces.policy import LayerPolicy
from spaces.registry import techniques

OBJECTIVES = {"acc": ("val_accuracy", "maximize"), "ratio": ("compression_ratio", "maximize"), "bitops": ("bitops", "minimize")}
StopFactory = Callable[[optuna.Trial, float, int], TrainHook | None]  # (trial, ratio, epochs)


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
    return trial.user_attrs.get(record.CONSTRAINTS, [0.0]) or [0.0]


def is_feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """True when every constraint value is <= 0."""
    return all(c <= 0 for c in constraints_of(trial))


def is_refinement(trial: optuna.trial.FrozenTrial | optuna.Trial) -> bool:
    """True for a refinement trial (``search.refine``): a search trial's plan re-trained with a
    longer fine-tune, marked by ``refine_of`` when it was enqueued."""
    return record.REFINE_OF in trial.user_attrs


def is_exportable(trial: optuna.trial.FrozenTrial) -> bool:
    """True for a COMPLETE, feasible search trial that trained its full budget.

    Refinement trials are not: they trained another budget, so they are neither on the search
    front nor references for early stopping; export shows them beside their parent.

    Stopped trials are recorded PRUNED; studies made while a hidden option recorded them COMPLETE
    with partial values (marked by ``stopped_at_epoch``) may still hold such trials, and those
    never enter the front: applying their plan trains the full budget, so their recorded point is
    not reproducible.
    """
    return (
        trial.state == optuna.trial.TrialState.COMPLETE
        and trial.values is not None
        and record.STOPPED_AT_EPOCH not in trial.user_attrs
        and not is_refinement(trial)
        and is_feasible(trial)
    )


class CurveRecorder(TrainHook):
    """Writes the validation curve to the trial's record after every epoch (a stopped or
    failed trial keeps the epochs it ran)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.curve: list[float] = []

    def on_epoch_end(self, model: nn.Module, epoch: EpochRecord) -> bool:
        """Record the epoch's validation accuracy; never stops."""
        self.curve.append(epoch.val_accuracy)
        record.write(self.trial, curve=self.curve)
        return False


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
    ) -> None:
        self.bench, self.space, self.objectives = bench, space, objectives
        self.constraints = constraints or Constraints()
        self.stopper, self.artifact_store = stopper, artifact_store
        self.policy, self.finetune_space, self.seed, self.log = policy, finetune_space, seed, log
        self._context: dict[str, Any] | None = None
        # Few layers (the LeNets, the digits CNN): each eligible layer samples its own intensity.
        # More (ResNets): one skew per technique, resolved by the baseline's sensitivity profile.
        # per_layer_max == 0 (studies made before per-layer sampling): uniform plans only.
        few = len(compressible_layers(bench.baseline)) <= space.per_layer_max
        known = techniques()
        deep = space.per_layer_max > 0 and space.skew and not few
        self.skewed = [n for n in space.technique_names() if deep and n in known and known[n].stronger]
        base = policy or LayerPolicy()
        eligible = [p for p, _ in base.eligible(bench.baseline)]
        self.layers = eligible if few or self.skewed else []
        # Few layers: a plan may also open the protected ends (spaces.plan.suggest_plan).
        opened = dataclasses.replace(base, keep_first=False, keep_last=False)
        unprotected = [p for p, _ in opened.eligible(bench.baseline)]
        self.open_layers = unprotected if few and space.open_ends and unprotected != eligible else []

    def context(self) -> dict[str, Any]:
        """Record fields every trial of this worker shares (the manifest hashes the dataset:
        computed once, on the first trial)."""
        if self._context is None:
            b = self.bench
            self._context = dict(
                preset=b.preset.name, dataset=b.data.name, baseline_seed=b.seed, baseline_key=b.record.key,
                baseline_bytes=b.baseline_bytes, device=_device_name(b.device), manifest=record.manifest(b.data),
            )
        return self._context

    def sensitivity(self) -> SensitivityProfile | None:
        """The baseline's sensitivity profile on a deep model whose space has techniques to skew
        (None otherwise): loaded or measured on the first trial that needs it, not before."""
        if not self.skewed:
            return None
        return self.bench.sensitivity(self.policy or LayerPolicy(), self.skewed, log=self.log)

    def trial_seed(self, trial: optuna.Trial) -> int:
        """The seed a trial (and ``search.apply`` of its plan) uses."""
        return self.seed * 100_003 + trial.number

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        """Run one trial."""
        start = time.perf_counter()
        refining = is_refinement(trial)
        if refining:
            plan, seed = self.refinement(trial)
        else:
            plan = suggest_plan(trial, self.space, self.policy, self.finetune_space, self.layers, self.sensitivity(),
                               self.open_layers)
            seed = self.trial_seed(trial)
        # The plan first, before anything can fail: a failed trial still shows what it ran.
        record.write(trial, plan=plan.to_dict(), families=plan.families, seed=seed, **self.context())
        prepared = prepare(self.bench, plan, seed)
        predicted_ratio = self.bench.baseline_bytes / prepared.predicted_bytes
        record.write(trial, predicted_bytes=prepared.predicted_bytes)
        violations = self.constraints.before_training(prepared.predicted_bytes, predicted_ratio)
        if any(v > 0 for v in violations):
            return self._infeasible(trial, prepared.model, prepared.predicted_bytes, predicted_ratio, violations, start)
        hooks: list[TrainHook] = [CurveRecorder(trial)]
        if self.stopper is not None and not refining:  # a refinement is never stopped early
            epochs = plan.finetune.get("epochs", self.bench.preset.finetune.epochs)
            hook = self.stopper(trial, predicted_ratio, int(epochs))
            if hook is not None:
                hooks.append(hook)
        outcome = finish(self.bench, prepared, extra_hooks=hooks)
        violations += self.constraints.after_training(self.bench.record.val_accuracy, outcome.val_accuracy)
        self._record(trial, outcome, violations, start)
        values: list[float] = [outcome.val_accuracy, outcome.ratio]
        if outcome.stopped:
            # PRUNED (Optuna keeps no values): the record keeps where it stopped and its values
            # there, for export's table. A stopped trial is never exported: no artifact.
            names = [OBJECTIVES[o][0] for o in self.objectives[:2]]
            record.write(trial, stopped_at_epoch=outcome.epochs, stopped_values=dict(zip(names, values, strict=True)))
            raise optuna.TrialPruned(f"stopped after epoch {outcome.epochs}: dominated by a finished trial")
        if "bitops" in self.objectives:
            values.append(float(bitops(outcome.model, self.bench.input_shape())))
        self._upload(trial, outcome, values)
        return tuple(values)

    def refinement(self, trial: optuna.Trial) -> tuple[Plan, int]:
        """The plan and seed of a refinement trial: its parent's recorded plan with
        ``finetune.epochs`` set to the trial's fidelity (so its plan file names its epochs and
        ``search.apply`` of it reproduces its bytes), and the parent's seed."""
        from models.errors import UserError

        # The trial was enqueued with the parent's params: suggesting them again (fixed values)
        # gives it the parent's params and distributions, as the samplers and dashboard expect.
        suggest_plan(trial, self.space, self.policy, self.finetune_space, self.layers, self.sensitivity(), self.open_layers)
        number, epochs = int(trial.user_attrs[record.REFINE_OF]), int(trial.user_attrs[record.FIDELITY_EPOCHS])
        parent = next((t for t in trial.study.get_trials(deepcopy=False) if t.number == number), None)
        if parent is None or parent.state != optuna.trial.TrialState.COMPLETE or is_refinement(parent):
            raise UserError(f"trial {trial.number} refines trial {number}, which is not a finished search trial")
        if epochs < 1:
            raise UserError(f"trial {trial.number}: fidelity_epochs must be >= 1, got {epochs}")
        rec = record.TrialRecord.from_trial(parent)
        plan = rec.to_plan()
        plan = dataclasses.replace(plan, finetune={**plan.finetune, "epochs": epochs})
        record.write(trial, refine_of=number, fidelity_epochs=epochs,
                     refine_round=int(trial.user_attrs.get(record.REFINE_ROUND, 0)))
        return plan, rec.seed

    def _infeasible(self, trial: optuna.Trial, model: torch.nn.Module, nbytes: int, ratio: float,
                    violations: list[float], start: float) -> tuple[float, ...]:
        acc = evaluate_split(model, self.bench.data, "val", self.bench.device)
        record.write(trial, constraints=violations, infeasible="size constraint violated before training",
                     bytes=nbytes, wall_seconds=time.perf_counter() - start)
        values: list[float] = [acc, ratio]
        if "bitops" in self.objectives:
            values.append(float(bitops(model, self.bench.input_shape())))
        return tuple(values)

    def _record(self, trial: optuna.Trial, outcome: Outcome, violations: list[float], start: float) -> None:
        # The curve is already written, epoch by epoch, by the CurveRecorder.
        record.write(trial, bytes=outcome.bytes, breakdown=outcome.breakdown, epochs=outcome.epochs,
                     constraints=violations or [0.0], wall_seconds=time.perf_counter() - start)
        if self.log:
            self.log(
                f"trial {trial.number}: {outcome.plan.families} acc {outcome.val_accuracy:.4f} "
                f"ratio {outcome.ratio:.2f} ({outcome.bytes} B){' stopped' if outcome.stopped else ''}"
            )

    def _upload(self, trial: optuna.Trial, outcome: Outcome, values: list[float]) -> None:
        if self.artifact_store is None:
            return
        from optuna.artifacts import upload_artifact

        names = [OBJECTIVES[o][0] for o in self.objectives]
        rec = record.TrialRecord.from_attrs(record.attrs_of(trial), trial=trial.number, values=dict(zip(names, values, strict=True)))
        with tempfile.TemporaryDirectory() as tmp:
            pcz, plan_file = Path(tmp) / f"trial-{trial.number}.pcz", Path(tmp) / f"trial-{trial.number}.plan.json"
            pcz.write_bytes(outcome.artifact)
            record.write_plan_file(plan_file, rec)
            artifact_id = upload_artifact(artifact_store=self.artifact_store, file_path=str(pcz), study_or_trial=trial)
            plan_id = upload_artifact(artifact_store=self.artifact_store, file_path=str(plan_file), study_or_trial=trial)
        record.write(trial, artifact_id=artifact_id, plan_artifact_id=plan_id)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
