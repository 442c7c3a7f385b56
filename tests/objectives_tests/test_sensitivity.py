"""objectives.sensitivity: the baseline's per-layer sensitivity profile (structure, caching beside
the baseline) and the skew that turns one global intensity into per-layer values on deep models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import optuna
import pytest
import torch

from objectives import sensitivity as sens
from objectives.objective import Objective
from objectives.pipeline import Workbench
from objectives.record import TrialRecord
from objectives.sensitivity import FieldCurve, SensitivityProfile, grid_of, load_or_measure_profile
from spaces.intk import IntConfig
from spaces.plan import Plan, StudySpace, skew_layers, suggest_plan, technique_fingerprint
from spaces.policy import LayerPolicy
from spaces.prune import PruneConfig
from spaces.registry import get_technique
from storage.codec import encode

CPU = torch.device("cpu")
# prune, int and lowrank measure in well under a second on the digits CNN; float has no direction
# of compression (no ``stronger`` field) and must be left out of the profile.
TECHNIQUES = ("prune", "int", "lowrank", "float")


def _spec(technique: str, field: str) -> dict:
    return technique_fingerprint(get_technique(technique))["params"][f"{technique}.{field}"]


def _profile(curves: dict[str, dict[str, dict[str, float]]]) -> SensitivityProfile:
    """A hand-made profile: technique -> field -> layer -> one constant drop at every grid point."""
    out: dict[str, dict[str, FieldCurve]] = {}
    layers: list[str] = []
    for name, fields in curves.items():
        for field, drops in fields.items():
            spec = _spec(name, field)
            grid = tuple(grid_of(spec))
            out.setdefault(name, {})[field] = FieldCurve(
                get_technique(name).stronger[field],
                spec,
                {},
                grid,
                {p: (d,) * len(grid) for p, d in drops.items()},
            )
            layers = list(drops)
    return SensitivityProfile("hand", "key", 1.0, 100, tuple(layers), out)


# ------------------------------------------------------------------------------ the profile


def test_the_profile_has_one_drop_per_layer_technique_and_grid_point(digits_baseline) -> None:  # noqa: ANN001
    d = digits_baseline
    layers = [p for p, _ in LayerPolicy().eligible(d.model)]
    model = d.fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile = sens.measure_profile(
        model,
        d.data,
        baseline_key=d.record.key,
        policy=LayerPolicy(),
        techniques=TECHNIQUES,
        device=CPU,
        images=100,
    )
    assert profile.layers == tuple(layers) == ("conv2", "conv3", "fc1")  # protected ends left out
    assert set(profile.curves) == {"prune", "int", "lowrank"}  # float: nothing to skew
    assert set(profile.curves["lowrank"]) == {"rank_ratio"}  # moderate() is the ratio mode
    assert profile.curves["int"]["bits"].grid == (2, 4, 6, 8)
    assert profile.curves["prune"]["sparsity"].grid == (0.2, 0.46, 0.72, 0.98)
    assert profile.images == 100 and 0.5 < profile.baseline_accuracy <= 1.0
    for fields in profile.curves.values():
        for curve in fields.values():
            assert set(curve.drops) == set(layers)
            assert all(len(v) == len(curve.grid) == sens.GRID_POINTS for v in curve.drops.values())
            assert all(-1.0 <= x <= 1.0 for v in curve.drops.values() for x in v)
    # Pruning 98% of one conv layer's weights hurts that layer's accuracy more than 20% does.
    conv2 = profile.curves["prune"]["sparsity"].drops["conv2"]
    assert conv2[-1] > conv2[0] + 0.05
    # The baseline itself was not touched.
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    # drop() reads the grid back at its points and interpolates between them.
    assert profile.drop("prune", "sparsity", "conv2", 0.98) == pytest.approx(conv2[-1])
    mid = profile.drop("prune", "sparsity", "conv2", (0.72 + 0.98) / 2)
    assert mid == pytest.approx((conv2[2] + conv2[3]) / 2)
    again = SensitivityProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again == profile


def test_codebook_is_profiled_on_its_log_grid_of_clusters() -> None:
    spec = _spec("codebook", "clusters")
    assert spec["attributes"]["log"] and grid_of(spec) == [2, 10, 51, 256]  # evenly spaced in log2
    assert grid_of(_spec("lowrank", "rank_ratio")) == [0.05, 0.3333, 0.6167, 0.9]


def test_the_profile_is_cached_beside_the_baseline_and_read_back(
    digits_baseline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    d = digits_baseline

    def bench() -> Workbench:
        return Workbench(
            d.preset, d.data, d.fresh(), d.record, len(encode(d.model)), CPU, 0, store=str(tmp_path)
        )

    first = bench().sensitivity(LayerPolicy(), ["prune"])
    folder = tmp_path / "baselines" / f"{d.record.preset}-{d.record.key}"
    (path,) = folder.glob("sensitivity-*.json")
    assert path.name == f"sensitivity-{first.ident}.json" and not list(folder.glob("*.tmp"))

    def no_evaluation(*args: object, **kwargs: object) -> float:
        raise AssertionError("the cached profile was measured again")

    monkeypatch.setattr(sens, "evaluate", no_evaluation)
    assert bench().sensitivity(LayerPolicy(), ["prune"]) == first  # a new worker reads the file
    # Another grid is another profile: measured (here: refused by the patched evaluation).
    with pytest.raises(AssertionError, match="measured again"):
        load_or_measure_profile(
            d.fresh(),
            d.data,
            baseline_key=d.record.key,
            folder=folder,
            policy=LayerPolicy(),
            techniques=["prune"],
            device=CPU,
            points=3,
        )
    # A torn file is measured again, not trusted.
    path.write_text("{")
    with pytest.raises(AssertionError, match="measured again"):
        bench().sensitivity(LayerPolicy(), ["prune"])


# ------------------------------------------------------------------------------ the skew

PRUNE_DROPS = {"a": 0.30, "b": 0.0, "c": 0.15}  # a is the sensitive layer, b the robust one


def test_skew_gives_sensitive_layers_milder_values_and_robust_ones_stronger() -> None:
    profile = _profile({"prune": {"sparsity": PRUNE_DROPS}, "int": {"bits": PRUNE_DROPS}})
    layers = list(PRUNE_DROPS)
    out = skew_layers(get_technique("prune"), PruneConfig(sparsity=0.6), layers, 1.0, profile)
    # z = (+1.22, -1.22, 0); the unit coordinate of 0.6 in [0.2, 0.98] moves by -z * 0.25.
    z = 0.15 / math.sqrt((0.15**2 * 2) / 3)
    t = (0.6 - 0.2) / 0.78
    assert out["a"]["sparsity"] == pytest.approx(0.2 + (t - z * 0.25) * 0.78, abs=1e-4)
    assert out["b"]["sparsity"] == pytest.approx(0.2 + (t + z * 0.25) * 0.78, abs=1e-4)
    assert out["a"]["sparsity"] < 0.6 == out["c"]["sparsity"] < out["b"]["sparsity"]
    bits = skew_layers(get_technique("int"), IntConfig(bits=4), layers, 1.0, profile)
    assert (
        bits["a"]["bits"] > 4 == bits["c"]["bits"] > bits["b"]["bits"]
    )  # fewer bits compress more
    assert all(isinstance(v["bits"], int) for v in bits.values())
    # Half the skew moves half as far.
    half = skew_layers(get_technique("prune"), PruneConfig(sparsity=0.6), layers, 0.5, profile)
    assert 0.6 - half["a"]["sparsity"] == pytest.approx((0.6 - out["a"]["sparsity"]) / 2, abs=1e-4)


def test_skew_zero_or_equal_sensitivities_leave_the_plan_uniform_and_values_stay_in_range() -> None:
    profile = _profile({"prune": {"sparsity": PRUNE_DROPS}})
    prune, layers = get_technique("prune"), list(PRUNE_DROPS)
    assert skew_layers(prune, PruneConfig(sparsity=0.6), layers, 0.0, profile) == {}
    flat = _profile({"prune": {"sparsity": dict.fromkeys(layers, 0.1)}})
    assert skew_layers(prune, PruneConfig(sparsity=0.6), layers, 1.0, flat) == {}
    # Near the top of the range the robust layer is clipped to the distribution's high end.
    many = {f"l{i}": 0.0 for i in range(9)} | {"hot": 1.0}
    steep = _profile({"prune": {"sparsity": many}})
    out = skew_layers(prune, PruneConfig(sparsity=0.95), list(many), 1.0, steep)
    assert all(0.2 <= v["sparsity"] <= 0.98 for v in out.values())
    assert out["l0"]["sparsity"] == 0.98  # z = -1/3 would move it past the high end
    assert out["hot"]["sparsity"] == pytest.approx(
        0.95 - 2.0 * 0.25 * 0.78, abs=1e-4
    )  # z clipped at 2


def test_a_field_measured_through_another_is_read_at_the_same_strength() -> None:
    # moderate() measures lowrank in the ratio mode; the energy mode reads the same curve at the
    # same strength: energy 0.8 (its strongest) is rank_ratio 0.05 (its strongest).
    spec = _spec("lowrank", "rank_ratio")
    curve = FieldCurve(-1, spec, {}, tuple(grid_of(spec)), {"a": (0.4, 0.1, 0.05, 0.0)})
    profile = SensitivityProfile("x", "k", 1.0, 10, ("a",), {"lowrank": {"rank_ratio": curve}})
    assert profile.covers("lowrank", "energy") and not profile.covers("prune", "sparsity")
    assert profile.drop("lowrank", "energy", "a", 0.8) == pytest.approx(0.4)
    assert profile.drop("lowrank", "energy", "a", 0.999) == pytest.approx(0.0)
    with pytest.raises(KeyError):
        profile.drop("prune", "sparsity", "a", 0.5)


# ------------------------------------------------------------------------------ end to end


def test_a_deep_plan_holds_resolved_per_layer_values_and_round_trips() -> None:
    profile = _profile({"int": {"bits": PRUNE_DROPS}})
    space = StudySpace("int-only", {"weights": ("int",)}, per_layer_max=1)
    params = {
        "plan.per_layer": True,
        "int.bits": 4,
        "int.symmetric": True,
        "int.learned_step": True,
        "int.skew": 1.0,
    }
    plan = suggest_plan(
        optuna.trial.FixedTrial(params), space, None, layers=list(PRUNE_DROPS), sensitivity=profile
    )
    (step,) = plan.steps
    assert step.config.bits == 4 and step.layers == {
        "a": {"bits": 6},
        "b": {"bits": 2},
        "c": {"bits": 4},
    }
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # The switch off: the uniform plan, and no skew parameter.
    off = suggest_plan(
        optuna.trial.FixedTrial({**params, "plan.per_layer": False}),
        space,
        None,
        layers=list(PRUNE_DROPS),
        sensitivity=profile,
    )
    assert not off.steps[0].layers


def test_a_trial_on_a_deep_model_runs_its_skewed_plan(digits_baseline, tmp_path: Path) -> None:  # noqa: ANN001
    d = digits_baseline
    bench = Workbench(
        d.preset, d.data, d.fresh(), d.record, len(encode(d.model)), CPU, 0, store=str(tmp_path)
    )
    # per_layer_max=1: the digits CNN's five layers count as deep.
    objective = Objective(
        bench,
        StudySpace("p", {"sparsity": ("prune",)}, per_layer_max=1),
        finetune_space={"epochs": (1, 1)},
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.enqueue_trial(
        {
            "plan.per_layer": True,
            "prune.sparsity": 0.9,
            "prune.scope": "global",
            "prune.schedule": "oneshot",
            "prune.skew": 1.0,
        }
    )
    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert (
        trial.state == optuna.trial.TrialState.COMPLETE
        and "prune.conv2.sparsity" not in trial.params
    )
    plan = Plan.from_dict(TrialRecord.from_trial(trial).plan or {})
    (step,) = plan.steps
    assert set(step.layers) == {"conv2", "conv3", "fc1"}
    values = [o["sparsity"] for o in step.layers.values()]
    assert len(set(values)) > 1 and all(0.2 <= v <= 0.98 for v in values)
    profile = bench.profiles[(LayerPolicy(), ("prune",))]
    drops = {p: profile.drop("prune", "sparsity", p, 0.9) for p in step.layers}
    # The layer that suffers most at 0.9 is pruned least, the one that suffers least most.
    assert step.layers[max(drops, key=drops.__getitem__)]["sparsity"] == min(values)
    assert step.layers[min(drops, key=drops.__getitem__)]["sparsity"] == max(values)
    assert list((tmp_path / "baselines").glob("*/sensitivity-*.json"))


def test_only_a_deep_model_with_something_to_skew_gets_a_profile(digits_baseline) -> None:  # noqa: ANN001
    d = digits_baseline
    bench = Workbench(d.preset, d.data, d.fresh(), d.record, len(encode(d.model)), CPU, 0)
    eligible = ["conv2", "conv3", "fc1"]

    def objective(stages: dict[str, tuple[str, ...]], per_layer_max: int) -> Objective:
        return Objective(bench, StudySpace("s", stages, per_layer_max=per_layer_max))

    few = objective({"sparsity": ("prune",)}, 8)  # five layers: each samples its own value
    assert few.layers == eligible and few.sensitivity() is None
    legacy = objective({"sparsity": ("prune",)}, 0)  # studies made before per-layer sampling
    assert legacy.layers == [] and legacy.sensitivity() is None
    floats = objective({"weights": ("float",)}, 1)  # deep, but float has no intensity to skew
    assert floats.layers == [] and floats.sensitivity() is None
    assert bench.profiles == {}  # nothing measured so far
    deep = objective({"sparsity": ("prune",), "weights": ("fp32", "float", "int")}, 1)
    assert deep.layers == eligible and deep.skewed == ["prune", "int"]
