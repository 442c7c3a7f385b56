"""Layer policy: which layers a plan may touch, and how protected layers are treated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from models.errors import UserError

PROTECTED_BITS = 8  # the classic recipe: first and last layer stay at >= 8 bits


@dataclass(frozen=True)
class LayerPolicy:
    """Per-plan layer eligibility.

    Attributes:
        keep_first: The first conv/linear layer is never pruned or factorised, and its weights
            keep at least ``PROTECTED_BITS`` bits (int8 where the plan uses fewer).
        keep_last: The same for the last layer (the classifier).
        min_weights: Layers with fewer weights are left alone by every technique but the
            weight representation (too small to be worth compressing).
        max_share: An end layer holding more than this share of all conv/linear weights is not
            protected: protection is for small, sensitive ends (a CNN's stem, a classifier), not
            for LeNet-300's first layer, which holds 88% of the model.
    """

    keep_first: bool = True
    keep_last: bool = True
    min_weights: int = 0
    max_share: float = 0.2

    def __post_init__(self) -> None:
        if self.min_weights < 0:
            raise UserError(f"policy.min_weights must be >= 0, got {self.min_weights}")
        if not 0.0 <= self.max_share <= 1.0:
            raise UserError(f"policy.max_share must be in [0, 1], got {self.max_share}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerPolicy:
        """Inverse of :meth:`to_dict`."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown policy keys {sorted(unknown)}")
        return cls(**d)

    def protected_paths(self, model: nn.Module) -> set[str]:
        """Paths of the first and/or last conv/linear layer, as the policy protects them."""
        layers = _layers(model)
        if not layers:
            return set()
        total = sum(m.weight.numel() for _, m in layers)
        ends = ([layers[0]] if self.keep_first else []) + ([layers[-1]] if self.keep_last else [])
        return {p for p, m in ends if m.weight.numel() <= self.max_share * total}

    def eligible(self, model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
        """Conv/linear layers that structure and sparsity techniques may change."""
        protected = self.protected_paths(model)
        return [
            (p, m) for p, m in _layers(model) if p not in protected and m.weight.numel() >= self.min_weights
        ]


def _layers(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    # Low-rank factors count as one layer at their container's position: the first factor stands
    # in for the container as the "first layer", which is what protection means.
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
