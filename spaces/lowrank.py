"""Low-rank factorisation by truncated SVD (Denton et al. 2014; Jaderberg et al. 2014 style).

A ``k x k`` convolution (``groups == 1``) whose weight reshaped to ``(out, in * k * k)`` has the
truncated SVD ``U_r S_r V_r^T`` becomes a :class:`LowRankConv2d`: ``first``, a ``k x k`` conv
with ``r`` output channels and the original stride, padding and dilation, whose weight is
``sqrt(S_r) V_r^T``, followed by ``second``, a ``1 x 1`` conv with weight ``U_r sqrt(S_r)`` and
the original bias. A linear layer becomes a :class:`LowRankLinear` in the same way. Splitting
``sqrt(S)`` onto both factors balances their scales, which suits fine-tuning and any later
quantization of the factors.

The rank is ``ceil(rank_ratio * min(out, in * k * k))`` (``mode="ratio"``) or the smallest rank
keeping a share ``energy`` of the squared singular values (``mode="energy"``). A layer is left
alone where the factors would not be smaller than the layer (``r * (in*k*k + out) >= out*in*k*k``),
where it is depthwise or grouped, and where the layer policy protects it.

The factors are plain ``nn.Conv2d`` / ``nn.Linear`` modules, so later stages of a plan (pruning,
weight representations) turn them into ``CConv2d`` / ``CLinear`` in place; the containers'
JSON specs embed their children's specs so the codec rebuilds whatever the children became.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

import optuna
import torch
from torch import Tensor, nn

from spaces.layers import LayerType, build_layer, layer_spec, register_layer, replace_module
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique

MODES = ("ratio", "energy")


class LowRankConv2d(nn.Module):
    """A convolution factorised as ``second(first(x))``: ``k x k`` to ``r`` channels, then ``1 x 1``."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        """The two factors in sequence."""
        return self.second(self.first(x))


class LowRankLinear(nn.Module):
    """A linear layer factorised as ``second(first(x))`` through ``r`` features."""

    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        """The two factors in sequence."""
        return self.second(self.first(x))


LowRank = LowRankConv2d | LowRankLinear


def _container_spec(m: nn.Module) -> dict[str, Any]:
    if not isinstance(m, LowRankConv2d | LowRankLinear):
        raise TypeError(f"expected a LowRankConv2d or LowRankLinear, got {type(m).__name__}")
    # Children may have become CConv2d/CLinear (with masks, representations) in later stages:
    # embedding their own specs rebuilds them as they are.
    return {"first": layer_spec(m.first), "second": layer_spec(m.second)}


def _container_build(cls: type[LowRankConv2d] | type[LowRankLinear]) -> Any:
    def build(args: dict[str, Any]) -> nn.Module:
        return cls(build_layer(args["first"]), build_layer(args["second"]))  # type: ignore[arg-type]

    return build


for _lt in (
    LayerType("LowRankConv2d", LowRankConv2d, _container_spec, _container_build(LowRankConv2d), children=("first", "second")),
    LayerType("LowRankLinear", LowRankLinear, _container_spec, _container_build(LowRankLinear), children=("first", "second")),
):
    register_layer(_lt)


# ------------------------------------------------------------------------------------ factors


def weight_matrix(layer: nn.Conv2d | nn.Linear) -> Tensor:
    """The layer's weight as an ``(out, in * k * k)`` fp32 matrix."""
    w = layer.weight.detach().float()
    return w.reshape(w.shape[0], -1)


def singular_values(layer: nn.Conv2d | nn.Linear) -> Tensor:
    """Singular values of :func:`weight_matrix`, descending."""
    return torch.linalg.svdvals(weight_matrix(layer).cpu().double()).float()


def rank_for(s: Tensor, mode: str, rank_ratio: float, energy: float) -> int:
    """The rank chosen for singular values ``s`` (descending) by ``mode``; at least 1."""
    full = s.numel()
    if mode == "ratio":
        # The small tolerance keeps e.g. 0.3 * 10 from rounding up to 4.
        return max(1, min(full, math.ceil(rank_ratio * full - 1e-9)))
    e = s.double().pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return max(1, min(full, int((cum < energy - 1e-12).sum()) + 1))


def shrinks(layer: nn.Conv2d | nn.Linear, rank: int) -> bool:
    """Whether rank-``rank`` factors hold fewer weights than the layer itself."""
    out, cols = weight_matrix(layer).shape
    return rank * (cols + out) < out * cols


def factorizable(layer: nn.Module) -> bool:
    """Plain ``nn.Conv2d`` (``groups == 1``, zero padding) or ``nn.Linear``; compressed twins and
    layers already inside a factorisation are not."""
    if type(layer) is nn.Linear:
        return True
    return type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros"


@torch.no_grad()
def factorize(layer: nn.Conv2d | nn.Linear, rank: int) -> LowRank:
    """Rank-``rank`` SVD factors of ``layer`` in a container (same device, dtype and mode)."""
    mat = weight_matrix(layer)
    out, cols = mat.shape
    check(1 <= rank <= min(out, cols), f"lowrank rank must be in 1..{min(out, cols)}, got {rank}")
    u, s, vh = torch.linalg.svd(mat.cpu().double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).float()  # (r, in*k*k)
    b = (u[:, :rank] * root[None, :]).float()  # (out, r)
    bias = layer.bias is not None
    second: nn.Conv2d | nn.Linear
    if isinstance(layer, nn.Conv2d):
        # nn.Conv2d stores kernel_size/stride/dilation as 2-tuples and padding as a 2-tuple or a
        # string, while its stubs say tuple[int, ...]: the casts restate what it guarantees.
        conv1 = nn.Conv2d(
            layer.in_channels, rank, cast(tuple[int, int], layer.kernel_size),
            stride=cast(tuple[int, int], layer.stride),
            padding=cast("str | tuple[int, int]", layer.padding),
            dilation=cast(tuple[int, int], layer.dilation), bias=False,
        )
        conv2 = nn.Conv2d(rank, out, 1, bias=bias)
        conv1.weight.copy_(a.reshape(rank, *layer.weight.shape[1:]))
        conv2.weight.copy_(b.reshape(out, rank, 1, 1))
        container: LowRank = LowRankConv2d(conv1, conv2)
        second = conv2
    else:
        lin1, lin2 = nn.Linear(cols, rank, bias=False), nn.Linear(rank, out, bias=bias)
        lin1.weight.copy_(a)
        lin2.weight.copy_(b)
        container = LowRankLinear(lin1, lin2)
        second = lin2
    if layer.bias is not None:
        # second was built with a bias exactly when the layer has one
        cast(Tensor, second.bias).copy_(layer.bias)
    w = layer.weight
    return container.to(device=w.device, dtype=w.dtype).train(layer.training)


# ------------------------------------------------------------------------------------ technique


@dataclass(frozen=True)
class LowRankConfig(TechniqueConfig):
    """Low-rank factorisation by truncated SVD.

    Attributes:
        mode: ``"ratio"`` (rank = ``ceil(rank_ratio * min(out, in*k*k))``) or ``"energy"``
            (smallest rank keeping ``energy`` of the sum of squared singular values).
        rank_ratio: Kept share of the full rank, in (0, 1] (``mode="ratio"``).
        energy: Kept share of the spectral energy, in (0, 1] (``mode="energy"``).
    """

    mode: str = "ratio"
    rank_ratio: float = 0.5
    energy: float = 0.95

    def validate(self) -> None:
        """Check names and ranges."""
        check(self.mode in MODES, f"lowrank.mode must be one of {MODES}, got {self.mode!r}")
        check(
            isinstance(self.rank_ratio, int | float) and not isinstance(self.rank_ratio, bool)
            and 0.0 < self.rank_ratio <= 1.0,
            f"lowrank.rank_ratio must be a number in (0, 1], got {self.rank_ratio!r}",
        )
        check(
            isinstance(self.energy, int | float) and not isinstance(self.energy, bool)
            and 0.0 < self.energy <= 1.0,
            f"lowrank.energy must be a number in (0, 1], got {self.energy!r}",
        )


def _inside_container(model: nn.Module, path: str) -> bool:
    parent = path.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), LowRankConv2d | LowRankLinear)


@register_technique
class LowRankSVD(Technique[LowRankConfig, None]):
    """Truncated-SVD factorisation of the eligible conv and linear layers."""

    name = "lowrank"
    stage = "structure"
    family = "lowrank"
    config_cls = LowRankConfig
    stronger = MappingProxyType({"rank_ratio": -1, "energy": -1})  # a lower rank compresses more
    combinable = True
    order = 1  # after structured pruning: factorise the layers that remain

    def suggest(self, trial: optuna.Trial, prefix: str) -> LowRankConfig:
        """mode; then rank_ratio in [0.05, 0.9] or energy in [0.8, 0.999]."""
        mode = trial.suggest_categorical(f"{prefix}.mode", list(MODES))
        if mode == "ratio":
            return LowRankConfig(mode=mode, rank_ratio=trial.suggest_float(f"{prefix}.rank_ratio", 0.05, 0.9))
        return LowRankConfig(mode=mode, energy=trial.suggest_float(f"{prefix}.energy", 0.8, 0.999))

    def per_layer(self, config: LowRankConfig) -> tuple[str, ...]:
        """A layer may keep its own share of the rank (or of the energy)."""
        return ("rank_ratio",) if config.mode == "ratio" else ("energy",)

    def apply(self, model: nn.Module, config: LowRankConfig, ctx: ApplyContext) -> None:
        """Replace each eligible layer that would shrink by its factors (at its own rank share
        where the step overrides it per layer)."""
        for path, layer in ctx.policy.eligible(model):
            if not factorizable(layer) or _inside_container(model, path):
                continue
            c = ctx.config_at(config, path)
            rank = rank_for(singular_values(layer), c.mode, c.rank_ratio, c.energy)
            if shrinks(layer, rank):
                replace_module(model, path, factorize(layer, rank))

    def settings(self) -> list[LowRankConfig]:
        """Rank ratios 0.75, 0.5, 0.25, 0.1."""
        return [LowRankConfig(rank_ratio=r) for r in (0.75, 0.5, 0.25, 0.1)]

    def moderate(self) -> LowRankConfig:
        """Half the rank of every eligible layer."""
        return LowRankConfig(rank_ratio=0.5)
