"""Discovery and derived study spaces: the registry is the only list of techniques."""

from __future__ import annotations

import pkgutil
from dataclasses import dataclass

import pytest

import spaces
from models.errors import UnknownNameError
from spaces import registry
from spaces.plan import (
    FP32,
    NONE,
    StudySpace,
    get_study_space,
    space_changes,
    study_names,
    technique_fingerprint,
)
from spaces.registry import (
    STAGES,
    ApplyContext,
    Technique,
    TechniqueConfig,
    get_technique,
    list_techniques,
    register_technique,
)


def test_every_technique_module_of_the_package_is_discovered() -> None:
    modules = {f"spaces.{m.name}" for m in pkgutil.iter_modules(spaces.__path__)}
    registered = {type(get_technique(n)).__module__ for n in list_techniques()}
    assert registered <= modules
    assert {"spaces.prune", "spaces.intk", "spaces.sws", "spaces.actquant"} <= registered


def test_all_offers_every_registered_technique_of_every_stage() -> None:
    space = get_study_space("all")
    assert set(space.technique_names()) == set(list_techniques())
    for stage in STAGES:
        for name in list_techniques(stage):
            assert name in space.options(stage), (stage, name)
    assert space.options("weights")[0] == FP32 and space.options("sparsity")[0] == NONE
    assert "structured+lowrank" in space.options("structure")  # combinable, in their order


def test_family_studies_name_families_resolved_through_the_registry() -> None:
    assert get_study_space("quantization").options("weights") == ("float", "int")
    assert get_study_space("clustering").options("weights") == ("codebook",)
    assert get_study_space("lowrank").options("structure") == ("lowrank",)
    with pytest.raises(UnknownNameError, match="known: all, binary, clustering"):
        get_study_space("nope")
    assert study_names()[0] == "all"


@dataclass(frozen=True)
class _HalfConfig(TechniqueConfig):
    level: int = 1


class _Half(Technique[_HalfConfig, None]):
    name = "half_test"
    stage = "weights"
    family = "half"
    config_cls = _HalfConfig

    def suggest(self, trial, prefix: str) -> _HalfConfig:
        return _HalfConfig(level=trial.suggest_int(f"{prefix}.level", 1, 3))

    def apply(self, model, config: _HalfConfig, ctx: ApplyContext) -> None:
        return None


@pytest.fixture
def half_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registers a throwaway technique for one test (the registry is restored afterwards)."""
    monkeypatch.setattr(registry._REGISTRY, "techniques", dict(registry._REGISTRY.techniques))
    register_technique(_Half)


def test_a_registered_technique_joins_all_with_no_list_edited(half_registered: None) -> None:
    assert "half_test" in list_techniques("weights")
    assert "half_test" in get_study_space("all").options("weights")
    assert "half_test" not in get_study_space("quantization").options("weights")
    assert _Half.families == ("half",)


def test_fingerprint_walks_conditional_branches() -> None:
    params = technique_fingerprint(get_technique("codebook"))["params"]
    assert {"codebook.method", "codebook.clusters", "codebook.scope", "codebook.dbscan_eps"} <= set(params)
    lowrank = technique_fingerprint(get_technique("lowrank"))["params"]
    assert {"lowrank.rank_ratio", "lowrank.energy"} <= set(lowrank)


def test_recorded_space_round_trips_and_changes_are_named() -> None:
    record = get_study_space("all").record()
    assert StudySpace.from_record(record).stages == get_study_space("all").stages
    assert space_changes(record) == []
    changed = {**record, "techniques": {**record["techniques"]}}
    prune = changed["techniques"]["prune"]
    changed["techniques"]["prune"] = {**prune, "params": {**prune["params"], "prune.extra": {}}}
    changed["techniques"]["gone"] = {"version": 1, "params": {}}
    assert space_changes(changed) == ["parameter prune.extra removed", "technique 'gone' is not in this code"]
