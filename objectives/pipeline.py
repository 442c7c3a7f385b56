"""Plan -> compressed, fine-tuned model: the one path that trials and ``search.apply`` share.

Both run :func:`prepare` then :func:`finish` with the same seed, so a plan applied again with the
study's budget gives byte-identical artifacts (and therefore exactly the recorded ratio).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
from objectives.sensitivity import SensitivityProfile, load_or_measure_profile
from objectives.size import measure
from spaces.plan import AppliedPlan, Plan, apply_plan
from spaces.policy import LayerPolicy
from spaces.registry import ApplyContext


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
    store: str | None = None  # the store the baseline is cached in (None: profiles stay in memory)
    profiles: dict[tuple[LayerPolicy, tuple[str, ...]], SensitivityProfile] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Every trial slices the resident copy: a workbench built from host data moves it once,
        # here, rather than once per loader.
        self.data = self.data.to(self.device)

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
        """Load the data and the baseline (training and caching it on first use).

        The splits are moved to ``device`` once, here: every trial's loaders, calibration,
        BatchNorm recalibration and evaluation use that resident copy. The baseline (the
        distillation teacher) lives on ``device`` too.
        """
        p = get_preset(preset)
        device = device or default_device()
        host = load_dataset(dataset or p.dataset, data_dir, val_fraction=p.val_fraction, seed=seed)
        data = host.to(device)
        del host  # on a GPU the host copy is no longer needed
        model, record = load_or_train_baseline(p, data, seed=seed, store=store, device=device, log=log)
        # The baseline's artifact records the input spec too: ratios compare like with like.
        return cls(p, data, model, record, measure(model, data.spec).bytes, device, seed, str(store))

    def sensitivity(self, policy: LayerPolicy, techniques: Sequence[str],
                    log: Callable[[str], None] | None = None) -> SensitivityProfile:
        """The baseline's sensitivity profile for ``techniques`` on ``policy``'s eligible layers
        (:mod:`objectives.sensitivity`): computed on first use only, read from or written to the
        baseline's folder in the store, and kept for the worker's later trials."""
        key = (policy, tuple(techniques))
        if key not in self.profiles:
            # The baseline's folder, as models.baseline names it.
            folder = Path(self.store) / "baselines" / f"{self.record.preset}-{self.record.key}" if self.store else None
            self.profiles[key] = load_or_measure_profile(
                self.baseline, self.data, baseline_key=self.record.key, folder=folder, policy=policy,
                techniques=techniques, device=self.device, calibration=calibration(self.data, self.device), log=log,
            )
        return self.profiles[key]

    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of one input image batch of size 1."""
        s = self.data.spec
        return (1, s.channels, s.size, s.size)


def calibration(data: Splits, device: torch.device, batches: int = 4, batch_size: int = 256) -> Callable[[], Iterator[torch.Tensor]]:
    """A callable yielding a few normalised training batches (fixed order) for calibration.

    The loader slices ``data`` in place when it is resident on ``device`` (``Splits.to``).
    """
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

    applied: AppliedPlan
    predicted_bytes: int
    seed: int
    seconds: float

    @property
    def plan(self) -> Plan:
        """The plan that was applied."""
        return self.applied.plan

    @property
    def model(self) -> nn.Module:
        """The compressed model (fine-tuned in place by :func:`finish`)."""
        return self.applied.model


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
    applied = apply_plan(model, plan, ctx)
    if plan.steps:
        recalibrate_batchnorm(model, bench.data)
    probe = applied.copy()  # the model and its techniques' states, copied together
    probe.finalize()
    predicted = measure(probe.model, bench.data.spec).bytes
    return Prepared(applied, predicted, seed, time.perf_counter() - start)


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
    # The baseline is the distillation teacher; it is resident on the device since Workbench.load.
    teacher = bench.baseline if config.distill_weight > 0 else None
    result = train(
        model, bench.data, config, device=bench.device, hooks=[*prepared.applied.hooks, *extra_hooks], log=log,
        teacher=teacher,
    )
    prepared.applied.finalize()
    if plan.steps:
        # Snapping weights onto their final representation shifts activations a little.
        recalibrate_batchnorm(model, bench.data)
    size = measure(model, bench.data.spec)  # the artifact records how to feed the model
    return Outcome(
        plan=plan,
        model=model,
        artifact=size.artifact,
        val_accuracy=evaluate_split(model, bench.data, "val", bench.device),
        bytes=size.bytes,
        ratio=size.ratio(bench.baseline_bytes),
        breakdown=size.breakdown,
        curve=result.curve,
        epochs=len(result.history),
        stopped=result.stopped_early,
        seconds=prepared.seconds + time.perf_counter() - start,
    )
