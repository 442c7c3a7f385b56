"""DataSpec: what a model expects as input and what a dataset provides."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DataSpec:
    """Shape and normalisation of a model's input.

    Attributes:
        channels: Input channels (1 for grey images, 3 for RGB).
        size: Height and width of the (square) input image in pixels.
        num_classes: Number of output classes.
        mean: Per-channel mean of the 0..1-scaled pixels, used for normalisation.
        std: Per-channel standard deviation of the 0..1-scaled pixels.
        augment: Whether training uses random crop (reflect pad 4) and horizontal flip
            (natural images such as CIFAR); digits and MNIST are not flipped.
    """

    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False

    def __post_init__(self) -> None:
        if self.channels < 1 or self.size < 1 or self.num_classes < 2:
            raise ValueError(f"invalid DataSpec {self!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"DataSpec mean/std must have {self.channels} entries, got {self!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            channels=int(d["channels"]),
            size=int(d["size"]),
            num_classes=int(d["num_classes"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            augment=bool(d.get("augment", False)),
        )
