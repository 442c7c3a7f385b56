"""Baseline training and caching.

A preset's baseline is trained once per (preset, dataset, seed, budget, code version) and stored
as safetensors plus a JSON record of its validation and test accuracy: never a pickled module.
Concurrent workers serialise on a file lock: the first trains, the others wait and load.

Run ``python -m models.baseline --preset digits`` to train (or load) one and print its record.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.datasets import Splits, load_dataset
from models.errors import UserError, check_folder, cli_main
from models.presets import Preset, get_preset, list_presets
from models.registry import create_model
from models.train import default_device, evaluate_split, resolve_device, train

FORMAT_VERSION = 1


def code_version() -> str:
    """The installed pareto-compress version (part of every cache key)."""
    try:
        return metadata.version("pareto-compress")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class BaselineRecord:
    """What is known about a cached baseline."""

    key: str
    preset: str
    model: str
    dataset: str
    seed: int
    val_accuracy: float
    test_accuracy: float
    curve: list[float]
    train_seconds: float
    num_parameters: int
    code_version: str
    train_config: dict[str, Any]
    num_classes: int
    in_channels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"format": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BaselineRecord:
        """Inverse of :meth:`to_dict`."""
        d = {k: v for k, v in d.items() if k != "format"}
        return cls(**d)


def baseline_key(preset: Preset, data: Splits, seed: int) -> str:
    """Hash of everything that determines the baseline's weights."""
    ident = {
        "format": FORMAT_VERSION,
        "model": preset.model,
        "dataset": data.name,
        "val_fraction": preset.val_fraction,
        "n": [len(data.x_train), len(data.x_val), len(data.x_test)],
        "seed": seed,
        "train": preset.baseline.to_dict(),
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created, with its folder, if absent) while inside:
    the first process does the work (train a baseline, measure a profile, create tables), the
    others wait and then read what it wrote."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def save_state(model: nn.Module, path: Path, metadata_: dict[str, str] | None = None) -> None:
    """Write ``model``'s state dict as safetensors (atomically: temp file, then rename)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata_)
    tmp.replace(path)


def load_state(model: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``model``, refusing missing, extra or reshaped tensors."""
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read weights {path}: {exc}; delete it to retrain") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise UserError(
            f"weights {path} do not fit {type(model).__name__}: missing {missing[:3]}, unexpected {extra[:3]}; "
            "delete the file to retrain"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise UserError(
                f"weights {path}: {name} has shape {tuple(state[name].shape)}, the model expects "
                f"{tuple(tensor.shape)}; delete the file to retrain"
            )
    model.load_state_dict(state)
    return model


def load_or_train_baseline(
    preset: Preset,
    data: Splits,
    *,
    seed: int = 0,
    store: str | Path = "runs",
    device: torch.device | None = None,
    retrain: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, BaselineRecord]:
    """The trained baseline of ``preset`` on ``data``: loaded from ``store`` or trained and saved.

    Returns the model (on ``device``, eval mode) and its record (val and test accuracy).
    """
    device = device or default_device()
    key = baseline_key(preset, data, seed)
    folder = Path(store) / "baselines" / f"{preset.name}-{key}"
    weights, meta = folder / "model.safetensors", folder / "baseline.json"
    model = create_model(preset.model, num_classes=data.spec.num_classes, in_channels=data.spec.channels)
    with file_lock(folder.with_suffix(".lock")):
        if weights.exists() and meta.exists() and not retrain:
            record = BaselineRecord.from_dict(json.loads(meta.read_text()))
            load_state(model, weights)
            if log:
                log(f"baseline {preset.name} loaded from {folder} (val {record.val_accuracy:.4f}, test {record.test_accuracy:.4f})")
            return model.to(device).eval(), record
        if log:
            log(f"training baseline {preset.name} ({preset.model} on {data.name}, {preset.baseline.epochs} epochs, {device})")
        torch.manual_seed(seed)
        model = create_model(preset.model, num_classes=data.spec.num_classes, in_channels=data.spec.channels)
        start = time.perf_counter()
        result = train(model, data, preset.baseline.replace(seed=seed), device=device, log=log)
        record = BaselineRecord(
            key=key,
            preset=preset.name,
            model=preset.model,
            dataset=data.name,
            seed=seed,
            val_accuracy=result.val_accuracy,
            test_accuracy=evaluate_split(model, data, "test", device),
            curve=result.curve,
            train_seconds=time.perf_counter() - start,
            num_parameters=sum(p.numel() for p in model.parameters()),
            code_version=code_version(),
            train_config=preset.baseline.replace(seed=seed).to_dict(),
            num_classes=data.spec.num_classes,
            in_channels=data.spec.channels,
        )
        folder.mkdir(parents=True, exist_ok=True)
        save_state(model, weights, {"preset": preset.name, "key": key})
        meta.write_text(json.dumps(record.to_dict(), indent=2))
        return model.eval(), record


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m models.baseline``."""
    p = argparse.ArgumentParser(prog="python -m models.baseline", description="Train (or load the cached) baseline of a preset.")
    p.add_argument("--preset", default="digits", help=f"one of: {', '.join(list_presets())} (default: digits)")
    p.add_argument("--dataset", default=None, help="override the preset's dataset (e.g. mnist-t10k, npz:PATH)")
    p.add_argument("--data-dir", default="data", help="where datasets live or are downloaded to (default: data)")
    p.add_argument("--store", default="runs", help="artifact store root (default: runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--retrain", action="store_true", help="ignore the cache and train again")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m models.baseline``."""
    args = build_parser().parse_args(argv)
    preset = get_preset(args.preset)
    device = resolve_device(args.device)  # before loading data: a bad --device fails at once
    check_folder(args.store, "--store")  # a file or an unwritable place fails before training
    data = load_dataset(args.dataset or preset.dataset, args.data_dir, val_fraction=preset.val_fraction, seed=args.seed)
    print(data.summary())
    _, record = load_or_train_baseline(
        preset, data, seed=args.seed, store=args.store,
        device=device, retrain=args.retrain, log=print,
    )
    print(json.dumps({k: v for k, v in record.to_dict().items() if k != "curve"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
