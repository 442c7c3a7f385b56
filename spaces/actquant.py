"""Activation quantization: fake-quantize the input of every conv/linear layer.

Each compressed layer gets an :class:`ActQuantizer` in its ``act`` slot. Formats: ``int8``,
``int4`` (uniform, one clipping value per layer) and ``fp8`` (e4m3, the clipping value mapped
onto e4m3's largest finite value, 448). Inputs that calibration shows to be non-negative (after
a ReLU) use the unsigned range ``[0, clip]`` (all ``2**bits`` levels on the useful side);
others the symmetric range ``[-clip, clip]``. The clipping value is a percentile of ``|x|`` on
the calibration batches (``ApplyContext.calibration``), averaged over the batches. Training
passes gradients straight through the rounding (and not through the clipping).

Calibration data is **required**: ``apply`` raises :class:`models.errors.UserError` when
``ctx.calibration`` is None. (Calibrating lazily on the first training batch would make the
clipping values depend on whichever batch happens to come first, and a model that is applied
but never trained would have none.)

The clipping values are fp32 buffers, stored by the codec as a few bytes per layer: activation
quantization changes accuracy and BitOPs, not the size of the weights.

Layer policy (``LayerPolicy.protected_paths``, the same one the weight techniques use): the first
layer's input (the image) stays unquantized when the policy protects that layer; a protected
layer reads at least 8-bit inputs (int8 where the plan says int4).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from models.errors import UserError
from spaces.layers import CConv2d, CLinear, Component, register_component
from spaces.policy import PROTECTED_BITS
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique
from spaces.represent import compressed_layers

FORMATS: Mapping[str, int] = MappingProxyType({"int8": 8, "int4": 4, "fp8": 8})  # format -> bits per activation
_FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = float(torch.finfo(_FP8_DTYPE).max)  # 448


def _ste(x: Tensor, q: Tensor) -> Tensor:
    """``q`` in the forward pass, the gradient of ``x`` in the backward pass."""
    return x + (q - x).detach()


@register_component
class ActQuantizer(Component):
    """Fake-quantizes a layer's input to ``format`` within ``[-clip, clip]`` (or ``[0, clip]``)."""

    kind = "act"
    clip: Tensor  # buffer registered in __init__ (annotated so the type checker sees a Tensor)

    def __init__(self, format: str = "int8", signed: bool = True) -> None:
        super().__init__()
        if format not in FORMATS:
            raise UserError(f"activation format must be one of {list(FORMATS)}, got {format!r}")
        self.format, self.signed = format, signed
        self.register_buffer("clip", torch.ones(()))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (the clip value is a buffer, stored as an fp32 stream)."""
        return {"format": self.format, "signed": self.signed}

    def bits_per_activation(self) -> float:
        """Bits per input value used by the arithmetic (for BitOPs)."""
        return float(FORMATS[self.format])

    def forward(self, x: Tensor) -> Tensor:
        """Quantized ``x`` (straight-through gradient inside the clipping range)."""
        clip = self.clip.clamp_min(1e-12)
        clipped = torch.clamp(x.float(), -clip if self.signed else torch.zeros_like(clip), clip)
        if self.format == "fp8":
            scale = clip / _FP8_MAX
            q = (clipped / scale).to(_FP8_DTYPE).float() * scale
        else:
            bits = FORMATS[self.format]
            levels = 2 ** (bits - 1) - 1 if self.signed else 2**bits - 1
            scale = clip / levels
            q = torch.round(clipped / scale) * scale
        return _ste(clipped, q).to(x.dtype)


@dataclass(frozen=True)
class ActQuantConfig(TechniqueConfig):
    """Activation quantization.

    Attributes:
        format: ``"int8"``, ``"int4"`` or ``"fp8"`` (e4m3).
        percentile: Percentile of ``|x|`` on the calibration batches used as clipping value.
    """

    format: str = "int8"
    percentile: float = 99.99

    def validate(self) -> None:
        """Check the format and the percentile."""
        check(self.format in FORMATS, f"actquant.format must be one of {list(FORMATS)}, got {self.format!r}")
        check(50.0 <= self.percentile <= 100.0,
              f"actquant.percentile must be in [50, 100], got {self.percentile}")


# ------------------------------------------------------------------------------ calibration


@dataclass
class _Stats:
    """Running calibration statistics of one layer's input."""

    percentiles: list[float]
    minimum: float = math.inf

    def clip(self) -> float:
        return sum(self.percentiles) / len(self.percentiles) if self.percentiles else 1.0


def _percentile_abs(x: Tensor, percentile: float) -> float:
    flat = x.detach().float().abs().flatten()
    # kthvalue has no size limit (torch.quantile refuses more than 2**24 elements).
    k = min(flat.numel(), max(1, math.ceil(percentile / 100.0 * flat.numel())))
    return float(flat.kthvalue(k).values)


@torch.no_grad()
def calibrate(model: nn.Module, layers: Sequence[tuple[str, nn.Module]], batches: Callable[[], Iterator[Tensor]],
              percentile: float) -> dict[str, _Stats]:
    """Input statistics of ``layers`` over the calibration batches, measured with forward
    pre-hooks (removed afterwards) with the model in eval mode (BN statistics untouched)."""
    stats = {path: _Stats([]) for path, _ in layers}

    def hook_for(path: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            stats[path].percentiles.append(_percentile_abs(x, percentile))
            stats[path].minimum = min(stats[path].minimum, float(x.min()))
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(path)) for path, layer in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        seen = 0
        for xb in batches():
            model(xb.to(device))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise UserError("activation quantization got no calibration batches; ApplyContext.calibration yielded none")
    return stats


# -------------------------------------------------------------------------------- technique


@register_technique
class ActQuant(Technique[ActQuantConfig, None]):
    """Post-training calibrated activation fake-quantization (int8, int4, fp8), trainable with STE."""

    name = "actquant"
    stage = "activations"
    family = "act"
    config_cls = ActQuantConfig

    def suggest(self, trial: optuna.Trial, prefix: str) -> ActQuantConfig:
        """Format (int8, fp8, int4) and clipping percentile in [99, 99.999]."""
        return ActQuantConfig(
            format=trial.suggest_categorical(f"{prefix}.format", list(FORMATS)),
            percentile=trial.suggest_float(f"{prefix}.percentile", 99.0, 99.999),
        )

    def apply(self, model: nn.Module, config: ActQuantConfig, ctx: ApplyContext) -> None:
        """Calibrate clipping values on ``ctx.calibration`` and give each layer an :class:`ActQuantizer`."""
        if ctx.calibration is None:
            raise UserError(
                "activation quantization needs calibration data: pass ApplyContext(calibration=...) "
                "yielding a few normalised input batches"
            )
        protected = ctx.policy.protected_paths(model)  # the one layer policy, max_share included
        layers = compressed_layers(model)
        if not layers:
            return
        first = layers[0][0]
        targets = [(p, m) for p, m in layers if not (p == first and p in protected)]
        for _, m in layers:
            m.act = None  # calibrate on unquantized inputs (re-applying replaces quantizers)
        stats = calibrate(model, targets, ctx.calibration, config.percentile)
        for path, layer in targets:
            fmt = config.format
            if path in protected and FORMATS[fmt] < PROTECTED_BITS:
                fmt = "int8"
            _install(layer, fmt, stats[path])

    def settings(self) -> list[ActQuantConfig]:
        """int8, fp8, int4 (the size stays the same; accuracy drops along them)."""
        return [ActQuantConfig(format=f) for f in ("int8", "fp8", "int4")]

    def moderate(self) -> ActQuantConfig:
        """int8 at the 99.99th percentile."""
        return ActQuantConfig(format="int8")


def _install(layer: CConv2d | CLinear, fmt: str, stats: _Stats) -> None:
    q = ActQuantizer(fmt, signed=stats.minimum < 0)
    q.clip.fill_(max(stats.clip(), 1e-8))
    layer.act = q.to(layer.weight.device)
