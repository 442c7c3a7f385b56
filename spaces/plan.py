"""The compression plan: an ordered, JSON-serialisable list of technique configs.

Canonical order: structure (structured pruning, low-rank) -> sparsity (unstructured pruning) ->
weight representation (exactly one, or none for fp32) -> activation quantization; plus the
layer policy and the fine-tuning budget. The plan is what a trial samples, what the dashboard
shows, what export writes and what ``search.apply`` reads back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from models.errors import UserError
from models.train import TrainHook
from spaces.policy import LayerPolicy
from spaces.registry import STAGES, ApplyContext, TechniqueConfig, get_technique

PLAN_VERSION = 1


@dataclass(frozen=True)
class Step:
    """One technique with its config."""

    technique: str
    config: TechniqueConfig

    def to_dict(self) -> dict[str, Any]:
        """``{"technique": name, "config": {...}}``."""
        return {"technique": self.technique, "config": self.config.to_dict()}

    @property
    def stage(self) -> str:
        """The technique's stage."""
        return get_technique(self.technique).stage

    @property
    def family(self) -> str:
        """The family label of this step's config (e.g. ``fp16`` or ``fp8`` for ``float``)."""
        return get_technique(self.technique).family_of(self.config)


@dataclass(frozen=True)
class Plan:
    """Techniques in canonical order, the layer policy and the fine-tune budget overrides.

    ``finetune`` holds overrides of the preset's fine-tune :class:`models.train.TrainConfig`
    (e.g. ``{"epochs": 3, "lr": 0.01}``); empty means the preset's budget.
    """

    steps: tuple[Step, ...] = ()
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    finetune: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        order = [STAGES.index(s.stage) for s in self.steps]
        if order != sorted(order):
            raise UserError(
                f"plan steps {[s.technique for s in self.steps]} are not in canonical order "
                f"({' -> '.join(STAGES)})"
            )
        weights = [s.technique for s in self.steps if s.stage == "weights"]
        if len(weights) > 1:
            raise UserError(f"a plan has at most one weight representation, got {weights}")

    @property
    def families(self) -> str:
        """Technique families joined by '+', e.g. ``prune+codebook`` (``fp32`` for none)."""
        return "+".join(s.family for s in self.steps) or "fp32"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, versioned."""
        return {
            "version": PLAN_VERSION,
            "steps": [s.to_dict() for s in self.steps],
            "policy": self.policy.to_dict(),
            "finetune": dict(self.finetune),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of :meth:`to_dict`; every error names the bad value."""
        if not isinstance(d, dict) or "steps" not in d:
            raise UserError("a plan is a JSON object with 'steps' (see spaces.plan.Plan.to_dict)")
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise UserError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        steps = []
        for s in d["steps"]:
            technique = get_technique(s["technique"])
            steps.append(Step(technique.name, technique.config_from_dict(s.get("config", {}))))
        return cls(tuple(steps), LayerPolicy.from_dict(d.get("policy", {})), dict(d.get("finetune", {})))

    def to_json(self) -> str:
        """Pretty JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan file (see :func:`read_plan_file`)."""
        return read_plan_file(path)[0]


def read_plan_file(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    """A plan file: a bare plan, or a record ``{"plan": ..., "preset": ..., ...}`` as export
    writes it; returns the plan and the record (empty for a bare plan)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plan file {p} does not exist")
    try:
        record = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"plan file {p} is not valid JSON: {exc}") from None
    if not isinstance(record, dict):
        raise UserError(f"plan file {p} must hold a JSON object")
    if "plan" in record:
        return Plan.from_dict(record["plan"]), record
    return Plan.from_dict(record), {}


def apply_plan(model: nn.Module, plan: Plan, ctx: ApplyContext | None = None) -> list[TrainHook]:
    """Apply every step to ``model`` in place; return the training hooks of the fine-tune."""
    ctx = ctx or ApplyContext(policy=plan.policy)
    hooks: list[TrainHook] = []
    for step in plan.steps:
        technique = get_technique(step.technique)
        technique.apply(model, step.config, ctx)
        hooks.extend(technique.hooks(model, step.config))
    return hooks


def finalize_plan(model: nn.Module, plan: Plan) -> None:
    """Run every step's ``finalize`` (after fine-tuning), in canonical order."""
    for step in plan.steps:
        get_technique(step.technique).finalize(model, step.config)


# ------------------------------------------------------------------------------ the joint space

NONE = "none"


@dataclass(frozen=True)
class StudySpace:
    """A named study: for each stage, the techniques it may use.

    A stage listing ``"none"`` may be skipped; a stage with a single option is fixed (not
    sampled). Structure techniques may be combined (structured pruning then low-rank).
    """

    name: str
    stages: dict[str, tuple[str, ...]]
    description: str = ""

    def options(self, stage: str) -> tuple[str, ...]:
        """Allowed choices of ``stage`` (``("none",)`` when the study leaves it out)."""
        return self.stages.get(stage, (NONE,))


def _structure_options(*names: str, optional: bool = True) -> tuple[str, ...]:
    combos = [*names]
    if len(names) > 1:
        combos.append("+".join(names))
    return ((NONE,) if optional else ()) + tuple(combos)


STUDIES: dict[str, StudySpace] = {
    s.name: s
    for s in (
        StudySpace(
            "all",
            {
                "structure": _structure_options("structured", "lowrank"),
                "sparsity": (NONE, "prune"),
                "weights": ("fp32", "float", "int", "binary", "codebook", "sws"),
                "activations": (NONE, "actquant"),
            },
            "every stage, every weight representation",
        ),
        StudySpace(
            "pruning",
            {"structure": (NONE, "structured"), "sparsity": (NONE, "prune")},
            "structured and unstructured pruning",
        ),
        StudySpace(
            "quantization",
            {"weights": ("float", "int"), "activations": (NONE, "actquant")},
            "fp16/fp8/int-k weights, optional activation quantization",
        ),
        StudySpace("clustering", {"sparsity": (NONE, "prune"), "weights": ("codebook",)}, "k-means/GMM/DBSCAN codebooks"),
        StudySpace("lowrank", {"structure": ("lowrank",)}, "low-rank factorization"),
        StudySpace("sws", {"weights": ("sws",)}, "soft weight-sharing"),
        StudySpace("binary", {"weights": ("binary",)}, "binary weights"),
    )
}


def get_study_space(name: str) -> StudySpace:
    """The named study space; an unknown name lists the known ones."""
    from models.errors import UnknownNameError

    try:
        return STUDIES[name]
    except KeyError:
        raise UnknownNameError("study", name, STUDIES) from None


def _choose(trial: Any, stage: str, options: tuple[str, ...]) -> str:
    if len(options) == 1:
        return options[0]
    return trial.suggest_categorical(f"stage.{stage}", list(options))


def suggest_plan(
    trial: Any,
    space: StudySpace,
    policy: LayerPolicy | None = None,
    finetune_space: dict[str, tuple[float, float]] | None = None,
) -> Plan:
    """Sample a plan of ``space`` from an Optuna trial.

    Parameters are conditional and namespaced: ``stage.<stage>`` picks a technique, and only the
    chosen technique's parameters (``<technique>.<param>``) are suggested. ``finetune_space``
    (e.g. ``{"epochs": (1, 8), "lr": (1e-3, 1e-1)}``) makes the fine-tune budget searchable.
    """
    steps: list[Step] = []
    for stage in STAGES:
        choice = _choose(trial, stage, space.options(stage))
        if choice in (NONE, "fp32"):
            continue
        for name in choice.split("+"):
            steps.append(Step(name, get_technique(name).suggest(trial, name)))
    finetune: dict[str, Any] = {}
    for key, (lo, hi) in (finetune_space or {}).items():
        if key == "epochs":
            finetune["epochs"] = trial.suggest_int("finetune.epochs", int(lo), int(hi))
        elif key == "lr":
            finetune["lr"] = trial.suggest_float("finetune.lr", lo, hi, log=True)
        else:
            raise UserError(f"finetune_space key {key!r} is not searchable; use epochs or lr")
    return Plan(tuple(steps), policy or LayerPolicy(), finetune)
