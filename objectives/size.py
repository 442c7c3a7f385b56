"""Size and cost of a model: bytes of its compressed artifact, compression ratio, per-unit
breakdown, and BitOPs.

* **Size** is ``len(storage.codec.encode(model))``, reported by :func:`measure`, the one entry
  point every caller uses (never estimated from parameter counts).
* **Compression ratio** is the baseline's bytes over the compressed model's bytes, both through
  the same codec.
* **BitOPs** (Baskin et al. 2018; van Baalen et al. 2020) are, per example, the sum over every
  conv and linear layer of ``MACs * weight bits * activation bits``: a layer without a weight
  representation counts 32-bit weights, one without an activation quantizer 32-bit inputs.
  MACs are measured with forward hooks on one batch, so whatever the architecture does (strides,
  padding, groups, low-rank factors, structurally pruned layers) is counted as run. Unstructured
  masks are not credited unless ``sparse=True`` (dense hardware does not skip zeros).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.spec import DataSpec
from storage.codec import InputSpec, encode_with_report


@dataclass(frozen=True)
class Size:
    """A model's compressed artifact and where its bytes go.

    Attributes:
        artifact: ``storage.codec.encode(model)``: the bytes written to disk.
        breakdown: Bytes of each unit's blobs (by module path) and of the header
            (``"(header)"``); they sum to ``len(artifact)``.
    """

    artifact: bytes
    breakdown: dict[str, int]

    @property
    def bytes(self) -> int:
        """``len(artifact)``: the size every ratio is computed from."""
        return len(self.artifact)

    def ratio(self, baseline_bytes: int) -> float:
        """Compression ratio against a baseline measured by the same codec."""
        if baseline_bytes <= 0:
            raise ValueError(f"baseline bytes must be > 0, got {baseline_bytes}")
        return baseline_bytes / self.bytes


def measure(model: nn.Module, spec: InputSpec | DataSpec | None = None) -> Size:
    """The one size entry point: encode ``model`` and report its bytes and breakdown.

    ``spec`` (the data's spec) is recorded in the artifact's header, so that the artifact says
    how to feed the model; its few dozen bytes count like every other byte.
    """
    artifact, breakdown = encode_with_report(model, spec=spec)
    return Size(artifact, breakdown)


def _weight_bits(layer: nn.Module) -> float:
    rep = getattr(layer, "weight_repr", None)
    return float(rep.bits_per_weight()) if rep is not None else 32.0


def _activation_bits(layer: nn.Module) -> float:
    act = getattr(layer, "act", None)
    bits = getattr(act, "bits_per_activation", None)
    return float(bits()) if callable(bits) else 32.0


def _density(layer: nn.Module) -> float:
    mask = getattr(layer, "mask", None)
    return float(mask.float().mean()) if mask is not None else 1.0


def _macs_per_example(layer: nn.Module, out: torch.Tensor, batch: int) -> float:
    """Multiply-accumulates of one call of ``layer`` that produced ``out``, per example."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        per_output = (layer.in_channels // layer.groups) * kh * kw  # grouped/depthwise: fewer inputs
        return out.numel() / batch * per_output
    assert isinstance(layer, nn.Linear)
    return out.numel() / batch * layer.in_features


@torch.no_grad()
def layer_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """MACs per example of every conv/linear of ``model`` (by module path), measured with
    forward hooks on one batch of zeros of ``input_shape`` (batch dimension first)."""
    if len(input_shape) < 2 or input_shape[0] < 1:
        raise ValueError(f"input_shape must be (batch, ...) with batch >= 1, got {tuple(input_shape)}")
    batch = int(input_shape[0])
    macs: dict[str, float] = {}

    def hook_for(path: str) -> Any:
        def hook(layer: nn.Module, _args: Any, out: torch.Tensor) -> None:
            macs[path] = macs.get(path, 0.0) + _macs_per_example(layer, out, batch)
        return hook

    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(hook_for(p)) for p, m in layers]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(*input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return macs


def bitops(model: nn.Module, input_shape: Sequence[int], sparse: bool = False) -> int:
    """BitOPs per example: sum over conv/linear layers of ``MACs * weight bits * activation bits``.

    ``input_shape`` includes the batch dimension (e.g. ``(1, 3, 32, 32)``); the result is per
    example. With ``sparse=True`` a masked layer's MACs are scaled by its density (kept fraction).
    """
    modules = dict(model.named_modules())
    total = 0.0
    for path, macs in layer_macs(model, input_shape).items():
        layer = modules[path]
        density = _density(layer) if sparse else 1.0
        total += macs * density * _weight_bits(layer) * _activation_bits(layer)
    return round(total)
