"""Compressible layers: the representation every technique writes and the codec reads.

Techniques rewrite a model in place. Structural ones (structured pruning, low-rank) replace
modules with smaller plain ones; all others replace ``nn.Conv2d`` / ``nn.Linear`` by
:class:`CConv2d` / :class:`CLinear`, which hold

* ``weight``: the full-precision (shadow) weight that fine-tuning updates,
* ``mask``: an optional bool buffer of kept positions (unstructured sparsity),
* ``weight_repr``: an optional :class:`WeightRepr` that maps the shadow weight to the weight the
  layer really uses (fp16, int-k with a straight-through estimator, codebook, binary, ...) and
  that knows how that weight is stored (:class:`Stream`),
* ``act``: an optional :class:`Component` applied to the layer's input (activation fake-quant).

Every layer type the codec may meet is registered with :func:`register_layer` so that it can be
described as JSON (``layer_spec``) and rebuilt from it (``build_layer``): no pickle anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import UnknownNameError

FLOAT_DTYPES: Mapping[str, torch.dtype] = MappingProxyType({
    "f32": torch.float32,
    "f16": torch.float16,
    "f8e4m3": torch.float8_e4m3fn,
    "f8e5m2": torch.float8_e5m2,
})


@dataclass
class Stream:
    """One array of a layer's stored state, in the representation its technique gave it.

    ``kind="float"``: ``tensor`` holds values whose storage dtype is ``dtype`` (a key of
    :data:`FLOAT_DTYPES`). ``kind="codes"``: ``tensor`` holds non-negative integers below
    ``2 ** bits`` (int-k levels, codebook indices, sign bits), packed at ``bits`` bits each.
    ``mask`` (bool, same shape) marks the stored positions: the others are implied zeros and
    cost only their share of the position stream. ``share`` names a stream stored once for all
    layers that use it (a global codebook).
    """

    kind: str
    tensor: Tensor
    dtype: str = "f32"
    bits: int = 0
    mask: Tensor | None = None
    share: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "float" and self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown float storage dtype {self.dtype!r}; known: {list(FLOAT_DTYPES)}")
        if self.kind == "codes" and not 1 <= self.bits <= 32:
            raise ValueError(f"codes need 1..32 bits, got {self.bits}")
        if self.kind not in ("float", "codes"):
            raise ValueError(f"stream kind must be 'float' or 'codes', got {self.kind!r}")


def float_stream(t: Tensor, dtype: str = "f32", mask: Tensor | None = None) -> Stream:
    """A float stream of ``t`` (detached, on the CPU)."""
    return Stream("float", t.detach().cpu(), dtype=dtype, mask=None if mask is None else mask.cpu())


class Component(nn.Module):
    """A registered sub-module of a compressed layer (a weight representation, an activation
    quantizer): described by a JSON ``spec`` and a dict of streams, rebuilt from both."""

    kind: ClassVar[str] = ""

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments."""
        return {}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Component:
        """Rebuild from :meth:`spec` (tensors are loaded afterwards by :meth:`load_state`)."""
        return cls(**spec)

    def export_state(self) -> dict[str, Stream]:
        """Own parameters and buffers as streams (default: each as dense fp32)."""
        named = list(self.named_parameters(recurse=False)) + list(self.named_buffers(recurse=False))
        return {name: float_stream(t.float()) for name, t in named if t is not None}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`export_state`; ``tensors`` are fp32 (or int64 for codes)."""
        for name, t in tensors.items():
            current = getattr(self, name)
            if isinstance(t, nn.Parameter) and isinstance(current, nn.Parameter):
                setattr(self, name, t)  # a tied (shared) parameter
            else:
                current.data = t.to(current.dtype)


class WeightRepr(Component):
    """How a layer's weight is represented: ``forward(shadow) -> effective weight``.

    Subclasses implement :meth:`forward` (differentiable w.r.t. the shadow weight where training
    makes sense, usually through a straight-through estimator), :meth:`export_weight` and
    :meth:`load_weight`. :meth:`bits_per_weight` feeds BitOPs.
    """

    def forward(self, weight: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The effective weight the layer uses."""
        raise NotImplementedError

    def export_weight(self, weight: Tensor, mask: Tensor | None) -> Stream:
        """The stored form of the effective weight of ``weight`` (positions outside ``mask`` dropped)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def load_weight(self, stored: Tensor, shape: torch.Size) -> Tensor:
        """The shadow weight (fp32, ``shape``) whose effective weight equals the stored one."""
        raise NotImplementedError  # pragma: no cover - abstract

    def bits_per_weight(self) -> float:
        """Bits per weight used by the arithmetic (for BitOPs)."""
        return 32.0

    @torch.no_grad()
    def snap(self, weight: Tensor) -> Tensor:
        """The shadow weight snapped onto its representation (used by ``finalize``)."""
        return self.forward(weight).detach().to(weight.dtype)


_COMPONENTS: dict[str, type[Component]] = {}


def register_component(cls: type[Component]) -> type[Component]:
    """Class decorator registering a :class:`Component` under ``cls.kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a non-empty 'kind'")
    if _COMPONENTS.get(cls.kind, cls) is not cls:
        raise ValueError(f"component kind {cls.kind!r} is already registered")
    _COMPONENTS[cls.kind] = cls
    return cls


def _discover() -> None:
    from spaces.registry import discover  # the registry's technique modules import this one

    discover()


def component_from_spec(spec: dict[str, Any]) -> Component:
    """Build a registered component from ``{"kind": ..., **args}``."""
    kind = spec.get("kind", "")
    if kind not in _COMPONENTS:
        _discover()  # the component's technique module may not be imported yet
    if kind not in _COMPONENTS:
        raise UnknownNameError("layer component", kind, _COMPONENTS)
    return _COMPONENTS[kind].from_spec({k: v for k, v in spec.items() if k != "kind"})


def component_spec(c: Component) -> dict[str, Any]:
    """``{"kind": ..., **c.spec()}``."""
    return {"kind": c.kind, **c.spec()}


class _Compressed(nn.Module):
    """Shared behaviour of :class:`CConv2d` and :class:`CLinear` (a Module only so that the type
    checker knows ``register_buffer`` and friends; the concrete layer class comes next in the MRO).
    """

    # Tensor, as in nn.Conv2d's annotation: the checker requires the same type in both bases.
    weight: Tensor
    mask: Tensor | None
    weight_repr: WeightRepr | None
    act: Component | None

    def _init_compressed(self) -> None:
        self.register_buffer("mask", None)
        self.weight_repr = None
        self.act = None

    def effective_weight(self) -> Tensor:
        """The weight the layer computes with: representation, then mask."""
        w: Tensor = self.weight
        if self.weight_repr is not None:
            w = self.weight_repr(w)
        if self.mask is not None:
            w = w * self.mask
        return w

    def set_mask(self, mask: Tensor | None) -> None:
        """Install (or remove) a mask of kept positions and zero the pruned shadow weights."""
        if mask is None:
            self.mask = None
            return
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.mask = mask.to(self.weight.device, torch.bool)
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def _input(self, x: Tensor) -> Tensor:
        return self.act(x) if self.act is not None else x


class CConv2d(_Compressed, nn.Conv2d):
    """``nn.Conv2d`` whose weight goes through a representation and a mask (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_compressed()

    def forward(self, x: Tensor) -> Tensor:
        """Convolution with the effective weight."""
        return self._conv_forward(self._input(x), self.effective_weight(), self.bias)


class CLinear(_Compressed, nn.Linear):
    """``nn.Linear`` whose weight goes through a representation and a mask (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        nn.Linear.__init__(self, *args, **kwargs)
        self._init_compressed()

    def forward(self, x: Tensor) -> Tensor:
        """Affine map with the effective weight."""
        return F.linear(self._input(x), self.effective_weight(), self.bias)


Compressed = CConv2d | CLinear


def conv_args(m: nn.Conv2d) -> dict[str, Any]:
    """Constructor arguments of a conv (JSON-serialisable)."""
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": list(m.padding) if not isinstance(m.padding, str) else m.padding,
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def linear_args(m: nn.Linear) -> dict[str, Any]:
    """Constructor arguments of a linear layer."""
    return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}


def _tuple_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def compress_layer(m: nn.Conv2d | nn.Linear) -> Compressed:
    """The :class:`CConv2d` / :class:`CLinear` twin of ``m`` (same weights and device); a layer
    that is already compressed is returned as it is."""
    if isinstance(m, CConv2d | CLinear):
        return m
    if isinstance(m, nn.Conv2d):
        new: Compressed = CConv2d(**_tuple_args(conv_args(m)))
    elif isinstance(m, nn.Linear):
        new = CLinear(**_tuple_args(linear_args(m)))
    else:
        raise TypeError(f"cannot compress {type(m).__name__}; only Conv2d and Linear")
    new.to(m.weight.device)
    with torch.no_grad():
        new.weight.copy_(m.weight)
        if m.bias is not None:
            # the twin was built with a bias exactly when ``m`` has one
            cast(Tensor, new.bias).copy_(m.bias)
    new.train(m.training)
    return new


# ----------------------------------------------------------------------------- layer registry


@dataclass(frozen=True)
class LayerType:
    """How one module class is described as JSON, rebuilt, and its tensors exported/loaded."""

    name: str
    cls: type[nn.Module]
    spec: Callable[[nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    children: tuple[str, ...] = field(default=())  # sub-layers exported recursively (containers)


_LAYERS: dict[str, LayerType] = {}


def register_layer(layer_type: LayerType) -> LayerType:
    """Register a module class the codec can describe and rebuild."""
    if _LAYERS.get(layer_type.name, layer_type) is not layer_type:
        raise ValueError(f"layer type {layer_type.name!r} is already registered")
    _LAYERS[layer_type.name] = layer_type
    return layer_type


def layer_type_of(m: nn.Module) -> LayerType | None:
    """The registered type of ``m`` (exact class match), or None."""
    for lt in _LAYERS.values():
        if type(m) is lt.cls:
            return lt
    return None


def layer_spec(m: nn.Module) -> dict[str, Any]:
    """``{"type": ..., **args}`` for a registered module."""
    lt = layer_type_of(m)
    if lt is None:
        raise TypeError(f"module type {type(m).__name__} is not registered with spaces.layers.register_layer")
    return {"type": lt.name, **lt.spec(m)}


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`layer_spec` (tensors are loaded separately)."""
    name = spec.get("type", "")
    if name not in _LAYERS:
        _discover()
    if name not in _LAYERS:
        raise UnknownNameError("layer type", name, _LAYERS)
    return _LAYERS[name].build({k: v for k, v in spec.items() if k != "type"})


def _compressed_spec(m: nn.Module, base: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(m, CConv2d | CLinear)
    return {
        **base,
        "masked": m.mask is not None,
        "weight_repr": component_spec(m.weight_repr) if m.weight_repr is not None else None,
        "act": component_spec(m.act) if m.act is not None else None,
    }


def _build_compressed(cls: type[CConv2d] | type[CLinear], args: dict[str, Any]) -> nn.Module:
    args = dict(args)
    masked = args.pop("masked", False)
    wr, act = args.pop("weight_repr", None), args.pop("act", None)
    m = cls(**_tuple_args(args))
    if masked:
        m.mask = torch.ones_like(m.weight, dtype=torch.bool)
    m.weight_repr = component_from_spec(wr) if wr else None  # type: ignore[assignment]
    m.act = component_from_spec(act) if act else None
    return m


def _bn_spec(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    return {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum, "affine": m.affine}


for _lt in (
    LayerType("Conv2d", nn.Conv2d, lambda m: conv_args(m), lambda a: nn.Conv2d(**_tuple_args(a))),  # type: ignore[arg-type]
    LayerType("Linear", nn.Linear, lambda m: linear_args(m), lambda a: nn.Linear(**a)),  # type: ignore[arg-type]
    LayerType("BatchNorm2d", nn.BatchNorm2d, _bn_spec, lambda a: nn.BatchNorm2d(**a)),
    LayerType("BatchNorm1d", nn.BatchNorm1d, _bn_spec, lambda a: nn.BatchNorm1d(**a)),
    LayerType("CConv2d", CConv2d, lambda m: _compressed_spec(m, conv_args(m)), lambda a: _build_compressed(CConv2d, a)),  # type: ignore[arg-type]
    LayerType("CLinear", CLinear, lambda m: _compressed_spec(m, linear_args(m)), lambda a: _build_compressed(CLinear, a)),  # type: ignore[arg-type]
):
    register_layer(_lt)


def iter_units(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Registered modules of ``model`` that hold tensors, outermost first, without descending
    into them (a low-rank container is one unit; its factors are its children)."""

    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            lt = layer_type_of(child)
            if lt is not None:
                yield path, child
            else:
                yield from walk(path, child)

    yield from walk("", model)


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """All conv and linear layers (plain or compressed, inside containers too), in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` of ``model``."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)
