"""spaces.plan.suggest_finetune: the fine-tune dimensions a plan samples, the optimizer among them."""

from __future__ import annotations

import optuna
import pytest

from models.errors import UserError
from models.presets import get_preset
from spaces.plan import ADAMW_FINETUNE, Plan, suggest_finetune

OLD = {"epochs": (1, 6), "lr": (1e-3, 1e-1), "distill_weight": (0.0, 0.9), "distill_temperature": (1.0, 8.0)}
NEW = {**OLD, "adamw_lr": (1e-4, 5e-3)}


def _sample(space: dict[str, tuple[float, float]], n: int) -> list[tuple[dict, dict]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append((suggest_finetune(trial, space), dict(trial.params)))
        study.tell(trial, 0.0)
    return out


def test_adamw_plans_take_the_recipes_optimizer_at_their_own_rate() -> None:
    samples = _sample(NEW, 40)
    adamw = [(ft, p) for ft, p in samples if p["finetune.optimizer"] == "adamw"]
    sgd = [(ft, p) for ft, p in samples if p["finetune.optimizer"] == "sgd"]
    assert adamw and sgd
    for ft, params in adamw:
        assert {k: ft[k] for k in ADAMW_FINETUNE} == dict(ADAMW_FINETUNE)
        assert ft["lr"] == params["finetune.adamw_lr"] and 1e-4 <= ft["lr"] <= 5e-3
        assert "finetune.lr" not in params  # conditional: the SGD rate is not sampled beside it
    for ft, params in sgd:
        assert "optimizer" not in ft and "finetune.adamw_lr" not in params
        assert ft["lr"] == params["finetune.lr"] and 1e-3 <= ft["lr"] <= 1e-1


def test_a_space_without_the_optimizer_samples_what_it_sampled_before() -> None:
    for ft, params in _sample(OLD, 10):
        assert set(params) == {f"finetune.{k}" for k in OLD}
        assert "optimizer" not in ft


def test_a_sampled_finetune_is_a_valid_plan_and_training_config() -> None:
    preset = get_preset("mnist-lenet300")
    for ft, _ in _sample(NEW, 20):
        plan = Plan.from_dict(Plan(finetune=ft).to_dict())
        config = preset.finetune.replace(**plan.finetune)
        assert config.optimizer == ft.get("optimizer", "sgd") and config.lr == ft["lr"]
        if config.optimizer == "adamw":
            assert config.schedule == "constant" and config.weight_decay == 0.0


def test_an_unknown_key_is_refused_by_name() -> None:
    with pytest.raises(UserError, match="'momentum' is not searchable"):
        _sample({"momentum": (0.5, 0.9)}, 1)
