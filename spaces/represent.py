"""Shared plumbing of the weight-representation techniques (not a technique itself)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from spaces.layers import (
    CConv2d,
    CLinear,
    WeightRepr,
    compress_layer,
    prunable_layers,
    replace_module,
)
from spaces.policy import PROTECTED_BITS
from spaces.registry import ApplyContext

ReprFactory = Callable[[str, CConv2d | CLinear], WeightRepr]


def compressed_layers(model: nn.Module) -> list[tuple[str, CConv2d | CLinear]]:
    """Every conv/linear of ``model`` converted to its compressed twin (in place), in order."""
    out = []
    for path, layer in prunable_layers(model):
        c = compress_layer(layer)
        if c is not layer:
            replace_module(model, path, c)
        out.append((path, c))
    return out


def protect(layer: CConv2d | CLinear) -> None:
    """Give a layer the policy protects its representation: per-channel ``PROTECTED_BITS``-bit
    integers (the classic recipe keeps the first and last layer at 8 bits)."""
    from spaces.intk import IntRepr  # intk builds on this module

    layer.weight_repr = IntRepr.fit(layer.weight.detach(), bits=PROTECTED_BITS, mask=layer.mask)
    layer.weight_repr.to(layer.weight.device)


def set_weight_repr(model: nn.Module, ctx: ApplyContext, make: ReprFactory,
                    bits: float | Callable[[str], float]) -> None:
    """Give every conv/linear layer the representation ``make(path, layer)``.

    Layers the policy protects keep at least ``PROTECTED_BITS`` bits: where ``bits`` (a
    number, or a layer path's bits under per-layer overrides) is lower they are
    :func:`protect`-ed instead.
    """
    protected = ctx.policy.protected_paths(model)
    for path, layer in compressed_layers(model):
        layer_bits = bits(path) if callable(bits) else bits
        if path in protected and layer_bits < PROTECTED_BITS:
            protect(layer)
        else:
            layer.weight_repr = make(path, layer)
            layer.weight_repr.to(layer.weight.device)


@torch.no_grad()
def snap_weights(model: nn.Module) -> None:
    """Replace each compressed layer's shadow weight by its effective value (``finalize``)."""
    for m in model.modules():
        if isinstance(m, CConv2d | CLinear) and m.weight_repr is not None:
            m.weight.copy_(m.weight_repr.snap(m.weight))
            if m.mask is not None:
                m.weight.mul_(m.mask)
