"""benchmarks/sws_ablation.py: each variant moves exactly the setting it names."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from spaces.plan import Plan

REPO = Path(__file__).resolve().parents[2]


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _settings(plan: Plan) -> dict[str, object]:
    config = plan.steps[0].config
    return {"pi_zero": config.pi_zero, "warmup": config.warmup, "tau": config.tau,
            "components": config.components, **{f"ft.{k}": v for k, v in plan.finetune.items()}}


def test_each_variant_changes_only_its_setting_and_the_last_all_of_them() -> None:
    _load("paper_anchors")
    ab = _load("sws_ablation")
    recipe = sys.modules["paper_anchors"].sws_plan("lenet300", 33, 6000)
    table = ab.variants(recipe, preset_epochs=3)
    base = _settings(recipe)
    changed = {k: {s for s, v in _settings(change(recipe)).items() if base.get(s) != v} | (set(base) - set(_settings(change(recipe))))
               for k, (_, change) in table.items()}
    assert changed["recipe"] == set()
    assert changed["pi_zero"] == {"pi_zero"} and changed["warmup"] == {"warmup"}
    # The preset's optimizer: the recipe's Adam, rate, decay and schedule go, the epochs stay.
    assert changed["optimizer"] == {"ft.optimizer", "ft.lr", "ft.weight_decay", "ft.schedule"}
    assert changed["epochs"] == {"ft.epochs"} and table["epochs"][1](recipe).finetune["epochs"] == 15
    assert changed["all"] == {"pi_zero", "warmup", "ft.optimizer", "ft.lr", "ft.weight_decay", "ft.schedule", "ft.epochs"}
    for _, change in table.values():  # every variant is a valid plan (its JSON round-trips)
        plan = change(recipe)
        assert Plan.from_dict(plan.to_dict()) == plan
