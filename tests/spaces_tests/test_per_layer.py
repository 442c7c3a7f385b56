"""Per-layer overrides in plans: validated, applied, recorded, replayed byte-identically, and
sampled as their own parameters on models with few layers."""

from __future__ import annotations

import json

import optuna
import pytest
import torch

from models.errors import UserError
from models.registry import create_model
from spaces.intk import IntConfig
from spaces.lowrank import LowRankConfig
from spaces.plan import Plan, Step, StudySpace, apply_plan, suggest_plan
from spaces.policy import LayerPolicy
from spaces.registry import ApplyContext
from storage.codec import encode

UNPROTECTED = LayerPolicy(keep_first=False, keep_last=False)


def _apply(plan: Plan) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet300").eval()
    apply_plan(model, plan, ApplyContext(policy=plan.policy)).finalize()
    return model


def test_a_layer_override_changes_that_layer_only() -> None:
    plan = Plan((Step("int", IntConfig(bits=4), {"fc2": {"bits": 2}}),), UNPROTECTED)
    model = _apply(plan)
    assert model.fc1.weight_repr.bits == 4 and model.fc2.weight_repr.bits == 2 and model.fc3.weight_repr.bits == 4
    assert len(encode(model)) < len(encode(_apply(Plan((Step("int", IntConfig(bits=4)),), UNPROTECTED))))


def test_protection_still_wins_over_a_low_override() -> None:
    plan = Plan((Step("int", IntConfig(bits=4), {"fc3": {"bits": 2}}),), LayerPolicy())
    assert _apply(plan).fc3.weight_repr.bits == 8  # the classifier is protected (8 bits)


def test_per_layer_plans_round_trip_through_json_byte_identically() -> None:
    plan = Plan((
        Step("lowrank", LowRankConfig(rank_ratio=0.5), {"fc1": {"rank_ratio": 0.1}}),
        Step("int", IntConfig(bits=6), {}),
    ), UNPROTECTED)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert encode(_apply(again)) == encode(_apply(plan))
    no_layers = Plan((Step("int", IntConfig(bits=6)),)).to_dict()
    assert "layers" not in no_layers["steps"][0]  # plan files without overrides keep their shape


@pytest.mark.parametrize(("layers", "message"), [
    ({"fc1": {"symmetric": False}}, "steps[0].layers.fc1.symmetric: int does not set 'symmetric' per layer"),
    ({"fc1": {"bits": 9}}, "bits must be in 2..8, got 9"),
    ({"fc1": {"bits": "4"}}, 'steps[0].layers.fc1.bits: expected int, got "4"'),
    ({"fc1": {"nope": 1}}, "steps[0].layers.fc1.nope: unknown key"),
    ([1], "steps[0].layers: expected an object"),
])
def test_malformed_overrides_are_refused_naming_their_path(layers: object, message: str) -> None:
    d = {"steps": [{"technique": "int", "config": {"bits": 4}, "layers": layers}]}
    with pytest.raises(UserError) as info:
        Plan.from_dict(d)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_override_of_a_missing_layer_is_refused_at_apply() -> None:
    plan = Plan((Step("int", IntConfig(bits=4), {"fc9": {"bits": 2}}),))
    with pytest.raises(UserError, match=r"steps\[0\].layers.fc9: no conv/linear layer .* layers: fc1, fc2, fc3"):
        _apply(plan)


def test_sampling_gives_each_layer_its_own_parameter_and_replays() -> None:
    space = StudySpace("int-only", {"weights": ("int",)}, per_layer_max=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    study.enqueue_trial({"plan.per_layer": True})
    trial = study.ask()
    plan = suggest_plan(trial, space, UNPROTECTED, layers=["fc1", "fc2", "fc3"])
    (step,) = plan.steps
    assert {"int.fc2.bits", "int.fc3.bits"} <= set(trial.params) and "int.fc1.bits" not in trial.params
    assert step.layers["fc1"] == {"bits": step.config.bits}  # the first layer takes the step's value
    assert step.layers["fc2"] == {"bits": trial.params["int.fc2.bits"]}
    assert suggest_plan(optuna.trial.FixedTrial(trial.params), space, UNPROTECTED, layers=["fc1", "fc2", "fc3"]) == plan


def test_per_layer_parameters_take_the_recorded_range_too() -> None:
    # A study recorded int.bits in [5, 6]; this code's range is wider. Its per-layer parameters
    # (int.<layer>.bits) stay in the recorded range, like the step's own.
    recorded = {"int.bits": {"name": "IntDistribution", "attributes": {"low": 5, "high": 6, "step": 1, "log": False}}}
    space = StudySpace("int-only", {"weights": ("int",)}, per_layer_max=8, ranges={"int": recorded})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(4):
        study.enqueue_trial({"plan.per_layer": True})
        trial = study.ask()
        plan = suggest_plan(trial, space, UNPROTECTED, layers=["fc1", "fc2", "fc3"])
        for name in ("int.bits", "int.fc2.bits", "int.fc3.bits"):
            assert (trial.distributions[name].low, trial.distributions[name].high) == (5, 6), name
        assert {v["bits"] for v in plan.steps[0].layers.values()} <= {5, 6}


def test_no_overrides_after_a_structure_step() -> None:
    space = StudySpace("s", {"structure": ("lowrank",), "weights": ("int",)}, per_layer_max=8)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"plan.per_layer": True})
    plan = suggest_plan(study.ask(), space, UNPROTECTED, layers=["fc1", "fc2", "fc3"])
    assert plan.steps[0].layers and not plan.steps[1].layers
    off = suggest_plan(optuna.trial.FixedTrial({"plan.per_layer": False, "lowrank.mode": "ratio",
                                                 "lowrank.rank_ratio": 0.5, "int.bits": 4, "int.symmetric": True,
                                                 "int.learned_step": True}),
                       space, UNPROTECTED, layers=["fc1", "fc2", "fc3"])
    assert not off.steps[0].layers and not off.steps[1].layers  # the switch off: uniform plans


def test_a_per_layer_codebook_takes_the_layer_clusters() -> None:
    from spaces.codebook import CodebookConfig

    plan = Plan((Step("codebook", CodebookConfig(clusters=16), {"fc2": {"clusters": 4}}),), UNPROTECTED)
    model = _apply(plan)
    assert model.fc1.weight_repr.k == 16 and model.fc2.weight_repr.k == 4
    with pytest.raises(UserError, match="codebook does not set 'clusters' per layer with this config"):
        Step("codebook", CodebookConfig(clusters=16, scope="global"), {"fc2": {"clusters": 4}})


# ------------------------------------------------------------------ deep models: one skew per technique


class _Drops:
    """A stand-in sensitivity profile: each layer's drop is fixed, whatever the technique."""

    def __init__(self, drops: dict[str, float]) -> None:
        self.drops = drops

    def covers(self, technique: str, field: str) -> bool:
        return True

    def drop(self, technique: str, field: str, layer: str, value: float) -> float:
        return self.drops[layer]


def test_every_declared_direction_compresses_more_along_it() -> None:
    from spaces.plan import skewable, technique_fingerprint
    from spaces.registry import techniques

    declared = {n: t for n, t in techniques().items() if t.stronger}
    assert {"prune", "int", "codebook", "lowrank"} <= set(declared)
    for name, technique in declared.items():
        params = technique_fingerprint(technique)["params"]
        assert all(d in (-1, 1) and f"{name}.{f}" in params for f, d in technique.stronger.items()), name
        fields = skewable(technique, technique.moderate())
        assert fields, f"{name}: moderate() sets none of {dict(technique.stronger)} per layer"
        for field, dist in fields:
            sizes = {}
            for end in (dist.low, dist.high):
                torch.manual_seed(0)
                model = create_model("digits_cnn").eval()
                plan = Plan((Step(name, technique.moderate(), {"conv2": {field: end}, "conv3": {field: end}}),))
                apply_plan(model, plan, ApplyContext(policy=plan.policy)).finalize()
                sizes[end] = len(encode(model))
            stronger, milder = (dist.high, dist.low) if technique.stronger[field] > 0 else (dist.low, dist.high)
            assert sizes[stronger] < sizes[milder], (name, field, sizes)


def test_deep_models_sample_one_skew_per_technique_not_one_value_per_layer() -> None:
    space = StudySpace("s", {"structure": ("lowrank",), "weights": ("int",)}, per_layer_max=1)
    layers = ["fc1", "fc2", "fc3"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"plan.per_layer": True, "lowrank.mode": "ratio", "lowrank.rank_ratio": 0.3,
                         "lowrank.skew": 1.0})
    trial = study.ask()
    plan = suggest_plan(trial, space, UNPROTECTED, layers=layers, sensitivity=_Drops({"fc1": 0.2, "fc2": 0.0, "fc3": 0.1}))
    assert "lowrank.skew" in trial.params
    assert not [p for p in trial.params if p.count(".") > 1]  # no <technique>.<layer>.<field>
    low = plan.steps[0].layers
    assert low["fc1"]["rank_ratio"] > low["fc3"]["rank_ratio"] > low["fc2"]["rank_ratio"]  # sensitive: more rank
    assert not plan.steps[1].layers and "int.skew" not in trial.params  # after a structure step: none
    model = _apply(plan)  # the resolved values are what the layers get
    assert model.fc1.first.out_features / 300 > model.fc2.first.out_features / 100  # kept share of the rank


def test_skew_zero_is_exactly_the_uniform_plan() -> None:
    space = StudySpace("int-only", {"weights": ("int",)}, per_layer_max=1)
    fixed = {"plan.per_layer": True, "int.bits": 4, "int.symmetric": True, "int.learned_step": False}
    profile = _Drops({"fc1": 0.2, "fc2": 0.0, "fc3": 0.1})
    skewed = suggest_plan(optuna.trial.FixedTrial({**fixed, "int.skew": 0.0}), space, UNPROTECTED,
                          layers=["fc1", "fc2", "fc3"], sensitivity=profile)
    uniform = suggest_plan(optuna.trial.FixedTrial({**fixed, "plan.per_layer": False}), space, UNPROTECTED)
    assert skewed == uniform and skewed.to_dict() == uniform.to_dict()


def test_a_space_recorded_before_skews_existed_keeps_uniform_plans_on_deep_models() -> None:
    from spaces.plan import get_study_space

    space = get_study_space("all")
    assert space.skew and StudySpace.from_record(space.record()).skew
    old = {k: v for k, v in space.record().items() if k != "skew"}
    assert StudySpace.from_record(old).skew is False


def test_a_plan_may_open_the_protected_ends_and_then_sets_them_per_layer() -> None:
    space = StudySpace("int-only", {"weights": ("int",)}, per_layer_max=8, open_ends=True)
    fixed = {"plan.per_layer": True, "int.bits": 4, "int.symmetric": True, "int.learned_step": True,
             "int.fc2.bits": 3, "int.fc3.bits": 2}
    kwargs = {"layers": ["fc1", "fc2"], "open_layers": ["fc1", "fc2", "fc3"]}
    opened = suggest_plan(optuna.trial.FixedTrial({**fixed, "plan.protect_ends": False}), space, LayerPolicy(), **kwargs)
    assert opened.policy == UNPROTECTED and opened.steps[0].layers["fc3"] == {"bits": 2}
    assert _apply(opened).fc3.weight_repr.bits == 2  # the classifier is compressed like the rest
    kept = suggest_plan(optuna.trial.FixedTrial({**fixed, "plan.protect_ends": True}), space, LayerPolicy(), **kwargs)
    assert kept.policy == LayerPolicy() and "fc3" not in kept.steps[0].layers
    assert _apply(kept).fc3.weight_repr.bits == 8
    # Sampled, the switch is a parameter; the plan file holds the policy it chose, and replays.
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    plan = suggest_plan(trial, space, LayerPolicy(), **kwargs)
    assert "plan.protect_ends" in trial.params
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert suggest_plan(optuna.trial.FixedTrial(trial.params), space, LayerPolicy(), **kwargs) == plan


def test_a_space_recorded_before_the_ends_switch_keeps_its_ends_protected() -> None:
    from spaces.plan import get_study_space

    space = get_study_space("all")
    assert space.open_ends and StudySpace.from_record(space.record()).open_ends
    old = StudySpace.from_record({k: v for k, v in space.record().items() if k != "open_ends"})
    assert old.open_ends is False
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    plan = suggest_plan(trial, old, LayerPolicy(), layers=["fc1", "fc2"], open_layers=["fc1", "fc2", "fc3"])
    assert "plan.protect_ends" not in trial.params and plan.policy == LayerPolicy()
