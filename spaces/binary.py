"""Binary weights: BinaryConnect (Courbariaux et al. 2015) with XNOR-Net's scale (Rastegari et
al. 2016).

The effective weight is ``sign(w) * alpha`` with ``alpha`` the mean magnitude of the kept shadow
weights of each output channel (``scale="channel"``) or of the whole layer (``"tensor"``);
``sign(0) = +1``. Training uses the straight-through estimator of BinaryConnect: the gradient
reaches the full-precision shadow weight as if ``sign`` were the identity, except where
``|w| > clip`` (the hardtanh STE), and after every optimizer step the shadow weights are clipped
to ``[-clip, clip]`` so they cannot drift so far that their sign never flips again. ``clip`` is
the layer's largest kept magnitude when it is binarised: clipping never bites at the start, it
only keeps the shadow weights within the range the trained layer already had (BinaryConnect's
``[-1, 1]`` assumes weights initialised in that range, which a trained layer's are not).

While training, ``alpha`` follows the shadow weights (the gradient flows through it too, as in
XNOR-Net); in eval mode the layer uses the stored ``alpha``, which ``finalize`` refits to the
fine-tuned weights. Pruned shadow weights are zero, so the kept count of a channel is its
non-zero count. Stored as 1-bit sign codes (positions outside a mask dropped) plus one fp32
``alpha`` per channel (or per layer). The layer policy's protected layers get int8 instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
import torch
from torch import Tensor, nn

from models.train import TrainHook
from spaces.layers import CConv2d, CLinear, Stream, WeightRepr, float_stream, register_component
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique
from spaces.represent import set_weight_repr, snap_weights

SCALES = ("channel", "tensor")


def sign_ste(w: Tensor, clip: float) -> Tensor:
    """``+1`` where ``w >= 0`` else ``-1``; backward: identity where ``|w| <= clip``, else zero."""
    hard = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    soft = w.clamp(-clip, clip)
    return (hard - soft).detach() + soft


@register_component
class BinaryRepr(WeightRepr):
    """``sign(w) * alpha`` with one ``alpha`` per output channel (or per layer)."""

    kind = "binary"
    alpha: Tensor  # buffer registered in __init__ (annotated so the type checker sees a Tensor)

    def __init__(self, per_channel: bool = True, channels: int = 1, clip: float = 1.0) -> None:
        super().__init__()
        self.per_channel, self.clip = per_channel, float(clip)
        self.register_buffer("alpha", torch.ones(channels if per_channel else 1))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments."""
        return {"per_channel": self.per_channel, "channels": int(self.alpha.numel()), "clip": self.clip}

    @classmethod
    def fit(cls, weight: Tensor, per_channel: bool = True, mask: Tensor | None = None) -> BinaryRepr:
        """A representation of ``weight``: ``alpha`` from its kept weights, ``clip`` their peak."""
        w = weight.detach().float()
        if mask is not None:
            w = w * mask
        peak = float(w.abs().max()) if w.numel() else 1.0
        rep = cls(per_channel, channels=weight.shape[0], clip=peak if peak > 0 else 1.0)
        rep.refit(w, mask)
        return rep.to(weight.device)

    def _flat(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], -1) if self.per_channel else weight.reshape(1, -1)

    def _mean_magnitude(self, weight: Tensor, kept: Tensor) -> Tensor:
        counts = self._flat(kept).sum(1).clamp_min(1)
        return (self._flat(weight).abs() * self._flat(kept)).sum(1) / counts

    @torch.no_grad()
    def refit(self, weight: Tensor, mask: Tensor | None = None) -> None:
        """Set ``alpha`` to the mean magnitude of the kept weights."""
        w = weight.detach().float()
        kept = torch.ones_like(w) if mask is None else mask.to(w.dtype)
        self.alpha.copy_(self._mean_magnitude(w, kept))

    def _shape(self, weight: Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (weight.ndim - 1)

    def forward(self, weight: Tensor) -> Tensor:
        """Binarised weight; in training ``alpha`` follows the shadow weight (and is recorded)."""
        if self.training:
            alpha = self._mean_magnitude(weight, (weight != 0).to(weight.dtype))
            with torch.no_grad():
                self.alpha.copy_(alpha.detach().float())
        else:
            alpha = self.alpha.to(weight.dtype)
        return sign_ste(weight, self.clip) * alpha.view(self._shape(weight))

    @torch.no_grad()
    def snap(self, weight: Tensor) -> Tensor:
        """``sign(w) * alpha`` with the stored ``alpha`` (whatever the mode)."""
        sign = torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
        return sign * self.alpha.to(weight.dtype).view(self._shape(weight))

    def export_weight(self, weight: Tensor, mask: Tensor | None) -> Stream:
        """1-bit codes: 1 where ``w >= 0``."""
        codes = (weight.detach() >= 0).to(torch.int64).cpu()
        return Stream("codes", codes, bits=1, mask=None if mask is None else mask.cpu())

    def export_state(self) -> dict[str, Stream]:
        """``alpha`` (fp32)."""
        return {"alpha": float_stream(self.alpha.float())}

    def load_weight(self, stored: Tensor, shape: torch.Size) -> Tensor:
        """Shadow weight ``(2 * code - 1) * alpha``."""
        sign = stored.reshape(shape).float() * 2 - 1
        return sign * self.alpha.float().view(self._shape(sign))

    def bits_per_weight(self) -> float:
        """1."""
        return 1.0


def _binary_layers(model: nn.Module) -> list[tuple[CConv2d | CLinear, BinaryRepr]]:
    return [
        (m, m.weight_repr) for m in model.modules()
        if isinstance(m, CConv2d | CLinear) and isinstance(m.weight_repr, BinaryRepr)
    ]


class ClipShadowWeights(TrainHook):
    """After each step: shadow weights clipped to ``[-clip, clip]``, pruned ones kept at zero."""

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Clip (BinaryConnect) and re-zero pruned positions (their count defines ``alpha``)."""
        for layer, rep in _binary_layers(model):
            layer.weight.clamp_(-rep.clip, rep.clip)
            if layer.mask is not None:
                layer.weight.mul_(layer.mask)


@dataclass(frozen=True)
class BinaryConfig(TechniqueConfig):
    """Binary weights.

    Attributes:
        scale: ``"channel"`` (one ``alpha`` per output channel) or ``"tensor"`` (one per layer).
    """

    scale: str = "channel"

    def validate(self) -> None:
        """Check the scale name."""
        check(self.scale in SCALES, f"binary.scale must be one of {SCALES}, got {self.scale!r}")


@register_technique
class BinaryWeights(Technique[BinaryConfig, None]):
    """BinaryConnect with XNOR-style scales and quantization-aware fine-tuning."""

    name = "binary"
    stage = "weights"
    family = "binary"
    config_cls = BinaryConfig

    def suggest(self, trial: optuna.Trial, prefix: str) -> BinaryConfig:
        """Per-channel or per-tensor scale."""
        return BinaryConfig(scale=trial.suggest_categorical(f"{prefix}.scale", list(SCALES)))

    def apply(self, model: nn.Module, config: BinaryConfig, ctx: ApplyContext) -> None:
        """Give every conv/linear a :class:`BinaryRepr` (protected layers: int8)."""
        set_weight_repr(
            model, ctx,
            lambda _p, layer: BinaryRepr.fit(layer.weight.detach(), config.scale == "channel", layer.mask),
            1,
        )

    def hooks(self, model: nn.Module, config: BinaryConfig, state: None) -> list[TrainHook]:
        """Clip the shadow weights after every step."""
        return [ClipShadowWeights()]

    def finalize(self, model: nn.Module, config: BinaryConfig, state: None) -> None:
        """Refit ``alpha`` to the fine-tuned weights, then snap them to ``sign * alpha``."""
        for layer, rep in _binary_layers(model):
            rep.refit(layer.weight, layer.mask)
        snap_weights(model)

    def settings(self) -> list[BinaryConfig]:
        """Per-channel, then per-tensor scale (smaller by 4 bytes per channel but one)."""
        return [BinaryConfig("channel"), BinaryConfig("tensor")]

    def moderate(self) -> BinaryConfig:
        """Per-channel scale."""
        return BinaryConfig("channel")
