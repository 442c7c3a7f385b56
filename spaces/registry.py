"""The technique contract, its registry and discovery.

A technique is one module in ``spaces/`` that defines a frozen, validated config dataclass
(:class:`TechniqueConfig`) and a :class:`Technique` subclass registered with
:func:`register_technique`; the registry maps a name to that handler, as torchao maps a config
type to its handler. Modules are *discovered*: every public module of the ``spaces`` package is
imported on first use of the registry, and installed packages may add techniques through the
``pareto_compress.techniques`` entry-point group. Nothing else lists techniques: studies,
families and the shared test suite all read the registry.

The contract, for a technique generic over its config type ``C`` and its per-model state ``S``:

* ``suggest(trial, prefix) -> C`` samples a config under a namespaced prefix;
* ``apply(model, config, ctx) -> S`` rewrites the model in place and returns what its hooks and
  ``finalize`` need for *that* model (a prior, the layers under it; ``None`` for most). The state
  is never stored elsewhere: copy it together with its model (``copy.deepcopy((model, state))``)
  and its references follow the copy;
* ``hooks(model, config, state)`` plug into the one training loop;
* ``finalize(model, config, state)`` snaps weights to their final representation.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Self, TypeVar

import optuna
from torch import Tensor, nn

from models.errors import UnknownNameError, UserError
from models.train import TrainHook
from spaces.policy import LayerPolicy

STAGES = ("structure", "sparsity", "weights", "activations")
ENTRY_POINT_GROUP = "pareto_compress.techniques"


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique's config: frozen, validated, versioned ``to_dict``/``from_dict``."""

    VERSION: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`UserError` naming the first invalid field (override)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form with a ``version``."""
        out: dict[str, Any] = {"version": self.VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys or versions are errors naming them."""
        d = dict(d)
        version = d.pop("version", cls.VERSION)
        if version != cls.VERSION:
            raise UserError(f"{cls.__name__} version {version} is not supported (expected {cls.VERSION})")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise UserError(f"{cls.__name__}: unknown keys {unknown}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition``."""
    if not condition:
        raise UserError(message)


C = TypeVar("C", bound=TechniqueConfig)
S = TypeVar("S")


@dataclass
class ApplyContext:
    """What ``apply`` may use besides the model and the config.

    Attributes:
        policy: Which layers are eligible and how protected layers are treated.
        calibration: Yields a few normalised input batches on the model's device (activation
            clipping, data-aware initialisation); None where no data is at hand.
        layers: The applying step's per-layer overrides (layer path -> partial config);
            techniques read them through :meth:`config_at`.
        masks_final_step: Set by an earlier step whose masks keep changing during the fine-tune
            (gradual pruning): maps the fine-tune's total steps to the step after which the
            masks are final, so that a later step (a codebook) can fit what survives. None:
            the masks are final at ``apply``.
    """

    policy: LayerPolicy = field(default_factory=LayerPolicy)
    calibration: Callable[[], Iterator[Tensor]] | None = None
    masks_final_step: Callable[[int], int] | None = None
    layers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def config_at(self, config: C, path: str) -> C:
        """``config`` with the current step's per-layer overrides of the layer at ``path``
        (``layers``, set by :func:`spaces.plan.apply_plan`); ``config`` itself for a layer
        without any."""
        override = self.layers.get(path)
        return dataclasses.replace(config, **override) if override else config


class Technique(Generic[C, S]):
    """Base of every technique; subclasses set the class attributes and override the methods.

    Attributes:
        name: Registry name, also the prefix of its Optuna parameters.
        stage: One of :data:`STAGES`.
        family: Short label for charts (``"prune"``, ``"int"``); :meth:`family_of` refines it
            per config where one technique covers several families.
        families: Every label :meth:`family_of` can return (family studies name these).
        config_cls: The config type ``C``.
        combinable: Structure techniques only: may be chained with the stage's other
            combinable techniques in one plan (structured pruning, then low-rank).
        order: Position within the stage when chained (lower first).
        stronger: Per-layer fields (see :meth:`per_layer`) with the direction in which each
            compresses more: ``+1`` when a larger value does (sparsity), ``-1`` when a smaller
            one does (bits, clusters, rank share). On models with many layers the search skews
            these per layer by a sensitivity profile of the baseline; empty: never skewed.
    """

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    family: ClassVar[str] = ""
    families: ClassVar[tuple[str, ...]] = ()
    config_cls: type[C]
    combinable: ClassVar[bool] = False
    order: ClassVar[int] = 0
    stronger: ClassVar[Mapping[str, int]] = MappingProxyType({})

    def suggest(self, trial: optuna.Trial, prefix: str) -> C:
        """Sample a config; every parameter name starts with ``prefix + "."``."""
        raise NotImplementedError

    def apply(self, model: nn.Module, config: C, ctx: ApplyContext) -> S:
        """Rewrite ``model`` in place; return the state its hooks and ``finalize`` need."""
        raise NotImplementedError

    def hooks(self, model: nn.Module, config: C, state: S) -> list[TrainHook]:
        """Training-loop hooks for the fine-tune (regulariser, mask enforcement, schedules)."""
        return []

    def finalize(self, model: nn.Module, config: C, state: S) -> None:
        """Snap weights to their final representation after fine-tuning."""

    def settings(self) -> list[C]:
        """Configs from mildest to most aggressive (the shared test suite checks that the
        measured size shrinks along them)."""
        raise NotImplementedError

    def moderate(self) -> C:
        """A moderate setting that must keep accuracy within 2 points after a short fine-tune."""
        raise NotImplementedError

    def family_of(self, config: C) -> str:
        """The family label of ``config`` (default: :attr:`family`)."""
        return self.family

    def per_layer(self, config: C) -> tuple[str, ...]:
        """Fields of ``config`` that a layer may override (its intensity: sparsity, bits,
        clusters, rank); ``apply`` reads each layer's value through
        :meth:`ApplyContext.config_at`. Default: none."""
        return ()

    def config_from_dict(self, d: Mapping[str, Any]) -> C:
        """Parse this technique's config."""
        return self.config_cls.from_dict(d)


AnyTechnique = Technique[Any, Any]


class _Registry:
    """Name -> technique instance; filled by :func:`register_technique` as modules import."""

    def __init__(self) -> None:
        self.techniques: dict[str, AnyTechnique] = {}
        self.discovered = False


_REGISTRY = _Registry()


def register_technique(cls: type[Technique[C, S]]) -> type[Technique[C, S]]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.stage not in STAGES:
        raise ValueError(f"technique {cls.name!r} has stage {cls.stage!r}; expected one of {STAGES}")
    if not cls.name or "." in cls.name or "+" in cls.name:
        raise ValueError(f"technique name {cls.name!r} must be non-empty without '.' or '+'")
    known = _REGISTRY.techniques.get(cls.name)
    if known is not None and type(known).__qualname__ != cls.__qualname__:
        raise ValueError(f"technique {cls.name!r} is already registered by {type(known).__module__}")
    if not cls.families:
        cls.families = (cls.family,)
    _REGISTRY.techniques[cls.name] = cls()
    return cls


def discover() -> None:
    """Import every technique module: the public modules of ``spaces`` (and of a
    ``spaces/techniques`` package, if one exists) and the ``pareto_compress.techniques`` entry
    points of installed packages. Runs once; each module registers itself on import."""
    if _REGISTRY.discovered:
        return
    _REGISTRY.discovered = True  # set first: technique modules import this module back
    import spaces

    for info in pkgutil.iter_modules(spaces.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"spaces.{info.name}")
        if info.ispkg:  # a package of techniques, e.g. spaces/techniques/
            for sub in pkgutil.iter_modules(module.__path__):
                if not sub.name.startswith("_"):
                    importlib.import_module(f"spaces.{info.name}.{sub.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def get_technique(name: str) -> AnyTechnique:
    """The registered technique ``name``; an unknown name lists the known ones."""
    discover()
    try:
        return _REGISTRY.techniques[name]
    except KeyError:
        raise UnknownNameError("technique", name, _REGISTRY.techniques) from None


def list_techniques(stage: str | None = None) -> list[str]:
    """Registered technique names (of one stage, if given), in stage order, then by ``order``
    and name."""
    discover()
    chosen = [t for t in _REGISTRY.techniques.values() if stage is None or t.stage == stage]
    return [t.name for t in sorted(chosen, key=lambda t: (STAGES.index(t.stage), t.order, t.name))]


def techniques() -> Mapping[str, AnyTechnique]:
    """A read-only view of every registered technique by name."""
    discover()
    return MappingProxyType(_REGISTRY.techniques)
