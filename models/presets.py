"""Presets: a model, a dataset and the training budgets that go with them.

The default preset (:data:`DEFAULT_PRESET`, ResNet-18 on CIFAR-10) is meant for a GPU; on a
machine without CUDA whose data folder lacks CIFAR-10, a search started without ``--preset``
runs :data:`FALLBACK_PRESET` (``digits``: offline, minutes on a CPU) instead, and says so
(:func:`default_preset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.errors import DataNotFoundError, UnknownNameError
from models.train import TrainConfig


@dataclass(frozen=True)
class Preset:
    """A named binding of model, dataset and budgets.

    Attributes:
        name: The preset's name (``--preset``).
        model: A registered model name.
        dataset: A dataset name understood by :func:`models.datasets.load_dataset`.
        baseline: Recipe and budget of the baseline's training.
        finetune: Recipe and budget of a trial's fine-tune after compression.
        val_fraction: Share of the training split held out for validation.
        description: One line for ``--help`` listings.
    """

    name: str
    model: str
    dataset: str
    baseline: TrainConfig
    finetune: TrainConfig
    val_fraction: float = 0.1
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (recorded on the study)."""
        return {
            "name": self.name,
            "model": self.model,
            "dataset": self.dataset,
            "baseline": self.baseline.to_dict(),
            "finetune": self.finetune.to_dict(),
            "val_fraction": self.val_fraction,
        }


_CIFAR_BASE = TrainConfig(
    epochs=40, batch_size=512, lr=0.2, optimizer="sgd", weight_decay=5e-4,
    schedule="onecycle", warmup=0.15, label_smoothing=0.1,
)
_CIFAR_FT = TrainConfig(epochs=5, batch_size=512, lr=0.02, weight_decay=5e-4, schedule="cosine", label_smoothing=0.1)
_MNIST_BASE = TrainConfig(epochs=20, batch_size=128, lr=0.05, weight_decay=1e-4, schedule="cosine")
_MNIST_FT = TrainConfig(epochs=3, batch_size=128, lr=0.01, weight_decay=1e-4, schedule="cosine")

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "digits", "digits_cnn", "digits",
            baseline=TrainConfig(epochs=15, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine"),
            finetune=TrainConfig(epochs=4, batch_size=64, lr=0.01, weight_decay=5e-4, schedule="cosine"),
            val_fraction=0.15,
            description="small CNN on scikit-learn's bundled 8x8 digits: offline, minutes on a CPU",
        ),
        Preset("mnist-lenet300", "lenet300", "mnist", _MNIST_BASE, _MNIST_FT, description="LeNet-300-100 on MNIST"),
        Preset("mnist-lenet5", "lenet5", "mnist", _MNIST_BASE, _MNIST_FT, description="LeNet-5-Caffe on MNIST"),
        Preset("cifar10-resnet18", "resnet18", "cifar10", _CIFAR_BASE, _CIFAR_FT, description="ResNet-18 on CIFAR-10 (GPU)"),
        Preset("cifar10-mobilenetv2", "mobilenetv2", "cifar10", _CIFAR_BASE, _CIFAR_FT, description="MobileNetV2 on CIFAR-10 (GPU)"),
        Preset("cifar10-wrn16-4", "wrn16_4", "cifar10", _CIFAR_BASE, _CIFAR_FT, description="WideResNet-16-4 on CIFAR-10 (GPU)"),
        Preset(
            "cifar10-resnet-mini", "resnet_mini", "cifar10",
            baseline=_CIFAR_BASE.replace(epochs=15), finetune=_CIFAR_FT.replace(epochs=2),
            description="small ResNet-10 (width 16) on CIFAR-10: quick runs and benchmarks/gpu.py",
        ),
    )
}
DEFAULT_PRESET = "cifar10-resnet18"
FALLBACK_PRESET = "digits"  # what a search without --preset runs on a CPU machine lacking CIFAR-10


def list_presets() -> list[str]:
    """Names of all presets."""
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset ``name``; an unknown name raises an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownNameError("preset", name, PRESETS) from None


def cuda_available() -> bool:
    """Whether a CUDA device is usable here."""
    return torch.cuda.is_available()


def data_present(dataset: str, data_dir: str | Path) -> bool:
    """Whether ``dataset``'s files are in ``data_dir`` (or where it is otherwise found), without
    downloading anything."""
    from models.datasets import load_dataset  # imported here: presets load without the parsers

    try:
        load_dataset(dataset, data_dir, download=False)
    except DataNotFoundError:
        return False
    return True


def default_preset(data_dir: str | Path = "data", dataset: str | None = None) -> tuple[str, str | None]:
    """The preset a search without ``--preset`` runs, and a one-line note when it is not
    :data:`DEFAULT_PRESET`: with a CUDA device, with the default preset's dataset in
    ``data_dir``, or with a ``dataset`` override (the fallback's model fits its own data only),
    the default; otherwise :data:`FALLBACK_PRESET`, which runs offline on a CPU (the default
    would download CIFAR-10 and train ResNet-18 on the CPU for hours, or fail offline)."""
    if dataset is not None or cuda_available():
        return DEFAULT_PRESET, None
    dataset = PRESETS[DEFAULT_PRESET].dataset
    if data_present(dataset, data_dir):
        return DEFAULT_PRESET, None
    return FALLBACK_PRESET, (
        f"note: no CUDA device and no {dataset} in {data_dir}/: running --preset {FALLBACK_PRESET} instead of the "
        f"default {DEFAULT_PRESET} (pass --preset to choose)"
    )
