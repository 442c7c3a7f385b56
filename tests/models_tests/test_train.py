"""Tests of models.train: the loop learns digits, is seeded, and honours every hook."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
import torch
from torch import nn

from models.datasets import Splits, load_dataset
from models.errors import UserError
from models.presets import get_preset
from models.registry import create_model
from models.train import (
    EpochRecord,
    TrainConfig,
    TrainHook,
    distillation_loss,
    evaluate,
    evaluate_split,
    loaders,
    recalibrate_batchnorm,
    resolve_device,
    train,
)

CPU = torch.device("cpu")
FAST = TrainConfig(epochs=2, batch_size=64, lr=0.05, weight_decay=5e-4, schedule="cosine")


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset("digits", val_fraction=get_preset("digits").val_fraction, seed=0)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("digits_cnn", num_classes=10, in_channels=1)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- learning ------------------------------------------------------------------------------------


def test_digits_preset_reaches_95_percent_test_accuracy(digits: Splits) -> None:
    config = get_preset("digits").baseline
    model = _model()
    result = train(model, digits, config, device=CPU)
    assert len(result.history) == config.epochs and not result.stopped_early
    assert [r.epoch for r in result.history] == list(range(1, config.epochs + 1))
    assert result.images == config.epochs * (len(digits.x_train) // config.batch_size) * config.batch_size
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert all(math.isfinite(r.train_loss) and r.seconds >= 0 for r in result.history)
    assert not model.training  # left in eval mode
    test_acc = evaluate_split(model, digits, "test")
    assert test_acc > 0.95, f"test accuracy {test_acc:.4f}"
    assert result.val_accuracy > 0.9
    assert result.val_accuracy == pytest.approx(evaluate_split(model, digits, "val"))
    assert result.curve == [r.val_accuracy for r in result.history]


def test_evaluate_split_names(digits: Splits) -> None:
    model = _model()
    for split in ("train", "val", "test"):
        assert 0.0 <= evaluate_split(model, digits, split, CPU) <= 1.0
    with pytest.raises(ValueError, match="split"):
        evaluate_split(model, digits, "holdout")


def test_evaluate_counts_correct_predictions(digits: Splits) -> None:
    class Oracle(nn.Module):
        """Predicts class 3 for everything."""

        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Parameter(torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(len(x), 10)
            out[:, 3] = 1.0
            return out + self.p

    _, val_loader = loaders(digits, 64, CPU)
    expected = float((digits.y_val == 3).float().mean())
    assert evaluate(Oracle(), val_loader) == pytest.approx(expected)


def test_seeded_runs_are_identical(digits: Splits) -> None:
    a_model, b_model = _model(1), _model(1)
    a = train(a_model, digits, FAST.replace(seed=3), device=CPU)
    b = train(b_model, digits, FAST.replace(seed=3), device=CPU)
    assert a.curve == b.curve
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    for k, v in a_model.state_dict().items():
        assert torch.equal(v, b_model.state_dict()[k]), k
    c_model = _model(1)
    c = train(c_model, digits, FAST.replace(seed=4), device=CPU)
    assert [r.train_loss for r in a.history] != [r.train_loss for r in c.history]


def test_epochs_zero_trains_nothing(digits: Splits) -> None:
    model = _model()
    before = _weights(model)
    result = train(model, digits, FAST.replace(epochs=0), device=CPU)
    assert result.history == [] and result.images == 0 and not result.stopped_early
    assert math.isnan(result.val_accuracy) and result.curve == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("optimizer", "schedule", "warmup"),
    [("adamw", "onecycle", 0.2), ("sgd", "onecycle", 0.3), ("adamw", "constant", 0.0), ("sgd", "cosine", 0.2)],
)
def test_optimizers_and_schedules_run(digits: Splits, optimizer: str, schedule: str, warmup: float) -> None:
    lr = 2e-3 if optimizer == "adamw" else 0.05
    config = FAST.replace(optimizer=optimizer, schedule=schedule, warmup=warmup, lr=lr, label_smoothing=0.1)
    result = train(_model(), digits, config, device=CPU)
    assert len(result.history) == 2
    assert all(math.isfinite(r.train_loss) for r in result.history)
    assert result.val_accuracy > 0.5


def test_log_lines(digits: Splits) -> None:
    lines: list[str] = []
    train(_model(), digits, FAST, device=CPU, log=lines.append)
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2") and lines[1].startswith("epoch 2/2")


# --- hooks -----------------------------------------------------------------------------------------


class StopAt(TrainHook):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.records: list[EpochRecord] = []

    def on_epoch_end(self, model: nn.Module, record: EpochRecord) -> bool:
        self.records.append(record)
        return record.epoch == self.epoch


def test_hook_stops_training(digits: Splits) -> None:
    stopper, watcher = StopAt(2), StopAt(-1)
    result = train(_model(), digits, FAST.replace(epochs=5), device=CPU, hooks=[stopper, watcher])
    assert len(result.history) == 2 and result.stopped_early
    assert [r.epoch for r in stopper.records] == [1, 2]
    assert [r.epoch for r in watcher.records] == [1, 2]  # every hook sees every epoch
    assert stopper.records == result.history


def test_stop_on_last_epoch_is_not_early(digits: Splits) -> None:
    result = train(_model(), digits, FAST, device=CPU, hooks=[StopAt(2)])
    assert len(result.history) == 2 and not result.stopped_early


class L2(TrainHook):
    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.calls = 0

    def loss(self, model: nn.Module, step: int, total_steps: int) -> torch.Tensor:
        self.calls += 1
        return self.strength * sum((p**2).sum() for p in model.parameters())


def _weight_norm(model: nn.Module) -> float:
    return float(sum((p.detach() ** 2).sum() for n, p in model.named_parameters() if p.ndim > 1) ** 0.5)


def test_hook_loss_term_is_added(digits: Splits) -> None:
    config = FAST.replace(epochs=1, weight_decay=0.0)
    plain, penalised = _model(), _model()
    start = _weight_norm(plain)
    train(plain, digits, config, device=CPU)
    hook = L2(5.0)
    result = train(penalised, digits, config, device=CPU, hooks=[hook])
    assert hook.calls == len(digits.x_train) // config.batch_size
    assert _weight_norm(penalised) < 0.05 * start
    assert _weight_norm(plain) > 0.5 * start
    assert result.history[0].train_loss > 0  # the penalty shows in the reported loss


class ExtraParam(TrainHook):
    """A parameter outside the model pulled towards 3.0 by the hook's loss, with its own lr."""

    def __init__(self, lr: float) -> None:
        self.p = nn.Parameter(torch.zeros(4))
        self.lr = lr

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return [{"params": [self.p], "lr": self.lr, "weight_decay": 0.0}]

    def loss(self, model: nn.Module, step: int, total_steps: int) -> torch.Tensor:
        return ((self.p - 3.0) ** 2).sum()


def _reference_sgd(lr: float, steps: int, momentum: float) -> torch.Tensor:
    """Where the train loop's Nesterov SGD should leave an :class:`ExtraParam` after ``steps``."""
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([p], lr=lr, momentum=momentum, nesterov=True)
    for _ in range(steps):
        opt.zero_grad()
        ((p - 3.0) ** 2).sum().backward()
        opt.step()
    return p.detach()


def test_param_groups_are_optimised_with_their_own_lr(digits: Splits) -> None:
    config = FAST.replace(epochs=1, schedule="constant", lr=0.05)
    steps = len(digits.x_train) // config.batch_size
    moving, frozen = ExtraParam(lr=0.01), ExtraParam(lr=0.0)
    train(_model(), digits, config, device=CPU, hooks=[moving, frozen])
    assert frozen.p.grad is not None  # gradients reached it, but lr 0 keeps it put
    assert torch.equal(frozen.p.detach(), torch.zeros(4))
    expected = _reference_sgd(0.01, steps, config.momentum)
    torch.testing.assert_close(moving.p.detach(), expected)
    assert not torch.allclose(expected, _reference_sgd(config.lr, steps, config.momentum))


class CountSteps(TrainHook):
    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.steps.append((step, total_steps))


def test_after_step_called_once_per_step(digits: Splits) -> None:
    hook = CountSteps()
    config = FAST.replace(epochs=3)
    train(_model(), digits, config, device=CPU, hooks=[hook])
    total = 3 * (len(digits.x_train) // config.batch_size)
    assert hook.steps == [(s, total) for s in range(total)]


def test_after_step_sees_updated_weights(digits: Splits) -> None:
    """A mask re-applied after every step (as pruning does) holds at the end."""

    class Mask(TrainHook):
        def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
            with torch.no_grad():
                model.fc1.weight[:, ::2] = 0.0

    model = _model()
    train(model, digits, FAST.replace(epochs=1), device=CPU, hooks=[Mask()])
    assert torch.count_nonzero(model.fc1.weight[:, ::2]) == 0
    assert torch.count_nonzero(model.fc1.weight[:, 1::2]) > 0


# --- TrainConfig ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"optimizer": "adam"}, "'adam'"),
        ({"schedule": "linear"}, "'linear'"),
        ({"epochs": -1}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"warmup": 1.0}, "warmup"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"distill_weight": 1.5}, "distill_weight must be in \\[0, 1\\], got 1.5"),
        ({"distill_weight": -0.1}, "distill_weight"),
        ({"distill_temperature": 0.0}, "distill_temperature must be > 0, got 0.0"),
        ({"distill_temperature": float("nan")}, "distill_temperature"),
    ],
)
def test_config_validation(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        TrainConfig(**changes)
    with pytest.raises(UserError, match=needle):
        TrainConfig().replace(**changes)


def test_config_round_trip() -> None:
    config = TrainConfig(epochs=3, batch_size=32, lr=0.1, optimizer="adamw", schedule="onecycle", warmup=0.1, seed=7)
    d = config.to_dict()
    assert d["version"] == 1 and d["optimizer"] == "adamw"
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == config
    assert TrainConfig.from_dict({"epochs": 2}) == TrainConfig(epochs=2)
    with pytest.raises(UserError, match="bogus"):
        TrainConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(UserError, match="version"):
        TrainConfig.from_dict({**d, "version": 99})
    assert config.replace(lr=0.2).lr == 0.2 and config.lr == 0.1


def test_config_distill_fields_round_trip_and_old_dicts_load() -> None:
    # A dict written before the distillation fields existed (version 1, no distill_* keys).
    old = {"version": 1, "epochs": 3, "batch_size": 32, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9,
           "weight_decay": 5e-4, "schedule": "cosine", "warmup": 0.0, "label_smoothing": 0.0, "seed": 0}
    loaded = TrainConfig.from_dict(old)
    assert loaded.distill_weight == 0.0 and loaded.distill_temperature == 4.0
    # Not distilling serialises exactly as before: baseline cache keys do not change.
    assert loaded.to_dict() == old
    distil = TrainConfig(distill_weight=0.5, distill_temperature=2.0)
    d = distil.to_dict()
    assert d["distill_weight"] == 0.5 and d["distill_temperature"] == 2.0
    assert TrainConfig.from_dict(json.loads(json.dumps(d))) == distil


# --- distillation ------------------------------------------------------------------------------------


def _linear(seed: int) -> nn.Module:
    """No BatchNorm or dropout: train and eval mode compute the same function."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def test_distillation_loss_formula() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    t = 3.0
    p_t = torch.softmax(teacher / t, 1)
    expected = t * t * (p_t * (p_t.log() - torch.log_softmax(student / t, 1))).sum(1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, t), expected)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-7)


def test_distillation_refused_without_teacher(digits: Splits) -> None:
    with pytest.raises(UserError, match="distill_weight 0.5 needs a teacher"):
        train(_linear(0), digits, FAST.replace(distill_weight=0.5), device=CPU)
    with pytest.raises(UserError, match="teacher outputs"):
        wrong = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
        train(_linear(0), digits, FAST.replace(distill_weight=0.5), device=CPU, teacher=wrong)


def test_distillation_loss_is_the_mix_of_ce_and_kl(digits: Splits) -> None:
    # A learning rate so small the student does not move: the epoch's mean loss can be recomputed
    # from the same batches (same seed, same order).
    w, temp = 0.3, 2.0
    config = FAST.replace(epochs=1, lr=1e-12, schedule="constant", distill_weight=w, distill_temperature=temp)
    student, teacher = _linear(0), _linear(1)
    plain = train(copy.deepcopy(student), digits, config.replace(distill_weight=0.0), device=CPU)
    mixed = train(student, digits, config, device=CPU, teacher=teacher)
    train_loader, _ = loaders(digits, config.batch_size, CPU, seed=config.seed)
    terms = []
    with torch.no_grad():
        for xb, yb in train_loader:
            ce = nn.functional.cross_entropy(student(xb), yb)
            terms.append((1 - w) * ce + w * distillation_loss(student(xb), teacher(xb), temp))
    expected = float(torch.stack(terms).mean())
    assert mixed.history[0].train_loss == pytest.approx(expected, rel=1e-5)
    assert abs(mixed.history[0].train_loss - plain.history[0].train_loss) > 0.01


def test_distillation_with_teacher_equal_to_student_has_zero_loss(digits: Splits) -> None:
    # Pure distillation (w = 1) from an identical teacher: KL is 0, so nothing moves.
    config = FAST.replace(epochs=1, weight_decay=0.0, distill_weight=1.0)
    student = _linear(0)
    teacher = copy.deepcopy(student)
    before = _weights(student)
    result = train(student, digits, config, device=CPU, teacher=teacher)
    assert result.history[0].train_loss == pytest.approx(0.0, abs=1e-6)
    for k, v in student.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)


def _kl_to(teacher: nn.Module, student: nn.Module, digits: Splits) -> float:
    _, val_loader = loaders(digits, 512, CPU)
    with torch.no_grad():
        return float(sum(distillation_loss(student(xb), teacher(xb), 1.0) for xb, _ in val_loader))


def test_distilled_student_moves_toward_the_teacher(digits: Splits) -> None:
    # The teacher's outputs have nothing to do with the labels: only distillation can follow them.
    teacher = _linear(7)
    with torch.no_grad():
        teacher[1].weight.mul_(5.0)
    config = FAST.replace(epochs=3, weight_decay=0.0, lr=0.05)
    start = _kl_to(teacher, _linear(0), digits)
    labels_only = _linear(0)
    train(labels_only, digits, config, device=CPU)
    distilled = _linear(0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    inputs: dict[str, torch.Tensor] = {}
    student_hook = distilled.register_forward_pre_hook(lambda m, a: inputs.__setitem__("student", a[0]))

    def teacher_pre(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        assert not module.training and not torch.is_grad_enabled()
        seen.append((inputs["student"], args[0]))

    teacher_hook = teacher.register_forward_pre_hook(teacher_pre)
    teacher_before = _weights(teacher)
    train(distilled, digits, config.replace(distill_weight=0.9), device=CPU, teacher=teacher)
    student_hook.remove()
    teacher_hook.remove()
    assert len(seen) == 3 * (len(digits.x_train) // config.batch_size)
    assert all(s is t for s, t in seen)  # the teacher sees the student's own batch, not a copy
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())
    assert teacher.training  # its mode is restored
    assert _kl_to(teacher, distilled, digits) < 0.5 * min(start, _kl_to(teacher, labels_only, digits))


# --- BatchNorm recalibration ------------------------------------------------------------------------


def test_recalibrate_batchnorm_matches_data_statistics(digits: Splits) -> None:
    model = _model()
    model.eval()
    with torch.no_grad():  # garbage statistics
        model.bn1.running_mean.fill_(100.0)
        model.bn1.running_var.fill_(1e-3)
    recalibrate_batchnorm(model, digits, batches=50, batch_size=128)
    assert not model.training
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # The statistics of bn1's input (conv1's output) over the training images.
    train_loader, _ = loaders(digits, 64, CPU)
    xb = train_loader.normalize(digits.x_train)
    with torch.no_grad():
        feats = model.conv1(xb)
    mean = feats.mean(dim=(0, 2, 3))
    var = feats.var(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, mean, atol=0.02 * float(var.sqrt().mean()), rtol=0.05)
    torch.testing.assert_close(model.bn1.running_var, var, rtol=0.1, atol=1e-4)


def test_recalibrate_batchnorm_without_bn_is_a_no_op(digits: Splits) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = _weights(model)
    recalibrate_batchnorm(model, digits)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


# --- devices ------------------------------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device(CPU) == CPU
    assert resolve_device(None).type in ("cpu", "cuda")
    assert resolve_device("") == resolve_device(None)
    with pytest.raises(UserError, match="'nope'"):
        resolve_device("nope")
    with pytest.raises(UserError, match="'meta'"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="'cuda:1'.*CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(UserError, match="does not exist"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
