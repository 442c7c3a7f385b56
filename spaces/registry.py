"""The technique contract and its registry.

A technique is one module in ``spaces/`` that defines a frozen, validated config dataclass
(:class:`TechniqueConfig`) and a :class:`Technique` subclass registered with
:func:`register_technique`. ``suggest`` samples a config from an Optuna trial under a namespaced
prefix, ``apply`` rewrites the model in place, ``hooks`` plug into the one training loop, and
``finalize`` snaps weights to their final representation after fine-tuning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import optuna
from torch import Tensor, nn

from models.errors import UnknownNameError, UserError
from models.train import TrainHook
from spaces.policy import LayerPolicy

STAGES = ("structure", "sparsity", "weights", "activations")


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
    def from_dict(cls, d: dict[str, Any]) -> TechniqueConfig:
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


@dataclass
class ApplyContext:
    """What ``apply`` may use besides the model and the config.

    Attributes:
        policy: Which layers are eligible and how protected layers are treated.
        calibration: Yields a few normalised input batches on the model's device (activation
            clipping, data-aware initialisation); None where no data is at hand.
    """

    policy: LayerPolicy = field(default_factory=LayerPolicy)
    calibration: Callable[[], Iterator[Tensor]] | None = None


class Technique:
    """Base of every technique; subclasses set the class attributes and override the methods."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    family: ClassVar[str] = ""  # short label for charts, e.g. "prune", "int", "codebook"
    config_cls: ClassVar[type[TechniqueConfig]] = TechniqueConfig

    def suggest(self, trial: optuna.Trial, prefix: str) -> TechniqueConfig:
        """Sample a config; every parameter name starts with ``prefix + "."``."""
        raise NotImplementedError

    def apply(self, model: nn.Module, config: TechniqueConfig, ctx: ApplyContext) -> None:
        """Rewrite ``model`` in place."""
        raise NotImplementedError

    def hooks(self, model: nn.Module, config: TechniqueConfig) -> list[TrainHook]:
        """Training-loop hooks for the fine-tune (regulariser, mask enforcement, schedules)."""
        return []

    def finalize(self, model: nn.Module, config: TechniqueConfig) -> None:
        """Snap weights to their final representation after fine-tuning."""

    def settings(self) -> list[TechniqueConfig]:
        """Configs from mildest to most aggressive (the shared test suite checks that the
        measured size shrinks along them)."""
        raise NotImplementedError

    def moderate(self) -> TechniqueConfig:
        """A moderate setting that must keep accuracy within 2 points after a short fine-tune."""
        raise NotImplementedError

    def family_of(self, config: TechniqueConfig) -> str:
        """The family label of ``config`` (default: :attr:`family`; a technique covering
        several families, such as fp16/fp8, overrides it)."""
        return self.family

    def config_from_dict(self, d: dict[str, Any]) -> TechniqueConfig:
        """Parse this technique's config."""
        return self.config_cls.from_dict(d)


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    if cls.stage not in STAGES:
        raise ValueError(f"technique {cls.name!r} has stage {cls.stage!r}; expected one of {STAGES}")
    if cls.name in _TECHNIQUES and type(_TECHNIQUES[cls.name]) is not cls:
        raise ValueError(f"technique {cls.name!r} is already registered")
    _TECHNIQUES[cls.name] = cls()
    return cls


def _ensure_loaded() -> None:
    import spaces.techniques  # noqa: F401  (imports every technique module)


def get_technique(name: str) -> Technique:
    """The registered technique ``name``; an unknown name lists the known ones."""
    _ensure_loaded()
    try:
        return _TECHNIQUES[name]
    except KeyError:
        raise UnknownNameError("technique", name, _TECHNIQUES) from None


def list_techniques(stage: str | None = None) -> list[str]:
    """Registered technique names (of one stage, if given), sorted."""
    _ensure_loaded()
    return sorted(n for n, t in _TECHNIQUES.items() if stage is None or t.stage == stage)
