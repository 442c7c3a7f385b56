"""int-k weights (k = 2..8): per-channel (or per-tensor) uniform quantization, symmetric or
asymmetric, trained with a straight-through estimator and, optionally, a learned step size
(LSQ, Esser et al. 2020). Stored as packed k-bit codes plus one fp32 scale (and zero point) per
output channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from spaces.layers import Stream, WeightRepr, float_stream, register_component
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique
from spaces.represent import set_weight_repr, snap_weights

_CLIP_RATIOS = torch.linspace(1.0, 0.5, 11)  # searched per channel at init (MSE-optimal clipping)


def round_ste(x: Tensor) -> Tensor:
    """round() in the forward pass, identity in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(x: Tensor, g: float) -> Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` in the backward pass (LSQ)."""
    return (x - x * g).detach() + x * g


@register_component
class IntRepr(WeightRepr):
    """Uniform k-bit levels per output channel: ``w = (q - zero) * scale``."""

    kind = "int"
    zero: Tensor  # buffer registered in __init__ (annotated so the type checker sees a Tensor)

    def __init__(self, bits: int, symmetric: bool = True, per_channel: bool = True, learned: bool = False, channels: int = 1) -> None:
        super().__init__()
        self.bits, self.symmetric, self.per_channel, self.learned = bits, symmetric, per_channel, learned
        n = channels if per_channel else 1
        self.scale = nn.Parameter(torch.ones(n), requires_grad=learned)
        self.register_buffer("zero", torch.zeros(n))  # integer zero point (asymmetric only)

    # Levels: symmetric q in [-(2^(b-1) - 1), 2^(b-1) - 1] (zero exactly representable, one code
    # unused); asymmetric q in [0, 2^b - 1] with an integer zero point.
    @property
    def qmin(self) -> int:
        """Lowest level."""
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Highest level."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def spec(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"bits": self.bits, "symmetric": self.symmetric, "per_channel": self.per_channel,
                "learned": self.learned, "channels": int(self.scale.numel())}

    @classmethod
    def fit(cls, weight: Tensor, bits: int, symmetric: bool = True, per_channel: bool = True,
            learned: bool = False, mask: Tensor | None = None) -> IntRepr:
        """A representation whose scales minimise the quantization MSE of ``weight``."""
        rep = cls(bits, symmetric, per_channel, learned, channels=weight.shape[0])
        w = weight.detach().float()
        if mask is not None:
            w = w * mask
        flat = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
        best_err = torch.full((flat.shape[0],), math.inf)
        scale, zero = torch.ones(flat.shape[0]), torch.zeros(flat.shape[0])
        for r in _CLIP_RATIOS:
            if symmetric:
                s = (flat.abs().amax(1) * r / rep.qmax).clamp_min(1e-12)
                z = torch.zeros_like(s)
            else:
                lo, hi = flat.amin(1).clamp_max(0) * r, flat.amax(1).clamp_min(0) * r
                s = ((hi - lo) / rep.qmax).clamp_min(1e-12)
                z = (-lo / s).round()
            q = (flat / s[:, None] + z[:, None]).round().clamp(rep.qmin, rep.qmax)
            err = ((q - z[:, None]) * s[:, None] - flat).pow(2).sum(1)
            better = err < best_err
            best_err, scale, zero = torch.where(better, err, best_err), torch.where(better, s, scale), torch.where(better, z, zero)
        with torch.no_grad():
            rep.scale.copy_(scale)
            rep.zero.copy_(zero)
        return rep.to(weight.device)

    def _shape(self, weight: Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.ndim - 1)

    def _levels(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s: Tensor = self.scale  # becomes a plain Tensor once the LSQ gradient scale is applied
        if self.learned and self.training:
            s = grad_scale(s, 1.0 / math.sqrt(weight.numel() / s.numel() * self.qmax))
        s, z = s.view(self._shape(weight)), self.zero.view(self._shape(weight))
        q = torch.clamp(round_ste(weight / s + z), self.qmin, self.qmax)
        return q, s, z

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantized weight (straight-through gradient to the shadow weight)."""
        q, s, z = self._levels(weight)
        return (q - z) * s

    def export_weight(self, weight: Tensor, mask: Tensor | None) -> Stream:
        """Packed codes ``q - qmin`` at ``bits`` bits."""
        with torch.no_grad():
            q, _, _ = self._levels(weight)
        codes = (q - self.qmin).round().to(torch.int64).cpu()
        return Stream("codes", codes, bits=self.bits, mask=None if mask is None else mask.cpu())

    def export_state(self) -> dict[str, Stream]:
        """Scales (fp32) and, if asymmetric, zero points (as codes of ``bits`` bits)."""
        out = {"scale": float_stream(self.scale.float())}
        if not self.symmetric:
            out["zero"] = Stream("codes", self.zero.round().to(torch.int64).cpu(), bits=self.bits)
        return out

    def load_weight(self, stored: Tensor, shape: torch.Size) -> Tensor:
        """Shadow weight ``(codes + qmin - zero) * scale``."""
        q = stored.reshape(shape).float() + self.qmin
        return (q - self.zero.view(self._shape(q))) * self.scale.detach().view(self._shape(q))

    def bits_per_weight(self) -> float:
        """``bits``."""
        return float(self.bits)




@dataclass(frozen=True)
class IntConfig(TechniqueConfig):
    """int-k weights.

    Attributes:
        bits: Bits per weight, 2..8.
        symmetric: Symmetric levels around zero (else asymmetric with a zero point).
        per_channel: One scale per output channel (else one per tensor).
        learned_step: Train the scales with LSQ's gradient (else only the weights train).
    """

    bits: int = 4
    symmetric: bool = True
    per_channel: bool = True
    learned_step: bool = True

    def validate(self) -> None:
        """Check ranges."""
        check(2 <= self.bits <= 8, f"int.bits must be in 2..8, got {self.bits}")


@register_technique
class IntK(Technique[IntConfig, None]):
    """Uniform int-k weight quantization with quantization-aware fine-tuning."""

    name = "int"
    stage = "weights"
    family = "int"
    config_cls = IntConfig
    stronger = MappingProxyType({"bits": -1})  # fewer bits compress more

    def suggest(self, trial: optuna.Trial, prefix: str) -> IntConfig:
        """bits in 2..8, symmetric or not, learned step or not."""
        return IntConfig(
            bits=trial.suggest_int(f"{prefix}.bits", 2, 8),
            symmetric=trial.suggest_categorical(f"{prefix}.symmetric", [True, False]),
            per_channel=True,
            learned_step=trial.suggest_categorical(f"{prefix}.learned_step", [True, False]),
        )

    def per_layer(self, config: IntConfig) -> tuple[str, ...]:
        """A layer may have its own bits."""
        return ("bits",)

    def apply(self, model: nn.Module, config: IntConfig, ctx: ApplyContext) -> None:
        """Give every conv/linear an :class:`IntRepr` fitted to its weights (at its own bits
        where the step overrides them per layer)."""
        set_weight_repr(
            model, ctx,
            lambda path, layer: IntRepr.fit(layer.weight.detach(), ctx.config_at(config, path).bits,
                                            config.symmetric, config.per_channel, config.learned_step, layer.mask),
            lambda path: ctx.config_at(config, path).bits,
        )

    def finalize(self, model: nn.Module, config: IntConfig, state: None) -> None:
        """Snap shadow weights onto their levels."""
        snap_weights(model)

    def settings(self) -> list[IntConfig]:
        """8, 6, 4, 3, 2 bits."""
        return [IntConfig(bits=b) for b in (8, 6, 4, 3, 2)]

    def moderate(self) -> IntConfig:
        """int4, per-channel, symmetric, learned step."""
        return IntConfig(bits=4)
