"""Unstructured magnitude pruning (Han et al. 2015; gradual schedule of Zhu & Gupta 2017).

The smallest-magnitude weights of the eligible layers (the layer policy protects the first and
last layer) are masked out, either with one threshold over all eligible layers (``scope="global"``)
or with the same sparsity in each layer (``scope="layer"``). A mask is a bool buffer of the
compressed layer: it multiplies the effective weight in every forward pass (so pruned weights get
no gradient), whatever weight representation a later step of the plan gives the layer, and the
codec stores only the kept values plus their positions.

``schedule="oneshot"`` prunes at ``apply``; ``"gradual"`` installs all-ones masks at ``apply`` and
raises the sparsity along the cubic schedule ``s_t = s_f * (1 - (1 - t / T_end)^3)`` during the
fine-tune, reaching ``s_f`` after :data:`END_FRACTION` of the steps so the rest of the fine-tune
recovers. ``finalize`` makes sure the final sparsity is reached exactly in both cases. A gradual
``apply`` tells later steps when its masks are final (``ApplyContext.masks_final_step``, see
:func:`masks_final_step`): a codebook waits for them to fit only the surviving weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import optuna
import torch
from torch import Tensor, nn

from models.train import TrainHook
from spaces.layers import CConv2d, CLinear, compress_layer, replace_module
from spaces.registry import ApplyContext, Technique, TechniqueConfig, check, register_technique

SCOPES = ("global", "layer")
SCHEDULES = ("oneshot", "gradual")
MAX_SPARSITY = 0.99
END_FRACTION = 0.75  # the gradual schedule reaches the final sparsity after this share of the steps
UPDATES = 20  # mask updates of the gradual schedule (Zhu & Gupta prune every few steps, not each)

Masked = CConv2d | CLinear


@dataclass(frozen=True)
class PruneConfig(TechniqueConfig):
    """Unstructured magnitude pruning.

    Attributes:
        sparsity: Fraction of the eligible layers' weights set to zero, in [0, 0.99].
        scope: ``"global"`` (one magnitude threshold over all eligible layers) or ``"layer"``
            (the same sparsity in each eligible layer).
        schedule: ``"oneshot"`` (prune at apply) or ``"gradual"`` (cubic schedule over the
            fine-tune, Zhu & Gupta 2017).
    """

    sparsity: float = 0.5
    scope: str = "global"
    schedule: str = "oneshot"

    def validate(self) -> None:
        """Check ranges and names."""
        check(
            isinstance(self.sparsity, int | float) and not isinstance(self.sparsity, bool)
            and 0.0 <= self.sparsity <= MAX_SPARSITY,
            f"prune.sparsity must be a number in [0, {MAX_SPARSITY}], got {self.sparsity!r}",
        )
        check(self.scope in SCOPES, f"prune.scope must be one of {SCOPES}, got {self.scope!r}")
        check(self.schedule in SCHEDULES, f"prune.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


# ------------------------------------------------------------------------------------ masks


def _prune_lowest(scores: Tensor, k: int) -> Tensor:
    """Bool keep-mask of flat ``scores`` with exactly the ``k`` lowest scores pruned (ties at
    the threshold are broken by position, so the count is exact)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return keep
    if k >= scores.numel():
        return torch.zeros_like(keep)
    threshold = torch.kthvalue(scores, k).values
    keep &= scores > threshold
    below = int((scores < threshold).sum())
    ties = torch.nonzero(scores == threshold).flatten()
    keep[ties[k - below :]] = True  # of the tied scores, prune only as many as k still needs
    return keep


def _scores(layer: nn.Conv2d | nn.Linear) -> Tensor:
    """Magnitudes of the weights the layer computes with (pruned ones are zero)."""
    w = layer.weight.detach().abs().float()
    mask = getattr(layer, "mask", None)
    return w * mask if mask is not None else w


def magnitude_masks(layers: list[nn.Conv2d | nn.Linear], sparsity: float, scope: str) -> list[Tensor]:
    """Keep-masks (bool, shaped like each weight) pruning exactly ``round(sparsity * n)`` of the
    ``n`` weights of ``layers`` together (``"global"``) or of each layer (``"layer"``) by
    magnitude."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not layers:
        return []
    scores = [_scores(m) for m in layers]
    if scope == "layer":
        return [_prune_lowest(s.flatten(), round(sparsity * s.numel())).view_as(s) for s in scores]
    flat = torch.cat([s.flatten() for s in scores])
    keep = _prune_lowest(flat, round(sparsity * flat.numel()))
    return [k.view_as(s) for k, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)]


def masked_layers(model: nn.Module) -> list[Masked]:
    """Compressed layers of ``model`` that carry a mask, in module order."""
    return [m for m in model.modules() if isinstance(m, CConv2d | CLinear) and m.mask is not None]


def sparsity_of(layers: list[Masked]) -> float:
    """Fraction of masked-out weights over ``layers`` (0 for none)."""
    total = sum(m.weight.numel() for m in layers)
    pruned = sum(int((~m.mask).sum()) for m in layers if m.mask is not None)
    return pruned / total if total else 0.0


@torch.no_grad()
def prune_to(layers: list[Masked], sparsity: float, scope: str) -> None:
    """Set each layer's mask so that ``sparsity`` is reached exactly (and zero pruned weights)."""
    for layer, mask in zip(layers, magnitude_masks(list(layers), sparsity, scope), strict=True):
        layer.set_mask(mask)


@torch.no_grad()
def rezero(layers: list[Masked]) -> None:
    """Zero the pruned shadow weights again (momentum and weight decay would revive them)."""
    for m in layers:
        if m.mask is not None:
            m.weight.mul_(m.mask)


def gradual_sparsity(final: float, step: int, end_step: int) -> float:
    """Zhu & Gupta's cubic schedule: ``final * (1 - (1 - step / end_step)^3)``, clamped at
    ``final`` from ``end_step`` on (and for ``end_step <= 0``)."""
    if end_step <= 0 or step >= end_step:
        return final
    t = max(step, 0) / end_step
    return final * (1.0 - (1.0 - t) ** 3)


def schedule_points(total_steps: int) -> tuple[int, int]:
    """``(end_step, interval)`` of the gradual schedule for a fine-tune of ``total_steps``:
    masks are updated every ``interval`` completed steps up to ``end_step``."""
    end = max(1, math.ceil(END_FRACTION * total_steps))
    return end, max(1, end // UPDATES)


def masks_final_step(total_steps: int) -> int:
    """The step count after which the gradual schedule's masks are final (its ``end_step``)."""
    return schedule_points(total_steps)[0]


@dataclass
class PruneState:
    """The layers ``apply`` masked: ``shared`` follow the step's sparsity and scope together;
    each of ``own`` has its own sparsity (a per-layer override), pruned within the layer."""

    shared: list[Masked]
    own: list[tuple[Masked, float]]

    @property
    def layers(self) -> list[Masked]:
        """Every masked layer."""
        return [*self.shared, *(m for m, _ in self.own)]

    def prune(self, config: PruneConfig, fraction: float = 1.0) -> None:
        """Reach ``fraction`` of every layer's target sparsity exactly (the gradual schedule's
        cubic factor is the same for every target)."""
        prune_to(self.shared, config.sparsity * fraction, config.scope)
        for layer, sparsity in self.own:
            prune_to([layer], sparsity * fraction, "layer")


class PruneHook(TrainHook):
    """Keeps pruned weights at zero after every step and, for the gradual schedule, raises the
    sparsity of the masked layers along :func:`gradual_sparsity`."""

    def __init__(self, config: PruneConfig, state: PruneState) -> None:
        self.config, self.state = config, state

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Update masks on schedule (gradual), then re-zero pruned weights."""
        if self.config.schedule == "gradual":
            done = step + 1
            end, interval = schedule_points(total_steps)
            if done <= end and (done % interval == 0 or done == end):
                self.state.prune(self.config, gradual_sparsity(1.0, done, end))
                return  # set_mask already zeroed the pruned weights
        rezero(self.state.layers)


# -------------------------------------------------------------------------------- technique


@register_technique
class Prune(Technique[PruneConfig, PruneState]):
    """Unstructured magnitude pruning with masks enforced during the fine-tune."""

    name = "prune"
    stage = "sparsity"
    family = "prune"
    config_cls = PruneConfig
    stronger = MappingProxyType({"sparsity": +1})  # more sparsity compresses more

    def suggest(self, trial: optuna.Trial, prefix: str) -> PruneConfig:
        """sparsity in [0.2, 0.98], scope and schedule categorical."""
        return PruneConfig(
            sparsity=trial.suggest_float(f"{prefix}.sparsity", 0.2, 0.98),
            scope=trial.suggest_categorical(f"{prefix}.scope", list(SCOPES)),
            schedule=trial.suggest_categorical(f"{prefix}.schedule", list(SCHEDULES)),
        )

    def per_layer(self, config: PruneConfig) -> tuple[str, ...]:
        """A layer may have its own sparsity (Deep Compression kept 8% of LeNet-300's fc1 but
        9% and 26% of the others)."""
        return ("sparsity",)

    def apply(self, model: nn.Module, config: PruneConfig, ctx: ApplyContext) -> PruneState:
        """Mask the eligible layers: at the final sparsity (oneshot) or all-ones (gradual, which
        sets ``ctx.masks_final_step`` for the steps after it). A layer with a per-layer
        sparsity is pruned to it within the layer; the others share the step's scope."""
        state = PruneState([], [])
        for path, layer in ctx.policy.eligible(model):
            c = compress_layer(layer)
            if c is not layer:
                replace_module(model, path, c)
            if path in ctx.layers:
                state.own.append((c, ctx.config_at(config, path).sparsity))
            else:
                state.shared.append(c)
        state.prune(config, 1.0 if config.schedule == "oneshot" else 0.0)
        if config.schedule == "gradual":
            ctx.masks_final_step = masks_final_step
        return state

    def hooks(self, model: nn.Module, config: PruneConfig, state: PruneState) -> list[TrainHook]:
        """One :class:`PruneHook`."""
        return [PruneHook(config, state)]

    def finalize(self, model: nn.Module, config: PruneConfig, state: PruneState) -> None:
        """Reach the final sparsity exactly (a gradual fine-tune may have been cut short)."""
        if config.schedule == "gradual":
            state.prune(config)
        else:
            rezero(state.layers)

    def settings(self) -> list[PruneConfig]:
        """Global one-shot at 0.3, 0.5, 0.7, 0.9, 0.95."""
        return [PruneConfig(sparsity=s) for s in (0.3, 0.5, 0.7, 0.9, 0.95)]

    def moderate(self) -> PruneConfig:
        """Global one-shot at 0.7."""
        return PruneConfig(sparsity=0.7)
