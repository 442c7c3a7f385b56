"""Plan -> compressed, fine-tuned model: the one path that trials and ``search.apply`` share.

Both run :func:`prepare` then :func:`finish` with the same seed, so a plan applied again with the
study's budget gives byte-identical artifacts (and therefore exactly the recorded ratio).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from models.baseline import BaselineRecord, load_or_train_baseline
from models.datasets import Splits, load_dataset
from models.loader import DeviceLoader
from models.presets import Preset, get_preset
from models.train import (
    TrainConfig,
    TrainHook,
    default_device,
    evaluate_split,
    recalibrate_batchnorm,
    train,
)
from spaces.plan import Plan, apply_plan, finalize_plan
from spaces.registry import ApplyContext
from storage.codec import encode, encode_with_report


@dataclass
class Workbench:
    """What every trial of a worker shares: preset, data, the cached baseline and its size."""

    preset: Preset
    data: Splits
    baseline: nn.Module
    record: BaselineRecord
    baseline_bytes: int
    device: torch.device
    seed: int = 0

    @classmethod
    def load(
        cls,
        preset: str,
        *,
        dataset: str | None = None,
        data_dir: str = "data",
        store: str = "runs",
        seed: int = 0,
        device: torch.device | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Workbench:
        """Load the data and the baseline (training and caching it on first use)."""
        p = get_preset(preset)
        device = device or default_device()
        data = load_dataset(dataset or p.dataset, data_dir, val_fraction=p.val_fraction, seed=seed)
        model, record = load_or_train_baseline(p, data, seed=seed, store=store, device=device, log=log)
        return cls(p, data, model, record, len(encode(model)), device, seed)

    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of one input image batch of size 1."""
        s = self.data.spec
        return (1, s.channels, s.size, s.size)


def calibration(data: Splits, device: torch.device, batches: int = 4, batch_size: int = 256) -> Callable[[], Iterator[torch.Tensor]]:
    """A callable yielding a few normalised training batches (fixed order) for calibration."""
    loader = DeviceLoader(data.x_train, data.y_train, data.spec, batch_size, train=False, device=device)

    def batches_() -> Iterator[torch.Tensor]:
        for i, (xb, _) in enumerate(loader):
            if i >= batches:
                return
            yield xb

    return batches_


@dataclass
class Prepared:
    """A compressed, not yet fine-tuned model and what is known before training."""

    plan: Plan
    model: nn.Module
    hooks: list[TrainHook]
    predicted_bytes: int
    seed: int
    seconds: float


@dataclass
class Outcome:
    """A finished plan: the final model, its measured size and accuracy."""

    plan: Plan
    model: nn.Module
    artifact: bytes
    val_accuracy: float
    bytes: int
    ratio: float
    breakdown: dict[str, int]
    curve: list[float] = field(default_factory=list)
    epochs: int = 0
    stopped: bool = False
    seconds: float = 0.0


def prepare(bench: Workbench, plan: Plan, seed: int) -> Prepared:
    """Apply ``plan`` to a copy of the baseline; predict its final size (finalize on a copy)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = copy.deepcopy(bench.baseline).to(bench.device)
    ctx = ApplyContext(policy=plan.policy, calibration=calibration(bench.data, bench.device))
    hooks = apply_plan(model, plan, ctx)
    if plan.steps:
        recalibrate_batchnorm(model, bench.data)
    probe = copy.deepcopy(model)
    finalize_plan(probe, plan)
    predicted = len(encode(probe))
    return Prepared(plan, model, hooks, predicted, seed, time.perf_counter() - start)


def finetune_config(bench: Workbench, plan: Plan, seed: int, epochs: int | None = None) -> TrainConfig:
    """The preset's fine-tune budget with the plan's overrides (and ``epochs`` if given)."""
    overrides = dict(plan.finetune)
    if epochs is not None:
        overrides["epochs"] = epochs
    return bench.preset.finetune.replace(**overrides, seed=seed)


def finish(
    bench: Workbench,
    prepared: Prepared,
    *,
    epochs: int | None = None,
    extra_hooks: Sequence[TrainHook] = (),
    log: Callable[[str], None] | None = None,
) -> Outcome:
    """Fine-tune, finalize, recalibrate BatchNorm, encode and measure."""
    start = time.perf_counter()
    model, plan = prepared.model, prepared.plan
    config = finetune_config(bench, plan, prepared.seed, epochs)
    result = train(model, bench.data, config, device=bench.device, hooks=[*prepared.hooks, *extra_hooks], log=log)
    finalize_plan(model, plan)
    if plan.steps:
        # Snapping weights onto their final representation shifts activations a little.
        recalibrate_batchnorm(model, bench.data)
    artifact, breakdown = encode_with_report(model)
    return Outcome(
        plan=plan,
        model=model,
        artifact=artifact,
        val_accuracy=evaluate_split(model, bench.data, "val", bench.device),
        bytes=len(artifact),
        ratio=bench.baseline_bytes / len(artifact),
        breakdown=breakdown,
        curve=result.curve,
        epochs=len(result.history),
        stopped=result.stopped_early,
        seconds=prepared.seconds + time.perf_counter() - start,
    )
