"""The one training and evaluation loop.

The baseline and every fine-tune of every trial run through :func:`train`. Techniques never
contain a loop: they plug in through :class:`TrainHook` (an extra loss term such as soft
weight-sharing's prior, extra parameter groups with their own learning rates, a step hook that
re-applies pruning masks, an epoch hook that stops a trial early).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from models.datasets import Splits
from models.errors import UserError
from models.loader import DeviceLoader

CONFIG_VERSION = 1
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """Budget and recipe of one training run (a baseline or a fine-tune).

    Attributes:
        epochs: Passes over the training split (0 trains nothing and only evaluates).
        batch_size: Images per step.
        lr: Peak learning rate.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        momentum: SGD momentum; AdamW's beta1 (its beta2 is fixed at 0.999).
        weight_decay: Decoupled for AdamW, L2 for SGD; never applied to biases and norms.
        schedule: ``"cosine"`` (with ``warmup`` linear warm-up), ``"onecycle"`` (linear up over
            ``warmup`` of the steps, then linear down to 0) or ``"constant"``.
        warmup: Fraction of the steps spent warming up.
        label_smoothing: Cross-entropy label smoothing.
        seed: Seeds the model's dropout, the shuffling and the augmentation.
        distill_weight: Weight ``w`` in [0, 1] of knowledge distillation from a teacher (the
            uncompressed baseline in a trial): the loss is ``(1 - w) * CE + w * T^2 *
            KL(softmax(teacher / T) || softmax(student / T))``. 0 (the default) trains on the
            labels alone and needs no teacher.
        distill_temperature: Softmax temperature ``T`` > 0 of the distillation term.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.0
    label_smoothing: float = 0.0
    seed: int = 0
    distill_weight: float = 0.0
    distill_temperature: float = 4.0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise UserError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise UserError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UserError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.distill_temperature > 0:
            raise UserError(f"distill_temperature must be > 0, got {self.distill_temperature}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, with a version.

        The distillation fields appear only when they differ from their defaults: a config that
        does not distil serialises exactly as before they existed, so baseline cache keys and
        recorded presets stay the same (and :meth:`from_dict` fills them in when absent).
        """
        d = asdict(self)
        for name in _OPTIONAL_AT_DEFAULT:
            if d[name] == TrainConfig.__dataclass_fields__[name].default:
                del d[name]
        return {"version": CONFIG_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        d = dict(d)
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise UserError(f"TrainConfig version {version} is not supported (expected {CONFIG_VERSION})")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown TrainConfig keys {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied."""
        return TrainConfig(**{**asdict(self), **changes})


_OPTIONAL_AT_DEFAULT = ("distill_weight", "distill_temperature")


@dataclass(frozen=True)
class EpochRecord:
    """Measurements after one epoch."""

    epoch: int
    train_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class TrainResult:
    """What a training run did: the per-epoch curve and whether a hook stopped it."""

    history: list[EpochRecord] = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    images: int = 0

    @property
    def val_accuracy(self) -> float:
        """Validation accuracy after the last epoch run (NaN when none ran)."""
        return self.history[-1].val_accuracy if self.history else math.nan

    @property
    def curve(self) -> list[float]:
        """Validation accuracy after each epoch."""
        return [r.val_accuracy for r in self.history]


class TrainHook:
    """Extension points of :func:`train`. Subclass and override what you need; all are no-ops."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Extra optimizer parameter groups (e.g. a prior's parameters with their own lr)."""
        return []

    def loss(self, model: nn.Module, step: int, total_steps: int) -> torch.Tensor | None:
        """An extra term added to the cross-entropy loss of every step."""
        return None

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called after every optimizer step (e.g. to re-apply pruning masks)."""

    def on_epoch_end(self, model: nn.Module, record: EpochRecord) -> bool:
        """Called after each epoch's validation; return True to stop training."""
        return False


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...) as a device that exists here.

    ``None`` or ``""`` gives :func:`default_device`. An unknown device type, CUDA without CUDA or
    a CUDA index beyond the visible devices is a :class:`UserError` naming the value.
    """
    if name is None or name == "":
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {str(name)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(name)!r} requested but CUDA is not available here; use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {str(name)!r} does not exist: {count} CUDA device(s) visible")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"device {str(name)!r} requested but MPS is not available here; use cpu")
    elif device.type != "cpu":
        raise UserError(f"device type {device.type!r} is not supported; use cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing on CPU (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = int(config.warmup * total_steps)

    def factor(step: int) -> float:
        if config.schedule == "constant":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total_steps - warm)
        if config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))
        return max(0.0, 1.0 - t)  # onecycle: linear decay after the linear warm-up

    return factor


def _split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def make_optimizer(model: nn.Module, config: TrainConfig, extra: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """The optimizer of :func:`train`: weight decay on weights only, extra groups appended."""
    decay, no_decay = _split_decay(model)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        *extra,
    ]
    groups = [g for g in groups if list(g["params"])]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.momentum, 0.999))


def loaders(
    data: Splits, batch_size: int, device: torch.device, seed: int = 0
) -> tuple[DeviceLoader, DeviceLoader]:
    """Train (shuffled, augmented) and validation loaders of ``data`` on ``device``."""
    cl = device.type == "cuda"
    train_loader = DeviceLoader(
        data.x_train, data.y_train, data.spec, batch_size, train=True, device=device, seed=seed, channels_last=cl
    )
    val_loader = DeviceLoader(
        data.x_val, data.y_val, data.spec, max(batch_size, 512), train=False, device=device, channels_last=cl
    )
    return train_loader, val_loader


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader) -> float:
    """Top-1 accuracy (0..1) of ``model`` over ``loader``; the model is left in eval mode."""
    model.eval()
    correct = total = 0
    with autocast(loader.device):
        for xb, yb in loader:
            correct += int((model(xb).argmax(1) == yb).sum())
            total += len(yb)
    return correct / max(1, total)


def evaluate_split(
    model: nn.Module, data: Splits, split: str = "val", device: torch.device | None = None, batch_size: int = 1024
) -> float:
    """Accuracy of ``model`` on ``data``'s ``"train"``, ``"val"`` or ``"test"`` split.

    Resident splits (``data.to(device)``) are evaluated in place; host splits are copied first.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    device = device or next(model.parameters()).device
    x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
    loader = DeviceLoader(x, y, data.spec, batch_size, train=False, device=device, channels_last=device.type == "cuda")
    return evaluate(model, loader)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: Splits, batches: int = 20, batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics on training batches (after weights change).

    Splits resident on the model's device are sliced in place (no copy).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    device = next(model.parameters()).device
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
    model.train()
    loader = DeviceLoader(data.x_train, data.y_train, data.spec, batch_size, train=True, device=device, seed=1234)
    with autocast(device):
        for i, (xb, _) in enumerate(loader):
            if i >= batches:
                break
            model(xb)
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.eval()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al., 2015). Computed in
    fp32 whatever the logits' dtype (bf16 under autocast).
    """
    t = temperature
    log_p_student = torch.log_softmax(student.float() / t, dim=1)
    log_p_teacher = torch.log_softmax(teacher.float() / t, dim=1)
    kl = nn.functional.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def train(
    model: nn.Module,
    data: Splits,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    hooks: Sequence[TrainHook] = (),
    log: Callable[[str], None] | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` on ``data.train`` per ``config``, validating on ``data.val`` after each epoch.

    The model is moved to ``device`` (default: CUDA if available) and left in eval mode. On CUDA
    the model runs channels-last under bf16 autocast; on CPU in fp32. Splits resident on
    ``device`` (``data.to(device)``) are used in place; host splits are copied there per loader.

    With ``config.distill_weight > 0``, ``teacher`` (required) is run in eval mode without
    gradients on each training batch and the loss mixes cross-entropy with
    :func:`distillation_loss`. The teacher is moved to ``device`` (in place, a no-op when it is
    there already) and its train/eval mode is restored afterwards; its weights are not changed.
    """
    distill = config.distill_weight > 0
    if distill and teacher is None:
        raise UserError(
            f"distill_weight {config.distill_weight} needs a teacher model; pass teacher= or set distill_weight=0"
        )
    device = device or default_device()
    torch.manual_seed(config.seed)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stubs lack memory_format
    teacher_was_training = False
    if distill and teacher is not None:
        teacher.to(device)
        if device.type == "cuda":
            # The student's batches are channels-last. (Torch's stubs lack memory_format.)
            teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        teacher_was_training = teacher.training
        teacher.eval()
    train_loader, val_loader = loaders(data, config.batch_size, device, seed=config.seed)
    total_steps = config.epochs * len(train_loader)
    extra_groups = [g for h in hooks for g in h.param_groups(model)]
    optimizer = make_optimizer(model, config, extra_groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, total_steps))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    result = TrainResult()
    start = time.perf_counter()
    epoch_start, loss_sum, loss_n = start, torch.zeros((), device=device), 0
    step = 0
    model.train()
    for epoch in range(config.epochs):
        for xb, yb in train_loader:
            with autocast(device):
                logits = model(xb)
                loss = criterion(logits, yb)
            if distill:
                loss = _distill(loss, logits, teacher, xb, config)
            for h in hooks:
                extra = h.loss(model, step, total_steps)
                if extra is not None:
                    loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            for h in hooks:
                h.after_step(model, step, total_steps)
            # Accumulate on the device: a .item() per step would synchronise the GPU.
            loss_sum += loss.detach().float()
            loss_n += 1
            result.images += len(yb)
            step += 1
        record = EpochRecord(
            epoch=epoch + 1,
            train_loss=float(loss_sum) / max(1, loss_n),
            val_accuracy=evaluate(model, val_loader),
            seconds=time.perf_counter() - epoch_start,
        )
        result.history.append(record)
        if log is not None:
            log(f"epoch {record.epoch}/{config.epochs} loss {record.train_loss:.4f} val {record.val_accuracy:.4f} ({record.seconds:.1f}s)")
        stop = any([h.on_epoch_end(model, record) for h in hooks])  # every hook sees every epoch
        epoch_start, loss_sum, loss_n = time.perf_counter(), torch.zeros((), device=device), 0
        if stop:
            result.stopped_early = epoch + 1 < config.epochs
            break
        model.train()
    result.seconds = time.perf_counter() - start
    model.eval()
    if teacher is not None and teacher_was_training:
        teacher.train()
    return result


def _distill(
    ce: torch.Tensor, logits: torch.Tensor, teacher: nn.Module | None, xb: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """``(1 - w) * ce + w * distillation_loss``, the teacher run on the student's own batch."""
    assert teacher is not None  # train() refuses distillation without one
    with torch.no_grad(), autocast(xb.device):
        target = teacher(xb)
    if target.shape != logits.shape:
        raise UserError(
            f"teacher outputs {tuple(target.shape)} but the student {tuple(logits.shape)}; "
            "the teacher must have the student's classes"
        )
    w = config.distill_weight
    return (1.0 - w) * ce + w * distillation_loss(logits, target, config.distill_temperature)
