"""Model registry, in the style of timm: ``@register_model`` beside each architecture,
``create_model(name, ...)`` to build one, metadata (a :class:`DataSpec`) beside each entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from models.errors import UnknownNameError
from models.spec import DataSpec

ModelFn = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    """A registered architecture and the input it is designed for."""

    name: str
    fn: ModelFn
    data_spec: DataSpec
    description: str = ""


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, data_spec: DataSpec, description: str = "") -> Callable[[ModelFn], ModelFn]:
    """Decorator registering ``fn(num_classes=..., in_channels=...) -> nn.Module`` under ``name``."""

    def decorator(fn: ModelFn) -> ModelFn:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, fn, data_spec, description or (fn.__doc__ or "").strip())
        return fn

    return decorator


def _ensure_loaded() -> None:
    # Importing the architectures package runs every @register_model.
    import models.architectures  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``name``; an unknown name raises an error listing the known ones."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError("model", name, _REGISTRY) from None


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """Build the registered model ``name``; class and channel counts default to its DataSpec."""
    info = get_model_info(name)
    arch = {
        "name": name,
        "num_classes": info.data_spec.num_classes if num_classes is None else num_classes,
        "in_channels": info.data_spec.channels if in_channels is None else in_channels,
    }
    model = info.fn(num_classes=arch["num_classes"], in_channels=arch["in_channels"])
    # The codec records this so that decode can rebuild the architecture without pickle.
    setattr(model, "pc_arch", arch)  # noqa: B010 (a plain attribute, not a Module or Tensor)
    return model


def model_arch(model: nn.Module) -> dict[str, object]:
    """The ``create_model`` arguments a model was built with (raises if it was not built so)."""
    arch = getattr(model, "pc_arch", None)
    if not isinstance(arch, dict):
        raise ValueError(f"{type(model).__name__} was not built by models.create_model; its architecture is unknown")
    return dict(arch)
