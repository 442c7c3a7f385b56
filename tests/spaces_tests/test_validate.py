"""spaces.validate: every type error a hand-edited plan can hold is one UserError line that starts
with its JSON path; valid plans (every technique's settings, sampled plans) pass."""

from __future__ import annotations

import copy
import json

import optuna
import pytest

from models.errors import UnknownNameError, UserError
from spaces.plan import Plan, Step, get_study_space, suggest_plan
from spaces.registry import get_technique, list_techniques
from spaces.validate import validate_plan

INT4 = {"technique": "int", "config": {"version": 1, "bits": 4}}
GOOD = {
    "version": 1,
    "steps": [{"technique": "prune", "config": {"sparsity": 0.5}}, INT4],
    "policy": {"keep_first": True, "min_weights": 10, "max_share": 0.3},
    "finetune": {"epochs": 2, "lr": 0.01},
}

# (plan, the start of the one-line message)
MALFORMED: list[tuple[object, str]] = [
    # from the issue
    ({"steps": 5}, "steps: expected a list, got 5"),
    ({"steps": [{"config": {"bits": 4}}]}, 'steps[0]: missing "technique"'),
    ({"steps": [{"technique": "int", "config": [4]}]}, "steps[0].config: expected an object, got [4]"),
    ({"steps": [], "policy": 3}, "policy: expected an object, got 3"),
    ({"steps": [], "policy": {"min_weights": "abc"}}, 'policy.min_weights: expected int, got "abc"'),
    ({"steps": [], "finetune": {"epochs": "abc"}}, 'finetune.epochs: expected int, got "abc"'),
    ({"steps": [], "finetune": {"foo": 1}}, "finetune.foo: unknown key; known: batch_size, "),
    ({"steps": [{"technique": "codebook", "config": {"clusters": 16.5}}]},
     "steps[0].config.clusters: expected int, got 16.5"),
    ({"steps": [INT4, {"technique": "actquant", "config": {"format": 8}}]},
     "steps[1].config.format: expected str, got 8"),
    ({"steps": [{"technique": "prune"}, {"technique": "int", "config": {"bits": "4"}}]},
     'steps[1].config.bits: expected int, got "4"'),
    # more
    ([INT4], "plan: expected an object"),
    ("int4", "plan: expected an object"),
    ({}, "steps: missing"),
    ({"stepz": []}, "stepz: unknown key; known: finetune, policy, steps, version"),
    ({"steps": [], "version": "1"}, 'version: expected int, got "1"'),
    ({"steps": ["int"]}, 'steps[0]: expected an object {"technique": ..., "config": {...}}, got "int"'),
    ({"steps": [{"technique": 3}]}, "steps[0].technique: expected str, got 3"),
    ({"steps": [{"technique": "int", "cfg": {}}]}, "steps[0].cfg: unknown key; known: config, layers, technique"),
    ({"steps": [{"technique": "int", "config": {"bitz": 4}}]}, "steps[0].config.bitz: unknown key; known: bits, "),
    ({"steps": [{"technique": "int", "config": {"bits": True}}]}, "steps[0].config.bits: expected int, got true"),
    ({"steps": [{"technique": "int", "config": {"symmetric": 1}}]}, "steps[0].config.symmetric: expected bool, got 1"),
    ({"steps": [{"technique": "int", "config": {"version": "1"}}]}, 'steps[0].config.version: expected int, got "1"'),
    ({"steps": [{"technique": "prune", "config": {"sparsity": "0.5"}}]},
     'steps[0].config.sparsity: expected float, got "0.5"'),
    ({"steps": [{"technique": "prune", "config": {"sparsity": None}}]}, "steps[0].config.sparsity: expected float, got null"),
    ({"steps": [], "policy": {"keep_last": "no"}}, 'policy.keep_last: expected bool, got "no"'),
    ({"steps": [], "policy": {"keep_all": True}}, "policy.keep_all: unknown key; known: keep_first, keep_last, "),
    ({"steps": [], "finetune": [3]}, "finetune: expected an object, got [3]"),
    ({"steps": [], "finetune": {"lr": [0.1]}}, "finetune.lr: expected float, got [0.1]"),
    ({"steps": [], "finetune": {"seed": 3}}, "finetune.seed: unknown key"),  # the trial's, not the plan's
    # fine-tune ranges: no config checks them before the fine-tune, so validation does
    ({"steps": [], "finetune": {"epochs": -1}}, "finetune.epochs must be >= 0, got -1"),
    ({"steps": [], "finetune": {"lr": 0.0}}, "finetune.lr must be > 0, got 0.0"),
    ({"steps": [], "finetune": {"optimizer": "nope"}}, "finetune.optimizer must be one of"),
    ({"steps": [], "finetune": {"batch_size": 0}}, "finetune.batch_size must be >= 1, got 0"),
]


@pytest.mark.parametrize(("plan", "message"), MALFORMED, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(MALFORMED)])
def test_a_malformed_plan_is_one_line_naming_its_json_path(plan: object, message: str) -> None:
    with pytest.raises(UserError) as exc:
        validate_plan(copy.deepcopy(plan))
    text = str(exc.value)
    assert text.startswith(message), text
    assert "\n" not in text and "Traceback" not in text


def test_an_unknown_technique_keeps_the_registry_error_with_its_path() -> None:
    with pytest.raises(UnknownNameError) as exc:
        validate_plan({"steps": [INT4, {"technique": "nope"}]})
    text = str(exc.value)
    assert text.startswith("steps[1].technique: unknown technique 'nope'; known: ")
    assert all(name in text for name in list_techniques())


def test_the_path_prefix_names_the_plan_inside_a_record() -> None:
    with pytest.raises(UserError, match=r'^plan\.steps\[0\]\.config\.bits: expected int, got "4"$'):
        validate_plan({"steps": [{"technique": "int", "config": {"bits": "4"}}]}, path="plan")
    with pytest.raises(UserError, match=r"^plan: expected an object"):
        validate_plan(None, path="plan")


def test_range_errors_are_left_to_the_configs() -> None:
    # 300 clusters is an int: validation passes, the config's own check names the range.
    plan = {"steps": [{"technique": "codebook", "config": {"clusters": 300}}]}
    validate_plan(plan)
    with pytest.raises(UserError, match="codebook.clusters must be in 2..256, got 300"):
        Plan.from_dict(plan)


def test_plan_from_dict_refuses_what_validate_refuses() -> None:
    with pytest.raises(UserError, match=r'^steps\[0\]\.config\.bits: expected int, got "4"$'):
        Plan.from_dict({"steps": [{"technique": "int", "config": {"bits": "4"}}]})


def test_valid_plans_pass() -> None:
    validate_plan(GOOD)
    validate_plan({"steps": []})
    validate_plan({"steps": [{"technique": "binary"}]})  # config defaults
    validate_plan({"steps": [{"technique": "prune", "config": {"sparsity": 1}}]})  # an int is a valid float
    validate_plan(json.loads(json.dumps(GOOD)))
    assert Plan.from_dict(GOOD).to_dict()["steps"][1]["config"]["bits"] == 4


@pytest.mark.parametrize("name", list_techniques())
def test_every_setting_of_every_technique_passes(name: str) -> None:
    technique = get_technique(name)
    for config in technique.settings():
        d = Plan((Step(name, config),)).to_dict()
        validate_plan(d)
        validate_plan(json.loads(json.dumps(d)))
        assert Plan.from_dict(d).to_dict() == d


def test_sampled_plans_pass() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = get_study_space("all")
    for _ in range(40):
        trial = study.ask()
        plan = suggest_plan(trial, space, finetune_space={"epochs": (1, 8), "lr": (1e-3, 1e-1)})
        validate_plan(plan.to_dict())
        study.tell(trial, 0.0)
