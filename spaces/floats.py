"""Low-precision float weights: fp16, and fp8 (E4M3 or E5M2, Micikevicius et al. 2022).

``fp16`` rounds every weight to IEEE half precision and stores it in 2 bytes. ``fp8`` scales
each output channel so that its largest magnitude maps to the format's largest finite value
(448 for E4M3, 57344 for E5M2), rounds ``w / scale`` to fp8 and stores it in 1 byte, plus one
fp32 scale per channel. Both train through a straight-through estimator (the rounding is the
identity in the backward pass). fp8 has 8 bits, so the layer policy's protected layers keep it.

One technique, ``float``, covers both; its family label (``fp16`` or ``fp8``) follows the
config's format.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from spaces.layers import CConv2d, CLinear, Stream, WeightRepr, float_stream, register_component
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique
from spaces.represent import set_weight_repr, snap_weights

# format -> (stream storage dtype, torch dtype, largest finite value or None for unscaled, bits)
FORMATS: Mapping[str, tuple[str, torch.dtype, float | None, int]] = MappingProxyType({
    "fp16": ("f16", torch.float16, None, 16),
    "fp8_e4m3": ("f8e4m3", torch.float8_e4m3fn, 448.0, 8),
    "fp8_e5m2": ("f8e5m2", torch.float8_e5m2, 57344.0, 8),
})


def _round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to ``dtype`` (nearest even) and back to ``x``'s dtype."""
    return x.to(dtype).to(x.dtype)


@register_component
class FloatRepr(WeightRepr):
    """Weights rounded to fp16, or to fp8 after a per-output-channel scale."""

    kind = "float"
    scale: Tensor  # buffer registered in __init__ (annotated so the type checker sees a Tensor)

    def __init__(self, format: str = "fp16", channels: int = 1) -> None:
        super().__init__()
        check(format in FORMATS, f"float format must be one of {list(FORMATS)}, got {format!r}")
        self.format = format
        self.register_buffer("scale", torch.ones(channels if self.scaled else 0))

    @property
    def scaled(self) -> bool:
        """Whether the format has a per-channel scale (fp8)."""
        return FORMATS[self.format][2] is not None

    def spec(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"format": self.format, "channels": int(self.scale.numel())}

    @classmethod
    def fit(cls, weight: Tensor, format: str, mask: Tensor | None = None) -> FloatRepr:
        """A representation of ``weight`` (fp8: scales from the kept weights' channel maxima)."""
        rep = cls(format, channels=weight.shape[0])
        rep.refit(weight, mask)
        return rep.to(weight.device)

    @torch.no_grad()
    def refit(self, weight: Tensor, mask: Tensor | None = None) -> None:
        """Recompute the fp8 scales so each channel's largest kept magnitude maps to the max."""
        if not self.scaled:
            return
        w = weight.detach().float()
        if mask is not None:
            w = w * mask
        peak = w.reshape(w.shape[0], -1).abs().amax(1)
        fmax = FORMATS[self.format][2]
        assert fmax is not None
        self.scale.copy_(torch.where(peak > 0, peak / fmax, torch.ones_like(peak)))

    def _values(self, weight: Tensor) -> Tensor:
        """The stored values: fp16 weights, or fp8 ``weight / scale`` (as fp32 tensors)."""
        _, dtype, fmax, _ = FORMATS[self.format]
        if fmax is None:
            return _round_to(weight, dtype)
        s = self.scale.view((-1,) + (1,) * (weight.ndim - 1))
        # Clamp first: out-of-range values would become NaN in E4M3 (it has no infinities).
        return _round_to((weight / s).clamp(-fmax, fmax), dtype)

    def forward(self, weight: Tensor) -> Tensor:
        """The rounded weight, with a straight-through gradient to the shadow weight."""
        if self.scaled:
            rounded = self._values(weight) * self.scale.view((-1,) + (1,) * (weight.ndim - 1))
        else:
            rounded = self._values(weight)
        return (rounded - weight).detach() + weight

    def export_weight(self, weight: Tensor, mask: Tensor | None) -> Stream:
        """The stored values as a float stream of the format's dtype."""
        with torch.no_grad():
            values = self._values(weight.float())
        return float_stream(values, dtype=FORMATS[self.format][0], mask=mask)

    def export_state(self) -> dict[str, Stream]:
        """The fp8 scales (fp32); nothing for fp16."""
        return {"scale": float_stream(self.scale.float())} if self.scaled else {}

    def load_weight(self, stored: Tensor, shape: torch.Size) -> Tensor:
        """Shadow weight: the stored values (times the scales for fp8)."""
        w = stored.reshape(shape).float()
        if self.scaled:
            w = w * self.scale.view((-1,) + (1,) * (w.ndim - 1))
        return w

    def bits_per_weight(self) -> float:
        """16 or 8."""
        return float(FORMATS[self.format][3])


@dataclass(frozen=True)
class FloatConfig(TechniqueConfig):
    """Low-precision float weights.

    Attributes:
        format: ``"fp16"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
    """

    format: str = "fp16"

    def validate(self) -> None:
        """Check the format name."""
        check(self.format in FORMATS, f"float.format must be one of {list(FORMATS)}, got {self.format!r}")

    @property
    def bits(self) -> int:
        """Bits per weight."""
        return FORMATS[self.format][3]


def _float_layers(model: nn.Module) -> list[tuple[CConv2d | CLinear, FloatRepr]]:
    return [
        (m, m.weight_repr) for m in model.modules()
        if isinstance(m, CConv2d | CLinear) and isinstance(m.weight_repr, FloatRepr)
    ]


@register_technique
class FloatWeights(Technique[FloatConfig, None]):
    """fp16 or fp8 weights with a straight-through estimator."""

    name = "float"
    stage = "weights"
    family = "fp16"
    families = ("fp16", "fp8")
    config_cls = FloatConfig

    def family_of(self, config: FloatConfig) -> str:
        """``fp16`` or ``fp8``."""
        return "fp16" if config.format == "fp16" else "fp8"

    def suggest(self, trial: optuna.Trial, prefix: str) -> FloatConfig:
        """One of the formats."""
        return FloatConfig(format=trial.suggest_categorical(f"{prefix}.format", list(FORMATS)))

    def apply(self, model: nn.Module, config: FloatConfig, ctx: ApplyContext) -> None:
        """Give every conv/linear a :class:`FloatRepr` of the format."""
        set_weight_repr(
            model, ctx, lambda _p, layer: FloatRepr.fit(layer.weight.detach(), config.format, layer.mask),
            config.bits,
        )

    def finalize(self, model: nn.Module, config: FloatConfig, state: None) -> None:
        """Refit fp8 scales to the fine-tuned weights, then snap weights onto the format."""
        for layer, rep in _float_layers(model):
            rep.refit(layer.weight, layer.mask)
        snap_weights(model)

    def settings(self) -> list[FloatConfig]:
        """fp16, then fp8 E4M3."""
        return [FloatConfig("fp16"), FloatConfig("fp8_e4m3")]

    def moderate(self) -> FloatConfig:
        """fp8 E4M3."""
        return FloatConfig("fp8_e4m3")
