"""The compression plan and the joint search space.

A plan is an ordered, JSON-serialisable list of technique configs in the canonical order
structure (structured pruning, low-rank) -> sparsity (unstructured pruning) -> weight
representation (at most one; none means fp32) -> activation quantization, plus the layer policy
and the fine-tune overrides. The plan is what a trial samples, what the dashboard shows, what
export writes and what ``search.apply`` reads back.

Named study spaces are *derived from the registry*: ``all`` offers every registered technique of
every stage; the family studies (``pruning``, ``quantization``, ...) name technique families,
which the registry resolves to techniques. A study records the concrete space it was created
with (:meth:`StudySpace.record`), so a worker whose code offers more techniques keeps sampling
the recorded space.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Protocol

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)
from torch import nn

from models.errors import UnknownNameError, UserError
from models.train import TrainConfig, TrainHook
from spaces.policy import LayerPolicy
from spaces.registry import (
    STAGES,
    AnyTechnique,
    ApplyContext,
    TechniqueConfig,
    get_technique,
    list_techniques,
    techniques,
)

PLAN_VERSION = 1
# Fine-tune overrides a plan may carry: the fields of the preset's TrainConfig but the seed,
# which belongs to the trial.
FINETUNE_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "seed")


@dataclass(frozen=True)
class Step:
    """One technique with its config and, optionally, per-layer overrides.

    ``layers`` maps a layer path (``"fc1"``, ``"layer1.0.conv1"``) to a partial config: the
    fields the technique lets a layer override (:meth:`Technique.per_layer`, e.g. a layer's
    own sparsity or bits). A plan file holds these resolved values, so what a trial ran is
    readable and replayable.
    """

    technique: str
    config: TechniqueConfig
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        allowed = self.handler.per_layer(self.config)
        for path, override in self.layers.items():
            for key in override:
                if key not in allowed:
                    raise UserError(
                        f"layers.{path}.{key}: {self.technique} does not set {key!r} per layer with this "
                        f"config; per-layer fields: {', '.join(allowed) or 'none'}"
                    )
            dataclasses.replace(self.config, **override)  # the config's own range checks

    def to_dict(self) -> dict[str, Any]:
        """``{"technique": name, "config": {...}}`` plus ``"layers"`` when there are overrides."""
        out: dict[str, Any] = {"technique": self.technique, "config": self.config.to_dict()}
        if self.layers:
            out["layers"] = {p: dict(o) for p, o in self.layers.items()}
        return out

    @property
    def handler(self) -> AnyTechnique:
        """The registered technique of this step."""
        return get_technique(self.technique)

    @property
    def stage(self) -> str:
        """The technique's stage."""
        return self.handler.stage

    @property
    def family(self) -> str:
        """The family label of this step's config (e.g. ``fp16`` or ``fp8`` for ``float``)."""
        return self.handler.family_of(self.config)


@dataclass(frozen=True)
class Plan:
    """Techniques in canonical order, the layer policy and the fine-tune budget overrides.

    ``finetune`` holds overrides of the preset's fine-tune :class:`models.train.TrainConfig`
    (e.g. ``{"epochs": 3, "lr": 0.01}``; keys in :data:`FINETUNE_KEYS`); empty means the
    preset's budget.
    """

    steps: tuple[Step, ...] = ()
    policy: LayerPolicy = field(default_factory=LayerPolicy)
    finetune: Mapping[str, Any] = field(default_factory=dict)

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
        unknown = sorted(set(self.finetune) - set(FINETUNE_KEYS))
        if unknown:
            raise UserError(f"finetune.{unknown[0]}: unknown key; known: {', '.join(FINETUNE_KEYS)}")

    @property
    def families(self) -> str:
        """Technique families joined by '+', e.g. ``prune+kmeans`` (``fp32`` for none)."""
        return "+".join(s.family for s in self.steps) or "fp32"

    @property
    def weights_family(self) -> str:
        """The weight representation's family (``fp32`` for none), plus ``+sparse`` when the
        plan prunes: the label export colours the front by."""
        rep = next((s.family for s in self.steps if s.stage == "weights"), "fp32")
        return rep + ("+sparse" if any(s.stage == "sparsity" for s in self.steps) else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, versioned."""
        return {
            "version": PLAN_VERSION,
            "steps": [s.to_dict() for s in self.steps],
            "policy": self.policy.to_dict(),
            "finetune": dict(self.finetune),
        }

    @classmethod
    def from_dict(cls, d: object) -> Plan:
        """Inverse of :meth:`to_dict`; a malformed plan is refused in one line naming its JSON
        path (see :func:`spaces.validate.validate_plan`)."""
        from spaces.validate import validate_plan

        validate_plan(d)
        assert isinstance(d, dict)  # validate_plan refuses anything else
        if d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise UserError(f"plan version {d.get('version')} is not supported (expected {PLAN_VERSION})")
        steps = []
        for i, s in enumerate(d["steps"]):
            technique = get_technique(s["technique"])
            config = technique.config_from_dict(s.get("config", {}))
            try:
                steps.append(Step(technique.name, config, {p: dict(o) for p, o in s.get("layers", {}).items()}))
            except UserError as exc:
                raise UserError(f"steps[{i}].{exc}") from None
        return cls(tuple(steps), LayerPolicy.from_dict(d.get("policy", {})), dict(d.get("finetune", {})))


# ------------------------------------------------------------------------ applying a plan


@dataclass
class AppliedPlan:
    """A plan applied to a model: the per-step states ``apply`` returned and the fine-tune's
    training hooks. The states belong to this model only; :meth:`copy` copies them with it."""

    model: nn.Module
    plan: Plan
    states: tuple[Any, ...]
    hooks: list[TrainHook]

    def finalize(self) -> None:
        """Run every step's ``finalize`` (after fine-tuning), in canonical order."""
        for step, state in zip(self.plan.steps, self.states, strict=True):
            step.handler.finalize(self.model, step.config, state)

    def copy(self) -> AppliedPlan:
        """A deep copy of the model and its states together (the states' references to the
        model's layers follow the copy), with hooks of its own."""
        model, states = copy.deepcopy((self.model, self.states))
        return AppliedPlan(model, self.plan, states, _hooks(model, self.plan, states))


def _hooks(model: nn.Module, plan: Plan, states: tuple[Any, ...]) -> list[TrainHook]:
    return [h for s, st in zip(plan.steps, states, strict=True) for h in s.handler.hooks(model, s.config, st)]


def apply_plan(model: nn.Module, plan: Plan, ctx: ApplyContext | None = None) -> AppliedPlan:
    """Apply every step to ``model`` in place (each with its per-layer overrides)."""
    ctx = ctx or ApplyContext(policy=plan.policy)
    ctx.masks_final_step = None  # set afresh by this plan's own steps (a context may be reused)
    states = []
    for i, step in enumerate(plan.steps):
        _check_layer_paths(model, step, i)
        ctx.layers = step.layers
        states.append(step.handler.apply(model, step.config, ctx))
    ctx.layers = {}
    return AppliedPlan(model, plan, tuple(states), _hooks(model, plan, tuple(states)))


def compressible_layers(model: nn.Module) -> list[str]:
    """Paths of the conv and linear layers of ``model``, in module order."""
    return [p for p, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear) and p]


def _check_layer_paths(model: nn.Module, step: Step, index: int) -> None:
    known = compressible_layers(model)
    for path in step.layers:
        if path not in known:
            raise UserError(
                f"steps[{index}].layers.{path}: no conv/linear layer of that path in the model at this "
                f"step; layers: {', '.join(known[:20])}{' ...' if len(known) > 20 else ''}"
            )


# ------------------------------------------------------------------------------ the joint space

NONE = "none"
FP32 = "fp32"


@dataclass(frozen=True)
class FamilyStudy:
    """A family study: for each stage, the technique families it searches.

    ``required`` stages always use one of their families; ``optional`` ones may be skipped.
    """

    name: str
    description: str
    required: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    optional: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


FAMILY_STUDIES: tuple[FamilyStudy, ...] = (
    FamilyStudy("pruning", "structured and unstructured pruning",
                optional={"structure": ("structured",), "sparsity": ("prune",)}),
    FamilyStudy("quantization", "fp16/fp8/int-k weights, optional activation quantization",
                required={"weights": ("fp16", "fp8", "int")}, optional={"activations": ("act",)}),
    FamilyStudy("clustering", "k-means/GMM/DBSCAN codebooks",
                required={"weights": ("kmeans", "gmm", "dbscan")}, optional={"sparsity": ("prune",)}),
    FamilyStudy("lowrank", "low-rank factorization", required={"structure": ("lowrank",)}),
    FamilyStudy("sws", "soft weight-sharing", required={"weights": ("sws",)}),
    FamilyStudy("binary", "binary weights", required={"weights": ("binary",)}),
)


@dataclass(frozen=True)
class StudySpace:
    """A concrete study space: for each stage, the choices of ``stage.<stage>``.

    A choice is ``"none"`` (skip the stage), ``"fp32"`` (no weight representation), a technique
    name, or structure techniques chained with ``+``. A stage with a single choice is fixed (not
    sampled); a stage that is absent is skipped. On a model with at most ``per_layer_max``
    conv/linear layers every eligible layer samples its own intensity (0: never); on a model
    with more, ``skew`` lets one skew per technique spread the intensity by the baseline's
    sensitivity profile (studies recorded before skews existed keep uniform plans there). With
    ``open_ends``, plans of a model with few layers also choose whether the policy's protected
    first and last layers stay protected (``plan.protect_ends``): on LeNet-5 the two hold 1.3 %
    of the weights but, kept at 8 bits, most of the bytes at 200x (studies recorded before the
    switch existed keep their ends protected).

    ``ranges`` (technique -> parameter -> Optuna distribution JSON) are the distributions a
    study recorded: a numeric parameter is sampled from its recorded range, scale and step, so
    that a code whose technique widened or narrowed a range keeps sampling a resumed study as
    it began (and a refinement or retry of an old trial finds its value in range). Empty: the
    code's own (a new study, or one recorded before ranges were kept).
    """

    name: str
    stages: Mapping[str, tuple[str, ...]]
    description: str = ""
    per_layer_max: int = 0
    skew: bool = True
    open_ends: bool = False
    ranges: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def options(self, stage: str) -> tuple[str, ...]:
        """Allowed choices of ``stage`` (``("none",)`` when the study leaves it out)."""
        return self.stages.get(stage, (NONE,))

    def technique_names(self) -> list[str]:
        """Every technique some choice of this space uses, in stage order."""
        names = {n for opts in self.stages.values() for o in opts for n in o.split("+") if o not in (NONE, FP32)}
        return [n for n in list_techniques() if n in names] + sorted(names - set(list_techniques()))

    def record(self) -> dict[str, Any]:
        """What a study stores about its space: the stage choices, and per technique its config
        version and parameter distributions (to notice a change of the code)."""
        return {
            "name": self.name,
            "stages": {s: list(o) for s, o in self.stages.items()},
            "per_layer_max": self.per_layer_max,
            "skew": self.skew,
            "open_ends": self.open_ends,
            "techniques": {n: technique_fingerprint(get_technique(n)) for n in self.technique_names()},
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> StudySpace:
        """The space a study recorded (see :meth:`record`)."""
        # Studies recorded before per-layer sampling existed keep sampling without it.
        return cls(str(record["name"]), {s: tuple(o) for s, o in record["stages"].items()},
                   per_layer_max=int(record.get("per_layer_max", 0)), skew=bool(record.get("skew", False)),
                   open_ends=bool(record.get("open_ends", False)),
                   ranges={n: dict(t.get("params", {})) for n, t in record.get("techniques", {}).items()})


def _stage_choices(stage: str, names: Iterable[str], optional: bool) -> tuple[str, ...]:
    chosen = [get_technique(n) for n in list_techniques(stage) if n in set(names)]
    head = ((FP32 if stage == "weights" else NONE),) if optional else ()
    chain = [t.name for t in chosen if t.combinable]
    combos = ["+".join(c) for r in range(2, len(chain) + 1) for c in itertools.combinations(chain, r)]
    return head + tuple(t.name for t in chosen) + tuple(combos)


def _all_space(per_layer_max: int) -> StudySpace:
    return StudySpace(
        "all",
        {s: _stage_choices(s, list_techniques(s), optional=True) for s in STAGES if list_techniques(s)},
        "every stage, every weight representation",
        per_layer_max,
        open_ends=True,
    )


def _family_space(spec: FamilyStudy, per_layer_max: int) -> StudySpace:
    stages: dict[str, tuple[str, ...]] = {}
    for stage in STAGES:
        for wanted, optional in ((spec.required.get(stage), False), (spec.optional.get(stage), True)):
            if wanted:
                names = [n for n in list_techniques(stage) if set(get_technique(n).families) & set(wanted)]
                if names:
                    stages[stage] = _stage_choices(stage, names, optional)
    return StudySpace(spec.name, stages, spec.description, per_layer_max, open_ends=True)


def study_names() -> list[str]:
    """Names of the study spaces: ``all`` and the family studies."""
    return ["all", *(f.name for f in FAMILY_STUDIES)]


PER_LAYER_MAX = 8  # default: the LeNets and the digits CNN sample per-layer intensities


def get_study_space(name: str, per_layer_max: int = PER_LAYER_MAX) -> StudySpace:
    """The named study space as the registered techniques make it today; an unknown name
    lists the known ones."""
    if per_layer_max < 0:
        raise UserError(f"per_layer_max must be >= 0, got {per_layer_max}")
    if name == "all":
        return _all_space(per_layer_max)
    for spec in FAMILY_STUDIES:
        if spec.name == name:
            return _family_space(spec, per_layer_max)
    raise UnknownNameError("study", name, study_names())


# -------------------------------------------------------------------- parameter fingerprints


class _Explorer:
    """Stands in for an ``optuna.Trial`` in a technique's ``suggest``: records every
    distribution asked for and answers with a fixed value, so that each categorical branch can
    be walked (conditional parameters included)."""

    def __init__(self, forced: Mapping[str, Any]) -> None:
        self.forced = forced
        self.seen: dict[str, BaseDistribution] = {}

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        self.seen[name] = FloatDistribution(low, high, step=step, log=log)
        return low

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        self.seen[name] = IntDistribution(low, high, step=step, log=log)
        return low

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.seen[name] = CategoricalDistribution(list(choices))
        return self.forced.get(name, list(choices)[0])


MAX_BRANCHES = 256  # walks of one technique's suggest (each categorical value once, at least)


class _Recorded:
    """Stands in for an ``optuna.Trial`` in a technique's ``suggest``: a numeric parameter the
    study recorded (:attr:`StudySpace.ranges`) is sampled from its recorded distribution
    instead of the one the code asks for; everything else goes to the trial."""

    def __init__(self, trial: optuna.Trial, recorded: Mapping[str, Any]) -> None:
        self._trial, self._recorded = trial, recorded

    def _dist(self, name: str, kind: type[FloatDistribution] | type[IntDistribution]) -> Any:
        spec = self._recorded.get(name)
        dist = json_to_distribution(json.dumps(spec)) if spec is not None else None
        return dist if isinstance(dist, kind) else None

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        d = self._dist(name, FloatDistribution)
        if d is not None:
            low, high, step, log = d.low, d.high, d.step, d.log
        return self._trial.suggest_float(name, low, high, step=step, log=log)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        d = self._dist(name, IntDistribution)
        if d is not None:
            low, high, step, log = d.low, d.high, d.step, d.log
        return self._trial.suggest_int(name, low, high, step=step, log=log)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)


def _same_kind(old: Any, new: Any) -> bool:
    """Two distributions' JSON of the same numeric kind (a change of range, scale or step, which
    a study resumes across: it samples its recorded one, see :class:`_Recorded`)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return False
    return old.get("name") == new.get("name") and old.get("name") in ("FloatDistribution", "IntDistribution")


def technique_fingerprint(technique: AnyTechnique) -> dict[str, Any]:
    """A technique's config version and the Optuna distribution of every parameter its
    ``suggest`` can ask for (all categorical branches walked), as JSON."""
    seen: dict[str, BaseDistribution] = {}
    queue: list[dict[str, Any]] = [{}]
    walked: set[tuple[tuple[str, str], ...]] = set()
    while queue and len(walked) < MAX_BRANCHES:
        forced = queue.pop()
        key = tuple(sorted((k, repr(v)) for k, v in forced.items()))
        if key in walked:
            continue
        walked.add(key)
        explorer = _Explorer(forced)
        technique.suggest(explorer, technique.name)  # type: ignore[arg-type]
        for name, dist in explorer.seen.items():
            seen.setdefault(name, dist)
            if isinstance(dist, CategoricalDistribution) and name not in forced:
                queue.extend({**forced, name: c} for c in dist.choices)
    return {
        "version": technique.config_cls.VERSION,
        "params": {n: json.loads(distribution_to_json(d)) for n, d in sorted(seen.items())},
    }


def space_changes(record: Mapping[str, Any]) -> list[str]:
    """How the techniques of a recorded space differ from this code's (empty: none). A
    technique that is gone, whose config version changed, or which added or removed a parameter
    or changed its kind or categorical choices is a change; a new technique is not (it is simply
    not in the recorded space), nor a numeric parameter's new range, scale or step (the study
    samples its recorded one, :attr:`StudySpace.ranges`)."""
    changes = []
    known = techniques()
    for name, recorded in record.get("techniques", {}).items():
        if name not in known:
            changes.append(f"technique {name!r} is not in this code")
            continue
        now = technique_fingerprint(known[name])
        if now["version"] != recorded.get("version"):
            changes.append(f"{name} config version {recorded.get('version')} -> {now['version']}")
        old, new = recorded.get("params", {}), now["params"]
        for p in sorted(set(old) | set(new)):
            if old.get(p) != new.get(p) and not _same_kind(old.get(p), new.get(p)):
                what = "added" if p not in old else "removed" if p not in new else "changed"
                changes.append(f"parameter {p} {what}")
    return changes


# ------------------------------------------------------------------------------ sampling


def _choose(trial: optuna.Trial, stage: str, options: tuple[str, ...]) -> str:
    if len(options) == 1:
        return options[0]
    return str(trial.suggest_categorical(f"stage.{stage}", list(options)))


def _suggest_like(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Suggest ``name`` from a distribution of the same kind as ``dist``."""
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    assert isinstance(dist, CategoricalDistribution)  # the three kinds Optuna suggests
    return trial.suggest_categorical(name, dist.choices)


def suggest_layers(trial: optuna.Trial, technique: AnyTechnique, config: TechniqueConfig,
                   layers: Sequence[str], recorded: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per-layer overrides of ``config``: each per-layer field of each of ``layers`` sampled
    from the distribution the technique's own ``suggest`` uses for it (the study's ``recorded``
    one where it has it), as ``<technique>.<layer path>.<field>``. The first layer takes the
    step's (global) value, so no parameter is sampled twice."""
    fields_ = technique.per_layer(config)
    if not layers or not fields_:
        return {}
    # A study's record holds every parameter of its techniques (a code that added one is
    # refused, space_changes): the walk of the technique's branches is needed only without it.
    params = dict(recorded) if recorded else technique_fingerprint(technique)["params"]
    out: dict[str, dict[str, Any]] = {layers[0]: {f: getattr(config, f) for f in fields_}}
    for path in layers[1:]:
        out[path] = {}
        for f in fields_:
            spec = params.get(f"{technique.name}.{f}")
            value = getattr(config, f) if spec is None else _suggest_like(
                trial, f"{technique.name}.{path}.{f}", json_to_distribution(json.dumps(spec)))
            out[path][f] = value
    return out


# ------------------------------------------------------------- skewed per-layer values (deep models)

SKEW_SCALE = 0.25  # shift of a layer one standard deviation from the mean sensitivity, at skew 1
SKEW_CLIP = 2.0  # standardised sensitivities are clipped to [-SKEW_CLIP, SKEW_CLIP]


class LayerSensitivity(Protocol):
    """How much each layer's accuracy suffers from one technique's intensity (implemented by
    :class:`objectives.sensitivity.SensitivityProfile`)."""

    def covers(self, technique: str, field: str) -> bool:
        """Whether :meth:`drop` knows ``technique``'s ``field``."""
        ...

    def drop(self, technique: str, field: str, layer: str, value: float) -> float:
        """Validation accuracy drop of the baseline with only ``layer`` compressed at ``value``."""
        ...


def to_unit(dist: BaseDistribution, value: float) -> float:
    """``value``'s position in ``dist``'s range, 0 at ``low`` and 1 at ``high``: linear, or
    logarithmic for a log distribution (the coordinate the sampler itself works in); clipped."""
    assert isinstance(dist, FloatDistribution | IntDistribution)
    lo, hi, x = float(dist.low), float(dist.high), float(value)
    if dist.log:
        lo, hi, x = math.log(lo), math.log(hi), math.log(max(x, dist.low))
    return min(1.0, max(0.0, (x - lo) / (hi - lo))) if hi > lo else 0.0


def from_unit(dist: BaseDistribution, t: float) -> float | int:
    """Inverse of :func:`to_unit`: the value at position ``t`` (clipped to [0, 1]), on the
    distribution's step (integers rounded) and within its range."""
    assert isinstance(dist, FloatDistribution | IntDistribution)
    t = min(1.0, max(0.0, t))
    lo, hi = float(dist.low), float(dist.high)
    x = math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo))) if dist.log else lo + t * (hi - lo)
    if dist.step is not None:
        x = lo + round((x - lo) / dist.step) * dist.step
    if isinstance(dist, IntDistribution):
        return int(min(hi, max(lo, round(x))))
    return min(hi, max(lo, round(x, 4)))  # four decimals: a plan file stays readable


def skewable(technique: AnyTechnique, config: TechniqueConfig) -> list[tuple[str, BaseDistribution]]:
    """The per-layer fields of ``config`` that have a direction (:attr:`Technique.stronger`)
    and a numeric distribution in the technique's ``suggest``, with that distribution."""
    params = technique_fingerprint(technique)["params"]
    out: list[tuple[str, BaseDistribution]] = []
    for f in technique.per_layer(config):
        spec = params.get(f"{technique.name}.{f}")
        if f not in technique.stronger or spec is None:
            continue
        dist = json_to_distribution(json.dumps(spec))
        if isinstance(dist, FloatDistribution | IntDistribution):
            out.append((f, dist))
    return out


def skew_layers(technique: AnyTechnique, config: TechniqueConfig, layers: Sequence[str], skew: float,
                sensitivity: LayerSensitivity) -> dict[str, dict[str, Any]]:
    """Per-layer values of ``config``'s intensity, skewed by sensitivity.

    For each skewable field (:func:`skewable`) with the step's value ``g``: each layer's
    sensitivity is the profile's accuracy drop at ``g`` with only that layer compressed; the
    drops are standardised across ``layers`` (``z``, clipped to ±:data:`SKEW_CLIP`) and each
    layer moves from ``g`` by ``-direction * skew * z * SKEW_SCALE`` in the distribution's unit
    coordinate (:func:`to_unit`: linear, log for log distributions; integers rounded, clipped to
    the range). Sensitive layers get milder values, insensitive ones stronger. ``skew == 0``, or
    equal sensitivities, give no overrides: the uniform plan.
    """
    if skew <= 0 or len(layers) < 2:
        return {}
    out: dict[str, dict[str, Any]] = {p: {} for p in layers}
    moved = False
    for f, dist in skewable(technique, config):
        if not sensitivity.covers(technique.name, f):
            continue
        g = getattr(config, f)
        drops = [sensitivity.drop(technique.name, f, p, g) for p in layers]
        mean = sum(drops) / len(drops)
        std = math.sqrt(sum((d - mean) ** 2 for d in drops) / len(drops))
        if std < 1e-12:
            continue  # no layer is more sensitive than another: nothing to skew by
        moved = True
        direction, unit = technique.stronger[f], to_unit(dist, g)
        for p, d in zip(layers, drops, strict=True):
            z = min(SKEW_CLIP, max(-SKEW_CLIP, (d - mean) / std))
            out[p][f] = from_unit(dist, unit - direction * skew * z * SKEW_SCALE)
    return out if moved else {}


def suggest_skew(trial: optuna.Trial, technique: AnyTechnique, config: TechniqueConfig, layers: Sequence[str],
                 sensitivity: LayerSensitivity) -> dict[str, dict[str, Any]]:
    """Per-layer overrides of ``config`` on a model with many layers: one parameter
    ``<technique>.skew`` in [0, 1] (sampled only when the step has a skewable field the profile
    covers) resolved into each layer's value by :func:`skew_layers`."""
    if len(layers) < 2 or not any(sensitivity.covers(technique.name, f) for f, _ in skewable(technique, config)):
        return {}
    skew = trial.suggest_float(f"{technique.name}.skew", 0.0, 1.0)
    return skew_layers(technique, config, layers, skew, sensitivity)


def suggest_plan(
    trial: optuna.Trial,
    space: StudySpace,
    policy: LayerPolicy | None = None,
    finetune_space: Mapping[str, tuple[float, float]] | None = None,
    layers: Sequence[str] = (),
    sensitivity: LayerSensitivity | None = None,
    open_layers: Sequence[str] = (),
) -> Plan:
    """Sample a plan of ``space`` from an Optuna trial.

    Parameters are conditional and namespaced: ``stage.<stage>`` picks a technique, and only the
    chosen technique's parameters (``<technique>.<param>``) are suggested. ``layers`` (the
    eligible layers of a model with few of them, see :attr:`StudySpace.per_layer_max`) get
    their own intensity per technique (:func:`suggest_layers`) until a structure step changes
    the layers, in plans where the switch ``plan.per_layer`` is on. With a ``sensitivity``
    profile (a model with many layers) they get one skew per technique instead
    (:func:`suggest_skew`), resolved into per-layer values. ``finetune_space`` (e.g. ``{"epochs": (1, 8), "lr": (1e-3, 1e-1)}``; also
    ``distill_weight`` and ``distill_temperature``) makes the fine-tune searchable. With
    ``open_layers`` (the eligible layers once nothing is protected; given where the space has
    ``open_ends`` and the policy protects a layer) the plan samples ``plan.protect_ends``: off,
    its policy protects neither end and ``open_layers`` take the place of ``layers``.
    """
    steps: list[Step] = []
    policy = policy or LayerPolicy()
    if open_layers and space.open_ends and not trial.suggest_categorical("plan.protect_ends", [True, False]):
        policy = dataclasses.replace(policy, keep_first=False, keep_last=False)
        layers = open_layers
    # Whether this plan sets intensities per layer at all: a switch the sampler learns, so that
    # uniform plans (few parameters, quick for TPE to model) stay in reach beside per-layer ones.
    if layers and not trial.suggest_categorical("plan.per_layer", [False, True]):
        layers = ()
    for stage in STAGES:
        choice = _choose(trial, stage, space.options(stage))
        if choice in (NONE, FP32):
            continue
        for name in choice.split("+"):
            technique = get_technique(name)
            recorded = space.ranges.get(name, {})
            config = technique.suggest(_Recorded(trial, recorded) if recorded else trial, name)  # type: ignore[arg-type]
            # A structure step rewrites layers (factors, fewer channels): overrides of later
            # steps would name layers that are no longer what was sampled.
            per_layer = layers if not any(s.stage == "structure" for s in steps) else ()
            if sensitivity is None:
                overrides = suggest_layers(trial, technique, config, per_layer, recorded)
            else:
                overrides = suggest_skew(trial, technique, config, per_layer, sensitivity)
            steps.append(Step(name, config, overrides))
    return Plan(tuple(steps), policy, suggest_finetune(trial, finetune_space or {}))


_FINETUNE_LOG = MappingProxyType({"epochs": False, "lr": True, "distill_weight": False, "distill_temperature": True,
                                  "adamw_lr": True})
# The fine-tune of a plan that samples ``finetune.optimizer = "adamw"``: the soft weight-sharing
# recipe's optimizer (Ullrich et al.: Adam at a constant rate, no weight decay; the mixture prior
# regularises). Under the presets' SGD the prior barely moves the weights (BENCHMARKS.md, the soft
# weight-sharing ablation: 13x where Adam gives 126x on LeNet-300-100), so the optimizer is a
# dimension of the plan, not of the preset.
ADAMW_FINETUNE = MappingProxyType({"optimizer": "adamw", "schedule": "constant", "weight_decay": 0.0})


def suggest_finetune(trial: optuna.Trial, space: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    """Fine-tune overrides sampled from ``space`` (key -> (low, high)): ``epochs`` (int),
    ``lr`` and ``distill_temperature`` (log scale), ``distill_weight`` (linear).

    With ``adamw_lr`` in ``space`` the plan also samples ``finetune.optimizer`` (``sgd``, the
    preset's, or ``adamw``): an ``adamw`` plan fine-tunes with :data:`ADAMW_FINETUNE` at a rate
    ``finetune.adamw_lr`` (log scale) instead of ``finetune.lr``, since the two optimizers' useful
    rates lie decades apart. A space without it (every study recorded before it existed) samples
    exactly the parameters it sampled then.
    """
    for key in space:
        if key not in _FINETUNE_LOG:
            raise UserError(f"finetune_space key {key!r} is not searchable; use {', '.join(_FINETUNE_LOG)}")
    out: dict[str, Any] = {}
    adamw = "adamw_lr" in space and trial.suggest_categorical("finetune.optimizer", ["sgd", "adamw"]) == "adamw"
    for key, (lo, hi) in space.items():
        if key == "epochs":
            out[key] = trial.suggest_int("finetune.epochs", int(lo), int(hi))
        elif key == "adamw_lr":
            if adamw:
                out.update(ADAMW_FINETUNE, lr=trial.suggest_float("finetune.adamw_lr", lo, hi, log=True))
        elif key == "lr":
            if not adamw:
                out[key] = trial.suggest_float("finetune.lr", lo, hi, log=True)
        else:
            out[key] = trial.suggest_float(f"finetune.{key}", lo, hi, log=_FINETUNE_LOG[key])
    return out
